"""The chunked forward on GPU (Pallas, Triton lowering): cumsum -> kkt/solve/wy -> h -> o."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import common
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
    block_v_h: int = 32
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
    block_sizes: BlockSizes = BlockSizes(),
    solve_precision=None,
    interpret: bool = False,
):
    """Forward of the chunked gated delta rule (validated inputs).

    Args: q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g, beta [B, T, Hv]; initial_state [N, Hv, dk, dv]
      float32 or None; cu_seqlens [N + 1] int32 or None (then B == 1; sequences are re-laid out
      chunk-aligned and the state pass restarts at each one). q/k/v share one dtype, the compute
      dtype of the matmuls. solve_precision: precision of the (I + A)^-1 matmuls (float32
      operands); default exact float32 for float32 inputs and TF32 for bf16 inputs.
    Returns: o [B, T, Hv, dv] in v.dtype, final_state [N, Hv, dk, dv] float32.
    """
    T, dk = q.shape[1], q.shape[3]
    Hv, dv = v.shape[2], v.shape[3]
    C = block_sizes.chunk
    cdt = k.dtype
    if solve_precision is None:
        solve_precision = km.HIGHEST if cdt == jnp.float32 else km.DEFAULT
    q, k, v = q.astype(cdt), k.astype(cdt), v.astype(cdt)
    g, beta = g.astype(jnp.float32), beta.astype(jnp.float32)
    layout = None
    if cu_seqlens is not None:
        layout = common.varlen_layout(cu_seqlens, T, C)
        q, k, v, g, beta = (common.gather_aligned(x, layout) for x in (q, k, v, g, beta))
        Tp = q.shape[1]
        N = cu_seqlens.shape[0] - 1
        Np = 1 << max(0, (N - 1).bit_length())  # Triton blocks want power-of-two sizes
        s0 = (
            jnp.zeros((N, Hv, dk, dv), jnp.float32)
            if initial_state is None
            else initial_state.astype(jnp.float32)
        )
        s0p = jnp.pad(s0, [(0, Np - N), (0, 0), (0, 0), (0, 0)])
        NC = Tp // C
        seq_ids = jnp.arange(N, dtype=jnp.int32)
        chunk_reset = jnp.where(layout.chunk_start, layout.chunk_seq, -1).astype(jnp.int32)
        chunk_last = (
            jnp.full((NC,), -1, jnp.int32)
            .at[jnp.where(layout.last_chunk >= 0, layout.last_chunk, NC)]
            .set(seq_ids, mode="drop")
        )
    else:
        Tp = -(-T // C) * C
        q, k, v, g, beta = (pad_to_chunks(x, Tp) for x in (q, k, v, g, beta))
        s0p, chunk_reset, chunk_last = initial_state, None, None
    G = chunk_local_cumsum(g, C)
    w, u = chunk_kkt_solve_wy(
        k,
        v,
        G,
        beta,
        chunk_size=C,
        use_qk_l2norm=use_qk_l2norm,
        solve_precision=solve_precision,
        num_warps=block_sizes.num_warps_wy,
        num_stages=block_sizes.num_stages,
        interpret=interpret,
    )
    h, v_new, final = chunk_fwd_h(
        k,
        w,
        u,
        G,
        s0p,
        chunk_reset=chunk_reset,
        chunk_last=chunk_last,
        chunk_size=C,
        block_v=block_sizes.block_v_h,
        use_qk_l2norm=use_qk_l2norm,
        num_warps=block_sizes.num_warps_h,
        num_stages=block_sizes.num_stages,
        interpret=interpret,
    )
    o = chunk_fwd_o(
        q,
        k,
        G,
        h,
        v_new,
        scale=scale,
        out_dtype=v.dtype,
        chunk_size=C,
        block_v=block_sizes.block_v_o,
        use_qk_l2norm=use_qk_l2norm,
        num_warps=block_sizes.num_warps_o,
        num_stages=block_sizes.num_stages,
        interpret=interpret,
    )
    if layout is None:
        return o[:, :T], final
    final = jnp.where((layout.last_chunk >= 0)[:, None, None, None], final[:N], s0)
    return common.scatter_packed(o, layout), final
