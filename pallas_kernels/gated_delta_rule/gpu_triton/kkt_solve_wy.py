"""Stages "kkt", "solve" and "wy", fused: one program per (chunk, batch, value head).

For a chunk of C tokens with cumulative log decay G (chunk-local cumsum of g):
  A = strictly_lower(beta_i k_i . k_j exp(G_i - G_j))     [C, C]  float32   ("kkt")
  T = (I + A)^-1                                          [C, C]  float32   ("solve", blocked)
  w = T (beta exp(G) k),   u = T (beta v)                 [C, dk], [C, dv]  ("wy")
w and u (and T, for the backward) are written in the compute dtype (the dtype of k; the forward's
own w and u use T rounded to it; FLA stores its inverse so too).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule import kernel_math as km

SUB_CHUNK = 16  # tokens per diagonal block of the blocked solve (the smallest Triton dot tile)


def _kernel(
    k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref, *t_ref, sub, use_qk_l2norm, solve_precision
):
    # k_ref [C, dk]; v_ref [C, dv]; g_ref, beta_ref [C]; w_ref [C, dk]; u_ref [C, dv];
    # t_ref (when the inverse is asked for) [C, C] (compute dtype).
    # Blocked over sub-chunks of `sub` tokens (index i, j, m < nb = C / sub): T is block lower
    # triangular, T_ii = (I + A_ii)^-1 (doubling on sub x sub) and, for j < i,
    #   T_ij = -T_ii sum_{m=j}^{i-1} A_im T_mj          (block forward substitution)
    # so the solve costs O(nb^3 sub^3) instead of the log2(C) full C x C products of
    # km.solve_unit_lower, and w_i = sum_{j<=i} T_ij kb_j, u_i = sum_{j<=i} T_ij vb_j skip the
    # zero blocks of T.
    cdt = k_ref.dtype
    nb = k_ref.shape[0] // sub
    rows = [pl.ds(i * sub, sub) for i in range(nb)]
    kc, kb, vb, G, beta = [], [], [], [], []
    for sl in rows:
        k = k_ref[sl, :].astype(jnp.float32)
        if use_qk_l2norm:
            k = km.l2norm(k)
        G.append(g_ref[sl].astype(jnp.float32))
        beta.append(beta_ref[sl].astype(jnp.float32))
        kc.append(k.astype(cdt))
        kb.append((k * (beta[-1] * jnp.exp(G[-1]))[:, None]).astype(cdt))
        vb.append((v_ref[sl, :].astype(jnp.float32) * beta[-1][:, None]).astype(cdt))

    def mm(a, b):
        return km.dot(a, b, precision=solve_precision)

    T = {}
    for i in range(nb):
        # A_im = beta_i k_i k_m^T exp(G_i - G_m): strictly lower inside the diagonal block.
        A = {
            m: km.dot(kc[i], kc[m], trans_b=True)
            * beta[i][:, None]
            * jnp.exp(G[i][:, None] - G[m][None, :])
            for m in range(i)
        }
        A_ii = km.decayed_scores(kc[i], kc[i], G[i], strict=True) * beta[i][:, None]
        T[i, i] = km.solve_unit_lower(A_ii, precision=solve_precision)
        for j in range(i - 1, -1, -1):
            acc = mm(A[j], T[j, j])
            for m in range(j + 1, i):
                acc = acc + mm(A[m], T[m, j])
            T[i, j] = -mm(T[i, i], acc)
        Tc = [T[i, j].astype(cdt) for j in range(i + 1)]
        w = km.dot(Tc[0], kb[0])
        u = km.dot(Tc[0], vb[0])
        for j in range(1, i + 1):
            w = w + km.dot(Tc[j], kb[j])
            u = u + km.dot(Tc[j], vb[j])
        w_ref[rows[i], :] = w.astype(w_ref.dtype)
        u_ref[rows[i], :] = u.astype(u_ref.dtype)
        if t_ref:  # row block i of T, zeros above the diagonal block
            for j in range(nb):
                T_ij = Tc[j] if j <= i else jnp.zeros((sub, sub), cdt)
                t_ref[0][rows[i], rows[j]] = T_ij


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
    return_inverse: bool = False,
    interpret: bool = False,
):
    """w, u of the WY form for every chunk (and T = (I + A)^-1, for the backward).

    Args:
      k: [B, Tp, Hk, dk] (Tp a multiple of chunk_size); its dtype is the compute dtype.
      v: [B, Tp, Hv, dv].
      G: [B, Tp, Hv] float32, chunk-local cumulative sum of g.
      beta: [B, Tp, Hv] float32.
    Returns:
      w [B, Tp, Hv, dk], u [B, Tp, Hv, dv], both in k.dtype; with return_inverse also T
      [B, Tp, Hv, C] in k.dtype (row t of chunk c: row t - cC of that chunk's (I + A)^-1).
    """
    B, Tp, Hk, dk = k.shape
    Hv, dv = v.shape[2], v.shape[3]
    C = chunk_size
    n = Hv // Hk
    kernel = functools.partial(
        _kernel,
        sub=min(SUB_CHUNK, C),
        use_qk_l2norm=use_qk_l2norm,
        solve_precision=solve_precision,
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
        ]
        + [pl.BlockSpec((None, C, None, C), lambda c, b, h: (b, c, h, 0))] * return_inverse,
        out_shape=[
            jax.ShapeDtypeStruct((B, Tp, Hv, dk), k.dtype),
            jax.ShapeDtypeStruct((B, Tp, Hv, dv), k.dtype),
        ]
        + [jax.ShapeDtypeStruct((B, Tp, Hv, C), k.dtype)] * return_inverse,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gdn_chunk_kkt_solve_wy",
    )(k, v, G, beta)
