"""Inference benchmark: decode tokens/s with and without MTP speculative decoding, and the peak
device memory of long chunked prefills, at the 80B width with reduced depth (random weights made
on the device).

    python scripts/bench_inference.py --out bench_inference.json               # on the H200
    python scripts/bench_inference.py --tiny --prefill-lengths 256 --out /tmp/b.json   # CPU smoke

Each prefill length runs in its own subprocess so that its peak memory
(``device.memory_stats()["peak_bytes_in_use"]``) is its own. The decode rows use one prompt
(batch 1) and greedy decoding; "random" weights give an MTP head that is almost never right
(speculation costs), "agreeing" weights make the MTP head compute the main model's prediction
(the construction of tests/test_inference_spec.py with eps = 0: mixers and FFNs off, so the
acceptance is ~1 and the table shows the upper bound of the speed-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.generate import Generator
from qnext_jax.modeling import Qwen3NextForCausalLM
from qnext_jax.modeling.attention import ATTN_IMPLS

TINY = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "linear_key_head_dim": 8, "linear_value_head_dim": 8, "num_experts": 8, "num_experts_per_tok": 3,
            "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}


def make_config(args) -> Qwen3NextConfig:
    cfg = Qwen3NextConfig.from_preset(args.preset)
    if args.tiny:
        cfg = cfg.replace(**TINY)
    return cfg.replace(num_hidden_layers=args.layers, mtp_num_hidden_layers=1)


def make_params(cfg, dtype, seed=0):
    """Random params made on the device (jitted init), matrices in ``dtype``."""
    model = Qwen3NextForCausalLM(cfg, dtype=dtype, param_dtype=dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(model.init)(jax.random.key(seed), ids)["params"]


def agreeing(cfg, params):
    """Mixers and FFNs off in the main model, MTP head = main prediction of the next token."""
    p = jax.tree.map(lambda x: x, params)
    for i in range(cfg.num_hidden_layers):
        layer = dict(p[f"layers_{i}"])
        key = "self_attn" if cfg.is_full_attention(i) else "linear_attn"
        proj = "o_proj" if cfg.is_full_attention(i) else "out_proj"
        mixer = dict(layer[key])
        mixer[proj] = jax.tree.map(jnp.zeros_like, mixer[proj])
        layer[key] = mixer
        layer["mlp"] = jax.tree.map(jnp.zeros_like, layer["mlp"])
        p[f"layers_{i}"] = layer
    m = dict(p["mtp"])
    d = cfg.hidden_size
    k = m["fc"]["kernel"]
    m["fc"] = {"kernel": jnp.concatenate([jnp.eye(d, dtype=k.dtype),
                                          jnp.zeros((d, d), k.dtype)], axis=0)}
    m["pre_fc_norm_embedding"] = jax.tree.map(jnp.zeros_like, m["pre_fc_norm_embedding"])
    m["norm"] = p["norm"]
    layer = dict(m["layers_0"])
    attn = dict(layer["self_attn"])
    attn["o_proj"] = jax.tree.map(jnp.zeros_like, attn["o_proj"])
    layer["self_attn"] = attn
    layer["mlp"] = jax.tree.map(jnp.zeros_like, layer["mlp"])
    m["layers_0"] = layer
    p["mtp"] = m
    return p


def run_prefill(args, length: int) -> dict:
    cfg = make_config(args)
    dtype = jnp.dtype(args.dtype)
    params = make_params(cfg, dtype)
    jax.block_until_ready(params)
    dev = jax.devices()[0]
    stats0 = dev.memory_stats() or {}
    chunk = min(args.chunk_size, length)
    gen = Generator(cfg, dtype=dtype, gdn_impl=args.gdn_impl, attn_impl=args.attn_impl,
                    prefill_chunk_size=chunk)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, length)).astype(np.int32)
    res = gen.generate(params, ids, max_new_tokens=2)
    stats = dev.memory_stats() or {}
    return {"kind": "prefill", "tokens": length, "chunk_size": chunk, "layers": cfg.num_hidden_layers,
            "dtype": dtype.name, "attn_impl": args.attn_impl, "prefill_s": res.prefill_s, "compile_s": res.compile_s,
            "prefill_tokens_per_s": res.prefill_tokens_per_s,
            "params_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params))),
            "bytes_in_use_before": stats0.get("bytes_in_use"),
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "peak_gib": (stats["peak_bytes_in_use"] / 2**30) if "peak_bytes_in_use" in stats
            else None}


def divergence(cfg, params, dtype, gdn_impl, ids, plain, other) -> dict:
    """Where ``other`` first leaves the plain greedy tokens, and how close the plain model's
    choice was there: a teacher-forced forward (no cache) of the prompt and the plain tokens
    before that step gives the logit of the plain token minus that of the other token, beside
    the spread (std) of that step's logits. A gap small against the spread is a near tie that
    rounding (for example bf16 in a differently shaped forward) can flip."""
    diff = np.nonzero(np.any(plain != other, axis=0))[0]
    if diff.size == 0:
        return {"first_difference": None}
    i = int(diff[0])
    row = int(np.nonzero(plain[:, i] != other[:, i])[0][0])
    seq = np.concatenate([ids[row], plain[row, :i]])[None].astype(np.int32)
    model = Qwen3NextForCausalLM(cfg, dtype=dtype, gdn_impl=gdn_impl)
    logits, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(seq))
    last = np.asarray(logits[0, -1], np.float32)
    return {"first_difference": i,
            "logit_gap_at_difference": float(last[plain[row, i]] - last[other[row, i]]),
            "logit_std_at_difference": float(last.std())}


def run_decode(args, record) -> None:
    """Greedy decode rows (plain, then each --speculative-tokens N), handed to ``record`` one by
    one as they are measured."""
    cfg = make_config(args)
    dtype = jnp.dtype(args.dtype)
    base = make_params(cfg, dtype)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (args.batch, args.prompt_len))
    for weights in ("random", "agreeing"):
        params = base if weights == "random" else agreeing(cfg, base)
        ref = None
        for n in [0] + [int(x) for x in args.speculative_tokens.split(",") if x]:
            gen = Generator(cfg, dtype=dtype, gdn_impl=args.gdn_impl, attn_impl=args.attn_impl,
                            speculative_tokens=n)
            gen.generate(params, ids, max_new_tokens=4)  # warm-up: compile everything
            t = time.perf_counter()
            res = gen.generate(params, ids, max_new_tokens=args.new_tokens)
            wall = time.perf_counter() - t
            if ref is None:
                ref = res.tokens
            diverged = divergence(cfg, params, dtype, args.gdn_impl, ids, ref[:, :res.tokens.shape[1]],
                                  res.tokens[:, :ref.shape[1]]) if n else {}
            record({"kind": "decode", "weights": weights, "speculative_tokens": n,
                    "batch": args.batch, "prompt": args.prompt_len,
                    "new_tokens": int(res.tokens.shape[1]),
                    "decode_tokens_per_s": res.decode_tokens_per_s,
                    "compile_s": res.compile_s, "end_to_end_s": wall,
                    "acceptance_rate": res.acceptance_rate,
                    "same_tokens_as_plain": bool(np.array_equal(res.tokens, ref)), **diverged})


def table(rows: list[dict]) -> str:
    out = []
    pre = [r for r in rows if r["kind"] == "prefill"]
    if pre:
        out.append(f"{'prefill tokens':>14} {'chunk':>6} {'layers':>6} {'peak GiB':>9} "
                   f"{'params GiB':>10} {'tok/s':>10}")
        for r in pre:
            peak = "n/a" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
            if "error" in r:
                out.append(f"{r['tokens']:>14} {r.get('chunk_size', ''):>6} error: {r['error']}")
                continue
            out.append(f"{r['tokens']:>14} {r['chunk_size']:>6} {r['layers']:>6} {peak:>9} "
                       f"{r['params_bytes'] / 2**30:>10.2f} {r['prefill_tokens_per_s']:>10.0f}")
    dec = [r for r in rows if r["kind"] == "decode"]
    if dec:
        out.append(f"{'weights':>9} {'spec N':>6} {'decode tok/s':>12} {'acceptance':>10} "
                   f"{'== plain':>8} {'first diff':>10} {'gap/std':>8}")
        for r in dec:
            acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
            first = r.get("first_difference")
            gap = ("" if first is None
                   else f"{r['logit_gap_at_difference'] / r['logit_std_at_difference']:.2g}")
            out.append(f"{r['weights']:>9} {r['speculative_tokens']:>6} "
                       f"{r['decode_tokens_per_s']:>12.1f} {acc:>10} "
                       f"{r['same_tokens_as_plain']!s:>8} {'' if first is None else first:>10} "
                       f"{gap:>8}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="write the JSON results here")
    p.add_argument("--preset", default="qwen3-next-80b-a3b")
    p.add_argument("--tiny", action="store_true", help="toy width (CPU smoke test)")
    p.add_argument("--layers", type=int, default=4, help="depth (80B width, reduced depth)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gdn-impl", default="auto")
    p.add_argument("--attn-impl", default="auto", choices=ATTN_IMPLS,
                   help="softmax attention of the prefill over the cache")
    p.add_argument("--matmul-precision", default=None, choices=("default", "high", "highest"),
                   help="jax_default_matmul_precision (GPUs run float32 matmuls as TF32 by "
                        "default)")
    p.add_argument("--prefill-lengths", default="131072,262144")
    p.add_argument("--chunk-size", type=int, default=2048,
                   help="prefill chunk (attention scores are [heads, chunk, cache length])")
    p.add_argument("--speculative-tokens", default="1,2,3")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--one-prefill", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)

    if args.one_prefill is not None:  # child process: one prefill length
        try:
            row = run_prefill(args, args.one_prefill)
        except Exception as e:  # noqa: BLE001  (reported in the parent's table, e.g. out of memory)
            row = {"kind": "prefill", "tokens": args.one_prefill, "chunk_size": args.chunk_size,
                   "error": f"{type(e).__name__}: {e}"[:500]}
        with open(args.out, "w") as f:
            json.dump(row, f)
        return 0

    rows: list[dict] = []

    def record(row: dict) -> None:  # print the row and rewrite the JSON: a cut-off run keeps it
        rows.append(row)
        print(table([row]), flush=True)
        result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                  "args": vars(args), "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if not args.skip_prefill:
        for length in [int(x) for x in args.prefill_lengths.split(",") if x]:
            child_out = f"{args.out}.prefill{length}.json"
            cmd = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]),
                   "--one-prefill", str(length), "--out", child_out]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if os.path.exists(child_out):
                with open(child_out) as f:
                    record(json.load(f))
                os.remove(child_out)
            else:  # the child died without a word (killed)
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                record({"kind": "prefill", "tokens": length, "chunk_size": args.chunk_size,
                        "error": err[:300]})
    if not args.skip_decode:
        run_decode(args, record)
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
