"""The chunked forward with the Mosaic GPU state/output kernel (Hopper).

cumsum (XLA) -> kkt/solve/wy (the Triton kernel, gpu_triton/kkt_solve_wy.py) -> stages "h" and "o"
fused (state_output.py, Mosaic GPU). With use_qk_l2norm, q and k are normalised once in XLA and
both kernels read the normalised copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule import kernel_math as km
from pallas_kernels.gated_delta_rule.gpu_mosaic.state_output import chunk_fwd_state_output
from pallas_kernels.gated_delta_rule.gpu_triton.fwd import (
    BlockSizes,
    chunk_layout,
    chunk_local_cumsum,
    compiled_f32_dots,
)
from pallas_kernels.gated_delta_rule.gpu_triton.kkt_solve_wy import chunk_kkt_solve_wy

#: Compute dtypes of the Mosaic GPU kernel (WGMMA's 16-bit operand kinds).
DTYPES = (jnp.bfloat16, jnp.float16)


def supports(dtype, cu_seqlens, dk: int, dv: int, chunk_size: int) -> bool:
    """The inputs the Mosaic GPU forward takes: q/k/v of a 16-bit dtype, dense (no cu_seqlens),
    head dims dk, dv and chunk_size multiples of 64 (WGMMA tiles)."""
    return (
        jnp.dtype(dtype) in map(jnp.dtype, DTYPES)
        and cu_seqlens is None
        and dk % 64 == 0
        and dv % 64 == 0
        and chunk_size % 64 == 0
    )


def check_device(device) -> None:
    """Raises ValueError when ``device`` (a jax Device) is a GPU other than a Hopper (compute
    capability 9.x), the one Mosaic GPU target with WGMMA. Other platforms pass: from a CPU the
    kernel is only exported (``jax.export`` for "cuda") or interpreted."""
    cc = getattr(device, "compute_capability", None)
    if device.platform == "gpu" and not str(cc).startswith("9."):
        raise ValueError(
            "chunk_gated_delta_rule: impl='pallas_mosaic_gpu' needs a Hopper GPU (compute "
            f"capability 9.x), got {device.device_kind!r} (platform {device.platform}, compute "
            f"capability {cc}); use impl='pallas_triton' or 'auto'"
        )


@compiled_f32_dots
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
    block_sizes: BlockSizes | None = None,
    block_v: int = 64,
    max_concurrent_steps: int = 2,
    interpret: bool = False,
):
    """Forward of the chunked gated delta rule (validated, dense inputs; see ``supports``).

    Args: q, k [B, T, Hk, dk]; v [B, T, Hv, dv] in one 16-bit dtype; g, beta [B, T, Hv];
      initial_state [B, Hv, dk, dv] float32 or None. block_sizes: the Triton kkt/solve/wy
      launch (chunk, num_warps_wy, num_stages; default BlockSizes()); block_v,
      max_concurrent_steps: the Mosaic GPU kernel's value columns per program and chunks in
      flight.
    Returns: o [B, T, Hv, dv] in v.dtype, final_state [B, Hv, dk, dv] float32.
    Raises: ValueError (compiled, not interpret) when the default device is another GPU than a
      Hopper.
    """
    if not interpret:
        check_device(jax.devices()[0])
    block_sizes = block_sizes or BlockSizes()
    C = block_sizes.chunk
    cdt = v.dtype
    B, T, _, dk = q.shape
    Hv, dv = v.shape[2], v.shape[3]
    lay = chunk_layout(T, C)
    if use_qk_l2norm:
        q, k = common.l2norm(q), common.l2norm(k)
    q, k, v = (lay.to_chunks(x.astype(cdt)) for x in (q, k, v))
    g, beta = (lay.to_chunks(x.astype(jnp.float32)) for x in (g, beta))
    G = chunk_local_cumsum(g, C)
    w, u = chunk_kkt_solve_wy(
        k,
        v,
        G,
        beta,
        chunk_size=C,
        solve_precision=km.mm_precision(cdt),
        num_warps=block_sizes.num_warps_wy,
        num_stages=block_sizes.num_stages,
        interpret=interpret,
    )
    if initial_state is None:
        initial_state = jnp.zeros((B, Hv, dk, dv), jnp.float32)
    o, final = chunk_fwd_state_output(
        q,
        k,
        w,
        u,
        G.transpose(0, 2, 1),
        initial_state.astype(jnp.float32),
        scale=scale,
        chunk_size=C,
        block_v=block_v,
        max_concurrent_steps=max_concurrent_steps,
        interpret=interpret,
    )
    return lay.from_chunks(o), final
