"""Chunked gated delta rule forward for TPU: one fused kernel, grid (B, Hv, NC).

Per chunk c of one (batch, value head), with the state S [dk, dv] float32 in VMEM scratch:
  A     = strictly_lower(beta k k^T exp(G_i - G_j))        ("kkt")
  T     = (I + A)^-1                                       ("solve", doubling on the MXU)
  w, u  = T (beta exp(G) k), T (beta v)                    ("wy")
  v_new = u - w S;  o = (q S) exp(G) + lower_incl(q k^T exp(G_i - G_j)) v_new     ("o")
  S     = exp(G_last) S + (k exp(G_last - G))^T v_new      ("h")
The chunk axis is sequential ("arbitrary"); Pallas pipelines the next chunk's DMA behind the
current chunk's compute. For the backward (chunk_bwd.py), ``fwd_call(..., return_states=True)``
also writes each chunk's start state S; ``prepare`` / ``Prepared`` hold the kernel layout that
both use.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule import kernel_math as km


def _kernel(
    *all_refs,
    scale,
    use_qk_l2norm,
    has_initial_state,
    solve_precision,
    varlen,
):
    # varlen: three scalar-prefetch refs first (Prepared.prefetch: reset [NC], the sequence a
    # chunk starts, else -1; chunk_seq and ends [NC], used by the index maps and the backward).
    if varlen:
        reset_ref, _, _, *refs = all_refs
    else:
        reset_ref, refs = None, all_refs
    _chunk_body(
        *refs,
        reset_ref=reset_ref,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        has_initial_state=has_initial_state,
        solve_precision=solve_precision,
    )


def _chunk_body(
    q_ref,
    k_ref,
    v_ref,
    gc_ref,
    gr_ref,
    b_ref,
    *refs,
    reset_ref,
    scale,
    use_qk_l2norm,
    has_initial_state,
    solve_precision,
):
    # q_ref, k_ref [C, dk]; v_ref [C, dv]; gc_ref [C, 1]; gr_ref [1, C]; b_ref [C, 1];
    # h0_ref [dk, dv]; o_ref [C, dv]; ht_ref [dk, dv]; hs_ref [dk, dv] (return_states: the state
    # at the chunk start, in the compute dtype); s_ref (scratch) [dk, dv] float32.
    refs = list(refs)
    h0_ref = refs.pop(0) if has_initial_state else None
    o_ref, ht_ref, *hs_ref, s_ref = refs
    c = pl.program_id(2)
    cdt = k_ref.dtype

    start = c == 0
    if reset_ref is not None:
        start = reset_ref[c] >= 0

    @pl.when(start)
    def _():
        if has_initial_state:
            s_ref[...] = h0_ref[...].astype(jnp.float32)
        else:
            s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)

    q = q_ref[...].astype(jnp.float32)
    k = k_ref[...].astype(jnp.float32)
    if use_qk_l2norm:
        q, k = km.l2norm(q), km.l2norm(k)
    qc = (q * scale).astype(cdt)
    kc = k.astype(cdt)
    G_col = gc_ref[...].astype(jnp.float32)  # [C, 1]
    G_row = gr_ref[...].astype(jnp.float32)  # [1, C]
    beta = b_ref[...].astype(jnp.float32)  # [C, 1]
    g_last = km.pick_last_of_row(G_row)  # [1, 1]

    # kkt + solve + wy
    _, w, u = km.wy_repr(kc, v_ref[...], G_col, G_row, beta, precision=solve_precision)
    # h (v_new) and o
    S = s_ref[...]
    Sc = S.astype(cdt)
    if hs_ref:
        hs_ref[0][...] = Sc
    v_new = u - km.dot(w.astype(cdt), Sc)  # [C, dv]
    vnc = v_new.astype(cdt)
    attn = km.dot(qc, kc, trans_b=True) * km.decay_matrix(G_col, G_row, strict=False)
    o = km.dot(qc, Sc) * jnp.exp(G_col) + km.dot(attn.astype(cdt), vnc)
    o_ref[...] = o.astype(o_ref.dtype)
    # h: advance the state to the chunk end
    kd = (k * jnp.exp(g_last - G_col)).astype(cdt)  # [C, dk]
    S = S * jnp.exp(g_last) + km.dot(kd, vnc, trans_a=True)
    s_ref[...] = S

    if reset_ref is not None:
        # The final-state block follows the chunk's sequence; it is written back when the
        # sequence changes, holding the state after that sequence's last chunk.
        ht_ref[...] = S.astype(ht_ref.dtype)
    else:

        @pl.when(c == pl.num_programs(2) - 1)
        def _():
            ht_ref[...] = S.astype(ht_ref.dtype)


class Prepared(NamedTuple):
    """Inputs laid out for the TPU kernels (head-major, chunk-padded; varlen: chunk-aligned).

    q, k [B, Hk, Tp, dk], v [B, Hv, Tp, dv] (compute dtype); G_col [B, Hv, Tp, 1] and G_row
    [B, Hv, NC, 1, C] float32, the chunk-local cumsum of g as columns and as rows; beta
    [B, Hv, Tp, 1] float32; layout: common.VarlenLayout or None; T: the caller's token count.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    G_col: jax.Array
    G_row: jax.Array
    beta: jax.Array
    layout: common.VarlenLayout | None
    T: int

    def prefetch(self):
        """The scalar-prefetch arrays of the varlen kernels: reset [NC] (the sequence a chunk
        starts, else -1), chunk_seq [NC] (its sequence, N - 1 for trailing empty chunks), and
        ends [NC] (1 where a chunk is the last of its sequence); [] when not varlen."""
        lay = self.layout
        if lay is None:
            return []
        N = lay.last_chunk.shape[0]
        NC = lay.chunk_seq.shape[0]
        reset = jnp.where(lay.chunk_start, lay.chunk_seq, -1).astype(jnp.int32)
        cseq = jnp.minimum(lay.chunk_seq, N - 1).astype(jnp.int32)
        ends = (lay.chunk_seq < N) & (jnp.arange(NC) == lay.last_chunk[cseq])
        return [reset, cseq, ends.astype(jnp.int32)]

    def from_tokens(self, x):
        """[B, T, H, ...] (FLA's layout) -> the kernel layout [B, H, Tp, ...] of this call."""
        return head_major(x, self.layout, self.G_row.shape[-1])

    def to_tokens(self, x):
        """[B, H, Tp, ...] kernel layout -> [B, T, H, ...] (FLA's layout, packed if varlen)."""
        x = jnp.moveaxis(x, 1, 2)
        return x[:, : self.T] if self.layout is None else common.scatter_packed(x, self.layout)


def head_major(x, layout: common.VarlenLayout | None, chunk_size: int):
    """[B, T, H, ...] -> [B, H, Tp, ...]: chunk-aligned if varlen, zero-padded to whole chunks."""
    if layout is not None:
        x = common.gather_aligned(x, layout)
    Tp = -(-x.shape[1] // chunk_size) * chunk_size
    return jnp.moveaxis(common.pad_to_chunks(x, Tp), 2, 1)


def prepare(q, k, v, g, beta, cu_seqlens, chunk_size: int) -> Prepared:
    """Lays out validated inputs for the kernels (see Prepared); q, v cast to k's dtype."""
    B, T = q.shape[:2]
    Hv = v.shape[2]
    C = chunk_size
    cdt = k.dtype
    layout = None if cu_seqlens is None else common.varlen_layout(cu_seqlens, T, C)
    q, k, v = (head_major(x.astype(cdt), layout, C) for x in (q, k, v))
    g, beta = (head_major(x.astype(jnp.float32), layout, C) for x in (g, beta))
    Tp = q.shape[2]
    NC = Tp // C
    G = jnp.cumsum(g.reshape(B, Hv, NC, C), axis=-1)
    return Prepared(
        q,
        k,
        v,
        G.reshape(B, Hv, Tp, 1),
        G.reshape(B, Hv, NC, 1, C),
        beta.reshape(B, Hv, Tp, 1),
        layout,
        T,
    )


def interpret_params(interpret):
    """False, or pltpu.InterpretParams() (True is turned into it)."""
    return pltpu.InterpretParams() if interpret is True else interpret


def state_index_map(varlen: bool, chunk=lambda c: c):
    """Index map of the per-sequence state blocks [N or B, Hv, dk, dv] over the grid (b, h, c):
    varlen reads the chunk's sequence from the scalar-prefetch chunk_seq (``Prepared.prefetch``);
    ``chunk`` maps the grid step to the chunk (the backward walks them in reverse)."""

    def index_map(b, h, c, *prefetch):
        return (prefetch[1][chunk(c)], h, 0, 0) if varlen else (b, h, 0, 0)

    return index_map


def fwd_call(
    p: Prepared,
    initial_state,
    *,
    scale: float,
    use_qk_l2norm: bool,
    solve_precision,
    interpret,
    return_states: bool = False,
):
    """The forward kernel on prepared inputs. Returns o [B, Hv, Tp, dv] (v's dtype), final
    [N or B, Hv, dk, dv] float32 (varlen: rows of empty sequences unwritten), and with
    return_states the state at each chunk start h [B, Hv, NC, dk, dv] (compute dtype)."""
    B, Hk, Tp, dk = p.q.shape
    Hv, dv = p.v.shape[1], p.v.shape[3]
    NC, C = p.G_row.shape[2], p.G_row.shape[4]
    n = Hv // Hk
    varlen = p.layout is not None
    kernel = functools.partial(
        _kernel,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        has_initial_state=initial_state is not None,
        solve_precision=solve_precision,
        varlen=varlen,
    )
    state_map = state_index_map(varlen)
    in_specs = [
        pl.BlockSpec((None, None, C, dk), lambda b, h, c, *_: (b, lax.div(h, n), c, 0)),
        pl.BlockSpec((None, None, C, dk), lambda b, h, c, *_: (b, lax.div(h, n), c, 0)),
        pl.BlockSpec((None, None, C, dv), lambda b, h, c, *_: (b, h, c, 0)),
        pl.BlockSpec((None, None, C, 1), lambda b, h, c, *_: (b, h, c, 0)),
        pl.BlockSpec((None, None, None, 1, C), lambda b, h, c, *_: (b, h, c, 0, 0)),
        pl.BlockSpec((None, None, C, 1), lambda b, h, c, *_: (b, h, c, 0)),
    ]
    args = [p.q, p.k, p.v, p.G_col, p.G_row, p.beta]
    if initial_state is not None:
        in_specs.append(pl.BlockSpec((None, None, dk, dv), state_map))
        args.append(initial_state.astype(jnp.float32))
    n_states = p.layout.last_chunk.shape[0] if varlen else B
    out_specs = [
        pl.BlockSpec((None, None, C, dv), lambda b, h, c, *_: (b, h, c, 0)),
        pl.BlockSpec((None, None, dk, dv), state_map),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, Hv, Tp, dv), p.v.dtype),
        jax.ShapeDtypeStruct((n_states, Hv, dk, dv), jnp.float32),
    ]
    if return_states:
        out_specs.append(
            pl.BlockSpec((None, None, None, dk, dv), lambda b, h, c, *_: (b, h, c, 0, 0))
        )
        out_shape.append(jax.ShapeDtypeStruct((B, Hv, NC, dk, dv), p.k.dtype))
    prefetch = p.prefetch()
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(B, Hv, NC),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret_params(interpret),
        name="gdn_chunk_fwd_tpu",
    )(*prefetch, *args)


def chunk_gated_delta_rule_fwd_tpu(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale: float,
    initial_state=None,
    use_qk_l2norm: bool = False,
    cu_seqlens=None,
    chunk_size: int = 64,
    solve_precision=None,
    interpret=False,
):
    """Forward on TPU (validated inputs).

    Args: q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g, beta [B, T, Hv]; initial_state [N, Hv, dk, dv]
      float32 or None; cu_seqlens [N + 1] int32 or None (then B == 1: sequences are re-laid out
      chunk-aligned; scalar-prefetch arrays tell the kernel where each one starts).
      ``interpret``: False, or pltpu.InterpretParams() (True is turned into it).
    Returns: o [B, T, Hv, dv] in v.dtype, final_state [N, Hv, dk, dv] float32.
    """
    if solve_precision is None:
        solve_precision = km.HIGHEST
    p = prepare(q, k, v, g, beta, cu_seqlens, chunk_size)
    if cu_seqlens is not None and initial_state is None:
        N, Hv, dk, dv = cu_seqlens.shape[0] - 1, v.shape[2], k.shape[3], v.shape[3]
        initial_state = jnp.zeros((N, Hv, dk, dv), jnp.float32)
    o, final = fwd_call(
        p,
        initial_state,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        solve_precision=solve_precision,
        interpret=interpret,
    )
    if cu_seqlens is not None:  # an empty sequence passes its initial state through
        final = jnp.where((p.layout.last_chunk >= 0)[:, None, None, None], final, initial_state)
    return p.to_tokens(o), final
