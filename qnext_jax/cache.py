"""The inference state pytree: K/V per attention layer, conv + recurrent state per GDN layer.

Layout (a plain dict, jit- and shard-friendly)::

    {"layers_{i}": {"key", "value": [B, S, Hkv, hd]}            # full-attention layer i
                or {"conv_state": [B, conv_dim, K-1],            # Gated DeltaNet layer i
                    "recurrent_state": [B, Hv, dk, dv] float32},
     "mtp": {"layers_0": {"key", "value": ...}},                 # when the model has an MTP head
     "index": int32 scalar,       # slots filled so far (all sequences share the slot axis)
     "positions": [B] int32,      # next RoPE position of each sequence (real tokens so far)
     "valid": [B, S] bool}        # which slots hold real tokens (False on padding)
"""

from __future__ import annotations

import jax.numpy as jnp

from qnext_jax.config import Qwen3NextConfig


def _kv(config: Qwen3NextConfig, batch_size: int, max_length: int, dtype) -> dict:
    shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
    return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


def init_cache(config: Qwen3NextConfig, batch_size: int, max_length: int,
               dtype=jnp.float32) -> dict:
    """An empty cache for ``batch_size`` sequences of up to ``max_length`` slots.

    Args:
      config: the model config.
      batch_size: B.
      max_length: S, slots for prompt + generated tokens (padding included).
      dtype: dtype of K/V and the conv state; the recurrent state is always float32.
    Raises:
      ValueError: non-positive sizes.
    """
    if batch_size <= 0 or max_length <= 0:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, "
                         f"{max_length}")
    cache: dict = {}
    K = config.linear_conv_kernel_dim
    for i in range(config.num_hidden_layers):
        if config.is_full_attention(i):
            cache[f"layers_{i}"] = _kv(config, batch_size, max_length, dtype)
        else:
            cache[f"layers_{i}"] = {
                "conv_state": jnp.zeros((batch_size, config.linear_conv_dim, K - 1), dtype),
                "recurrent_state": jnp.zeros(
                    (batch_size, config.linear_num_value_heads, config.linear_key_head_dim,
                     config.linear_value_head_dim), jnp.float32),
            }
    if config.mtp_num_hidden_layers > 0:
        cache["mtp"] = {f"layers_{i}": _kv(config, batch_size, max_length, dtype)
                        for i in range(config.mtp_num_hidden_layers)}
    cache["index"] = jnp.zeros((), jnp.int32)
    cache["positions"] = jnp.zeros((batch_size,), jnp.int32)
    cache["valid"] = jnp.zeros((batch_size, max_length), bool)
    return cache
