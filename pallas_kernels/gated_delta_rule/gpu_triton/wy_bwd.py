"""Backward of stages "kkt", "solve" and "wy" (the WY/UT representation), one chunk per program.

The forward (kkt_solve_wy.py, whose T the recompute of bwd.py hands over) builds, with
Gamma_ij = exp(G_i - G_j) on j < i,
  kkd = strictly_lower(k k^T Gamma),  A = diag(beta) kkd,  T = (I + A)^-1,
  kb = beta exp(G) k,  vb = beta v,  w = T kb,  u = T vb.
From du (= the total gradient of v_new: v_new = u - w S, with S the state at the chunk start)
and dw = -du S^T:
  dT  = dw kb^T + du vb^T,   dkb = T^T dw,   dvb = T^T du
  dA  = -T^T dT T^T (strictly lower part)                 [d(M^-1) = -M^-1 dM M^-1]
  dk  = beta exp(G) dkb + dK K + dK^T K,  dK = diag(beta) dA * Gamma   (d(k k^T), strictly lower)
  dv  = beta dvb
  dbeta = rowsum(dkb * k exp(G)) + rowsum(dvb * v) + rowsum(dA * kkd)
  dG  = rowsum(dkb * kb) + rowsum(dA * A) - colsum(dA * A)
(the math: kernel_math.wy_bwd_values then wy_bwd_keys, whose composition wy_bwd the TPU backward
uses). dk and dG are added to the partial
gradients of stage "dqkwg" (aliased in place).
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
    k_ref,
    v_ref,
    g_ref,
    beta_ref,
    t_ref,
    h_ref,
    du_ref,
    dk_in_ref,
    dg_in_ref,
    dk_ref,
    dv_ref,
    dbeta_ref,
    dg_ref,
    *,
    solve_precision,
):
    # k_ref [C, dk]; v_ref [C, dv]; g_ref, beta_ref [C]; t_ref [C, C] (the forward's (I + A)^-1,
    # compute dtype); h_ref [dk, dv] (the state at the chunk start); du_ref [C, dv];
    # dk_in_ref, dk_ref [C, dk] (compute dtype); dg_in_ref, dg_ref, dbeta_ref [C] float32;
    # dv_ref [C, dv].
    G = g_ref[...].astype(jnp.float32)
    beta = beta_ref[...].astype(jnp.float32)[:, None]
    T = t_ref[...].astype(jnp.float32)
    du = du_ref[...]
    dw = (-km.dot(du, h_ref[...], trans_b=True)).astype(du.dtype)  # [C, dk]
    dT_v, dv, dbeta_v = km.wy_bwd_values(v_ref[...], beta, T, du)
    dv_ref[...] = dv.astype(dv_ref.dtype)  # stored before the key half: fewer live [C, dv] tiles
    dk, dbeta_k, dG = km.wy_bwd_keys(
        k_ref[...], G[:, None], G[None, :], beta, T, dw, dT_v, precision=solve_precision
    )
    dk_ref[...] = (dk_in_ref[...].astype(jnp.float32) + dk).astype(dk_ref.dtype)
    dbeta_ref[...] = jnp.sum(dbeta_v + dbeta_k, axis=1)  # [C, 1] -> [C]
    dg_ref[...] = dg_in_ref[...] + jnp.sum(dG, axis=1)


def chunk_bwd_wy(
    k: jax.Array,
    v: jax.Array,
    G: jax.Array,
    beta: jax.Array,
    inverse: jax.Array,
    h: jax.Array,
    du: jax.Array,
    dk: jax.Array,
    dG: jax.Array,
    *,
    chunk_size: int = 64,
    solve_precision=km.HIGHEST,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Gradients through w = T (beta exp(G) k) and u = T (beta v), T from the forward (and
    through w's use in v_new = u - w S: dw = -du S^T).

    Args:
      k: [B, Tp, Hk, dk] (compute dtype, L2-normalised already if asked); v: [B, Tp, Hv, dv].
      G, beta: [B, Tp, Hv] float32; inverse: [B, Tp, Hv, C], each chunk's T (from
        ``chunk_kkt_solve_wy(..., return_inverse=True)``); h: [B, NC, Hv, dk, dv], the states at
        the chunk starts; du: [B, Tp, Hv, dv] (compute dtype), the total d(v_new).
      dk: [B, Tp, Hv, dk] (compute dtype), dG: [B, Tp, Hv] float32: the partial gradients of
        the other paths (stage "dqkwg"), updated in place (the sum is made in float32).
    Returns:
      dk [B, Tp, Hv, dk] (per value head, the dtype of the dk argument), dv [B, Tp, Hv, dv]
      (the dtype of v), dbeta [B, Tp, Hv] float32, dG [B, Tp, Hv] float32.
    """
    B, Tp, Hk, dkd = k.shape
    Hv, dvd = v.shape[2], v.shape[3]
    C = chunk_size
    n = Hv // Hk
    key_spec = pl.BlockSpec((None, C, None, dkd), lambda c, b, h: (b, c, lax.div(h, n), 0))
    dk_spec = pl.BlockSpec((None, C, None, dkd), lambda c, b, h: (b, c, h, 0))
    val_spec = pl.BlockSpec((None, C, None, dvd), lambda c, b, h: (b, c, h, 0))
    g_spec = pl.BlockSpec((None, C, None), lambda c, b, h: (b, c, h))
    t_spec = pl.BlockSpec((None, C, None, C), lambda c, b, h: (b, c, h, 0))
    h_spec = pl.BlockSpec((None, None, None, dkd, dvd), lambda c, b, h: (b, c, h, 0, 0))
    return pl.pallas_call(
        functools.partial(_kernel, solve_precision=solve_precision),
        grid=(Tp // C, B, Hv),
        in_specs=[key_spec, val_spec, g_spec, g_spec, t_spec, h_spec, val_spec, dk_spec, g_spec],
        out_specs=[dk_spec, val_spec, g_spec, g_spec],
        out_shape=[
            jax.ShapeDtypeStruct((B, Tp, Hv, dkd), dk.dtype),
            jax.ShapeDtypeStruct((B, Tp, Hv, dvd), v.dtype),
            jax.ShapeDtypeStruct((B, Tp, Hv), jnp.float32),
            jax.ShapeDtypeStruct((B, Tp, Hv), jnp.float32),
        ],
        input_output_aliases={7: 0, 8: 3},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gdn_chunk_bwd_wy",
    )(k, v, G, beta, inverse, h, du, dk, dG)
