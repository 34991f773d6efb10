"""The sequence-split state passes (gpu_triton/h_split.py and dh_split.py, BlockSizes.seq_splits)
in interpret mode on CPU: against the unsplit passes (h, v_new, final state; dh, dv_new,
d(initial state)), the whole op with seq_splits > 1 against the float64 numpy recurrence and its
gradients against jax.grad of the reference, and jax.export of the segment kernels for
("cuda",)."""

import jax
import jax.numpy as jnp
import numpy as np
from test_gated_delta_rule import TOL, make_inputs, numpy_gdn, rel_err
from test_gated_delta_rule_bwd import GRAD_TOL, _grads
from test_gated_delta_rule_kernels import _export_cuda

from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule
from pallas_kernels.gated_delta_rule.gpu_triton.dh import chunk_bwd_dh
from pallas_kernels.gated_delta_rule.gpu_triton.dh_split import chunk_bwd_dh_split
from pallas_kernels.gated_delta_rule.gpu_triton.fwd import BlockSizes, chunk_local_cumsum
from pallas_kernels.gated_delta_rule.gpu_triton.h import chunk_fwd_h
from pallas_kernels.gated_delta_rule.gpu_triton.h_split import chunk_fwd_h_split
from pallas_kernels.gated_delta_rule.gpu_triton.kkt_solve_wy import chunk_kkt_solve_wy

C = 16
# make_inputs' decay leaves ~1e-3 of a state after one chunk, so a wrong segment transition M
# would hide under the tolerance; weaker decay keeps |M| ~ 0.5 over a segment.
WEAK_DECAY = 0.05


def test_split_state_pass_vs_unsplit():
    """h, v_new and the final state of the pass split in 3 segments equal the unsplit pass (B 2,
    Hv/Hk 2, initial state, L2 norm in the kernel; 5 chunks as 2 + 2 + 1, so the last segment is
    padded with a zero chunk)."""
    B, Hk, Hv, dk, dv, NC = 2, 1, 2, 32, 32, 5
    _, k, v, g, beta, s0 = make_inputs(NC, B, NC * C, Hk, Hv, dk, dv, jnp.float32)
    k = k * 0.5
    G = chunk_local_cumsum(g * WEAK_DECAY, C)
    kw = {"chunk_size": C, "block_v": 16, "use_qk_l2norm": True, "interpret": True}

    @jax.jit
    def passes(k, v, G, beta, s0):
        w, u = chunk_kkt_solve_wy(k, v, G, beta, chunk_size=C, use_qk_l2norm=True, interpret=True)
        return (
            chunk_fwd_h(k, w, u, G, s0, **kw),
            chunk_fwd_h_split(k, w, u, G, s0, segments=3, **kw),
        )

    want, got = passes(k, v, G, beta, s0)
    for name, a, b in zip(("h", "v_new", "final"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, np.asarray(b, np.float64)) < 1e-5, (name, rel_err(a, b))


def test_split_reverse_pass_vs_unsplit():
    """dh, dv_new and d(initial state) of the reverse pass split in 3 segments equal the unsplit
    pass (B 2, Hv/Hk 2, 5 chunks as 2 + 2 + 1 with a padded last segment), on random w, dO,
    dv_local and d(final state)."""
    B, Hk, Hv, dk, dv, NC = 2, 1, 2, 32, 32, 5
    q, k, v, g, _, dht = make_inputs(NC + 1, B, NC * C, Hk, Hv, dk, dv, jnp.float32)
    rng = np.random.default_rng(NC)
    w = jnp.asarray(rng.standard_normal((B, NC * C, Hv, dk)) * 0.2, jnp.float32)
    dvl = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    G = chunk_local_cumsum(g * WEAK_DECAY, C)
    kw = {"scale": 0.3, "chunk_size": C, "block_v": 16, "interpret": True}

    @jax.jit
    def passes(q, k, w, G, do, dvl, dht):
        return (
            chunk_bwd_dh(q, k * 0.5, w, G, do, dvl, dht, **kw),
            chunk_bwd_dh_split(q, k * 0.5, w, G, do, dvl, dht, segments=3, **kw),
        )

    want, got = passes(q, k, w, G, v, dvl, dht)
    for name, a, b in zip(("dh", "dv_new", "dh0"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, np.asarray(b, np.float64)) < 1e-5, (name, rel_err(a, b))


def test_split_forward_vs_numpy():
    """The op with seq_splits = 2 and no initial state against the float64 recurrence: B 1,
    Hv/Hk 2, T = 75 (5 chunks as 3 + 2, the last one partial). (With an initial state and
    against seq_splits = 1: test_split_state_pass_vs_unsplit.)"""
    q, k, v, g, beta, s0 = make_inputs(7, 1, 75, 1, 2, 16, 32, jnp.float32, with_state=False)
    args = (q, k, v, g * WEAK_DECAY, beta, s0)
    f = jax.jit(
        lambda q, k, v, g, b, s0: chunk_gated_delta_rule(
            q,
            k,
            v,
            g,
            b,
            initial_state=s0,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            impl="pallas_triton",
            interpret=True,
            block_sizes=BlockSizes(chunk=C, block_v_h=16, block_v_o=16, seq_splits=2),
        )
    )
    o, st = f(*args)
    o_ref, st_ref = numpy_gdn(*args[:5], initial_state=args[5], l2norm=True)
    assert o.dtype == jnp.float32 and st.dtype == jnp.float32
    assert rel_err(o, o_ref) < TOL[jnp.float32] and rel_err(st, st_ref) < TOL[jnp.float32]


def test_split_grad_vs_reference():
    """The backward with both passes split (the recompute's, chunk_states being shared, and the
    reverse one): gradients of o and the final state w.r.t. every input (initial state
    included), T = 75 in 3 segments, equal jax.grad of the reference."""
    q, k, v, g, beta, s0 = make_inputs(3, 1, 75, 1, 2, 16, 16, jnp.float32)
    args = (q * 2.0, k * 0.5, v, g * WEAK_DECAY, beta, s0)
    rng = np.random.default_rng(4)
    cot = (
        jnp.asarray(rng.standard_normal(v.shape), jnp.float32),
        jnp.asarray(rng.standard_normal(s0.shape), jnp.float32),
    )
    bs = BlockSizes(
        chunk=C, block_v_h=16, block_v_dv=16, block_v_dh=16, block_v_dqkwg=16, seq_splits=3
    )
    kw = {"l2norm": True, "final_state": True}
    got = _grads("pallas_triton", args, cot, block_sizes=bs, **kw)
    want = _grads("reference", args, cot, **kw)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "s0"), got, want, strict=True):
        assert rel_err(a, np.asarray(b, np.float64)) < GRAD_TOL[jnp.float32], (name, rel_err(a, b))


def test_export_cuda_split():
    """The segment kernels lower to Triton for CUDA (forward and backward, H200-like heads)."""
    S = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    T, Hk, Hv, D = 1000, 2, 4, 128
    bs = BlockSizes(seq_splits=4)

    def loss(q, k, v, g, beta, s0):
        o, st = chunk_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=s0,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            impl="pallas_triton",
            block_sizes=bs,
        )
        return jnp.sum(o.astype(f32)) + jnp.sum(st)

    args = (
        S((1, T, Hk, D), bf),
        S((1, T, Hk, D), bf),
        S((1, T, Hv, D), bf),
        S((1, T, Hv), f32),
        S((1, T, Hv), f32),
        S((1, Hv, D, D), f32),
    )
    text = _export_cuda(jax.jit(jax.value_and_grad(loss, argnums=(0, 5))), args).mlir_module()
    assert text.count("gdn_chunk_h_segments") >= 2  # the forward and the backward's recompute
    assert "gdn_chunk_dh_segments" in text  # the backward's reverse pass
    assert "gdn_chunk_fwd_h" in text
