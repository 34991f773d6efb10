"""Compile-time benchmark: jit lower + compile seconds of the model's forward and of the training
loss's forward + backward, per depth, with the layers unrolled and as a scan over the repeating
block of the layer pattern (``Qwen3NextForCausalLM(scan_layers=True)``).

Model: the Qwen3-Next-80B-A3B preset's layer pattern (3 Gated DeltaNet + 1 attention, sparse
MoE everywhere) at a tiny width (hidden 64, vocab 256, 8 experts), so the numbers are the
compiler's cost of the program's structure, not of its size. The batch is what ``qnext finetune``
feeds: packed rows with segment ids (``--no-packed``: plain rows). A depth of one period (4
layers) has no repeating block: its scan cell is n/a. Each program is traced, lowered and
compiled afresh (no persistent compilation cache); with ``--repeats`` > 1 the minimum is kept.
``hlo_ops`` counts the instructions of the optimized HLO (a load-independent size measure).

  PYTHONPATH=. python3 scripts/compile_time.py --layers 4 8 48 --out compile_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling import Qwen3NextForCausalLM
from qnext_jax.modeling.decoder import scan_period
from qnext_jax.train import loss as L

TINY_WIDTH = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
              "linear_value_head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
              "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
MAX_SEGMENTS = 4


def make_batch(B: int, T: int, packed: bool) -> dict:
    """Abstract batch: ids, targets, loss mask (+ two documents per row when packed)."""
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    batch = {"input_ids": ids, "targets": ids,
             "loss_mask": jax.ShapeDtypeStruct((B, T), jnp.float32)}
    if packed:
        batch["segment_ids"] = ids
    return batch


def programs(model: Qwen3NextForCausalLM, packed: bool) -> dict:
    """The jitted functions measured: "forward" (logits) and "fwd+bwd" (loss and grads)."""
    max_segments = MAX_SEGMENTS if packed else None

    def forward(params, batch):
        kw = L.model_inputs(batch)
        if packed:
            kw["max_segments"] = max_segments
        return model.apply({"params": params}, batch["input_ids"], **kw)[0]

    def loss(params, batch):
        return L.loss_fn(params, model, batch, max_segments=max_segments)

    return {"forward": jax.jit(forward),
            "fwd+bwd": jax.jit(jax.value_and_grad(loss, has_aux=True))}


def measure(fn, params, batch, repeats: int) -> dict:
    """Min over ``repeats`` of lower (trace + StableHLO) and compile (XLA) seconds."""
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        lowered = fn.trace(params, batch).lower()
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        r = {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}
        if best is None or r["total_s"] < best["total_s"]:
            best = r
        fn.clear_cache()
    text = compiled.as_text()
    best["hlo_ops"] = sum(1 for line in text.splitlines() if " = " in line)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 48])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128, help="tokens per row (> 64: chunked GDN)")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="segment ids (two documents per row), as qnext finetune feeds")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    jax.jit(lambda x: x + 1).lower(np.zeros(2)).compile()  # the compiler's one-time start-up

    base = Qwen3NextConfig.from_preset("qwen3-next-80b-a3b").replace(**TINY_WIDTH)
    batch = make_batch(args.batch, args.seq, args.packed)
    rows = []
    for depth in args.layers:
        config = base.replace(num_hidden_layers=depth)
        for scan in (False, True):
            row = {"layers": depth, "scan": scan}
            try:
                if scan:
                    row["period"] = scan_period(config)
                model = Qwen3NextForCausalLM(config, remat=args.remat, scan_layers=scan)
            except ValueError as e:
                rows.append({**row, "skipped": str(e).split(";")[0]})
                print(f"layers={depth:3d} scan  : n/a (no repeating block)", flush=True)
                continue
            params = jax.eval_shape(model.init, jax.random.key(0),
                                    jnp.zeros((1, 1), jnp.int32))["params"]
            for name, fn in programs(model, args.packed).items():
                row[name] = measure(fn, params, batch, args.repeats)
            rows.append(row)
            print(f"layers={depth:3d} {'scan  ' if scan else 'unroll'}: " + ", ".join(
                f"{k} {row[k]['total_s']:.2f} s ({row[k]['hlo_ops']} HLO ops)"
                for k in ("forward", "fwd+bwd")), flush=True)

    print(f"\njit lower + compile seconds ({jax.default_backend()}, {os.cpu_count()} cores, "
          f"batch {args.batch} x {args.seq}, packed={args.packed}, remat={args.remat})")
    head = f"{'layers':>6} | {'forward unrolled':>16} | {'forward scan':>12} | " \
           f"{'fwd+bwd unrolled':>16} | {'fwd+bwd scan':>12}"
    print(head + "\n" + "-" * len(head))
    for depth in args.layers:
        cells = []
        for name in ("forward", "fwd+bwd"):
            for scan in (False, True):
                (row,) = [r for r in rows if r["layers"] == depth and r["scan"] == scan]
                cells.append(f"{row[name]['total_s']:.2f}" if name in row else "n/a")
        print(f"{depth:>6} | {cells[0]:>16} | {cells[1]:>12} | {cells[2]:>16} | {cells[3]:>12}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"backend": jax.default_backend(), "jax": jax.__version__,
                       "cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(), "batch": args.batch, "seq": args.seq,
                       "packed": args.packed, "remat": args.remat, "repeats": args.repeats,
                       "width": TINY_WIDTH, "results": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
