"""Backward stage "dh" split along the sequence and recombined exactly: the reverse twin of
h_split.py, for when B x Hv programs leave the GPU idle (one long sequence).

Per chunk the reverse pass of dh.py is affine in dS = d(state at the chunk end) [dk, dv]:
  dS_start = M_c^T dS + b'_c,   M_c = exp(G_last) I - kd^T w  (the forward chunk map, h_split.py),
  b'_c = scale (q exp(G))^T dO - w^T dv_local,   kd = k exp(G_last - G).
The NC chunks are cut into P segments of L chunks as in h_split.py (zero-padded at the end: a
padded chunk passes dS through). Then
  pass 1 (Pallas, ``chunk_segment_dmaps``): for every segment p > 0 in parallel, its map
    [M'_p | b'_p] [dk, dk + dv] float32 from d(state at its end) to d(state at its start):
    M'_p = M_{c_first}^T ... M_{c_last}^T, and b'_p, the start gradient when the end gradient is
    zero. Both follow the recurrence of dh.py (km.dstate_step), run on the columns of [I | 0] with
    the inputs [0 | (dO, dv_local)].
  pass 2 (jnp, P - 1 tiny matmuls): the segment end gradients, dS_end(P-1) = d(final state),
    dS_end(p-1) = M'_p dS_end(p) + b'_p.
  pass 3 (dh.py, unchanged): the reverse pass on [B P, L C] tokens, the P segments of every
    sequence as rows of the batch, each from its end gradient; the first segment's d(start state)
    is d(initial state).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule import kernel_math as km
from pallas_kernels.gated_delta_rule.gpu_triton.dh import chunk_bwd_dh, loop_stages
from pallas_kernels.gated_delta_rule.gpu_triton.h_split import (
    as_segments,
    map_columns,
    segments_layout,
)


def _segment_kernel(q_ref, k_ref, w_ref, g_ref, do_ref, dvl_ref, a_ref, *, chunk_size, scale):
    # q_ref, k_ref, w_ref [L C, dk]; g_ref [L C]; do_ref, dvl_ref [L C, BV];
    # a_ref [dk, BV] float32: column block j (program axis 3) of the segment's map [M' | b']
    # (h_split.map_columns; for M''s blocks dO and dv_local enter as zeros).
    C = chunk_size
    L = k_ref.shape[0] // C
    BV = a_ref.shape[1]

    def run(X, with_inputs):
        def body(i, X):
            sl = pl.ds(pl.multiple_of((L - 1 - i) * C, C), C)
            G = g_ref[sl].astype(jnp.float32)
            if with_inputs:
                do, dvl = do_ref[sl, :], dvl_ref[sl, :]
            else:
                do, dvl = jnp.zeros((C, BV), w_ref.dtype), jnp.zeros((C, BV), jnp.float32)
            return km.dstate_step(
                q_ref[sl, :],
                k_ref[sl, :],
                w_ref[sl, :],
                G[:, None],
                km.pick_last(G),
                do,
                dvl,
                X,
                scale=scale,
            )[1]

        a_ref[...] = lax.fori_loop(0, L, body, X)

    map_columns(run, *a_ref.shape)


def chunk_segment_dmaps(
    q: jax.Array,
    k: jax.Array,
    w: jax.Array,
    G: jax.Array,
    do: jax.Array,
    dv_local: jax.Array,
    *,
    scale: float,
    segments: int,
    chunk_size: int = 64,
    block_v: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Pass 1: the affine map of the reverse pass over each segment but the first, one program
    per (segment, batch, value head, column block of [M' | b']).

    Args:
      q, k: [B P, L C, Hk, dk]; w: [B P, L C, Hv, dk]; do: [B P, L C, Hv, dv] (compute dtype);
        dv_local: [B P, L C, Hv, dv]; G: [B P, L C, Hv] float32. Row b P + p holds
        segment p of sequence b (P = segments).
      block_v: columns per program; must divide dk and dv.
    Returns:
      [B, P - 1, Hv, dk, dk + dv] float32: entry p - 1 is [M'_p | b'_p] of segment p >= 1,
      d(state at its start) = M'_p d(state at its end) + b'_p.
    """
    BP, Ls, Hk, dk = k.shape
    Hv, dv = do.shape[2], do.shape[3]
    P = segments
    B = BP // P
    n = Hv // Hk
    BV = min(block_v, dk, dv)
    if dk % BV or dv % BV:
        raise ValueError(f"chunk_segment_dmaps: block_v = {BV} must divide dk = {dk} and dv = {dv}")
    n_m = dk // BV

    def row(p, b):  # segment p + 1 of sequence b
        return b * P + p + 1

    key_spec = pl.BlockSpec(
        (None, Ls, None, dk), lambda p, b, h, j: (row(p, b), 0, lax.div(h, n), 0)
    )
    val_spec = pl.BlockSpec(
        (None, Ls, None, BV), lambda p, b, h, j: (row(p, b), 0, h, jnp.maximum(j - n_m, 0))
    )
    return pl.pallas_call(
        functools.partial(_segment_kernel, chunk_size=chunk_size, scale=scale),
        grid=(P - 1, B, Hv, (dk + dv) // BV),
        in_specs=[
            key_spec,
            key_spec,
            pl.BlockSpec((None, Ls, None, dk), lambda p, b, h, j: (row(p, b), 0, h, 0)),
            pl.BlockSpec((None, Ls, None), lambda p, b, h, j: (row(p, b), 0, h)),
            val_spec,
            val_spec,
        ],
        out_specs=pl.BlockSpec((None, None, None, dk, BV), lambda p, b, h, j: (b, p, h, 0, j)),
        out_shape=jax.ShapeDtypeStruct((B, P - 1, Hv, dk, dk + dv), jnp.float32),
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps, num_stages=loop_stages(num_stages, w.dtype)
        ),
        interpret=interpret,
        name="gdn_chunk_dh_segments",
    )(q, k, w, G, do, dv_local)


def segment_end_grads(dmaps: jax.Array, dht: jax.Array) -> jax.Array:
    """Pass 2: dS_end(P-1) = dht, dS_end(p-1) = M'_p dS_end(p) + b'_p (float32, exact float32
    matmuls).

    Args: dmaps [B, P - 1, Hv, dk, dk + dv] float32 (chunk_segment_dmaps); dht [B, Hv, dk, dv]
      float32, d(final state).
    Returns: [B, P, Hv, dk, dv] float32, d(state at the end of each segment).
    """
    dk = dmaps.shape[3]

    def step(dS, a):
        prev = jnp.einsum("bhij,bhjv->bhiv", a[..., :dk], dS, precision=km.HIGHEST) + a[..., dk:]
        return prev, dS

    first, later = lax.scan(step, dht.astype(jnp.float32), jnp.moveaxis(dmaps, 1, 0), reverse=True)
    return jnp.concatenate([first[:, None], jnp.moveaxis(later, 0, 1)], axis=1)


def chunk_bwd_dh_split(
    q: jax.Array,
    k: jax.Array,
    w: jax.Array,
    G: jax.Array,
    do: jax.Array,
    dv_local: jax.Array,
    dht: jax.Array,
    *,
    scale: float,
    segments: int,
    chunk_size: int = 64,
    block_v: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """The reverse state pass of ``dh.chunk_bwd_dh`` (dense, no varlen), split into up to
    ``segments`` pieces of the sequence (as h_split.chunk_fwd_h_split splits the forward's); the
    same arguments and results, equal up to rounding.

    Args: q, k [B, Tp, Hk, dk]; w [B, Tp, Hv, dk]; do [B, Tp, Hv, dv] (compute dtype); G
      [B, Tp, Hv] float32; dv_local [B, Tp, Hv, dv]; dht [B, Hv, dk, dv] float32.
    Returns: dh [B, NC, Hv, dk, dv], dv_new [B, Tp, Hv, dv] (compute dtype), d(initial state)
      [B, Hv, dk, dv] float32.
    """
    B, Tp, _, dk = k.shape
    Hv, dv = do.shape[2], do.shape[3]
    C = chunk_size
    NC = Tp // C
    L, P = segments_layout(NC, segments)
    kw = {
        "scale": scale,
        "chunk_size": C,
        "block_v": block_v,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "interpret": interpret,
    }
    if P == 1:
        return chunk_bwd_dh(q, k, w, G, do, dv_local, dht, **kw)
    q, k, w, G, do, dv_local = as_segments((q, k, w, G, do, dv_local), P, L, C)
    dmaps = chunk_segment_dmaps(q, k, w, G, do, dv_local, segments=P, **kw)
    ends = segment_end_grads(dmaps, dht)  # [B, P, Hv, dk, dv]
    dh, dv_new, starts = chunk_bwd_dh(
        q, k, w, G, do, dv_local, ends.reshape(B * P, Hv, dk, dv), **kw
    )
    dh = dh.reshape(B, P * L, Hv, dk, dv)[:, :NC]
    dv_new = dv_new.reshape(B, P * L * C, Hv, dv)[:, :Tp]
    return dh, dv_new, starts.reshape(B, P, Hv, dk, dv)[:, 0]
