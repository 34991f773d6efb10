"""Flax (Linen) modules of Qwen3-Next, one concern per file."""

from qnext_jax.modeling.decoder import (Qwen3NextDecoderLayer, Qwen3NextForCausalLM,
                                        Qwen3NextMTP)

__all__ = ["Qwen3NextDecoderLayer", "Qwen3NextForCausalLM", "Qwen3NextMTP"]
