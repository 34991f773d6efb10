"""An HF checkpoint directory: its config, tensor headers, and the check against the name map.

Reading needs only the safetensors headers until the conversion proper starts, so every
mismatch is found (and reported at once) before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.convert import name_map as nm
from qnext_jax.convert.safetensors_io import TensorInfo, read_header, read_tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
# Tensors some checkpoints carry that are not parameters: skipped without complaint.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_MTP_LAYER = re.compile(r"^mtp\.layers\.(\d+)\.")
_MAX_LISTED = 50  # per category in the error message (the exception holds them all)


class CheckpointMismatchError(ValueError):
    """The tensors of an HF checkpoint do not match what its config.json describes.

    Attributes:
      missing: [(name, expected shape)]
      unexpected: [(name, found shape)]
      mismatched: [(name, expected shape, found shape)]
      problems: other findings (file-level), as sentences.
    """

    def __init__(self, directory, missing=(), unexpected=(), mismatched=(), problems=()):
        self.directory = str(directory)
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.mismatched, self.problems = list(mismatched), list(problems)
        super().__init__(self._message())

    def _message(self) -> str:
        def fmt(shape):
            return "[" + ", ".join(str(s) for s in shape) + "]"

        head = (f"HF checkpoint {self.directory} does not match its config.json: "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.mismatched)} with the wrong shape, {len(self.problems)} other "
                "problem(s)")
        rows = []
        for label, attr, render in (  # problems first: a missing shard explains the rest
                ("problem", "problems", str),
                ("missing", "missing", lambda x: f"{x[0]}: expected {fmt(x[1])}"),
                ("unexpected", "unexpected", lambda x: f"{x[0]}: found {fmt(x[1])}"),
                ("wrong shape", "mismatched",
                 lambda x: f"{x[0]}: expected {fmt(x[1])}, found {fmt(x[2])}")):
            items = getattr(self, attr)
            for item in items[:_MAX_LISTED]:
                rows.append(f"  {label}: {render(item)}")
            if len(items) > _MAX_LISTED:
                rows.append(f"  ... and {len(items) - _MAX_LISTED} more {label} (all in the "
                            f"error's .{attr})")
        return "\n".join([head] + rows)

    @property
    def empty(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.problems)


class HFCheckpoint:
    """The tensors of an HF checkpoint directory (single file or sharded with an index).

    Attributes:
      directory, raw_config (the config.json dict), tensors ({name: TensorInfo}),
      problems (file-level inconsistencies, reported by :meth:`match`).
    Raises (constructor):
      FileNotFoundError: no config.json, or no safetensors file.
    """

    def __init__(self, directory: str | Path):
        self.directory = d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory {d} does not exist")
        try:
            self.raw_config = json.loads((d / "config.json").read_text())
        except FileNotFoundError:
            from qnext_jax.convert.orbax_store import finetune_out_hint

            raise FileNotFoundError(f"{d} has no config.json{finetune_out_hint(d)}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{d / 'config.json'} is not valid JSON: {e}") from None
        self.problems: list[str] = []
        self.tensors: dict[str, TensorInfo] = {}
        listed: dict[str, str] = {}
        if (d / INDEX_FILE).is_file():
            try:
                listed = json.loads((d / INDEX_FILE).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{d / INDEX_FILE}: not a valid index ({e!r})") from None
            files = sorted(set(listed.values()))
        elif (d / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            files = sorted(p.name for p in d.glob("*.safetensors"))
            if not files:
                from qnext_jax.convert.orbax_store import INDEX_FILE as CONVERTED_INDEX

                if (d / CONVERTED_INDEX).is_file():
                    raise FileNotFoundError(f"{d} is a `qnext convert` output already (it holds "
                                            f"{CONVERTED_INDEX}), not an HF checkpoint: load, "
                                            "generate from or export it as it is")
                raise FileNotFoundError(f"{d} has no {INDEX_FILE}, {SINGLE_FILE} or other "
                                        "*.safetensors file")
        for fname in files:
            path = d / fname
            if not path.is_file():
                self.problems.append(f"{INDEX_FILE} lists file {fname}, which does not exist")
                continue
            header, _ = read_header(path)
            for name, info in header.items():
                if name in self.tensors:
                    self.problems.append(f"tensor {name} is in both {self.tensors[name].file.name}"
                                         f" and {fname}")
                self.tensors[name] = info
        for name, fname in listed.items():
            if (d / fname).is_file() and (name not in self.tensors
                                          or self.tensors[name].file.name != fname):
                self.problems.append(f"{INDEX_FILE} puts {name} in {fname}, which does not "
                                     "hold it")

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        return read_tensor(self.tensors[name], index)

    def mtp_layers(self) -> int:
        """Number of MTP layers present (1 + the largest N of ``mtp.layers.N.*``; 0 if none)."""
        found = [int(m.group(1)) for n in self.tensors if (m := _MTP_LAYER.match(n))]
        return max(found) + 1 if found else 0

    def match(self, config: Qwen3NextConfig | None = None
              ) -> tuple[Qwen3NextConfig, list[nm.Leaf]]:
        """Check the tensors against the name map of the config.

        ``mtp_num_hidden_layers`` is set to the number of MTP layers present; MoE blocks stored
        in the fused v5 form are detected per layer.

        Returns:
          (config with mtp_num_hidden_layers set, the name map to convert with).
        Raises:
          CheckpointMismatchError: listing every missing, unexpected or mis-shaped tensor.
        """
        if config is None:
            config = Qwen3NextConfig.from_dict(self.raw_config)
        config = config.replace(mtp_num_hidden_layers=self.mtp_layers())
        fused = {p for p in nm.moe_prefixes(config)
                 if f"{p}.experts.gate_up_proj" in self.tensors
                 or f"{p}.experts.down_proj" in self.tensors}
        leaves = nm.name_map(config, fused)
        expected = nm.expected_tensors(leaves)
        ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
        err = CheckpointMismatchError(
            self.directory,
            missing=[(n, s) for n, s in expected.items() if n not in self.tensors],
            unexpected=[(n, info.shape) for n, info in self.tensors.items()
                        if n not in expected and n not in ignored and not _IGNORED.search(n)],
            mismatched=[(n, s, self.tensors[n].shape) for n, s in expected.items()
                        if n in self.tensors and self.tensors[n].shape != tuple(s)],
            problems=self.problems + [
                f"{n} has dtype {self.tensors[n].dtype.name}, not a floating-point type"
                for n in expected if n in self.tensors
                and "float" not in self.tensors[n].dtype.name])
        if not err.empty:
            raise err
        return config, leaves

    def config_json(self, config: Qwen3NextConfig) -> dict:
        """The raw config.json with ``mtp_num_hidden_layers`` as converted."""
        raw = dict(self.raw_config)
        raw["mtp_num_hidden_layers"] = config.mtp_num_hidden_layers
        return raw


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer / generation files present in ``src`` to ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def check_tokenizer_dir(tokenizer_dir: str | Path) -> Path:
    """``tokenizer_dir`` as a Path, checked to be a directory holding tokenizer files (any of
    TOKENIZER_FILES): the files a writer given it copies.

    Raises:
      FileNotFoundError: it is not a directory.
      ValueError: it holds none of TOKENIZER_FILES.
    """
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir}: no such directory (the "
                                "directory to copy the tokenizer files from)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"tokenizer_dir {tokenizer_dir}: holds no tokenizer files (expected "
                         f"tokenizer.json and its companions: {listed(list(TOKENIZER_FILES))})")
    return path


def check_tokenizer_fits(tokenizer_dir: Path, vocab_size: int) -> None:
    """Refuse tokenizer files whose ids the model cannot embed: the highest id the tokenizer in
    ``tokenizer_dir`` can produce (:func:`qnext_jax.tokenizer.max_token_id`, added and special
    tokens included) must be below ``vocab_size``. Nothing to check (and no error) when the
    directory has no tokenizer.json / tokenizer_config.json listing ids.

    Raises:
      ValueError: an id >= ``vocab_size``, naming the directory, the tokenizer's size (highest
        id + 1) and ``vocab_size``; a tokenizer file that is not JSON.
    """
    from qnext_jax.tokenizer import max_token_id

    top = max_token_id(tokenizer_dir)
    if top is not None and top >= vocab_size:
        raise ValueError(f"{tokenizer_dir}: the tokenizer produces ids up to {top} (size "
                         f"{top + 1}, added and special tokens included), beyond the model's "
                         f"vocab_size {vocab_size}: the model cannot embed them")


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def float_dtype(dtype) -> np.dtype | None:
    """``dtype`` (a name such as "bfloat16", or a dtype) as a numpy dtype; None stays None.

    Raises:
      ValueError: not a floating-point dtype (an integer dtype would store the weights as
        zeros), naming the ones accepted.
    """
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    return dt


def config_naming_dtype(config_json: dict, dtype: np.dtype | None) -> dict:
    """``config_json`` with ``torch_dtype`` (and ``dtype``, which newer transformers read first,
    when it has one) set to ``dtype``, the dtype the weights are stored in; unchanged for None.
    transformers' ``dtype="auto"`` loads in the config's dtype."""
    if dtype is None:
        return config_json
    return {**config_json, "torch_dtype": dtype.name,
            **({"dtype": dtype.name} if "dtype" in config_json else {})}


def check_not_replaced(out_dir: Path, source: Path) -> None:
    """Refuse to write ``out_dir`` when that would replace or change ``source``: the same
    directory, one holding it (the input would be deleted), or one inside it (the input's
    files would be replaced).

    Raises:
      ValueError: naming both directories.
    """
    out, src = Path(out_dir).resolve(), Path(source).resolve()
    if out == src or out in src.parents:
        raise ValueError(f"the output directory {out_dir} would replace the input {source}: "
                         "write to another directory")
    if src in out.parents:
        raise ValueError(f"the output directory {out_dir} is inside the input {source} and "
                         "would change it: write to a directory outside it")


_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


# Written by ``qnext export`` into its output: the mark of a directory that ``--overwrite`` may
# replace (an original HF checkpoint has the same file names, and replacing it would lose it).
EXPORT_MARKER = "qnext_export.json"


def written_by_export(rel: str) -> bool:
    """Whether a file at this path (relative to the output, "/"-separated) is one ``qnext
    export`` writes: config, safetensors and their index, tokenizer and generation files,
    EXPORT_MARKER; all at the top (export writes no subdirectory)."""
    return (rel in ("config.json", SINGLE_FILE, INDEX_FILE, EXPORT_MARKER)
            or rel in TOKENIZER_FILES or bool(_SHARD.match(rel)))


def files_under(root: Path) -> list[str]:
    """The sorted paths (relative to ``root``, "/"-separated) of the files, links and empty
    directories anywhere under ``root`` (links not followed): what an output lists as written
    by it (:func:`written_into`)."""
    found = []
    for entry in sorted(Path(root).iterdir()):
        if entry.is_dir() and not entry.is_symlink() and any(entry.iterdir()):
            found += [f"{entry.name}/{rel}" for rel in files_under(entry)]
        else:
            found.append(entry.name)
    return found


def write_export_marker(out_dir: Path, source: Path | None = None) -> None:
    """Write EXPORT_MARKER into an export's directory ``out_dir`` (its last file), listing the
    files there: what a later ``--overwrite`` may replace (:func:`written_into`); and the
    converted checkpoint exported, ``source`` (absolute), when there is one."""
    files = sorted([*files_under(out_dir), EXPORT_MARKER])
    (out_dir / EXPORT_MARKER).write_text(json.dumps(
        {"written_by": "qnext export (qnext-jax)",
         "note": "marks this directory as one `qnext export --overwrite` may replace",
         "files": files, "source": None if source is None else str(Path(source).resolve())},
        indent=2) + "\n")


def json_field(path: Path, key: str):
    """The value under ``key`` of the JSON object in the file ``path``; None when the file is
    missing or unreadable, not JSON, not an object, or has no such key."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj.get(key) if isinstance(obj, dict) else None


def written_into(out_dir: Path, listing: str, written):
    """The predicate (relative path -> bool) of what an earlier output in ``out_dir`` wrote:
    the paths (:func:`files_under`) that its JSON file ``listing`` lists under "files"
    (EXPORT_MARKER, or a convert output's params index), so that a file the user added since,
    anywhere in it and even of a name the command writes (a hand-written
    generation_config.json), is not one. ``written`` (the command's names) when ``listing`` is
    missing, unreadable or lists none (written before outputs listed their files)."""
    files = json_field(Path(out_dir) / listing, "files")
    if not isinstance(files, list):
        return written
    return {str(name) for name in files}.union({listing}).__contains__


def unwritten_entries(out_dir: Path, written) -> list[str]:
    """The paths under ``out_dir`` (:func:`files_under`) that ``written(path)`` rejects: what
    replacing the directory with a command's output would delete. A subdirectory the command
    does not write, all of whose contents are rejected, is named alone (``.git``, not each
    file in it)."""
    paths = files_under(out_dir)
    rejected = {path for path in paths if not written(path)}
    all_rejected: dict[str, bool] = {}  # subdirectory -> whether every path under it is
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            all_rejected[d] = all_rejected.get(d, True) and path in rejected
    named = []
    for path in paths:
        if path in rejected:
            parts = path.split("/")
            dirs = ("/".join(parts[:i]) for i in range(1, len(parts)))
            name = next((d for d in dirs if all_rejected[d] and not written(d)), path)
            if name not in named:
                named.append(name)
    return named


def listed(names: list[str]) -> str:
    """``names`` for a message: the first five, comma-separated, "..." after them."""
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def run_of_final(path: str | Path) -> Path | None:
    """The fine-tuning run (``qnext_jax.train.run``'s OUT) whose final params ``path`` is: OUT
    of OUT/final when OUT holds the run's checkpoints/ or metrics.jsonl; else None."""
    path = Path(path).absolute()
    run = path.parent
    if path.name == "final" and ((run / "checkpoints").is_dir() or
                                 (run / "metrics.jsonl").is_file()):
        return run
    return None


def check_out_dir(out_dir: Path, overwrite: bool, command: str, written,
                  marker: str | None = None) -> None:
    """Refuse an output directory that exists and is not empty, unless ``overwrite`` and every
    file anywhere under it is one that ``command`` writes (``written(path)`` True, see
    :func:`unwritten_entries`): ``--overwrite`` replaces an earlier output of the command, and
    refuses a directory holding anything else (notes, a .git, another model's extra files, a
    file put into its subdirectories), which the replacement would delete, a
    fine-tuning run's final params (:func:`run_of_final`), which look like a convert output,
    and, given ``marker`` (a file name the command writes into every output), a directory
    without it: not the command's output, though its names are (an original checkpoint).

    Raises:
      FileExistsError: naming the directory, ``command``'s flag, and the entries it does not
        write (or the run whose params it holds, or the missing marker).
    """
    if out_dir.is_symlink():  # replacing it would replace the link, not what it points to
        raise FileExistsError(f"{out_dir} is a symbolic link (to {out_dir.resolve()}); write "
                              "to the directory it points to, or to a new one")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True "
                              f"(`qnext {command} --overwrite`) to replace it")
    if (run := run_of_final(out_dir)) is not None:
        raise FileExistsError(f"{out_dir} holds the fine-tuned params of the run in {run}, "
                              "which replacing them would lose; write to another directory")
    foreign = unwritten_entries(out_dir, written)
    if foreign:
        raise FileExistsError(f"{out_dir} holds files not written by `qnext {command}` "
                              f"({listed(foreign)}), "
                              "which replacing it would delete: overwrite replaces only an "
                              f"earlier `qnext {command}` output; write to a new or empty "
                              "directory")
    if marker is not None and not (out_dir / marker).is_file():
        raise FileExistsError(f"{out_dir} has no {marker}, which `qnext {command}` writes into "
                              f"its outputs: it is not an earlier `qnext {command}` output (an "
                              "original checkpoint?), which replacing it would lose; write to "
                              "a new or empty directory")


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; on success it replaces ``out_dir``
    (renamed into place), on any error it is deleted, so nothing is left half written."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
