"""Shared building blocks: the linear layer of the model's projections (and its kernel alone,
for weights handed to a Pallas kernel), and the optional tokamax import (attention and
grouped-matmul kernels on GPU)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def dense(features: int, *, name: str, dtype, param_dtype, precision, std: float,
          use_bias: bool = False) -> nn.Dense:
    """A Linen ``Dense`` ([in, out] kernel, the transpose of torch's Linear weight)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    precision=precision, kernel_init=nn.initializers.normal(std),
                    bias_init=nn.initializers.zeros, name=name)


class DenseKernel(nn.Module):
    """The ``kernel`` [in, out] of a bias-free :func:`dense` of the same name alone (same param
    path and init), for a caller that hands the weights to a kernel instead of a matmul."""

    shape: tuple[int, int]
    std: float
    param_dtype: Any

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.initializers.normal(self.std), self.shape,
                          self.param_dtype)


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
