"""The built-in tiny demo model: Qwen3-Next's layer pattern at toy width, random weights,
a byte-level vocabulary. It lets a fresh install run ``qnext generate`` offline; its text is
noise, not language. :func:`save_demo_checkpoint` writes it as an HF checkpoint with a
byte-level tokenizer and a chat template, so that what needs a checkpoint (``qnext finetune``,
``--chat``, ``convert`` / ``export``, ``crosscheck``; ``--scan-layers`` and
``--speculative-tokens`` at 8 layers with an MTP head) can be tried offline too."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

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


# The demo vocabulary: ids 0-255 are the bytes, then these special tokens (DEMO_CONFIG's eos
# 256, bos 257), as a ChatML-style chat template writes them.
DEMO_SPECIAL_TOKENS = {256: "<|im_end|>", 257: "<|endoftext|>", 258: "<|im_start|>"}
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_symbols() -> list[str]:
    """The printable character that stands for each byte in a byte-level tokenizer (GPT-2's
    convention, which the ``tokenizers`` ByteLevel pre-tokenizer and decoder use): printable
    Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _write_demo_tokenizer(out_dir: Path) -> None:
    """tokenizer.json (token i < 256 is byte i, then DEMO_SPECIAL_TOKENS) and
    tokenizer_config.json (the chat template and the special tokens' names)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(_byte_symbols())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([DEMO_SPECIAL_TOKENS[i] for i in sorted(DEMO_SPECIAL_TOKENS)])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": DEMO_CHAT_TEMPLATE, "eos_token": DEMO_SPECIAL_TOKENS[256],
        "bos_token": DEMO_SPECIAL_TOKENS[257], "model_max_length": DEMO_CONFIG.max_position_embeddings,
    }, indent=1))


def save_demo_checkpoint(out_dir: str | Path, *, num_hidden_layers: int = 4,
                         mtp_num_hidden_layers: int = 0, seed: int = 0,
                         overwrite: bool = False) -> Path:
    """Write the demo model (random float32 weights drawn with ``jax.random.key(seed)``) as an
    HF checkpoint: safetensors, config.json, and a byte-level tokenizer (token i < 256 is byte
    i; 256 ``<|im_end|>`` the eos, 257 ``<|endoftext|>``, 258 ``<|im_start|>``) with a
    ChatML-style chat template.

    Args:
      out_dir: the directory to write (made; refused when it is not empty, unless
        ``overwrite``).
      num_hidden_layers: a multiple of the layer pattern's period, 4 (8 or more lets
        ``--scan-layers`` scan two blocks).
      mtp_num_hidden_layers: 1 adds the MTP head (``--speculative-tokens``).
    Returns:
      the directory written.
    Raises:
      ValueError: num_hidden_layers not a positive multiple of 4; FileExistsError: ``out_dir``
        is not empty and ``overwrite`` is False.
    """
    from qnext_jax.convert import params_to_hf

    if num_hidden_layers < 4 or num_hidden_layers % 4:
        raise ValueError(f"num_hidden_layers must be a positive multiple of 4 (the layer "
                         f"pattern's period), got {num_hidden_layers}")
    config = DEMO_CONFIG.replace(num_hidden_layers=num_hidden_layers,
                                 mtp_num_hidden_layers=mtp_num_hidden_layers)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(Qwen3NextForCausalLM(config).init)(jax.random.key(seed), ids)["params"]
    with tempfile.TemporaryDirectory() as tokenizer_dir:  # written with the weights, listed
        _write_demo_tokenizer(Path(tokenizer_dir))
        return Path(params_to_hf(config, params, out_dir, overwrite=overwrite,
                                 tokenizer_dir=tokenizer_dir))
