"""Stage "o": the output of every chunk, in parallel, from the states stored by stage "h".

  O = scale * [ (q h) * exp(G) + lower_incl(q k^T * exp(G_i - G_j)) v_new ]    [C, BV]
One program per (chunk, batch, value head, value block). With the L2 norm in the kernel it can
also write the normalised q and k it made (``return_normalized``: the first program of each key
head writes them), which the backward then reads instead of normalising q and k again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule import kernel_math as km


def _kernel(q_ref, k_ref, g_ref, h_ref, vn_ref, o_ref, *qkn_refs, scale, use_qk_l2norm,
            heads_per_key):
    # q_ref, k_ref [C, dk]; g_ref [C]; h_ref [dk, BV]; vn_ref [C, BV]; o_ref [C, BV];
    # qkn_refs (return_normalized): qn_ref, kn_ref [C, dk].
    cdt = h_ref.dtype
    q = q_ref[...].astype(jnp.float32)
    k = k_ref[...].astype(jnp.float32)
    if use_qk_l2norm:
        q, k = km.l2norm(q), km.l2norm(k)
    k = k.astype(cdt)
    if qkn_refs:
        first = (lax.rem(pl.program_id(2), heads_per_key) == 0) & (pl.program_id(3) == 0)

        @pl.when(first)
        def _():
            qkn_refs[0][...] = q.astype(cdt)
            qkn_refs[1][...] = k

    q = (q * scale).astype(cdt)
    G = g_ref[...].astype(jnp.float32)
    o_inter = km.dot(q, h_ref[...]) * jnp.exp(G)[:, None]  # [C, BV]
    attn = km.decayed_scores(q, k, G, strict=False)  # [C, C]
    o = o_inter + km.dot(attn.astype(cdt), vn_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)


def chunk_fwd_o(
    q: jax.Array,
    k: jax.Array,
    G: jax.Array,
    h: jax.Array,
    v_new: jax.Array,
    *,
    scale: float,
    out_dtype,
    chunk_size: int = 64,
    block_v: int = 64,
    use_qk_l2norm: bool = False,
    return_normalized: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Chunk outputs.

    Args:
      q, k: [B, Tp, Hk, dk]; G: [B, Tp, Hv] float32; h: [B, NC, Hv, dk, dv]; v_new: [B, Tp, Hv, dv].
      return_normalized: with use_qk_l2norm, also write q and k L2-normalised (q unscaled).
    Returns:
      (o, qn, kn), always three: o [B, Tp, Hv, dv] in out_dtype; with return_normalized qn, kn
      [B, Tp, Hk, dk] in h's dtype (the compute dtype), else None and None.
    Raises:
      ValueError: block_v does not divide dv; return_normalized without use_qk_l2norm.
    """
    B, Tp, Hk, dk = q.shape
    Hv, dv = v_new.shape[2], v_new.shape[3]
    C = chunk_size
    n = Hv // Hk
    BV = min(block_v, dv)
    if dv % BV:
        raise ValueError(f"chunk_fwd_o: block_v = {BV} must divide dv = {dv}")
    if return_normalized and not use_qk_l2norm:
        raise ValueError("chunk_fwd_o: return_normalized needs use_qk_l2norm")
    kernel = functools.partial(_kernel, scale=scale, use_qk_l2norm=use_qk_l2norm,
                               heads_per_key=n)
    qk_spec = pl.BlockSpec((None, C, None, dk), lambda c, b, h, j: (b, c, lax.div(h, n), 0))
    qk_shape = jax.ShapeDtypeStruct((B, Tp, Hk, dk), h.dtype)
    outs = pl.pallas_call(
        kernel,
        grid=(Tp // C, B, Hv, dv // BV),
        in_specs=[
            qk_spec,
            qk_spec,
            pl.BlockSpec((None, C, None), lambda c, b, h, j: (b, c, h)),
            pl.BlockSpec((None, None, None, dk, BV), lambda c, b, h, j: (b, c, h, 0, j)),
            pl.BlockSpec((None, C, None, BV), lambda c, b, h, j: (b, c, h, j)),
        ],
        out_specs=[pl.BlockSpec((None, C, None, BV), lambda c, b, h, j: (b, c, h, j))]
        + [qk_spec] * 2 * return_normalized,
        out_shape=[jax.ShapeDtypeStruct((B, Tp, Hv, dv), out_dtype)]
        + [qk_shape] * 2 * return_normalized,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gdn_chunk_fwd_o",
    )(q, k, G, h, v_new)
    return (outs[0], outs[1], outs[2]) if return_normalized else (outs[0], None, None)
