"""Shared helpers for the Gated DeltaNet ops: argument checks, input preparation, varlen layout.

Everything here is plain jnp and backend independent. The kernels and the references call
``validate_inputs`` with the same arguments so that every entry point rejects bad input the same
way, with a ValueError that names the argument and the expected shape.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
L2NORM_EPS = 1e-6


class Dims(NamedTuple):
    """Static sizes of one call. n_seqs is B, or len(cu_seqlens) - 1 in varlen mode."""

    batch: int
    seqlen: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    n_seqs: int

    @property
    def group(self) -> int:
        return self.num_v_heads // self.num_k_heads


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def validate_inputs(q, k, v, g, beta, initial_state=None, cu_seqlens=None, *, op: str,
                    scale=None) -> Dims:
    """Checks shapes/dtypes of a gated-delta-rule call and returns its static sizes.

    Raises:
      ValueError: naming the offending argument and the expected shape or dtype.
    """
    where = f"pallas_kernels.gated_delta_rule.{op}"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{where}: `{name}` must have shape [B, T, H, D] (4 dims), got "
                f"{_shape_str(getattr(x, 'shape', ()))}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{where}: `{name}` must be a floating dtype, got {x.dtype}")
    B, T, Hk, dk = q.shape
    if T == 0:
        raise ValueError(f"{where}: no tokens (T = 0, `q` of shape {_shape_str(q.shape)}); "
                         "T must be at least 1")
    if scale is not None and (np.ndim(scale) != 0 or not np.isrealobj(scale)):
        raise ValueError(
            f"{where}: `scale` (the 6th positional argument) must be a real scalar, got "
            f"{type(scale).__name__} of shape {_shape_str(np.shape(scale))}; pass initial_state "
            "by keyword")
    if tuple(k.shape) != (B, T, Hk, dk):
        raise ValueError(
            f"{where}: `k` must have the shape of `q` [B, T, Hk, dk] = {_shape_str(q.shape)}, got "
            f"{_shape_str(k.shape)}"
        )
    if tuple(v.shape[:2]) != (B, T):
        raise ValueError(
            f"{where}: `v` must have shape [B, T, Hv, dv] with B, T = {B}, {T} (from `q`), got "
            f"{_shape_str(v.shape)}"
        )
    Hv, dv = v.shape[2], v.shape[3]
    if Hv % Hk != 0:
        raise ValueError(
            f"{where}: the number of value heads Hv = {Hv} (`v` axis 2) must be a multiple of the "
            f"number of key heads Hk = {Hk} (`q`/`k` axis 2)"
        )
    for name, x in (("g", g), ("beta", beta)):
        if getattr(x, "shape", None) is None or tuple(x.shape) != (B, T, Hv):
            raise ValueError(
                f"{where}: `{name}` must have shape [B, T, Hv] = {_shape_str((B, T, Hv))}, got "
                f"{_shape_str(getattr(x, 'shape', ()))}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{where}: `{name}` must be a floating dtype, got {x.dtype}")
    n_seqs = B
    if cu_seqlens is not None:
        if not hasattr(cu_seqlens, "ndim"):
            raise ValueError(
                f"{where}: `cu_seqlens` must be a 1-D integer array [N + 1] of sequence offsets "
                f"(0, ..., T), got a {type(cu_seqlens).__name__}: pass jnp.asarray(..., jnp.int32)"
            )
        if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"{where}: `cu_seqlens` must be a 1-D integer array [N + 1] of sequence offsets "
                f"(0, ..., T), got shape {_shape_str(cu_seqlens.shape)}"
            )
        if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
            raise ValueError(
                f"{where}: `cu_seqlens` must be an integer array, got {cu_seqlens.dtype}"
            )
        if B != 1:
            raise ValueError(
                f"{where}: with `cu_seqlens` the sequences are packed along T, so B must be 1; got "
                f"`q` of shape {_shape_str(q.shape)}"
            )
        n_seqs = cu_seqlens.shape[0] - 1
        if not isinstance(cu_seqlens, jax.core.Tracer):
            cu = np.asarray(cu_seqlens)
            if cu[0] != 0 or cu[-1] != T or np.any(np.diff(cu) < 0):
                raise ValueError(
                    f"{where}: `cu_seqlens` must be non-decreasing, start at 0 and end at T = {T}; got "
                    f"{cu.tolist()}"
                )
    if initial_state is not None:
        want = (n_seqs, Hv, dk, dv)
        if tuple(initial_state.shape) != want:
            raise ValueError(
                f"{where}: `initial_state` must have shape [N, Hv, dk, dv] = {_shape_str(want)} "
                f"(N = {'len(cu_seqlens) - 1' if cu_seqlens is not None else 'B'}), got "
                f"{_shape_str(initial_state.shape)}"
            )
        if not jnp.issubdtype(initial_state.dtype, jnp.floating):
            raise ValueError(f"{where}: `initial_state` must be a floating dtype (float32 "
                             f"expected), got {initial_state.dtype}")
    return Dims(B, T, Hk, Hv, dk, dv, n_seqs)


def compute_dtype(*xs):
    """float32, or float64 when an input is float64 (x64 mode, for finite-difference checks)."""
    return jnp.result_type(jnp.float32, *[x.dtype for x in xs if x is not None])


def l2norm(x: jax.Array, dtype=jnp.float32) -> jax.Array:
    """x * rsqrt(sum(x^2) + 1e-6) over the last axis, in float32 (or ``dtype``)."""
    x = x.astype(dtype)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def l2norm_bwd(x: jax.Array, dy: jax.Array) -> jax.Array:
    """The gradient of :func:`l2norm` at x for the cotangent dy (x's shape): with
    r = rsqrt(sum(x^2) + eps) and y = x r, d(x) = r (dy - y sum(y dy)), float32. Recomputed
    from x itself (no float32 copy of x kept from the forward): one elementwise pass with two
    row sums, which XLA fuses with the op producing dy."""
    x, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)
    y = x * r
    return r * (dy - y * jnp.sum(y * dy, axis=-1, keepdims=True))


def default_scale(dk: int, scale) -> float:
    return dk**-0.5 if scale is None else scale


def prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, dims: Dims):
    """Float32 copies with the key heads repeated to the value heads and q scaled.

    Returns q, k [B, T, Hv, dk], v [B, T, Hv, dv], g, beta [B, T, Hv], all float32 (float64 if an
    input is float64).
    """
    dt = compute_dtype(q, k, v, g, beta)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q, dt), l2norm(k, dt)
    q = q.astype(dt) * jnp.asarray(default_scale(dims.head_k_dim, scale), dt)
    k = k.astype(dt)
    if dims.group > 1:
        q = jnp.repeat(q, dims.group, axis=2)
        k = jnp.repeat(k, dims.group, axis=2)
    return q, k, v.astype(dt), g.astype(dt), beta.astype(dt)


def pad_to_chunks(x: jax.Array, Tp: int) -> jax.Array:
    """[B, T, ...] -> [B, Tp, ...] (Tp >= T), zeros appended along the token axis."""
    T = x.shape[1]
    if T == Tp:
        return x
    return jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))


# --------------------------------------------------------------------------------------------
# Variable-length packing: lay sequences out so that each one starts on a chunk boundary.
# --------------------------------------------------------------------------------------------


class VarlenLayout(NamedTuple):
    """Maps a packed [T] token axis to a chunk-aligned [Tp] axis (Tp a multiple of the chunk).

    src:         [Tp] int32, packed index of the token at each aligned position (0 where invalid).
    valid:       [Tp] bool, position holds a real token.
    dst:         [T]  int32, aligned position of each packed token.
    chunk_seq:   [NC] int32, sequence that chunk c belongs to (N for trailing empty chunks).
    chunk_start: [NC] bool, chunk c is the first chunk of its sequence (the state restarts there).
    last_chunk:  [N]  int32, last chunk of each sequence (-1 when the sequence is empty).
    """

    src: jax.Array
    valid: jax.Array
    dst: jax.Array
    chunk_seq: jax.Array
    chunk_start: jax.Array
    last_chunk: jax.Array


def varlen_layout(cu_seqlens: jax.Array, T: int, chunk_size: int) -> VarlenLayout:
    """Chunk-aligned layout of packed sequences; jit-compatible (cu_seqlens may be traced).

    Each sequence of length L_n is padded to P_n = ceil(L_n / C) * C, so the aligned length is at
    most T + N * (C - 1), rounded up to a multiple of C (a static bound).
    """
    C = chunk_size
    cu = cu_seqlens.astype(jnp.int32)
    N = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]  # [N]
    padded = (lens + C - 1) // C * C  # [N]
    offs = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(padded)])  # [N + 1]
    Tp = -(-(T + N * (C - 1)) // C) * C
    Tp = max(Tp, C)
    NC = Tp // C
    pos = jnp.arange(Tp, dtype=jnp.int32)
    seq = jnp.sum(offs[1:][None, :] <= pos[:, None], axis=1).astype(jnp.int32)  # [Tp] in [0, N]
    seq_c = jnp.minimum(seq, N - 1)
    local = pos - offs[seq_c]
    valid = (seq < N) & (local < lens[seq_c])
    src = jnp.where(valid, cu[seq_c] + local, 0)
    t = jnp.arange(T, dtype=jnp.int32)
    tseq = jnp.sum(cu[1:-1][None, :] <= t[:, None], axis=1).astype(jnp.int32)  # [T] in [0, N-1]
    dst = offs[tseq] + t - cu[tseq]
    cstart = jnp.arange(NC, dtype=jnp.int32) * C
    chunk_seq = seq[cstart]
    chunk_start = (chunk_seq < N) & (cstart == offs[jnp.minimum(chunk_seq, N - 1)])
    last_chunk = jnp.where(lens > 0, offs[1:] // C - 1, -1).astype(jnp.int32)
    return VarlenLayout(src, valid, dst, chunk_seq, chunk_start, last_chunk)


def gather_aligned(x: jax.Array, layout: VarlenLayout) -> jax.Array:
    """[1, T, ...] packed -> [1, Tp, ...] aligned, zeros at invalid positions."""
    y = jnp.take(x[0], layout.src, axis=0)
    mask = layout.valid.reshape((-1,) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y, jnp.zeros((), y.dtype))[None]


def scatter_packed(y: jax.Array, layout: VarlenLayout) -> jax.Array:
    """[1, Tp, ...] aligned -> [1, T, ...] packed."""
    return jnp.take(y[0], layout.dst, axis=0)[None]
