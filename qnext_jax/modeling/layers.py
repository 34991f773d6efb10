"""Shared building blocks: the bias-free linear layer every projection of the model uses, and
the optional tokamax import (attention and grouped-matmul kernels on GPU)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp


def dense(features: int, *, name: str, dtype, param_dtype, precision, std: float,
          use_bias: bool = False) -> nn.Dense:
    """A Linen ``Dense`` ([in, out] kernel, the transpose of torch's Linear weight)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    precision=precision, kernel_init=nn.initializers.normal(std),
                    bias_init=nn.initializers.zeros, name=name)


NEG_INF = float(jnp.finfo(jnp.float32).min)


@functools.cache
def import_tokamax():
    """(the tokamax module, None) or (None, the ImportError importing it raised); tried once:
    the import takes seconds."""
    try:
        import tokamax
    except ImportError as e:
        return None, e
    return tokamax, None
