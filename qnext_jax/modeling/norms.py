"""RMS norms of Qwen3-Next (transformers' ``Qwen3NextRMSNorm`` and ``Qwen3NextRMSNormGated``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: ``y = x * rsqrt(mean(x^2) + eps) * (1 + w)``, float32 inside.

    The weight ``w`` [dim] is initialised to 0, so the initial scale is 1. Input [..., dim] of any
    float dtype; the output has the input's dtype.
    """

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        y = _rms_normalize(x, self.eps) * (1.0 + w.astype(jnp.float32))
        return y.astype(x.dtype)


class RMSNormGated(nn.Module):
    """The Gated DeltaNet output norm (NOT zero-centred), per value head.

    ``h = cast(x * rsqrt(mean(x^2) + eps), x.dtype) * w``, then ``h * silu(z)`` with ``silu`` in
    float32, cast back to ``x.dtype``. ``w`` [dv] is initialised to 1. x, z: [..., dv].
    """

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        h = w.astype(x.dtype) * _rms_normalize(x, self.eps).astype(x.dtype)
        return (h.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)
