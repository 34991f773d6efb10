"""Stage "h": the sequential pass over chunks, the state block held in registers.

One program per (value block, batch, value head); it walks the NC chunks in order:
  h[c]     = S                                    (state at the chunk start, stored for stage "o")
  v_new[c] = u[c] - w[c] S                        [C, BV]
  S        = exp(G_last) S + (k exp(G_last - G))^T v_new[c]
The state S [dk, BV] stays in float32 for the whole pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule import kernel_math as km


def state_step(k_ref, w_ref, g_ref, sl, S, u, *, use_qk_l2norm):
    """One chunk of the state recurrence, shared with the segment pass (h_split.py).

    k_ref, w_ref [Tp, dk] (w in the compute dtype); g_ref [Tp] (G); sl: the chunk's token slice;
    S [dk, BV] float32, the state at the chunk start; u [C, BV] (u of the chunk) or None (zeros).
    Returns v_new = u - w S [C, BV] float32 and the state at the chunk end [dk, BV] float32,
      exp(G_last) S + k^T (r * v_new),   r = exp(G_last - G) (/ ||k|| per row if use_qk_l2norm),
    i.e. S' = M S + kd^T u with M = exp(G_last) I - kd^T w [dk, dk], kd = r * k (matmul operands
    rounded to the compute dtype, accumulated in float32). The row factors r scale v_new
    [C, BV], not k [C, dk]: the loop over chunks is serial, and this is a quarter of the
    elementwise work on it at BV = 32.
    """
    cdt = w_ref.dtype
    wS = km.dot(w_ref[sl, :], S.astype(cdt))  # [C, BV]
    v_new = -wS if u is None else u.astype(jnp.float32) - wS
    G = g_ref[sl].astype(jnp.float32)
    g_last = km.pick_last(G)
    k = k_ref[sl, :]
    r = jnp.exp(g_last - G)[:, None]  # [C, 1]
    if use_qk_l2norm:
        r = r * km.inv_l2norm(k)
    vd = (v_new * r).astype(cdt)  # [C, BV]
    return v_new, S * jnp.exp(g_last) + km.dot(k.astype(cdt), vd, trans_a=True)


def _kernel(
    k_ref, w_ref, u_ref, g_ref, *refs, chunk_size, use_qk_l2norm, has_initial_state, varlen
):
    # k_ref, w_ref [Tp, dk]; u_ref [Tp, BV]; g_ref [Tp]; h0_ref [dk, BV] ([N, dk, BV] if varlen);
    # varlen: reset_ref, last_ref [NC] int32 (sequence index where a chunk starts / ends one,
    # else -1); h_ref [NC, dk, BV]; vn_ref [Tp, BV]; ht_ref [dk, BV] ([N, dk, BV] if varlen).
    refs = list(refs)
    reset_ref = last_ref = h0_ref = None
    if varlen:
        reset_ref, last_ref = refs.pop(0), refs.pop(0)
    if has_initial_state:
        h0_ref = refs.pop(0)
    h_ref, vn_ref, ht_ref = refs
    C = chunk_size
    NC = h_ref.shape[0]
    dk, BV = h_ref.shape[1], h_ref.shape[2]
    if has_initial_state and not varlen:
        S = h0_ref[...].astype(jnp.float32)
    else:
        S = jnp.zeros((dk, BV), jnp.float32)

    def body(c, S):
        sl = pl.ds(pl.multiple_of(c * C, C), C)
        if varlen:  # a chunk that starts sequence r restarts from its initial state
            r = reset_ref[c]
            start = (r >= 0).astype(jnp.float32)
            if has_initial_state:
                init = h0_ref[jnp.maximum(r, 0)].astype(jnp.float32)
            else:
                init = jnp.zeros_like(S)
            S = start * init + (1.0 - start) * S
        h_ref[c] = S.astype(h_ref.dtype)
        v_new, S = state_step(k_ref, w_ref, g_ref, sl, S, u_ref[sl, :], use_qk_l2norm=use_qk_l2norm)
        vn_ref[sl, :] = v_new.astype(vn_ref.dtype)
        if varlen:
            e = last_ref[c]

            @pl.when(e >= 0)
            def _():
                ht_ref[jnp.maximum(e, 0)] = S.astype(ht_ref.dtype)

        return S

    S = lax.fori_loop(0, NC, body, S)
    if not varlen:
        ht_ref[...] = S.astype(ht_ref.dtype)


def state_spec(dk: int, BV: int, n_states: int | None = None):
    """BlockSpec of a float32 state array for the (value block j, batch b, value head h) programs
    of the state passes (this one and dh.py): [B, Hv, dk, dv] -> block [dk, BV] of (b, h);
    varlen (``n_states`` = N): [N, Hv, dk, dv] -> all N states of head h, [N, dk, BV]."""
    if n_states is None:
        return pl.BlockSpec((None, None, dk, BV), lambda j, b, h: (b, h, 0, j))
    return pl.BlockSpec((n_states, None, dk, BV), lambda j, b, h: (0, h, 0, j))


def state_pass_outputs(B, Tp, NC, Hv, dk, dv, BV, dtype, n_states=None):
    """(out_specs, out_shape) shared by the state passes: per-chunk states [B, NC, Hv, dk, dv]
    and per-token values [B, Tp, Hv, dv] in ``dtype``, and a float32 state array
    ([B or n_states, Hv, dk, dv], see :func:`state_spec`)."""
    out_specs = [
        pl.BlockSpec((None, NC, None, dk, BV), lambda j, b, h: (b, 0, h, 0, j)),
        pl.BlockSpec((None, Tp, None, BV), lambda j, b, h: (b, 0, h, j)),
        state_spec(dk, BV, n_states),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, NC, Hv, dk, dv), dtype),
        jax.ShapeDtypeStruct((B, Tp, Hv, dv), dtype),
        jax.ShapeDtypeStruct((B if n_states is None else n_states, Hv, dk, dv), jnp.float32),
    ]
    return out_specs, out_shape


def chunk_fwd_h(
    k: jax.Array,
    w: jax.Array,
    u: jax.Array,
    G: jax.Array,
    initial_state: jax.Array | None,
    *,
    chunk_reset: jax.Array | None = None,
    chunk_last: jax.Array | None = None,
    chunk_size: int = 64,
    block_v: int = 32,
    use_qk_l2norm: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """The state pass.

    Args:
      k: [B, Tp, Hk, dk]; w: [B, Tp, Hv, dk]; u: [B, Tp, Hv, dv] (compute dtype).
      G: [B, Tp, Hv] float32 chunk-local cumsum of g.
      initial_state: [B, Hv, dk, dv] float32 or None; varlen: [N, Hv, dk, dv] (N a power of two).
      chunk_reset, chunk_last: varlen only (B == 1): [NC] int32, the sequence a chunk starts / ends
        (-1 if none); sequences are laid out chunk-aligned (common.varlen_layout).
    Returns:
      h [B, NC, Hv, dk, dv] (compute dtype, state at each chunk start),
      v_new [B, Tp, Hv, dv] (compute dtype), final_state [B or N, Hv, dk, dv] float32 (varlen: rows
      of sequences with no token are left unwritten).
    """
    B, Tp, Hk, dk = k.shape
    Hv, dv = u.shape[2], u.shape[3]
    C = chunk_size
    NC = Tp // C
    n = Hv // Hk
    BV = min(block_v, dv)
    if dv % BV:
        raise ValueError(f"chunk_fwd_h: block_v = {BV} must divide dv = {dv}")
    varlen = chunk_reset is not None
    kernel = functools.partial(
        _kernel,
        chunk_size=C,
        use_qk_l2norm=use_qk_l2norm,
        has_initial_state=initial_state is not None,
        varlen=varlen,
    )
    in_specs = [
        pl.BlockSpec((None, Tp, None, dk), lambda j, b, h: (b, 0, lax.div(h, n), 0)),
        pl.BlockSpec((None, Tp, None, dk), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, Tp, None, BV), lambda j, b, h: (b, 0, h, j)),
        pl.BlockSpec((None, Tp, None), lambda j, b, h: (b, 0, h)),
    ]
    args = [k, w, u, G]
    if varlen:
        if B != 1:
            raise ValueError("chunk_fwd_h: varlen needs B == 1")
        if initial_state is None:
            raise ValueError("chunk_fwd_h: varlen needs an initial_state [N, Hv, dk, dv] (zeros)")
        in_specs += [pl.BlockSpec((NC,), lambda j, b, h: (0,))] * 2
        args += [chunk_reset.astype(jnp.int32), chunk_last.astype(jnp.int32)]
    N = initial_state.shape[0] if varlen else None
    if initial_state is not None:
        in_specs.append(state_spec(dk, BV, N))
        args.append(initial_state)
    out_specs, out_shape = state_pass_outputs(B, Tp, NC, Hv, dk, dv, BV, w.dtype, N)
    return pl.pallas_call(
        kernel,
        grid=(dv // BV, B, Hv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gdn_chunk_fwd_h",
    )(*args)
