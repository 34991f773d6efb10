"""Shared building blocks: the linear layer of the model's projections (and its kernel alone,
for weights handed to a Pallas kernel), and the optional tokamax import (attention and
grouped-matmul kernels on GPU)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# XLA's GPU simplifier rewrites a dot of one row ([1, K] @ [K, N]: a vector after it drops the
# unit dims) whose operands hold fewer than this many elements together (K + K N) as a multiply
# and a reduce (gpu_algebraic_simplifier.cc, IsMatrixMultiplicationTooSmallForRewriting with
# threshold 10^7), and its fusion pass then writes the [K, N] product to HBM between the two
# kernels (jax 0.11.2, H200, the decode step of the 80B at batch 1: out_proj and o_proj,
# [4096, 2048], an 11 us multiply and a 17 us reduce each, 3x the bytes of the weight, with
# products rounded to bf16 before the sum). Such dots run with a zero second row instead: a
# [2, K] operand is no vector, so the dot reaches a GEMM kernel (float32 accumulation). There,
# 8 layers of the 80B at batch 1 went from 1.09 / 1.11 to 0.87 / 0.91 ms a token, the kernels'
# busy time from 1.01 to 0.80 ms a step (bench_model.py, two runs each, alternated).
XLA_GPU_DOT_REDUCE_ELEMENTS = 10_000_000


def _one_row_dot(x, features: int) -> bool:
    """Whether ``x [..., K] @ [K, features]`` is one row that XLA's GPU simplifier would turn
    into multiply + reduce (XLA_GPU_DOT_REDUCE_ELEMENTS)."""
    K = x.shape[-1]
    return (math.prod(x.shape[:-1]) == 1 and K * (features + 1) < XLA_GPU_DOT_REDUCE_ELEMENTS
            and _on_gpu())


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def row_matmul(matmul: Callable, x, features: int):
    """``matmul(x)`` for x [..., K] -> [..., features]; a single row on a GPU that XLA would
    strength-reduce (:func:`_one_row_dot`) goes in as two rows, the second zero, and comes back
    as the first. The same values: each output row depends on its input row alone."""
    if not _one_row_dot(x, features):
        return matmul(x)
    row = x.reshape(1, x.shape[-1])
    y = matmul(jnp.concatenate([row, jnp.zeros_like(row)]))[:1]
    return y.reshape(*x.shape[:-1], features)


class Dense(nn.Dense):
    """Linen ``Dense`` (same params) whose single-row calls on a GPU run through
    :func:`row_matmul`."""

    @nn.compact
    def __call__(self, inputs):
        return row_matmul(super().__call__, inputs, self.features)


def dense(features: int, *, name: str, dtype, param_dtype, precision, std: float,
          use_bias: bool = False) -> Dense:
    """A Linen ``Dense`` ([in, out] kernel, the transpose of torch's Linear weight; one row on a
    GPU as :class:`Dense` runs it)."""
    return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
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
