"""HF safetensors checkpoint -> our Orbax params checkpoint, streamed tensor by tensor."""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
from pathlib import Path

import numpy as np

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.convert import name_map as nm
from qnext_jax.convert.hf_checkpoint import (
    HFCheckpoint,
    atomic_directory,
    check_not_replaced,
    check_out_dir,
    config_naming_dtype,
    copy_tokenizer_files,
    float_dtype,
    written_into,
)
from qnext_jax.convert.orbax_store import (
    INDEX_FILE,
    MIN_GROUP_BYTES,
    ParamWriter,
    written_by_convert,
)


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    """What :func:`hf_to_orbax` wrote: the directory, the config (mtp_num_hidden_layers set),
    the number of HF tensors and params leaves, bytes of params written, and the process's peak
    resident memory (ru_maxrss, bytes) at the end."""

    out_dir: Path
    config: Qwen3NextConfig
    num_tensors: int
    num_leaves: int
    param_bytes: int
    peak_rss_bytes: int


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _leaf_nbytes(leaf: nm.Leaf, ckpt: HFCheckpoint, dtype) -> int:
    src = ckpt.tensors[leaf.sources[0]].dtype
    return leaf.size * leaf.out_dtype(src, dtype).itemsize


def hf_to_orbax(hf_dir: str | Path, out_dir: str | Path, *, dtype=None, overwrite: bool = False,
                progress: bool = True, group_bytes: int | None = None) -> ConversionResult:
    """Convert an HF Qwen3-Next checkpoint directory into our Orbax params checkpoint.

    Reads ``config.json`` and the safetensors (``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``), checks every tensor name and shape against the config
    before writing anything, then streams: each params leaf is read tensor by tensor (expert
    weights one expert at a time into the stacked [E, ...] array), transposed to our layout, cast,
    and handed to the writer, which saves groups of at most ``group_bytes`` as Orbax checkpoints.
    Peak host memory is about one group plus one leaf (both at most the largest leaf, or 32 MiB).

    Output (``out_dir``, written under a temporary name next to it and renamed at the end):
    params (see :mod:`qnext_jax.convert.orbax_store`), config.json (the HF one with
    ``mtp_num_hidden_layers`` = number of ``mtp.layers.N`` found), the tokenizer files present.

    Args:
      hf_dir: HF checkpoint directory.
      out_dir: output directory; must not exist or be empty unless ``overwrite``.
      dtype: dtype of the stored params (e.g. "bfloat16", jnp.float32); None keeps the
        checkpoint's. A_log and dt_bias are always float32.
      overwrite: replace a non-empty ``out_dir``.
      progress: show a tqdm progress bar (bytes written) and print peak memory at the end.
      group_bytes: flush a group when it would exceed this many bytes (default: the largest
        leaf, at least 32 MiB).
    Returns:
      ConversionResult.
    Raises:
      CheckpointMismatchError (a ValueError): missing, unexpected or mis-shaped tensors, all
        listed, nothing written.
      ConfigError: an invalid config.json. FileNotFoundError: no config.json / safetensors.
      FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
      ValueError: ``dtype`` is not a floating-point dtype; ``out_dir`` is ``hf_dir`` or holds it.
    """
    from tqdm.auto import tqdm

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    dtype = float_dtype(dtype)
    check_not_replaced(out_dir, hf_dir)
    ckpt = HFCheckpoint(hf_dir)
    config, leaves = ckpt.match()
    check_out_dir(out_dir, overwrite, "convert",
                  written_into(out_dir, INDEX_FILE, written_by_convert))

    sizes = [_leaf_nbytes(leaf, ckpt, dtype) for leaf in leaves]
    if group_bytes is None:
        group_bytes = max(max(sizes), MIN_GROUP_BYTES)
    with atomic_directory(out_dir) as tmp:
        writer = ParamWriter(tmp, group_bytes)
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, disable=not progress,
                  desc=f"convert {hf_dir.name}") as bar:
            for leaf, size in zip(leaves, sizes):
                bar.set_postfix_str(leaf.key, refresh=False)
                writer.reserve(size)
                writer.add(leaf.key, leaf.assemble(ckpt.read, dtype))
                bar.update(size)
            (tmp / "config.json").write_text(
                json.dumps(config_naming_dtype(ckpt.config_json(config), dtype), indent=2) + "\n")
            copy_tokenizer_files(hf_dir, tmp)
            writer.close()  # last: its index lists the files
    result = ConversionResult(out_dir, config, len(ckpt.tensors), len(leaves), sum(sizes),
                              peak_rss_bytes())
    if progress:
        print(f"[qnext convert] {len(ckpt.tensors)} tensors -> {len(leaves)} leaves "
              f"({sum(sizes) / 2**30:.2f} GiB) in {out_dir}; peak host memory (RSS) "
              f"{result.peak_rss_bytes / 2**30:.2f} GiB", file=sys.stderr)
    return result


def hf_to_params(hf_dir: str | Path, dtype=None, config: Qwen3NextConfig | None = None,
                 put=None) -> tuple[Qwen3NextConfig, dict]:
    """Convert an HF checkpoint in memory: (config, params as a nested dict).

    Args:
      hf_dir: HF checkpoint directory.
      dtype: as in :func:`hf_to_orbax`.
      config: use this config instead of the directory's config.json.
      put: ``put(leaf_key, numpy array)`` -> the stored leaf (e.g. a ``jax.device_put`` onto a
        sharding); default keeps numpy arrays.
    Raises:
      CheckpointMismatchError: as :func:`hf_to_orbax`.
    """
    dtype = np.dtype(dtype) if dtype is not None else None
    ckpt = HFCheckpoint(hf_dir)
    config, leaves = ckpt.match(config)
    values = []
    for leaf in leaves:
        arr = leaf.assemble(ckpt.read, dtype)
        values.append(put(leaf.key, arr) if put is not None else arr)
    return config, nm.tree_from_leaves(leaves, values)
