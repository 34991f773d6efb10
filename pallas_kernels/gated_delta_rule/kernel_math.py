"""In-kernel building blocks shared by the Pallas kernels (Triton GPU and Mosaic TPU).

These functions operate on values already loaded from refs (small 1-D/2-D tiles) and use only
primitives that both Pallas lowerings support: dot_general (2-D, no batch dims), iota, where,
exp, reductions and elementwise arithmetic. No value slicing, so they also lower to Triton.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST
DEFAULT = lax.Precision.DEFAULT
# Three TF32 products per float32 product (a = a_hi + a_lo; a_hi b_hi + a_hi b_lo + a_lo b_hi):
# about float32's accuracy on the tensor cores.
TF32X3 = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
_F32_DOTS = contextvars.ContextVar("gdn_f32_dots", default=HIGHEST)


@contextlib.contextmanager
def f32_dots(precision):
    """Within it, kernels traced take ``precision`` for their float32 matmuls (mm_precision).
    The compiled Triton stages use TF32X3 (gpu_triton.fwd.compiled_f32_dots): with exact
    float32 (IEEE, FMA loops) one backward stage took over 240 s to compile on an H200."""
    token = _F32_DOTS.set(precision)
    try:
        yield
    finally:
        _F32_DOTS.reset(token)


def mm_precision(dtype):
    """float32 operands: exact float32 (HIGHEST; IEEE on Triton, never plain TF32), or what
    ``f32_dots`` set; bf16/f16: the native MMA."""
    return _F32_DOTS.get() if jnp.dtype(dtype) == jnp.float32 else DEFAULT


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False, precision=None):
    """a @ b (with optional transposes) accumulated in float32. a, b 2-D of one dtype."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    if precision is None:
        precision = mm_precision(a.dtype)
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def inv_l2norm(x, eps: float = 1e-6):
    """rsqrt(sum x^2 + eps) of each row of x [n, d], as [n, 1] float32."""
    x = x.astype(jnp.float32)
    return lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + eps)


def l2norm(x, eps: float = 1e-6):
    """Rows of x [n, d] scaled to unit L2 norm: x * rsqrt(sum x^2 + eps), in float32."""
    return x.astype(jnp.float32) * inv_l2norm(x, eps)


def iotas(n: int, m: int | None = None):
    m = n if m is None else m
    return (lax.broadcasted_iota(jnp.int32, (n, m), 0), lax.broadcasted_iota(jnp.int32, (n, m), 1))


def pick_last(x):
    """x[-1] of a 1-D value, without slicing (a masked sum)."""
    n = x.shape[0]
    return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (n,), 0) == n - 1, x, 0.0))


def total(x):
    """sum(x) of a 2-D value as [1, 1], one axis at a time (Triton lowers single-axis
    reductions only, under an explicit mesh)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def pick_last_of_row(x):
    """x[0, -1] of a [1, n] value as [1, 1], without slicing (a masked sum)."""
    n = x.shape[1]
    last = lax.broadcasted_iota(jnp.int32, (1, n), 1) == n - 1
    return jnp.sum(jnp.where(last, x, 0.0), axis=1, keepdims=True)


def decay_matrix(G_col, G_row, *, strict: bool):
    """exp(G_i - G_j) for j < i (strict) or j <= i, else 0. G_col [C, 1], G_row [1, C] float32.

    Returns [C, C] float32. (Both layouts are passed so that no transpose is needed in-kernel.)
    """
    C = G_col.shape[0]
    row, col = iotas(C)
    mask = (col < row) if strict else (col <= row)
    diff = G_col - G_row
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def decayed_scores(a, b, G, *, strict: bool):
    """(a b^T)_ij exp(G_i - G_j) on j < i (strict) or j <= i, else 0.

    a, b [C, d] of one dtype (the matmul operands); G [C] float32. Returns [C, C] float32: the
    k k^T of stage "kkt" (strict) and the q k^T of stage "o" (inclusive).
    """
    return dot(a, b, trans_b=True) * decay_matrix(G[:, None], G[None, :], strict=strict)


def col_from_row(x):
    """[1, C] -> [C, 1] without a transpose (the masked row sums of diag(x)); float32."""
    row, col = iotas(x.shape[1])
    return jnp.sum(jnp.where(row == col, x, 0.0), axis=1, keepdims=True)


def row_minus_col_sums(M):
    """sum_j M_ij - sum_j M_ji, [C, 1] float32 for M [C, C]: the gradient w.r.t. G of sum(dX * X)
    when X_ij carries the factor exp(G_i - G_j) (M = dX * X)."""
    return jnp.sum(M, axis=1, keepdims=True) - col_from_row(jnp.sum(M, axis=0, keepdims=True))


def solve_unit_lower(A, *, precision=HIGHEST):
    """(I + A)^-1 for strictly lower A [C, C] float32 (C a power of two), by doubling.

    Level s (s = 1, 2, 4, ... C/2) turns the block-diagonal inverse with blocks of size s into the
    one with blocks of size 2s: with L_s = A restricted to pairs in the same 2s-block but different
    s-blocks (L_s T_s L_s = 0), (D + L_s)^-1 = T_s - T_s L_s T_s. The first level is elementwise
    (T_1 = I, so T_2 = I - L_1), the others take 2 matmuls each: 2 (log2(C) - 1) in all; as
    stable as blocked forward substitution, with no row-sequential loop.
    """
    C = A.shape[0]
    row, col = iotas(C)
    pair = (row == col + 1) & ((row & 1) == 1)  # (2m + 1, 2m): L_1's entries
    T = jnp.where(row == col, 1.0, 0.0) - jnp.where(pair, A, 0.0).astype(jnp.float32)
    s = 2
    while s < C:
        same2 = (row & -(2 * s)) == (col & -(2 * s))  # same block of size 2s
        diff1 = (row & -s) != (col & -s)  # different blocks of size s
        L = jnp.where(same2 & diff1, A, 0.0)
        T = T - dot(dot(T, L, precision=precision), T, precision=precision)
        s *= 2
    return T


# --------------------------------------------------------------------------------------------
# Backward of one chunk (shared by gpu_triton/ and tpu/). Vectors over the chunk's tokens are
# columns [C, 1] (G_col, beta_col, d(G), d(beta)); G_row [1, C] is G as a row. Matmul operands
# in the compute dtype (that of q, k, w, dO), accumulation and the returned gradients float32.
# --------------------------------------------------------------------------------------------


def wy_repr(kc, v, G_col, G_row, beta_col, *, precision=HIGHEST):
    """Stages "kkt", "solve", "wy" of one chunk: T = (I + A)^-1, w = T (beta exp(G) k),
    u = T (beta v), with A = strictly_lower(beta k k^T exp(G_i - G_j)).

    kc [C, dk] (compute dtype); v [C, dv] (any dtype). Returns T [C, C], w [C, dk], u [C, dv],
    float32.
    """
    cdt = kc.dtype
    A = dot(kc, kc, trans_b=True) * beta_col * decay_matrix(G_col, G_row, strict=True)
    T = solve_unit_lower(A, precision=precision)
    Tc = T.astype(cdt)
    w = dot(Tc, (kc.astype(jnp.float32) * (beta_col * jnp.exp(G_col))).astype(cdt))
    u = dot(Tc, (v.astype(jnp.float32) * beta_col).astype(cdt))
    return T, w, u


def dv_local(q, k, G_col, G_row, do, *, scale):
    """The part of d(v_new) [C, BV] from the outputs of the same chunk: scale P^T dO with
    P = lower_incl(q k^T exp(G_i - G_j)). q, k [C, dk] (q unscaled), do [C, BV]."""
    P = dot(q, k, trans_b=True) * (scale * decay_matrix(G_col, G_row, strict=False))
    return dot(P.astype(do.dtype), do, trans_a=True)


def dstate_step(q, k, w, G_col, g_last, do, dvl, dS, *, scale):
    """One chunk of the reverse state pass, from dS = d(state at the chunk end) [dk, BV] float32:
      dv_new = dvl + kd dS,  kd = k exp(g_last - G)                       (total d(v_new))
      dS'    = exp(g_last) dS + scale (q exp(G))^T dO - w^T dv_new       (d(state at its start))
    q, k, w [C, dk]; do [C, BV]; dvl [C, BV] (``dv_local``; any float dtype). Returns (dv_new, dS').
    The row factors exp(g_last - G) and scale exp(G) scale the [C, BV] operands, not q and k
    [C, dk]: the pass over chunks is serial, and that is less elementwise work on it."""
    cdt = w.dtype
    dv_new = dvl.astype(jnp.float32) + jnp.exp(g_last - G_col) * dot(k.astype(cdt), dS.astype(cdt))
    dog = (do.astype(jnp.float32) * (scale * jnp.exp(G_col))).astype(cdt)
    dS = (
        dS * jnp.exp(g_last)
        + dot(q.astype(cdt), dog, trans_a=True)
        - dot(w, dv_new.astype(cdt), trans_a=True)
    )
    return dv_new, dS


def qk_bwd(q, k, G_col, G_row, do_s, vn_ds, do_vn, s_ds, *, scale):
    """d(q), d(k), d(G) of one chunk through the states and the intra-chunk attention.

    With S the state at the chunk start, dS the gradient of the state at its end and
    O = scale [(q S) exp(G) + P v_new], S' = exp(G_last) S + kd^T v_new (kd = k exp(G_last - G)):
      dP = scale (dO v_new^T) exp(G_i - G_j) on j <= i
      dq = scale exp(G) (dO S^T) + dP k;   dk = dP^T q + exp(G_last - G) (v_new dS^T)
      dG = rowsum(dq_state q) + rowsum(M) - colsum(M) - rowsum(dk_state k)
           + [i = C-1] (exp(G_last) sum(S dS) + sum(dk_state k)),   M = dP * q k^T
    (dq_state, dk_state the first terms of dq, dk; the w/A paths are ``wy_bwd``'s).
    Args: q, k [C, dk] (q unscaled); do_s = dO S^T, vn_ds = v_new dS^T [C, dk] float32;
      do_vn = dO v_new^T [C, C] float32; s_ds = sum(S * dS) (a scalar or [1, 1]).
    Returns dq [C, dk], dk [C, dk], dG [C, 1], float32.
    """
    g_last = pick_last_of_row(G_row)
    dq_state = do_s * (scale * jnp.exp(G_col))
    dk_state = vn_ds * jnp.exp(g_last - G_col)
    dP = do_vn * (scale * decay_matrix(G_col, G_row, strict=False))  # d(q k^T)
    M = dP * dot(q, k, trans_b=True)
    dPc = dP.astype(q.dtype)
    dq = dq_state + dot(dPc, k)
    dk = dk_state + dot(dPc, q, trans_a=True)
    dk_state_k = jnp.sum(dk_state * k.astype(jnp.float32), axis=1, keepdims=True)  # [C, 1]
    d_glast = jnp.exp(g_last) * s_ds + total(dk_state_k)
    last = lax.broadcasted_iota(jnp.int32, G_col.shape, 0) == G_col.shape[0] - 1
    dG = (
        jnp.sum(dq_state * q.astype(jnp.float32), axis=1, keepdims=True)
        + row_minus_col_sums(M)
        - dk_state_k
        + jnp.where(last, d_glast, 0.0)
    )
    return dq, dk, dG


def wy_bwd_values(v, beta_col, T, du):
    """The value half of ``wy_bwd`` (u = T vb, vb = beta v): du vb^T (its part of dT), dv = beta
    T^T du and rowsum(T^T du * v) (its part of dbeta). v [C, dv]; T [C, C] float32; du [C, dv]
    (compute dtype). Returns dT_v [C, C], dv [C, dv], dbeta_v [C, 1], float32. Done first so that
    a kernel can store dv before the key half, and hold fewer [C, dv] values at once."""
    cdt = du.dtype
    v = v.astype(jnp.float32)
    dT_v = dot(du, (v * beta_col).astype(cdt), trans_b=True)
    dvb = dot(T.astype(cdt), du, trans_a=True)  # [C, dv]
    return dT_v, dvb * beta_col, jnp.sum(dvb * v, axis=1, keepdims=True)


def wy_bwd_keys(kc, G_col, G_row, beta_col, T, dw, dT_v, *, precision=HIGHEST):
    """The key half of ``wy_bwd`` given dT_v = du vb^T from ``wy_bwd_values``. kc [C, dk]
    (compute dtype); T [C, C] float32; dw [C, dk] (compute dtype). Returns dk [C, dk],
    dbeta_k [C, 1] (the rest of dbeta), dG [C, 1], float32."""
    cdt = kc.dtype
    k = kc.astype(jnp.float32)
    kkd = dot(kc, kc, trans_b=True) * decay_matrix(G_col, G_row, strict=True)
    kb = k * (beta_col * jnp.exp(G_col))
    dT = dot(dw, kb.astype(cdt), trans_b=True) + dT_v
    dkb = dot(T.astype(cdt), dw, trans_a=True)  # [C, dk]
    # dA = -T^T dT T^T: for float32 inputs (or precision HIGHEST) in float32 like the solve; else
    # on compute-dtype operands, as FLA's prepare_wy_repr_bwd does (on an H200 at 8 x 4096, bf16,
    # the GPU stage took 1.07 ms against 1.58 with TF32 operands, and d(q), d(k), d(v) kept their
    # error against the float32 reference: 4.4e-3 / 4.7e-3 / 5.0e-3 against 4.4e-3 / 4.7e-3 /
    # 4.8e-3). kkd is 0 off the strict lower triangle, so multiplying by it keeps only the
    # strictly lower part of dA.
    if precision == HIGHEST or cdt == jnp.float32:
        dA = -dot(
            dot(T, dT, trans_a=True, precision=precision), T, trans_b=True, precision=precision
        )
    else:
        Tc = T.astype(cdt)
        dA = -dot(dot(Tc, dT.astype(cdt), trans_a=True).astype(cdt), Tc, trans_b=True)
    dAk = dA * kkd  # [C, C]
    dkk = (dA * beta_col * decay_matrix(G_col, G_row, strict=True)).astype(cdt)
    dk = dkb * (beta_col * jnp.exp(G_col)) + dot(dkk, kc) + dot(dkk, kc, trans_a=True)
    dbeta_k = jnp.sum(dkb * k, axis=1, keepdims=True) * jnp.exp(G_col) + jnp.sum(
        dAk, axis=1, keepdims=True
    )
    dG = jnp.sum(dkb * kb, axis=1, keepdims=True) + row_minus_col_sums(dAk * beta_col)
    return dk, dbeta_k, dG


def wy_bwd(kc, v, G_col, G_row, beta_col, T, dw, du, *, precision=HIGHEST):
    """Gradients through w = T kb, u = T vb (``wy_repr``; kb = beta exp(G) k, vb = beta v):
      dT = dw kb^T + du vb^T,  dkb = T^T dw,  dvb = T^T du,  dA = -T^T dT T^T (strictly lower)
      dk = beta exp(G) dkb + dK k + dK^T k,  dK = diag(beta) dA * Gamma  (Gamma_ij = exp(G_i - G_j))
      dv = beta dvb
      dbeta = rowsum(dkb * k exp(G)) + rowsum(dvb * v) + rowsum(dA * kkd)   (kkd = k k^T Gamma)
      dG = rowsum(dkb * kb) + rowsum(dA * A) - colsum(dA * A)
    (``wy_bwd_values`` then ``wy_bwd_keys``.)
    Args: kc [C, dk] (compute dtype); v [C, dv]; T [C, C] float32; dw [C, dk], du [C, dv] (compute
      dtype; du = the total d(v_new)). Returns dk [C, dk], dv [C, dv], dbeta [C, 1], dG [C, 1],
      float32.
    """
    dT_v, dv, dbeta_v = wy_bwd_values(v, beta_col, T, du)
    dk, dbeta_k, dG = wy_bwd_keys(kc, G_col, G_row, beta_col, T, dw, dT_v, precision=precision)
    return dk, dv, dbeta_v + dbeta_k, dG
