"""Gated delta rule (Gated DeltaNet) ops: public entry points dispatching by backend.

    from pallas_kernels.gated_delta_rule import (
        chunk_gated_delta_rule, fused_recurrent_gated_delta_rule)
    o, final_state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0,
                                            output_final_state=True, use_qk_l2norm_in_kernel=True)

Contract (FLA's ``chunk_gated_delta_rule``): q, k [B, T, Hk, dk]; v [B, T, Hv, dv] with
Hv = n * Hk (value head h reads key head h // n); g [B, T, Hv] log decay (float32); beta
[B, T, Hv]; state [N, Hv, dk, dv] float32. Math: Yang et al. 2024, "Gated Delta Networks"
(arXiv:2412.06464); see ``reference.py`` for the exact recurrence and its chunked form, and
``ops.py`` for the backends (``impl``) and how gradients are computed.

Layout of this package (stages named like FLA's: cumsum, kkt, solve, wy, h, o):
  common.py        argument checks, input preparation, varlen (cu_seqlens) layout
  reference.py     pure jnp: recurrent (lax.scan) and chunked (stage functions) references
  kernel_math.py   in-kernel building blocks shared by the Pallas kernels (solve by doubling...)
  gpu_triton/      Pallas kernels, Triton lowering: kkt_solve_wy, h, o, decode; fwd pipeline;
                   backward stages dv_local, dh, dqkwg, wy_bwd; bwd pipeline
  gpu_mosaic/      Pallas kernels, Mosaic GPU (Hopper): the forward's state pass and outputs fused;
                   fwd pipeline (w and u from gpu_triton's kkt_solve_wy)
  tpu/             Pallas kernels, Mosaic TPU: fused chunk forward, fused chunk backward, decode
  ops.py           public ops, backend switch, custom_vjp
"""

from pallas_kernels.gated_delta_rule.ops import (
    IMPLS,
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    resolve_impl,
)
from pallas_kernels.gated_delta_rule.reference import (
    chunk_gated_delta_rule_ref,
    recurrent_gated_delta_rule,
)

__all__ = [
    "IMPLS",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_ref",
    "fused_recurrent_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "resolve_impl",
]
