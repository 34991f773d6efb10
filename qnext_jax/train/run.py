"""The fine-tuning loop behind ``qnext finetune``: load, tokenize + pack, train, checkpoint,
resume, log, save the result in the converted format (and optionally as HF safetensors).

    from qnext_jax.train.run import finetune
    summary = finetune("CKPT", "train.jsonl", "OUT", steps=1000, batch_size=8, seq_len=4096,
                       opt=OptimizerConfig(learning_rate=1e-5, warmup_steps=50),
                       train=TrainConfig(compute_dtype="bfloat16", remat="full"))

Output directory:
  OUT/checkpoints/<step>/   Orbax train states (params, optimizer state, data position, RNG)
  OUT/metrics.jsonl         one line per step: step, loss, ce, aux, [mtp], grad_norm, lr,
                            tokens, tokens_per_s, step_s
  OUT/final/                the fine-tuned params in ``qnext convert``'s format (config.json,
                            tokenizer files): ``qnext export OUT/final HF_DIR``,
                            ``qnext generate --checkpoint OUT/final``
  OUT/hf/                   with ``export_hf``: HF safetensors (released per-expert names)
Rerunning with the same OUT resumes from the latest checkpoint (same losses as a run that was
never interrupted: the batch order is a function of the step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from qnext_jax.train.checkpoint import TrainCheckpointer
from qnext_jax.train.data import (
    DocumentTokenizer,
    PackedDataset,
    data_files,
    read_documents,
)
from qnext_jax.train.optimizer import OptimizerConfig, make_schedule
from qnext_jax.train.step import TrainConfig, Trainer

# What a run writes in its OUT (see the module docstring); final/ and hf/ are written under a
# temporary name first (".final.tmp-*", left only by a killed process).
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "tensorboard", "final", "hf")


def check_run_dir(out: Path, export_hf: bool) -> None:
    """Refuse, before anything is written, an OUT whose files the run would lose: one holding
    entries a run does not write (another directory given by mistake), a final/ (hf/ with
    ``export_hf``) that its save could not replace without loss (a link or file, or a
    directory holding files that save does not write), or a final/ or hf/ without the
    checkpoints to resume their run (deleted to free space: a rerun would start over).
    Temporary directories left by a killed save are named on stderr.

    Raises:
      FileExistsError: naming the directory and the entries in the way.
    """
    from qnext_jax.convert.hf_checkpoint import (
        EXPORT_MARKER,
        json_field,
        listed,
        unwritten_entries,
        written_by_export,
        written_into,
    )
    from qnext_jax.convert.orbax_store import INDEX_FILE, written_by_convert

    if not out.is_dir():
        return
    left = sorted(p.name for p in out.iterdir() if p.name.startswith((".final.tmp-", ".hf.tmp-")))
    ours = set(RUN_ENTRIES) | set(left)
    foreign = unwritten_entries(out, lambda rel: rel.split("/")[0] in ours)
    if foreign:
        raise FileExistsError(f"{out} holds entries a finetune run does not write "
                              f"({listed(foreign)}): --out needs a new or empty directory, or "
                              "an earlier run's to resume it")
    for sub, written, saved, marker in (
            ("final", written_into(out / "final", INDEX_FILE, written_by_convert), True, None),
            ("hf", written_into(out / "hf", EXPORT_MARKER, written_by_export), export_hf,
             EXPORT_MARKER)):
        where = out / sub
        if not saved or not (where.exists() or where.is_symlink()):
            continue
        if where.is_symlink() or not where.is_dir():
            raise FileExistsError(f"{where} is a {'link' if where.is_symlink() else 'file'}; the "
                                  f"run saves {sub}/ as a new directory renamed into its place: "
                                  "move it away, or use another --out")
        theirs = unwritten_entries(where, written)
        if theirs:
            raise FileExistsError(f"{where} holds files the run's save does not write "
                                  f"({listed(theirs)}), which replacing {sub}/ would delete: "
                                  "move them out of it, or use another --out")
        # the converted checkpoint an export came from (None: in-memory params, as the run's)
        source = json_field(where / marker, "source") if marker is not None else None
        if isinstance(source, str) and Path(source) != (out / "final").resolve():
            raise FileExistsError(f"{where} holds an export of {source}, not of this run's "
                                  f"final/, which replacing {sub}/ would lose: move it away, or "
                                  "use another --out")
        if marker is not None and any(where.iterdir()) and not (where / marker).is_file():
            raise FileExistsError(f"{where} has no {marker}, which the run's export writes: it "
                                  f"is not an earlier export of this run (a checkpoint copied "
                                  f"there?), which replacing {sub}/ would lose: move it away, "
                                  "or use another --out")
    metrics = out / "metrics.jsonl"
    if (metrics.exists() or metrics.is_symlink()) and (problem := _not_a_metrics_log(metrics)):
        raise FileExistsError(f"{metrics} {problem}: not a finetune run's metrics log, which the "
                              "run rewrites (it keeps the steps up to the one it resumes from): "
                              "move it away, or use another --out")
    checkpoints = out / "checkpoints"
    resumable = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    results = [f"{sub}/" for sub in ("final", "hf") if (out / sub).is_dir()
               and any((out / sub).iterdir())]
    if results and not resumable:
        what = " and ".join(results)
        hint = (f" (to train on from its result: --checkpoint {out / 'final'})"
                if "final/" in results else "")
        raise FileExistsError(f"{out} holds {what} but no checkpoint to resume from "
                              "(checkpoints/ is empty or gone): a run would train from step 0 "
                              f"and replace {what}. Move {'it' if len(results) == 1 else 'them'} "
                              f"away, or use another --out{hint}")
    if left:
        print(f"[qnext finetune] {out} holds {listed(left)}, left by a save that was killed; "
              "the run does not use them: delete them to free their space", file=sys.stderr)


def _source_config_json(checkpoint: Path, config) -> dict:
    if (checkpoint / "config.json").is_file():
        raw = json.loads((checkpoint / "config.json").read_text())
        raw["mtp_num_hidden_layers"] = config.mtp_num_hidden_layers
        return raw
    return config.to_dict()


def save_params(config, params, out_dir: str | Path, *, config_json: dict | None = None,
                tokenizer_dir: str | Path | None = None, dtype=None) -> Path:
    """Write a params tree in ``qnext convert``'s Orbax format (readable by ``load``,
    ``qnext export``, ``qnext generate``); written under a temporary name, then renamed.

    Args:
      dtype: cast the stored leaves (None keeps them; A_log and dt_bias stay float32).
      tokenizer_dir: copy the tokenizer files from here (None: none copied).
    Raises:
      ValueError: the params do not match the config's name map; ``dtype`` is not a
        floating-point dtype; ``tokenizer_dir`` holds no tokenizer files.
      FileNotFoundError: ``tokenizer_dir`` is not a directory.
    """
    from qnext_jax.convert import name_map as nm
    from qnext_jax.convert.hf_checkpoint import (
        atomic_directory,
        check_tokenizer_dir,
        config_naming_dtype,
        copy_tokenizer_files,
        float_dtype,
    )
    from qnext_jax.convert.orbax_store import MIN_GROUP_BYTES, ParamWriter

    out_dir = Path(out_dir)
    leaves = nm.name_map(config)
    dt = float_dtype(dtype)
    if tokenizer_dir is not None:
        tokenizer_dir = check_tokenizer_dir(tokenizer_dir)
    with atomic_directory(out_dir) as tmp:
        biggest = max(leaf.size for leaf in leaves) * 4
        writer = ParamWriter(tmp, max(biggest, MIN_GROUP_BYTES))
        for leaf in leaves:
            node = params
            for k in leaf.path:
                if k not in node:
                    raise ValueError(f"params have no leaf {leaf.key}")
                node = node[k]
            arr = np.asarray(jax.device_get(node))
            if tuple(arr.shape) != leaf.shape:
                raise ValueError(f"{leaf.key}: shape {arr.shape}, expected {leaf.shape}")
            writer.add(leaf.key, arr.astype(leaf.out_dtype(arr.dtype, dt), copy=False))
        config_json = config_naming_dtype(config_json or config.to_dict(), dt)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        writer.close()  # last: its index lists the files
    return out_dir


def schedule_change_warning(opt: OptimizerConfig, saved_total_steps: int | None,
                            start: int) -> str | None:
    """The warning for resuming, at step ``start``, a checkpoint trained with a schedule of
    ``saved_total_steps`` steps (None: an older checkpoint that did not record it) under a
    schedule of ``opt.total_steps``: one line naming both lengths, the next step's learning rate
    under each and ``--total-steps``; None when the lengths agree or the saved one is unknown."""
    if saved_total_steps is None or saved_total_steps == opt.total_steps:
        return None
    old = float(make_schedule(dataclasses.replace(opt, total_steps=saved_total_steps))(start))
    new = float(make_schedule(opt)(start))
    digits = next((n for n in (3, 5) if f"{new:.{n}g}" != f"{old:.{n}g}"), None)
    rates = (f"next step's learning rate {new:.{digits}g} instead of {old:.{digits}g}"
             if digits else f"next step's learning rate {new:.3g} either way, later ones differ")
    return (f"[qnext finetune] warning: resuming at step {start} with a learning-rate schedule "
            f"of --total-steps {opt.total_steps} (which defaults to --steps), but the checkpoint "
            f"was trained with --total-steps {saved_total_steps}: the remaining steps follow "
            f"another schedule ({rates}). Pass --total-steps {saved_total_steps} to keep the "
            "checkpoint's schedule.")


def warmup_warning(opt: OptimizerConfig) -> str | None:
    """The warning for a warmup that does not end before the schedule does (the learning rate
    never reaches its peak): one line naming both flags, or None."""
    if opt.warmup_steps < opt.total_steps:
        return None
    return (f"[qnext finetune] warning: --warmup-steps {opt.warmup_steps} is not below the "
            f"schedule's --total-steps {opt.total_steps} (default: --steps): the learning rate "
            f"never reaches its peak {opt.learning_rate:g}")


def resume_settings_warning(saved: dict, now: dict, step: int,
                            shown: dict | None = None) -> str | None:
    """A warning (None when they agree) that a run resumed at ``step`` continues under other
    settings than the checkpoint's (``saved``: the "settings" of its meta, flag -> value;
    settings it did not record are skipped): its remaining steps will not be those of an
    uninterrupted run. ``shown``: flag -> (saved, now) to print instead of the values
    compared (the data files' names beside the fingerprints of their rows)."""
    differ = []
    for flag, value in now.items():
        if flag in saved and saved[flag] != value:
            old, new = (shown or {}).get(flag, (saved[flag], value))
            differ.append(f"{flag} {old!r} (now {new!r})")
    if not differ:
        return None
    return (f"[qnext finetune] warning: resuming at step {step} under other settings than the "
            f"checkpoint's: {', '.join(differ)}; the remaining steps differ from an "
            "uninterrupted run's (repeat the checkpoint's values to continue it exactly)")


def _save_on_interrupt(ckpt, state, last_saved: int | None, meta_at) -> None:
    """Ctrl-C during a run: checkpoint ``state`` at the step it has reached (its own counter)
    unless that step is saved already, and say on stderr where a rerun resumes. The state may
    already be donated to the interrupted step; then a rerun resumes from ``last_saved``."""
    try:
        done = int(jax.device_get(state["step"]))
        if done == 0:
            print("[qnext finetune] interrupted before the first step: nothing saved; a rerun "
                  "starts from the beginning", file=sys.stderr)
            return
        if done != (last_saved or 0):
            ckpt.save(done, state, meta_at(done), force=True)
            ckpt.wait()
    except Exception as e:  # noqa: BLE001  (e.g. the state's buffers donated to the cut step)
        print(f"[qnext finetune] interrupted; the state could not be saved ({type(e).__name__}): "
              f"a rerun of the same command resumes from step {last_saved or 0}",
              file=sys.stderr)
        return
    print(f"[qnext finetune] interrupted after step {done}, saved: a rerun of the same command "
          "resumes from it", file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM during a run, handled as Ctrl-C (the CLI exits with 143 instead of 130)."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Within it, SIGTERM (a scheduler's preemption, ``kill``) raises :class:`Terminated` (a
    KeyboardInterrupt) in the main thread, so the run saves its state as on Ctrl-C; the handler is restored after. Does
    nothing outside the main thread, where no handler can be set."""
    import signal
    import threading

    def interrupt(signum, frame):
        print("[qnext finetune] SIGTERM received: saving the state", file=sys.stderr)
        raise Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _record(line: str) -> dict | None:
    """A metrics.jsonl line's record, or None for a blank or torn line (a process killed while
    writing it), which the log drops."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _not_a_metrics_log(path: Path) -> str | None:
    """What shows that ``path`` is not a metrics.jsonl a run wrote (a link, not a file, not
    UTF-8 text, a line before the last that is not a JSON object), or None. A torn last line is
    a run's (killed while writing it)."""
    if path.is_symlink() or not path.is_file():
        return "is a link" if path.is_symlink() else "is not a file"
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    for n, line in enumerate(lines[:-1], 1):
        if line.strip() and _record(line) is None:
            return f"line {n} is not a JSON object"
    return None


class MetricsLog:
    """Appends one JSON object per line to ``path`` (and to TensorBoard when ``tensorboardX``
    or ``torch.utils.tensorboard`` is importable and ``tensorboard_dir`` is given). Records of
    steps after ``start`` already in the file (logged past the checkpoint a rerun resumes from,
    e.g. before a kill) are dropped: the rerun logs those steps again; so is a torn line."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, start: int = 0):
        self.path = path
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if (record := _record(line)) is not None and record.get("step", 0) <= start]
            path.write_text("".join(line + "\n" for line in kept))
        self._f = open(path, "a")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(tensorboard_dir))
            else:
                print("[qnext finetune] warning: --tensorboard needs tensorboardX (pip install "
                      "tensorboardX) or torch's tensorboard; logging to metrics.jsonl only",
                      file=sys.stderr)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def finetune(checkpoint: str | Path, data: str | Path, out: str | Path, *, steps: int,
             batch_size: int = 8, seq_len: int = 2048, max_segments: int = 16,
             opt: OptimizerConfig | None = None, train: TrainConfig | None = None,
             seed: int = 0, save_every: int = 100, keep: int = 3, mesh=None,
             progress: bool = True, export_hf: bool = False, stop_after: int | None = None,
             tensorboard: bool = False, save_dtype=None) -> dict:
    """Fine-tune the checkpoint on the data; resumes from ``out/checkpoints`` when present.

    Args:
      checkpoint: a converted (``qnext convert``) or HF checkpoint dir with tokenizer.json.
      data: JSONL / text file or directory (see :mod:`qnext_jax.train.data`).
      out: output directory (see the module docstring).
      steps: total optimizer steps of the run (the schedule's ``total_steps`` defaults to it;
        resuming under another ``opt.total_steps`` than the checkpoint's prints a warning to
        stderr: see :func:`schedule_change_warning`).
      batch_size: packed rows per step; seq_len: tokens per row; max_segments: bound on the
        documents per row + 1.
      opt, train: optimizer and step settings.
      seed: data order and RNG seed. save_every / keep: checkpoint cadence and retention.
      mesh: a ``jax.sharding.Mesh`` to shard over (None: one device).
      stop_after: stop after this many steps of this call (simulates an interruption).
      save_dtype: dtype of the final params (default: float32).
    Returns:
      {"steps": last step, "metrics": last step's metrics, "final": path of the saved params,
       "hf": path of the HF export or None, "resumed_from": step or None}.
    Raises:
      ValueError (among others): the data's token ids, or with ``export_hf`` any id the
        checkpoint's tokenizer can produce (added and special tokens included), reach the
        model's vocab_size; checked before ``out`` is written.
      FileExistsError: ``out`` holds what the run would lose (:func:`check_run_dir`).
      FileNotFoundError: ``checkpoint`` does not exist.
    """
    from tqdm.auto import tqdm

    from qnext_jax.convert import load
    from qnext_jax.convert.hf_checkpoint import listed
    from qnext_jax.convert.orbax_store import is_orbax_dir

    if not str(out).strip():
        raise ValueError("--out: empty (the output directory of the run)")
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory (the checkpoint "
                                "to fine-tune: --checkpoint)")
    if out.is_symlink() and not out.exists():
        raise ValueError(f"{out}: a link to a missing directory (the output directory of the "
                         "run: --out)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory (the output directory of the "
                         "run: --out)")
    if out.is_dir() and (is_orbax_dir(out) or (out / "config.json").is_file()):
        raise ValueError(f"{out} holds a checkpoint; the run's output (--out) needs a directory "
                         "of its own (new, or an earlier run's to resume it)")
    check_run_dir(out, export_hf)
    opt = opt or OptimizerConfig(total_steps=steps)
    train = dataclasses.replace(train or TrainConfig(), max_segments=max_segments)
    if mesh is None:
        config, params = load(checkpoint)
    else:
        from qnext_jax.sharding import tree_shardings

        config, params = load(checkpoint, mesh=mesh, shardings=tree_shardings(mesh))
    if seq_len > config.max_position_embeddings:
        print(f"[qnext finetune] warning: --seq-len {seq_len} is past the model's "
              f"max_position_embeddings ({config.max_position_embeddings}): positions beyond it "
              "are outside what it was trained on", file=sys.stderr)
    tokenizer = DocumentTokenizer.from_checkpoint(checkpoint)
    try:
        files, skipped = data_files(data)
        docs = read_documents(files)
        dataset = PackedDataset.from_documents(docs, tokenizer, seq_len, max_segments)
    except ValueError as e:  # every data error names where it came from
        if not str(e).startswith(str(data)):
            raise ValueError(f"{data}: {e}") from None
        raise
    if skipped:
        print(f"[qnext finetune] {data}: not read: {listed(skipped)} (subdirectories, and files "
              "other than .jsonl, .json, .txt, .md)", file=sys.stderr)
    if progress:
        tokens = int((dataset.rows["segment_ids"] > 0).sum())
        print(f"[qnext finetune] data: {len(docs)} documents from {len(files)} "
              f"file{'' if len(files) == 1 else 's'}, {tokens} tokens in {dataset.num_rows} "
              f"packed rows of {seq_len}", file=sys.stderr)
    if int(dataset.rows["input_ids"].max()) >= config.vocab_size:
        raise ValueError(f"{checkpoint}: the tokenizer produces ids up to "
                         f"{int(dataset.rows['input_ids'].max())}, beyond the model's vocab_size "
                         f"{config.vocab_size}")
    if export_hf:  # params_to_hf refuses such a tokenizer: refuse before training, not after
        from qnext_jax.convert.hf_checkpoint import check_tokenizer_fits

        check_tokenizer_fits(checkpoint, config.vocab_size)
    trainer = Trainer(config, opt, train, mesh)
    if (warning := warmup_warning(opt)) is not None:
        print(warning, file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)  # after the checks above: a refused run writes nothing
    ckpt = TrainCheckpointer(out / "checkpoints", save_every=save_every, keep=keep)
    resumed_from = ckpt.latest_step()
    # What shapes the train state: a resume under other values cannot restore it.
    structure = {"--scan-layers": train.scan_layers, "--lora-rank": train.lora_rank,
                 "--train": opt.train}
    # What the remaining steps depend on besides: a resume under other values warns.
    settings = {"--batch-size": batch_size, "--seq-len": seq_len, "--lr": opt.learning_rate,
                "--warmup-steps": opt.warmup_steps, "--min-lr-ratio": opt.min_lr_ratio,
                "--weight-decay": opt.weight_decay, "--clip-norm": opt.clip_norm,
                "--max-segments": max_segments, "--data": dataset.fingerprint(),
                "--dtype": train.compute_dtype, "--grad-accum": train.grad_accum,
                "--aux-coef": train.aux_coef, "--mtp-coef": train.mtp_coef,
                "--checkpoint": str(checkpoint.resolve()),
                **({"--lora-alpha": train.lora_alpha} if train.lora_rank else {})}
    if resumed_from is not None:
        # The checks on the saved settings come before the (large) restore of the state.
        meta = ckpt.meta(resumed_from)
        saved = meta.get("structure", {})
        differ = [f"{flag} {saved[flag]!r} (now {value!r})" for flag, value in structure.items()
                  if flag in saved and saved[flag] != value]
        if differ:
            raise ValueError(f"{out / 'checkpoints'}: step {resumed_from} was trained with "
                             f"{', '.join(differ)}: resume with the settings that wrote it")
        start = int(meta.get("data_step", resumed_from))
        if start > steps:
            raise ValueError(f"{out / 'checkpoints'}: the run is at step {start}, past --steps "
                             f"{steps}: nothing to do (give more steps to continue it)")
        if meta.get("seed", seed) != seed:
            raise ValueError(f"{out}: the checkpoint was trained with seed {meta['seed']}, "
                             f"not {seed} (the data order and RNG follow the seed): resume with "
                             f"--seed {meta['seed']}, or use another --out for a new run")
        abstract = trainer.abstract_state(params)
        try:
            state = ckpt.restore(abstract, trainer.state_shardings(abstract), resumed_from)
        except ValueError as e:
            detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise ValueError(f"{out / 'checkpoints'}: step {resumed_from} holds a train state of "
                             "another structure than this run's; resume with the --checkpoint "
                             f"(model) and settings that wrote it (recorded: "
                             f"{meta.get('settings', {}).get('--checkpoint', 'not recorded')}; "
                             f"--scan-layers, --lora-rank, --train). Orbax: {detail[:400]}"
                             ) from None
        print(f"[qnext finetune] resuming {out} from step {start} (checkpoint "
              f"{resumed_from}) to step {steps}", file=sys.stderr)
        saved_settings = meta.get("settings", {})
        # Rows packed to another length differ though the documents may not.
        repacked = [flag for flag in ("--seq-len", "--max-segments")
                    if saved_settings.get(flag, settings[flag]) != settings[flag]]
        data_shown = {"--data": (
            f"{meta.get('data_file', '?')}, packed rows {saved_settings.get('--data')}",
            f"{data}, packed rows {settings['--data']}"
            + (f", repacked by the {' and '.join(repacked)} change" if repacked else ""))}
        for warning in (schedule_change_warning(opt, meta.get("total_steps"), start),
                        resume_settings_warning(saved_settings, settings, start, data_shown)):
            if warning is not None and start < steps:
                print(warning, file=sys.stderr)
    else:
        state, start = trainer.init_state(params, seed), 0
    del params
    log = MetricsLog(out / "metrics.jsonl", out / "tensorboard" if tensorboard else None, start)
    end = steps if stop_after is None else min(steps, start + stop_after)
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="finetune",
               unit="step", dynamic_ncols=True)
    metrics = {}
    last_saved = resumed_from

    def meta_at(step):
        return {"data_step": step, "seed": seed, "total_steps": opt.total_steps,
                "structure": structure, "settings": settings, "data_file": str(data)}

    def log_step(step, m, n_tokens, t0):  # step: the one just run (1-based)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        dt = time.perf_counter() - t0
        metrics = {"step": step, **m, "tokens_per_s": n_tokens / max(dt, 1e-9), "step_s": dt}
        log.write(metrics)
        return metrics

    pending = None  # a step run but not logged yet: logged on Ctrl-C too
    with _terminate_as_interrupt():  # SIGTERM saves the state as Ctrl-C does
        try:
            for step in range(start, end):
                batch = dataset.batch_at(step, batch_size, seed)
                n_tokens = int((batch["segment_ids"] > 0).sum())
                t0 = time.perf_counter()
                state, m = trainer.step(state, batch)
                pending = (step + 1, m, n_tokens, t0)
                metrics = log_step(*pending)
                pending = None
                bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}", lr=f"{metrics['lr']:.2e}",
                                refresh=False)
                bar.update(1)
                if ckpt.maybe_save(step + 1, state, meta_at(step + 1)):
                    last_saved = step + 1
            if end > start and last_saved != end:
                ckpt.save(end, state, meta_at(end), force=True)
        except KeyboardInterrupt:
            if pending is not None:  # the step ran (its state is what gets saved): log it
                with contextlib.suppress(Exception):
                    log_step(*pending)
            _save_on_interrupt(ckpt, state, last_saved, meta_at)
            raise
        finally:
            bar.close()
            log.close()
            ckpt.close()
    result = {"steps": end, "metrics": metrics, "final": None, "hf": None,
              "resumed_from": resumed_from}
    if end < steps:
        return result
    cfg_json = _source_config_json(checkpoint, config)
    final_params = trainer.export_params(state)  # LoRA adapters merged
    result["final"] = save_params(config, final_params, out / "final", config_json=cfg_json,
                                  tokenizer_dir=checkpoint, dtype=save_dtype)
    if export_hf:
        from qnext_jax.convert import params_to_hf

        result["hf"] = params_to_hf(config, jax.device_get(final_params), out / "hf",
                                    config_json=cfg_json, tokenizer_dir=checkpoint,
                                    dtype=save_dtype, overwrite=True)
    if not export_hf and (out / "hf").is_dir():
        print(f"[qnext finetune] {out / 'hf'} holds an earlier export, not step {end}'s: rerun "
              "with --export-hf to replace it", file=sys.stderr)
    if progress:
        print(f"[qnext finetune] {end} step{'' if end == 1 else 's'}; params in {result['final']}"
              + (f", HF checkpoint in {result['hf']}" if result["hf"] else ""), file=sys.stderr)
    return result
