"""Mixture-of-experts kernels.

gathered_experts: each token's top-k experts applied straight from the stacked expert weights
(decode: few tokens, so only the chosen experts' weights are read), a Pallas Triton kernel and
its jnp reference; routed_experts: the same kernels given the router logits, routing each
token (softmax, top-k) and weighting its experts (and the gated shared expert) inside them.
"""

from pallas_kernels.moe.gathered_experts import (
    BlockSizes,
    gathered_expert_outputs,
    gathered_expert_outputs_reference,
    gathered_experts,
    gathered_experts_reference,
    routed_experts,
)

__all__ = ["BlockSizes", "gathered_expert_outputs", "gathered_expert_outputs_reference",
           "gathered_experts", "gathered_experts_reference", "routed_experts"]
