"""HF safetensors <-> Orbax conversion for Qwen3-Next (streaming; name map in ``name_map``).

    from qnext_jax.convert import hf_to_orbax, orbax_to_hf, load
    hf_to_orbax("HF_DIR", "OUT_DIR", dtype="bfloat16")   # -> ConversionResult
    config, params = load("OUT_DIR", mesh=mesh, shardings=shardings)   # or load("HF_DIR")
    orbax_to_hf("OUT_DIR", "HF_OUT_DIR", max_shard_size="5GB")
"""

from qnext_jax.convert.hf_checkpoint import CheckpointMismatchError
from qnext_jax.convert.hf_to_orbax import ConversionResult, hf_to_orbax, hf_to_params
from qnext_jax.convert.load import load
from qnext_jax.convert.name_map import abstract_params
from qnext_jax.convert.orbax_to_hf import orbax_to_hf, params_to_hf

__all__ = ["CheckpointMismatchError", "ConversionResult", "abstract_params", "hf_to_orbax",
           "hf_to_params", "load", "orbax_to_hf", "params_to_hf"]
