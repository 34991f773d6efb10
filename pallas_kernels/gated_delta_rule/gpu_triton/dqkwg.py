"""Backward stage "dqkwg": d(q), d(k), d(G) of one chunk from its states and their gradients.

Per chunk, with S = h[c] the state at its start, dS = dh[c] the gradient w.r.t. the state at its
end (dh.py), P = lower_incl(q k^T exp(G_i - G_j)) and kd = k exp(G_last - G):
  O  = scale [ (q S) exp(G) + P v_new ],     S' = exp(G_last) S + kd^T v_new,   v_new = u - w S
gives
  dP = scale (dO v_new^T) exp(G_i - G_j) on j <= i                              [C, C]
  dq = scale exp(G) (dO S^T) + dP k                                             [C, dk]
  dk = dP^T q + exp(G_last - G) (v_new dS^T)           (the w/A paths are added by wy_bwd.py)
  dG = rowsum(dq_state * q) + rowsum(dP * q k^T) - colsum(dP * q k^T) - rowsum(dk_state * k)
       + [i = C-1] (exp(G_last) sum(S * dS) + sum(dk_state * k))
where dq_state, dk_state are the first terms of dq and of dk. The value dimension is walked in
blocks of block_v; the rest is kernel_math.qk_bwd (shared with the TPU backward). One program per
(chunk, batch, value head, block of block_k key columns); q and k are those of its key head
(d(q), d(k) per value head, in the compute dtype as FLA's chunk_bwd_dqkwg writes them; the
caller sums the value heads of a key head in float32). Programs serving all the value heads of
a key head in turn, summing d(q), d(k) in the kernel (half the traffic), were about 2x slower
in this stage and in "wy_bwd" on an H200 (1x32768: 3.56 and 3.62 ms against 1.81 and 1.59).

Splitting the key dimension is exact: dq, dk of a key block need only that block of q, k, S
and dS (and the whole dP, recomputed per block), and every term of dG is a sum over key columns
(q k^T = sum of the blocks' q_b k_b^T; the row sums of dq_state * q and dk_state * k; sum(S dS)),
so each block's qk_bwd gives a partial dG and the partials are summed. It trades a recomputed
dO v_new^T per block for accumulators block_k columns wide (fewer registers per program) and
dk / block_k times as many programs.

d(w) = -dv_new S^T, which needs the same S, is made by wy_bwd.py: there it costs one load of S
per chunk instead of a d(w) written here and read there, a third accumulator here and dv_new
read by every key block. On an H200 at 8x4096 (profiles, bf16) that took this stage from 1.68
to 1.29 ms and "wy_bwd" from 1.47 to 1.58.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule import kernel_math as km


def _kernel(
    q_ref,
    k_ref,
    g_ref,
    h_ref,
    dh_ref,
    vn_ref,
    do_ref,
    dq_ref,
    dk_ref,
    dg_ref,
    *,
    scale,
    block_v,
):
    # q_ref, k_ref [C, BK]; g_ref [C]; h_ref, dh_ref [BK, dv]; vn_ref, do_ref [C, dv];
    # dq_ref, dk_ref [C, BK] (compute dtype); dg_ref [C] float32 (this key block's
    # part of d(G)).
    C, dk = q_ref.shape
    dv = vn_ref.shape[1]
    dq_state = jnp.zeros((C, dk), jnp.float32)  # dO S^T
    dk_state = jnp.zeros((C, dk), jnp.float32)  # v_new dS^T
    dP = jnp.zeros((C, C), jnp.float32)  # dO v_new^T, then d(q k^T)
    s_ds = jnp.zeros((dk,), jnp.float32)  # sum(S * dS) over the value dimension (BK rows)
    for j in range(dv // block_v):
        cols = pl.ds(j * block_v, block_v)
        S, dS = h_ref[:, cols], dh_ref[:, cols]
        do, vn = do_ref[:, cols], vn_ref[:, cols]
        dq_state += km.dot(do, S, trans_b=True)
        dk_state += km.dot(vn, dS, trans_b=True)
        dP += km.dot(do, vn, trans_b=True)
        s_ds += jnp.sum(S.astype(jnp.float32) * dS.astype(jnp.float32), axis=1)
    G = g_ref[...].astype(jnp.float32)
    dq, dk, dG = km.qk_bwd(
        q_ref[...],
        k_ref[...],
        G[:, None],
        G[None, :],
        dq_state,
        dk_state,
        dP,
        jnp.sum(s_ds),
        scale=scale,
    )
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dg_ref[...] = jnp.sum(dG, axis=1)  # [C, 1] -> [C]


def chunk_bwd_dqkwg(
    q: jax.Array,
    k: jax.Array,
    G: jax.Array,
    h: jax.Array,
    dh: jax.Array,
    v_new: jax.Array,
    do: jax.Array,
    *,
    scale: float,
    chunk_size: int = 64,
    block_v: int = 64,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """d(q), d(k) (state and intra-chunk paths) and d(G) (same paths) of every chunk.

    block_v: value columns per step of the loop in a program; block_k: key columns per program
    (both must divide their dimension; block_k >= dk: no split).

    Args:
      q, k: [B, Tp, Hk, dk] (compute dtype, L2-normalised already if asked; q unscaled).
      G: [B, Tp, Hv] float32; h, dh: [B, NC, Hv, dk, dv] (the states at the chunk starts, and
        d(state at the chunk ends) from dh.py); v_new, do: [B, Tp, Hv, dv].
    Returns:
      dq, dk [B, Tp, Hv, dk] (per value head, compute dtype); dG [B, Tp, Hv] float32.
    """
    B, Tp, Hk, dk = q.shape
    Hv, dv = do.shape[2], do.shape[3]
    C = chunk_size
    n = Hv // Hk
    BV, BK = min(block_v, dv), min(block_k, dk)
    for name, blk, dim in (("block_v", BV, dv), ("block_k", BK, dk)):
        if dim % blk:
            raise ValueError(f"chunk_bwd_dqkwg: {name} = {blk} must divide {dim}")
    NK = dk // BK
    key_spec = pl.BlockSpec((None, C, None, BK), lambda c, b, h, j: (b, c, lax.div(h, n), j))
    row_spec = pl.BlockSpec((None, C, None, BK), lambda c, b, h, j: (b, c, h, j))
    val_spec = pl.BlockSpec((None, C, None, dv), lambda c, b, h, j: (b, c, h, 0))
    state_spec = pl.BlockSpec((None, None, None, BK, dv), lambda c, b, h, j: (b, c, h, j, 0))
    g_spec = pl.BlockSpec((None, C, None), lambda c, b, h, j: (b, c, h))
    dg_spec = pl.BlockSpec((None, None, C, None), lambda c, b, h, j: (j, b, c, h))
    dq, dk_, dG = pl.pallas_call(
        functools.partial(_kernel, scale=scale, block_v=BV),
        grid=(Tp // C, B, Hv, NK),
        in_specs=[key_spec, key_spec, g_spec, state_spec, state_spec, val_spec, val_spec],
        out_specs=[row_spec, row_spec, dg_spec],
        out_shape=[
            jax.ShapeDtypeStruct((B, Tp, Hv, dk), q.dtype),
            jax.ShapeDtypeStruct((B, Tp, Hv, dk), q.dtype),
            jax.ShapeDtypeStruct((NK, B, Tp, Hv), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gdn_chunk_bwd_dqkwg",
    )(q, k, G, h, dh, v_new, do)
    return dq, dk_, jnp.sum(dG, axis=0)
