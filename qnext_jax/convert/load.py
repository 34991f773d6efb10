"""``load``: (config, params) from a converted checkpoint or straight from an HF directory."""

from __future__ import annotations

from pathlib import Path

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.convert import name_map as nm
from qnext_jax.convert.hf_checkpoint import float_dtype
from qnext_jax.convert.orbax_store import _flatten, finetune_out_hint, is_orbax_dir, restore


def _resolve_shardings(config: Qwen3NextConfig, mesh, shardings):
    """A nested dict of shardings (or None): ``shardings`` as given, called on the abstract
    params when callable, or everything replicated over ``mesh``."""
    import jax

    if callable(shardings):
        shardings = shardings(nm.abstract_params(config))
    if shardings is None and mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        shardings = nm.tree_from_leaves(nm.name_map(config), lambda leaf: replicated)
    return shardings


def load(path: str | Path, mesh=None, dtype=None, shardings=None
         ) -> tuple[Qwen3NextConfig, dict]:
    """Restore (config, params) from ``path``.

    Args:
      path: a directory written by :func:`hf_to_orbax`, or an HF checkpoint directory
        (config.json + safetensors; converted in memory, nothing written).
      mesh: a ``jax.sharding.Mesh``; without ``shardings`` every leaf is replicated over it.
      dtype: dtype of the returned params (e.g. jnp.bfloat16); None keeps the stored one.
        A_log and dt_bias stay float32.
      shardings: a nested dict of ``jax.sharding.Sharding`` with the params' structure (e.g.
        NamedSharding per leaf), or a callable taking the abstract params tree
        (``jax.ShapeDtypeStruct`` leaves) and returning one. Orbax reads each leaf straight into
        its sharding; no host holds more than its shards plus one group being read.
    Returns:
      (Qwen3NextConfig, params): params is a nested dict of ``jax.Array`` (paths as in
      :func:`qnext_jax.convert.name_map.name_map`).
    Raises:
      FileNotFoundError: ``path`` is neither kind of checkpoint.
      CheckpointMismatchError: an HF directory whose tensors do not match its config.
      TypeError: ``mesh`` is not a Mesh (a mesh spec string, say).
      ValueError: ``dtype`` is not a floating-point dtype (naming those accepted).
    """
    import jax

    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__} {mesh!r}: "
                        "make one with qnext_jax.sharding.make_mesh('tensor=2'), and shard by "
                        "the plan with shardings=qnext_jax.sharding.tree_shardings(mesh)")
    dtype = float_dtype(dtype)
    path = Path(path)
    if is_orbax_dir(path):
        config = Qwen3NextConfig.from_hf(path)  # its errors name the file
        shardings = _resolve_shardings(config, mesh, shardings)
        f32 = frozenset(leaf.key for leaf in nm.name_map(config) if leaf.float32)
        return config, restore(path, shardings, dtype, f32)
    if (path / "config.json").is_file():
        from qnext_jax.convert.hf_checkpoint import HFCheckpoint

        config, _ = HFCheckpoint(path).match()
        flat_sh = dict(_flatten(_resolve_shardings(config, mesh, shardings) or {}))
        from qnext_jax.convert.hf_to_orbax import hf_to_params

        def put(key, arr):
            return (jax.device_put(arr, flat_sh[key]) if key in flat_sh
                    else jax.numpy.asarray(arr))

        return hf_to_params(path, dtype, config, put)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file: give the checkpoint's directory")
    raise FileNotFoundError(f"{path}: neither a converted checkpoint (no params_index.json) nor "
                            f"an HF checkpoint (no config.json){finetune_out_hint(path)}")

