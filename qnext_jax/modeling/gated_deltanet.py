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
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling.layers import dense
from qnext_jax.modeling.norms import RMSNormGated

# New-token counts up to this go through the recurrent (decode) op instead of the chunked one.
RECURRENT_MAX_TOKENS = 4


def _a_log_init(key, shape, dtype):
    """A_log = log(A), A ~ U[1, 16): exp(A_log) is finite and bounded away from 0."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def causal_conv1d(x, weight, conv_state=None):
    """Depthwise causal conv over time.

    Args:
      x: [B, T, C] inputs.
      weight: [K, C] taps (torch's conv1d weight [C, 1, K], transposed).
      conv_state: [B, C, K-1] the previous K-1 inputs (zeros when None).
    Returns:
      (y [B, T, C] = sum_j weight[j] * x_padded[t + j], new state [B, C, K-1]).
    """
    B, T, C = x.shape
    K = weight.shape[0]
    if conv_state is None:
        prev = jnp.zeros((B, K - 1, C), x.dtype)
    else:
        prev = jnp.swapaxes(conv_state, 1, 2).astype(x.dtype)
    full = jnp.concatenate([prev, x], axis=1)  # [B, K-1+T, C]
    w = weight.astype(jnp.float32)
    y = sum(full[:, j:j + T, :].astype(jnp.float32) * w[j] for j in range(K))
    new_state = jnp.swapaxes(full[:, T:, :], 1, 2)  # last K-1 inputs: [B, C, K-1]
    return y.astype(x.dtype), new_state


class DepthwiseConv1d(nn.Module):
    """Holds the conv taps ``kernel`` [K, C] and applies :func:`causal_conv1d`."""

    kernel_size: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, conv_state=None):
        init = nn.initializers.normal(self.kernel_size ** -0.5)
        w = self.param("kernel", init, (self.kernel_size, x.shape[-1]), self.param_dtype)
        return causal_conv1d(x, w, conv_state)


class Qwen3NextGatedDeltaNet(nn.Module):
    config: Qwen3NextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    gdn_impl: str = "auto"

    @nn.compact
    def __call__(self, x, token_mask, cache=None):
        """Mix the new tokens, continuing from ``cache``.

        Args:
          x: [B, T, d] hidden states (normed).
          token_mask: [B, T] bool, False on padding: padded tokens are zeroed before the
            projections and neither decay nor update the recurrent state.
          cache: None or {"conv_state": [B, conv_dim, K-1], "recurrent_state": [B, Hv, dk, dv]
            float32}.
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
        q, k, v, z = jnp.split(qkvz, [dk, 2 * dk, 2 * dk + n * dv], axis=-1)
        ba = dense(2 * Hv, name="in_proj_ba", **proj)(x).reshape(B, T, Hk, 2 * n)
        b, a = ba[..., :n].reshape(B, T, Hv), ba[..., n:].reshape(B, T, Hv)

        mixed = jnp.concatenate([q.reshape(B, T, Hk * dk), k.reshape(B, T, Hk * dk),
                                 v.reshape(B, T, Hv * dv)], axis=-1)  # [B, T, conv_dim]
        mixed, conv_state = DepthwiseConv1d(cfg.linear_conv_kernel_dim, self.param_dtype,
                                            name="conv1d")(
            mixed, None if cache is None else cache["conv_state"])
        mixed = jax.nn.silu(mixed)
        q, k, v = jnp.split(mixed, [Hk * dk, 2 * Hk * dk], axis=-1)
        q, k = q.reshape(B, T, Hk, dk), k.reshape(B, T, Hk, dk)
        v = v.reshape(B, T, Hv, dv)

        a_log = self.param("A_log", _a_log_init, (Hv,), jnp.float32)
        dt_bias = self.param("dt_bias", nn.initializers.ones, (Hv,), jnp.float32)
        beta = jax.nn.sigmoid(b.astype(jnp.float32))  # [B, T, Hv] float32
        g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        g = jnp.where(token_mask[..., None], g, 0.0)
        k = jnp.where(token_mask[..., None, None], k, 0)

        op = fused_recurrent_gated_delta_rule if T <= RECURRENT_MAX_TOKENS else \
            chunk_gated_delta_rule
        o, final_state = op(q, k, v, g, beta, scale=dk ** -0.5,
                            initial_state=None if cache is None else cache["recurrent_state"],
                            output_final_state=cache is not None, use_qk_l2norm_in_kernel=True,
                            impl=self.gdn_impl)
        o = RMSNormGated(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype, name="norm")(
            o.astype(self.dtype), z.reshape(B, T, Hv, dv))
        y = dense(cfg.hidden_size, name="out_proj", **proj)(o.reshape(B, T, Hv * dv))
        new_cache = None if cache is None else {"conv_state": conv_state.astype(
            cache["conv_state"].dtype), "recurrent_state": final_state}
        return y, new_cache
