"""Decode: the recurrent gated delta rule for a few new tokens of a batch of states, in place.

One program per (value block, batch row, value head) holds S[:, block] [dk, BV] in float32 and
applies, for each new token t (T is small, the loop is unrolled):
  S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = scale S^T q_t
The state buffer is aliased input -> output (update in place when the caller donates it). Rows
whose ``live`` flag is 0 keep their state bit for bit (their outputs are zeros).
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
    v_ref,
    g_ref,
    beta_ref,
    live_ref,
    s_ref,
    o_ref,
    s_out_ref,
    *,
    scale,
    use_qk_l2norm,
    seqlen,
):
    # q_ref, k_ref [T, dk]; v_ref [T, BV]; g_ref, beta_ref [T]; live_ref [1] int32;
    # s_ref, s_out_ref [dk, BV] float32; o_ref [T, BV].
    S0 = s_ref[...].astype(jnp.float32)
    live = live_ref[...] != 0  # [1]
    S = S0
    for t in range(seqlen):
        q = q_ref[t, :].astype(jnp.float32)[None, :]  # [1, dk]
        k = k_ref[t, :].astype(jnp.float32)[None, :]
        if use_qk_l2norm:
            q, k = km.l2norm(q), km.l2norm(k)
        q, k = q[0] * scale, k[0]
        v = v_ref[t, :].astype(jnp.float32)  # [BV]
        g = g_ref[t].astype(jnp.float32)
        b = beta_ref[t].astype(jnp.float32)
        S = S * jnp.exp(g)
        kS = jnp.sum(k[:, None] * S, axis=0)  # [BV]
        delta = b * (v - kS)
        S = S + k[:, None] * delta[None, :]
        o = jnp.sum(q[:, None] * S, axis=0)
        o_ref[t, :] = jnp.where(live, o, 0.0).astype(o_ref.dtype)
    s_out_ref[...] = jnp.where(live[:, None], S, S0).astype(s_out_ref.dtype)


def gated_delta_rule_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    live: jax.Array | None = None,
    *,
    scale: float,
    use_qk_l2norm: bool = False,
    block_v: int = 32,
    num_warps: int = 4,
    interpret: bool = False,
):
    """Decode step(s).

    Args:
      q, k: [B, T, Hk, dk]; v: [B, T, Hv, dv]; g, beta: [B, T, Hv]; state: [B, Hv, dk, dv] float32
      (aliased to the returned state); live: [B] bool/int or None (all live).
    Returns:
      o [B, T, Hv, dv] in v.dtype, new_state [B, Hv, dk, dv] float32.
    """
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2], v.shape[3]
    n = Hv // Hk
    BV = min(block_v, dv)
    if dv % BV:
        raise ValueError(f"gated_delta_rule_decode: block_v = {BV} must divide dv = {dv}")
    if live is None:
        live = jnp.ones((B,), jnp.int32)
    live = live.astype(jnp.int32).reshape(B, 1)
    kernel = functools.partial(_kernel, scale=scale, use_qk_l2norm=use_qk_l2norm, seqlen=T)
    return pl.pallas_call(
        kernel,
        grid=(dv // BV, B, Hv),
        in_specs=[
            pl.BlockSpec((None, T, None, dk), lambda j, b, h: (b, 0, lax.div(h, n), 0)),
            pl.BlockSpec((None, T, None, dk), lambda j, b, h: (b, 0, lax.div(h, n), 0)),
            pl.BlockSpec((None, T, None, BV), lambda j, b, h: (b, 0, h, j)),
            pl.BlockSpec((None, T, None), lambda j, b, h: (b, 0, h)),
            pl.BlockSpec((None, T, None), lambda j, b, h: (b, 0, h)),
            pl.BlockSpec((None, 1), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, None, dk, BV), lambda j, b, h: (b, h, 0, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, T, None, BV), lambda j, b, h: (b, 0, h, j)),
            pl.BlockSpec((None, None, dk, BV), lambda j, b, h: (b, h, 0, j)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, T, Hv, dv), v.dtype),
            jax.ShapeDtypeStruct((B, Hv, dk, dv), jnp.float32),
        ],
        input_output_aliases={6: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gdn_decode",
    )(q, k, v, g.astype(jnp.float32), beta.astype(jnp.float32), live, state.astype(jnp.float32))
