"""Our Orbax params checkpoint (or an in-memory params tree) -> HF safetensors checkpoint.

Written with the released per-expert names (``mlp.experts.{e}.gate_proj.weight`` ...) in torch
layout, sharded as ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(or one ``model.safetensors``), loadable by transformers' ``from_pretrained``. Streams: one Orbax
group and one safetensors tensor in memory at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from qnext_jax.config import Qwen3NextConfig, read_config_json
from qnext_jax.convert import name_map as nm
from qnext_jax.convert.hf_checkpoint import (
    EXPORT_MARKER,
    INDEX_FILE,
    SINGLE_FILE,
    atomic_directory,
    check_not_replaced,
    check_out_dir,
    check_tokenizer_dir,
    check_tokenizer_fits,
    config_naming_dtype,
    copy_tokenizer_files,
    float_dtype,
    json_field,
    write_export_marker,
    written_by_export,
    written_into,
)
from qnext_jax.convert.orbax_store import _flatten, iter_groups_numpy, read_index
from qnext_jax.convert.safetensors_io import SafetensorsWriter

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (10^9) or "500MiB" (2^20)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (e.g. 5GB, 500MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _write_hf(hf_dir: Path, config_json: dict, leaves: list[nm.Leaf], dtypes: dict[str, np.dtype],
              arrays: Iterator[tuple[str, np.ndarray]], max_shard_size: int,
              tokenizer_src: Path | None, overwrite: bool, progress: bool,
              source: Path | None = None) -> Path:
    """Write ``arrays`` ((leaf key, value) in the order of ``leaves``) as an HF checkpoint;
    ``source``: the converted checkpoint exported (recorded in EXPORT_MARKER), if any."""
    from tqdm.auto import tqdm

    # The plan: every HF tensor (name, dtype, shape) in order, cut into shards.
    plan: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    for leaf in leaves:
        for name in leaf.sources:
            plan.append((name, dtypes[leaf.key], leaf.source_shape))
    shards: list[list] = [[]]
    size = 0
    bytes_of: dict[np.dtype, int] = {}
    for spec in plan:
        n = int(np.prod(spec[2], dtype=np.int64)) * spec[1].itemsize
        bytes_of[spec[1]] = bytes_of.get(spec[1], 0) + n
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    # The dtype written: that of the most bytes (A_log and dt_bias stay float32).
    config_json = config_naming_dtype(config_json, max(bytes_of, key=bytes_of.get))

    check_out_dir(hf_dir, overwrite, "export",
                  written_into(hf_dir, EXPORT_MARKER, written_by_export), EXPORT_MARKER)
    marker = hf_dir / EXPORT_MARKER
    if (source is not None and json_field(marker, "files") is not None
            and json_field(marker, "source") is None):
        # written from in-memory params (markers list files and sources since they name both):
        # a fine-tune's --export-hf (its run replaces it) or a demo checkpoint
        raise FileExistsError(f"{hf_dir} holds a checkpoint written from in-memory params (a "
                              "fine-tune's --export-hf, a demo checkpoint), not an earlier "
                              "`qnext export` output, which replacing it would lose; write to "
                              "a new or empty directory")
    with atomic_directory(hf_dir) as tmp:
        weight_map, total = {}, 0
        shard_iter = iter(zip(names, shards))
        writer, remaining = None, 0
        leaf_of = {leaf.key: leaf for leaf in leaves}
        bar = tqdm(total=len(leaves), disable=not progress, desc=f"export {hf_dir.name}")
        for key, array in arrays:
            for name, tensor in leaf_of[key].split(array):
                if remaining == 0:
                    if writer is not None:
                        writer.close()
                    fname, specs = next(shard_iter)
                    writer, remaining = SafetensorsWriter(tmp / fname, specs), len(specs)
                writer.write(name, tensor)
                weight_map[name] = fname
                total += tensor.nbytes
                remaining -= 1
            bar.update(1)
        bar.close()
        if writer is not None:
            writer.close()
        if len(weight_map) != len(plan):
            raise ValueError(f"wrote {len(weight_map)} of {len(plan)} tensors")
        if len(names) > 1:
            (tmp / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        if tokenizer_src is not None:
            copy_tokenizer_files(tokenizer_src, tmp)
        write_export_marker(tmp, source)
    return hf_dir


def orbax_to_hf(orbax_dir: str | Path, hf_dir: str | Path, *, max_shard_size: int | str = "5GB",
                overwrite: bool = False, progress: bool = True) -> Path:
    """Export a checkpoint written by :func:`hf_to_orbax` as an HF safetensors checkpoint.

    Tensors keep their stored dtype (A_log and dt_bias float32); ``mtp.*`` is written when the
    config has ``mtp_num_hidden_layers > 0``. The config.json is copied with ``torch_dtype``
    (and ``dtype``, when it has one) set to the dtype written (that of the most bytes); the
    tokenizer files are copied (checked first: see Raises).

    Args:
      orbax_dir: directory written by ``hf_to_orbax``.
      hf_dir: output directory (written under a temporary name, renamed at the end).
      max_shard_size: bytes per safetensors shard (int, or "5GB" / "500MiB").
    Raises:
      ValueError: the params do not match the config's name map (names each leaf);
        ``hf_dir`` is ``orbax_dir`` or holds it; the tokenizer in ``orbax_dir`` produces ids
        >= the config's ``vocab_size`` (naming both; nothing written).
      FileExistsError: ``hf_dir`` is not empty and ``overwrite`` is False.
      FileNotFoundError: ``orbax_dir`` is not a checkpoint written by ``hf_to_orbax``.
    """
    orbax_dir, hf_dir = Path(orbax_dir), Path(hf_dir)
    index = read_index(orbax_dir)  # first: it names a directory that is no such checkpoint
    check_not_replaced(hf_dir, orbax_dir)
    raw = read_config_json(orbax_dir)  # its errors name the file
    config = Qwen3NextConfig.from_dict(raw)
    by_key = {leaf.key: leaf for leaf in nm.name_map(config)}
    stored = index["leaves"]
    bad = [f"{k}: stored {stored.get(k, {}).get('shape')}, expected {list(by_key[k].shape)}"
           for k in by_key if k not in stored or tuple(stored[k]["shape"]) != by_key[k].shape]
    bad += [f"{k}: not a param of this config" for k in stored if k not in by_key]
    if bad:
        raise ValueError(f"{orbax_dir}: params do not match its config.json:\n  "
                         + "\n  ".join(bad))
    check_tokenizer_fits(orbax_dir, config.vocab_size)
    order = [by_key[k] for g in index["groups"] for k in g["leaves"]]
    dtypes = {k: np.dtype(v["dtype"]) for k, v in stored.items()}

    def arrays():
        for group in iter_groups_numpy(orbax_dir):
            yield from group.items()

    return _write_hf(hf_dir, raw, order, dtypes, arrays(), parse_size(max_shard_size),
                     orbax_dir, overwrite, progress, source=orbax_dir)


def params_to_hf(config: Qwen3NextConfig, params: dict, hf_dir: str | Path, *,
                 max_shard_size: int | str = "5GB", dtype=None, config_json: dict | None = None,
                 tokenizer_dir: str | Path | None = None, overwrite: bool = False,
                 progress: bool = False) -> Path:
    """Write an in-memory params tree (jax or numpy leaves) as an HF checkpoint.

    Args:
      config: the model config (``mtp_num_hidden_layers`` decides whether ``mtp`` is written).
      params: the params tree of ``config``.
      dtype: cast to this dtype (None keeps each leaf's; A_log and dt_bias stay float32).
      config_json: the config.json to write (default ``config.to_dict()``); its ``torch_dtype``
        (and ``dtype``, when it has one) is set to the dtype written (that of the most bytes).
      tokenizer_dir: copy tokenizer files from here (a directory holding tokenizer.json or
        its companions); its tokenizer must produce ids below ``config.vocab_size``, added and
        special tokens included.
    Raises:
      ValueError: params that do not match the config; ``dtype`` not a floating-point dtype;
        the tokenizer in ``tokenizer_dir`` produces ids >= ``config.vocab_size`` (naming the
        directory, the tokenizer's size and vocab_size); ``tokenizer_dir`` holds no tokenizer
        files. Raised before anything is written.
      FileNotFoundError: ``tokenizer_dir`` is not a directory.
      FileExistsError: ``hf_dir`` is not empty and ``overwrite`` is False.
      TypeError: ``config`` is not a Qwen3NextConfig or ``params`` not a dict.
    """
    if not isinstance(config, Qwen3NextConfig):
        raise TypeError(f"config must be a Qwen3NextConfig, got {type(config).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be the model's params (a nested dict), got "
                        f"{type(params).__name__}")
    leaves = nm.name_map(config)
    flat = dict(_flatten(params))
    missing = [leaf.key for leaf in leaves if leaf.key not in flat]
    extra = sorted(set(flat) - {leaf.key for leaf in leaves})
    if missing or extra:
        raise ValueError(f"params do not match the config: missing {missing}, unexpected {extra}")
    dt = float_dtype(dtype)
    if tokenizer_dir is not None:
        tokenizer_dir = check_tokenizer_dir(tokenizer_dir)
        check_tokenizer_fits(tokenizer_dir, config.vocab_size)
    dtypes = {leaf.key: leaf.out_dtype(np.dtype(flat[leaf.key].dtype), dt) for leaf in leaves}

    def arrays():
        for leaf in leaves:
            value = np.asarray(flat[leaf.key])
            if value.shape != leaf.shape:
                raise ValueError(f"{leaf.key}: shape {value.shape}, expected {leaf.shape}")
            yield leaf.key, value.astype(dtypes[leaf.key], copy=False)

    return _write_hf(Path(hf_dir), config_json or config.to_dict(), leaves, dtypes, arrays(),
                     parse_size(max_shard_size), tokenizer_dir,
                     overwrite, progress)
