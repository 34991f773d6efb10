"""Partial rotary position embedding (NeoX halves) with optional YaRN scaling.

Follows transformers' ``Qwen3NextRotaryEmbedding``/``apply_rotary_pos_emb`` and
``_compute_yarn_parameters`` (Peng et al. 2023, "YaRN: Efficient Context Window Extension").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qnext_jax.config import Qwen3NextConfig


def _yarn_inv_freq(config: Qwen3NextConfig, dim: int) -> tuple[np.ndarray, float]:
    rs = config.rope_scaling_params
    base = config.rope_theta
    factor = float(rs["factor"])
    original = rs.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast = rs.get("beta_fast") or 32.0
    beta_slow = rs.get("beta_slow") or 1.0
    truncate = rs.get("truncate", True)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention_factor = mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1.0 - ramp
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs) * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_inv_freq(config: Qwen3NextConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rotary_dim // 2] (float32) and the cos/sin scale (1 unless YaRN)."""
    dim = config.rotary_dim
    rs = config.rope_scaling_params
    kind = None if rs is None else rs.get("rope_type", rs.get("type"))
    if kind == "yarn":
        return _yarn_inv_freq(config, dim)
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(
        np.float32) / dim))
    if kind == "linear":
        inv_freq = inv_freq / float(rs["factor"])
    return inv_freq.astype(np.float32), 1.0


def rope_cos_sin(config: Qwen3NextConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] for integer ``positions`` [B, T]; float32 math, cast to dtype."""
    inv_freq, scale = rope_inv_freq(config)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, rd]
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first ``rotary_dim`` dims of x [B, T, H, D] (NeoX ``rotate_half``)."""
    rd = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
