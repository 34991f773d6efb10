"""Gated softmax attention of Qwen3-Next (transformers' ``Qwen3NextAttention``).

q_proj gives H * 2 * head_dim per token, viewed per head as [query | gate]; QK-norm (zero-centred
RMSNorm over head_dim) before partial RoPE; GQA; float32 softmax; the output is
``o_proj(attn * sigmoid(gate))``.

Two implementations of the softmax attention (``attn_impl``): XLA (:func:`xla_attention`, the
reference and the CPU/TPU path) and, for multi-token steps over a cache on GPU, tokamax's flash
attention (:func:`flash_attention`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnext_jax import sharding
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling.layers import NEG_INF, dense, import_tokamax
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


def xla_attention(q, keys, values, kv_valid, q_slot, scale, *, cached, segment_ids=None,
                  precision=None, dtype=jnp.float32):
    """Causal softmax attention in XLA: whole [T, S] float32 scores, or for a multi-token step
    over a cache of more than 2 * KV_BLOCK slots (``cached``) :func:`blocked_attention`.

    Args:
      q: [B, T, H, D]; keys, values: [B, Hkv, S, D]; kv_valid: [B, S] bool; q_slot: [T] int,
        each query's slot (it sees valid keys at slots <= its own); scale: logit scale.
      cached: keys/values are a cache (the blocked path may apply; segment_ids are ignored).
      segment_ids: [B, T] int or None (no cache): a query sees only keys of its own segment.
    Returns:
      [B, T, H, D] in ``dtype``.
    """
    B, T, H, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    causal = jnp.arange(S)[None, :] <= q_slot[:, None]  # [T, S]
    mask = jnp.logical_and(kv_valid[:, None, :], causal[None])  # [B, T, S]
    if segment_ids is not None and not cached:  # packed documents: block-diagonal
        mask = jnp.logical_and(mask, segment_ids[:, :, None] == segment_ids[:, None, :])
    qh = q.reshape(B, T, Hkv, H // Hkv, D)
    if cached and T > 1 and S > 2 * KV_BLOCK:  # long cache: bounded memory
        out = blocked_attention(qh, keys, values, mask, scale, KV_BLOCK, precision, dtype)
    else:
        logits = jnp.einsum("BTKGD,BKSD->BKGTS", qh, keys, precision=precision)
        logits = jnp.where(mask[:, None, None], logits.astype(jnp.float32) * scale, NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        out = jnp.einsum("BKGTS,BKSD->BTKGD", probs, values, precision=precision)
    return out.reshape(B, T, H, D)


ATTN_IMPLS = ("auto", "xla", "tokamax", "tokamax:mosaic", "tokamax:triton")


def check_attn_impl(impl: str) -> None:
    """Raise ValueError unless ``impl`` is one of ATTN_IMPLS."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")


@functools.cache
def _import_flash():
    """(``tokamax.ops.gpu``, None) or (None, the ImportError importing it raised): tokamax's GPU
    ops module also imports jax-triton (both in the ``gpu`` extra)."""
    tokamax, error = import_tokamax()
    if tokamax is None:
        return None, error
    try:
        from tokamax.ops import gpu
    except ImportError as e:
        return None, e
    return gpu, None


def _flash_ops(impl: str) -> list:
    """[(tokamax flash-attention op, logit bias of a masked key)] for ``impl`` ("tokamax":
    Mosaic GPU on Hopper, falling back to Triton; Triton elsewhere).

    The key mask goes in as an additive bias: the Mosaic GPU kernel with a boolean mask failed
    to lower inside the 80B prefill (H200, jax 0.11.2, tokamax 0.0.17). That kernel gets -inf,
    the value of its own masks (with -1e30 some real rows came out NaN); on sm90 a row whose
    first key blocks are all masked stays finite because ``q_indices`` gives the kernel a key
    range, which turns on its guard for rows with no key seen yet. The Triton kernel, which
    masks with the float32 minimum itself, gets -1e30 (checked on the H200; -inf was not tried
    there). Raises ValueError off a GPU, ImportError without tokamax's GPU ops."""
    if jax.default_backend() != "gpu":
        raise ValueError(f"attn_impl={impl!r} runs tokamax's GPU kernels; this JAX's backend "
                         f"is {jax.default_backend()}: use attn_impl 'auto' or 'xla'")
    tokamax_gpu, error = _import_flash()
    if tokamax_gpu is None:
        raise ImportError(f"attn_impl={impl!r} needs the optional tokamax and jax-triton "
                          "packages: pip install 'qnext-jax[gpu]'") from error
    ops = {"mosaic": (tokamax_gpu.PallasMosaicFlashAttention, -jnp.inf),
           "triton": (tokamax_gpu.PallasTritonFlashAttention, -1e30)}
    if ":" in impl:
        names = [impl.partition(":")[2]]
    else:
        names = ["mosaic", "triton"] if _is_hopper() else ["triton"]
    return [(ops[n][0](), ops[n][1]) for n in names]


def _is_hopper() -> bool:
    """The default device is an sm90 GPU: the only one tokamax's Mosaic GPU attention ran on
    here (its sm80 kernel lacks the guard that makes the -inf key bias safe)."""
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def flash_attention(q, keys, values, kv_valid, q_slot, scale, impl="tokamax", precision=None):
    """Causal softmax attention over a K/V cache with tokamax's flash-attention kernels (GPU).

    The query at slot ``q_slot[t]`` attends to the keys at slots ``<= q_slot[t]`` that
    ``kv_valid`` marks; the kernels skip the K/V blocks past the last query's slot, and memory
    stays O(T + S) (no [T, S] logits).

    Args:
      q: [B, T, H, D] queries (H a multiple of Hkv; bf16/fp16 for the Mosaic GPU kernel).
      keys, values: [B, Hkv, S, D] (the cache layout; transposed to [B, S, Hkv, D] in q's
        dtype here).
      kv_valid: [B, S] bool, the slots holding real tokens.
      q_slot: [T] int32, each query's slot.
      scale: logit scale (head_dim ** -0.5).
      impl: "tokamax" (Mosaic GPU on Hopper, else Triton), "tokamax:mosaic" or "tokamax:triton".
      precision: matmul precision, or None for the default.
    Returns:
      [B, T, H, D] in q's dtype; a query with no visible key gets an unspecified row, possibly
      NaN (the caller masks padding queries). The model calls it for multi-token steps with a
      cache only (prefill, speculative verification); training runs the XLA path.
    Raises:
      ValueError for an impl that is not tokamax's or off a GPU; ImportError without tokamax (or
      jax-triton); NotImplementedError when no kernel takes the inputs at trace time (an error
      lowering a kernel comes later, at compile time, with no fallback).
    """
    if not impl.startswith("tokamax") or impl not in ATTN_IMPLS:
        raise ValueError(f"flash_attention: impl must be one of "
                         f"{tuple(i for i in ATTN_IMPLS if i.startswith('tokamax'))}, "
                         f"got {impl!r}")
    k, v = (jnp.swapaxes(x, 1, 2).astype(q.dtype) for x in (keys, values))
    kwargs = dict(is_causal=True, q_indices=q_slot[None, None, :], logits_scale=scale)
    if precision is not None:
        kwargs["precision"] = precision
    errors = []
    for op, masked in _flash_ops(impl):
        bias = jnp.where(kv_valid, 0.0, masked).astype(jnp.float32)[:, None, None, :]
        try:
            return op(q, k, v, bias=bias, **kwargs)
        except NotImplementedError as e:
            errors.append(f"{type(op).__name__}: {e}")
    raise NotImplementedError(f"no tokamax flash-attention kernel takes these inputs ({q.dtype} "
                              f"queries of shape {q.shape}): " + "; ".join(errors))


def _use_flash(impl: str, dtype, T: int, cached: bool) -> bool:
    """Whether this call runs through :func:`flash_attention`: only multi-token steps with a
    cache do (prefill, speculative verification; a decode step reads the cache as it lies), with
    a tokamax impl, or with "auto" for bf16/fp16 on a GPU where tokamax's GPU ops import."""
    if not cached or T < 2 or impl == "xla":
        return False
    if impl != "auto":
        return True
    return (jax.default_backend() == "gpu" and _import_flash()[0] is not None
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))


_QUERIES = ("batch", None, "kv_heads", None)  # [B, T, H, hd], split as the K/V heads are
_CACHE = ("batch", "kv_heads", None, None)  # [B, Hkv, S, hd]


class Qwen3NextAttention(nn.Module):
    config: Qwen3NextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    attn_impl: str = "auto"

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
        check_attn_impl(self.attn_impl)
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
            q_slot, key_valid = jnp.arange(T), token_mask
        else:
            keys = jax.lax.dynamic_update_slice_in_dim(cache["key"], k.astype(cache["key"].dtype),
                                                       cache_index, axis=2)
            values = jax.lax.dynamic_update_slice_in_dim(
                cache["value"], v.astype(cache["value"].dtype), cache_index, axis=2)
            new_cache = {"key": keys, "value": values}
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
            q_slot, key_valid = cache_index + jnp.arange(T), kv_valid

        if _use_flash(self.attn_impl, self.dtype, T, cache is not None):
            kernel = "tokamax" if self.attn_impl == "auto" else self.attn_impl
            # Per batch and K/V-head shard under a mesh (the query heads labelled as K/V heads:
            # each device holds the query heads of its own K/V heads).
            (attn,) = sharding.map_shards(
                lambda *a: (flash_attention(*a, hd ** -0.5, kernel, self.precision),),
                (q.astype(self.dtype), keys, values, key_valid, q_slot),
                (_QUERIES, _CACHE, _CACHE, ("batch", None), (None,)), (_QUERIES,))
            attn = jnp.where(token_mask[:, :, None, None], attn, 0)  # no visible key: padding
        else:
            attn = xla_attention(q, keys, values, key_valid, q_slot, hd ** -0.5,
                                 cached=cache is not None, segment_ids=segment_ids,
                                 precision=self.precision, dtype=self.dtype)
        attn = attn.reshape(B, T, H * hd) * jax.nn.sigmoid(gate.reshape(B, T, H * hd))
        y = dense(cfg.hidden_size, name="o_proj", **proj)(attn)
        return y, new_cache
