"""Gated delta rule references (recurrent, chunked) and the public ops vs a float64 numpy recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import (
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_ref,
    fused_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule,
)


def numpy_gdn(q, k, v, g, beta, scale=None, initial_state=None, l2norm=False, cu_seqlens=None):
    """Float64 numpy recurrence, written independently of the package. Returns (o, final)."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2], v.shape[3]
    n = Hv // Hk
    if l2norm:
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    scale = dk**-0.5 if scale is None else scale
    if cu_seqlens is None:
        segs = [(b, 0, T) for b in range(B)]
    else:
        cu = list(np.asarray(cu_seqlens))
        segs = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    N = len(segs)
    S0 = (
        np.zeros((N, Hv, dk, dv))
        if initial_state is None
        else np.asarray(initial_state, np.float64)
    )
    o = np.zeros((B, T, Hv, dv))
    final = np.zeros((N, Hv, dk, dv))
    for i, (b, t0, t1) in enumerate(segs):
        for h in range(Hv):
            S = S0[i, h].copy()
            for t in range(t0, t1):
                kt, qt = k[b, t, h // n], q[b, t, h // n] * scale
                S = np.exp(g[b, t, h]) * S
                S = S + np.outer(kt, beta[b, t, h] * (v[b, t, h] - S.T @ kt))
                o[b, t, h] = S.T @ qt
            final[i, h] = S
    return o, final


def make_inputs(seed, B, T, Hk, Hv, dk, dv, dtype, with_state=True, N=None):
    """Fresh random inputs (numpy RNG: cheaper than compiling jax.random for every shape)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, Hk, dk), np.float32)
    k = rng.standard_normal((B, T, Hk, dk), np.float32)
    # Unit-norm keys keep the delta rule contractive, as in the model (L2 norm in the kernel).
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, Hv, dv), np.float32)
    g = (-np.log1p(np.exp(rng.standard_normal((B, T, Hv)))) * 0.5).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((B, T, Hv))))).astype(np.float32)
    N = B if N is None else N
    s0 = rng.standard_normal((N, Hv, dk, dv), np.float32) if with_state else None
    cast = lambda x: jnp.asarray(x).astype(dtype)
    return (
        cast(q),
        cast(k),
        cast(v),
        jnp.asarray(g),
        jnp.asarray(beta),
        None if s0 is None else jnp.asarray(s0),
    )


def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    return np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-12)


TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def call(fn, q, k, v, g, beta, initial_state=None, cu_seqlens=None, **static):
    """Runs FNS[fn] under jit (eager dispatch of the many small ops compiles each one)."""
    f = jax.jit(lambda *a: FNS[fn](*a[:5], initial_state=a[5], cu_seqlens=a[6], **static))
    return f(q, k, v, g, beta, initial_state, cu_seqlens)


FNS = {
    "recurrent": recurrent_gated_delta_rule,
    "chunk_ref": chunk_gated_delta_rule_ref,
    "chunk_ref_c16": lambda *a, **kw: chunk_gated_delta_rule_ref(*a, chunk_size=16, **kw),
    "public_chunk": chunk_gated_delta_rule,
    "public_recurrent": fused_recurrent_gated_delta_rule,
}


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("Hk,Hv", [(1, 1), (1, 2)])
def test_chunk_ref_float32_vs_numpy(T, Hk, Hv):
    # Pairwise design (compiles dominate the run time): each T and each head ratio is seen both
    # with and without an initial state.
    with_state = (T + Hv) % 2 == 1
    _check_float32(T, Hk, Hv, with_state, "chunk_ref")


@pytest.mark.parametrize("T", [1, 65])
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_float32_vs_numpy(T, with_state):
    _check_float32(T, 1, 2, with_state, "recurrent")


def _check_float32(T, Hk, Hv, with_state, fn):
    seed = 1000 * T + 10 * Hv + Hk + (7 if with_state else 0)
    q, k, v, g, beta, s0 = make_inputs(seed, 2, T, Hk, Hv, 16, 16, jnp.float32, with_state)
    o, st = call(fn, q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0)
    assert o.dtype == jnp.float32 and st.dtype == jnp.float32
    assert o.shape == (2, T, Hv, 16) and st.shape == (2, Hv, 16, 16)
    assert rel_err(o, o_ref) < TOL[jnp.float32]
    assert rel_err(st, st_ref) < TOL[jnp.float32]


@pytest.mark.parametrize("T", [1, 65, 200])
@pytest.mark.parametrize("fn", ["recurrent", "chunk_ref", "public_chunk"])
def test_bfloat16_vs_numpy(T, fn):
    q, k, v, g, beta, s0 = make_inputs(T + 3, 2, T, 1, 2, 16, 16, jnp.bfloat16)
    o, st = call(fn, q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0)
    assert o.dtype == jnp.bfloat16 and st.dtype == jnp.float32
    assert rel_err(o, o_ref) < TOL[jnp.bfloat16]
    assert rel_err(st, st_ref) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("fn", ["chunk_ref_c16", "public_chunk", "public_recurrent"])
def test_l2norm_scale_gqa(fn):
    q, k, v, g, beta, s0 = make_inputs(5, 2, 70, 2, 4, 16, 8, jnp.float32)
    q, k = q * 3.0, k * 0.2  # not unit norm: the kernel normalises them
    o, st = call(
        fn,
        q,
        k,
        v,
        g,
        beta,
        scale=0.3,
        initial_state=s0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, scale=0.3, initial_state=s0, l2norm=True)
    assert rel_err(o, o_ref) < TOL[jnp.float32]
    assert rel_err(st, st_ref) < TOL[jnp.float32]


def test_bf16_beta_not_rounded():
    """beta given in float32 is used as is (an output shift of a rounded beta would show here)."""
    q, k, v, g, beta, s0 = make_inputs(9, 1, 40, 1, 1, 16, 16, jnp.float32)
    _, st = call("public_chunk", q, k, v, g, beta, initial_state=s0, output_final_state=True)
    _, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0)
    _, st_rounded = numpy_gdn(
        q, k, v, g, beta.astype(jnp.bfloat16).astype(jnp.float32), initial_state=s0
    )
    err, err_rounded = rel_err(st, st_ref), rel_err(st_rounded, st_ref)
    assert err < 1e-5 < err_rounded


@pytest.mark.parametrize("fn", ["recurrent", "chunk_ref", "chunk_ref_c16"])
def test_varlen_packed(fn):
    cu = np.array([0, 5, 5, 70, 71, 150], np.int32)  # includes an empty and a 1-token sequence
    T, N = int(cu[-1]), len(cu) - 1
    q, k, v, g, beta, s0 = make_inputs(11, 1, T, 1, 2, 16, 16, jnp.float32, N=N)
    o, st = call(
        fn, q, k, v, g, beta, initial_state=s0, cu_seqlens=jnp.asarray(cu), output_final_state=True
    )
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu)
    assert st.shape == (N, 2, 16, 16)
    assert rel_err(o, o_ref) < TOL[jnp.float32]
    assert rel_err(st, st_ref) < TOL[jnp.float32]


def test_no_final_state_and_default_zero_state():
    q, k, v, g, beta, _ = make_inputs(2, 1, 10, 1, 1, 16, 16, jnp.float32)
    o, st = call("public_chunk", q, k, v, g, beta)
    assert st is None
    o_ref, _ = numpy_gdn(q, k, v, g, beta)
    assert rel_err(o, o_ref) < TOL[jnp.float32]


def test_bad_inputs_raise():
    q, k, v, g, beta, s0 = make_inputs(0, 2, 8, 2, 4, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match="`k`"):
        chunk_gated_delta_rule(q, k[:, :4], v, g, beta)
    with pytest.raises(ValueError, match="multiple"):
        chunk_gated_delta_rule(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="`g`"):
        chunk_gated_delta_rule(q, k, v, g[..., :2], beta)
    with pytest.raises(ValueError, match="`beta`"):
        chunk_gated_delta_rule(q, k, v, g, beta[:, :3])
    with pytest.raises(ValueError, match="`initial_state`"):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0[:, :, :8])
    with pytest.raises(ValueError, match="`cu_seqlens`"):
        chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=jnp.array([0, 8], jnp.int32))
    with pytest.raises(ValueError, match="`impl`"):
        chunk_gated_delta_rule(q, k, v, g, beta, impl="cuda")
    with pytest.raises(ValueError, match="no tokens"):
        chunk_gated_delta_rule(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0])
    with pytest.raises(ValueError, match="`scale`.*pass initial_state by keyword"):
        chunk_gated_delta_rule(q, k, v, g, beta, s0)
    with pytest.raises(ValueError, match="`initial_state` must be a floating dtype"):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0.astype(jnp.int32))
