#!/usr/bin/env python3
"""Which blocks of tokamax's Pallas Mosaic GPU ``ragged_dot`` serve the 80B MoE block's grouped
matmuls best (GPU, sm90).

For each T in --tokens: the 80B block's routing of T random tokens (top-10 of 512 experts, the
rows sorted by expert as ``qnext_jax.modeling.moe`` sorts them), then each grouped matmul shape
of the block, "gate_up" ([T*10, 2048] x [512, 2048, 512], run twice a block) and "down"
([T*10, 512] x [512, 512, 2048]), under tokamax's own heuristic config and each config of
CONFIGS: the best of 5 rounds of queued calls (ms), TFLOP/s on the routed rows, and the
relative L2 difference from the heuristic config's output (the same sums in another order:
~1e-3 in bf16; "BAD" above 1e-2). Prints a table per T and writes ``tune_moe.json`` under --out.

    PYTHONPATH=/tmp/site:. python3 scripts/tune_moe.py --out $OUT

Needs tokamax (the ``gpu`` extra; see scripts/bench_moe.py for a machine without internet).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import error_text, measure_ceilings, queued_seconds

from qnext_jax.modeling import moe

D, E, TOP_K, INNER = 2048, 512, 10, 512

# (block_m, block_n, block_k, num_stages, persistent, grid_minor_dim, grid_tile_width): shared
# memory per stage is (block_m + block_n) * block_k * 2 bytes (at most ~227 KB in all), the
# float32 accumulator block_m * block_n / 128 registers a thread of the one warpgroup; the grid
# walks tiles along grid_minor_dim ("M" or "N") first, grid_tile_width at a time.
CONFIGS = ([(bm, bn, bk, st, pe, "M", 1)
            for bm, bn, bk, st in [(64, 64, 128, 4), (128, 64, 128, 4), (64, 128, 128, 4),
                                   (128, 64, 256, 2), (64, 128, 64, 6)]
            for pe in (True, False)]
           + [(128, 128, bk, st, True, minor, width)
              for bk, st in [(64, 4), (64, 5), (64, 6), (128, 3)]
              for minor in ("M", "N") for width in (1, 2, 4, 8)])


def routed_inputs(T: int):
    """(xs [M, D], h [M, INNER], group_sizes [E]) of T random tokens' routing, M = T * TOP_K
    padded to moe.TOKAMAX_ROW_MULTIPLE rows as moe._tokamax_experts pads them."""
    kx, kl, kh = jax.random.split(jax.random.key(T), 3)
    x = jax.random.normal(kx, (T, D), jnp.bfloat16)
    _, experts = jax.lax.top_k(jax.random.normal(kl, (T, E), jnp.float32), TOP_K)
    flat = experts.reshape(-1)
    xs, _, _ = moe._sort_by_expert(x, flat, TOP_K)
    pad = -xs.shape[0] % moe.TOKAMAX_ROW_MULTIPLE
    xs = jnp.pad(xs, ((0, pad), (0, 0)))
    h = jax.random.normal(kh, (xs.shape[0], INNER), jnp.bfloat16)
    return xs, h, jnp.bincount(flat, length=E).astype(jnp.int32)


def ragged(config=None):
    """A jitted ragged_dot through tokamax's Mosaic GPU kernel, with ``config`` (a CONFIGS
    tuple) or tokamax's heuristic."""
    from tokamax._src.ops.ragged_dot.pallas_mosaic_gpu_common import MatmulDimension
    from tokamax.ops.gpu import PallasMosaicRaggedDot, PallasMosaicRaggedDotConfig

    op = PallasMosaicRaggedDot()
    if config is not None:
        bm, bn, bk, st, pe, minor, width = config
        op = PallasMosaicRaggedDot(config=PallasMosaicRaggedDotConfig(
            block_m=bm, block_n=bn, block_k=bk, num_stages=st, split_k=1, persistent=pe,
            grid_minor_dim=MatmulDimension[minor], grid_tile_width=width))
    return jax.jit(lambda a, b, gs: op(a, b, group_sizes=gs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="16384,1024")
    p.add_argument("--calls", type=int, default=10, help="queued calls per round (5 rounds)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    ceil = measure_ceilings()
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceilings": ceil,
           "configs": "block_m,block_n,block_k,num_stages,persistent,grid_minor_dim,grid_tile_width", "tokens": {}}
    w = jax.random.normal(jax.random.key(1), (2, E, D, INNER), jnp.bfloat16) * 0.02
    gate_proj, down_proj = w[0], w[1].reshape(E, INNER, D)
    for T in [int(t) for t in args.tokens.split(",") if t]:
        xs, h, gs = routed_inputs(T)
        rows = T * TOP_K
        table = {}
        for name, lhs, rhs in (("gate_up", xs, gate_proj), ("down", h, down_proj)):
            flops = 2 * rows * lhs.shape[1] * rhs.shape[2]
            ref = np.asarray(ragged()(lhs, rhs, gs)[:rows].astype(jnp.float32))
            for config in [None, *CONFIGS]:
                key = "heuristic" if config is None else ",".join(map(str, config))
                cell = table.setdefault(key, {})
                try:
                    fn = ragged(config)
                    t = queued_seconds(fn, lhs, rhs, gs, calls=args.calls, best=True)
                    got = np.asarray(fn(lhs, rhs, gs)[:rows].astype(jnp.float32))
                except Exception as e:  # noqa: BLE001 (a config the kernel rejects)
                    cell[name] = {"error": error_text(e)}
                    continue
                err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                cell[name] = {"ms": t * 1e3, "tflops": flops / t / 1e12, "rel_l2": err}
            res["tokens"][str(T)] = table
            with open(os.path.join(args.out, "tune_moe.json"), "w") as f:
                json.dump(res, f, indent=1)
        print(f"\nT = {T} ({rows} routed rows; matmul ceiling "
              f"{ceil['bf16_matmul_tflops']:.0f} TFLOP/s)")
        print("| config (bm,bn,bk,stages,persistent,minor,width) | gate_up ms | TFLOP/s | down ms | TFLOP/s "
              "| block's 3 matmuls ms |")
        print("|---|---|---|---|---|---|")
        for key, cell in table.items():
            parts, total = [], 0.0
            for name in ("gate_up", "down"):
                c = cell.get(name, {})
                if "ms" not in c:
                    parts += ["-", "-"]
                    total = float("nan")
                    continue
                flag = " BAD" if c["rel_l2"] > 1e-2 else ""
                parts += [f"{c['ms']:.3f}{flag}", f"{c['tflops']:.0f}"]
                total += c["ms"] * (2 if name == "gate_up" else 1)
            print(f"| {key} | " + " | ".join(parts) + f" | {total:.3f} |")


if __name__ == "__main__":
    main()
