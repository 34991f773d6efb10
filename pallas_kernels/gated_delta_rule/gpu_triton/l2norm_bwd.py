"""The backward through the L2 norm of q or k, summed over the value heads of each key head.

The backward stages give d(q), d(k) per value head, [B, T, Hk * n, dk] with the n value heads
of key head i at i * n .. i * n + n - 1 (dqkwg.py, wy_bwd.py), for the normalised
y = x r, r = rsqrt(sum(x^2) + eps) (common.l2norm). With dy their sum over the n heads,
  d(x) = r (dy - y sum(y dy))                     (common.l2norm_bwd, the same math in jnp)
One program per block of rows (token, key head) reads x and the n per-head rows once and writes
d(x). XLA made three passes of it (the row norm of x; the head sum with the row sum of y dy;
then the elementwise part, reading the n heads again): on an H200 at 8 x 4096 tokens, 16 key
and 32 value heads of 128 (bf16), 0.25 ms for each of q and k.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule import common

MAX_BLOCK_ROWS = 64  # rows (token, key head) per program: 64 x 128 values of x, of each head


def _kernel(x_ref, dy_ref, dx_ref, *, n):
    # x_ref, dx_ref [BR, dk]; dy_ref [BR, n * dk] (the n value heads' rows side by side).
    x = x_ref[...].astype(jnp.float32)
    dk = x.shape[1]
    dy = dy_ref[:, pl.ds(0, dk)].astype(jnp.float32)
    for j in range(1, n):
        dy += dy_ref[:, pl.ds(j * dk, dk)].astype(jnp.float32)
    r = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + common.L2NORM_EPS)
    y = x * r
    dx_ref[...] = (r * (dy - y * jnp.sum(y * dy, axis=1, keepdims=True))).astype(dx_ref.dtype)


def l2norm_bwd_heads(x: jax.Array, dy: jax.Array, *, num_warps: int = 4,
                     interpret: bool = False) -> jax.Array:
    """d(x) of y = common.l2norm(x) for the cotangents of the n value heads of each key head.

    Args:
      x: [B, T, Hk, dk], the un-normalised q or k (bf16 or float32).
      dy: [B, T, Hk * n, dk], the cotangents of y per value head (value head h belongs to key
        head h // n), any float dtype; summed over the n heads in float32.
    Returns:
      [B, T, Hk, dk] in x's dtype: ``common.l2norm_bwd(x, dy summed over the n heads)``,
      computed in float32.
    Raises:
      ValueError: dy not of x's B, T, dk, or its heads not a multiple of x's.
    """
    B, T, Hk, dk = x.shape
    if dy.ndim != 4 or dy.shape[:2] != (B, T) or dy.shape[3] != dk or dy.shape[2] % Hk:
        raise ValueError(f"l2norm_bwd_heads: dy {dy.shape} must be [B = {B}, T = {T}, "
                         f"Hk * n (Hk = {Hk}), dk = {dk}] for x {x.shape}")
    n = dy.shape[2] // Hk
    rows = B * T * Hk
    block = min(MAX_BLOCK_ROWS, rows & -rows)  # the largest power of two dividing the rows
    dx = pl.pallas_call(
        functools.partial(_kernel, n=n),
        grid=(rows // block,),
        in_specs=[pl.BlockSpec((block, dk), lambda i: (i, 0)),
                  pl.BlockSpec((block, n * dk), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((block, dk), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, dk), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gdn_l2norm_bwd_heads",
    )(x.reshape(rows, dk), dy.reshape(rows, n * dk))
    return dx.reshape(B, T, Hk, dk)
