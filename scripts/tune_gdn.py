#!/usr/bin/env python3
"""Where the time of our GDN forward goes, and which launch parameters serve it best (GPU).

For each (B, T) in --shapes (Qwen3-Next heads: Hk 16, Hv 32, dk = dv = 128, bf16, L2 norm in the
kernel): the median time of each Pallas Triton stage on its own (cumsum, kkt/solve/wy, h, o), then
of the whole forward under each variant of ``gpu_triton.fwd.BlockSizes`` in VARIANTS, against the
default. Prints a table and writes ``tune_gdn.json`` under --out. Run on the GPU:
``PYTHONPATH=. python3 scripts/tune_gdn.py --out $OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from bench_common import median_seconds
from bench_gdn import fwd_flops, make_inputs, parse_shapes

from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule
from pallas_kernels.gated_delta_rule.gpu_triton import fwd as triton_fwd
from pallas_kernels.gated_delta_rule.gpu_triton.h import chunk_fwd_h
from pallas_kernels.gated_delta_rule.gpu_triton.kkt_solve_wy import chunk_kkt_solve_wy
from pallas_kernels.gated_delta_rule.gpu_triton.o import chunk_fwd_o

VARIANTS = {
    "default": {},
    "h_bv32": {"block_v_h": 32},
    "h_w8": {"num_warps_h": 8},
    "wy_w2": {"num_warps_wy": 2},
    "wy_w8": {"num_warps_wy": 8},
    "o_bv64": {"block_v_o": 64},
    "o_w8": {"num_warps_o": 8},
    "stages2": {"num_stages": 2},
    "stages4": {"num_stages": 4},
    "split4": {"seq_splits": 4},
    "split8": {"seq_splits": 8},
}


def stage_times(q, k, v, g, beta, bs: triton_fwd.BlockSizes, reps: int) -> dict:
    """Median ms of each forward stage run alone on the same inputs."""
    C = bs.chunk
    G = jax.jit(lambda g: triton_fwd.chunk_local_cumsum(g, C))(g)
    wy = jax.jit(lambda k, v, G, b: chunk_kkt_solve_wy(
        k, v, G, b, chunk_size=C, use_qk_l2norm=True, solve_precision=jax.lax.Precision.DEFAULT,
        num_warps=bs.num_warps_wy, num_stages=bs.num_stages))
    w, u = wy(k, v, G, beta)
    hs = jax.jit(lambda k, w, u, G: chunk_fwd_h(
        k, w, u, G, None, chunk_size=C, block_v=bs.block_v_h, use_qk_l2norm=True,
        num_warps=bs.num_warps_h, num_stages=bs.num_stages))
    h, v_new, _ = hs(k, w, u, G)
    os_ = jax.jit(lambda q, k, G, h, vn: chunk_fwd_o(
        q, k, G, h, vn, scale=q.shape[-1] ** -0.5, out_dtype=jnp.bfloat16, chunk_size=C,
        block_v=bs.block_v_o, use_qk_l2norm=True, num_warps=bs.num_warps_o,
        num_stages=bs.num_stages))
    ms = {
        "cumsum": median_seconds(jax.jit(lambda g: triton_fwd.chunk_local_cumsum(g, C)), g,
                                 iters=reps),
        "wy": median_seconds(wy, k, v, G, beta, iters=reps),
        "h": median_seconds(hs, k, w, u, G, iters=reps),
        "o": median_seconds(os_, q, k, G, h, v_new, iters=reps),
    }
    return {name: s * 1e3 for name, s in ms.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1x32768,8x4096")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = p.parse_args(argv)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shapes": {}}
    for B, T in parse_shapes(args.shapes):
        q, k, v, g, beta = make_inputs(B, T)
        q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
        g, beta = jnp.asarray(g), jnp.asarray(beta)
        row = {"stages_ms": stage_times(q, k, v, g, beta, triton_fwd.BlockSizes(), args.reps),
               "variants_ms": {}}
        for name in args.variants.split(","):
            bs = dataclasses.replace(triton_fwd.BlockSizes(), **VARIANTS[name])
            f = jax.jit(lambda q, k, v, g, b, bs=bs: chunk_gated_delta_rule(
                q, k, v, g, b, output_final_state=True, use_qk_l2norm_in_kernel=True,
                impl="pallas_triton", block_sizes=bs))
            try:
                row["variants_ms"][name] = median_seconds(f, q, k, v, g, beta,
                                                          iters=args.reps) * 1e3
            except Exception as e:  # noqa: BLE001  (a variant the compiler rejects)
                row["variants_ms"][name] = None
                print(f"{B}x{T} {name}: {e!r:.200}")
        best = min((t, n) for n, t in row["variants_ms"].items() if t is not None)
        row["best"] = best[1]
        row["best_tflops"] = fwd_flops(B, T) / (best[0] * 1e-3) / 1e12
        res["shapes"][f"{B}x{T}"] = row
        print(f"{B}x{T}: stages {row['stages_ms']}", flush=True)
    print("\n| shape | " + " | ".join(f"{s} ms" for s in ("cumsum", "wy", "h", "o")) + " |")
    print("|---|---|---|---|---|")
    for key, row in res["shapes"].items():
        print(f"| {key} | " + " | ".join(f"{t:.3f}" for t in row["stages_ms"].values()) + " |")
    names = args.variants.split(",")
    print("\n| shape | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for key, row in res["shapes"].items():
        cells = ["-" if row["variants_ms"][n] is None else f"{row['variants_ms'][n]:.3f}"
                 for n in names]
        print(f"| {key} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "tune_gdn.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
