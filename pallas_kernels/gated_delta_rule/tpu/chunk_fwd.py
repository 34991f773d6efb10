"""Chunked gated delta rule forward for TPU: one fused kernel, grid (B, Hv, NC).

Per chunk c of one (batch, value head), with the state S [dk, dv] float32 in VMEM scratch:
  A     = strictly_lower(beta k k^T exp(G_i - G_j))        ("kkt")
  T     = (I + A)^-1                                       ("solve", doubling on the MXU)
  w, u  = T (beta exp(G) k), T (beta v)                    ("wy")
  v_new = u - w S;  o = (q S) exp(G) + lower_incl(q k^T exp(G_i - G_j)) v_new     ("o")
  S     = exp(G_last) S + (k exp(G_last - G))^T v_new      ("h")
The chunk axis is sequential ("arbitrary"); Pallas pipelines the next chunk's DMA behind the
current chunk's compute.
"""

from __future__ import annotations

import functools

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
    # varlen: two scalar-prefetch refs first (reset [NC]: sequence a chunk starts, else -1;
    # chunk_seq [NC]: sequence of each chunk, used by the index maps of h0 and the final state).
    if varlen:
        reset_ref, _, *refs = all_refs
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
    # h0_ref [dk, dv]; o_ref [C, dv]; ht_ref [dk, dv]; s_ref (scratch) [dk, dv] float32.
    if has_initial_state:
        h0_ref, o_ref, ht_ref, s_ref = refs
    else:
        o_ref, ht_ref, s_ref = refs
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
    C = G_col.shape[0]
    g_last = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, (1, C), 1) == C - 1, G_row, 0.0))

    # kkt + solve + wy
    A = km.dot(kc, kc, trans_b=True) * beta * km.decay_matrix(G_col, G_row, strict=True)
    T = km.solve_unit_lower(A, precision=solve_precision).astype(cdt)
    w = km.dot(T, (k * (beta * jnp.exp(G_col))).astype(cdt))  # [C, dk]
    u = km.dot(T, (v_ref[...].astype(jnp.float32) * beta).astype(cdt))  # [C, dv]
    # h (v_new) and o
    S = s_ref[...]
    v_new = u - km.dot(w.astype(cdt), S.astype(cdt))  # [C, dv]
    vnc = v_new.astype(cdt)
    attn = km.dot(qc, kc, trans_b=True) * km.decay_matrix(G_col, G_row, strict=False)
    o = km.dot(qc, S.astype(cdt)) * jnp.exp(G_col) + km.dot(attn.astype(cdt), vnc)
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
      chunk-aligned; two scalar-prefetch arrays tell the kernel where each one starts).
      ``interpret``: False, or pltpu.InterpretParams() (True is turned into it).
    Returns: o [B, T, Hv, dv] in v.dtype, final_state [N, Hv, dk, dv] float32.
    """
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2], v.shape[3]
    n = Hv // Hk
    C = chunk_size
    if solve_precision is None:
        solve_precision = km.HIGHEST
    if interpret is True:
        interpret = pltpu.InterpretParams()
    cdt = k.dtype
    q, v = q.astype(cdt), v.astype(cdt)
    g, beta = g.astype(jnp.float32), beta.astype(jnp.float32)
    varlen = cu_seqlens is not None
    layout = None
    if varlen:
        layout = common.varlen_layout(cu_seqlens, T, C)
        q, k, v, g, beta = (common.gather_aligned(x, layout) for x in (q, k, v, g, beta))
        N = cu_seqlens.shape[0] - 1
        if initial_state is None:
            initial_state = jnp.zeros((N, Hv, dk, dv), jnp.float32)
    Tin = q.shape[1]
    Tp = -(-Tin // C) * C
    NC = Tp // C

    def head_major(x):  # [B, T, H, ...] -> [B, H, Tp, ...]
        x = jnp.pad(x, [(0, 0), (0, Tp - Tin)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x, 2, 1)

    qh, kh, vh = head_major(q), head_major(k), head_major(v)
    gh = head_major(g)  # [B, Hv, Tp]
    G = jnp.cumsum(gh.reshape(B, Hv, NC, C), axis=-1)
    G_col = G.reshape(B, Hv, Tp, 1)
    G_row = G.reshape(B, Hv, NC, 1, C)
    bh = head_major(beta).reshape(B, Hv, Tp, 1)

    kernel = functools.partial(
        _kernel,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        has_initial_state=initial_state is not None,
        solve_precision=solve_precision,
        varlen=varlen,
    )
    if varlen:
        # Index maps get the scalar-prefetch refs (reset, chunk_seq) as trailing arguments.
        def state_map(b, h, c, reset, cseq):
            return (cseq[c], h, 0, 0)
    else:

        def state_map(b, h, c, *_):
            return (b, h, 0, 0)

    in_specs = [
        pl.BlockSpec((None, None, C, dk), lambda b, h, c, *_: (b, lax.div(h, n), c, 0)),
        pl.BlockSpec((None, None, C, dk), lambda b, h, c, *_: (b, lax.div(h, n), c, 0)),
        pl.BlockSpec((None, None, C, dv), lambda b, h, c, *_: (b, h, c, 0)),
        pl.BlockSpec((None, None, C, 1), lambda b, h, c, *_: (b, h, c, 0)),
        pl.BlockSpec((None, None, None, 1, C), lambda b, h, c, *_: (b, h, c, 0, 0)),
        pl.BlockSpec((None, None, C, 1), lambda b, h, c, *_: (b, h, c, 0)),
    ]
    args = [qh, kh, vh, G_col, G_row, bh]
    if initial_state is not None:
        in_specs.append(pl.BlockSpec((None, None, dk, dv), state_map))
        args.append(initial_state.astype(jnp.float32))
    n_states = initial_state.shape[0] if varlen else B
    out_specs = [
        pl.BlockSpec((None, None, C, dv), lambda b, h, c, *_: (b, h, c, 0)),
        pl.BlockSpec((None, None, dk, dv), state_map),
    ]
    prefetch = []
    if varlen:
        reset = jnp.where(layout.chunk_start, layout.chunk_seq, -1).astype(jnp.int32)
        cseq = jnp.minimum(layout.chunk_seq, N - 1).astype(jnp.int32)
        prefetch = [reset, cseq]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(B, Hv, NC),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
    )
    o, final = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((B, Hv, Tp, dv), v.dtype),
            jax.ShapeDtypeStruct((n_states, Hv, dk, dv), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="gdn_chunk_fwd_tpu",
    )(*prefetch, *args)
    o = jnp.moveaxis(o, 1, 2)
    if not varlen:
        return o[:, :T], final
    final = jnp.where((layout.last_chunk >= 0)[:, None, None, None], final, initial_state)
    return common.scatter_packed(o, layout), final
