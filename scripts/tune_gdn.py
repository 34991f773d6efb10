#!/usr/bin/env python3
"""Where the time of our GDN forward and backward goes, and which launch parameters serve them
best (GPU).

For each (B, T) in --shapes (Qwen3-Next heads: Hk 16, Hv 32, dk = dv = 128, bf16, L2 norm in the
kernel): the median time of each Pallas Triton stage on its own (forward: cumsum, kkt/solve/wy, h,
o; backward: the recompute, dv_local, dh, dqkwg, wy_bwd), then of the whole forward and of
forward + backward under each variant of ``gpu_triton.fwd.BlockSizes`` in VARIANTS. Prints a table and writes ``tune_gdn.json`` under --out. Run on the GPU:
``PYTHONPATH=. python3 scripts/tune_gdn.py --out $OUT``. With --decode-batches it sweeps the
decode kernel's block_v x num_warps instead (tune_gdn_decode.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from bench_common import measure_ceilings, median_seconds, trace_calls
from bench_gdn import HV, decode_loop_times, fwd_flops, make_inputs, parse_shapes

from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule
from pallas_kernels.gated_delta_rule.gpu_triton import fwd as triton_fwd
from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule.gpu_triton.decode import gated_delta_rule_decode
from pallas_kernels.gated_delta_rule.gpu_triton.dh import chunk_bwd_dh
from pallas_kernels.gated_delta_rule.gpu_triton.dqkwg import chunk_bwd_dqkwg
from pallas_kernels.gated_delta_rule.gpu_triton.dv_local import chunk_bwd_dv_local
from pallas_kernels.gated_delta_rule.gpu_triton.h import chunk_fwd_h
from pallas_kernels.gated_delta_rule.gpu_triton.kkt_solve_wy import chunk_kkt_solve_wy
from pallas_kernels.gated_delta_rule.gpu_triton.o import chunk_fwd_o
from pallas_kernels.gated_delta_rule.gpu_triton.wy_bwd import chunk_bwd_wy

VARIANTS = {
    "default": {},
    "h_bv32": {"block_v_h": 32},
    "h_bv64": {"block_v_h": 64},
    "h_bv16": {"block_v_h": 16},
    "h_w2": {"num_warps_h": 2},
    "h_w8": {"num_warps_h": 8},
    "wy_w1": {"num_warps_wy": 1},
    "wy_w2": {"num_warps_wy": 2},
    "wy_w8": {"num_warps_wy": 8},
    "o_bv64": {"block_v_o": 64},
    "o_w2": {"num_warps_o": 2},
    "o_w8": {"num_warps_o": 8},
    "stages2": {"num_stages": 2},
    "stages4": {"num_stages": 4},
    "split4": {"seq_splits": 4},
    "split8": {"seq_splits": 8},
    "dh_bv32": {"block_v_dh": 32},
    "dh_bv64": {"block_v_dh": 64},
    "dh_bv16": {"block_v_dh": 16},
    "dv_local_kernel": {"fuse_dv_local": False},
    "dv_bv128": {"block_v_dv": 128},
    "dqkwg_bv64": {"block_v_dqkwg": 64},
    "dqkwg_w8": {"num_warps_dqkwg": 8},
    "dqkwg_w2": {"num_warps_dqkwg": 2},
    "dh_w2": {"num_warps_dh": 2},
    "dv_w2": {"num_warps_dv": 2},
    "wy_bwd_w2": {"num_warps_wy_bwd": 2},
    "dqkwg_bk128": {"block_k_dqkwg": 128},
    "dqkwg_bk32": {"block_k_dqkwg": 32},
    "wy_bwd_w8": {"num_warps_wy_bwd": 8},
    "recompute": {"save_states": False},
}


def stage_times(q, k, v, g, beta, bs: triton_fwd.BlockSizes, reps: int, interpret=False) -> dict:
    """Median ms of each forward stage run alone on the same inputs."""
    C = bs.chunk
    G = jax.jit(lambda g: triton_fwd.chunk_local_cumsum(g, C))(g)
    wy = jax.jit(lambda k, v, G, b: chunk_kkt_solve_wy(
        k, v, G, b, chunk_size=C, use_qk_l2norm=True, solve_precision=jax.lax.Precision.DEFAULT,
        num_warps=bs.num_warps_wy, num_stages=bs.num_stages, interpret=interpret))
    w, u = wy(k, v, G, beta)
    hs = jax.jit(lambda k, w, u, G: chunk_fwd_h(
        k, w, u, G, None, chunk_size=C, block_v=triton_fwd.state_block_v(bs.block_v_h, u.shape),
        use_qk_l2norm=True, num_warps=bs.num_warps_h, num_stages=bs.num_stages, interpret=interpret))
    h, v_new, _ = hs(k, w, u, G)
    os_ = jax.jit(lambda q, k, G, h, vn: chunk_fwd_o(
        q, k, G, h, vn, scale=q.shape[-1] ** -0.5, out_dtype=jnp.bfloat16, chunk_size=C,
        block_v=bs.block_v_o, use_qk_l2norm=True, num_warps=bs.num_warps_o,
        num_stages=bs.num_stages, interpret=interpret)[0])
    ms = {
        "cumsum": median_seconds(jax.jit(lambda g: triton_fwd.chunk_local_cumsum(g, C)), g,
                                 iters=reps),
        "wy": median_seconds(wy, k, v, G, beta, iters=reps),
        "h": median_seconds(hs, k, w, u, G, iters=reps),
        "o": median_seconds(os_, q, k, G, h, v_new, iters=reps),
    }
    return {name: s * 1e3 for name, s in ms.items()}


def bwd_stage_times(q, k, v, g, beta, bs: triton_fwd.BlockSizes, reps: int,
                    interpret=False) -> dict:
    """Median ms of each backward stage (bwd.py) run alone, on dense chunk-aligned inputs."""
    C, T = bs.chunk, q.shape[1]
    assert T % C == 0, "tune shapes are chunk multiples"
    scale = q.shape[-1] ** -0.5
    q, k = (common.l2norm(x.astype(jnp.float32)).astype(x.dtype) for x in (q, k))
    do = jnp.ones_like(v) * 0.01
    G = jax.jit(lambda g: triton_fwd.chunk_local_cumsum(g, C))(g)
    lay = triton_fwd.chunk_layout(T, C)
    launch = {"chunk_size": C, "num_stages": bs.num_stages, "interpret": interpret}
    recompute = jax.jit(lambda k, v, G, b: triton_fwd.chunk_states(
        k, v, G, b, None, lay, block_sizes=bs, use_qk_l2norm=False,
        solve_precision=jax.lax.Precision.DEFAULT, interpret=interpret, return_inverse=True))
    w, h, v_new, _, inverse = recompute(k, v, G, beta)
    dv_local = jax.jit(lambda q, k, G, do: chunk_bwd_dv_local(
        q, k, G, do, scale=scale, block_v=bs.block_v_dv, num_warps=bs.num_warps_dv, **launch))
    dvl = dv_local(q, k, G, do)
    dht = jnp.zeros((q.shape[0], v.shape[2], q.shape[-1], v.shape[-1]), jnp.float32)
    dh = jax.jit(lambda q, k, w, G, do, dvl, dht: chunk_bwd_dh(
        q, k, w, G, do, dvl, dht, scale=scale,
        block_v=triton_fwd.state_block_v(bs.block_v_dh, do.shape), num_warps=bs.num_warps_dh,
        **launch))
    dhs, dv_new, _ = dh(q, k, w, G, do, dvl, dht)
    dqkwg = jax.jit(lambda q, k, G, h, dhs, vn, do: chunk_bwd_dqkwg(
        q, k, G, h, dhs, vn, do, scale=scale, block_v=bs.block_v_dqkwg,
        num_warps=bs.num_warps_dqkwg, **launch))
    _, dk_, dG = dqkwg(q, k, G, h, dhs, v_new, do)
    wy_bwd = jax.jit(lambda k, v, G, b, inv, h, dvn, dk_, dG: chunk_bwd_wy(
        k, v, G, b, inv, h, dvn, dk_, dG, solve_precision=jax.lax.Precision.DEFAULT,
        num_warps=bs.num_warps_wy_bwd, **launch))
    ms = {
        "recompute": median_seconds(recompute, k, v, G, beta, iters=reps),
        "dv_local": median_seconds(dv_local, q, k, G, do, iters=reps),
        "dh": median_seconds(dh, q, k, w, G, do, dvl, dht, iters=reps),
        "dqkwg": median_seconds(dqkwg, q, k, G, h, dhs, v_new, do, iters=reps),
        "wy_bwd": median_seconds(wy_bwd, k, v, G, beta, inverse, h, dv_new, dk_, dG,
                                 iters=reps),
    }
    return {name: s * 1e3 for name, s in ms.items()}


def fwd_bwd(bs: triton_fwd.BlockSizes, interpret=False):
    """Jitted d(sum of o^2)/d(q, k, v, g, beta) through our op with block sizes bs."""
    def loss(q, k, v, g, b):
        o, _ = chunk_gated_delta_rule(q, k, v, g, b, use_qk_l2norm_in_kernel=True,
                                      impl="pallas_triton", block_sizes=bs,
                                      interpret=interpret)
        # Not linear in o: with a constant d(o), XLA drops the forward's o stage and whatever
        # only feeds it, and forward + backward looked the same with and without save_states.
        return jnp.sum(jnp.square(o.astype(jnp.float32)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def decode_variants(batches, variants) -> dict:
    """The decode kernel (gpu_triton.decode, T = 1, L2 norm in the kernel, bf16 q/k/v, float32
    state) at each B in ``batches`` under each (block_v, num_warps) in ``variants``: ms a step in
    an unrolled jitted loop and the device's busy ms a step (bench_gdn.decode_loop_times), and
    both over the HBM time of reading and writing the state at this run's copy rate."""
    copy = measure_ceilings()["copy_gb_per_s"] * 1e9
    out = {"copy_gb_per_s": copy / 1e9}
    for B in batches:
        q, k, v, g, beta = make_inputs(B, 1, seed=1)
        inputs = tuple(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)) + (
            jnp.asarray(g), jnp.asarray(beta))
        d = v.shape[-1]
        floor_ms = 2 * B * HV * d * d * 4 / copy * 1e3
        for bv, nw in variants:

            def step(q, k, v, g, b, s, bv=bv, nw=nw, d=d):
                return gated_delta_rule_decode(q, k, v, g, b, s, scale=d ** -0.5,
                                               use_qk_l2norm=True, block_v=bv, num_warps=nw)[1]

            state = jnp.zeros((B, HV, d, d), jnp.float32)
            loop_ms, busy_ms = decode_loop_times(step, inputs, state, calls=15)
            key = f"B{B}_bv{bv}_w{nw}"
            out[key] = {"loop_ms": loop_ms, "busy_ms": busy_ms, "floor_ms": floor_ms,
                        "loop_vs_floor": loop_ms / floor_ms, "busy_vs_floor": busy_ms / floor_ms}
            print(key, {a: round(b, 4) for a, b in out[key].items()}, flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1x32768,8x4096")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    p.add_argument("--skip-stages", action="store_true",
                   help="time the variants only, not each stage of the default")
    p.add_argument("--profile", default=None,
                   help="also trace 5 forward and 5 forward + backward calls of each variant with "
                        "jax.profiler into PROFILE/<shape>_<variant>_{fwd,fwdbwd} (summarise with "
                        "scripts/profile_summary.py)")
    p.add_argument("--decode-batches", default=None,
                   help="only sweep the decode kernel's block_v x num_warps at these batch "
                        "sizes (e.g. 1,64,256): writes tune_gdn_decode.json")
    p.add_argument("--interpret", action="store_true",
                   help="Pallas interpret mode (a CPU smoke run; use tiny --shapes)")
    args = p.parse_args(argv)
    it = args.interpret
    os.makedirs(args.out, exist_ok=True)
    if args.decode_batches:
        res = decode_variants([int(b) for b in args.decode_batches.split(",")],
                              [(bv, nw) for bv in (8, 16, 32, 64, 128) for nw in (1, 2, 4, 8)])
        with open(os.path.join(args.out, "tune_gdn_decode.json"), "w") as f:
            json.dump(res, f, indent=1)
        return
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shapes": {}}
    for B, T in parse_shapes(args.shapes):
        q, k, v, g, beta = make_inputs(B, T)
        q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
        g, beta = jnp.asarray(g), jnp.asarray(beta)
        row = {"variants_ms": {}, "variants_fwdbwd_ms": {}}
        if not args.skip_stages:
            bs0 = triton_fwd.BlockSizes()
            row["stages_ms"] = stage_times(q, k, v, g, beta, bs0, args.reps, it)
            row["bwd_stages_ms"] = bwd_stage_times(q, k, v, g, beta, bs0, args.reps, it)
            print(f"{B}x{T}: stages {row['stages_ms']} backward {row['bwd_stages_ms']}",
                  flush=True)
        for name in args.variants.split(","):
            bs = dataclasses.replace(triton_fwd.BlockSizes(), **VARIANTS[name])
            f = jax.jit(lambda q, k, v, g, b, bs=bs: chunk_gated_delta_rule(
                q, k, v, g, b, output_final_state=True, use_qk_l2norm_in_kernel=True,
                impl="pallas_triton", block_sizes=bs, interpret=it))
            for key, fn in (("variants_ms", f), ("variants_fwdbwd_ms", fwd_bwd(bs, it))):
                try:
                    row[key][name] = median_seconds(fn, q, k, v, g, beta, iters=args.reps) * 1e3
                except Exception as e:  # noqa: BLE001  (a variant the compiler rejects)
                    row[key][name] = None
                    print(f"{B}x{T} {name} {key}: {e!r:.200}")
                    continue
                if args.profile:
                    part = "fwd" if key == "variants_ms" else "fwdbwd"
                    trace_calls(fn, q, k, v, g, beta,
                                log_dir=os.path.join(args.profile, f"{B}x{T}_{name}_{part}"))
            print(f"{B}x{T} {name}: fwd {row['variants_ms'][name]} "
                  f"fwd+bwd {row['variants_fwdbwd_ms'][name]}", flush=True)
        best = min((t, n) for n, t in row["variants_ms"].items() if t is not None)
        row["best"] = best[1]
        row["best_tflops"] = fwd_flops(B, T) / (best[0] * 1e-3) / 1e12
        res["shapes"][f"{B}x{T}"] = row
        with open(os.path.join(args.out, "tune_gdn.json"), "w") as f:
            json.dump(res, f, indent=1)
    fields = ("variants_ms", "variants_fwdbwd_ms")
    for field in fields if args.skip_stages else ("stages_ms", "bwd_stages_ms") + fields:
        names = list(next(iter(res["shapes"].values()))[field])
        print(f"\n{field}\n| shape | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for key, row in res["shapes"].items():
            cells = ["-" if row[field][n] is None else f"{row[field][n]:.3f}" for n in names]
            print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
