"""Stage "h" split along the sequence and recombined exactly, for when B x Hv programs leave
the GPU idle (one long sequence).

Per chunk the state update of h.py is affine in the state S [dk, dv]:
  S' = M_c S + b_c,   M_c = exp(G_last) I - kd^T w  [dk, dk],   b_c = kd^T u  [dk, dv],
with kd = k exp(G_last - G). The NC chunks are cut into P contiguous segments of L chunks each
(the token axis zero-padded to P L C: a padded chunk has k = w = u = 0, G = 0, so M_c = I and
b_c = 0, it passes the state through). Then
  pass 1 (Pallas, ``chunk_segment_maps``): for every segment p < P - 1 in parallel, its map
    [M_p | b_p] [dk, dk + dv] float32: M_p = M_{c_last} ... M_{c_first} and b_p, the state at the
    segment end when it starts from zero. Both follow the recurrence of h.py, run on the columns
    of [I | 0] with the inputs [0 | u] (state_step with u None / u).
  pass 2 (jnp, P - 1 tiny matmuls): the segment start states S_0 = initial state (or zeros),
    S_{p+1} = M_p S_p + b_p.
  pass 3 (h.py, unchanged): the state pass on [B P, L C] tokens, the P segments of every sequence
    as rows of the batch, each from its start state; its last segment's end state is the final
    state.
Passes 1 and 3 both walk L = NC / P chunks per program instead of NC, with P times the programs.
The combination is exact algebra; in floating point it differs from the unsplit pass only by
rounding (the maps are float32, their matmul operands rounded to the compute dtype as the state's
are in h.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule import kernel_math as km
from pallas_kernels.gated_delta_rule.gpu_triton.h import chunk_fwd_h, state_step


def map_columns(run, dk: int, BV: int):
    """In-kernel, shared with dh_split.py: program axis 3 picks column block j of a segment map
    [M | b] [dk, dk + dv]. Blocks j < dk / BV are M's: ``run(X0, False)`` from the columns of
    the identity (the inputs entering as zeros); the others b's: ``run(0, True)`` with the
    inputs of value block j - dk / BV."""
    j = pl.program_id(3)
    n_m = dk // BV

    @pl.when(j < n_m)
    def _():
        row, col = km.iotas(dk, BV)
        run(jnp.where(row == col + j * BV, 1.0, 0.0).astype(jnp.float32), False)

    @pl.when(j >= n_m)
    def _():
        run(jnp.zeros((dk, BV), jnp.float32), True)


def segments_layout(NC: int, segments: int) -> tuple[int, int]:
    """(L, P): chunks per segment L = ceil(NC / segments) and segments used P = ceil(NC / L)."""
    L = -(-NC // max(segments, 1))
    return L, -(-NC // L)


def as_segments(xs, P: int, L: int, C: int):
    """[B, Tp, ...] -> [B P, L C, ...] for each x of xs: zero chunks appended, then the P
    segments of every sequence as rows of the batch."""
    return tuple(
        common.pad_to_chunks(x, P * L * C).reshape((x.shape[0] * P, L * C) + x.shape[2:])
        for x in xs
    )


def _segment_kernel(k_ref, w_ref, u_ref, g_ref, a_ref, *, chunk_size, use_qk_l2norm):
    # k_ref, w_ref [L C, dk]; u_ref [L C, BV]; g_ref [L C]; a_ref [dk, BV] float32: column block j
    # (program axis 3) of the segment's map [M | b] (map_columns; M's blocks read no u).
    C = chunk_size
    L = k_ref.shape[0] // C

    def run(X, with_u):
        def body(c, X):
            sl = pl.ds(pl.multiple_of(c * C, C), C)
            u = u_ref[sl, :] if with_u else None
            return state_step(k_ref, w_ref, g_ref, sl, X, u, use_qk_l2norm=use_qk_l2norm)[1]

        a_ref[...] = lax.fori_loop(0, L, body, X)

    map_columns(run, *a_ref.shape)


def chunk_segment_maps(
    k: jax.Array,
    w: jax.Array,
    u: jax.Array,
    G: jax.Array,
    *,
    segments: int,
    chunk_size: int = 64,
    block_v: int = 32,
    use_qk_l2norm: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Pass 1: the affine map of each segment but the last, one program per
    (segment, batch, value head, column block of [M | b]).

    Args:
      k: [B P, L C, Hk, dk]; w: [B P, L C, Hv, dk]; u: [B P, L C, Hv, dv] (compute dtype): row
        b P + p holds segment p of sequence b (P = segments). G: [B P, L C, Hv] float32.
      block_v: columns per program; must divide dk and dv.
    Returns:
      [B, P - 1, Hv, dk, dk + dv] float32: [M_p | b_p], S_end = M_p S_start + b_p for segment p.
    """
    BP, Ls, Hk, dk = k.shape
    Hv, dv = u.shape[2], u.shape[3]
    P = segments
    B = BP // P
    n = Hv // Hk
    BV = min(block_v, dk, dv)
    if dk % BV or dv % BV:
        raise ValueError(f"chunk_segment_maps: block_v = {BV} must divide dk = {dk} and dv = {dv}")
    n_m = dk // BV
    kernel = functools.partial(_segment_kernel, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm)
    return pl.pallas_call(
        kernel,
        grid=(P - 1, B, Hv, (dk + dv) // BV),
        in_specs=[
            pl.BlockSpec((None, Ls, None, dk), lambda p, b, h, j: (b * P + p, 0, lax.div(h, n), 0)),
            pl.BlockSpec((None, Ls, None, dk), lambda p, b, h, j: (b * P + p, 0, h, 0)),
            pl.BlockSpec(
                (None, Ls, None, BV),
                lambda p, b, h, j: (b * P + p, 0, h, jnp.maximum(j - n_m, 0)),
            ),
            pl.BlockSpec((None, Ls, None), lambda p, b, h, j: (b * P + p, 0, h)),
        ],
        out_specs=pl.BlockSpec((None, None, None, dk, BV), lambda p, b, h, j: (b, p, h, 0, j)),
        out_shape=jax.ShapeDtypeStruct((B, P - 1, Hv, dk, dk + dv), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gdn_chunk_h_segments",
    )(k, w, u, G)


def segment_start_states(maps: jax.Array, initial_state: jax.Array | None) -> jax.Array:
    """Pass 2: S_0 = initial_state (zeros if None), S_{p+1} = M_p S_p + b_p (float32, exact
    float32 matmuls).

    Args: maps [B, P - 1, Hv, dk, dk + dv] float32 (chunk_segment_maps); initial_state
      [B, Hv, dk, dv] float32 or None.
    Returns: [B, P, Hv, dk, dv] float32, the state at the start of each segment.
    """
    B, _, Hv, dk, width = maps.shape
    s0 = jnp.zeros((B, Hv, dk, width - dk), jnp.float32)
    if initial_state is not None:
        s0 = initial_state.astype(jnp.float32)

    def step(S, a):
        nxt = jnp.einsum("bhij,bhjv->bhiv", a[..., :dk], S, precision=km.HIGHEST) + a[..., dk:]
        return nxt, S

    last, starts = lax.scan(step, s0, jnp.moveaxis(maps, 1, 0))  # S_{P-1}; S_0 .. S_{P-2}
    return jnp.concatenate([jnp.moveaxis(starts, 0, 1), last[:, None]], axis=1)


def chunk_fwd_h_split(
    k: jax.Array,
    w: jax.Array,
    u: jax.Array,
    G: jax.Array,
    initial_state: jax.Array | None,
    *,
    segments: int,
    chunk_size: int = 64,
    block_v: int = 32,
    use_qk_l2norm: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """The state pass of ``h.chunk_fwd_h`` (dense, no varlen), split into up to ``segments``
    pieces of the sequence; the same arguments and results, equal up to rounding. When the
    segments do not tile the NC chunks exactly (L = ceil(NC / segments) chunks each), the inputs
    are padded and h, v_new sliced back (copies): a ``segments`` that divides NC avoids them.

    Args: k [B, Tp, Hk, dk]; w [B, Tp, Hv, dk]; u [B, Tp, Hv, dv] (compute dtype); G [B, Tp, Hv]
      float32; initial_state [B, Hv, dk, dv] float32 or None.
    Returns: h [B, NC, Hv, dk, dv], v_new [B, Tp, Hv, dv] (compute dtype), final state
      [B, Hv, dk, dv] float32.
    """
    B, Tp, _, dk = k.shape
    Hv, dv = u.shape[2], u.shape[3]
    C = chunk_size
    NC = Tp // C
    L, P = segments_layout(NC, segments)
    kw = {
        "chunk_size": C,
        "block_v": block_v,
        "use_qk_l2norm": use_qk_l2norm,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "interpret": interpret,
    }
    if P == 1:
        return chunk_fwd_h(k, w, u, G, initial_state, **kw)
    k, w, u, G = as_segments((k, w, u, G), P, L, C)
    maps = chunk_segment_maps(k, w, u, G, segments=P, **kw)
    starts = segment_start_states(maps, initial_state)  # [B, P, Hv, dk, dv]
    h, v_new, ends = chunk_fwd_h(k, w, u, G, starts.reshape(B * P, Hv, dk, dv), **kw)
    h = h.reshape(B, P * L, Hv, dk, dv)[:, :NC]
    v_new = v_new.reshape(B, P * L * C, Hv, dv)[:, :Tp]
    return h, v_new, ends.reshape(B, P, Hv, dk, dv)[:, -1]
