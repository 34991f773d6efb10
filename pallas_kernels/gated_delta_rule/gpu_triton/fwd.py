"""The chunked forward on GPU (Pallas, Triton lowering): cumsum -> kkt/solve/wy -> h -> o."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import kernel_math as km
from pallas_kernels.gated_delta_rule.gpu_triton.h import chunk_fwd_h
from pallas_kernels.gated_delta_rule.gpu_triton.kkt_solve_wy import chunk_kkt_solve_wy
from pallas_kernels.gated_delta_rule.gpu_triton.o import chunk_fwd_o


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and launch parameters of the forward kernels (tune per GPU).

  chunk: tokens per chunk (the C of the WY form; a power of two >= 16).
  block_v_h / block_v_o: columns of the value dimension per program in stages "h" / "o".
  """

  chunk: int = 64
  block_v_h: int = 64
  block_v_o: int = 64
  num_warps_wy: int = 4
  num_warps_h: int = 4
  num_warps_o: int = 4
  num_stages: int = 2


def chunk_local_cumsum(g: jax.Array, chunk: int) -> jax.Array:
  """Stage "cumsum": [B, Tp, H] float32 -> inclusive cumsum of g inside each chunk."""
  B, Tp, H = g.shape
  return jnp.cumsum(g.reshape(B, Tp // chunk, chunk, H), axis=2).reshape(B, Tp, H)


def pad_to_chunks(x: jax.Array, Tp: int) -> jax.Array:
  T = x.shape[1]
  if T == Tp:
    return x
  return jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))


def chunk_gated_delta_rule_fwd(
    q, k, v, g, beta, *, scale: float, initial_state=None, use_qk_l2norm: bool = False,
    block_sizes: BlockSizes = BlockSizes(), solve_precision=None, interpret: bool = False,
):
  """Forward of the chunked gated delta rule (no varlen; validated inputs).

  Args: q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g, beta [B, T, Hv]; initial_state [B, Hv, dk, dv]
    float32 or None. q/k/v share one dtype (the compute dtype of the matmuls).
  Returns: o [B, T, Hv, dv] in v.dtype, final_state [B, Hv, dk, dv] float32.
  """
  B, T, Hk, dk = q.shape
  C = block_sizes.chunk
  Tp = -(-T // C) * C
  cdt = k.dtype
  if solve_precision is None:
    solve_precision = km.HIGHEST
  q, k, v = (pad_to_chunks(x, Tp) for x in (q, k.astype(cdt), v.astype(cdt)))
  g = pad_to_chunks(g.astype(jnp.float32), Tp)
  beta = pad_to_chunks(beta.astype(jnp.float32), Tp)
  G = chunk_local_cumsum(g, C)
  w, u = chunk_kkt_solve_wy(k, v, G, beta, chunk_size=C, use_qk_l2norm=use_qk_l2norm,
                            solve_precision=solve_precision,
                            num_warps=block_sizes.num_warps_wy,
                            num_stages=block_sizes.num_stages, interpret=interpret)
  h, v_new, final = chunk_fwd_h(k, w, u, G, initial_state, chunk_size=C,
                                block_v=block_sizes.block_v_h, use_qk_l2norm=use_qk_l2norm,
                                num_warps=block_sizes.num_warps_h,
                                num_stages=block_sizes.num_stages, interpret=interpret)
  o = chunk_fwd_o(q, k, G, h, v_new, scale=scale, out_dtype=v.dtype, chunk_size=C,
                  block_v=block_sizes.block_v_o, use_qk_l2norm=use_qk_l2norm,
                  num_warps=block_sizes.num_warps_o, num_stages=block_sizes.num_stages,
                  interpret=interpret)
  return o[:, :T], final
