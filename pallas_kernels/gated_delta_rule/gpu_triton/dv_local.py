"""Backward stage "dv": the part of d(v_new) that comes from the outputs of the same chunk.

Stage "o" computes O = scale [ (q h) exp(G) + P v_new ] with P = lower_incl(q k^T exp(G_i - G_j))
[C, C]; so the chunk-local gradient of v_new is
  dv_local = scale P^T dO                                              [C, BV]
(the gradient through the states, k_decayed d(state), is added by the reverse state pass, dh.py).
Stored in the compute dtype, as FLA stores it (float32 doubled this stage's writes and the reverse
pass's reads: 537 MB each at 8 x 4096 tokens, 32 heads of 128).
One program per (chunk, batch, value head, value block).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule import kernel_math as km


def _kernel(q_ref, k_ref, g_ref, do_ref, dv_ref, *, scale):
    # q_ref, k_ref [C, dk]; g_ref [C]; do_ref [C, BV]; dv_ref [C, BV].
    G = g_ref[...].astype(jnp.float32)
    dvl = km.dv_local(q_ref[...], k_ref[...], G[:, None], G[None, :], do_ref[...], scale=scale)
    dv_ref[...] = dvl.astype(dv_ref.dtype)


def chunk_bwd_dv_local(
    q: jax.Array,
    k: jax.Array,
    G: jax.Array,
    do: jax.Array,
    *,
    scale: float,
    chunk_size: int = 64,
    block_v: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Chunk-local d(v_new).

    Args:
      q, k: [B, Tp, Hk, dk] (compute dtype, L2-normalised already if asked; q unscaled).
      G: [B, Tp, Hv] float32 chunk-local cumsum of g.
      do: [B, Tp, Hv, dv] (compute dtype), the cotangent of o.
    Returns:
      dv_local [B, Tp, Hv, dv] (do's dtype; accumulated in float32).
    """
    B, Tp, Hk, dk = q.shape
    Hv, dv = do.shape[2], do.shape[3]
    C = chunk_size
    n = Hv // Hk
    BV = min(block_v, dv)
    if dv % BV:
        raise ValueError(f"chunk_bwd_dv_local: block_v = {BV} must divide dv = {dv}")
    return pl.pallas_call(
        functools.partial(_kernel, scale=scale),
        grid=(Tp // C, B, Hv, dv // BV),
        in_specs=[
            pl.BlockSpec((None, C, None, dk), lambda c, b, h, j: (b, c, lax.div(h, n), 0)),
            pl.BlockSpec((None, C, None, dk), lambda c, b, h, j: (b, c, lax.div(h, n), 0)),
            pl.BlockSpec((None, C, None), lambda c, b, h, j: (b, c, h)),
            pl.BlockSpec((None, C, None, BV), lambda c, b, h, j: (b, c, h, j)),
        ],
        out_specs=pl.BlockSpec((None, C, None, BV), lambda c, b, h, j: (b, c, h, j)),
        out_shape=jax.ShapeDtypeStruct((B, Tp, Hv, dv), do.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gdn_chunk_bwd_dv_local",
    )(q, k, G, do)
