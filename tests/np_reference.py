"""Float64 numpy re-implementations of Qwen3-Next blocks, written from the formulas of
DESIGN.md section 3 (independent of qnext_jax's code), for tests."""

from __future__ import annotations

import numpy as np


def f64(x):
    return np.asarray(x, np.float64)


def rms_norm(x, w, eps=1e-6):
    """Zero-centred RMSNorm."""
    x = f64(x)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1.0 + f64(w))


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def rope(x, positions, theta, rotary_dim):
    """NeoX partial rotary: x [T, H, D], positions [T]."""
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    ang = positions[:, None].astype(np.float64) * inv[None]  # [T, rd/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :rotary_dim // 2], x[..., rotary_dim // 2:rotary_dim]
    out = x.copy()
    out[..., :rotary_dim // 2] = x1 * cos - x2 * sin
    out[..., rotary_dim // 2:rotary_dim] = x2 * cos + x1 * sin
    return out


def gated_attention(p, x, cfg, positions):
    """One sequence x [T, d] -> [T, d] (causal), params ``self_attn`` of our tree."""
    T = x.shape[0]
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qg = (x @ f64(p["q_proj"]["kernel"])).reshape(T, H, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:]
    k = (x @ f64(p["k_proj"]["kernel"])).reshape(T, Hkv, hd)
    v = (x @ f64(p["v_proj"]["kernel"])).reshape(T, Hkv, hd)
    q = rope(rms_norm(q, p["q_norm"]["weight"], cfg.rms_norm_eps), positions, cfg.rope_theta,
             cfg.rotary_dim)
    k = rope(rms_norm(k, p["k_norm"]["weight"], cfg.rms_norm_eps), positions, cfg.rope_theta,
             cfg.rotary_dim)
    out = np.zeros((T, H, hd))
    for h in range(H):
        kv = h // (H // Hkv)
        s = q[:, h] @ k[:, kv].T * hd ** -0.5
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        out[:, h] = softmax(s) @ v[:, kv]
    out = out.reshape(T, H * hd) * sigmoid(gate.reshape(T, H * hd))
    return out @ f64(p["o_proj"]["kernel"])


def mlp(p, x):
    return (silu(x @ f64(p["gate_proj"]["kernel"])) * (x @ f64(p["up_proj"]["kernel"]))) @ f64(
        p["down_proj"]["kernel"])


def routed_experts(x, weights, experts, gate, up, down):
    """Per-token loop over the chosen experts: sum_k weights[n, k] * expert(x[n]).

    x [N, d]; weights, experts [N, k]; gate, up [E, d, I]; down [E, I, d] -> [N, d] float64.
    """
    x = f64(x)
    out = np.zeros((x.shape[0], x.shape[1]))
    for n in range(x.shape[0]):
        for w, e in zip(weights[n], experts[n]):
            h = silu(x[n] @ f64(gate[e])) * (x[n] @ f64(up[e]))
            out[n] += f64(w) * (h @ f64(down[e]))
    return out


def sparse_moe(p, x, top_k, norm_topk_prob):
    """Dense per-expert loop: x [N, d] -> [N, d]."""
    probs = softmax(x @ f64(p["gate"]["kernel"]))
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, experts, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    ex = p["experts"]
    out = routed_experts(x, weights, experts, ex["gate_proj"], ex["up_proj"], ex["down_proj"])
    shared = mlp(p["shared_expert"], x)
    return out + sigmoid(x @ f64(p["shared_expert_gate"]["kernel"])) * shared


def attention_moe_layer(p, x, cfg, positions):
    """A full-attention + sparse-MoE decoder layer on one sequence x [T, d]."""
    x = x + gated_attention(p["self_attn"], rms_norm(x, p["input_layernorm"]["weight"],
                                                     cfg.rms_norm_eps), cfg, positions)
    h = rms_norm(x, p["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
    return x + sparse_moe(p["mlp"], h, cfg.num_experts_per_tok, cfg.norm_topk_prob)
