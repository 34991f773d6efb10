"""Pure-jnp references for the gated delta rule (Gated DeltaNet), recurrent and chunked.

Math (Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
arXiv:2412.06464; the contract of FLA's ``chunk_gated_delta_rule``). Per value head, with the
state S in float32 of shape [dk, dv], for t = 1..T:

    S <- exp(g_t) S
    S <- S + k_t (beta_t (v_t - S^T k_t))^T
    o_t = S^T (scale q_t)

Chunked (WY / UT transform) form, per chunk of C tokens with the state S0 at its start and
G = cumsum(g) inside the chunk:

    A      = strictly_lower(diag(beta) K K^T * exp(G_i - G_j))          [C, C]   (stage "kkt")
    T      = (I + A)^-1                                                  [C, C]   (stage "solve")
    w      = T (beta exp(G) K),  u = T (beta V)                          [C, dk], [C, dv] ("wy")
    v_new  = u - w S0                                                    [C, dv]  (stage "h")
    S1     = exp(G_C) S0 + (K exp(G_C - G))^T v_new                      [dk, dv] (stage "h")
    O      = (Q exp(G)) S0 + lower_incl(Q K^T exp(G_i - G_j)) v_new      [C, dv]  (stage "o")

All math is float32 with ``precision=HIGHEST`` on every matmul (on GPU, XLA otherwise uses TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule.common import HIGHEST

_einsum = functools.partial(jnp.einsum, precision=HIGHEST)


# --------------------------------------------------------------------------------------------
# Recurrent form.
# --------------------------------------------------------------------------------------------


def _recurrent_step(S, q_t, k_t, v_t, g_t, b_t):
    """One token. S [..., dk, dv]; q_t, k_t [..., dk]; v_t [..., dv]; g_t, b_t [...]."""
    S = S * jnp.exp(g_t)[..., None, None]
    kS = _einsum("...k,...kv->...v", k_t, S)  # [..., dv]
    delta = b_t[..., None] * (v_t - kS)  # [..., dv]
    S = S + k_t[..., :, None] * delta[..., None, :]
    o_t = _einsum("...k,...kv->...v", q_t, S)
    return S, o_t


def recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: jax.Array | None = None,
):
    """Token-by-token gated delta rule (lax.scan over T), the ground truth of the chunked form.

    Args:
      q, k: [B, T, Hk, dk] floating.
      v: [B, T, Hv, dv] floating, Hv = n * Hk; value head h reads key head h // n.
      g: [B, T, Hv] log decay (float32 expected; used in float32).
      beta: [B, T, Hv] write strength (used in float32, never rounded down).
      scale: multiplies q; default dk ** -0.5.
      initial_state: [N, Hv, dk, dv] (float32) or None (zeros); N = B, or len(cu_seqlens) - 1.
      output_final_state: also return the final state.
      use_qk_l2norm_in_kernel: q, k <- x * rsqrt(sum x^2 + 1e-6) in float32 first.
      cu_seqlens: optional [N + 1] int offsets of sequences packed along T (B must be 1); the state
        restarts from initial_state[n] at each sequence start.

    Returns:
      (o [B, T, Hv, dv] in v.dtype, final_state [N, Hv, dk, dv] float32 or None).

    Raises:
      ValueError: on inconsistent shapes (see ``common.validate_inputs``).
    """
    dims = common.validate_inputs(
        q, k, v, g, beta, initial_state, cu_seqlens, op="recurrent_gated_delta_rule", scale=scale
    )
    _, T, _, Hv, dk, dv, N = dims
    qf, kf, vf, gf, bf = common.prepare_inputs(
        q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, dims
    )
    if initial_state is None:
        S0 = jnp.zeros((N, Hv, dk, dv), qf.dtype)
    else:
        S0 = initial_state.astype(qf.dtype)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (qf, kf, vf, gf, bf))  # time first

    if cu_seqlens is None:

        def step(S, x):
            S, o_t = _recurrent_step(S, *x)
            return S, o_t

        S, o = jax.lax.scan(step, S0, xs)
        final = S
    else:
        cu = cu_seqlens.astype(jnp.int32)
        t_idx = jnp.arange(T, dtype=jnp.int32)
        seq = jnp.sum(cu[1:-1][None, :] <= t_idx[:, None], axis=1).astype(jnp.int32)  # [T]
        is_start = t_idx == cu[seq]
        is_end = t_idx == cu[seq + 1] - 1

        def step(carry, x):
            S, finals = carry  # S [Hv, dk, dv]; finals [N, Hv, dk, dv]
            (q_t, k_t, v_t, g_t, b_t), n, st, en = x
            S = jnp.where(st, S0[n], S)
            S, o_t = _recurrent_step(S, q_t[0], k_t[0], v_t[0], g_t[0], b_t[0])
            finals = jnp.where(en, finals.at[n].set(S), finals)
            return (S, finals), o_t[None]

        (_, final), o = jax.lax.scan(step, (S0[0], S0), (xs, seq, is_start, is_end))
    o = jnp.moveaxis(o, 0, 1).astype(v.dtype)
    return o, (final if output_final_state else None)


# --------------------------------------------------------------------------------------------
# Chunked (WY / UT) form, cut into FLA's stages. Layout inside: [B, H, NC, C, D].
# --------------------------------------------------------------------------------------------


def chunk_local_cumsum(g: jax.Array) -> jax.Array:
    """Stage "cumsum": inclusive cumulative sum of the log decay inside each chunk. [..., C]."""
    return jnp.cumsum(g, axis=-1)


def _pair_decay(G: jax.Array, inclusive: bool) -> jax.Array:
    """exp(G_i - G_j) on (strictly or inclusively) lower pairs, 0 elsewhere. [..., C, C]."""
    C = G.shape[-1]
    mask = jnp.tril(jnp.ones((C, C), bool), 0 if inclusive else -1)
    diff = G[..., :, None] - G[..., None, :]
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def chunk_scaled_dot_kkt(k: jax.Array, beta: jax.Array, G: jax.Array) -> jax.Array:
    """Stage "kkt": A = strictly_lower(beta_i k_i . k_j exp(G_i - G_j)). k [..., C, dk] -> [..., C, C]."""
    kk = _einsum("...ik,...jk->...ij", k, k)
    return kk * beta[..., :, None] * _pair_decay(G, inclusive=False)


def solve_tril(A: jax.Array) -> jax.Array:
    """Stage "solve": (I + A)^-1 for strictly lower A [..., C, C], C a power of two.

    Doubling over block sizes s = 1, 2, 4, ..., C/2: if T_s is the inverse of the block-diagonal
    part of I + A with blocks of size s, and L_s holds the entries of A in the same 2s-block but
    different s-blocks, then (since L_s T_s L_s = 0) T_2s = T_s - T_s L_s T_s. log2(C) levels of
    two batched matmuls each; as stable as blocked forward substitution, no row-sequential loop.
    """
    C = A.shape[-1]
    if C & (C - 1):
        raise ValueError(f"solve_tril: the chunk size must be a power of two, got {C}")
    idx = jnp.arange(C)
    Tinv = jnp.broadcast_to(jnp.eye(C, dtype=A.dtype), A.shape)
    s = 1
    while s < C:
        r, c = idx[:, None], idx[None, :]
        mask = ((r // (2 * s)) == (c // (2 * s))) & ((r // s) != (c // s))
        L = jnp.where(mask, A, 0)
        Tinv = Tinv - _einsum("...ij,...jk,...kl->...il", Tinv, L, Tinv)
        s *= 2
    return Tinv


def recompute_w_u(k, v, beta, G, Ainv):
    """Stage "wy": w = Ainv (beta exp(G) k) [..., C, dk], u = Ainv (beta v) [..., C, dv]."""
    w = _einsum("...ij,...jk->...ik", Ainv, k * (beta * jnp.exp(G))[..., None])
    u = _einsum("...ij,...jv->...iv", Ainv, v * beta[..., None])
    return w, u


def chunk_fwd_h(k, w, u, G, S0, chunk_start=None, chunk_init=None):
    """Stage "h": the sequential pass over chunks.

    Args: k, w [B, H, NC, C, dk]; u [B, H, NC, C, dv]; G [B, H, NC, C]; S0 [B, H, dk, dv].
      Varlen: chunk_start [NC] bool and chunk_init [NC, H, dk, dv] (B == 1): at a chunk that starts
      a sequence the carried state is replaced by that sequence's initial state.
    Returns: h [B, H, NC, dk, dv] (state at each chunk start), v_new [B, H, NC, C, dv],
      states after each chunk [NC, B, H, dk, dv] (the last one is the final state).
    """
    Glast = G[..., -1]  # [B, H, NC]
    kd = k * jnp.exp(Glast[..., None] - G)[..., None]  # decayed to the chunk end
    xs = [jnp.moveaxis(x, 2, 0) for x in (w, u, kd, Glast)]
    if chunk_start is not None:
        xs += [chunk_start, chunk_init[:, None]]

    def step(S, x):
        if chunk_start is not None:
            w_c, u_c, kd_c, gl_c, st, init = x
            S = jnp.where(st, init, S)
        else:
            w_c, u_c, kd_c, gl_c = x
        v_new = u_c - _einsum("bhck,bhkv->bhcv", w_c, S)
        S_next = jnp.exp(gl_c)[..., None, None] * S + _einsum("bhck,bhcv->bhkv", kd_c, v_new)
        return S_next, (S, v_new, S_next)

    _, (h, v_new, after) = jax.lax.scan(step, S0, tuple(xs))
    return jnp.moveaxis(h, 0, 2), jnp.moveaxis(v_new, 0, 2), after


def chunk_fwd_o(q, k, v_new, h, G):
    """Stage "o": O = (q exp(G)) h + lower_incl(q k^T exp(G_i - G_j)) v_new. q already scaled."""
    inter = _einsum("...ck,...kv->...cv", q * jnp.exp(G)[..., None], h)
    attn = _einsum("...ik,...jk->...ij", q, k) * _pair_decay(G, inclusive=True)
    return inter + _einsum("...ij,...jv->...iv", attn, v_new)


def _to_chunks(x, C):
    """[B, T, H, ...] (T a multiple of C) -> [B, H, NC, C, ...]."""
    B, T, H = x.shape[:3]
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape((B, H, T // C, C) + x.shape[3:])


def _from_chunks(x):
    """[B, H, NC, C, ...] -> [B, NC * C, H, ...]."""
    B, H, NC, C = x.shape[:4]
    x = x.reshape((B, H, NC * C) + x.shape[4:])
    return jnp.moveaxis(x, 1, 2)


def chunk_gated_delta_rule_ref(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: jax.Array | None = None,
    chunk_size: int = 64,
):
    """Chunked (WY/UT) gated delta rule in plain jnp; same contract as ``recurrent_gated_delta_rule``.

    Any T: the sequence is padded internally to a multiple of ``chunk_size`` with g = 0, k = 0,
    beta = 0 (the state passes through unchanged) and the padding is cut from the output. With
    ``cu_seqlens`` each packed sequence is re-laid out to start on a chunk boundary.

    Args/Returns/Raises: as ``recurrent_gated_delta_rule``; ``chunk_size`` is a power of two.
    """
    dims = common.validate_inputs(
        q, k, v, g, beta, initial_state, cu_seqlens, op="chunk_gated_delta_rule_ref", scale=scale
    )
    _, T, _, Hv, dk, dv, N = dims
    C = int(chunk_size)
    if C < 1 or C & (C - 1):
        raise ValueError(
            f"chunk_gated_delta_rule_ref: `chunk_size` must be a power of two, got {C}"
        )
    qf, kf, vf, gf, bf = common.prepare_inputs(
        q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, dims
    )
    if initial_state is None:
        S0 = jnp.zeros((N, Hv, dk, dv), qf.dtype)
    else:
        S0 = initial_state.astype(qf.dtype)

    layout = None
    if cu_seqlens is not None:
        layout = common.varlen_layout(cu_seqlens, T, C)
        qf, kf, vf, gf, bf = (common.gather_aligned(x, layout) for x in (qf, kf, vf, gf, bf))
    else:
        Tp = -(-T // C) * C
        qf, kf, vf, gf, bf = (common.pad_to_chunks(x, Tp) for x in (qf, kf, vf, gf, bf))

    qc, kc, vc = _to_chunks(qf, C), _to_chunks(kf, C), _to_chunks(vf, C)  # [B, H, NC, C, D]
    gc, bc = _to_chunks(gf, C), _to_chunks(bf, C)  # [B, H, NC, C]
    G = chunk_local_cumsum(gc)
    A = chunk_scaled_dot_kkt(kc, bc, G)
    Ainv = solve_tril(A)
    w, u = recompute_w_u(kc, vc, bc, G, Ainv)
    if layout is None:
        h, v_new, after = chunk_fwd_h(kc, w, u, G, S0)
        final = after[-1]
    else:
        chunk_init = S0[jnp.minimum(layout.chunk_seq, N - 1)]  # [NC, H, dk, dv]
        h, v_new, after = chunk_fwd_h(
            kc, w, u, G, jnp.zeros((1, Hv, dk, dv), qf.dtype), layout.chunk_start, chunk_init
        )
        last = jnp.maximum(layout.last_chunk, 0)
        final = jnp.where((layout.last_chunk >= 0)[:, None, None, None], after[last, 0], S0)
    o = _from_chunks(chunk_fwd_o(qc, kc, v_new, h, G))  # [B, Tp, H, dv]
    if layout is None:
        o = o[:, :T]
    else:
        o = common.scatter_packed(o, layout)
    return o.astype(v.dtype), (final if output_final_state else None)
