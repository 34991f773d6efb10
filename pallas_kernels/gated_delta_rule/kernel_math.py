"""In-kernel building blocks shared by the Pallas kernels (Triton GPU and Mosaic TPU).

These functions operate on values already loaded from refs (small 1-D/2-D tiles) and use only
primitives that both Pallas lowerings support: dot_general (2-D, no batch dims), iota, where,
exp, reductions and elementwise arithmetic. No value slicing, so they also lower to Triton.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST
DEFAULT = lax.Precision.DEFAULT


def mm_precision(dtype) -> lax.Precision:
    """float32 operands: exact float32 (IEEE on Triton, not TF32); bf16/f16: the native MMA."""
    return HIGHEST if jnp.dtype(dtype) == jnp.float32 else DEFAULT


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False, precision=None):
    """a @ b (with optional transposes) accumulated in float32. a, b 2-D of one dtype."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    if precision is None:
        precision = mm_precision(a.dtype)
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def l2norm(x, eps: float = 1e-6):
    """Rows of x [n, d] scaled to unit L2 norm: x * rsqrt(sum x^2 + eps), in float32."""
    x = x.astype(jnp.float32)
    return x * lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + eps)


def iotas(n: int, m: int | None = None):
    m = n if m is None else m
    return (lax.broadcasted_iota(jnp.int32, (n, m), 0), lax.broadcasted_iota(jnp.int32, (n, m), 1))


def pick_last(x):
    """x[-1] of a 1-D value, without slicing (a masked sum)."""
    n = x.shape[0]
    return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (n,), 0) == n - 1, x, 0.0))


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
    k k^T of stage "kkt" (strict) and the q k^T of stage "o" and its backward (inclusive).
    """
    return dot(a, b, trans_b=True) * decay_matrix(G[:, None], G[None, :], strict=strict)


def row_minus_col_sums(M):
    """sum_j M_ij - sum_j M_ji, [C] float32 for M [C, C]: the gradient w.r.t. G of sum(dX * X)
    when X_ij carries the factor exp(G_i - G_j) (M = dX * X)."""
    return jnp.sum(M, axis=1) - jnp.sum(M, axis=0)


def solve_unit_lower(A, *, precision=HIGHEST):
    """(I + A)^-1 for strictly lower A [C, C] float32 (C a power of two), by doubling.

    Level s (s = 1, 2, 4, ... C/2) turns the block-diagonal inverse with blocks of size s into the
    one with blocks of size 2s: with L_s = A restricted to pairs in the same 2s-block but different
    s-blocks (L_s T_s L_s = 0), (D + L_s)^-1 = T_s - T_s L_s T_s. log2(C) levels, 2 matmuls each;
    as stable as blocked forward substitution, with no row-sequential loop.
    """
    C = A.shape[0]
    row, col = iotas(C)
    T = jnp.where(row == col, 1.0, 0.0).astype(jnp.float32)
    s = 1
    while s < C:
        same2 = (row & -(2 * s)) == (col & -(2 * s))  # same block of size 2s
        diff1 = (row & -s) != (col & -s)  # different blocks of size s
        L = jnp.where(same2 & diff1, A, 0.0)
        T = T - dot(dot(T, L, precision=precision), T, precision=precision)
        s *= 2
    return T
