"""The Gated DeltaNet mixer of Qwen3-Next (transformers' ``Qwen3NextGatedDeltaNet``).

Per token: in_proj_qkvz viewed as [Hk, 2 dk + 2 n dv] is split per key head into q | k | v | z,
in_proj_ba viewed as [Hk, 2 n] into b | a (n = Hv / Hk); the channels all-q | all-k | all-v go
through a depthwise causal conv1d + SiLU; beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias)
(float32); the gated delta rule (Yang et al. 2024, "Gated Delta Networks") runs per value head on
L2-normalised q, k; the output goes through the gated RMSNorm with z and out_proj.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import (chunk_gated_delta_rule,
                                             fused_recurrent_gated_delta_rule)
from qnext_jax import sharding
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling.layers import dense
from qnext_jax.modeling.norms import RMSNormGated

# New-token counts up to this go through the recurrent (decode) op instead of the chunked one.
RECURRENT_MAX_TOKENS = 4


def _a_log_init(key, shape, dtype):
    """A_log = log(A), A ~ U[1, 16): exp(A_log) is finite and bounded away from 0."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def causal_conv1d(x, weight, conv_state=None, mask=None, per_token_states=False):
    """Depthwise causal conv over time, over real tokens only.

    Args:
      x: [B, T, C] inputs.
      weight: [K, C] taps (torch's conv1d weight [C, 1, K], transposed).
      conv_state: [B, C, K-1] the previous K-1 inputs (zeros when None).
      mask: None or [B, T] bool, False on padding. Padding anywhere (left, right, in the
        middle) is skipped: a real token's window holds the K-1 previous *real* inputs and the
        new state the last K-1 real inputs; padded positions output 0.
      per_token_states: also return the state after each token, [B, T, C, K-1] (for
        speculative decoding's rollback).
    Returns:
      (y [B, T, C] = sum_j weight[j] * x_real[t - (K-1) + j], new state [B, C, K-1]), plus the
      per-token states when asked.
    """
    B, T, C = x.shape
    K = weight.shape[0]
    if conv_state is None:
        prev = jnp.zeros((B, K - 1, C), x.dtype)
    else:
        prev = jnp.swapaxes(conv_state, 1, 2).astype(x.dtype)
    full = jnp.concatenate([prev, x], axis=1)  # [B, L = K-1+T, C]
    w = weight.astype(jnp.float32)
    taps = jnp.arange(K - 1)
    if mask is None:
        seq = full  # every entry is real
        out_idx = None
        last = jnp.full((B,), K - 2 + T, jnp.int32)  # index of the last real entry
        rank = jnp.broadcast_to(jnp.arange(K - 1 + T, dtype=jnp.int32), (B, K - 1 + T))
    else:
        valid = jnp.concatenate([jnp.ones((B, K - 1), bool), mask.astype(bool)], axis=1)
        # Real entries first (stable: in time order), padding after: seq[r] is real entry r.
        order = jnp.argsort(jnp.logical_not(valid), axis=1, stable=True)
        seq = jnp.take_along_axis(full, order[..., None], axis=1)
        rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # last real entry at or before
        last = rank[:, -1]
        out_idx = rank[:, K - 1:] - (K - 1)  # [B, T]: conv output of token t in seq's frame
    y = sum(seq[:, j:j + T, :].astype(jnp.float32) * w[j] for j in range(K))
    if out_idx is not None:
        y = jnp.take_along_axis(y, out_idx[..., None], axis=1)
        y = jnp.where(mask[..., None], y, 0.0)
    new_state = jnp.take_along_axis(seq, (last[:, None] - (K - 2) + taps)[..., None], axis=1)
    new_state = jnp.swapaxes(new_state, 1, 2)  # last K-1 real inputs: [B, C, K-1]
    if not per_token_states:
        return y.astype(x.dtype), new_state
    idx = rank[:, K - 1:, None] - (K - 2) + taps  # [B, T, K-1]
    states = jnp.take_along_axis(seq, idx.reshape(B, T * (K - 1))[..., None], axis=1)
    states = jnp.swapaxes(states.reshape(B, T, K - 1, C), 2, 3)  # [B, T, C, K-1]
    return y.astype(x.dtype), new_state, states


def segment_causal_conv1d(x, weight, segment_ids, mask=None):
    """Depthwise causal conv of packed documents: no tap reaches across a segment boundary.

    Args:
      x: [B, T, C]. weight: [K, C]. segment_ids: [B, T] int, the document of each token.
      mask: None or [B, T] bool; padded positions output 0.
    Returns:
      (y [B, T, C], the last K-1 inputs [B, C, K-1]): y_t = sum_j weight[j] x[t - (K-1) + j]
      over taps in t's segment (zeros before a segment's start, as at a sequence start).
    """
    T, K = x.shape[1], weight.shape[0]
    xp = jnp.pad(x, ((0, 0), (K - 1, 0), (0, 0)))
    sp = jnp.pad(segment_ids, ((0, 0), (K - 1, 0)), constant_values=-1)
    w = weight.astype(jnp.float32)
    y = sum(jnp.where((sp[:, j:j + T] == segment_ids)[..., None],
                      xp[:, j:j + T, :].astype(jnp.float32) * w[j], 0.0) for j in range(K))
    if mask is not None:
        y = jnp.where(mask[..., None], y, 0.0)
    return y.astype(x.dtype), jnp.swapaxes(xp[:, T:, :], 1, 2)


_HEADS = ("batch", None, "heads", None)  # q, k [B, T, Hk, dk]; v, o [B, T, Hv, dv]
_GATES = ("batch", None, "heads")  # g, beta [B, T, Hv]


def gated_delta_rule(q, k, v, g, beta, state=None, *, cu_seqlens=None,
                     per_token_states=False, impl="auto"):
    """The gated delta rule of the layer on L2-normalised q, k (scale dk^-0.5), split over the
    active mesh's batch and head shards (``sharding.map_shards``: its Pallas kernels are not
    partitioned by XLA; Hk and Hv split alike, so each device holds the value heads of its own
    key heads).

    Args:
      q, k: [B, T, Hk, dk]; v: [B, T, Hv, dv]; g, beta: [B, T, Hv] float32.
      state: None (no cache) or [B, Hv, dk, dv] float32, the state before the first token.
      cu_seqlens: [B, N + 1] int32 per-row segment offsets (no state): packed documents, the
        state restarting at each.
      per_token_states: also return the state after each token (with a state; token by token).
      impl: the op's backend (``chunk_gated_delta_rule``'s impl).
    Returns:
      (o [B, T, Hv, dv], final state [B, Hv, dk, dv] or None without ``state``, per-token states
      [B, T, Hv, dk, dv] or None). T up to RECURRENT_MAX_TOKENS runs the recurrent op.
    """
    T, dk = q.shape[1], q.shape[-1]
    opts = dict(scale=dk ** -0.5, use_qk_l2norm_in_kernel=True, impl=impl)
    # The states split as the cache's do: [B, Hv, dk, dv] and, per token, [B, T, Hv, dk, dv].
    state_axes, states_axes = (sharding.cache_logical_axes((name,), ())
                               for name in ("recurrent_state", "recurrent_states"))
    ins = (_HEADS, _HEADS, _HEADS, _GATES, _GATES)
    if cu_seqlens is not None:
        def packed(q, k, v, g, beta, cu):
            def row(q_, k_, v_, g_, b_, cu_):
                return chunk_gated_delta_rule(q_[None], k_[None], v_[None], g_[None], b_[None],
                                              cu_seqlens=cu_, **opts)[0][0]
            return (jax.vmap(row)(q, k, v, g, beta, cu),)

        (o,) = sharding.map_shards(packed, (q, k, v, g, beta, cu_seqlens),
                                   ins + (("batch", None),), (_HEADS,))
        return o, None, None
    op = fused_recurrent_gated_delta_rule if T <= RECURRENT_MAX_TOKENS else \
        chunk_gated_delta_rule
    if state is None:
        (o,) = sharding.map_shards(lambda *x: op(*x, **opts)[:1], (q, k, v, g, beta), ins,
                                   (_HEADS,))
        return o, None, None
    if per_token_states:
        def stepwise(q, k, v, g, beta, state):
            outs, states = [], []
            for t in range(T):
                o_t, state = fused_recurrent_gated_delta_rule(
                    q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1],
                    beta[:, t:t + 1], initial_state=state, output_final_state=True, **opts)
                outs.append(o_t)
                states.append(state)
            return jnp.concatenate(outs, axis=1), state, jnp.stack(states, axis=1)

        return sharding.map_shards(stepwise, (q, k, v, g, beta, state), ins + (state_axes,),
                                   (_HEADS, state_axes, states_axes))

    def stateful(q, k, v, g, beta, state):
        return op(q, k, v, g, beta, initial_state=state, output_final_state=True, **opts)

    o, final = sharding.map_shards(stateful, (q, k, v, g, beta, state), ins + (state_axes,),
                                   (_HEADS, state_axes))
    return o, final, None


class DepthwiseConv1d(nn.Module):
    """Holds the conv taps ``kernel`` [K, C] and applies :func:`causal_conv1d` (or
    :func:`segment_causal_conv1d`) to inputs whose channels are grouped per key head.

    The kernel keeps transformers' channel order, all q | all k | all v ([K, C] with C =
    Hk dk + Hk dk + Hv dv, ``parts`` = (dk, dk, n dv) channels of each of the ``heads`` = Hk
    key heads per block); the inputs, outputs and conv state are in the head-grouped order
    (q_0 k_0 v_0 | q_1 k_1 v_1 | ...), so that a mesh splitting the heads holds whole groups:
    the projection gives that order as it lies, and no channel crosses devices (with the HF
    order each device's q, k and v channels would be gathered and permuted every step)."""

    kernel_size: int
    heads: int
    parts: tuple[int, ...]
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, conv_state=None, mask=None, per_token_states=False, segment_ids=None):
        init = nn.initializers.normal(self.kernel_size ** -0.5)
        K, H = self.kernel_size, self.heads
        w = self.param("kernel", init, (K, H * sum(self.parts)), self.param_dtype)
        blocks, start = [], 0
        for width in self.parts:  # [K, H * width] -> [K, H, width], then side by side per head
            blocks.append(w[:, start:start + H * width].reshape(K, H, width))
            start += H * width
        # Replicated (a few thousand values): XLA would otherwise cut the HF-order slices along
        # the input's head shards and move them between devices every step.
        w = sharding.constrain(jnp.concatenate(blocks, axis=-1).reshape(K, -1), (None, None))
        if segment_ids is not None:
            return segment_causal_conv1d(x, w, segment_ids, mask)
        return causal_conv1d(x, w, conv_state, mask, per_token_states)


class Qwen3NextGatedDeltaNet(nn.Module):
    config: Qwen3NextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    gdn_impl: str = "auto"

    @nn.compact
    def __call__(self, x, token_mask, cache=None, segment_ids=None, cu_seqlens=None):
        """Mix the new tokens, continuing from ``cache``.

        Args:
          x: [B, T, d] hidden states (normed).
          token_mask: [B, T] bool, False on padding: padded tokens are zeroed before the
            projections and neither decay nor update the recurrent state.
          cache: None or {"conv_state": [B, conv_dim, K-1] (channels grouped per key head, see
            :class:`DepthwiseConv1d`), "recurrent_state": [B, Hv, dk, dv] float32}. With an
            extra ``"per_token_states"`` entry (any array; a marker), the new cache also holds
            the state after each new token: "conv_states" [B, T, conv_dim, K-1] and
            "recurrent_states" [B, T, Hv, dk, dv] (speculative decoding rolls back to one).
          segment_ids: [B, T] int (no cache): packed documents; the conv does not reach across
            a segment boundary.
          cu_seqlens: [B, N + 1] int32 per-row offsets of the segments
            (``decoder.segment_cu_seqlens``; no cache): the recurrent state restarts at each.
        Returns:
          (y [B, T, d], new cache or None)
        """
        cfg = self.config
        B, T, _ = x.shape
        Hk, Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv, n = cfg.linear_key_head_dim, cfg.linear_value_head_dim, Hv // Hk
        proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                    std=cfg.initializer_range)

        x = jnp.where(token_mask[..., None], x, 0).astype(self.dtype)
        qkvz = dense(2 * Hk * dk + 2 * Hv * dv, name="in_proj_qkvz", **proj)(x)
        qkvz = qkvz.reshape(B, T, Hk, 2 * dk + 2 * n * dv)
        width = 2 * dk + n * dv  # q | k | v of one key head: the conv's channel groups
        qkv, z = qkvz[..., :width], qkvz[..., width:]
        ba = dense(2 * Hv, name="in_proj_ba", **proj)(x).reshape(B, T, Hk, 2 * n)
        b, a = ba[..., :n].reshape(B, T, Hv), ba[..., n:].reshape(B, T, Hv)

        per_token = cache is not None and "per_token_states" in cache
        conv_out = DepthwiseConv1d(cfg.linear_conv_kernel_dim, Hk, (dk, dk, n * dv),
                                   self.param_dtype, name="conv1d")(
            qkv.reshape(B, T, Hk * width), None if cache is None else cache["conv_state"],
            token_mask, per_token, segment_ids if cache is None else None)
        mixed, conv_state = conv_out[0], conv_out[1]
        q, k, v = jnp.split(jax.nn.silu(mixed).reshape(B, T, Hk, width), [dk, 2 * dk], axis=-1)
        v = v.reshape(B, T, Hv, dv)

        a_log = self.param("A_log", _a_log_init, (Hv,), jnp.float32)
        dt_bias = self.param("dt_bias", nn.initializers.ones, (Hv,), jnp.float32)
        beta = jax.nn.sigmoid(b.astype(jnp.float32))  # [B, T, Hv] float32
        g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        g = jnp.where(token_mask[..., None], g, 0.0)
        k = jnp.where(token_mask[..., None, None], k, 0)

        o, final_state, states = gated_delta_rule(
            q, k, v, g, beta, None if cache is None else cache["recurrent_state"],
            cu_seqlens=cu_seqlens if cache is None else None, per_token_states=per_token,
            impl=self.gdn_impl)
        o = RMSNormGated(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype, name="norm")(
            o.astype(self.dtype), z.reshape(B, T, Hv, dv))
        y = dense(cfg.hidden_size, name="out_proj", **proj)(o.reshape(B, T, Hv * dv))
        new_cache = None if cache is None else {"conv_state": conv_state.astype(
            cache["conv_state"].dtype), "recurrent_state": final_state}
        if per_token:
            new_cache["conv_states"] = conv_out[2].astype(cache["conv_state"].dtype)
            new_cache["recurrent_states"] = states
        return y, new_cache
