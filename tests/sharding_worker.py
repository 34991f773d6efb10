"""Subprocess body of tests/test_sharding.py: runs with several (virtual) devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py \
        model CKPT "expert=8;data=2,expert=4" OUT.json
    python tests/sharding_worker.py moe OUT.json
    python tests/sharding_worker.py scan OUT.json
    python tests/sharding_worker.py shards OUT.json
    python tests/sharding_worker.py multihost CKPT MESH OUT.json COORD NPROC PID

It needs a fresh process because the device count is fixed when jax is first imported.
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np


def _logits_fn(model, mesh):
    import jax

    from qnext_jax import sharding

    def fn(params, ids):
        with sharding.activate(mesh):
            logits, _ = model.apply({"params": params}, ids)
            return sharding.constrain(logits, (None, None, None))
    return jax.jit(fn)


def model_check(ckpt: str, meshes: str, out: str) -> None:
    """Logits and greedy tokens of every mesh against one device, on a converted checkpoint."""
    import jax

    from qnext_jax import sharding
    from qnext_jax.convert import load
    from qnext_jax.generate import Generator
    from qnext_jax.modeling import Qwen3NextForCausalLM

    jax.config.update("jax_default_matmul_precision", "highest")
    config, params = load(ckpt)
    model = Qwen3NextForCausalLM(config)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (2, 8)).astype(np.int32)
    prompt = rng.integers(0, config.vocab_size, (2, 4)).astype(np.int32)
    ref = np.asarray(_logits_fn(model, None)(params, ids))
    ref_tokens = Generator(config).generate(params, prompt, max_new_tokens=6).tokens
    result = {"devices": jax.device_count(), "meshes": {}}
    for spec in meshes.split(";"):
        mesh = sharding.make_mesh(spec)
        shardings = sharding.param_shardings(config, mesh)
        _, sparams = load(ckpt, mesh=mesh, shardings=shardings)
        placed = all(leaf.sharding == s for leaf, s in zip(
            jax.tree.leaves(sparams), jax.tree.leaves(shardings)))
        experts = sparams["layers_0"]["mlp"]["experts"]["gate_proj"]
        got = np.asarray(_logits_fn(model, mesh)(sparams, ids))
        gen = Generator(config, mesh=mesh)
        tokens = gen.generate(sparams, prompt, max_new_tokens=6).tokens
        result["meshes"][spec] = {
            "logits_rel": float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))),
            "tokens_equal": bool(np.array_equal(tokens, ref_tokens)),
            "placed": placed,
            "expert_shard_shape": list(experts.addressable_shards[0].data.shape),
            "expert_spec": str(experts.sharding.spec),
        }
    # The command line on one mesh: batch 1, so it must equal row 0 of the reference.
    import contextlib
    import io

    from qnext_jax.cli import main as qnext_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = qnext_main(["generate", "--checkpoint", ckpt, "--token-ids",
                         ",".join(map(str, prompt[0])), "--max-new-tokens", "6", "--json",
                         "--mesh", "data=2,expert=4"])
    cli = json.loads(buf.getvalue().strip().splitlines()[-1])["token_ids"]
    result["cli"] = {"rc": rc, "tokens": cli, "ref": ref_tokens[0][:len(cli)].tolist()}
    result["ref_logits"] = ref.tolist()
    with open(out, "w") as f:
        json.dump(result, f)


def moe_check(out: str, examples: int = 15) -> None:
    """The expert-parallel MoE against a float64 dense loop on random routings (hypothesis)."""
    import jax
    import jax.numpy as jnp
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from np_reference import routed_experts  # tests/ is on sys.path: this script lives there

    from qnext_jax import sharding
    from qnext_jax.modeling import moe
    from qnext_jax.modeling.moe import expert_parallel_experts

    E, D, INNER = 16, 8, 6
    meshes = {s: sharding.make_mesh(s) for s in ("expert=8", "data=2,expert=4",
                                                 "tensor=2,expert=4")}
    fns = {s: jax.jit(lambda *a, m=m: expert_parallel_experts(
        *a, mesh=m, precision=jax.lax.Precision.HIGHEST, impl="ragged_dot"))
        for s, m in meshes.items()}
    # The GPU implementations under expert parallelism: padded tiles, gathered experts (also
    # with the intermediate dim split over tensor), and tokamax as its GPU kernels behave (rows
    # past the last group unwritten: here NaN, also in the gradient), which the expert-parallel
    # body must mask.
    moe._tokamax_ragged_dot = lambda implementation, blocks=None: _nan_tail_ragged_dot
    # The Pallas decode kernels in interpret mode, with blocks that fit d 8, I 6: other
    # devices' slots reach them as negative ids.
    from pallas_kernels.moe import BlockSizes, gathered_expert_outputs

    small = functools.partial(BlockSizes, block_i=2, block_d=4, block_r=2, splits=2,
                              down_splits=1)
    moe.GatheredBlockSizes = small
    moe.gathered_expert_outputs = functools.partial(gathered_expert_outputs, interpret=True,
                                                    blocks=small())
    for s, impl in (("data=2,expert=4", "tiles"), ("data=2,expert=4", "tokamax"),
                    ("data=2,expert=4", "gather"), ("tensor=2,expert=4", "gather"),
                    ("data=2,expert=4", "gather_pallas")):
        fns[f"{s}/{impl}"] = jax.jit(lambda *a, m=meshes[s], impl=impl: expert_parallel_experts(
            *a, mesh=m, precision=jax.lax.Precision.HIGHEST, impl=impl))
    worst = {s: 0.0 for s in fns}
    # Token counts (one compile each): 3 stays replicated (dispatch by psum), 16 is split over
    # the mesh (dispatch by all-gather, combine by psum_scatter).
    sizes = (3, 16)

    @settings(max_examples=examples, deadline=None, database=None)
    @given(n=st.sampled_from(sizes), k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
           mode=st.sampled_from(["random", "one_expert", "one_device"]))
    def check(n, k, seed, mode):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, D)).astype(np.float32)
        gate, up = (rng.standard_normal((E, D, INNER)).astype(np.float32) for _ in range(2))
        down = rng.standard_normal((E, INNER, D)).astype(np.float32)
        if mode == "one_expert":  # every slot on one expert, the others get nothing
            experts = np.full((n, k), rng.integers(E), np.int32)
        elif mode == "one_device":  # every token on the experts of one device (2 of 8)
            experts = (2 * rng.integers(8) + rng.integers(0, 2, (n, k))).astype(np.int32)
        else:
            experts = np.stack([rng.choice(E, k, replace=False) for _ in range(n)]
                               ).astype(np.int32)
        weights = rng.random((n, k)).astype(np.float32)
        ref = routed_experts(x, weights, experts, gate, up, down)
        for s, fn in fns.items():
            got = np.asarray(fn(x, weights, experts, gate, up, down))
            err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-6))
            worst[s] = max(worst[s], err)
            assert err <= 1e-5, (s, n, k, mode, err)

    check()

    # Gradients (x, router weights, gate, up, down) through the NaN-tailed tokamax stand-in
    # equal those through ragged_dot (16 tokens' 32 slots over 16 experts: some without rows).
    def grad_fn(impl):
        def loss(x, weights, gate, up, down, experts):
            y = expert_parallel_experts(x, weights, experts, gate, up, down,
                                        mesh=meshes["data=2,expert=4"],
                                        precision=jax.lax.Precision.HIGHEST, impl=impl)
            return jnp.sum(y * y)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))

    rng = np.random.default_rng(0)
    args = (rng.standard_normal((16, D)).astype(np.float32),
            rng.random((16, 2)).astype(np.float32),
            *(rng.standard_normal(shape).astype(np.float32)
              for shape in ((E, D, INNER), (E, D, INNER), (E, INNER, D))),
            rng.integers(0, E, (16, 2)).astype(np.int32))
    got, ref = grad_fn("tokamax")(*args), grad_fn("ragged_dot")(*args)
    # An explicit "capacity" runs as the tiles under the mesh, as auto's does (not as
    # jax.lax.ragged_dot, which XLA expands densely on GPUs).
    tiled, tiles_fn = [], moe._tiled_experts
    moe._tiled_experts = lambda *a, **kw: tiled.append(True) or tiles_fn(*a, **kw)
    jax.jit(lambda x, w, g, u, d, e: expert_parallel_experts(
        x, w, e, g, u, d, mesh=meshes["data=2,expert=4"], impl="capacity")).lower(*args)
    moe._tiled_experts = tiles_fn
    # np.max, not max(): a NaN must reach the result (Python's max drops one after the first)
    grad_rel = float(np.max([np.max(np.abs(np.asarray(g) - np.asarray(r))) /
                             max(float(np.max(np.abs(np.asarray(r)))), 1e-6)
                             for g, r in zip(got, ref)]))
    # The layer scan's stacks of 3 layers with a traced layer index: the decode impls read the
    # layer's experts from the stacks in place, the others its slice; each equals the layer's
    # own projections through the numpy loop.
    stacks = [rng.standard_normal((3,) + shape).astype(np.float32)
              for shape in ((E, D, INNER), (E, D, INNER), (E, INNER, D))]
    x, weights, experts = args[0], args[1], args[5]
    stacked_rel = {}
    for s, impl in (("data=2,expert=4", "gather"), ("tensor=2,expert=4", "gather"),
                    ("data=2,expert=4", "gather_pallas"), ("expert=8", "ragged_dot")):
        fn = jax.jit(lambda layer, *a, m=meshes[s], impl=impl: expert_parallel_experts(
            *a, mesh=m, precision=jax.lax.Precision.HIGHEST, impl=impl, layer=layer))
        for layer in (0, 2):
            got = np.asarray(fn(jnp.int32(layer), x, weights, experts, *stacks))
            ref = routed_experts(x, weights, experts, *(w[layer] for w in stacks))
            stacked_rel[f"{s}/{impl}/{layer}"] = float(np.max(np.abs(got - ref)) /
                                                       np.max(np.abs(ref)))
    with open(out, "w") as f:
        json.dump({"worst_rel": worst, "grad_rel": grad_rel, "capacity_runs_tiles": bool(tiled),
                   "stacked_rel": stacked_rel}, f)


def _nan_tail_ragged_dot(lhs, rhs, group_sizes, precision=None):
    """``jax.lax.ragged_dot`` whose output rows past the last group, the gradient rows of lhs
    past it and the gradient of rhs for groups without rows are NaN, as tokamax's GPU kernels
    leave them (unwritten); and whose rhs gradient is NaN where a row of lhs or of the
    cotangent past the last group is (the GPU kernel's last block reads those rows)."""
    import jax
    import jax.numpy as jnp

    def tail(lhs, group_sizes):
        return (jnp.arange(lhs.shape[0]) >= jnp.sum(group_sizes))[:, None]

    def dot(lhs, rhs, group_sizes):
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=precision)

    @jax.custom_vjp
    def f(lhs, rhs, group_sizes):
        return jnp.where(tail(lhs, group_sizes), jnp.nan, dot(lhs, rhs, group_sizes))

    def fwd(lhs, rhs, group_sizes):
        return f(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

    def bwd(res, g):
        lhs, rhs, group_sizes = res
        dlhs, drhs = jax.vjp(lambda a, b: dot(a, b, group_sizes), lhs, rhs)[1](g)
        drhs = jnp.where((group_sizes == 0)[:, None, None], jnp.nan, drhs)
        nan_tail = jnp.any(tail(lhs, group_sizes) & (jnp.isnan(lhs).any(1, keepdims=True)
                                                     | jnp.isnan(g).any(1, keepdims=True)))
        drhs = jnp.where(nan_tail, jnp.nan, drhs)
        return jnp.where(tail(lhs, group_sizes), jnp.nan, dlhs), drhs, None

    f.defvjp(fwd, bwd)
    return f(lhs, rhs, group_sizes)


def scan_check(out: str) -> None:
    """Generator(scan_layers=True) on meshes (stacked params and stacked cache sharded;
    speculative decoding on the second) against the unrolled model on one device; where the
    stacked params and the cache after a decode step live."""
    import jax
    import jax.numpy as jnp
    from conftest import SCAN_TWO_PERIODS, init_params, tiny_config

    from qnext_jax import sharding
    from qnext_jax.generate import Generator

    jax.config.update("jax_default_matmul_precision", "highest")
    config = tiny_config(**SCAN_TWO_PERIODS)
    params = init_params(config, seed=2)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 3)]
    ref = Generator(config).generate(params, prompts, max_new_tokens=6).tokens
    result = {"devices": jax.device_count(), "meshes": {}}
    for spec, n in (("data=2,expert=4", 0), ("tensor=2,expert=4", 2)):
        mesh = sharding.make_mesh(spec)
        gen = Generator(config, mesh=mesh, scan_layers=True, speculative_tokens=n)
        stacked = gen.prepare_params(params)
        placed = all(leaf.sharding.is_equivalent_to(s, leaf.ndim) for leaf, s in zip(
            jax.tree.leaves(stacked), jax.tree.leaves(gen.param_shardings), strict=True))
        tokens = gen.generate(stacked, prompts, max_new_tokens=6).tokens
        # One decode step by hand: the new stacked cache keeps the cache's shardings.
        ids = jnp.ones((2, 4), jnp.int32)
        _, _, _, cache = gen._place(stacked, ids, ids, 8)
        cache_sh = sharding.cache_shardings(config, mesh, 2, 8, jnp.float32,
                                            scan_layers=True)
        if n:
            cache.pop("mtp")
            cache_sh.pop("mtp")
        _, _, _, cache, _, _ = gen._decode(
            stacked, jnp.zeros((2,), jnp.int32), cache, jax.random.key(0),
            jnp.zeros((2,), bool), jnp.zeros((0,), jnp.int32), jnp.asarray(2, jnp.int32),
            sampling=(0.0, None, None), block=2)
        cache_placed = all(leaf.sharding.is_equivalent_to(s, leaf.ndim) for leaf, s in zip(
            jax.tree.leaves(cache), jax.tree.leaves(cache_sh), strict=True))
        result["meshes"][spec] = {
            "tokens_equal": bool(np.array_equal(tokens, ref)), "placed": placed,
            "cache_placed": cache_placed,
            "recurrent_spec": list(cache["blocks"]["layers_0"]["recurrent_state"].sharding.spec),
            "experts_spec": list(stacked["blocks"]["layers_0"]["mlp"]["experts"][
                "gate_proj"].sharding.spec)}
    with open(out, "w") as f:
        json.dump(result, f)


def shards_check(out: str) -> None:
    """sharding.map_shards (the shards each call sees, the result against the unsplit call) and
    the per-shard kernels in the model: the flash path (through a CPU stand-in for tokamax's
    kernel) and the Gated DeltaNet op on tensor meshes give the one-device logits and tokens."""
    import jax
    import jax.numpy as jnp
    from conftest import init_params, tiny_config
    from test_attention_flash import Counted, contract_op

    from qnext_jax import sharding
    from qnext_jax.cache import init_cache
    from qnext_jax.generate import Generator
    from qnext_jax.modeling import Qwen3NextForCausalLM, attention, gated_deltanet

    jax.config.update("jax_default_matmul_precision", "highest")
    result = {"map_shards": {}, "meshes": {}}
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((2, 5, 8, 3)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 5, 16, 3)), jnp.float32)
    for spec, heads_q in (("data=2,tensor=4", 8), ("data=2,tensor=4", 6)):
        seen = []

        def fn(q, v, seen=seen):
            seen.append((q.shape, v.shape))
            n = v.shape[2] // q.shape[2]  # value heads per key head: local == global
            return q * 2.0, v.sum(-1) + jnp.repeat(q.sum(-1), n, axis=2)

        qq = q[:, :, :heads_q]
        vv = v[:, :, :2 * heads_q]
        want = fn(qq, vv)
        seen.clear()
        with sharding.activate(sharding.make_mesh(spec)):
            got = jax.jit(lambda a, b: sharding.map_shards(
                fn, (a, b), (("batch", None, "heads", None), ("batch", None, "heads", None)),
                (("batch", None, "heads", None), ("batch", None, "heads"))))(qq, vv)
        result["map_shards"][f"{spec} Hk={heads_q}"] = {
            "local": [list(map(list, s)) for s in seen],
            "equal": all(bool(np.allclose(a, b)) for a, b in zip(got, want))}

    cfg = tiny_config()
    params = init_params(cfg, seed=7)
    ids = rng.integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.int32)
    mask[1, :4] = 0
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 7)]

    def prefill(impl, mesh):
        model = Qwen3NextForCausalLM(cfg, attn_impl=impl)

        def f(params, ids, mask):
            with sharding.activate(mesh):
                logits, _ = model.apply({"params": params}, ids, cache=init_cache(cfg, 2, 16),
                                        attention_mask=mask)
                return sharding.constrain(logits, (None, None, None))
        return np.asarray(jax.jit(f)(params, ids, mask))

    ref = prefill("xla", None)
    ref_tokens = Generator(cfg, attn_impl="xla").generate(params, prompts,
                                                          max_new_tokens=4).tokens
    op = Counted(contract_op)
    shapes = []
    attention._flash_ops = lambda impl: [(op, -jnp.inf)]
    chunk = gated_deltanet.chunk_gated_delta_rule

    def recorded(q, *args, **kwargs):
        shapes.append(list(q.shape))
        return chunk(q, *args, **kwargs)

    gated_deltanet.chunk_gated_delta_rule = recorded
    for spec in ("tensor=2,expert=4", "data=2,tensor=4"):
        mesh = sharding.make_mesh(spec)
        op.calls, shapes[:] = 0, []
        got = prefill("tokamax", mesh)
        gdn_shapes = list(shapes)
        tokens = Generator(cfg, attn_impl="tokamax", mesh=mesh, prefill_chunk_size=4).generate(
            params, prompts, max_new_tokens=4).tokens
        valid = mask.astype(bool)
        result["meshes"][spec] = {
            "logits_rel": float(np.max(np.abs(got - ref)[valid]) / np.max(np.abs(ref))),
            "tokens_equal": bool(np.array_equal(tokens, ref_tokens)),
            "flash_calls": op.calls, "gdn_local_q": gdn_shapes}
    with open(out, "w") as f:
        json.dump(result, f)


def multihost_check(ckpt: str, mesh_spec: str, out: str, coordinator: str, nproc: str,
                    pid: str) -> None:
    """One process of a multi-process run: restore sharded, logits written by process 0."""
    import jax

    from qnext_jax import distributed, sharding
    from qnext_jax.convert import load
    from qnext_jax.modeling import Qwen3NextForCausalLM

    distributed.initialize(coordinator=coordinator, num_processes=int(nproc),
                           process_id=int(pid))
    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = sharding.make_mesh(mesh_spec)
    config, params = load(ckpt, mesh=mesh, shardings=sharding.tree_shardings(mesh))
    model = Qwen3NextForCausalLM(config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 8)).astype(np.int32)
    ids = jax.device_put(ids, sharding.named(mesh, ("batch", "length"), ids.shape))
    logits = _logits_fn(model, mesh)(params, ids)  # replicated: every process holds it all
    local = np.asarray(logits.addressable_shards[0].data)
    result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "devices": jax.device_count(), "local_devices": jax.local_device_count(),
              "logits": local.tolist()}
    with open(out, "w") as f:
        json.dump(result, f)
    distributed.shutdown()


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"model": model_check, "moe": moe_check, "multihost": multihost_check,
     "scan": scan_check, "shards": shards_check}[cmd](*args)
