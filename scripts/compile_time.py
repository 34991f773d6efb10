"""Compile-time benchmark: jit lower + compile seconds of the model's forward, of the training
loss's forward + backward and of generation's cached prefill and decode step, per depth, with the
layers unrolled and as a scan over the repeating block of the layer pattern
(``Qwen3NextForCausalLM(scan_layers=True)``, ``Generator(scan_layers=True)``).

Model: the Qwen3-Next-80B-A3B preset's layer pattern (3 Gated DeltaNet + 1 attention, sparse
MoE everywhere) at a tiny width (hidden 64, vocab 256, 8 experts), so the numbers are the
compiler's cost of the program's structure, not of its size. The forward's batch is what ``qnext
finetune`` feeds: packed rows with segment ids (``--no-packed``: plain rows). "prefill" and
"decode" are the Generator's jitted functions (``qnext generate``): one prompt of ``--seq``
tokens into an empty cache of ``--cache-len`` slots (stacked with scan_layers), and the decode
loop (greedy; its step inside a while_loop) on that cache. A depth of one period (4 layers) has no repeating block: its scan
cell is n/a. Each program is traced, lowered and compiled afresh (no persistent compilation
cache); with ``--repeats`` > 1 the minimum is kept. ``hlo_ops`` counts the instructions of the
optimized HLO (a load-independent size measure).

  PYTHONPATH=. python3 scripts/compile_time.py --layers 4 8 48 --out compile_time.json
  PYTHONPATH=. python3 scripts/compile_time.py --programs decode prefill
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

from qnext_jax.cache import init_cache
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.generate import DECODE_STEPS_PER_CALL, Generator
from qnext_jax.modeling import Qwen3NextForCausalLM
from qnext_jax.modeling.decoder import scan_period
from qnext_jax.train import loss as L

TINY_WIDTH = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
              "linear_value_head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
              "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
MAX_SEGMENTS = 4
PROGRAMS = ("forward", "fwd+bwd", "prefill", "decode")
GREEDY = (0.0, None, None)  # Generator's sampling tuple: temperature, top_k, top_p


def make_batch(B: int, T: int, packed: bool) -> dict:
    """Abstract batch: ids, targets, loss mask (+ two documents per row when packed)."""
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    batch = {"input_ids": ids, "targets": ids,
             "loss_mask": jax.ShapeDtypeStruct((B, T), jnp.float32)}
    if packed:
        batch["segment_ids"] = ids
    return batch


def programs(model: Qwen3NextForCausalLM, args, names) -> dict:
    """The measured programs by name: {name: (jitted fn, args, kwargs)} (params left out: they
    come first). "forward" (logits) and "fwd+bwd" (loss and grads) on a training batch;
    "prefill" and "decode" are the Generator's jitted functions with a cache."""
    packed = args.packed
    max_segments = MAX_SEGMENTS if packed else None
    out = {}

    def forward(params, batch):
        kw = L.model_inputs(batch)
        if packed:
            kw["max_segments"] = max_segments
        return model.apply({"params": params}, batch["input_ids"], **kw)[0]

    def loss(params, batch):
        return L.loss_fn(params, model, batch, max_segments=max_segments)

    batch = make_batch(args.batch, args.seq, packed)
    if "forward" in names:
        out["forward"] = (jax.jit(forward), (batch,), {})
    if "fwd+bwd" in names:
        out["fwd+bwd"] = (jax.jit(jax.value_and_grad(loss, has_aux=True)), (batch,), {})
    if "prefill" in names or "decode" in names:
        gen = Generator(model.config, scan_layers=model.scan_layers)
        B = args.batch
        cache = jax.eval_shape(lambda: init_cache(model.config, B, args.cache_len,
                                                  scan_layers=model.scan_layers))
        key = jax.eval_shape(lambda: jax.random.key(0))
        ids = jax.ShapeDtypeStruct((B, args.seq), jnp.int32)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        if "prefill" in names:
            out["prefill"] = (gen._prefill, (ids, cache, ids, scalar, key),
                              {"sampling": GREEDY, "with_mtp": False})
        if "decode" in names:
            out["decode"] = (gen._decode, (jax.ShapeDtypeStruct((B,), jnp.int32), cache, key,
                                           jax.ShapeDtypeStruct((B,), jnp.bool_),
                                           jax.ShapeDtypeStruct((1,), jnp.int32), scalar),
                             {"sampling": GREEDY, "block": DECODE_STEPS_PER_CALL})
    return out


def measure(fn, params, fn_args, fn_kwargs, repeats: int) -> dict:
    """Min over ``repeats`` of lower (trace + StableHLO) and compile (XLA) seconds."""
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        lowered = fn.trace(params, *fn_args, **fn_kwargs).lower()
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 48])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128,
                   help="tokens per row, or per prompt for prefill (> 64: chunked GDN)")
    p.add_argument("--cache-len", type=int, default=1024,
                   help="cache slots of the prefill and decode programs")
    p.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="segment ids (two documents per row), as qnext finetune feeds")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    jax.jit(lambda x: x + 1).lower(np.zeros(2)).compile()  # the compiler's one-time start-up

    base = Qwen3NextConfig.from_preset("qwen3-next-80b-a3b").replace(**TINY_WIDTH)
    names = [n for n in PROGRAMS if n in args.programs]
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
            for name, (fn, fn_args, fn_kwargs) in programs(model, args, names).items():
                row[name] = measure(fn, params, fn_args, fn_kwargs, args.repeats)
            rows.append(row)
            print(f"layers={depth:3d} {'scan  ' if scan else 'unroll'}: " + ", ".join(
                f"{k} {row[k]['total_s']:.2f} s ({row[k]['hlo_ops']} HLO ops)"
                for k in names), flush=True)

    print(f"\njit lower + compile seconds ({jax.default_backend()}, {os.cpu_count()} cores, "
          f"batch {args.batch} x {args.seq}, cache {args.cache_len}, packed={args.packed}, "
          f"remat={args.remat})")
    cols = [f"{name} {kind}" for name in names for kind in ("unrolled", "scan")]
    head = f"{'layers':>6} | " + " | ".join(f"{c:>{max(len(c), 8)}}" for c in cols)
    print(head + "\n" + "-" * len(head))
    for depth in args.layers:
        cells = []
        for name in names:
            for scan in (False, True):
                (row,) = [r for r in rows if r["layers"] == depth and r["scan"] == scan]
                cells.append(f"{row[name]['total_s']:.2f}" if name in row else "n/a")
        print(f"{depth:>6} | " + " | ".join(f"{c:>{max(len(h), 8)}}"
                                            for c, h in zip(cells, cols)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"backend": jax.default_backend(), "jax": jax.__version__,
                       "cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(), "batch": args.batch, "seq": args.seq,
                       "cache_len": args.cache_len, "programs": names, "packed": args.packed, "remat": args.remat, "repeats": args.repeats,
                       "width": TINY_WIDTH, "results": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
