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

from pallas_kernels.gated_delta_rule import kernel_math as km


def _kernel(q_ref, k_ref, v_ref, gc_ref, gr_ref, b_ref, *refs, scale, use_qk_l2norm,
            has_initial_state, solve_precision):
  # q_ref, k_ref [C, dk]; v_ref [C, dv]; gc_ref [C, 1]; gr_ref [1, C]; b_ref [C, 1];
  # h0_ref [dk, dv]; o_ref [C, dv]; ht_ref [dk, dv]; s_ref (scratch) [dk, dv] float32.
  if has_initial_state:
    h0_ref, o_ref, ht_ref, s_ref = refs
  else:
    o_ref, ht_ref, s_ref = refs
  c = pl.program_id(2)
  cdt = k_ref.dtype

  @pl.when(c == 0)
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

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    ht_ref[...] = S.astype(ht_ref.dtype)


def chunk_gated_delta_rule_fwd_tpu(
    q, k, v, g, beta, *, scale: float, initial_state=None, use_qk_l2norm: bool = False,
    chunk_size: int = 64, solve_precision=None, interpret=False,
):
  """Forward on TPU (validated inputs, no varlen).

  Args: q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g, beta [B, T, Hv]; initial_state [B, Hv, dk, dv]
    float32 or None. ``interpret``: False, or pltpu.InterpretParams() (True is turned into it).
  Returns: o [B, T, Hv, dv] in v.dtype, final_state [B, Hv, dk, dv] float32.
  """
  B, T, Hk, dk = q.shape
  Hv, dv = v.shape[2], v.shape[3]
  n = Hv // Hk
  C = chunk_size
  Tp = -(-T // C) * C
  NC = Tp // C
  if solve_precision is None:
    solve_precision = km.HIGHEST
  if interpret is True:
    interpret = pltpu.InterpretParams()
  cdt = k.dtype

  def head_major(x):  # [B, T, H, ...] -> [B, H, Tp, ...]
    x = jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x, 2, 1)

  qh, kh, vh = head_major(q.astype(cdt)), head_major(k), head_major(v.astype(cdt))
  gh = head_major(g.astype(jnp.float32))  # [B, Hv, Tp]
  G = jnp.cumsum(gh.reshape(B, Hv, NC, C), axis=-1)
  G_col = G.reshape(B, Hv, Tp, 1)
  G_row = G.reshape(B, Hv, NC, 1, C)
  bh = head_major(beta.astype(jnp.float32)).reshape(B, Hv, Tp, 1)

  kernel = functools.partial(_kernel, scale=scale, use_qk_l2norm=use_qk_l2norm,
                             has_initial_state=initial_state is not None,
                             solve_precision=solve_precision)
  in_specs = [
      pl.BlockSpec((None, None, C, dk), lambda b, h, c: (b, lax.div(h, n), c, 0)),
      pl.BlockSpec((None, None, C, dk), lambda b, h, c: (b, lax.div(h, n), c, 0)),
      pl.BlockSpec((None, None, C, dv), lambda b, h, c: (b, h, c, 0)),
      pl.BlockSpec((None, None, C, 1), lambda b, h, c: (b, h, c, 0)),
      pl.BlockSpec((None, None, None, 1, C), lambda b, h, c: (b, h, c, 0, 0)),
      pl.BlockSpec((None, None, C, 1), lambda b, h, c: (b, h, c, 0)),
  ]
  args = [qh, kh, vh, G_col, G_row, bh]
  if initial_state is not None:
    in_specs.append(pl.BlockSpec((None, None, dk, dv), lambda b, h, c: (b, h, 0, 0)))
    args.append(initial_state.astype(jnp.float32))
  o, final = pl.pallas_call(
      kernel,
      grid=(B, Hv, NC),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, None, C, dv), lambda b, h, c: (b, h, c, 0)),
          pl.BlockSpec((None, None, dk, dv), lambda b, h, c: (b, h, 0, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((B, Hv, Tp, dv), v.dtype),
          jax.ShapeDtypeStruct((B, Hv, dk, dv), jnp.float32),
      ],
      scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="gdn_chunk_fwd_tpu",
  )(*args)
  return jnp.moveaxis(o, 1, 2)[:, :T], final
