"""Chunked gated delta rule backward for TPU: the reverse state pass fused with the per-chunk
gradients, one kernel with grid (B, Hv, NC) whose chunk axis walks the chunks from the last.

Recompute first (cheaper than storing): the forward kernel (chunk_fwd.py, return_states=True)
gives h[c], the state at the start of each chunk (compute dtype). Then per chunk c of one
(batch, value head), from the last to the first, with dS = d(state at the chunk end) [dk, dv]
float32 in VMEM scratch (d(final state) at the last chunk):
  T, w, u  = (I + A)^-1, T (beta exp(G) k), T (beta v)          (kernel_math.wy_repr, recomputed)
  v_new    = u - w S,  S = h[c]
  dv_local = scale P^T dO                                       (kernel_math.dv_local)
  dv_new   = dv_local + kd dS;  dS <- exp(G_last) dS + scale (q exp(G))^T dO - w^T dv_new
                                                                (kernel_math.dstate_step)
  dq, dk, dG through the states and the intra-chunk attention   (kernel_math.qk_bwd)
  dw       = -dv_new S^T
  dk, dv, dbeta, dG through w and u (du = dv_new)               (kernel_math.wy_bwd)
(the same math as the GPU stages dv_local, dh, dqkwg, wy_bwd, fused here because the chunk's
state and its gradient are both at hand in the reverse walk). d(initial state) is the dS left at
the first chunk; d(g) = the reverse chunk-local cumsum of d(G) (jnp); dq, dk are summed over the
value heads of each key head (jnp). With use_qk_l2norm the kernels take the normalised q, k and
the gradient goes back through the L2 norm with common.l2norm_bwd.

Varlen (cu_seqlens, chunk-aligned layout of chunk_fwd.prepare): the walk restarts from a
sequence's d(final state) at its last chunk and writes its d(initial state) at its first chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule import kernel_math as km
from pallas_kernels.gated_delta_rule.tpu import chunk_fwd


def _kernel(*all_refs, scale, solve_precision, varlen):
    # varlen: the scalar-prefetch refs (reset, chunk_seq, ends [NC]) first.
    # q_ref, k_ref [C, dk]; v_ref, do_ref [C, dv]; gc_ref [C, 1]; gr_ref [1, C]; b_ref [C, 1];
    # h_ref [dk, dv] (state at the chunk start, compute dtype); dht_ref [dk, dv] float32;
    # dq_ref, dk_ref [C, dk], dv_ref [C, dv], dg_ref, db_ref [C, 1], dh0_ref [dk, dv], float32;
    # ds_ref (scratch) [dk, dv] float32.
    if varlen:
        _, _, ends_ref, *refs = all_refs
    else:
        ends_ref, refs = None, all_refs
    (q_ref, k_ref, v_ref, gc_ref, gr_ref, b_ref, h_ref, do_ref, dht_ref) = refs[:9]
    dq_ref, dk_ref, dv_ref, dg_ref, db_ref, dh0_ref, ds_ref = refs[9:]
    i = pl.program_id(2)
    NC = pl.num_programs(2)
    restart = i == 0
    if varlen:  # the last chunk of a sequence starts from its d(final state)
        restart = jnp.logical_or(restart, ends_ref[NC - 1 - i] != 0)

    @pl.when(restart)
    def _():
        ds_ref[...] = dht_ref[...]

    qc, kc = q_ref[...], k_ref[...]
    cdt = kc.dtype
    v, do = v_ref[...], do_ref[...]
    G_col = gc_ref[...]
    G_row = gr_ref[...]
    beta = b_ref[...]
    g_last = km.pick_last_of_row(G_row)
    T, w, u = km.wy_repr(kc, v, G_col, G_row, beta, precision=solve_precision)
    wc = w.astype(cdt)
    S = h_ref[...]
    vnc = (u - km.dot(wc, S)).astype(cdt)  # v_new
    dS = ds_ref[...]
    dvl = km.dv_local(qc, kc, G_col, G_row, do, scale=scale)
    dv_new, dS_start = km.dstate_step(qc, kc, wc, G_col, g_last, do, dvl, dS, scale=scale)
    ds_ref[...] = dS_start
    dq, dk_qk, dG_qk = km.qk_bwd(
        qc,
        kc,
        G_col,
        G_row,
        km.dot(do, S, trans_b=True),
        km.dot(vnc, dS.astype(cdt), trans_b=True),
        km.dot(do, vnc, trans_b=True),
        km.total(S.astype(jnp.float32) * dS),
        scale=scale,
    )
    dvc = dv_new.astype(cdt)
    dw = -km.dot(dvc, S, trans_b=True)
    dk_wy, dv, dbeta, dG_wy = km.wy_bwd(
        kc, v, G_col, G_row, beta, T, dw.astype(cdt), dvc, precision=solve_precision
    )
    dq_ref[...] = dq
    dk_ref[...] = dk_qk + dk_wy
    dv_ref[...] = dv
    dg_ref[...] = dG_qk + dG_wy
    db_ref[...] = dbeta
    if varlen:
        # The d(initial state) block follows the chunk's sequence; it is written back when the
        # sequence changes, holding the dS left at that sequence's first chunk.
        dh0_ref[...] = dS_start
    else:

        @pl.when(i == NC - 1)
        def _():
            dh0_ref[...] = dS_start


def chunk_gated_delta_rule_bwd_tpu(
    q,
    k,
    v,
    g,
    beta,
    do,
    dht,
    *,
    scale: float,
    initial_state=None,
    use_qk_l2norm: bool = False,
    cu_seqlens=None,
    chunk_size: int = 64,
    solve_precision=None,
    interpret=False,
):
    """Backward of ``chunk_fwd.chunk_gated_delta_rule_fwd_tpu`` (validated inputs, same args).

    Args:
      q, k: [B, T, Hk, dk]; v: [B, T, Hv, dv] (one dtype, the compute dtype of the matmuls).
      g, beta: [B, T, Hv]; initial_state: [N, Hv, dk, dv] float32 or None; cu_seqlens: [N + 1]
        int32 or None (then B == 1).
      do: [B, T, Hv, dv], the cotangent of o; dht: [N, Hv, dk, dv] float32, the cotangent of the
        final state (zeros when it is not used).
      solve_precision: of the solve and the C x C products of its backward (default HIGHEST).
      interpret: False, True or a pltpu.InterpretParams.
    Returns:
      dq, dk [B, T, Hk, dk] (summed over the value heads of each key head), dv [B, T, Hv, dv],
      in the compute dtype; dg, dbeta [B, T, Hv] float32 (d(g) of the log decay itself);
      d(initial_state) [N, Hv, dk, dv] float32, or None when initial_state is None.
    """
    B, _, Hk, dk = q.shape
    Hv, dv = v.shape[2], v.shape[3]
    n = Hv // Hk
    C = chunk_size
    cdt = k.dtype
    f32 = jnp.float32
    if solve_precision is None:
        solve_precision = km.HIGHEST
    q_in, k_in = q, k
    if use_qk_l2norm:
        q, k = common.l2norm(q).astype(cdt), common.l2norm(k).astype(cdt)
    varlen = cu_seqlens is not None
    p = chunk_fwd.prepare(q, k, v, g, beta, cu_seqlens, C)
    do_h = p.from_tokens(do.astype(cdt))  # [B, Hv, Tp, dv]
    s0 = initial_state
    if varlen and s0 is None:
        s0 = jnp.zeros(dht.shape, f32)
    _, _, h = chunk_fwd.fwd_call(
        p,
        s0,
        scale=scale,
        use_qk_l2norm=False,
        solve_precision=solve_precision,
        interpret=interpret,
        return_states=True,
    )
    Tp = p.q.shape[2]
    NC = Tp // C

    def rev(c):  # grid step -> chunk: the walk goes backwards
        return NC - 1 - c

    key_spec = pl.BlockSpec((None, None, C, dk), lambda b, h, c, *_: (b, lax.div(h, n), rev(c), 0))
    dk_spec = pl.BlockSpec((None, None, C, dk), lambda b, h, c, *_: (b, h, rev(c), 0))
    val_spec = pl.BlockSpec((None, None, C, dv), lambda b, h, c, *_: (b, h, rev(c), 0))
    col_spec = pl.BlockSpec((None, None, C, 1), lambda b, h, c, *_: (b, h, rev(c), 0))
    row_spec = pl.BlockSpec((None, None, None, 1, C), lambda b, h, c, *_: (b, h, rev(c), 0, 0))
    h_spec = pl.BlockSpec((None, None, None, dk, dv), lambda b, h, c, *_: (b, h, rev(c), 0, 0))
    state_spec = pl.BlockSpec((None, None, dk, dv), chunk_fwd.state_index_map(varlen, rev))
    prefetch = p.prefetch()
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(B, Hv, NC),
        in_specs=[
            key_spec,
            key_spec,
            val_spec,
            col_spec,
            row_spec,
            col_spec,
            h_spec,
            val_spec,
            state_spec,
        ],
        out_specs=[dk_spec, dk_spec, val_spec, col_spec, col_spec, state_spec],
        scratch_shapes=[pltpu.VMEM((dk, dv), f32)],
    )
    dq_, dk_, dv_, dG, dbeta, dh0 = pl.pallas_call(
        functools.partial(_kernel, scale=scale, solve_precision=solve_precision, varlen=varlen),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((B, Hv, Tp, dk), f32),
            jax.ShapeDtypeStruct((B, Hv, Tp, dk), f32),
            jax.ShapeDtypeStruct((B, Hv, Tp, dv), f32),
            jax.ShapeDtypeStruct((B, Hv, Tp, 1), f32),
            jax.ShapeDtypeStruct((B, Hv, Tp, 1), f32),
            jax.ShapeDtypeStruct(dht.shape, f32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=chunk_fwd.interpret_params(interpret),
        name="gdn_chunk_bwd_tpu",
    )(*prefetch, p.q, p.k, p.v, p.G_col, p.G_row, p.beta, h, do_h, dht.astype(f32))
    dg = lax.cumsum(dG.reshape(B, Hv, NC, C), axis=3, reverse=True).reshape(B, Hv, Tp)
    dq_, dk_ = (x.reshape(B, Hk, n, Tp, dk).sum(axis=2) for x in (dq_, dk_))
    dq_, dk_, dv_, dg, dbeta = (
        p.to_tokens(x) for x in (dq_, dk_, dv_, dg, dbeta.reshape(B, Hv, Tp))
    )
    if use_qk_l2norm:
        dq_, dk_ = common.l2norm_bwd(q_in, dq_), common.l2norm_bwd(k_in, dk_)
    if initial_state is None:
        dh0 = None
    elif varlen:  # an empty sequence passes its initial state through
        dh0 = jnp.where((p.layout.last_chunk >= 0)[:, None, None, None], dh0, dht.astype(f32))
    return dq_.astype(cdt), dk_.astype(cdt), dv_.astype(cdt), dg, dbeta, dh0
