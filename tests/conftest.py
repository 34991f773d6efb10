"""Shared fixtures: tiny configs and randomly initialised params (jitted init, cached)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling import Qwen3NextForCausalLM

# Compiled programs are shared between test processes (xdist workers) and runs.
jax.config.update("jax_compilation_cache_dir", "/tmp/qnext-jax-test-xla-cache")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=8,
    num_experts_per_tok=3, moe_intermediate_size=16, shared_expert_intermediate_size=16,
)

# The 80B layer pattern (3 Gated DeltaNet + 1 attention, sparse MoE everywhere) over two periods,
# with an MTP head: the scanned model's (scan_layers) cached-generation checks.
SCAN_TWO_PERIODS = {"num_hidden_layers": 8, "mtp_num_hidden_layers": 1}


def tiny_config(**overrides) -> Qwen3NextConfig:
    return Qwen3NextConfig(**{**TINY, **overrides})


def _random_leaf(path, shape, rng: np.random.Generator, scale: float) -> np.ndarray:
    name = jax.tree_util.keystr(path)
    if name.endswith("['A_log']"):  # exp(A_log) in [1, 16): a real decay
        return np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
    if name.endswith("['dt_bias']"):
        return (1.0 + scale * rng.standard_normal(shape)).astype(np.float32)
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def init_params(config: Qwen3NextConfig, seed: int = 0, scale: float = 0.3):
    """Random float32 params of ``config``: the tree of ``model.init`` (taken abstractly, so
    nothing is compiled), every leaf drawn afresh, norm weights included, so no block is
    trivial."""
    model = Qwen3NextForCausalLM(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray(_random_leaf(p, s.shape, rng, scale)), shapes["params"])


@pytest.fixture
def rng():
    return np.random.default_rng()


def pytest_collection_modifyitems(config, items):
    """Skip tests marked gpu / tpu unless JAX sees such a device."""
    platforms = {d.platform for d in jax.devices()}
    for item in items:
        for mark, platform in (("gpu", "gpu"), ("tpu", "tpu")):
            if mark in item.keywords and platform not in platforms:
                item.add_marker(pytest.mark.skip(reason=f"needs a {platform.upper()} "
                                                        "(run on the device machine)"))
