"""The built-in tiny demo model: Qwen3-Next's layer pattern at toy width, random weights,
a byte-level vocabulary. It lets a fresh install run ``qnext generate`` offline; its text is
noise, not language."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.convert.name_map import FLOAT32_NAMES
from qnext_jax.modeling import Qwen3NextForCausalLM

DEMO_CONFIG = Qwen3NextConfig(
    vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, max_position_embeddings=4096, eos_token_id=256,
    bos_token_id=257, torch_dtype="float32",
)


def demo_model(seed: int = 0, dtype=None) -> tuple[Qwen3NextConfig, dict]:
    """(config, params) of the demo model, params drawn with ``jax.random.key(seed)``; with
    ``dtype``, floating params cast to it except those ``load(..., dtype=)`` also keeps in
    float32 (``FLOAT32_NAMES``)."""
    model = Qwen3NextForCausalLM(DEMO_CONFIG)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(seed), ids)["params"]
    if dtype is not None:
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x if path[-1].key in FLOAT32_NAMES
            or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype), params)
    return DEMO_CONFIG, params
