"""Gated softmax attention of Qwen3-Next (transformers' ``Qwen3NextAttention``).

q_proj gives H * 2 * head_dim per token, viewed per head as [query | gate]; QK-norm (zero-centred
RMSNorm over head_dim) before partial RoPE; GQA; float32 softmax; the output is
``o_proj(attn * sigmoid(gate))``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling.layers import NEG_INF, dense
from qnext_jax.modeling.norms import RMSNorm
from qnext_jax.modeling.rope import apply_rope


# Multi-token steps over a cache longer than 2 * KV_BLOCK slots (chunked prefill of a long
# prompt) attend block by block with an online softmax: memory O(T * KV_BLOCK), not O(T * S).
KV_BLOCK = 4096


def blocked_attention(qh, keys, values, mask, scale, block, precision=None, dtype=jnp.float32):
    """Softmax attention over KV blocks with a running max and sum (flash-attention style).

    Args:
      qh: [B, T, Hkv, G, D] queries; keys, values: [B, Hkv, S, D]; mask: [B, T, S] bool.
      scale: logit scale; block: KV slots per step (S is padded up to a multiple).
    Returns:
      [B, T, Hkv, G, D] in ``dtype``; equal to the plain softmax attention for every query with
      at least one unmasked key (float32 statistics).
    """
    B, T, K, G, D = qh.shape
    S = keys.shape[2]
    n = -(-S // block)
    pad = n * block - S
    if pad:
        keys = jnp.pad(keys, ((0, 0), (0, 0), (0, pad), (0, 0)))
        values = jnp.pad(values, ((0, 0), (0, 0), (0, pad), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))

    def step(carry, i):
        m, l, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, D] float32
        k = jax.lax.dynamic_slice_in_dim(keys, i * block, block, axis=2)
        v = jax.lax.dynamic_slice_in_dim(values, i * block, block, axis=2)
        mk = jax.lax.dynamic_slice_in_dim(mask, i * block, block, axis=2)
        s = jnp.einsum("BTKGD,BKSD->BKGTS", qh, k, precision=precision).astype(jnp.float32)
        s = jnp.where(mk[:, None, None], s * scale, NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("BKGTS,BKSD->BKGTD", p.astype(dtype), v, precision=precision)
        return (m_new, l, acc * corr[..., None] + pv.astype(jnp.float32)), None

    init = (jnp.full((B, K, G, T), NEG_INF, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, D), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(step, init, jnp.arange(n))
    out = acc / l[..., None]  # [B, K, G, T, D]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(dtype)


class Qwen3NextAttention(nn.Module):
    config: Qwen3NextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, cos, sin, token_mask, cache=None, cache_index=None, kv_valid=None,
                 segment_ids=None):
        """Attend over the new tokens (and the cached ones).

        Args:
          x: [B, T, d] hidden states (normed).
          cos, sin: [B, T, rotary_dim] rotary tables for the new tokens' positions.
          token_mask: [B, T] bool, False on padding (padded keys are never attended to).
          cache: None, or {"key", "value"}: [B, Hkv, S, hd] (heads before slots, so that the
            attention matmuls read the cache as it lies, with no per-step transpose); the new K/V
            are written at slots [cache_index, cache_index + T).
          cache_index: int32 scalar, the first free slot (with a cache).
          kv_valid: [B, S] bool, the slots holding real tokens after this step (with a cache).
          segment_ids: [B, T] int (no cache): a query attends only to keys of its own segment.
        Returns:
          (y [B, T, d], new cache or None)
        """
        cfg = self.config
        B, T, _ = x.shape
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.initializer_range
        proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                    std=std, use_bias=cfg.attention_bias)

        qg = dense(H * 2 * hd, name="q_proj", **proj)(x).reshape(B, T, H, 2 * hd)
        q, gate = qg[..., :hd], qg[..., hd:]  # per-head split: [B, T, H, hd] each
        k = dense(Hkv * hd, name="k_proj", **proj)(x).reshape(B, T, Hkv, hd)
        v = dense(Hkv * hd, name="v_proj", **proj)(x).reshape(B, T, Hkv, hd)
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype)
        q = apply_rope(RMSNorm(name="q_norm", **norm)(q), cos, sin)
        k = apply_rope(RMSNorm(name="k_norm", **norm)(k), cos, sin)

        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, Hkv, T, hd]
        if cache is None:
            keys, values, new_cache = k, v, None
            q_slot = jnp.arange(T)
            mask = token_mask[:, None, :]  # [B, 1, S=T]
        else:
            keys = jax.lax.dynamic_update_slice_in_dim(cache["key"], k.astype(cache["key"].dtype),
                                                       cache_index, axis=2)
            values = jax.lax.dynamic_update_slice_in_dim(
                cache["value"], v.astype(cache["value"].dtype), cache_index, axis=2)
            new_cache = {"key": keys, "value": values}
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
            q_slot = cache_index + jnp.arange(T)
            mask = kv_valid[:, None, :]
        S = keys.shape[2]
        causal = jnp.arange(S)[None, :] <= q_slot[:, None]  # [T, S]
        mask = jnp.logical_and(mask, causal[None])  # [B, T, S]
        if segment_ids is not None and cache is None:  # packed documents: block-diagonal
            mask = jnp.logical_and(mask, segment_ids[:, :, None] == segment_ids[:, None, :])

        G = H // Hkv
        qh = q.reshape(B, T, Hkv, G, hd)
        if cache is not None and T > 1 and S > 2 * KV_BLOCK:  # long cache: bounded memory
            attn = blocked_attention(qh, keys, values, mask, hd ** -0.5, KV_BLOCK,
                                     self.precision, self.dtype)
        else:
            logits = jnp.einsum("BTKGD,BKSD->BKGTS", qh, keys, precision=self.precision)
            logits = logits.astype(jnp.float32) * (hd ** -0.5)
            logits = jnp.where(mask[:, None, None], logits, NEG_INF)
            probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
            attn = jnp.einsum("BKGTS,BKSD->BTKGD", probs, values, precision=self.precision)
        attn = attn.reshape(B, T, H * hd) * jax.nn.sigmoid(gate.reshape(B, T, H * hd))
        y = dense(cfg.hidden_size, name="o_proj", **proj)(attn)
        return y, new_cache
