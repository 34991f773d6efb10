"""Whole-model benchmark: Qwen3-Next-80B-A3B, full size or reduced depth, on the local GPUs.

Builds the model from the packaged 80B preset (the released config.json) with ``--layers`` of its
48 layers (the layer pattern kept: 3 Gated DeltaNet + 1 attention), random bf16 weights created
directly on the devices, each leaf straight into its sharding (no host copy of the model), on a
mesh over the local devices (``--mesh``, e.g. ``tensor=2`` or ``expert=4,tensor=2``; default: all
devices on ``tensor``, which splits the heads and, with ``expert``, the routed experts: the sharding
plan of ``qnext_jax.sharding``), and measures:

* compile time and median time of a prefill of ``--prefill`` tokens (batch 1), and its model
  FLOPs (``bench_train.forward_flops_per_token``: the whole forward, lm_head on every token, as
  the program computes it) over the measured bf16 matmul rate of all devices together;
* compile time and time per token of decode at each ``--batches`` size with a
  ``--context``-token cache (the cache is filled with random K/V and states: a decode step's cost
  does not depend on their values), through ``qnext generate``'s decode loop
  (``Generator._decode``: ``--decode-steps-per-call`` greedy steps in one device call; median
  call time over that count), and the median time of a call of one step
  (``single_step_s``: the host's dispatch and synchronisation included in every token);
* peak device memory (the largest over the devices);
* the HBM roofline of each decode step: bytes of weights (the experts that the batch can touch)
  and state read and written, over the copy bandwidth of all devices together (a lower bound
  when weights are replicated);

``--scan-layers`` runs the layers as a scan over the repeating block (params and cache stacked):
compile time flat in depth. ``--compile-only`` builds nothing on the devices (params and caches
are abstract: shapes, dtypes and shardings) and reports the compile times alone, so the full 48
layers can be compiled on one GPU that could not hold them. ``--profile DIR`` also traces two prefills of each length and a few
decode calls of each batch size (``scripts/profile_summary.py DIR/decode_b1 --steps 80`` for
5 calls of 16 steps, or
``DIR/prefill_8192 --steps 2``, then lists the kernels, busy and idle time of a call). Prints a
table and writes JSON (``--out``). Run on the GPU(s): ``PYTHONPATH=. python3
scripts/bench_model.py --layers 8 --out $OUT/bench_model.json``; the full model on two H200s:
``--layers 48 --prefill 8192 32768 --batches 1 32 128``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
from bench_common import measure_ceilings, median_seconds, trace_calls
from bench_train import forward_flops_per_token

from qnext_jax import sharding
from qnext_jax.cache import init_cache
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.convert.name_map import abstract_params
from qnext_jax.generate import DECODE_STEPS_PER_CALL, Generator
from qnext_jax.modeling.attention import ATTN_IMPLS
from qnext_jax.modeling.decoder import stack_layers
from qnext_jax.modeling.moe import MOE_IMPLS

PROFILE_CALLS = 5  # decode calls traced per batch size with --profile
GREEDY = (0.0, None, None)  # the Generator's sampling argument: argmax


def expected_distinct_experts(tokens: int, num_experts: int, top_k: int) -> float:
    """Expected number of experts a batch of ``tokens`` touches with uniform routing."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def decode_bytes(cfg: Qwen3NextConfig, params, batch: int, context: int) -> float:
    """Bytes one decode step must move: weights it touches + cache state read/written."""
    itemsize = 2
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        n = math.prod(leaf.shape) * leaf.dtype.itemsize
        if "['experts']" in name:  # [E, ...]: only the experts the batch routes to
            n *= expected_distinct_experts(batch, cfg.num_experts,
                                           cfg.num_experts_per_tok) / cfg.num_experts
        elif "['embed_tokens']" in name:  # one row per token
            n = batch * cfg.hidden_size * itemsize
        total += n
    for i in range(cfg.num_hidden_layers):
        if cfg.is_full_attention(i):  # read K/V of the context
            total += 2 * batch * context * cfg.num_key_value_heads * cfg.head_dim * itemsize
        else:  # read + write the float32 recurrent state
            total += 2 * batch * cfg.linear_num_value_heads * cfg.linear_key_head_dim * \
                cfg.linear_value_head_dim * 4
    return float(total)


def random_params(cfg, mesh, key, scan_layers: bool, abstract: bool = False):
    """Random bf16 params (A_log, dt_bias float32), each leaf created on the devices in its
    sharding of ``sharding.param_shardings`` (stacked per block with ``scan_layers``): no host
    ever holds the model. ``abstract``: ``jax.ShapeDtypeStruct`` leaves carrying those
    shardings instead (nothing allocated)."""
    shapes = abstract_params(cfg, jnp.bfloat16)
    if scan_layers:
        shapes = jax.eval_shape(lambda p: stack_layers(p, cfg), shapes)
    shards = sharding.param_shardings(cfg, mesh, scan_layers=scan_layers)
    if abstract:
        return _with_shardings(shapes, shards)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(key, len(leaves))

    @functools.cache  # one compile per distinct (shape, dtype, sharding), not per leaf
    def maker(shape, dtype, sh):
        return jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype),
                       out_shardings=sh)

    out = [maker(s.shape, s.dtype, sh)(k)
           for k, s, sh in zip(keys, leaves, jax.tree.leaves(shards))]
    return jax.tree.unflatten(treedef, out)


def _with_shardings(shapes, shards):
    """``jax.ShapeDtypeStruct`` leaves of ``shapes`` carrying the matching leaf of ``shards``."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shards)


def random_cache(cfg, mesh, batch, length, context, key, scan_layers: bool,
                 abstract: bool = False):
    """A cache (in its shardings) whose first ``context`` slots hold random K/V and whose states
    are random (``abstract``: its shapes, dtypes and shardings only)."""
    def make(key):
        cache = init_cache(cfg, batch, length, jnp.bfloat16, scan_layers=scan_layers)
        leaves, treedef = jax.tree.flatten(cache)
        keys = jax.random.split(key, len(leaves))
        leaves = [jax.random.normal(k, x.shape, x.dtype) * 0.1 if x.ndim >= 3 else x
                  for k, x in zip(keys, leaves)]
        cache = jax.tree.unflatten(treedef, leaves)
        cache["index"] = jnp.asarray(context, jnp.int32)
        cache["positions"] = jnp.full((batch,), context, jnp.int32)
        cache["valid"] = jnp.arange(length)[None, :].repeat(batch, 0) < context
        return cache

    shards = sharding.cache_shardings(cfg, mesh, batch, length, jnp.bfloat16,
                                      scan_layers=scan_layers)
    if abstract:
        return _with_shardings(jax.eval_shape(make, key), shards)
    return jax.jit(make, out_shardings=shards)(key)


def _row_text(row) -> str:
    """One measured row as a line: name, ms, tokens/s, compile s (roofline / matmul share)."""
    name, ms, tps, cs, roof, mm = row
    if ms is None:  # --compile-only
        return f"{name}: compile {cs:.1f} s"
    extra = (f", HBM roofline {roof * 1e3:.3f} ms" if roof else "") + (
        f", {100 * mm:.1f}% of the matmul rate" if mm is not None else "")
    return f"{name}: {ms:.2f} ms, {tps:,.0f} tokens/s, compile {cs:.1f} s{extra}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prefill", type=int, nargs="*", default=[8192],
                    help="prompt lengths (none: decode only)")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 32, 128],
                    help="decode batch sizes (none: prefill only)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--decode-steps-per-call", type=int, default=DECODE_STEPS_PER_CALL,
                    help="decode steps per device call (qnext generate's loop)")
    ap.add_argument("--gdn-impl", default="auto")
    ap.add_argument("--moe-impl", default="auto", choices=MOE_IMPLS,
                    help="routed experts' impl (decode paths serve decode steps only)")
    ap.add_argument("--attn-impl", default="auto", choices=ATTN_IMPLS,
                    help="softmax attention's impl")
    ap.add_argument("--mesh", default=None,
                    help="mesh spec over the local devices (default: tensor=<device count>; "
                         "one device runs without a mesh unless this is given)")
    ap.add_argument("--scan-layers", action="store_true",
                    help="the layers as a scan over the repeating block (compile time flat in depth)")
    ap.add_argument("--out", default="bench_model.json",
                    help="the JSON record (rewritten after every measurement)")
    ap.add_argument("--profile", default=None,
                    help="also trace 2 prefills of each length into PROFILE/prefill_<T> and "
                         "PROFILE_CALLS decode calls of each batch into PROFILE/decode_b<B> with "
                         "jax.profiler (summarise with scripts/profile_summary.py)")
    ap.add_argument("--smoke", action="store_true", help="the tiny demo width (a CPU dry run)")
    ap.add_argument("--compile-only", action="store_true",
                    help="abstract params and caches (nothing allocated): compile times only")
    args = ap.parse_args()

    if args.smoke:
        from qnext_jax.demo import DEMO_CONFIG as base
    else:
        base = Qwen3NextConfig.from_preset("qwen3-next-80b-a3b")
    cfg = base.replace(num_hidden_layers=args.layers)
    devices = jax.devices()
    dev = devices[0]
    mesh = sharding.make_mesh(args.mesh or f"tensor={len(devices)}")
    t = time.perf_counter()
    only = args.compile_only
    params = jax.block_until_ready(random_params(cfg, mesh, jax.random.key(0), args.scan_layers,
                                                 abstract=only))
    init_s = time.perf_counter() - t
    print(f"params created in {init_s:.1f} s", flush=True)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    bw = peak = None  # one device's rates (times the device count below); not measured
    if not only:      # with --compile-only
        ceilings = measure_ceilings()
        bw, peak = ceilings["copy_gb_per_s"] * 1e9, ceilings["bf16_matmul_tflops"] * 1e12
    n_dev = len(devices)
    rows, record = [], {"device": dev.device_kind, "devices": n_dev,
                        "mesh": sharding.mesh_sizes(mesh), "jax": jax.__version__,
                        "layers": args.layers, "scan_layers": args.scan_layers,
                        "gdn_impl": args.gdn_impl, "moe_impl": args.moe_impl,
                        "attn_impl": args.attn_impl, "compile_only": only,
                        "params": n_params, "init_s": init_s, "copy_bandwidth_Bps": bw,
                        "matmul_bf16_flops": peak}

    def save():  # after every measurement: a run cut short still leaves what it measured
        record["peak_bytes_in_use"] = max(
            (d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)

    save()

    # One device without --mesh: no active mesh, as `qnext generate` without --mesh runs (the
    # MoE's decode kernels with the routing inside serve only meshless calls); --mesh on one
    # device runs its mesh, as `qnext generate --mesh` would.
    active = mesh if mesh.devices.size > 1 or args.mesh else None
    S = args.decode_steps_per_call
    gen = Generator(cfg, dtype=jnp.bfloat16, gdn_impl=args.gdn_impl, moe_impl=args.moe_impl,
                    attn_impl=args.attn_impl, mesh=active, scan_layers=args.scan_layers,
                    decode_steps_per_call=S)

    def step(p, ids, cache):  # the prefill: the model's forward, the last position's argmax
        with sharding.activate(active):
            logits, cache = gen.model.apply({"params": p}, ids, cache=cache)
            return logits[:, -1].argmax(-1), sharding.constrain_cache(cache)

    for T in args.prefill:
        cache = random_cache(cfg, mesh, 1, T + 1, 0, jax.random.key(4), args.scan_layers,
                             abstract=only)
        ids = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size)
        t = time.perf_counter()
        compiled = jax.jit(step).lower(params, ids, cache).compile()
        compile_s = time.perf_counter() - t
        if only:
            record[f"prefill_{T}"] = {"compile_s": compile_s}
            rows.append((f"prefill 1 x {T}", None, None, compile_s, None, None))
            print(_row_text(rows[-1]), flush=True)
            save()
            continue
        sec = median_seconds(compiled, params, ids, cache, iters=5)
        if args.profile:
            trace_calls(compiled, params, ids, cache,
                        log_dir=os.path.join(args.profile, f"prefill_{T}"), calls=2)
        flops = sum(forward_flops_per_token(cfg, T).values()) * T
        record[f"prefill_{T}"] = {"compile_s": compile_s, "median_s": sec, "tokens_per_s": T / sec,
                                  "model_flops": flops,
                                  "fraction_of_matmul_rate": flops / sec / (peak * n_dev)}
        rows.append((f"prefill 1 x {T}", sec * 1e3, T / sec, compile_s, None,
                     flops / sec / (peak * n_dev)))
        print(_row_text(rows[-1]), flush=True)
        save()

    for B in args.batches:
        cache = random_cache(cfg, mesh, B, args.context + S + 8, args.context,
                             jax.random.key(2), args.scan_layers, abstract=only)
        ids = jax.random.randint(jax.random.key(3), (B,), 0, cfg.vocab_size)
        loop_args = (jax.random.key(5), jnp.zeros((B,), bool), jnp.zeros((0,), jnp.int32))
        t = time.perf_counter()
        compiled = gen._decode.lower(params, ids, cache, *loop_args, jnp.asarray(S, jnp.int32),
                                     sampling=GREEDY, block=S).compile()
        compile_s = time.perf_counter() - t
        if only:
            record[f"decode_b{B}"] = {"compile_s": compile_s, "steps_per_call": S}
            rows.append((f"decode b{B} ctx {args.context}", None, None, compile_s, None, None))
            print(_row_text(rows[-1]), flush=True)
            save()
            continue
        state = {"cache": cache}

        def call(p, steps, compiled=compiled, state=state, ids=ids, loop_args=loop_args):
            out, _, _, state["cache"], _, _ = compiled(p, ids, state["cache"], *loop_args,
                                                       steps)
            state["cache"]["index"] = jnp.asarray(args.context, jnp.int32)  # stay in place
            return out

        steps = jnp.asarray(S, jnp.int32)
        sec = median_seconds(call, params, steps, iters=10, warmup=2) / S
        single = median_seconds(call, params, jnp.asarray(1, jnp.int32), iters=20, warmup=3)
        if args.profile:
            trace_calls(call, params, steps, log_dir=os.path.join(args.profile, f"decode_b{B}"),
                        calls=PROFILE_CALLS)
        roof = decode_bytes(cfg, params, B, args.context) / (bw * n_dev)
        record[f"decode_b{B}"] = {"compile_s": compile_s, "median_s": sec,
                                  "steps_per_call": S, "single_step_s": single,
                                  "tokens_per_s": B / sec, "hbm_roofline_s": roof,
                                  "fraction_of_roofline": roof / sec}
        rows.append((f"decode b{B} ctx {args.context}", sec * 1e3, B / sec, compile_s, roof, None))
        print(_row_text(rows[-1]) + f"; one step per call {single * 1e3:.2f} ms", flush=True)
        save()

    save()
    print(f"\n{n_dev} x {dev.device_kind}, mesh {record['mesh']}, jax {jax.__version__}, "
          f"{'demo' if args.smoke else '80B'} width, {args.layers} layers "
          f"({'scanned' if args.scan_layers else 'unrolled'}), "
          f"{n_params:.4g} params, copy bandwidth "
          f"{f'{bw / 1e12:.2f} TB/s' if bw else 'not measured'}, peak memory "
          f"{(record['peak_bytes_in_use'] or 0) / 2**30:.1f} GiB")
    print("| measure | ms | tokens/s | compile s | HBM roofline ms | % of roofline "
          "| % of matmul rate |")
    print("|---|---|---|---|---|---|---|")
    for name, ms, tps, cs, roof, mm in rows:
        if ms is None:  # --compile-only
            print(f"| {name} | - | - | {cs:.1f} | - | - | - |")
            continue
        extra = f"{roof * 1e3:.3f} | {100 * roof / (ms / 1e3):.0f}%" if roof else "- | -"
        rate = f"{100 * mm:.1f}%" if mm is not None else "-"
        print(f"| {name} | {ms:.2f} | {tps:,.0f} | {cs:.1f} | {extra} | {rate} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
