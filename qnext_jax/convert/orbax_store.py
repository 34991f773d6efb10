"""Our on-disk params format: a sequence of Orbax checkpoints, each a sub-tree of the params.

Layout of a converted checkpoint directory::

    OUT/config.json          the HF config (mtp_num_hidden_layers set)
    OUT/params_index.json    {"format", "version", "groups": [{"dir", "leaves"}], "leaves": {...},
                             "files": every path under OUT, what --overwrite may replace}
    OUT/params/00000/        an Orbax StandardCheckpointer checkpoint: a nested dict holding the
    OUT/params/00001/        leaves listed for it in params_index.json ("layers_0/mlp/gate/kernel")
    ...
    OUT/tokenizer.json ...   copied from the HF directory

Why groups instead of one Orbax checkpoint: Orbax writes a pytree in one call, with every leaf in
memory, so one checkpoint of the 80B model would need 160 GB of host RAM. Writing consecutive
leaves in groups of at most ``group_bytes`` (default: the largest leaf, at least 32 MiB), each
group flushed before the next leaf is built, keeps the converter's peak near a small multiple of
the largest output array (the group, plus Orbax/tensorstore's transient write buffers); each group stays a plain Orbax checkpoint (OCDBT,
zarr), restored with ``StandardCheckpointer.restore`` straight into target shardings, on one host
or many. (Orbax's experimental partial-save API does this in one checkpoint, but in our trial it
slowed down with the number of calls, hundreds here.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qnext_jax.convert.hf_checkpoint import TOKENIZER_FILES, files_under

FORMAT = "qnext-jax/orbax-params"
VERSION = 1
INDEX_FILE = "params_index.json"
PARAMS_DIR = "params"
MIN_GROUP_BYTES = 32 * 1024 * 1024
# zarr chunks of at most this size: a sharded restore reads (and decompresses) only the chunks
# of its own shards rather than whole arrays.
CHUNK_BYTES = 64 * 1024 * 1024
# A path in a group's directory, written by ParamWriter.flush.
_GROUP = re.compile(rf"^{PARAMS_DIR}/\d{{5}}(/|$)")


def _nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        parts = key.split("/")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = value
    return tree


def _flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            yield from _flatten(v, key)
        else:
            yield key, v


def is_orbax_dir(path: str | Path) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


def written_by_convert(rel: str) -> bool:
    """Whether a file at this path (relative to the output, "/"-separated) is one ``qnext
    convert`` (or a finetune's final params) writes: the params index, config.json, tokenizer
    and generation files, and in PARAMS_DIR the groups' directories (their contents are
    Orbax's)."""
    return (rel in (INDEX_FILE, PARAMS_DIR, "config.json") or rel in TOKENIZER_FILES
            or bool(_GROUP.match(rel)))


class ParamWriter:
    """Write params leaf by leaf into ``root`` (see the module docstring).

    Leaves accumulate until adding one would pass ``group_bytes``; the group is then saved as one
    Orbax checkpoint and dropped from memory. Call :meth:`close` last, once the directory's
    other files (config, tokenizer) are written: it flushes and writes the index, which lists
    every path under ``root`` (what a later ``--overwrite`` may replace:
    ``hf_checkpoint.written_into``).
    """

    def __init__(self, root: str | Path, group_bytes: int):
        import orbax.checkpoint as ocp

        self.root = Path(root).absolute()  # Orbax refuses relative paths
        (self.root / PARAMS_DIR).mkdir(parents=True, exist_ok=True)
        self.group_bytes = int(group_bytes)
        self._ocp = ocp
        self._ckpt = ocp.StandardCheckpointer()
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self.groups: list[dict] = []
        self.leaves: dict[str, dict] = {}

    def reserve(self, nbytes: int) -> None:
        """Flush now if a leaf of ``nbytes`` would not fit in the current group (call before
        building the leaf, so that it is not in memory while the group is saved)."""
        if self._pending and self._pending_bytes + nbytes > self.group_bytes:
            self.flush()

    def add(self, key: str, array: np.ndarray) -> None:
        if key in self.leaves:
            raise ValueError(f"leaf {key} written twice")
        self.reserve(array.nbytes)
        self._pending[key] = array
        self._pending_bytes += array.nbytes
        self.leaves[key] = {"shape": list(array.shape), "dtype": np.dtype(array.dtype).name}

    def flush(self) -> None:
        if not self._pending:
            return
        rel = f"{PARAMS_DIR}/{len(self.groups):05d}"
        save_args = {k: self._ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for k in self._pending}
        self._ckpt.save(self.root / rel, _nest(self._pending), save_args=_nest(save_args))
        self._ckpt.wait_until_finished()
        self.groups.append({"dir": rel, "leaves": list(self._pending)})
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict:
        self.flush()
        self._ckpt.close()
        index = {"format": FORMAT, "version": VERSION, "groups": self.groups,
                 "leaves": self.leaves, "files": sorted([*files_under(self.root), INDEX_FILE])}
        (self.root / INDEX_FILE).write_text(json.dumps(index, indent=1))
        return index


def finetune_out_hint(path: str | Path) -> str:
    """For an error on a directory that is no checkpoint: where the params are when it is a
    ``qnext finetune --out`` directory ("" otherwise)."""
    final = Path(path) / "final"
    if (final / INDEX_FILE).is_file():
        return f" (a qnext finetune output: its params are in {final})"
    return ""


def read_index(root: str | Path) -> dict:
    """The params index of a converted checkpoint (raises ValueError naming the file)."""
    path = Path(root) / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        if not Path(root).exists():
            raise FileNotFoundError(f"{root} does not exist") from None
        hf = (" (it holds a config.json: an HF checkpoint, which needs no export)"
              if (Path(root) / "config.json").is_file() else "")
        raise FileNotFoundError(f"{path} not found: {root} is not a checkpoint written by "
                                f"qnext_jax.convert.hf_to_orbax{hf}{finetune_out_hint(root)}"
                                ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(index, dict):  # then refused below as of no known format
        index = {}
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{path}: unknown format {index.get('format')!r} version "
                         f"{index.get('version')!r}; expected {FORMAT!r} version {VERSION}")
    return index


def iter_groups_numpy(root: str | Path) -> Iterator[dict[str, np.ndarray]]:
    """Each group of ``root`` in turn as {leaf key: host numpy array} (one group in memory)."""
    import orbax.checkpoint as ocp

    root = Path(root).absolute()  # Orbax refuses relative paths
    index = read_index(root)
    with ocp.StandardCheckpointer() as ckpt:
        for group in index["groups"]:
            flat = dict(_flatten(ckpt.restore(root / group["dir"])))
            yield {k: np.asarray(flat[k]) for k in group["leaves"]}


def restore(root: str | Path, shardings: dict | None = None, dtype=None,
            float32_keys: frozenset[str] = frozenset()) -> dict:
    """Restore the whole params tree as ``jax.Array`` leaves.

    Args:
      root: a directory written by :class:`ParamWriter`.
      shardings: None (each leaf on the default device) or a nested dict of ``jax.sharding``
        objects with the params' structure; each leaf is read straight into its sharding (on a
        multi-host mesh each process reads only its own shards).
      dtype: cast floating leaves to this dtype while reading (None keeps the stored dtype);
        leaves whose key is in ``float32_keys`` stay as stored.
    """
    import jax
    import orbax.checkpoint as ocp

    root = Path(root).absolute()  # Orbax refuses relative paths
    index = read_index(root)
    flat_shardings = dict(_flatten(shardings)) if shardings is not None else {}
    if shardings is not None:
        missing = sorted(set(index["leaves"]) - set(flat_shardings))
        extra = sorted(set(flat_shardings) - set(index["leaves"]))
        if missing or extra:
            raise ValueError(f"shardings do not match the params of {root}: missing "
                             f"{missing[:10]}, unexpected {extra[:10]}")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out: dict[str, object] = {}
    with ocp.StandardCheckpointer() as ckpt:
        for group in index["groups"]:
            target = {}
            for k in group["leaves"]:
                meta = index["leaves"][k]
                dt = np.dtype(meta["dtype"])
                if dtype is not None and k not in float32_keys:
                    dt = np.dtype(dtype)
                target[k] = jax.ShapeDtypeStruct(tuple(meta["shape"]), dt,
                                                 sharding=flat_shardings.get(k, default))
            tree = ckpt.restore(root / group["dir"], _nest(target))
            out.update(_flatten(tree))
    return _nest({k: out[k] for k in index["leaves"]})
