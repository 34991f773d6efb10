"""Benchmark the 80B's softmax attention over a K/V cache (a prefill's attention layer): XLA's
blocked softmax (``attn_impl="xla"``) against tokamax's flash-attention kernels (Mosaic GPU and
Triton, ``qnext_jax.modeling.attention.flash_attention``), with each output checked first.

    python scripts/bench_attention.py --out attention_bench.json
    python scripts/bench_attention.py --smoke      # CPU dry run: tiny shapes, XLA only works

tokamax is the optional ``gpu`` extra; on a machine without internet install its wheels from the
ignored .whl/ folder first (see scripts/bench_moe.py).

Shapes: 16 query heads and 2 K/V heads of 256 (the 80B's attention), bf16, one sequence.
Checks (``CHECKS``): each implementation against a float32 HIGHEST-precision softmax on small
cases with left padding, a masked hole in the cache, a query offset and T = 1, 63, 65; the
largest error on real queries relative to the reference's largest |value|, flagged "BAD" above
2e-2 or when not finite. Timings (``TIMED``): median of ``--iters`` jitted calls; TFLOP/s on
the causal FLOPs (4 * H * D per visible query-key pair); % of the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import error_text, measure_ceilings, median_seconds

from qnext_jax.modeling import attention

H, HKV, D = 16, 2, 256
SCALE = D ** -0.5
IMPLS = ("xla", "tokamax:mosaic", "tokamax:triton")
# (name, B, T, S, first query slot, left padding per row, masked hole in the last row or None)
CHECKS = (("B2 T63 S256 at 100, hole", 2, 63, 256, 100, (0, 20), (50, 60)),
          ("B2 T65 S65 at 0", 2, 65, 65, 0, (0, 7), None),
          ("B1 T1 S512 at 300", 1, 1, 512, 300, (0,), None),
          ("B3 T200 S9000 at 8000", 3, 200, 9000, 8000, (0, 100, 4000), None))
TIMED = (("prefill 8192", 1, 8192, 8193, 0), ("prefill 32768", 1, 32768, 32769, 0),
         ("chunk 4096 at 28672", 1, 4096, 33792, 28672), ("B8 T2048 S4096", 8, 2048, 4096, 0))
SMOKE_CHECKS = (("B2 T5 S9 at 3, hole", 2, 5, 9, 3, (0, 2), (1, 2)),)
SMOKE_TIMED = (("prefill 64", 1, 64, 65, 0),)


def inputs(key, B, T, S, start, pads, hole=None, dtype=jnp.bfloat16):
    """Random q [B, T, H, D], keys/values [B, HKV, S, D] (the cache layout), kv_valid [B, S]
    (left padding, a hole, nothing past the new tokens) and the queries' slots [T]."""
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, T, H, D), dtype)
    keys = jax.random.normal(kk, (B, HKV, S, D), dtype)
    values = jax.random.normal(kv, (B, HKV, S, D), dtype)
    slots = np.arange(S)
    valid = np.stack([(slots >= p) & (slots < start + T) for p in pads])
    if hole is not None:
        valid[-1, hole[0]:hole[1]] = False
    return q, keys, values, jnp.asarray(valid), start + jnp.arange(T, dtype=jnp.int32)


def reference(q, keys, values, kv_valid, q_slot):
    """float32, HIGHEST precision, whole [T, S] scores."""
    B, T = q.shape[:2]
    qh = q.astype(jnp.float32).reshape(B, T, HKV, H // HKV, D)
    s = jnp.einsum("BTKGD,BKSD->BKGTS", qh, keys.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * SCALE
    mask = kv_valid[:, None, :] & (jnp.arange(keys.shape[2])[None, :] <= q_slot[:, None])[None]
    p = jax.nn.softmax(jnp.where(mask[:, None, None], s, -jnp.inf), axis=-1)
    o = jnp.einsum("BKGTS,BKSD->BTKGD", p, values.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return o.reshape(B, T, H, D)


def implementation(impl):
    if impl == "xla":  # the model's XLA path over a cache (blocked beyond 2 * KV_BLOCK slots)
        return jax.jit(lambda *a: attention.xla_attention(*a, SCALE, cached=True,
                                                          dtype=a[0].dtype))
    return jax.jit(lambda *a: attention.flash_attention(*a, SCALE, impl))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default="bench_attention.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU dry run)")
    args = p.parse_args(argv)
    impls = args.impls.split(",")
    ceil = measure_ceilings()
    record = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, **ceil,
              "checks": [], "timings": []}

    for name, B, T, S, start, pads, hole in SMOKE_CHECKS if args.smoke else CHECKS:
        args_ = inputs(jax.random.key(B * T + S), B, T, S, start, pads, hole)
        real = np.asarray(args_[3])[:, start:start + T]  # real queries (padding ones excluded)
        ref = np.asarray(reference(*args_))[real]
        row = {"case": name}
        for impl in impls:
            try:
                out = np.asarray(implementation(impl)(*args_).astype(jnp.float32))[real]
                err = float(np.abs(out - ref).max() / np.abs(ref).max())
                row[impl] = err if np.isfinite(out).all() else float("nan")
            except Exception as e:  # noqa: BLE001 - recorded, the other impls still run
                row[impl] = error_text(e)
        record["checks"].append(row)

    for name, B, T, S, start in SMOKE_TIMED if args.smoke else TIMED:
        args_ = inputs(jax.random.key(1), B, T, S, start, (0,) * B)
        flops = 4 * H * D * B * sum(start + t + 1 for t in range(T))
        row = {"case": name, "causal_tflop": flops / 1e12}
        for impl in impls:
            try:
                sec = median_seconds(implementation(impl), *args_, iters=args.iters)
                row[impl] = {"ms": sec * 1e3, "tflops": flops / sec / 1e12,
                             "pct_matmul": 100 * flops / sec / 1e12 / ceil["bf16_matmul_tflops"]}
            except Exception as e:  # noqa: BLE001
                row[impl] = error_text(e)
        record["timings"].append(row)
        Path(args.out).write_text(json.dumps(record, indent=1))

    print(f"{record['device']}, jax {jax.__version__}, bf16 matmul "
          f"{ceil['bf16_matmul_tflops']:.0f} TFLOP/s; H {H}, K/V heads {HKV}, head_dim {D}")
    print("| check | " + " | ".join(impls) + " |\n|---|" + "---|" * len(impls))
    for row in record["checks"]:
        cells = [f"{v:.1e}{' BAD' if not v <= 2e-2 else ''}" if isinstance(v, float) else v[:40]
                 for v in (row[i] for i in impls)]
        print(f"| {row['case']} | " + " | ".join(cells) + " |")
    print("| timing (ms, TFLOP/s, % of matmul) | " + " | ".join(impls) + " |\n|---|"
          + "---|" * len(impls))
    for row in record["timings"]:
        cells = [f"{v['ms']:.2f}, {v['tflops']:.0f}, {v['pct_matmul']:.0f}%"
                 if isinstance(v, dict) else v[:40] for v in (row[i] for i in impls)]
        print(f"| {row['case']} | " + " | ".join(cells) + " |")
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
