"""LoRA adapters on the projection weights (Hu et al. 2021, "LoRA", arXiv:2106.09685).

Each targeted kernel W [in, out] (stacked experts [E, in, out], scanned layers [L / P, ...])
gets ``a`` [.., in, r] and ``b`` [.., r, out]; the model runs with W + (alpha / r) a b, merged
on the fly inside the loss (so the model code is unchanged and the merged tree is exactly what
gets exported). ``b`` starts at 0:
the adapted model starts equal to the base. The adapter tree mirrors the params tree, holding
{"a", "b"} at each targeted leaf.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from qnext_jax.modeling.decoder import unstacked_ndim

# Projection kernels of attention, the Gated DeltaNet, dense / shared MLPs and routed experts.
DEFAULT_TARGETS = (r"(self_attn/(q|k|v|o)_proj|linear_attn/(in_proj_qkvz|in_proj_ba|out_proj)"
                   r"|mlp/(shared_expert/)?(gate|up|down)_proj|mlp/experts/(gate|up|down)_proj)"
                   r"(/kernel)?$")


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def init_lora(params, rank: int, targets: str = DEFAULT_TARGETS, seed: int = 0) -> dict:
    """Adapters for every leaf of ``params`` whose "/"-joined path matches ``targets``.

    ``a`` ~ N(0, 1/in) in float32, ``b`` = 0.

    Raises:
      ValueError: rank < 1, or no leaf matches.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    rx = re.compile(targets)
    flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if unstacked_ndim(p, x.shape) >= 2 and rx.search(_path_str(p))]
    if not flat:
        raise ValueError(f"LoRA targets {targets!r} match no params leaf")
    keys = jax.random.split(jax.random.key(seed), len(flat))
    out: dict = {}
    for (path, x), key in zip(flat, keys, strict=True):
        *lead, n_in, n_out = x.shape
        node = out
        for k in path:
            node = node.setdefault(k.key, {})
        node["a"] = jax.random.normal(key, (*lead, n_in, rank), jnp.float32) * n_in ** -0.5
        node["b"] = jnp.zeros((*lead, rank, n_out), jnp.float32)
    return out


def merge(params, lora: dict, alpha: float, rank: int):
    """params with W + (alpha / rank) a b at every adapted leaf (in W's dtype)."""
    scale = alpha / rank

    def walk(p, lo):
        if isinstance(lo, dict) and set(lo) == {"a", "b"} and not isinstance(p, dict):
            delta = jnp.einsum("...ir,...ro->...io", lo["a"], lo["b"]) * scale
            return (p.astype(jnp.float32) + delta).astype(p.dtype)
        return {k: walk(v, lo[k]) if k in lo else v for k, v in p.items()}

    return walk(params, lora)
