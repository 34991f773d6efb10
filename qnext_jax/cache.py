"""The inference state pytree: K/V per attention layer, conv + recurrent state per GDN layer.

Layout (a plain dict, jit- and shard-friendly)::

    {"layers_{i}": {"key", "value": [B, Hkv, S, hd]}            # full-attention layer i
                or {"conv_state": [B, conv_dim, K-1],            # GDN layer i (channels per key head)
                    "recurrent_state": [B, Hv, dk, dv] float32},
     "mtp": {"layers_0": {"key", "value": ...}},                 # when the model has an MTP head
     "index": int32 scalar,       # slots filled so far (all sequences share the slot axis)
     "positions": [B] int32,      # next RoPE position of each sequence (real tokens so far)
     "valid": [B, S] bool}        # which slots hold real tokens (False on padding)

The stacked layout, for a model with ``scan_layers=True`` (``init_cache(..., scan_layers=True)``),
mirrors the scanned params (``qnext_jax.modeling.decoder``): the layer pattern has period P, and
``"blocks": {"layers_{j}": ...}`` (j < P) replaces the ``layers_{i}`` entries, each leaf with a
leading block axis of size L / P: ``cache["blocks"]["layers_{j}"][...][b]`` is the per-layer
``cache["layers_{b * P + j}"][...]``. The MTP entry, index, positions and valid are the same in
both layouts. :func:`stack_cache` and :func:`unstack_cache` convert (exactly).

Speculative decoding keeps each Gated DeltaNet layer's state after every verified token
(:func:`track_token_states`) and then keeps the state after the accepted one
(:func:`keep_token_state`); both work on either layout.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling.decoder import BLOCKS, scan_period, stack_layers, unstack_layers


def _kv(config: Qwen3NextConfig, batch_size: int, max_length: int, dtype, lead=()) -> dict:
    shape = lead + (batch_size, config.num_key_value_heads, max_length, config.head_dim)
    return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


def _layer_cache(config: Qwen3NextConfig, i: int, batch_size: int, max_length: int, dtype,
                 lead=()) -> dict:
    """The empty cache of layer i (of its kind), with extra leading axes ``lead``."""
    if config.is_full_attention(i):
        return _kv(config, batch_size, max_length, dtype, lead)
    K = config.linear_conv_kernel_dim
    return {
        "conv_state": jnp.zeros(lead + (batch_size, config.linear_conv_dim, K - 1), dtype),
        "recurrent_state": jnp.zeros(
            lead + (batch_size, config.linear_num_value_heads, config.linear_key_head_dim,
                    config.linear_value_head_dim), jnp.float32),
    }


def init_cache(config: Qwen3NextConfig, batch_size: int, max_length: int,
               dtype=jnp.float32, scan_layers: bool = False) -> dict:
    """An empty cache for ``batch_size`` sequences of up to ``max_length`` slots.

    Args:
      config: the model config.
      batch_size: B.
      max_length: S, slots for prompt + generated tokens (padding included).
      dtype: dtype of K/V and the conv state; the recurrent state is always float32.
      scan_layers: the stacked layout (module docstring) of a ``scan_layers=True`` model; its
        arrays are created stacked (never per layer first).
    Raises:
      ValueError: non-positive sizes; with ``scan_layers``, a layer pattern that does not
        repeat (``scan_period``).
    """
    if batch_size <= 0 or max_length <= 0:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, "
                         f"{max_length}")
    cache: dict = {}
    L = config.num_hidden_layers
    if scan_layers:
        P = scan_period(config)
        cache[BLOCKS] = {f"layers_{j}": _layer_cache(config, j, batch_size, max_length, dtype,
                                                     (L // P,)) for j in range(P)}
    else:
        for i in range(L):
            cache[f"layers_{i}"] = _layer_cache(config, i, batch_size, max_length, dtype)
    if config.mtp_num_hidden_layers > 0:
        cache["mtp"] = {f"layers_{i}": _kv(config, batch_size, max_length, dtype)
                        for i in range(config.mtp_num_hidden_layers)}
    cache["index"] = jnp.zeros((), jnp.int32)
    cache["positions"] = jnp.zeros((batch_size,), jnp.int32)
    cache["valid"] = jnp.zeros((batch_size, max_length), bool)
    return cache


def is_stacked(cache: dict) -> bool:
    """Whether ``cache`` has the stacked layout of a ``scan_layers`` model."""
    return BLOCKS in cache


def stack_cache(cache: dict, config: Qwen3NextConfig) -> dict:
    """Per-layer cache -> the stacked layout (module docstring). Raises ValueError for a
    non-periodic layer pattern or a missing layer."""
    return stack_layers(cache, config)


def unstack_cache(cache: dict, config: Qwen3NextConfig) -> dict:
    """Stacked cache -> per layer: the inverse of :func:`stack_cache`. Raises ValueError
    without a ``"blocks"`` entry or with a block axis that is not L / P long."""
    return unstack_layers(cache, config)


def _map_gdn_layers(cache: dict, fn: Callable[[dict, int], dict]) -> dict:
    """``fn(layer_cache, block_axes)`` on each Gated DeltaNet layer's entry (``block_axes``: 1
    for the entries of the stacked layout, 0 per layer); other entries are kept."""
    out = dict(cache)
    gdn = lambda c: isinstance(c, dict) and "conv_state" in c
    if BLOCKS in cache:
        out[BLOCKS] = {k: fn(c, 1) if gdn(c) else c for k, c in cache[BLOCKS].items()}
    for k, c in cache.items():
        if k.startswith("layers_") and gdn(c):
            out[k] = fn(c, 0)
    return out


def track_token_states(cache: dict) -> dict:
    """Mark every Gated DeltaNet layer so that the next forward also returns its state after
    each new token: "conv_states" [B, T, conv_dim, K-1] and "recurrent_states" [B, T, Hv, dk,
    dv] (behind the block axis in the stacked layout). See ``Qwen3NextGatedDeltaNet``."""
    return _map_gdn_layers(cache, lambda c, nb: {
        **c, "per_token_states": jnp.zeros(c["conv_state"].shape[:nb], bool)})


def keep_token_state(cache: dict, index) -> dict:
    """The cache returned by a forward on a :func:`track_token_states` cache, with each Gated
    DeltaNet layer's state rolled back to the one after new token ``index`` (an int32 scalar,
    may be traced); the per-token entries are dropped. K/V, index, positions and valid are
    left to the caller."""
    def keep(c, nb):
        take = lambda x: jax.lax.dynamic_index_in_dim(x, index, axis=nb + 1,
                                                      keepdims=False)
        return {"conv_state": take(c["conv_states"]),
                "recurrent_state": take(c["recurrent_states"])}
    return _map_gdn_layers(cache, keep)
