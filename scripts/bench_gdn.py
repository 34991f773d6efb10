#!/usr/bin/env python3
"""Benchmark of the chunked Gated DeltaNet: ours vs our jnp reference vs FLA vs jax-linear-attention.

Qwen3-Next shapes: Hk = 16, Hv = 32, dk = dv = 128, bf16 q/k/v, float32 g, L2 norm of q/k in the
kernel, output_final_state=True. Times each JAX call two ways: queued (bench_common.queued_seconds:
calls launched back to back, the device time per call, as FLA's triton.testing.do_bench measures it;
the figure the ratios use) and blocked (median over --reps calls, each synchronised, the
methodology of ../shared/anchors/gdn_anchor_bench.py; adds the host's dispatch to every call, so
the anchors' jla figures are blocked ones). Measures:
  - forward and forward + backward (grad of sum(o^2) w.r.t. q, k, v) at (B, T) in --shapes;
  - the decode step (T = 1) at B in --decode-batches, state [B, 32, 128, 128] float32 donated:
    a call, a step of an unrolled jitted loop, and the device's busy time a step of that loop
    (profiler: the kernels without the launch gaps);
  - the ceilings of this GPU measured in the same run: a bf16 matmul (TFLOP/s) and a device copy
    (GB/s); achieved rates are reported against them;
  - agreement: ours vs FLA, ours vs jla, ours vs our float32 reference (relative L2 error of o and
    of the final state), and our gradients (dq, dk, dv) vs autodiff of the float32 reference for
    B x T <= --compare-max-tokens.
FLA (PyTorch) runs first in a subprocess (`--worker fla`, no JAX import), on the same inputs; its
outputs come back through an .npz file.

On the lent H200 (see ../shared/anchors/README.md): copy ../shared/anchors and ../shared/wheels into
an ignored folder of the checkout, e.g. `.anchors/` and `.anchors/wheels/`, carry it, and run
  python3 -m pip install -q --no-index --no-deps --target "$HOME/site" .anchors/wheels/*.whl && \
  export PYTHONPATH="$HOME/site:$PWD"; python3 scripts/bench_gdn.py --out "$OUT"
It prints a table and writes $OUT/bench_gdn.json (and fla.npz). --quick runs small shapes only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HK, HV, D = 16, 32, 128
DEFAULT_SHAPES = "1x8192,1x32768,1x131072,8x4096"
DEFAULT_DECODE = "1,64,256"
ANCHOR_MS = {  # ../shared/anchors/README.md, H200: (FLA fwd, jla fwd, jla fwd+bwd)
    "1x8192": (0.761, 0.512, 1.777),
    "1x32768": (2.060, 1.512, 5.374),
    "1x131072": (8.279, 5.000, 19.80),
    "8x4096": (1.999, 1.114, 4.299),
}


def parse_shapes(s):
    return [tuple(int(x) for x in item.split("x")) for item in s.split(",") if item]


def make_inputs(B, T, seed=0):
    """Inputs shaped like Qwen3-Next's GDN layer: g = -exp(A) * softplus(a + dt) in float32."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, HK, D), dtype=np.float32)
    k = rng.standard_normal((B, T, HK, D), dtype=np.float32)
    v = rng.standard_normal((B, T, HV, D), dtype=np.float32)
    A = np.exp(rng.uniform(-2.0, 0.5, size=(1, 1, HV))).astype(np.float32)
    a = rng.standard_normal((B, T, HV), dtype=np.float32)
    g = (-A * np.logaddexp(0.0, a - 2.0)).astype(np.float32)
    beta = (1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, HV))))).astype(np.float32)
    return q, k, v, g, beta


def fwd_flops(B, T, C=64, dk=D, dv=D):
    """Useful FLOPs of the chunked forward (matmuls only; the solve is not counted).

    Per chunk and value head: kkt 2C^2 dk; w, u 2C^2 (dk + dv); v_new 2C dk dv; state update
    2C dk dv; o: q S 2C dk dv, q k^T 2C^2 dk, attn v_new 2C^2 dv.
    """
    per_chunk = (
        2 * C * C * dk + 2 * C * C * (dk + dv) + 6 * C * dk * dv + 2 * C * C * dk + 2 * C * C * dv
    )
    return B * HV * (-(-T // C)) * per_chunk


def fwd_bytes(B, T):
    """Compulsory HBM traffic of the forward: q, k, v, o in bf16, g and beta float32, final state."""
    return B * T * (2 * HK * D * 2 + 2 * HV * D * 2 + 2 * HV * 4) + B * HV * D * D * 4


def rel_l2(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------
# FLA worker (PyTorch only).
# ------------------------------------------------------------------------------------------


def fla_worker(args):
    import torch
    import triton
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    res, arrays = {}, {}
    for B, T in parse_shapes(args.shapes):
        q, k, v, g, beta = make_inputs(B, T)
        tq, tk, tv = (torch.tensor(x, device="cuda", dtype=torch.bfloat16) for x in (q, k, v))
        tg = torch.tensor(g, device="cuda", dtype=torch.float32)
        tb = torch.tensor(beta, device="cuda", dtype=torch.float32)

        def f(tq=tq, tk=tk, tv=tv, tg=tg, tb=tb):
            return chunk_gated_delta_rule(
                tq, tk, tv, tg, tb, output_final_state=True, use_qk_l2norm_in_kernel=True
            )

        o, s = f()
        ms = triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median")
        key = f"{B}x{T}"
        res[key] = {"fwd_ms": ms}
        if B * T <= args.compare_max_tokens:
            arrays[key + "_o"] = o.float().cpu().numpy()
            arrays[key + "_s"] = s.float().cpu().numpy()
        print(f"fla  {key}: fwd {ms:.3f} ms", flush=True)
        del tq, tk, tv, tg, tb, o, s
        torch.cuda.empty_cache()
    np.savez(os.path.join(args.out, "fla.npz"), **arrays)
    with open(os.path.join(args.out, "fla.json"), "w") as fh:
        json.dump(res, fh)


# ------------------------------------------------------------------------------------------
# JAX side.
# ------------------------------------------------------------------------------------------


def jax_time(row, name, f, *args, reps=30):
    """Times ``f(*args)`` into row[name] (queued: bench_common.queued_seconds) and
    row[name + "_blocked"] (bench_common.median_seconds over ``reps`` calls), in ms."""
    from bench_common import median_seconds, queued_seconds

    row[name + "_blocked"] = median_seconds(f, *args, iters=reps) * 1e3
    row[name] = queued_seconds(f, *args) * 1e3


def decode_loop_times(step, inputs, state, *, n_in: int = 32, calls: int = 5):
    """Device time of a decode step without the host's dispatch: ``n_in`` steps
    ``state = step(*inputs, state)`` unrolled in one jitted loop (a rolled fori_loop added about
    0.01 ms a step on an H200: 0.0145 against 0.0049 at B = 1), the state donated. Returns
    (ms a step: the median over ``calls`` blocked calls / n_in; the device's busy ms a step, from
    a profile of 3 calls: the kernels without the gaps between launches, which the first
    includes). Deletes ``state``."""
    import gzip
    import tempfile

    import jax
    from profile_summary import busy_time, device_events, newest_trace

    def loop(*args):
        *inputs, s = args
        return jax.lax.fori_loop(0, n_in, lambda _, s: step(*inputs, s), s, unroll=True)

    lj = jax.jit(loop, donate_argnums=len(inputs))
    st = lj(*inputs, state)
    st = lj(*inputs, st)
    jax.block_until_ready(st)
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        st = lj(*inputs, st)
        jax.block_until_ready(st)
        ts.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(3):  # the state is donated: each call takes the last one's
                st = lj(*inputs, st)
                jax.block_until_ready(st)
        with gzip.open(newest_trace(log_dir)) as f:
            events = device_events(json.load(f))
    del st
    return statistics.median(ts) * 1e3 / n_in, busy_time(events) * 1e-3 / (3 * n_in)


def launch_floor_times(state):
    """decode_loop_times of the least a decode step can be: one Pallas kernel that updates a
    16 x 16 tile of the state in place (aliased, as the decode kernel does). Its time in the
    loop is the launch cost that every step pays whatever it reads (the gap between two
    dependent kernels on the GPU), against which the decode step's own time is read."""
    import jax
    from jax.experimental import pallas as pl

    def touch(s):
        def kernel(s_ref, o_ref):
            o_ref[...] = s_ref[...] + 1.0

        spec = pl.BlockSpec((None, None, 16, 16), lambda i: (0, 0, 0, 0))
        return pl.pallas_call(kernel, grid=(1,), in_specs=[spec], out_specs=spec,
                              out_shape=jax.ShapeDtypeStruct(s.shape, s.dtype),
                              input_output_aliases={0: 0}, name="touch_state")(s)

    return decode_loop_times(touch, (), state)


def run_jax(args):
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, REPO)
    from pallas_kernels.gated_delta_rule import (
        chunk_gated_delta_rule,
        fused_recurrent_gated_delta_rule,
    )

    try:
        from jla.ops.mosaic_gpu.gated_delta_rule import gated_delta_rule as jla_gdn
    except Exception as e:  # noqa: BLE001
        jla_gdn = None
        print(f"jla not available: {e!r:.200}")
    if args.skip_jla:
        jla_gdn = None

    fla = {}
    fla_arrays = {}
    if os.path.exists(os.path.join(args.out, "fla.json")):
        with open(os.path.join(args.out, "fla.json")) as fh:
            fla = json.load(fh)
        fla_arrays = dict(np.load(os.path.join(args.out, "fla.npz")))

    from bench_common import measure_ceilings

    ceil = measure_ceilings()
    print(
        f"ceilings: bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s, "
        f"copy {ceil['copy_gb_per_s']:.0f} GB/s",
        flush=True,
    )
    out = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "impl": args.impl,
        "save_states": not args.recompute,
        "ceilings": ceil,
        "shapes": {},
        "decode": {},
    }

    def ours(impl):
        def f(q, k, v, g, b):
            return chunk_gated_delta_rule(
                q, k, v, g, b, output_final_state=True, use_qk_l2norm_in_kernel=True, impl=impl
            )

        return jax.jit(f)

    def ours_grad(impl):
        block_sizes = None
        if args.recompute and impl == "pallas_triton":
            from pallas_kernels.gated_delta_rule.gpu_triton.fwd import BlockSizes

            block_sizes = BlockSizes(save_states=False)

        def loss(q, k, v, g, b):
            o, _ = chunk_gated_delta_rule(
                q, k, v, g, b, use_qk_l2norm_in_kernel=True, impl=impl, block_sizes=block_sizes
            )
            return jnp.sum(jnp.square(o.astype(jnp.float32)))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    for B, T in parse_shapes(args.shapes):
        key = f"{B}x{T}"
        q, k, v, g, beta = make_inputs(B, T)
        jq, jk, jv = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
        jg, jb = jnp.asarray(g), jnp.asarray(beta)
        row = {"flops": fwd_flops(B, T), "bytes": fwd_bytes(B, T)}
        f = ours(args.impl)
        o, s = f(jq, jk, jv, jg, jb)
        jax_time(row, "ours_fwd_ms", f, jq, jk, jv, jg, jb, reps=args.reps)
        if not args.skip_bwd:
            fg = ours_grad(args.impl)
            jax_time(row, "ours_fwdbwd_ms", fg, jq, jk, jv, jg, jb, reps=args.reps)
            if B * T <= args.compare_max_tokens:  # our backward kernels against autodiff
                grads = fg(jq, jk, jv, jg, jb)  # of the float32 reference on the same inputs
                ref_grads = ours_grad("reference")(*(x.astype(jnp.float32) for x in (jq, jk, jv)),
                                                   jg, jb)
                for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
                    row[f"err_vs_ref_{name}"] = rel_l2(a, b)
                del grads, ref_grads
        if not args.skip_ref:
            fr = ours("reference")
            o_ref, s_ref = fr(jq, jk, jv, jg, jb)
            jax_time(row, "ref_fwd_ms", fr, jq, jk, jv, jg, jb, reps=args.reps)
            row["err_vs_ref_o"] = rel_l2(o, o_ref)
            row["err_vs_ref_state"] = rel_l2(s, s_ref)
            del o_ref, s_ref
            if not args.skip_bwd:
                jax_time(row, "ref_fwdbwd_ms", ours_grad("reference"), jq, jk, jv, jg, jb,
                         reps=args.reps)
        if jla_gdn is not None:
            fj = jax.jit(
                lambda q, k, v, g, b: jla_gdn(
                    q, k, v, g, b.astype(jnp.bfloat16), output_final_state=True, use_qk_l2norm=True
                )
            )
            try:
                oj, sj = fj(jq, jk, jv, jg, jb)
                jax_time(row, "jla_fwd_ms", fj, jq, jk, jv, jg, jb, reps=args.reps)
                row["err_vs_jla_o"] = rel_l2(o, oj)
                row["err_vs_jla_state"] = rel_l2(s, sj)
                if not args.skip_bwd:

                    def jloss(q, k, v, g, b):
                        oo, _ = jla_gdn(q, k, v, g, b.astype(jnp.bfloat16), use_qk_l2norm=True)
                        return jnp.sum(jnp.square(oo.astype(jnp.float32)))

                    jax_time(
                        row,
                        "jla_fwdbwd_ms",
                        jax.jit(jax.grad(jloss, argnums=(0, 1, 2))),
                        jq,
                        jk,
                        jv,
                        jg,
                        jb,
                        reps=args.reps,
                    )
            except Exception as e:  # noqa: BLE001
                print(f"jla {key} failed: {e!r:.300}")
        if key in fla:
            row["fla_fwd_ms"] = fla[key]["fwd_ms"]
            if key + "_o" in fla_arrays:
                row["err_vs_fla_o"] = rel_l2(o, fla_arrays[key + "_o"])
                row["err_vs_fla_state"] = rel_l2(s, fla_arrays[key + "_s"])
        ms = row["ours_fwd_ms"]
        row["ours_fwd_tflops"] = row["flops"] / (ms * 1e-3) / 1e12
        row["ours_fwd_gbs"] = row["bytes"] / (ms * 1e-3) / 1e9
        out["shapes"][key] = row
        print(f"{key}: " + ", ".join(f"{a}={b:.4g}" for a, b in row.items()), flush=True)
        del o, s, jq, jk, jv, jg, jb

    # Decode step: T = 1, state donated (updated in place by the kernel).
    if args.decode_batches:
        loop_ms, busy_ms = launch_floor_times(jnp.zeros((1, HV, D, D), jnp.float32))
        out["decode_launch_floor"] = {"in_loop_ms": loop_ms, "busy_ms": busy_ms}
        print(f"decode launch floor (one in-place kernel a step): {loop_ms:.4g} ms in the loop, "
              f"{busy_ms:.4g} busy", flush=True)
    for B in [int(x) for x in args.decode_batches.split(",") if x]:
        q, k, v, g, beta = make_inputs(B, 1, seed=1)
        jq, jk, jv = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
        jg, jb = jnp.asarray(g), jnp.asarray(beta)
        state = jnp.zeros((B, HV, D, D), jnp.float32)
        row = {"state_bytes": B * HV * D * D * 4}
        for impl, name in ((args.impl, "ours"), ("reference", "ref")):
            if name == "ref" and args.skip_ref:
                continue
            def call(q, k, v, g, b, s, impl=impl):
                return fused_recurrent_gated_delta_rule(
                    q,
                    k,
                    v,
                    g,
                    b,
                    initial_state=s,
                    output_final_state=True,
                    use_qk_l2norm_in_kernel=True,
                    impl=impl,
                )

            step = jax.jit(call, donate_argnums=5)
            st = state + 0
            _, st = step(jq, jk, jv, jg, jb, st)
            _, st = step(jq, jk, jv, jg, jb, st)
            jax.block_until_ready(st)
            ts = []
            for _ in range(args.reps):
                t = time.perf_counter()
                _, st = step(jq, jk, jv, jg, jb, st)
                jax.block_until_ready(st)
                ts.append(time.perf_counter() - t)
            row[f"{name}_step_ms"] = statistics.median(ts) * 1e3
            row[f"{name}_step_in_loop_ms"], row[f"{name}_step_busy_ms"] = decode_loop_times(
                lambda *a, call=call: call(*a)[1],
                (jq, jk, jv, jg, jb),
                st,
                calls=max(5, args.reps // 3),
            )
        hbm_ms = 2 * row["state_bytes"] / (ceil["copy_gb_per_s"] * 1e9) * 1e3
        row["hbm_floor_ms"] = hbm_ms
        row["ours_vs_floor"] = row["ours_step_in_loop_ms"] / hbm_ms
        row["ours_busy_vs_floor"] = row["ours_step_busy_ms"] / hbm_ms
        out["decode"][f"B{B}"] = row
        print(f"decode B={B}: " + ", ".join(f"{a}={b:.4g}" for a, b in row.items()), flush=True)
    return out


def print_table(res):
    def fmt(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}"

    print()
    print(
        f"device {res['device']}, jax {res['jax']}, impl {res['impl']}, "
        f"save_states {res['save_states']}"
    )
    hdr = (
        "shape",
        "ours fwd",
        "FLA fwd",
        "jla fwd",
        "ref fwd",
        "ours f+b",
        "jla f+b",
        "ref f+b",
        "ours fwd b",
        "jla fwd b",
        "ours f+b b",
        "jla f+b b",
        "TFLOP/s",
        "GB/s",
        "ours/FLA",
        "ours/jla",
        "err FLA",
        "err jla",
        "err ref",
    )
    print(" | ".join(f"{h:>10}" for h in hdr))
    for key, r in res["shapes"].items():
        anc = ANCHOR_MS.get(key, (None, None, None))
        fla = r.get("fla_fwd_ms")
        jla = r.get("jla_fwd_ms")
        cells = [
            key,
            fmt(r["ours_fwd_ms"]),
            fmt(fla),
            fmt(jla),
            fmt(r.get("ref_fwd_ms")),
            fmt(r.get("ours_fwdbwd_ms")),
            fmt(r.get("jla_fwdbwd_ms")),
            fmt(r.get("ref_fwdbwd_ms")),
            fmt(r.get("ours_fwd_ms_blocked")),
            fmt(r.get("jla_fwd_ms_blocked")),
            fmt(r.get("ours_fwdbwd_ms_blocked")),
            fmt(r.get("jla_fwdbwd_ms_blocked")),
            fmt(r["ours_fwd_tflops"], 1),
            fmt(r["ours_fwd_gbs"], 0),
            fmt(r["ours_fwd_ms"] / (fla or anc[0]) if (fla or anc[0]) else None, 2),
            fmt(r["ours_fwd_ms"] / (jla or anc[1]) if (jla or anc[1]) else None, 2),
            fmt(r.get("err_vs_fla_o"), 4),
            fmt(r.get("err_vs_jla_o"), 4),
            fmt(r.get("err_vs_ref_o"), 4),
        ]
        print(" | ".join(f"{c:>10}" for c in cells))
    print("(times queued back to back; 'b': each call blocked on, as the anchors' jla figures)")
    print(f"ceilings: {res['ceilings']}; anchors (FLA fwd, jla fwd, jla f+b): {ANCHOR_MS}")
    if res["decode"]:
        floor = res.get("decode_launch_floor")
        if floor:
            print(f"decode launch floor: one kernel updating its state in place, "
                  f"{fmt(floor['in_loop_ms'], 4)} ms a step in the loop")
        print(
            "decode step (ms):  B | ours | ours in loop | ours busy | ref | ref in loop | "
            "HBM floor | ours in loop/floor | ours busy/floor"
        )
        for key, r in res["decode"].items():
            print(
                f"  {key:>6} | {fmt(r.get('ours_step_ms'), 4)} | "
                f"{fmt(r.get('ours_step_in_loop_ms'), 4)} | {fmt(r.get('ours_step_busy_ms'), 4)} | "
                f"{fmt(r.get('ref_step_ms'), 4)} | {fmt(r.get('ref_step_in_loop_ms'), 4)} | "
                f"{fmt(r['hbm_floor_ms'], 4)} | {fmt(r['ours_vs_floor'], 2)} | "
                f"{fmt(r['ours_busy_vs_floor'], 2)}"
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="BxT,BxT,...")
    p.add_argument("--decode-batches", default=DEFAULT_DECODE)
    p.add_argument("--impl", default="pallas_triton")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    p.add_argument("--skip-fla", action="store_true")
    p.add_argument("--skip-jla", action="store_true")
    p.add_argument("--skip-ref", action="store_true")
    p.add_argument("--skip-bwd", action="store_true")
    p.add_argument(
        "--recompute",
        action="store_true",
        help="forward + backward with BlockSizes(save_states=False): the backward recomputes "
        "the forward's states (pallas_triton only)",
    )
    p.add_argument("--quick", action="store_true", help="small shapes only (smoke run)")
    p.add_argument("--compare-max-tokens", type=int, default=32768)
    p.add_argument("--worker", choices=["fla"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.decode_batches, args.reps = "1x256,2x128", "1,4", 3
    os.makedirs(args.out, exist_ok=True)
    if args.worker == "fla":
        fla_worker(args)
        return
    for name in ("fla.json", "fla.npz"):
        path = os.path.join(args.out, name)
        if os.path.exists(path):
            os.remove(path)
    if not args.skip_fla:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "fla",
            "--shapes",
            args.shapes,
            "--out",
            args.out,
            "--compare-max-tokens",
            str(args.compare_max_tokens),
        ]
        r = subprocess.run(cmd, check=False)
        if r.returncode:
            print(f"FLA worker failed (exit {r.returncode}); continuing without FLA")
    res = run_jax(args)
    print_table(res)
    path = os.path.join(args.out, "bench_gdn.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
