"""Train-step benchmark: tokens/s and MFU of ``qnext_jax.train.step.Trainer`` on the local device.

Model: the packaged Qwen3-Next-80B-A3B preset at full width (hidden 2048, 16 q / 2 kv heads of
256, GDN 16 k / 32 v heads of 128, expert and shared intermediate 512, vocab 151936, top-10) with
``--layers`` of its 48 layers (pattern kept: 3 Gated DeltaNet + 1 attention) and ``--experts``
of its 512 experts; float32 master params, AdamW state, bf16 compute (``--dtype``).

MFU = model FLOPs per step / step time / peak, with peak the *measured* bf16 matmul rate (an
8192^3 matmul; the H200's nominal dense bf16 rate, 989 TFLOP/s, is reported alongside). Model
FLOPs = 3 x forward FLOPs (forward + backward, no credit for remat recompute), forward per token:

* every projection: 2 x (in x out) for the active weights (q/k/v/o, in_proj_qkvz/ba, out_proj,
  router, top-k routed experts, shared expert and its gate, lm_head); the conv 2 x K x conv_dim;
* causal attention: 2 x 2 x H x head_dim x T / 2 (QK^T and PV over T/2 keys on average);
* chunked Gated DeltaNet (chunk C = 64), per value head: state in/out/update 3 x 2 x dk x dv,
  intra-chunk k k^T, q k^T, (I+A)^-1 application to k and v and A v: ~2 x C x (3 dk + 2 dv) / 2
  (within-chunk work, causal halves counted once).

Run on the GPU (examples):
  PYTHONPATH=. python3 scripts/bench_train.py --layers 8 --experts 64 --seq 4096 --batch 4 \
      --remat full --out $OUT/bench_train_4k.json
  PYTHONPATH=. python3 scripts/bench_train.py --layers 8 --experts 64 --seq 16384 --batch 1 \
      --remat full --out $OUT/bench_train_16k.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from bench_common import measure_ceilings
import numpy as np

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling import Qwen3NextForCausalLM
from qnext_jax.train.optimizer import OptimizerConfig
from qnext_jax.train.step import TrainConfig, Trainer

NOMINAL_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def forward_flops_per_token(cfg: Qwen3NextConfig, T: int, chunk: int = 64) -> dict[str, float]:
    """Forward FLOPs per token by component (see the module docstring)."""
    d, V = cfg.hidden_size, cfg.vocab_size
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Hk, Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, K = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
    out = {"attn_proj": 0.0, "attn_scores": 0.0, "gdn_proj": 0.0, "gdn_core": 0.0,
           "moe": 0.0, "dense_mlp": 0.0, "lm_head": 2.0 * d * V}
    for i in range(cfg.num_hidden_layers):
        if cfg.is_full_attention(i):
            out["attn_proj"] += 2.0 * d * (2 * H * hd + 2 * Hkv * hd) + 2.0 * H * hd * d
            out["attn_scores"] += 2.0 * 2 * H * hd * T / 2
        else:
            conv_dim = 2 * Hk * dk + Hv * dv
            out["gdn_proj"] += 2.0 * d * (2 * Hk * dk + 2 * Hv * dv + 2 * Hv) + \
                2.0 * Hv * dv * d + 2.0 * K * conv_dim
            out["gdn_core"] += Hv * (3 * 2.0 * dk * dv + 2.0 * chunk * (3 * dk + 2 * dv) / 2)
        if cfg.is_sparse_moe(i):
            out["moe"] += 2.0 * d * cfg.num_experts + \
                cfg.num_experts_per_tok * 3 * 2.0 * d * cfg.moe_intermediate_size + \
                3 * 2.0 * d * cfg.shared_expert_intermediate_size + 2.0 * d
        else:
            out["dense_mlp"] += 3 * 2.0 * d * cfg.intermediate_size
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="rows per step for each --seq (default: 16384 tokens per step)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    p.add_argument("--gdn-impl", default="auto")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    base = Qwen3NextConfig.from_preset("qwen3-next-80b-a3b")
    cfg = base.replace(num_hidden_layers=args.layers, num_experts=args.experts,
                       num_experts_per_tok=min(base.num_experts_per_tok, args.experts))
    dev = jax.devices()[0]
    peak = measure_ceilings()["bf16_matmul_tflops"] * 1e12
    nominal = next((v for k, v in NOMINAL_BF16_FLOPS.items() if k in dev.device_kind), None)
    model = Qwen3NextForCausalLM(cfg, param_dtype=jnp.float32)
    t0 = time.perf_counter()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"[bench_train] {dev.device_kind}: measured bf16 matmul {peak / 1e12:.0f} TFLOP/s; "
          f"config: {args.layers} layers, {args.experts} experts (top-{cfg.num_experts_per_tok}),"
          f" {n_params / 1e9:.2f} B params, init {time.perf_counter() - t0:.1f} s", flush=True)
    results = {"device": dev.device_kind, "matmul_bf16_flops": peak, "nominal_bf16_flops": nominal,
               "layers": args.layers, "experts": args.experts, "params": n_params,
               "remat": args.remat, "dtype": args.dtype, "gdn_impl": args.gdn_impl, "runs": []}
    batches = args.batch or [max(1, 16384 // s) for s in args.seq]
    rng = np.random.default_rng(0)
    for T, B in zip(args.seq, batches, strict=True):
        trainer = Trainer(cfg, OptimizerConfig(learning_rate=1e-5, warmup_steps=10,
                                               total_steps=1000),
                          TrainConfig(compute_dtype=args.dtype, remat=args.remat,
                                      grad_accum=args.grad_accum, gdn_impl=args.gdn_impl))
        state = trainer.init_state(params)
        ids = rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
        batch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
                 "loss_mask": jnp.ones((B, T), jnp.float32)}
        t0 = time.perf_counter()
        state, m = trainer.step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        state, m = trainer.step(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = trainer.step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        step_s = float(np.median(times))
        fwd = forward_flops_per_token(cfg, T)
        flops = 3 * sum(fwd.values()) * B * T
        mem = dev.memory_stats() or {}
        run = {"seq": T, "batch": B, "tokens_per_step": B * T, "compile_s": compile_s,
               "step_s": step_s, "tokens_per_s": B * T / step_s,
               "model_flops_per_step": flops, "mfu_measured_peak": flops / step_s / peak,
               "mfu_nominal_peak": None if nominal is None else flops / step_s / nominal,
               "forward_flops_per_token": fwd, "loss": float(m["loss"]),
               "peak_bytes_in_use": mem.get("peak_bytes_in_use")}
        results["runs"].append(run)
        nominal_txt = "n/a" if nominal is None else f"{run['mfu_nominal_peak'] * 100:.1f}%"
        print(f"[bench_train] seq {T} x batch {B}: {step_s * 1e3:.1f} ms/step, "
              f"{run['tokens_per_s']:.0f} tokens/s, MFU {run['mfu_measured_peak'] * 100:.1f}% "
              f"of measured ({nominal_txt} of nominal), compile {compile_s:.1f} s, "
              f"loss {run['loss']:.3f}, peak mem "
              f"{(run['peak_bytes_in_use'] or 0) / 2**30:.1f} GiB", flush=True)
        del state
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
