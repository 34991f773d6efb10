"""Decoder layers, the causal LM and the MTP head of Qwen3-Next.

Layer i mixes tokens with gated attention when ``config.layer_types[i] == "full_attention"``
and with the Gated DeltaNet otherwise; its FFN is the sparse MoE when
``config.is_sparse_moe(i)``, else a dense SwiGLU MLP (transformers' ``Qwen3NextDecoderLayer``).
The MTP head (``mtp.*`` in the released checkpoint) predicts token i+2 from the main model's
final-normed hidden state h_i and the embedding of token i+1:
``mtp.norm(layer(fc([pre_fc_norm_embedding(embed(t_{i+1})), pre_fc_norm_hidden(h_i)])))``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnext_jax import sharding
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling.attention import Qwen3NextAttention
from qnext_jax.modeling.gated_deltanet import Qwen3NextGatedDeltaNet
from qnext_jax.modeling.layers import dense
from qnext_jax.modeling.moe import Qwen3NextMLP, Qwen3NextSparseMoeBlock
from qnext_jax.modeling.norms import RMSNorm
from qnext_jax.modeling.rope import rope_cos_sin


class Qwen3NextDecoderLayer(nn.Module):
    """x = x + mixer(input_layernorm(x)); x = x + ffn(post_attention_layernorm(x))."""

    config: Qwen3NextConfig
    full_attention: bool
    sparse_moe: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    gdn_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cos, sin, token_mask, cache=None, cache_index=None, kv_valid=None,
                 segment_ids=None, cu_seqlens=None):
        cfg = self.config
        mod = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype)
        h = RMSNorm(name="input_layernorm", **norm)(x)
        if self.full_attention:
            h, new_cache = Qwen3NextAttention(cfg, name="self_attn", **mod)(
                h, cos, sin, token_mask, cache, cache_index, kv_valid, segment_ids)
        else:
            h, new_cache = Qwen3NextGatedDeltaNet(cfg, gdn_impl=self.gdn_impl,
                                                  name="linear_attn", **mod)(
                h, token_mask, cache, segment_ids, cu_seqlens)
        x = x + h.astype(x.dtype)
        h = RMSNorm(name="post_attention_layernorm", **norm)(x)
        if self.sparse_moe:
            h = Qwen3NextSparseMoeBlock(cfg, name="mlp", **mod)(h)
        else:
            h = Qwen3NextMLP(cfg.intermediate_size, cfg.hidden_size, std=cfg.initializer_range,
                             name="mlp", **mod)(h)
        return x + h.astype(x.dtype), new_cache


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] bool: True where a run of equal segment ids begins (position 0 included)."""
    B = segment_ids.shape[0]
    return jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                           axis=1)


def segment_cu_seqlens(segment_ids: jax.Array, max_segments: int) -> jax.Array:
    """Per-row packed-sequence offsets: [B, max_segments + 1] int32 (FLA's cu_seqlens of each
    row).

    Row b lists the starts of its runs of equal segment id (padding runs included), then T:
    missing runs are empty sequences at the row's end; jit-compatible (static size). A row with
    more than ``max_segments`` runs merges its last ones.
    """
    B, T = segment_ids.shape
    starts = segment_starts(segment_ids)
    pos = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments, fill_value=T)[0])(starts)
    return jnp.concatenate([pos, jnp.full((B, 1), T, pos.dtype)], axis=1).astype(jnp.int32)


REMAT_POLICIES = ("none", "full", "dots")


def remat_layer(remat: str):
    """The decoder-layer class for a remat policy name (see ``Qwen3NextForCausalLM.remat``)."""
    if remat == "none":
        return Qwen3NextDecoderLayer
    if remat == "full":
        return nn.remat(Qwen3NextDecoderLayer, prevent_cse=True)
    if remat == "dots":
        return nn.remat(Qwen3NextDecoderLayer, prevent_cse=True,
                        policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")


class Qwen3NextMTP(nn.Module):
    """The multi-token-prediction head (params ``mtp``); returns the normed hidden [B, T, d]."""

    config: Qwen3NextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, next_embeds, hidden, cos, sin, token_mask, cache=None, cache_index=None,
                 kv_valid=None, segment_ids=None):
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype)
        mod = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        e = RMSNorm(name="pre_fc_norm_embedding", **norm)(next_embeds)
        h = RMSNorm(name="pre_fc_norm_hidden", **norm)(hidden)
        x = dense(cfg.hidden_size, name="fc", std=cfg.initializer_range, **mod)(
            jnp.concatenate([e, h], axis=-1))
        new_caches = {}
        for i in range(cfg.mtp_num_hidden_layers):
            name = f"layers_{i}"
            x, new_caches[name] = Qwen3NextDecoderLayer(
                cfg, full_attention=True, sparse_moe=cfg.num_experts > 0, name=name, **mod)(
                x, cos, sin, token_mask, None if cache is None else cache[name], cache_index,
                kv_valid, segment_ids)
        x = RMSNorm(name="norm", **norm)(x)
        return x, (new_caches if cache is not None else None)


class Qwen3NextForCausalLM(nn.Module):
    """The Qwen3-Next causal LM (transformers' ``Qwen3NextForCausalLM``), functional.

    ``apply({"params": p}, input_ids, cache=None, attention_mask=None)`` -> ``(logits, cache)``.

    Attributes:
      config: the model's :class:`Qwen3NextConfig`.
      dtype: compute dtype (activations); params are cast to it.
      param_dtype: dtype of freshly initialised params (A_log, dt_bias are always float32).
      precision: matmul precision (``jax.lax.Precision.HIGHEST`` for float32 cross-checks on GPU).
      gdn_impl: the Gated DeltaNet backend (``"auto"``, ``"reference"``, ...).
      remat: rematerialisation of each decoder layer for training: "none", "full" (keep only
        the layer inputs) or "dots" (also keep matmul outputs without batch dims).
    """

    config: Qwen3NextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    gdn_impl: str = "auto"
    remat: str = "none"

    def setup(self):
        cfg = self.config
        mod = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                     param_dtype=self.param_dtype,
                                     embedding_init=nn.initializers.normal(cfg.initializer_range))
        layer_cls = remat_layer(self.remat)
        self.layers = [
            layer_cls(cfg, full_attention=cfg.is_full_attention(i),
                                  sparse_moe=cfg.is_sparse_moe(i), gdn_impl=self.gdn_impl,
                                  name=f"layers_{i}", **mod)
            for i in range(cfg.num_hidden_layers)
        ]
        self.norm = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, name="lm_head", std=cfg.initializer_range, **mod)
        if cfg.mtp_num_hidden_layers > 0:
            self.mtp = Qwen3NextMTP(cfg, **mod)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: [B, T, d] -> [B, T, vocab] (the embedding's transpose when tied)."""
        if self.config.tie_word_embeddings:
            table = self.embed_tokens.embedding.astype(self.dtype)  # [vocab, d]
            return jnp.einsum("BTD,VD->BTV", hidden.astype(self.dtype), table,
                              precision=self.precision)
        return self.lm_head(hidden)

    def _positions_and_masks(self, input_ids, attention_mask, cache, segment_ids=None):
        B, T = input_ids.shape
        if attention_mask is None:
            token_mask = jnp.ones((B, T), bool)
        else:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected "
                                 f"input_ids' shape {(B, T)}")
            token_mask = attention_mask.astype(bool)
        if segment_ids is not None:
            if segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids has shape {segment_ids.shape}, expected "
                                 f"input_ids' shape {(B, T)}")
            if cache is not None:
                raise ValueError("segment_ids (packed sequences) are for cache-free forward "
                                 "passes (training); got a cache")
            token_mask = jnp.logical_and(token_mask, segment_ids > 0)
            t = jnp.arange(T, dtype=jnp.int32)
            starts = segment_starts(segment_ids)
            first = jax.lax.cummax(jnp.where(starts, t[None, :], 0), axis=1)
            return token_mask, t[None, :] - first  # positions restart in each segment
        start = jnp.zeros((B,), jnp.int32) if cache is None else cache["positions"]
        positions = start[:, None] + jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1
        positions = jnp.maximum(positions, 0)  # padding before the first token
        return token_mask, positions

    def __call__(self, input_ids, cache=None, attention_mask=None, output_hidden_states=False,
                 segment_ids=None, max_segments=None):
        """Run the model on new tokens.

        Args:
          input_ids: [B, T] int token ids.
          cache: None (no state in or out), or the pytree of :func:`qnext_jax.init_cache`; the
            new tokens are appended after the ``cache["index"]`` slots already filled.
          attention_mask: [B, T] (1 = token, 0 = padding), for the new tokens only. Positions
            count real tokens only, so left padding does not shift RoPE.
          output_hidden_states: also return the per-layer hidden states.
          segment_ids: [B, T] int (no cache): packed documents, 1, 2, ... per row, 0 on padding.
            Attention is block-diagonal over segments, the GDN conv and state restart at each
            segment start and positions restart at 0 (each document as if alone).
          max_segments: static bound on the runs of equal segment id per row (padding runs
            included); default T. Rows with more runs leak GDN state between their last ones.
        Returns:
          (logits [B, T, vocab], new cache or None), plus a tuple of hidden states
          (embeddings, after each layer, final normed) [B, T, d] when output_hidden_states.
        Raises:
          ValueError: a cache too short for the new tokens (checked when not traced).
        """
        cfg = self.config
        B, T = input_ids.shape
        token_mask, positions = self._positions_and_masks(input_ids, attention_mask, cache,
                                                          segment_ids)
        cu_seqlens = None
        if segment_ids is not None:
            cu_seqlens = segment_cu_seqlens(segment_ids, T if max_segments is None else
                                            min(int(max_segments), T))
        cos, sin = rope_cos_sin(cfg, positions, self.dtype)
        x = sharding.constrain(self.embed_tokens(input_ids), ("batch", "length", "act_embed"))
        cache_index = kv_valid = None
        if cache is not None:
            cache_index = cache["index"]
            if not isinstance(cache_index, jax.core.Tracer) and \
                    int(cache_index) + T > cache["valid"].shape[1]:
                raise ValueError(f"cache holds {cache['valid'].shape[1]} positions, "
                                 f"{int(cache_index)} used, {T} new tokens do not fit")
            kv_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], token_mask,
                                                           cache_index, axis=1)
        hidden = [x]
        new_cache = {}
        for i, layer in enumerate(self.layers):
            name = f"layers_{i}"
            x, new_cache[name] = layer(x, cos, sin, token_mask,
                                       None if cache is None else cache[name], cache_index,
                                       kv_valid, segment_ids, cu_seqlens)
            x = sharding.constrain(x, ("batch", "length", "act_embed"))
            hidden.append(x)
        x = self.norm(x)
        hidden.append(x)
        logits = self.logits(x)
        if cfg.mtp_num_hidden_layers > 0 and self.is_initializing():
            self.mtp_logits(x, input_ids, positions, token_mask, segment_ids=segment_ids)
        if cache is not None:
            new_cache["index"] = cache_index + T
            new_cache["positions"] = cache["positions"] + jnp.sum(token_mask, axis=1,
                                                                  dtype=jnp.int32)
            new_cache["valid"] = kv_valid
            if "mtp" in cache:
                new_cache["mtp"] = cache["mtp"]
        else:
            new_cache = None
        if output_hidden_states:
            return logits, new_cache, tuple(hidden)
        return logits, new_cache

    def mtp_logits(self, hidden, next_ids, positions, token_mask=None, cache=None,
                   cache_index=None, kv_valid=None, segment_ids=None):
        """MTP head: logits for token i+2 from h_i [B, T, d] and token i+1 ids [B, T].

        ``positions`` [B, T] are the positions of tokens i; ``cache`` is the MTP's own
        {"layers_0": {"key", "value"}} (or None); ``segment_ids`` [B, T] (no cache) makes its
        attention block-diagonal. Returns (logits, mtp hidden, new mtp cache).
        """
        if self.config.mtp_num_hidden_layers == 0:
            raise ValueError("this config has no MTP head (mtp_num_hidden_layers = 0)")
        if token_mask is None:
            token_mask = jnp.ones(next_ids.shape, bool)
        cos, sin = rope_cos_sin(self.config, positions, self.dtype)
        h, new_cache = self.mtp(self.embed_tokens(next_ids), hidden, cos, sin, token_mask, cache,
                                cache_index, kv_valid, segment_ids)
        return self.logits(h), h, new_cache
