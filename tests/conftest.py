"""Shared fixtures: tiny configs and randomly initialised params (jitted init, cached)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling import Qwen3NextForCausalLM

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=8,
    num_experts_per_tok=3, moe_intermediate_size=16, shared_expert_intermediate_size=16,
)


def tiny_config(**overrides) -> Qwen3NextConfig:
    return Qwen3NextConfig(**{**TINY, **overrides})


def randomize(params, seed: int, scale: float = 0.3):
    """Perturb every leaf (norm weights, A_log and dt_bias included) so no block is trivial."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    out = [np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.asarray(x).dtype)
           for x in leaves]
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in out])


@functools.lru_cache(maxsize=None)
def _init(config: Qwen3NextConfig, seed: int):
    model = Qwen3NextForCausalLM(config)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]
    return randomize(params, seed)


def init_params(config: Qwen3NextConfig, seed: int = 0):
    """Random float32 params of ``config`` (perturbed so that every block matters)."""
    return _init(config, seed)


@pytest.fixture
def rng():
    return np.random.default_rng()
