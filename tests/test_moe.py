"""The dropless grouped-matmul MoE against a float64 per-expert loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from np_reference import f64, silu, sparse_moe

from qnext_jax.modeling.moe import Qwen3NextSparseMoeBlock, grouped_experts, route

HIGHEST = jax.lax.Precision.HIGHEST
E, D, INNER = 6, 8, 5
_grouped = jax.jit(lambda *a: grouped_experts(*a, precision=HIGHEST))


def _dense_reference(x, weights, experts, gate, up, down):
    out = np.zeros((x.shape[0], x.shape[1]))
    for n in range(x.shape[0]):
        for w, e in zip(weights[n], experts[n]):
            out[n] += w * ((silu(f64(x[n]) @ f64(gate[e])) * (f64(x[n]) @ f64(up[e]))) @ f64(
                down[e]))
    return out


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       one_expert=st.booleans())
def test_grouped_experts_equal_dense_loop(n, k, seed, one_expert):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    gate, up = (rng.standard_normal((E, D, INNER)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((E, INNER, D)).astype(np.float32)
    if one_expert:  # every token's every slot on one expert; the others get nothing
        experts = np.full((n, k), rng.integers(E), np.int32)
    else:
        experts = np.stack([rng.choice(E, k, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rng.random((n, k)).astype(np.float32)
    got = _grouped(x, weights, experts, gate, up, down)
    np.testing.assert_allclose(np.asarray(got), _dense_reference(x, weights, experts, gate, up,
                                                                 down), rtol=1e-5, atol=1e-5)


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
