"""Pallas Triton backward kernels of the chunked gated delta rule, interpret mode on CPU: gradients
of impl="pallas_triton" (its custom_vjp runs gpu_triton/bwd.py) against jax.grad of the jnp
reference, and jax.export of the backward for ("cuda",)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gated_delta_rule import make_inputs, rel_err
from test_gated_delta_rule_kernels import _export_cuda

from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule
from pallas_kernels.gated_delta_rule.gpu_triton.fwd import BlockSizes

NAMES = ("q", "k", "v", "g", "beta", "s0")
GRAD_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
BWD_KERNELS = (
    "gdn_chunk_bwd_dh",
    "gdn_chunk_bwd_dqkwg",
    "gdn_chunk_bwd_wy",
)


def _grads(impl, args, cotangents, *, l2norm, final_state, cu_seqlens=None, **static):
    """Gradients of <o, wo> + <final_state, ws> w.r.t. q, k, v, g, beta (and s0 when given).

    Random weights wo, ws make the cotangents of o and of the final state dense and independent.
    """
    wo, ws = cotangents
    has_s0 = args[5] is not None

    def loss(q, k, v, g, beta, s0, cu):
        o, st = chunk_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=s0,
            output_final_state=final_state,
            use_qk_l2norm_in_kernel=l2norm,
            cu_seqlens=cu,
            impl=impl,
            interpret=True,
            **static,
        )
        out = jnp.sum(o.astype(jnp.float32) * wo)
        return out + jnp.sum(st * ws) if final_state else out

    argnums = (0, 1, 2, 3, 4, 5) if has_s0 else (0, 1, 2, 3, 4)
    cu = None if cu_seqlens is None else jnp.asarray(cu_seqlens, jnp.int32)
    return jax.jit(jax.grad(loss, argnums=argnums))(*args, cu)


def _check(
    T,
    Hk,
    Hv,
    dtype,
    *,
    seed,
    with_state,
    l2norm,
    final_state=True,
    cu_seqlens=None,
    dk=16,
    dv=16,
    chunk_size=16,
    block_sizes=None,
):
    N = None if cu_seqlens is None else len(cu_seqlens) - 1
    args = make_inputs(seed, 1 if N else 2, T, Hk, Hv, dk, dv, dtype, with_state, N=N)
    if l2norm:  # inputs away from unit norm, so that the L2 norm's own gradient matters
        args = (args[0] * 2.0, args[1] * 0.5) + args[2:]
    rng = np.random.default_rng(seed + 1000)
    B = args[0].shape[0]
    wo = jnp.asarray(rng.standard_normal((B, T, Hv, dv)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((N or B, Hv, dk, dv)), jnp.float32)
    kw = {"l2norm": l2norm, "final_state": final_state, "cu_seqlens": cu_seqlens}
    got = _grads(
        "pallas_triton", args, (wo, ws), chunk_size=chunk_size, block_sizes=block_sizes, **kw
    )
    want = _grads("reference", args, (wo, ws), **kw)
    assert len(got) == (6 if with_state else 5)
    for name, a, b, x in zip(NAMES, got, want, args):
        assert a.shape == x.shape and a.dtype == x.dtype, name
        b = np.asarray(b, np.float64)
        assert np.max(np.abs(b)) > 0, name  # a real gradient, not a trivially zero one
        assert rel_err(a, b) < GRAD_TOL[dtype], (name, rel_err(a, b))


# Each T around a chunk multiple (a single token, one short, exactly, one over, many chunks with a
# ragged end), both head ratios and both dtypes, initial state and L2 norm on and off. Chunk 16
# except in one case: interpret mode compiles the forward's blocked solve slowly at chunk 64.
SMALL_BLOCKS = BlockSizes(
    chunk=16, block_v_dv=16, block_v_dh=16, block_v_dqkwg=16, block_k_dqkwg=16, block_v_h=16
)
RECOMPUTE = BlockSizes(chunk=16, save_states=False)
DENSE_CASES = [
    pytest.param(1, 1, 1, jnp.float32, True, True, {}, id="T1-f32"),
    # Only o is differentiated (zero final-state cotangent); value blocks narrower than dv, so
    # the dv / dh programs split dv and the dqkwg loop runs over two blocks; key blocks narrower
    # than dk, so the dqkwg programs split dk (partial d(G) summed).
    pytest.param(
        63,
        1,
        2,
        jnp.float32,
        True,
        False,
        {"final_state": False, "dk": 32, "dv": 32, "block_sizes": SMALL_BLOCKS},
        id="T63-f32-1:2-no_l2-no_final-blocks16",
    ),
    pytest.param(64, 1, 1, jnp.bfloat16, True, True, {}, id="T64-bf16"),
    pytest.param(65, 2, 2, jnp.float32, True, True, {"chunk_size": 64}, id="T65-f32-2:2-C64"),
    pytest.param(200, 1, 2, jnp.bfloat16, False, False, {}, id="T200-bf16-1:2-no_state-no_l2"),
    # The backward recomputes w, h, v_new and (I + A)^-1 (the forward keeps them by default).
    pytest.param(65, 1, 2, jnp.float32, True, True, {"block_sizes": RECOMPUTE},
                 id="T65-f32-1:2-recompute"),
    pytest.param(63, 1, 1, jnp.bfloat16, False, True, {"block_sizes": RECOMPUTE},
                 id="T63-bf16-recompute"),
    # Stage "dv" as a kernel of its own (not inside the reverse pass: BlockSizes.fuse_dv_local
    # off), two value blocks.
    pytest.param(65, 1, 2, jnp.bfloat16, True, True,
                 {"dv": 32, "block_sizes": BlockSizes(chunk=16, block_v_dh=16, block_v_dv=16,
                                                      fuse_dv_local=False)},
                 id="T65-bf16-1:2-dv_local_kernel"),
    pytest.param(63, 2, 2, jnp.float32, False, False,
                 {"block_sizes": BlockSizes(chunk=16, fuse_dv_local=False)},
                 id="T63-f32-2:2-no_state-dv_local_kernel"),
    # Three and eight value heads per key head: d(q), d(k) summed over them.
    pytest.param(33, 2, 6, jnp.float32, True, True, {}, id="T33-f32-2:6"),
    pytest.param(17, 1, 8, jnp.float32, False, True, {}, id="T17-f32-1:8"),
]


@pytest.mark.parametrize("T,Hk,Hv,dtype,with_state,l2norm,extra", DENSE_CASES)
def test_grad_dense(T, Hk, Hv, dtype, with_state, l2norm, extra):
    _check(T, Hk, Hv, dtype, seed=T, with_state=with_state, l2norm=l2norm, **extra)


def test_l2norm_bwd_equals_autodiff():
    """common.l2norm_bwd (the backward's L2-norm gradient, recomputed from x) against jax.vjp
    of common.l2norm in float32, on rows of very different norms, from float32 and bf16 x."""
    from pallas_kernels.gated_delta_rule import common

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 7, 2, 16)) * rng.choice([1e-2, 1.0, 30.0], (3, 7, 2, 1))
    x, dy = jnp.asarray(x, jnp.float32), jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    _, vjp = jax.vjp(common.l2norm, x)
    want = vjp(dy)[0]
    got = common.l2norm_bwd(x, dy)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    got_bf16 = common.l2norm_bwd(x.astype(jnp.bfloat16), dy)  # bf16 x, as the kernels take it
    want_bf16 = jax.vjp(common.l2norm, x.astype(jnp.bfloat16).astype(jnp.float32))[1]
    np.testing.assert_allclose(np.asarray(got_bf16), np.asarray(want_bf16(dy)[0]), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("shape,n,dtype", [((2, 5, 3, 16), 2, jnp.float32),
                                           ((1, 63, 1, 32), 3, jnp.bfloat16),
                                           ((1, 64, 2, 16), 1, jnp.bfloat16)])
def test_l2norm_bwd_heads_kernel(shape, n, dtype):
    """The Triton kernel (interpret mode) summing the n value heads' cotangents and going back
    through the L2 norm equals common.l2norm_bwd of the head sum (float32), in x's dtype; odd
    row counts (63 rows: blocks of one row) included."""
    from pallas_kernels.gated_delta_rule import common
    from pallas_kernels.gated_delta_rule.gpu_triton.l2norm_bwd import l2norm_bwd_heads

    rng = np.random.default_rng(sum(shape) + n)
    B, T, Hk, dk = shape
    x = rng.standard_normal(shape) * rng.choice([1e-2, 1.0, 30.0], (B, T, Hk, 1))
    dy = rng.standard_normal((B, T, Hk * n, dk))
    x, dy = jnp.asarray(x, dtype), jnp.asarray(dy, dtype)
    got = l2norm_bwd_heads(x, dy, interpret=True)
    assert got.dtype == dtype and got.shape == shape
    dy_sum = dy.astype(jnp.float32).reshape(B, T, Hk, n, dk).sum(axis=3)
    want = np.asarray(common.l2norm_bwd(x, dy_sum))
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol,
                               atol=tol * np.abs(want).max())
    with pytest.raises(ValueError, match=r"dy \(2, 5, 5, 16\) must be"):
        l2norm_bwd_heads(jnp.zeros((2, 5, 3, 16)), jnp.zeros((2, 5, 5, 16)), interpret=True)


@pytest.mark.parametrize("save_states,fuse_dv_local", [(False, True), (True, True),
                                                       (True, False)])
def test_grad_varlen(save_states, fuse_dv_local):
    """Packed sequences, with an empty one (its d(initial state) is its d(final state)), a
    one-token one and one spanning several chunks: d(state) restarts at each sequence end;
    with the backward recomputing the forward's states and with the forward keeping them, and
    with stage "dv" as a kernel of its own."""
    cu = [0, 5, 5, 40, 41, 60]
    _check(cu[-1], 1, 2, jnp.float32, seed=11, with_state=True, l2norm=True, cu_seqlens=cu,
           block_sizes=BlockSizes(chunk=16, save_states=save_states,
                                  fuse_dv_local=fuse_dv_local))


def test_saved_states_skip_the_recompute():
    """With BlockSizes.save_states the gradient program runs stages kkt/solve/wy and h once (the
    forward's), without it twice (the backward recomputes them)."""
    args = make_inputs(0, 1, 40, 1, 2, 16, 16, jnp.float32, True)

    def program(save):
        def loss(q, k, v, g, beta, s0):
            o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, impl="pallas_triton",
                                          interpret=True,
                                          block_sizes=BlockSizes(chunk=16, save_states=save))
            return jnp.sum(o)

        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args))

    recompute, saved = program(False), program(True)
    for name in ("gdn_chunk_kkt_solve_wy", "gdn_chunk_fwd_h"):  # (a name shows more than once
        assert recompute.count(name) == 2 * saved.count(name) > 0, name  # per pallas_call)


@pytest.mark.parametrize("dtype,Hv,cu", [(jnp.bfloat16, 2, None), (jnp.float32, 1, [0, 7, 40])])
def test_saved_states_hold_the_normalised_q_k(dtype, Hv, cu):
    """With the L2 norm in the kernel, the states the forward keeps for the backward end with q
    and k normalised (written by stage "o", by the first value head of each key head), equal to
    common.l2norm of the inputs on the chunk-aligned axis; without it they hold no q, k."""
    from pallas_kernels.gated_delta_rule import common
    from pallas_kernels.gated_delta_rule.gpu_triton.fwd import (
        chunk_gated_delta_rule_fwd,
        chunk_layout,
    )

    q, k, v, g, beta, _ = make_inputs(5, 1 if cu else 2, 40, 1, Hv, 16, 16, dtype, False)
    q, k = q * 3.0, k * 0.25  # away from unit norm
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    lay = chunk_layout(40, 16, cu)

    def kept(l2):
        return chunk_gated_delta_rule_fwd(
            q, k, v, g, beta, scale=0.25, use_qk_l2norm=l2, cu_seqlens=cu,
            block_sizes=BlockSizes(chunk=16), interpret=True, return_states=True)[2]

    assert len(kept(False)) == 4
    states = kept(True)
    assert len(states) == 6
    for got, x in zip(states[4:], (q, k)):
        want = lay.to_chunks(common.l2norm(x).astype(dtype))
        assert got.shape == want.shape and got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6, atol=1e-6)


def test_chunk_fwd_o_returns_o_and_the_normalised_q_k_or_none():
    """Stage "o" (gpu_triton/o.chunk_fwd_o) returns (o, qn, kn) whatever return_normalized says:
    qn, kn are None without it and common.l2norm of q and k with it; o is the same either way
    and equals scale [(qn h) exp(G) + lower_incl(qn kn^T exp(G_i - G_j)) v_new] per chunk, in
    float64 numpy."""
    from pallas_kernels.gated_delta_rule import common
    from pallas_kernels.gated_delta_rule.gpu_triton.o import chunk_fwd_o

    B, Tp, Hk, Hv, dk, dv, C, scale = 2, 32, 1, 2, 16, 16, 16, 0.25
    rng = np.random.default_rng(7)
    q = rng.standard_normal((B, Tp, Hk, dk)) * 3.0
    k = rng.standard_normal((B, Tp, Hk, dk)) * 0.25
    G = -np.cumsum(rng.uniform(0.0, 0.2, (B, Tp // C, C, Hv)), axis=2).reshape(B, Tp, Hv)
    h = rng.standard_normal((B, Tp // C, Hv, dk, dv))
    v_new = rng.standard_normal((B, Tp, Hv, dv))
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, G, h, v_new)]

    def run(normalized):
        return chunk_fwd_o(*args, scale=scale, out_dtype=jnp.float32, chunk_size=C, block_v=16,
                           use_qk_l2norm=True, return_normalized=normalized, interpret=True)

    plain, kept = run(False), run(True)
    assert len(plain) == len(kept) == 3 and plain[1] is None and plain[2] is None
    np.testing.assert_array_equal(np.asarray(plain[0]), np.asarray(kept[0]))
    for got, x in zip(kept[1:], args[:2]):
        assert got.shape == (B, Tp, Hk, dk) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(common.l2norm(x)), rtol=1e-6,
                                   atol=1e-7)
    qn, kn = (np.asarray(x, np.float64) for x in kept[1:])
    want = np.zeros((B, Tp, Hv, dv))
    mask = np.tril(np.ones((C, C)))
    for b in range(B):
        for c in range(Tp // C):
            t = slice(c * C, (c + 1) * C)
            for hv in range(Hv):
                hk = hv // (Hv // Hk)
                qc, kc, Gc = qn[b, t, hk], kn[b, t, hk], G[b, t, hv]
                inter = (qc @ h[b, c, hv]) * np.exp(Gc)[:, None]
                attn = (qc @ kc.T) * np.exp(Gc[:, None] - Gc[None, :]) * mask
                want[b, t, hv] = scale * (inter + attn @ v_new[b, t, hv])
    np.testing.assert_allclose(np.asarray(plain[0]), want, rtol=1e-5, atol=1e-5)


def test_fused_dv_local_drops_its_kernel():
    """BlockSizes.fuse_dv_local (the default): the gradient program has no stage "dv" kernel of
    its own; without it, and with seq_splits > 1 (whose segment maps read dv_local), it has."""
    args = make_inputs(0, 1, 40, 1, 2, 16, 16, jnp.float32, True)

    def program(**kw):
        def loss(q, k, v, g, beta, s0):
            o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, impl="pallas_triton",
                                          interpret=True, block_sizes=BlockSizes(chunk=16, **kw))
            return jnp.sum(o)

        return str(jax.make_jaxpr(jax.grad(loss))(*args))

    assert "gdn_chunk_bwd_dv_local" not in program()
    assert "gdn_chunk_bwd_dv_local" in program(fuse_dv_local=False)
    assert "gdn_chunk_bwd_dv_local" in program(seq_splits=2)


def test_export_cuda_backward():
    """The backward lowers to Triton for CUDA (dense and packed sequences)."""
    S = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    T, Hk, Hv, D = 100, 2, 4, 128

    def loss(q, k, v, g, beta, s0, cu):
        o, st = chunk_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=s0,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            cu_seqlens=cu,
            impl="pallas_triton",
        )
        return jnp.sum(o.astype(f32)) + jnp.sum(st)

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))

    for B, N, cu in ((2, 2, None), (1, 3, S((4,), jnp.int32))):
        args = (
            S((B, T, Hk, D), bf),
            S((B, T, Hk, D), bf),
            S((B, T, Hv, D), bf),
            S((B, T, Hv), f32),
            S((B, T, Hv), f32),
            S((N, Hv, D, D), f32),
            cu,
        )
        text = _export_cuda(grad_fn, args).mlir_module()
        for name in BWD_KERNELS:
            assert name in text, (name, cu)
