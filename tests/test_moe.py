"""The dropless grouped-matmul MoE against a float64 per-expert loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from np_reference import f64, routed_experts, sparse_moe

from qnext_jax.modeling.moe import Qwen3NextSparseMoeBlock, _tile_rows, grouped_experts, route

HIGHEST = jax.lax.Precision.HIGHEST
E, D, INNER = 6, 8, 5
# The implementations of grouped_experts: ragged_dot (CPU, TPU), and for GPUs gathered experts
# (decode), padded tiles (default and forced small tiles) and capacity buckets (whose overflow branch runs when one
# expert gets all rows); tokamax (optional) in test_tokamax_*. The expert-parallel path is
# checked in tests/test_sharding.py.
_fns = {(impl, tm): jax.jit(lambda *a, impl=impl, tm=tm: grouped_experts(
    *a, precision=HIGHEST, impl=impl, tile_rows=tm))
    for impl, tm in (("ragged_dot", None), ("gather", None), ("tiles", None), ("tiles", 4),
                     ("capacity", None))}


@settings(max_examples=20, deadline=None, database=None)
@given(n=st.sampled_from([1, 7, 24]), k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       mode=st.sampled_from(["random", "one_expert", "duplicates"]))
def test_grouped_experts_equal_dense_loop(n, k, seed, mode):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    gate, up = (rng.standard_normal((E, D, INNER)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((E, INNER, D)).astype(np.float32)
    if mode == "one_expert":  # everything on one expert, the others empty
        experts = np.full((n, k), rng.integers(E), np.int32)
    elif mode == "duplicates":  # any ids, repeats allowed
        experts = rng.integers(0, E, (n, k)).astype(np.int32)
    else:
        experts = np.stack([rng.choice(E, k, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rng.random((n, k)).astype(np.float32)
    ref = routed_experts(x, weights, experts, gate, up, down)
    for (impl, tm), fn in _fns.items():
        got = np.asarray(fn(x, weights, experts, gate, up, down))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{impl} {tm}")


# grouped_experts' arguments for 2 tokens, top-1 of 3 experts (d 4, I 2), all zero.
_ZEROS = (np.zeros((2, 4), np.float32), np.zeros((2, 1), np.float32), np.zeros((2, 1), np.int32),
          np.zeros((3, 4, 2)), np.zeros((3, 4, 2)), np.zeros((3, 2, 4)))


def _routing_case(rng, n, k, d, inner, dtype):
    """Random tokens, experts (the last expert left empty) and router weights, as ``dtype``."""
    x = rng.standard_normal((n, d))
    gate, up = (rng.standard_normal((E, d, inner)) / d ** 0.5 for _ in range(2))
    down = rng.standard_normal((E, inner, d)) / inner ** 0.5
    experts = jnp.asarray(np.stack([rng.choice(E - 1, k, replace=False) for _ in range(n)]),
                          jnp.int32)
    weights = rng.random((n, k))
    cast = lambda a: jnp.asarray(a, dtype)
    return cast(x), cast(weights), experts, cast(gate), cast(up), cast(down)


def _grads(impl, args, precision=None):
    """d/d(x, weights, gate, up, down) of a fixed random projection of grouped_experts."""
    x, weights, experts, gate, up, down = args
    probe = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
    loss = lambda x, w, g, u, dn: jnp.sum(grouped_experts(
        x, w, experts, g, u, dn, precision=precision, impl=impl).astype(jnp.float32) * probe)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, weights, gate, up, down)


@pytest.mark.parametrize("n", [1, 5])
def test_gather_gradients_equal_ragged_dot(n):
    """The gather impl's gradients (through the gathers of the expert weights: scatter-adds,
    duplicate experts of a token included) against jax.lax.ragged_dot's, float32."""
    args = _routing_case(np.random.default_rng(n), n, 3, D, INNER, jnp.float32)
    if n == 5:  # token 0 picks expert 2 twice; expert 2 is also other tokens' choice
        args = args[:2] + (args[2].at[0].set(jnp.asarray([2, 2, 4])),) + args[3:]
    for name, g, r in zip(("x", "weights", "gate", "up", "down"), _grads("gather", args, HIGHEST),
                          _grads("ragged_dot", args, HIGHEST)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6,
                                   err_msg=f"d{name}")


def test_gather_pallas_impl_equals_dense_loop(monkeypatch):
    """grouped_experts(impl="gather_pallas") runs pallas_kernels.moe.gathered_experts (here in
    interpret mode; its own tests are tests/test_moe_gathered_kernel.py)."""
    import functools

    from pallas_kernels.moe import BlockSizes, gathered_experts
    from qnext_jax.modeling import moe

    monkeypatch.setattr(moe, "gathered_experts", functools.partial(
        gathered_experts, blocks=BlockSizes(block_i=16, block_d=8, block_r=8, splits=2),
        interpret=True))
    args = _routing_case(np.random.default_rng(4), 3, 2, 16, 32, jnp.float32)
    got = grouped_experts(*args, impl="gather_pallas")
    np.testing.assert_allclose(np.asarray(got), routed_experts(*(np.asarray(a) for a in args)),
                               rtol=1e-5, atol=1e-5)


def test_tokamax_equals_dense_loop_and_gradients():
    """tokamax's ragged_dot (here on the CPU: its XLA implementation, forced and as its own
    choice) against the float64 loop; its gradients (tokamax's vjp) against autodiff through
    the tiles impl's einsums."""
    pytest.importorskip("tokamax")
    args = _routing_case(np.random.default_rng(0), 9, 3, D, INNER, jnp.float32)
    ref = routed_experts(*(np.asarray(a) for a in args))
    ref_grads = _grads("tiles", args, HIGHEST)
    for impl in ("tokamax", "tokamax:xla"):
        got = jax.jit(lambda *a, impl=impl: grouped_experts(*a, precision=HIGHEST, impl=impl))(
            *args)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5, err_msg=impl)
        for name, g, r in zip(("x", "weights", "gate", "up", "down"),
                              _grads(impl, args, HIGHEST), ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{impl} d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [200, 389])
def test_tokamax_mosaic_bf16_equals_dense_loop_and_gradients(n):
    """tokamax's Pallas Mosaic GPU kernel (bf16) against the float64 loop on the same bf16
    values, and its gradients against the tiles impl's in float32: with tokamax's heuristic
    blocks (n = 200: 80 rows an expert) and on sm90 with TOKAMAX_SM90_BLOCKS (n = 389: 778
    rows over 5 used experts of 6, 130 an expert)."""
    pytest.importorskip("tokamax")
    from qnext_jax.modeling import moe

    args = _routing_case(np.random.default_rng(0), n, 2, 256, 128, jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((2 * n, 256), jnp.bfloat16)  # the n tokens' 2 slots each
    tuned = moe._tokamax_sm90_blocks("mosaic", rows, args[3], E)
    assert (tuned is not None) == (n > 200 and jax.devices()[0].compute_capability == "9.0")
    rel = lambda a, b: np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)
    f32 = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args]
    got = jax.jit(lambda *a: grouped_experts(*a, impl="tokamax:mosaic"))(*args)
    # bf16 rounding of h, of the output and of the gradients: ~5e-3 through XLA on the CPU.
    assert rel(got, routed_experts(*(np.asarray(a) for a in f32))) < 2e-2
    for name, g, r in zip(("x", "weights", "gate", "up", "down"), _grads("tokamax:mosaic", args),
                          _grads("tiles", f32, HIGHEST)):
        assert rel(g, np.asarray(r, np.float64)) < 2e-2, name


@pytest.mark.parametrize("words", [True, False])
@pytest.mark.parametrize("dtype, d", [(jnp.bfloat16, 8), (jnp.bfloat16, 7), (jnp.float32, 8)])
def test_sort_dispatch_values_and_gradient(dtype, d, words, monkeypatch):
    """The sort's row gather (on GPUs 2-byte rows of even width move as 4-byte words) equals
    x[order // k] bit for bit, and its gradient (a gather and a sum in x's dtype) the float64
    sum of each token's k slots' cotangents, bf16 and float32, odd widths included."""
    from qnext_jax.modeling import moe
    from qnext_jax.modeling.moe import _sort_by_expert

    monkeypatch.setattr(moe, "_on_gpu", lambda: words)
    rng = np.random.default_rng(d)
    N, k = 9, 3
    x = jnp.asarray(rng.standard_normal((N, d)), dtype)
    keys = jnp.asarray(rng.integers(0, 4, N * k), jnp.int32)
    probe = jnp.asarray(rng.standard_normal((N * k, d)), jnp.float32)
    xs, order, _ = jax.jit(_sort_by_expert, static_argnums=2)(x, keys, k)
    np.testing.assert_array_equal(np.asarray(xs.astype(jnp.float32)),
                                  np.asarray(x.astype(jnp.float32))[np.asarray(order) // k])
    loss = lambda x: jnp.sum(_sort_by_expert(x, keys, k)[0].astype(jnp.float32) * probe)
    got = np.asarray(jax.jit(jax.grad(loss))(x).astype(jnp.float32))
    # the slots' cotangents arrive in x's dtype: the probe rounded as the loss's cast sends it
    g = np.asarray(probe.astype(dtype).astype(jnp.float32), np.float64)
    ref = np.zeros((N, d))
    np.add.at(ref, np.asarray(order) // k, g)
    tol = 1e-2 * np.abs(ref).max() if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


def test_tokamax_sm90_blocks_choice(monkeypatch):
    """The tuned Mosaic GPU blocks serve tokamax's Mosaic kernel (forced or its own choice) on
    sm90 for bf16/fp16 rows and experts whose groups average at least TOKAMAX_SM90_MIN_GROUP
    rows of all experts; anything else keeps tokamax's heuristic."""
    from qnext_jax.modeling import moe

    class Device:
        platform, compute_capability = "gpu", "9.0"

    S = jax.ShapeDtypeStruct
    rows = moe.TOKAMAX_SM90_MIN_GROUP * 6
    xs, w = S((rows, 4), jnp.bfloat16), S((6, 4, 2), jnp.bfloat16)
    monkeypatch.setattr(jax, "devices", lambda: [Device()])
    blocks = moe._tokamax_sm90_blocks
    assert blocks(None, xs, w, 6) == blocks("mosaic", xs, w, 6) == moe.TOKAMAX_SM90_BLOCKS
    assert blocks("mosaic", S((rows, 4), jnp.float16), S((6, 4, 2), jnp.float16), 6)
    assert blocks("mosaic", S((rows - 1, 4), jnp.bfloat16), w, 6) is None  # groups too small
    assert blocks("mosaic", xs, S((3, 4, 2), jnp.bfloat16), 12) is None  # of all 12 experts
    assert blocks("triton", xs, w, 6) is None and blocks("xla", xs, w, 6) is None
    assert blocks("mosaic", S((rows, 4), jnp.float32), S((6, 4, 2), jnp.float32), 6) is None
    assert blocks("mosaic", xs, S((6, 4, 2), jnp.float16), 6) is None
    Device.compute_capability = "10.0"
    assert blocks("mosaic", xs, w, 6) is None
    Device.platform, Device.compute_capability = "cpu", None
    assert blocks(None, xs, w, 6) is None


def test_tile_rows_and_bad_impl():
    assert _tile_rows(10, 512) == 1  # decode: one row per tile (a gather of its expert)
    assert _tile_rows(640, 512) == 2
    assert _tile_rows(10240, 512) == 32
    assert _tile_rows(163840, 512) == 128  # capped
    for impl in ("megablox", "tiles:mosaic", None):  # only tokamax takes ":<implementation>"
        with pytest.raises(ValueError, match="impl must be one of"):
            grouped_experts(*_ZEROS, impl=impl)
    for tm in (0, -1):
        with pytest.raises(ValueError, match=f"tile_rows must be at least 1 .*got {tm}"):
            grouped_experts(*_ZEROS, impl="tiles", tile_rows=tm)


def test_without_tokamax_and_gpu_auto_choice(monkeypatch):
    """Without tokamax, impl="tokamax" names the extra to install and auto on GPU takes gather
    (decode) or capacity; with it, auto takes tokamax beyond decode for bf16/fp16 experts only."""
    from qnext_jax.modeling import moe

    monkeypatch.setattr(moe, "import_tokamax", lambda: (None, ImportError("No module 'tokamax'")))
    with pytest.raises(ImportError, match=r"qnext-jax\[gpu\]"):
        grouped_experts(*_ZEROS, impl="tokamax")
    assert moe._gpu_auto_impl(10, 512, jnp.bfloat16) == "gather"
    assert moe._gpu_auto_impl(256, 512, jnp.bfloat16) == "gather"
    assert moe._gpu_auto_impl(10240, 512, jnp.bfloat16) == "capacity"
    monkeypatch.setattr(moe, "import_tokamax", lambda: (object(), None))  # installed
    assert moe._gpu_auto_impl(10, 512, jnp.bfloat16) == "gather"
    assert moe._gpu_auto_impl(640, 512, jnp.bfloat16) == "tokamax"
    assert moe._gpu_auto_impl(10240, 512, jnp.float16) == "tokamax"
    assert moe._gpu_auto_impl(10240, 512, jnp.float32) == "capacity"


def test_route_float32_softmax_topk_and_renorm():
    logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 3.0, 0.1]], jnp.bfloat16)
    w, e = route(logits, 2, norm_topk_prob=False)
    assert w.dtype == jnp.float32
    p = np.exp(np.asarray(logits, np.float64))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(e), [[0, 1], [2, 3]])
    np.testing.assert_allclose(np.asarray(w), [[p[0, 0], p[0, 1]], [p[1, 2], p[1, 3]]], rtol=1e-6)
    w, _ = route(logits, 2, norm_topk_prob=True)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)


def test_route_gpu_argmax_top_k_equals_top_k(monkeypatch):
    """On GPU, from ARGMAX_TOP_K_MIN_ROWS tokens, top-k is k rounds of argmax, up to
    RANK_TOP_K_MAX_ROWS a ranking: the same experts, weights and tie order (lower id first) as
    lax.top_k, here on bf16-rounded logits with many ties and a leading batch axis; the rows
    in between keep lax.top_k."""
    from qnext_jax.modeling import moe

    rng = np.random.default_rng(0)
    logits = jnp.asarray(np.round(rng.standard_normal((2, 600, 64)) * 4) / 4, jnp.bfloat16)
    want_w, want_e = route(logits, 10, norm_topk_prob=True)
    sizes = (1, 3, moe.RANK_TOP_K_MAX_ROWS)
    want_few = {rows: route(logits[:1, :rows], 10, norm_topk_prob=True) for rows in sizes}
    monkeypatch.setattr(moe.jax, "default_backend", lambda: "gpu")
    program = str(jax.make_jaxpr(lambda x: route(x, 10, True))(logits))
    assert "argmax" in program and "top_k" not in program
    got_w, got_e = route(logits, 10, norm_topk_prob=True)
    np.testing.assert_array_equal(np.asarray(got_e), np.asarray(want_e))
    np.testing.assert_array_equal(np.asarray(got_w), np.asarray(want_w))
    assert "top_k" in str(jax.make_jaxpr(lambda x: route(x, 10, True))(logits[:1, :100]))
    # Decode sizes (at most RANK_TOP_K_MAX_ROWS rows): by ranking, no sort, ties included.
    for rows in sizes:
        few = logits[:1, :rows]
        program = str(jax.make_jaxpr(lambda x: route(x, 10, True))(few))
        assert "top_k" not in program and "argmax" not in program and "sort" not in program
        got_w, got_e = route(few, 10, norm_topk_prob=True)
        np.testing.assert_array_equal(np.asarray(got_e), np.asarray(want_few[rows][1]))
        np.testing.assert_array_equal(np.asarray(got_w), np.asarray(want_few[rows][0]))


# bf16 router of 3 experts over d 2: for x = [1, 1] the float32 sums are 1, 1 + 2^-9 and -1,
# which round to 1, 1, -1 in bf16, a tie of experts 0 and 1 that expert 1 wins unrounded.
_TIE_X = np.asarray([1.0, 1.0], np.float32)
_TIE_GATE = np.asarray([[1.0, 1.0, -1.0], [0.0, 2.0 ** -9, 0.0]], np.float32)


def test_route_ranks_the_bf16_logits_under_jit():
    """Fused with the bf16 router matmul under jit, route ranks the logits' bf16 values (a tie
    here, to the lower id, as transformers' router sees it), not XLA's unrounded float32 sums
    (its excess precision): bench_moe's T = 1 relative error of 0.16 against transformers was
    such a tie at the 10th / 11th choice."""
    x, gate = jnp.asarray(_TIE_X[None], jnp.bfloat16), jnp.asarray(_TIE_GATE, jnp.bfloat16)
    assert np.asarray(x @ gate).tolist() == [[1.0, 1.0, -1.0]]
    for norm in (False, True):
        w, e = jax.jit(lambda x, g, norm=norm: route(x @ g, 2, norm))(x, gate)
        np.testing.assert_array_equal(np.asarray(e), [[0, 1]])
        np.testing.assert_array_equal(np.asarray(w)[0, 0], np.asarray(w)[0, 1])
        _, e1 = jax.jit(lambda x, g, norm=norm: route(x @ g, 1, norm))(x, gate)
        assert int(e1[0, 0]) == 0


def test_sparse_moe_block_bf16_routes_on_its_rounded_logits():
    """The bf16 block on the tie above, top-1: expert 0 (all zero) must be the one chosen, so
    the output is the shared expert's alone (zero here) whatever the impl."""
    from conftest import tiny_config

    cfg = tiny_config(hidden_size=2, num_experts=3, num_experts_per_tok=1, norm_topk_prob=True)
    x = jnp.asarray(_TIE_X.reshape(1, 1, 2), jnp.bfloat16)
    ones = lambda *s: jnp.ones(s, jnp.bfloat16)
    zero_shared = {name: {"kernel": jnp.zeros(s, jnp.bfloat16)} for name, s in (
        ("gate_proj", (2, 16)), ("up_proj", (2, 16)), ("down_proj", (16, 2)))}
    p = {"gate": {"kernel": jnp.asarray(_TIE_GATE, jnp.bfloat16)},
         # expert 0 gives 0, experts 1 and 2 give non-zero outputs
         "experts": {"gate_proj": ones(3, 2, 16).at[0].set(0), "up_proj": ones(3, 2, 16),
                     "down_proj": ones(3, 16, 2)},
         "shared_expert": zero_shared, "shared_expert_gate": {"kernel": jnp.zeros((2, 1),
                                                                                jnp.bfloat16)}}
    for impl in ("ragged_dot", "gather", "tiles", "capacity"):
        block = Qwen3NextSparseMoeBlock(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                        moe_impl=impl)
        y = jax.jit(lambda p, x, block=block: block.apply({"params": p}, x))(p, x)
        np.testing.assert_array_equal(np.asarray(y, np.float32), 0.0, err_msg=impl)


def test_sparse_moe_block_matches_numpy(rng):
    from conftest import tiny_config

    cfg = tiny_config(num_experts=7, num_experts_per_tok=3, norm_topk_prob=False)
    x = rng.standard_normal((2, 5, cfg.hidden_size)).astype(np.float32)
    block = Qwen3NextSparseMoeBlock(cfg, precision=HIGHEST)
    p = block.init(jax.random.key(0), x)["params"]
    p = jax.tree.map(lambda w: w * 10.0, p)  # router logits of order 1: a real top-k choice
    y = block.apply({"params": p}, x)
    ref = sparse_moe(jax.tree.map(np.asarray, p), f64(x.reshape(10, -1)), 3, False)
    np.testing.assert_allclose(np.asarray(y).reshape(10, -1), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_experts,shared_size,norm,fused", [
    (8, 16, False, True), (8, 16, True, True), (8, 24, True, False), (7, 16, False, False)])
def test_sparse_moe_block_gather_pallas_fuses_the_shared_expert(rng, monkeypatch, num_experts,
                                                                shared_size, norm, fused):
    """moe_impl="gather_pallas" at decode size (kernels in interpret mode): the router's
    matmul, the routing and the shared expert run inside the decode kernels (routed_experts,
    given the router's weight) when the shared expert's intermediate size is the routed
    experts' (16) and E a power of 2; otherwise route() and the kernels of gathered_experts
    (shared 24, or 7 experts). The block equals the float64 numpy block either way, and the
    router logits are sown either way."""
    import functools

    from conftest import tiny_config

    from pallas_kernels.moe import BlockSizes, gathered_experts, routed_experts
    from qnext_jax.modeling import moe

    small = functools.partial(BlockSizes, block_i=16, block_d=8, block_r=8, splits=2,
                              router_block_e=4, router_splits=2)
    calls = []

    def recording(kernels):
        def call(*args, **kwargs):
            calls.append(kernels.__name__)
            return kernels(*args, **kwargs, blocks=small(), interpret=True)
        return call

    monkeypatch.setattr(moe, "routed_experts", recording(routed_experts))
    monkeypatch.setattr(moe, "gathered_experts", recording(gathered_experts))
    monkeypatch.setattr(moe, "GatheredBlockSizes", small)
    cfg = tiny_config(num_experts=num_experts, num_experts_per_tok=3, norm_topk_prob=norm,
                      shared_expert_intermediate_size=shared_size)
    x = rng.standard_normal((1, 1, cfg.hidden_size)).astype(np.float32)  # 3 slots <= E / 2
    block = Qwen3NextSparseMoeBlock(cfg, precision=HIGHEST, moe_impl="gather_pallas")
    p = block.init(jax.random.key(1), x)["params"]
    p = jax.tree.map(lambda w: w * 10.0, p)
    calls.clear()
    y = block.apply({"params": p}, x)
    assert calls == ["routed_experts" if fused else "gathered_experts"]
    ref = sparse_moe(jax.tree.map(np.asarray, p), f64(x.reshape(1, -1)), 3, norm)
    np.testing.assert_allclose(np.asarray(y).reshape(1, -1), ref, rtol=1e-5, atol=1e-5)
    _, state = block.apply({"params": p}, x, mutable=["intermediates"])
    np.testing.assert_allclose(np.asarray(state["intermediates"]["router_logits"][0]),
                               f64(x.reshape(1, -1)) @ np.asarray(p["gate"]["kernel"], np.float64),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_model_moe_impl_reaches_every_moe_layer(scan_layers, monkeypatch):
    """Qwen3NextForCausalLM(moe_impl=...) reaches every sparse-MoE layer, scanned or not, and
    the MTP head's; a decode path serves calls of at most E / 2 token-slots and a larger call
    (a prefill) runs auto; the logits equal auto's; an unknown impl fails naming itself."""
    from conftest import tiny_config

    from qnext_jax.modeling import moe
    from qnext_jax.modeling.decoder import Qwen3NextForCausalLM

    cfg = tiny_config(mtp_num_hidden_layers=1, num_hidden_layers=8)  # scans 2 blocks of 4
    sparse = sum(cfg.is_sparse_moe(i) for i in range(cfg.num_hidden_layers))
    impls = []
    real = moe.grouped_experts

    def recording(*args, impl="auto", **kwargs):
        impls.append(impl)
        return real(*args, impl=impl, **kwargs)

    monkeypatch.setattr(moe, "grouped_experts", recording)
    rng = np.random.default_rng(5)
    decode = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 1)))  # k token-slots <= E / 2
    prefill = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, cfg.num_experts)))
    assert cfg.num_experts_per_tok <= cfg.num_experts // 2
    base = Qwen3NextForCausalLM(cfg, scan_layers=scan_layers)
    params = base.init(jax.random.key(0), decode)["params"]
    gather = Qwen3NextForCausalLM(cfg, scan_layers=scan_layers, moe_impl="gather")
    for ids, used in ((decode, "gather"), (prefill, "auto")):
        want, _ = base.apply({"params": params}, ids)
        impls.clear()
        got, _ = gather.apply({"params": params}, ids)
        if scan_layers:  # the body (one block of layers) is traced more than once
            assert set(impls) == {used} and len(impls) % (sparse // 2) == 0, ids.shape
        else:
            assert impls == [used] * sparse, ids.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    impls.clear()
    hidden = jnp.zeros((1, 1, cfg.hidden_size))
    gather.apply({"params": params}, hidden, decode, jnp.zeros((1, 1), jnp.int32),
                 method=Qwen3NextForCausalLM.mtp_logits)
    assert impls == ["gather"]
    with pytest.raises(ValueError, match="bogus"):
        Qwen3NextForCausalLM(cfg, scan_layers=scan_layers, moe_impl="bogus").apply(
            {"params": params}, decode)


def test_expert_parallel_gather_pallas_names_the_per_device_shard():
    """gather_pallas under a mesh that splits the intermediate dim below the kernel's blocks:
    an error naming the per-device shard, before any kernel is built."""
    import types

    from qnext_jax import sharding
    from qnext_jax.modeling.moe import expert_parallel_experts

    mesh = types.SimpleNamespace(shape={**dict.fromkeys(sharding.MESH_AXES, 1), "expert": 2,
                                        "tensor": 8})
    E, d, inner = 2, 1024, 512  # I / tensor = 64: less than block_i = 128
    gate = jnp.zeros((E, d, inner), jnp.bfloat16)
    down = jnp.zeros((E, inner, d), jnp.bfloat16)
    args = (jnp.zeros((1, d), jnp.bfloat16), jnp.ones((1, 2)), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"I = 512 / 8 over \('tensor',\): I = 64 must be a "
                                         r"multiple of block_i = 128"):
        expert_parallel_experts(*args, gate, gate, down, mesh, impl="gather_pallas")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_auto_takes_the_routed_decode_kernels_on_a_gpu(scan_layers, monkeypatch):
    """moe_impl="auto" on a GPU (the backend faked, the kernels in interpret mode): decode-sized
    calls, the MTP head's included, run the routed decode kernels in every sparse-MoE layer;
    under the layer scan they are handed the whole stacks of the experts' weights and the
    block's index (a per-layer slice would be copied whole for a kernel), once per MoE layer of
    the scan's body. The logits equal the CPU's auto path either way."""
    import functools

    from conftest import tiny_config

    from pallas_kernels.moe import BlockSizes, routed_experts
    from qnext_jax.modeling import moe
    from qnext_jax.modeling.decoder import Qwen3NextForCausalLM

    cfg = tiny_config(mtp_num_hidden_layers=1, num_hidden_layers=8)
    sparse = sum(cfg.is_sparse_moe(i) for i in range(cfg.num_hidden_layers))
    small = functools.partial(BlockSizes, block_i=16, block_d=8, block_r=8, splits=2,
                              router_block_e=4, router_splits=2)
    calls = []

    def recording(*args, **kwargs):
        calls.append((args[2].shape, kwargs.get("layer")))
        return routed_experts(*args, **kwargs, blocks=small(), interpret=True)

    monkeypatch.setattr(moe, "routed_experts", recording)
    monkeypatch.setattr(moe, "GatheredBlockSizes", small)
    ids = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, (1, 1)))
    model = Qwen3NextForCausalLM(cfg, scan_layers=scan_layers, gdn_impl="reference",
                                 attn_impl="xla", precision=HIGHEST)
    params = model.init(jax.random.key(0), ids)["params"]
    params = jax.tree.map(lambda w: w * 3.0, params)  # router logits of order 1
    want, _ = model.apply({"params": params}, ids)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    got, _ = model.apply({"params": params}, ids)
    if scan_layers:  # the body (traced once or more) gets stacks of 2 blocks and the index
        per_block = sparse // 2
        assert len(calls) >= per_block and len(calls) % per_block == 0
        assert all(shape[0] == 2 and layer is not None and jnp.ndim(layer) == 0
                   for shape, layer in calls)
    else:
        assert [layer for _, layer in calls] == [None] * sparse
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    calls.clear()
    model.apply({"params": params}, jnp.zeros((1, 1, cfg.hidden_size)), ids,
                jnp.zeros((1, 1), jnp.int32), method=Qwen3NextForCausalLM.mtp_logits)
    assert len(calls) == 1  # the MTP head is never scanned


@pytest.mark.parametrize("impl", ["ragged_dot", "gather", "capacity", "tiles", "gather_pallas"])
def test_grouped_experts_layer_of_stacks(impl, monkeypatch):
    """grouped_experts given stacks over 3 layers and a traced layer index (a layer scan's)
    equals the numpy loop with that layer's projections; gather_pallas (its kernels in
    interpret mode) reads the stacks in place, handed the index."""
    import functools

    from pallas_kernels.moe import BlockSizes, gathered_experts
    from qnext_jax.modeling import moe

    seen = []

    def kernels(*args, layer=None, **kwargs):
        seen.append(layer)
        return gathered_experts(*args, layer=layer, interpret=True, **kwargs,
                                blocks=BlockSizes(block_i=8, block_d=8, block_r=8, splits=1,
                                                  down_splits=1))

    monkeypatch.setattr(moe, "gathered_experts", kernels)
    rng = np.random.default_rng(3)
    d, inner = 16, 8  # blocks of 8 fit
    x = rng.standard_normal((2, d)).astype(np.float32)
    weights = rng.random((2, 2)).astype(np.float32)
    experts = np.array([[0, 4], [5, 5]], np.int32)
    stacks = [(rng.standard_normal((3, E) + shape) / shape[0] ** 0.5).astype(np.float32)
              for shape in ((d, inner), (d, inner), (inner, d))]
    fn = jax.jit(functools.partial(grouped_experts, precision=HIGHEST, impl=impl))
    for layer in (0, 2):
        got = fn(x, weights, experts, *stacks, layer=jnp.int32(layer))
        want = routed_experts(x, weights, experts, *(w[layer] for w in stacks))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert bool(seen) == (impl == "gather_pallas") and all(i is not None for i in seen)
