"""Decode on TPU: the recurrent gated delta rule for a few new tokens of a batch of states.

Grid (B, Hv); each program holds the float32 state S [dk, dv] of one (row, value head) in VMEM
and applies, for each new token (T small, unrolled), with VPU elementwise math in float32:
  S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = scale S^T q_t
q/k come in as columns [dk, 1] and v as rows [1, dv], so no in-kernel transpose is needed.
The state is aliased input -> output; rows whose ``live`` flag is 0 keep their state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    g_ref,
    b_ref,
    live_ref,
    s_ref,
    o_ref,
    s_out_ref,
    *,
    scale,
    use_qk_l2norm,
    seqlen,
):
    # q_ref, k_ref [T, dk, 1]; v_ref [T, 1, dv]; g_ref, b_ref [T, 1, 1]; live_ref [1, 1];
    # s_ref, s_out_ref [dk, dv] float32; o_ref [T, 1, dv].
    S0 = s_ref[...].astype(jnp.float32)
    S = S0
    live = live_ref[...] != 0  # [1, 1]
    for t in range(seqlen):
        q = q_ref[t].astype(jnp.float32)  # [dk, 1]
        k = k_ref[t].astype(jnp.float32)
        if use_qk_l2norm:
            q = q * lax.rsqrt(jnp.sum(q * q, axis=0, keepdims=True) + 1e-6)
            k = k * lax.rsqrt(jnp.sum(k * k, axis=0, keepdims=True) + 1e-6)
        v = v_ref[t].astype(jnp.float32)  # [1, dv]
        g = g_ref[t].astype(jnp.float32)  # [1, 1]
        b = b_ref[t].astype(jnp.float32)
        S = S * jnp.exp(g)
        kS = jnp.sum(k * S, axis=0, keepdims=True)  # [1, dv]
        S = S + k * (b * (v - kS))
        o = jnp.sum((q * scale) * S, axis=0, keepdims=True)  # [1, dv]
        o_ref[t] = jnp.where(live, o, 0.0).astype(o_ref.dtype)
    s_out_ref[...] = jnp.where(live, S, S0).astype(s_out_ref.dtype)


def gated_delta_rule_decode_tpu(
    q,
    k,
    v,
    g,
    beta,
    state,
    live=None,
    *,
    scale: float,
    use_qk_l2norm: bool = False,
    interpret=False,
):
    """Decode step(s) on TPU.

    Args:
      q, k: [B, T, Hk, dk]; v: [B, T, Hv, dv]; g, beta: [B, T, Hv]; state: [B, Hv, dk, dv]
      float32 (aliased to the returned state); live: [B] bool/int or None (all live).
    Returns:
      o [B, T, Hv, dv] in v.dtype, new_state [B, Hv, dk, dv] float32.
    """

    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2], v.shape[3]
    n = Hv // Hk
    if interpret is True:
        interpret = pltpu.InterpretParams()
    if live is None:
        live = jnp.ones((B,), jnp.int32)
    live = live.astype(jnp.int32).reshape(B, 1, 1)
    qc = jnp.moveaxis(q, 2, 1)[..., None]  # [B, Hk, T, dk, 1]
    kc = jnp.moveaxis(k, 2, 1)[..., None]
    vr = jnp.moveaxis(v, 2, 1)[:, :, :, None, :]  # [B, Hv, T, 1, dv]
    gs = jnp.moveaxis(g.astype(jnp.float32), 2, 1)[..., None, None]  # [B, Hv, T, 1, 1]
    bs = jnp.moveaxis(beta.astype(jnp.float32), 2, 1)[..., None, None]
    kernel = functools.partial(_kernel, scale=scale, use_qk_l2norm=use_qk_l2norm, seqlen=T)
    o, new_state = pl.pallas_call(
        kernel,
        grid=(B, Hv),
        in_specs=[
            pl.BlockSpec((None, None, T, dk, 1), lambda b, h: (b, lax.div(h, n), 0, 0, 0)),
            pl.BlockSpec((None, None, T, dk, 1), lambda b, h: (b, lax.div(h, n), 0, 0, 0)),
            pl.BlockSpec((None, None, T, 1, dv), lambda b, h: (b, h, 0, 0, 0)),
            pl.BlockSpec((None, None, T, 1, 1), lambda b, h: (b, h, 0, 0, 0)),
            pl.BlockSpec((None, None, T, 1, 1), lambda b, h: (b, h, 0, 0, 0)),
            pl.BlockSpec((None, 1, 1), lambda b, h: (b, 0, 0)),
            pl.BlockSpec((None, None, dk, dv), lambda b, h: (b, h, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, T, 1, dv), lambda b, h: (b, h, 0, 0, 0)),
            pl.BlockSpec((None, None, dk, dv), lambda b, h: (b, h, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, Hv, T, 1, dv), v.dtype),
            jax.ShapeDtypeStruct((B, Hv, dk, dv), jnp.float32),
        ],
        input_output_aliases={6: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="gdn_decode_tpu",
    )(qc, kc, vr, gs, bs, live, state.astype(jnp.float32))
    return jnp.moveaxis(o[:, :, :, 0, :], 1, 2), new_state
