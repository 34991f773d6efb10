"""The chunked backward on GPU (Pallas, Triton lowering).

Recomputes what the forward produced between its stages (cheaper in memory than storing it):
G (cumsum), w, u and each chunk's (I + A)^-1 (kkt/solve/wy) and h, v_new (the state pass), unless
the forward kept them (BlockSizes.save_states), then runs the backward stages
  dv_local.py  d(v_new) from the outputs of the same chunk (by default computed inside dh.py's
               pass instead: BlockSizes.fuse_dv_local)
  dh.py        the reverse pass over chunks: d(state) per chunk, total d(v_new), d(initial state)
  dqkwg.py     d(q), d(k), d(G) through the states and the intra-chunk attention
  wy_bwd.py    d(w), then d(k), d(v), d(beta), d(G) through w and u (A recomputed)
and d(g) = the reverse chunk-local cumsum of d(G). With use_qk_l2norm, the kernels take the
normalised q, k and the gradient goes back through the L2 norm, summed over the value heads of
each key head, in l2norm_bwd.py.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule import kernel_math as km
from pallas_kernels.gated_delta_rule.gpu_triton.dh import chunk_bwd_dh
from pallas_kernels.gated_delta_rule.gpu_triton.dh_split import chunk_bwd_dh_split
from pallas_kernels.gated_delta_rule.gpu_triton.dqkwg import chunk_bwd_dqkwg
from pallas_kernels.gated_delta_rule.gpu_triton.dv_local import chunk_bwd_dv_local
from pallas_kernels.gated_delta_rule.gpu_triton.fwd import (
    BlockSizes,
    chunk_layout,
    chunk_local_cumsum,
    chunk_states,
    compiled_f32_dots,
    state_block_v,
)
from pallas_kernels.gated_delta_rule.gpu_triton.l2norm_bwd import l2norm_bwd_heads
from pallas_kernels.gated_delta_rule.gpu_triton.wy_bwd import chunk_bwd_wy


@compiled_f32_dots
def chunk_gated_delta_rule_bwd(
    q,
    k,
    v,
    g,
    beta,
    do,
    dht,
    *,
    scale: float,
    initial_state=None,
    use_qk_l2norm: bool = False,
    cu_seqlens=None,
    block_sizes: BlockSizes | None = None,
    solve_precision=None,
    interpret: bool = False,
    states=None,
):
    """Backward of ``fwd.chunk_gated_delta_rule_fwd`` (validated inputs, same arguments).

    Args:
      q, k: [B, T, Hk, dk]; v: [B, T, Hv, dv] (one dtype, the compute dtype of the matmuls).
      g, beta: [B, T, Hv]; initial_state: [N, Hv, dk, dv] float32 or None; cu_seqlens: [N + 1]
        int32 or None (then B == 1).
      do: [B, T, Hv, dv], the cotangent of o; dht: [N, Hv, dk, dv] float32, the cotangent of the
        final state (zeros when it is not used).
      block_sizes: the forward's (default BlockSizes()); solve_precision: as for the forward
        (default: as the forward's).
      states: None (recompute), or the forward's (w, h, v_new, inverse[, q_normalised,
        k_normalised]) from ``chunk_gated_delta_rule_fwd(..., return_states=True)``
        (BlockSizes.save_states).
    Returns:
      dq, dk [B, T, Hk, dk] (summed over the value heads of each key head), dv [B, T, Hv, dv],
      in the compute dtype; dg, dbeta [B, T, Hv] float32 (d(g) of the log decay itself);
      d(initial_state) [N, Hv, dk, dv] float32, or None when initial_state is None.
    """
    B, T, Hk, dk = q.shape
    n = v.shape[2] // Hk
    block_sizes = block_sizes or BlockSizes()
    C = block_sizes.chunk
    cdt = k.dtype
    f32 = jnp.float32
    if solve_precision is None:
        solve_precision = km.mm_precision(cdt)
    q_in, k_in = q, k
    lay = chunk_layout(T, C, cu_seqlens)
    if states is not None and len(states) > 4:  # the forward's normalised q, k, chunk-aligned
        q, k = states[4:]
    else:
        if use_qk_l2norm:
            q, k = common.l2norm(q), common.l2norm(k)
        q, k = (lay.to_chunks(x.astype(cdt)) for x in (q, k))
    v, do = (lay.to_chunks(x.astype(cdt)) for x in (v, do))
    g, beta = (lay.to_chunks(x.astype(f32)) for x in (g, beta))
    G = chunk_local_cumsum(g, C)
    common_args = {"chunk_size": C, "num_stages": block_sizes.num_stages, "interpret": interpret}
    if states is None:
        w, h, v_new, _, inverse = chunk_states(
            k,
            v,
            G,
            beta,
            lay.kernel_initial_state(initial_state, dht.shape),
            lay,
            block_sizes=block_sizes,
            use_qk_l2norm=False,
            solve_precision=solve_precision,
            interpret=interpret,
            return_inverse=True,
        )
    else:
        w, h, v_new, inverse = states[:4]
    split = lay.varlen is None and block_sizes.seq_splits > 1
    fuse = block_sizes.fuse_dv_local and not split
    dv_local = None if fuse else chunk_bwd_dv_local(
        q,
        k,
        G,
        do,
        scale=scale,
        block_v=block_sizes.block_v_dv,
        num_warps=block_sizes.num_warps_dv,
        **common_args,
    )
    dh_args = {
        "scale": scale,
        "block_v": state_block_v(block_sizes.block_v_dh, v.shape),
        "num_warps": block_sizes.num_warps_dh,
        **common_args,
    }
    if split:
        dh, dv_new, dh0 = chunk_bwd_dh_split(
            q, k, w, G, do, dv_local, dht.astype(f32), segments=block_sizes.seq_splits, **dh_args
        )
    else:
        dh, dv_new, dh0 = chunk_bwd_dh(
            q,
            k,
            w,
            G,
            do,
            dv_local,
            dht.astype(f32) if lay.varlen is None else lay.pad_states(dht.astype(f32)),
            chunk_reset=lay.chunk_reset,
            chunk_last=lay.chunk_last,
            **dh_args,
        )
    dq_, dk_, dG = chunk_bwd_dqkwg(
        q,
        k,
        G,
        h,
        dh,
        v_new,
        do,
        scale=scale,
        block_v=block_sizes.block_v_dqkwg,
        block_k=block_sizes.block_k_dqkwg,
        num_warps=block_sizes.num_warps_dqkwg,
        **common_args,
    )
    dk_, dv_, dbeta, dG = chunk_bwd_wy(
        k,
        v,
        G,
        beta,
        inverse,
        h,
        dv_new,
        dk_,
        dG,
        solve_precision=solve_precision,
        num_warps=block_sizes.num_warps_wy_bwd,
        **common_args,
    )
    dg = chunk_local_cumsum(dG, C, reverse=True)
    dq_, dk_, dv_, dg, dbeta = (lay.from_chunks(x) for x in (dq_, dk_, dv_, dg, dbeta))
    if use_qk_l2norm:  # summed over the value heads inside the kernel
        dq_, dk_ = (l2norm_bwd_heads(x.astype(cdt), dx, interpret=interpret)
                    for x, dx in ((q_in, dq_), (k_in, dk_)))
    else:
        dq_, dk_ = (x.reshape(B, x.shape[1], Hk, n, dk).astype(f32).sum(axis=3)
                    for x in (dq_, dk_))
    if initial_state is None:
        dh0 = None
    elif lay.varlen is not None:  # an empty sequence passes its initial state through
        dh0 = jnp.where(lay.seq_has_tokens(), dh0[: dht.shape[0]], dht.astype(f32))
    return dq_.astype(cdt), dk_.astype(cdt), dv_.astype(cdt), dg, dbeta, dh0
