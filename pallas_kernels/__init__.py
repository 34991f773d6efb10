"""Hand-written Pallas kernels used by qnext-jax.

This package does not import ``qnext_jax``; it can be used on its own.

Subpackages:
  gated_delta_rule: the chunked and recurrent Gated DeltaNet (Yang et al. 2024), with a pure-jnp
    reference and Pallas kernels for GPU (Triton lowering) and TPU (Mosaic).
  moe: the decode MoE experts read in place by expert id (Pallas Triton) and their jnp form.
"""
