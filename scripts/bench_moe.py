"""Benchmark the Qwen3-Next-80B-A3B sparse MoE block: ours (JAX, sort + grouped matmul) against
transformers' ``Qwen3NextSparseMoeBlock`` (PyTorch) on the same GPU and the same bf16 weights.

    python scripts/bench_moe.py --out moe_bench.json             # T in 1, 64, 1024, 16384
    python scripts/bench_moe.py --tokens 1,64 --no-torch --iters 50

Our implementations (``--impls``, qnext_jax.modeling.moe.grouped_experts' ``impl``): tiles, gather,
gather_pallas, capacity, ragged_dot (XLA's, dense on GPU), and tokamax's ragged_dot kernels
"tokamax:mosaic" (Pallas Mosaic GPU) and "tokamax:triton" (tokamax registers it only when
jax-triton imports; jax-triton >= 0.4, which tokamax 0.0.17 calls, needs triton >= 3.7). tokamax is
the optional ``gpu`` extra; on a machine without internet its wheels travel in the ignored .whl/
folder of the checkout (run with ``carry: [".whl"]``):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. && \
        python3 scripts/bench_moe.py --out $OUT/moe_bench.json

(.whl/ holds tokamax and what it imports that such a machine may lack: immutabledict,
einshape, qwix, pydantic, pydantic-core, typing-inspection, annotated-types,
typing-extensions, xprof, fire, termcolor, six; never jax or jaxlib.)

Block: d 2048, 512 experts, top-10 (renormalised), expert intermediate 512, a shared expert of
intermediate 512 with its sigmoid gate; bfloat16 weights and activations; router softmax in
float32 (both implementations).

Reported per T (tokens = batch * length, as one [1, T, d] input):
  * median time (ms) after warm-up, the device time of a call as each side measures it:
    torch, CUDA events around each of ``--iters`` calls; ours, the median of 5 rounds of
    ``--iters`` jitted calls queued back to back, per call (the median of calls each blocked
    on, which adds the host's dispatch and sync, is kept as "blocked ms" in the JSON; the % and
    x figures use the queued time since 2026-12-01, the blocked one before); for T <= 64 also
    ours per call inside one jitted loop of 32 calls ("loop ms": a decode step's cost; since
    2026-12-02 loops queued back to back, as the queued time; before, each loop blocked on,
    which added the host's dispatch and sync, about 10 us a call on an H200, to every call);
  * TFLOP/s on the active-expert FLOPs: T * (top_k + 1 shared) * 3 matmuls * 2 * d * I
    (the router's 2 * d * E per token is not counted);
  * GB/s on the expert weights read: the distinct routed experts this input hits (measured from
    its routing) plus the shared expert, 3 * d * I * 2 bytes each;
  * the measured ceilings of this GPU: a bf16 [8192 x 8192] @ [8192 x 8192] matmul rate and a
    device-to-device copy bandwidth (read + write), and our time against them: % of the matmul
    rate, and the ratio of our time to the HBM time of reading the touched expert weights;
  * the relative L2 difference of each implementation's output from ``--ref-impl``'s (capacity:
    exact batched einsums; same bf16 routing, so only the matmuls' rounding differs), flagged
    "BAD" above 1e-2;
  * transformers' time for each of its experts implementations (``--hf-impls``: "eager", its
    per-expert loop, and "grouped_mm", torch's grouped GEMM, where the installed version has
    them), our speed-up over the fastest, and the relative L2 difference of the outputs: on the
    tokens for which both blocks chose the same experts ("relL2 HF", flagged "BAD" above 1e-2),
    over all tokens ("all"), and how many tokens got other experts ("other"), each of which
    must be a tie: the experts that differ have bf16 router logits equal to the k-th largest,
    so both choices are right (flagged "BAD" otherwise). Such ties are common in bf16: with 512
    experts about one token in ten has one between its 10th and 11th choice (``lax.top_k``
    keeps the lower expert id, as torch.topk's CUDA kernel does; on the CPU torch.topk's choice
    varies), and swapping that one expert moves the token's output by ~0.16 relative L2, which
    at T = 1 is then the whole error.

Targets (issue 4): T = 16384 >= 35% of the matmul rate; T = 1 within 2x of the HBM time;
>= 3x faster than transformers at every T. Runs on jax 0.11.2 and newer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Let torch and JAX share the GPU: no JAX preallocation of 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import (
    error_text,
    measure_ceilings,
    median_seconds,
    queued_seconds,
    trace_calls,
)

D, E, TOP_K, INNER, SHARED = 2048, 512, 10, 512, 512


def make_params(seed: int = 0) -> dict:
    """Our block's params (Flax tree), bf16, std 0.02 (router logits of realistic spread)."""
    keys = iter(jax.random.split(jax.random.key(seed), 8))

    def w(shape, std=0.02):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(jnp.bfloat16)

    return {
        "gate": {"kernel": w((D, E))},
        "experts": {"gate_proj": w((E, D, INNER)), "up_proj": w((E, D, INNER)),
                    "down_proj": w((E, INNER, D))},
        "shared_expert": {"gate_proj": {"kernel": w((D, SHARED))},
                          "up_proj": {"kernel": w((D, SHARED))},
                          "down_proj": {"kernel": w((SHARED, D))}},
        "shared_expert_gate": {"kernel": w((D, 1))},
    }


def our_block(impl: str = "auto"):
    from qnext_jax.config import Qwen3NextConfig
    from qnext_jax.modeling.moe import Qwen3NextSparseMoeBlock

    config = Qwen3NextConfig.from_preset("qwen3-next-80b-a3b")
    dims = {"hidden_size": D, "num_experts": E, "num_experts_per_tok": TOP_K,
            "moe_intermediate_size": INNER, "shared_expert_intermediate_size": SHARED}
    if any(getattr(config, k) != v for k, v in dims.items()):  # --dims (smoke runs)
        config = config.replace(**dims)
    block = Qwen3NextSparseMoeBlock(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                    moe_impl=impl)
    return config, jax.jit(lambda p, x: block.apply({"params": p}, x))


def _to_torch(x):
    import torch

    try:
        return torch.from_dlpack(x)
    except Exception:  # noqa: BLE001 (older pairs without bf16 dlpack): go through the host
        host = np.asarray(x)
        t = torch.from_numpy(host.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
        return t.cuda()


def torch_block(params: dict, experts_impl: str | None = None):
    """transformers' Qwen3NextSparseMoeBlock holding ``params`` (fused v5 or per-expert v4);
    ``experts_impl``: transformers' ``config._experts_implementation`` ("eager", "grouped_mm",
    "batched_mm" on versions that have the experts interface; None: the default). The
    forward returned has a ``router`` attribute: the block's router alone."""
    import torch
    from transformers import Qwen3NextConfig as HFConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    cfg = HFConfig(hidden_size=D, num_experts=E, num_experts_per_tok=TOP_K,
                   moe_intermediate_size=INNER, shared_expert_intermediate_size=SHARED,
                   norm_topk_prob=True, hidden_act="silu")
    if experts_impl not in (None, "default"):
        cfg._experts_implementation = experts_impl
    with torch.device("meta"):
        block = Qwen3NextSparseMoeBlock(cfg)
    t = lambda x: _to_torch(x)
    lin = lambda k: t(k).t().contiguous()
    ex = params["experts"]
    gate, up, down = t(ex["gate_proj"]), t(ex["up_proj"]), t(ex["down_proj"])
    state = {"gate.weight": lin(params["gate"]["kernel"]),
             "shared_expert_gate.weight": lin(params["shared_expert_gate"]["kernel"])}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        state[f"shared_expert.{proj}.weight"] = lin(params["shared_expert"][proj]["kernel"])
    names = set(dict(block.named_parameters()))
    if "experts.gate_up_proj" in names:  # transformers v5: fused [E, 2I, d] and [E, d, I]
        state["experts.gate_up_proj"] = torch.cat([gate.transpose(1, 2), up.transpose(1, 2)],
                                                  dim=1).contiguous()
        state["experts.down_proj"] = down.transpose(1, 2).contiguous()
        layout = "fused"
    else:  # v4: a ModuleList of per-expert MLPs
        for e in range(E):
            state[f"experts.{e}.gate_proj.weight"] = gate[e].t().contiguous()
            state[f"experts.{e}.up_proj.weight"] = up[e].t().contiguous()
            state[f"experts.{e}.down_proj.weight"] = down[e].t().contiguous()
        layout = "per-expert"
    missing = names - set(state)
    if missing:
        raise RuntimeError(f"transformers' block has parameters this script does not fill: "
                           f"{sorted(missing)[:5]}")
    block.load_state_dict(state, assign=True)
    block = block.eval()

    def fwd(x):
        with torch.no_grad():
            out = block(x)
        return out[0] if isinstance(out, tuple) else out

    def router(x):
        """The block's own router on x [1, T, d]: (logits [T, E] as float32 numpy, expert ids
        [T, k])."""
        with torch.no_grad():
            out = block.gate(x.reshape(-1, x.shape[-1]))
        return out[0].float().cpu().numpy(), out[-1].cpu().numpy()

    fwd.router = router
    return fwd, layout


def _median_time_torch(fn, x, iters: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):
        fn(x)
    if not x.is_cuda:  # CPU smoke runs: wall clock
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


LOOP_STEPS = 32  # block calls per jitted loop for the in-loop time (T <= LOOP_MAX_TOKENS)
LOOP_MAX_TOKENS = 64


def in_loop_seconds(block, params, x, iters: int) -> float:
    """Seconds per call of ``block`` inside one jitted, unrolled ``fori_loop`` of LOOP_STEPS
    calls, each fed the last input plus 1e-3 of the last output (so no call can be skipped):
    the cost in a decode step. The loops are queued back to back (``queued_seconds``, ``iters``
    loops a round), so neither the host's per-call dispatch nor its wait for each loop counts
    (a rolled loop added about 0.01 ms an iteration on an H200)."""
    def loop(p, x):
        return jax.lax.fori_loop(0, LOOP_STEPS, lambda _, h: h + 1e-3 * block(p, h), x,
                                 unroll=True)

    return queued_seconds(jax.jit(loop), params, x, calls=iters) / LOOP_STEPS


def rel_l2(got, ref) -> float:
    """||got - ref|| / ||ref|| in float32 (arrays of any dtype)."""
    got, ref = (np.asarray(a, np.float32) for a in (got, ref))
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def our_routing(impl: str = "capacity"):
    """Jitted (params, x [1, T, d]) -> our block's router logits [T, E] (bf16) and expert ids
    [T, k], from the block itself (its sown logits; XLA drops the experts' work)."""
    from qnext_jax.modeling.moe import Qwen3NextSparseMoeBlock, route

    config, _ = our_block(impl)
    block = Qwen3NextSparseMoeBlock(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                    moe_impl=impl)

    def fn(p, x):
        _, state = block.apply({"params": p}, x, mutable=["intermediates"])
        logits = state["intermediates"]["router_logits"][0]
        return logits, route(logits, config.num_experts_per_tok, config.norm_topk_prob)[1]

    return jax.jit(fn)


def compare_routed(got, ref, ours, hf) -> dict:
    """Our output ``got`` against transformers' ``ref`` ([1, T, d] each), given each side's
    (router logits [T, E], expert ids [T, k]) ``ours`` and ``hf``: the relative L2 difference
    over all tokens (rel_l2_vs_hf_all) and over the tokens whose expert sets agree
    (rel_l2_vs_hf; None when no set agrees), the number of tokens whose sets differ
    (hf_other_experts) and how many of those are not ties (hf_other_experts_not_tie: on
    neither side do all the experts in only one set have the token's k-th largest logit, so
    the routing itself disagrees), and the number of tokens whose bf16 router logits are not
    identical on both sides (hf_router_logits_differ)."""
    got, ref = (np.asarray(a, np.float32).reshape(-1, D) for a in (got, ref))
    logits = [np.asarray(side[0], np.float32) for side in (ours, hf)]
    kth = [-np.sort(-lg, axis=-1)[:, TOP_K - 1] for lg in logits]
    same = np.ones(len(got), bool)
    not_tie = 0
    for n, (a, b) in enumerate(zip(np.asarray(ours[1]), np.asarray(hf[1]))):
        differ = sorted(set(a.tolist()) ^ set(b.tolist()))
        if differ:
            same[n] = False
            not_tie += not any(np.all(lg[n, differ] == kt[n]) for lg, kt in zip(logits, kth))
    return {"rel_l2_vs_hf": rel_l2(got[same], ref[same]) if same.any() else None,
            "rel_l2_vs_hf_all": rel_l2(got, ref), "hf_other_experts": int((~same).sum()),
            "hf_other_experts_not_tie": int(not_tie),
            "hf_router_logits_differ": int(np.any(logits[0] != logits[1], axis=-1).sum())}


def _rel_col(v) -> str:
    """A relative error column, 12 wide, flagged " BAD" above 1e-2 ("-" for None)."""
    if v is None:
        return f"{'-':>12}"
    return f"{v:8.1e}{' BAD' if v > 1e-2 else '    '}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", default="1,64,1024,16384", help="comma-separated T values")
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--torch-iters", type=int, default=None,
                   help="timed calls for transformers (default: --iters, at most 5 at T>=4096)")
    p.add_argument("--no-torch", action="store_true", help="skip transformers' block")
    p.add_argument("--hf-impls", default="eager,grouped_mm",
                   help="transformers experts implementations to time (speed-up is against the "
                        "fastest that runs)")
    p.add_argument("--impls", default="gather,tiles,capacity,tokamax:mosaic,tokamax:triton,ragged_dot",
                   help="our grouped-matmul implementations to time (grouped_experts' impl: "
                        "qnext_jax.modeling.moe.MOE_IMPLS or tokamax:<implementation>; 'auto' is "
                        "tokamax on GPU when installed, else tiles/capacity); failures (e.g. out "
                        "of memory, tokamax missing) are reported, not fatal")
    p.add_argument("--ref-impl", default="capacity",
                   help="the implementation every other one's output is checked against")
    p.add_argument("--dims", default=None,
                   help="d,experts,top_k,I,shared_I instead of the 80B block (smoke runs)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--profile", default=None,
                   help="also trace 5 calls of ours per T and impl with jax.profiler into "
                        "PROFILE/T<T>_<impl> (summarise with scripts/profile_summary.py)")
    args = p.parse_args(argv)
    if args.dims:
        global D, E, TOP_K, INNER, SHARED
        D, E, TOP_K, INNER, SHARED = (int(v) for v in args.dims.split(","))
    tokens = [int(t) for t in args.tokens.split(",") if t]

    dev = jax.devices()[0]
    info = {"jax": jax.__version__, "device": str(getattr(dev, "device_kind", dev)),
            "platform": dev.platform, "python": platform.python_version(),
            "block": {"d": D, "experts": E, "top_k": TOP_K, "moe_intermediate": INNER,
                      "shared_intermediate": SHARED, "dtype": "bfloat16"}}
    ceil = measure_ceilings(max(5, args.iters // 2))
    info["ceilings"] = ceil
    print(f"[bench_moe] {info['device']} jax {jax.__version__}: bf16 matmul "
          f"{ceil['bf16_matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gb_per_s']:.0f} GB/s",
          file=sys.stderr)

    params = make_params()
    impls = [i for i in args.impls.split(",") if i]
    blocks = {impl: our_block(impl)[1] for impl in impls}
    ref_block = blocks.get(args.ref_impl) or our_block(args.ref_impl)[1]
    routing = our_routing(args.ref_impl)
    info["ref_impl"] = args.ref_impl
    if any(i.startswith("tokamax") for i in impls):
        try:  # here, not inside the first tokamax compile time (the import takes seconds)
            import tokamax

            info["tokamax"] = tokamax.__version__
        except ImportError as e:
            info["tokamax_error"] = f"{type(e).__name__}: {e}"
            print(f"[bench_moe] tokamax unavailable: {info['tokamax_error']}", file=sys.stderr)
    hfs = {}
    if not args.no_torch:
        for hf_impl in [i for i in args.hf_impls.split(",") if i]:
            try:
                import torch
                import transformers

                hfs[hf_impl], layout = torch_block(params, hf_impl)
                info.update(torch=torch.__version__, transformers=transformers.__version__,
                            transformers_experts_layout=layout)
            except Exception as e:  # noqa: BLE001 (report and go on without it)
                print(f"[bench_moe] transformers' block ({hf_impl}) unavailable: "
                      f"{type(e).__name__}: {e}", file=sys.stderr)
                info[f"torch_error_{hf_impl}"] = f"{type(e).__name__}: {e}"

    rows = []
    for T in tokens:
        x = (jax.random.normal(jax.random.key(T), (1, T, D), jnp.float32)).astype(jnp.bfloat16)
        flops = T * (TOP_K + 1) * 3 * 2 * D * INNER
        ours_logits, ours_experts = routing(params, x)
        ours_routing = (np.asarray(ours_logits.astype(jnp.float32)), np.asarray(ours_experts))
        hit = int(np.unique(ours_routing[1]).size)
        wbytes = (hit + 1) * 3 * D * INNER * 2
        try:
            ours_ref = np.asarray(ref_block(params, x).astype(jnp.float32))
        except Exception as e:  # noqa: BLE001 (report and time without the check)
            ours_ref = None
            print(f"[bench_moe] T={T} reference {args.ref_impl}: {error_text(e)}",
                  file=sys.stderr)
        hf_row = {}
        for hf_impl, hf in hfs.items():
            import torch

            xt = _to_torch(x)
            iters = args.torch_iters or (min(args.iters, 5) if T >= 4096 else args.iters)
            try:
                t_hf = _median_time_torch(hf, xt, iters)
                out = np.asarray(torch.as_tensor(hf(xt)).float().cpu().numpy())
                hf_row[f"hf_{hf_impl}_ms"] = t_hf * 1e3
                if "hf_ms" not in hf_row or t_hf * 1e3 < hf_row["hf_ms"]:
                    hf_row.update(hf_ms=t_hf * 1e3, hf_impl=hf_impl)
                    ref, hf_routing = out, hf.router(xt)
            except Exception as e:  # noqa: BLE001
                hf_row[f"hf_{hf_impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            del xt
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        for impl, ours in blocks.items():
            row = {"T": T, "impl": impl, "experts_hit": hit, "active_gflop": flops / 1e9,
                   "weight_mb": wbytes / 1e6, **hf_row}
            try:
                t_compile = time.perf_counter()
                got = ours(params, x)
                jax.block_until_ready(got)
                t_compile = time.perf_counter() - t_compile
                t_ours = queued_seconds(ours, params, x, calls=args.iters)
                row["ours_blocked_ms"] = median_seconds(ours, params, x, iters=args.iters) * 1e3
                if T <= LOOP_MAX_TOKENS:
                    row["ours_in_loop_ms"] = in_loop_seconds(ours, params, x, args.iters) * 1e3
            except Exception as e:  # noqa: BLE001 (e.g. ragged_dot's dense expansion on GPU)
                row["error"] = error_text(e)
                rows.append(row)
                print(f"[bench_moe] T={T} {impl}: {row['error']}", file=sys.stderr)
                continue
            if args.profile:  # after the timings, which a profiler failure must not lose
                try:
                    trace_calls(ours, params, x, log_dir=os.path.join(
                        args.profile, f"T{T}_{impl.replace(':', '_')}"))
                except Exception as e:  # noqa: BLE001
                    row["profile_error"] = error_text(e)
            row.update(ours_ms=t_ours * 1e3, ours_compile_s=t_compile,
                       ours_tflops=flops / t_ours / 1e12, ours_weight_gbps=wbytes / t_ours / 1e9,
                       pct_matmul_peak=100 * flops / t_ours / 1e12 / ceil["bf16_matmul_tflops"],
                       x_hbm_time=t_ours / (wbytes / (ceil["copy_gb_per_s"] * 1e9)))
            if "ours_in_loop_ms" in row:
                row["x_hbm_in_loop"] = row["ours_in_loop_ms"] / 1e3 / (
                    wbytes / (ceil["copy_gb_per_s"] * 1e9))
            if ours_ref is not None:
                row["rel_l2_vs_ref"] = rel_l2(got, ours_ref)
            if "hf_ms" in hf_row:
                row.update(speedup=hf_row["hf_ms"] / row["ours_ms"],
                           **compare_routed(got, ref, ours_routing, hf_routing))
            rows.append(row)
            if args.out:  # after every measurement: a partial run still leaves its results
                Path(args.out).write_text(json.dumps({**info, "results": rows}, indent=1))
            print(f"[bench_moe] T={T} {impl}: ours {row['ours_ms']:.3f} ms"
                  + (f", transformers {row['hf_ms']:.3f} ms" if "hf_ms" in row else ""),
                  file=sys.stderr)

    head = (f"{'T':>6} {'impl':>14} {'ours ms':>9} {'loop ms (xHBM)':>14} {'TFLOP/s':>8} {'%mm':>6} {'GB/s':>7} "
            f"{'xHBM':>6} {'hit':>4} {'relL2 ref':>13} {'HF ms':>9} {'HF impl':>10} "
            f"{'speedup':>8} {'relL2 HF':>12} {'all':>8} {'other':>9}")
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['T']:6d} {r['impl']:>14} failed: {r['error'][:90]}")
            continue
        ref_col = (f"{r['rel_l2_vs_ref']:9.1e}{' BAD' if r['rel_l2_vs_ref'] > 1e-2 else '    '}"
                   if "rel_l2_vs_ref" in r else f"{'-':>13}")
        other = (f"{r.get('hf_other_experts', '-'):>5}"
                 f"{' BAD' if r.get('hf_other_experts_not_tie') else '    '}")
        hf_cols = (f"{r['hf_ms']:9.3f} {r['hf_impl']:>10} {r['speedup']:7.1f}x "
                   f"{_rel_col(r['rel_l2_vs_hf'])} {r['rel_l2_vs_hf_all']:8.1e} {other}"
                   if "hf_ms" in r else f"{'-':>9} {'-':>10} {'-':>8} {'-':>12} {'-':>8} {'-':>9}")
        loop = (f"{r['ours_in_loop_ms']:7.3f} ({r['x_hbm_in_loop']:4.1f}x)"
                if "ours_in_loop_ms" in r else f"{'-':>14}")
        print(f"{r['T']:6d} {r['impl']:>14} {r['ours_ms']:9.3f} {loop} {r['ours_tflops']:8.1f} "
              f"{r['pct_matmul_peak']:5.1f}% {r['ours_weight_gbps']:7.0f} {r['x_hbm_time']:5.2f}x "
              f"{r['experts_hit']:4d} {ref_col} {hf_cols}")
    print(f"ceilings: bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s, "
          f"copy {ceil['copy_gb_per_s']:.0f} GB/s; loop ms = per call inside a jitted loop of "
          f"{LOOP_STEPS} (T <= {LOOP_MAX_TOKENS}); %mm = share of the matmul rate on active "
          f"expert FLOPs; xHBM = our time / time to read the touched expert weights; relL2 ref "
          f"= against {args.ref_impl} (BAD above 1e-2); relL2 HF = against transformers on the "
          f"tokens where both chose the same experts (BAD above 1e-2), all = on all tokens, "
          f"other = tokens given other experts, all bf16 ties (BAD where one is not)")
    if args.out:
        Path(args.out).write_text(json.dumps({**info, "results": rows}, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
