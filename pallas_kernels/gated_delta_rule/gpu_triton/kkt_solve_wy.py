"""Stages "kkt", "solve" and "wy", fused: one program per (chunk, batch, value head).

For a chunk of C tokens with cumulative log decay G (chunk-local cumsum of g):
  A = strictly_lower(beta_i k_i . k_j exp(G_i - G_j))     [C, C]  float32   ("kkt")
  T = (I + A)^-1                                          [C, C]  float32   ("solve", doubling)
  w = T (beta exp(G) k),   u = T (beta v)                 [C, dk], [C, dv]  ("wy")
w and u are written in the compute dtype (the dtype of k).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule import kernel_math as km


def wy_factors(k, v, G, beta, *, cdt, solve_precision):
    """In-kernel: the WY factors of one chunk (also recomputed by the backward, wy_bwd.py).

    k [C, dk] float32 (L2-normalised already if asked), v [C, dv], G, beta [C], all float32; cdt
    the dtype of the k k^T operands. Returns float32: kkd = strictly_lower(k k^T exp(G_i - G_j))
    [C, C], T = (I + diag(beta) kkd)^-1 [C, C], kb = beta exp(G) k [C, dk], vb = beta v [C, dv].
    """
    kc = k.astype(cdt)
    kkd = km.decayed_scores(kc, kc, G, strict=True)
    T = km.solve_unit_lower(kkd * beta[:, None], precision=solve_precision)
    return kkd, T, k * (beta * jnp.exp(G))[:, None], v * beta[:, None]


def _kernel(k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref, *, use_qk_l2norm, solve_precision):
    # k_ref [C, dk]; v_ref [C, dv]; g_ref, beta_ref [C]; w_ref [C, dk]; u_ref [C, dv].
    cdt = k_ref.dtype
    k = k_ref[...].astype(jnp.float32)
    if use_qk_l2norm:
        k = km.l2norm(k)
    _, T, kb, vb = wy_factors(
        k,
        v_ref[...].astype(jnp.float32),
        g_ref[...].astype(jnp.float32),
        beta_ref[...].astype(jnp.float32),
        cdt=cdt,
        solve_precision=solve_precision,
    )
    T = T.astype(cdt)
    w_ref[...] = km.dot(T, kb.astype(cdt)).astype(w_ref.dtype)
    u_ref[...] = km.dot(T, vb.astype(cdt)).astype(u_ref.dtype)


def chunk_kkt_solve_wy(
    k: jax.Array,
    v: jax.Array,
    G: jax.Array,
    beta: jax.Array,
    *,
    chunk_size: int = 64,
    use_qk_l2norm: bool = False,
    solve_precision=km.HIGHEST,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """w, u of the WY form for every chunk.

    Args:
      k: [B, Tp, Hk, dk] (Tp a multiple of chunk_size); its dtype is the compute dtype.
      v: [B, Tp, Hv, dv].
      G: [B, Tp, Hv] float32, chunk-local cumulative sum of g.
      beta: [B, Tp, Hv] float32.
    Returns:
      w [B, Tp, Hv, dk], u [B, Tp, Hv, dv], both in k.dtype.
    """
    B, Tp, Hk, dk = k.shape
    Hv, dv = v.shape[2], v.shape[3]
    C = chunk_size
    n = Hv // Hk
    kernel = functools.partial(
        _kernel, use_qk_l2norm=use_qk_l2norm, solve_precision=solve_precision
    )
    return pl.pallas_call(
        kernel,
        grid=(Tp // C, B, Hv),
        in_specs=[
            pl.BlockSpec((None, C, None, dk), lambda c, b, h: (b, c, lax.div(h, n), 0)),
            pl.BlockSpec((None, C, None, dv), lambda c, b, h: (b, c, h, 0)),
            pl.BlockSpec((None, C, None), lambda c, b, h: (b, c, h)),
            pl.BlockSpec((None, C, None), lambda c, b, h: (b, c, h)),
        ],
        out_specs=[
            pl.BlockSpec((None, C, None, dk), lambda c, b, h: (b, c, h, 0)),
            pl.BlockSpec((None, C, None, dv), lambda c, b, h: (b, c, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, Tp, Hv, dk), k.dtype),
            jax.ShapeDtypeStruct((B, Tp, Hv, dv), k.dtype),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gdn_chunk_kkt_solve_wy",
    )(k, v, G, beta)
