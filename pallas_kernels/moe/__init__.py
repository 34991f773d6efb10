"""Mixture-of-experts kernels.

gathered_experts: each token's top-k experts applied straight from the stacked expert weights
(decode: few tokens, so only the chosen experts' weights are read), a Pallas Triton kernel and
its jnp reference.
"""

from pallas_kernels.moe.gathered_experts import (
    BlockSizes,
    gathered_expert_outputs,
    gathered_expert_outputs_reference,
    gathered_experts,
    gathered_experts_reference,
)

__all__ = ["BlockSizes", "gathered_expert_outputs", "gathered_expert_outputs_reference",
           "gathered_experts", "gathered_experts_reference"]
