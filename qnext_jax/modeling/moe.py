"""Feed-forward blocks: the dense SwiGLU MLP and the dropless sparse MoE of Qwen3-Next.

Follows transformers' ``Qwen3NextMLP`` and ``Qwen3NextSparseMoeBlock``: router logits x W^T in the
model dtype, softmax over all experts in float32, top-k, optional renormalisation of the k
weights, experts ``down(silu(gate(x)) * up(x))`` combined with the router weights, plus the
sigmoid-gated shared expert. Dropless: tokens are sorted by expert and every expert runs as one
group of a grouped matmul (``jax.lax.ragged_dot``), so no token is ever dropped.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling.layers import dense


class Qwen3NextMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``; x [..., d] -> [..., d]."""

    intermediate_size: int
    hidden_size: int
    std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                    std=self.std)
        h = jax.nn.silu(dense(self.intermediate_size, name="gate_proj", **proj)(x)) * dense(
            self.intermediate_size, name="up_proj", **proj)(x)
        return dense(self.hidden_size, name="down_proj", **proj)(h)


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool):
    """Top-k routing: (weights [N, k] float32, expert ids [N, k] int32) from logits [N, E]."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def grouped_experts(x, weights, experts, gate_proj, up_proj, down_proj, precision=None):
    """Dropless routed experts by sorting tokens and one grouped matmul per projection.

    Args:
      x: [N, d] tokens. weights: [N, k] router weights (in x's dtype). experts: [N, k] int ids.
      gate_proj, up_proj: [E, d, I]; down_proj: [E, I, d].
    Returns:
      [N, d]: sum_k weights[n, k] * expert_{experts[n, k]}(x[n]).
    """
    N, k = experts.shape
    E = gate_proj.shape[0]
    flat = experts.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)
    token = order // k  # source token of each sorted row
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[token]  # [N*k, d]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate_proj, group_sizes, precision=precision)) * \
        jax.lax.ragged_dot(xs, up_proj, group_sizes, precision=precision)
    y = jax.lax.ragged_dot(h, down_proj, group_sizes, precision=precision)  # [N*k, d]
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(y)


class Qwen3NextExperts(nn.Module):
    """The stacked routed experts: gate_proj, up_proj [E, d, I] and down_proj [E, I, d]."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, weights, experts):
        E, d, inner = self.num_experts, self.hidden_size, self.intermediate_size
        init = nn.initializers.normal(self.std)
        gate = self.param("gate_proj", init, (E, d, inner), self.param_dtype)
        up = self.param("up_proj", init, (E, d, inner), self.param_dtype)
        down = self.param("down_proj", init, (E, inner, d), self.param_dtype)
        cast = lambda w: w.astype(self.dtype)  # noqa: E731
        return grouped_experts(x, weights.astype(self.dtype), experts, cast(gate), cast(up),
                               cast(down), self.precision)


class Qwen3NextSparseMoeBlock(nn.Module):
    """Router + routed experts + sigmoid-gated shared expert. x [B, T, d] -> [B, T, d].

    The raw router logits [B*T, E] are sown as ``intermediates/router_logits`` (for the
    load-balancing loss).
    """

    config: Qwen3NextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        B, T, d = x.shape
        mod = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        flat = x.reshape(B * T, d).astype(self.dtype)
        logits = dense(cfg.num_experts, name="gate", std=cfg.initializer_range, **mod)(flat)
        self.sow("intermediates", "router_logits", logits)
        weights, experts = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        routed = Qwen3NextExperts(cfg.num_experts, d, cfg.moe_intermediate_size,
                                  std=cfg.initializer_range, name="experts", **mod)(
            flat, weights, experts)
        shared = Qwen3NextMLP(cfg.shared_expert_intermediate_size, d, std=cfg.initializer_range,
                              name="shared_expert", **mod)(flat)
        shared_gate = dense(1, name="shared_expert_gate", std=cfg.initializer_range, **mod)(flat)
        out = routed + jax.nn.sigmoid(shared_gate) * shared
        return out.reshape(B, T, d)
