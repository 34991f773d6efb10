"""qnext-jax: Qwen3-Next (hybrid Gated DeltaNet + gated attention, sparse MoE) in JAX/Flax.

    from qnext_jax import Qwen3NextConfig, Qwen3NextForCausalLM, load, init_cache, generate
"""

from qnext_jax.cache import init_cache
from qnext_jax.config import ConfigError, Qwen3NextConfig
from qnext_jax.generate import Generator, generate
from qnext_jax.modeling import Qwen3NextForCausalLM


def load(path, mesh=None, dtype=None):
    """(config, params) from an Orbax checkpoint dir of ``qnext convert`` or an HF dir.

    See :func:`qnext_jax.convert.load`.
    """
    from qnext_jax.convert import load as _load

    return _load(path, mesh=mesh, dtype=dtype)


__all__ = ["ConfigError", "Generator", "Qwen3NextConfig", "Qwen3NextForCausalLM", "generate",
           "init_cache", "load"]
