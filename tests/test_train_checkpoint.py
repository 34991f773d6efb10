"""Train checkpoints and the finetune command: resuming gives the losses of an uninterrupted run;
`qnext finetune` + `qnext export` give an HF checkpoint that transformers loads with the same
logits as our fine-tuned params."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from hf_fixtures import build_hf_checkpoint
from test_train_data import make_checkpoint_tokenizer

from qnext_jax.train.optimizer import OptimizerConfig
from qnext_jax.train.run import (
    Terminated,
    finetune,
    schedule_change_warning,
    warmup_warning,
)
from qnext_jax.train.step import TrainConfig

STEPS = 4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    build_hf_checkpoint(root / "hf", {"vocab_size": 320, "num_hidden_layers": 2,
                                      "full_attention_interval": 2})
    make_checkpoint_tokenizer(root / "hf")
    lines = [{"text": "the quick brown fox jumps over the lazy dog"},
             {"messages": [{"role": "user", "content": "hello?"},
                           {"role": "assistant", "content": "hello world, how are you?"}]},
             {"text": "user assistant system answer question " * 3},
             {"text": "hello world"}] * 3
    (root / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _run(root, out, keep=1, **kw):
    return finetune(root / "hf", root / "data.jsonl", out, steps=STEPS, batch_size=2, seq_len=32,
                    max_segments=4, opt=OptimizerConfig(learning_rate=2e-3, warmup_steps=1,
                                                         total_steps=STEPS),
                    train=TrainConfig(compute_dtype="float32", gdn_impl="reference"),
                    save_every=2, keep=keep, progress=False, **kw)


def test_resume_matches_uninterrupted(hf_dir, tmp_path, capsys):
    full = _run(hf_dir, tmp_path / "a")
    first = _run(hf_dir, tmp_path / "b", stop_after=2)  # "interrupted" after 2 steps
    assert first["final"] is None and first["steps"] == 2
    # the schedule's length is saved with the data position (Orbax's JSON item "meta")
    meta = json.loads((tmp_path / "b" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["data_step"] == 2 and meta["total_steps"] == STEPS
    capsys.readouterr()
    second = _run(hf_dir, tmp_path / "b")
    assert second["resumed_from"] == 2
    err = capsys.readouterr().err
    assert "schedule" not in err and "other settings" not in err  # the same: no warning
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == STEPS
    np.testing.assert_allclose(b, a, rtol=1e-6)
    assert a[-1] < a[0]
    from qnext_jax.train.checkpoint import TrainCheckpointer

    assert TrainCheckpointer(tmp_path / "b" / "checkpoints").all_steps() == [STEPS]  # keep=1
    from qnext_jax.convert import load

    _, pa = load(full["final"])
    _, pb = load(second["final"])
    with pytest.raises(FileNotFoundError, match="a qnext finetune output: its params are in"):
        load(tmp_path / "a")  # the --out directory itself
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_checkpointer_restore_returns_the_state_and_meta_apart(tmp_path):
    """TrainCheckpointer.restore returns the state alone (the tree saved, values and dtypes),
    of the step asked for or the latest; the meta saved with a step is read by meta(step)."""
    import jax.numpy as jnp

    from qnext_jax.train.checkpoint import TrainCheckpointer

    ckpt = TrainCheckpointer(tmp_path / "ck", save_every=1, keep=None)
    states = {s: {"step": jnp.asarray(s, jnp.int32),
                  "params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * s}}
              for s in (1, 2)}
    for s, state in states.items():
        assert ckpt.save(s, state, {"data_step": s, "seed": 7})
    ckpt.wait()
    abstract = jax.eval_shape(lambda: states[1])
    for step, want in ((1, 1), (None, 2)):
        got = ckpt.restore(abstract, step=step)
        assert isinstance(got, dict) and set(got) == {"step", "params"}
        assert int(got["step"]) == want and got["step"].dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got["params"]["w"]),
                                      np.arange(12, dtype=np.float32).reshape(3, 4) * want)
    assert ckpt.meta(1) == {"data_step": 1, "seed": 7}
    ckpt.close()
    with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
        TrainCheckpointer(tmp_path / "empty").restore(abstract)


def test_schedule_change_warning_names_both_lengths_and_the_flag():
    """Extending a finished 100-step run to --steps 200 without --total-steps restarts the
    cosine from its middle: warned about, naming both lengths, the jump and --total-steps."""
    opt = OptimizerConfig(learning_rate=1e-3, total_steps=200, min_lr_ratio=0.1)
    msg = schedule_change_warning(opt, 100, start=100)
    assert msg == ("[qnext finetune] warning: resuming at step 100 with a learning-rate schedule "
                   "of --total-steps 200 (which defaults to --steps), but the checkpoint was "
                   "trained with --total-steps 100: the remaining steps follow another schedule "
                   "(next step's learning rate 0.00055 instead of 0.0001). Pass --total-steps "
                   "100 to keep the checkpoint's schedule.")
    assert schedule_change_warning(opt, 200, start=100) is None
    assert schedule_change_warning(opt, None, start=100) is None  # not recorded: no claim
    # rates that differ past 3 digits are shown with the digits that tell them apart; rates
    # the same to 5 digits are not shown as a change (it read "1e-05 instead of 1e-05")
    close = schedule_change_warning(OptimizerConfig(learning_rate=1e-5, total_steps=1000), 1010,
                                    start=300)
    new, old = re.search(r"learning rate (\S+) instead of (\S+)\)", close).groups()
    assert new != old and float(new) != float(old), close
    same = schedule_change_warning(OptimizerConfig(learning_rate=1e-5, total_steps=1000), 1001,
                                   start=2)
    assert "(next step's learning rate 1e-05 either way, later ones differ)" in same, same


def test_warmup_warning_names_both_flags():
    from qnext_jax.train.optimizer import OptimizerConfig

    msg = warmup_warning(OptimizerConfig(learning_rate=1e-3, warmup_steps=5, total_steps=1))
    assert msg == ("[qnext finetune] warning: --warmup-steps 5 is not below the schedule's "
                   "--total-steps 1 (default: --steps): the learning rate never reaches its "
                   "peak 0.001")
    assert warmup_warning(OptimizerConfig(warmup_steps=4, total_steps=5)) is None


def test_cli_finetune_then_export_reloads_in_transformers(hf_dir, tmp_path, capsys):
    import torch
    from transformers import Qwen3NextForCausalLM as TorchModel

    from qnext_jax.cli import main
    from qnext_jax.convert import load
    from qnext_jax.modeling import Qwen3NextForCausalLM

    out = tmp_path / "out"
    rc = main(["finetune", "--checkpoint", str(hf_dir / "hf"), "--data",
               str(hf_dir / "data.jsonl"), "--out", str(out), "--steps", "2", "--batch-size",
               "2", "--seq-len", "32", "--max-segments", "4", "--lr", "2e-3", "--dtype",
               "float32", "--gdn-impl", "reference", "--save-every", "1", "--export-hf"])
    assert rc == 0
    assert re.search(r"data: 12 documents from 1 file, \d+ tokens in \d+ packed rows of 32\n",
                     capsys.readouterr().err)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert {"loss", "ce", "aux", "grad_norm", "lr", "tokens_per_s"} <= set(records[0])
    assert main(["export", str(out / "final"), str(tmp_path / "hf2")]) == 0
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(["export", str(out / "final"), str(tmp_path / "hf2")])
    assert main(["export", str(out / "final"), str(tmp_path / "hf2"), "--overwrite"]) == 0
    base = ["finetune", "--checkpoint", str(hf_dir / "hf"), "--data", str(hf_dir / "data.jsonl")]
    with pytest.raises(SystemExit, match="at step 2, past --steps 1: nothing to do"):
        main(base + ["--out", str(out), "--steps", "1"])
    with pytest.raises(SystemExit, match=r"qnext finetune: train 're:\(': not a valid regular "
                                         r"expression after 're:' \(missing \)"):
        main(base + ["--out", str(tmp_path / "re"), "--steps", "1", "--train", "re:("])
    assert not (tmp_path / "re").exists()  # a refused run leaves no empty output directory
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(SystemExit, match="afile: exists and is not a directory"):
        main(base + ["--out", str(tmp_path / "afile"), "--steps", "1"])
    assert (tmp_path / "afile").read_text() == "keep"

    config, params = load(out / "final")
    _, orig = load(hf_dir / "hf")
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(orig), strict=True)]
    assert max(moved) > 1e-4  # the params were trained
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
    ours = np.asarray(jax.jit(lambda p, x: Qwen3NextForCausalLM(
        config, gdn_impl="reference").apply({"params": p}, x)[0])(params, ids))
    for d in (out / "hf", tmp_path / "hf2"):
        assert (d / "tokenizer.json").is_file()
        model_t = TorchModel.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = model_t(torch.from_numpy(ids)).logits.numpy()
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_finetune_export_hf_refuses_a_tokenizer_beyond_vocab_size(hf_dir, tmp_path):
    """With --export-hf, a tokenizer that can produce an id >= vocab_size (here an added token
    of tokenizer_config.json, id 320, that the data never uses) is refused before training, as
    params_to_hf would refuse it after: the error names the checkpoint, the tokenizer's size and
    vocab_size, and no output directory is written."""
    import shutil

    from qnext_jax.cli import main

    root = tmp_path / "root"
    ckpt = root / "hf"
    shutil.copytree(hf_dir / "hf", ckpt)
    shutil.copy(hf_dir / "data.jsonl", root / "data.jsonl")
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"320": {"content": "<extra>", "special": True}}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    msg = (f"{ckpt}: the tokenizer produces ids up to 320 (size 321, added and special tokens "
           "included), beyond the model's vocab_size 320")
    with pytest.raises(ValueError, match=re.escape(msg)):
        _run(root, tmp_path / "out", export_hf=True)
    with pytest.raises(SystemExit, match=re.escape(f"qnext finetune: {msg}")):
        main(["finetune", "--checkpoint", str(ckpt), "--data", str(root / "data.jsonl"),
              "--out", str(tmp_path / "out"), "--steps", "1", "--batch-size", "2", "--seq-len",
              "32", "--max-segments", "4", "--dtype", "float32", "--gdn-impl", "reference",
              "--export-hf"])
    assert not (tmp_path / "out").exists()


def test_cli_finetune_help_shows_defaults_and_rejects_an_empty_mesh(capsys):
    from qnext_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["finetune", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for expected in ("tokens per packed row (default: 2048)",
                     "peak learning rate (default: 1e-05)",
                     "steps of linear warmup from 0 to --lr (default: 0)", "(default: bfloat16)",
                     "length of the cosine schedule (default: --steps)"):
        assert expected in text, expected
    assert "(default: None)" not in text and "(default: False)" not in text
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--checkpoint", "c", "--data", "d", "--out", "o", "--steps", "1",
              "--mesh", ""])
    assert e.value.code == 2
    assert "argument --mesh: expected AXIS=SIZE pairs such as 'data=1,expert=8'" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("flag,value,expected", [
    ("--keep", "0", "an integer >= 1"), ("--batch-size", "0", "an integer >= 1"),
    ("--seq-len", "0", "an integer >= 1"), ("--lr", "-1", "a number > 0"),
    ("--lora-rank", "-1", "an integer >= 0"), ("--min-lr-ratio", "2", "a number in [0, 1]"),
    ("--save-dtype", "int8", "invalid choice: 'int8'")])
def test_cli_finetune_rejects_values_that_would_lose_or_ruin_a_run(flag, value, expected, capsys):
    """--keep 0 would keep no checkpoint to resume from, a zero batch divides by zero, a
    negative learning rate ascends, an integer save dtype stores zeros: refused up front."""
    from qnext_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["finetune", "--checkpoint", "c", "--data", "d", "--out", "o", "--steps", "1",
              flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and expected in err, err


def test_interrupted_run_saves_its_state_and_resumes_exactly(hf_dir, tmp_path, monkeypatch,
                                                             capsys):
    """Ctrl-C during step 4 (save_every 2: step 3 unsaved) saves step 3 from the state's own
    counter; the rerun resumes there and ends with the losses of an uninterrupted run."""
    from qnext_jax.train.step import Trainer

    step = Trainer.step
    calls = []

    def interrupting_step(self, state, batch):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step(self, state, batch)

    monkeypatch.setattr(Trainer, "step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        _run(hf_dir, tmp_path / "cut", keep=2)
    assert "interrupted after step 3, saved" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "step", step)
    resumed = _run(hf_dir, tmp_path / "cut")
    assert resumed["resumed_from"] == 3
    full = _run(hf_dir, tmp_path / "full")
    np.testing.assert_allclose(_losses(tmp_path / "cut"), _losses(tmp_path / "full"), rtol=1e-6)
    assert full["steps"] == resumed["steps"] == STEPS


def test_interrupt_before_the_first_step_says_nothing_was_saved(hf_dir, tmp_path, monkeypatch,
                                                                capsys):
    """Ctrl-C during the first step: nothing to save, and the message says so (it said "saved:
    a rerun resumes from it" over an empty checkpoints directory)."""
    from qnext_jax.train.step import Trainer

    def interrupted(self, state, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(hf_dir, tmp_path / "cut")
    assert "interrupted before the first step: nothing saved" in capsys.readouterr().err
    assert not any((tmp_path / "cut" / "checkpoints").iterdir())


def test_interrupt_while_logging_keeps_that_steps_metrics(hf_dir, tmp_path, monkeypatch,
                                                         capsys):
    """Ctrl-C after step 3 ran but while its metrics were being logged: step 3 is saved and its
    line logged all the same, so the resumed run's metrics.jsonl has every step once, with the
    losses of an uninterrupted run (a line went missing before)."""
    from qnext_jax.train.run import MetricsLog

    write = MetricsLog.write
    calls = []

    def interrupted_write(self, record):
        calls.append(record["step"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write(self, record)

    monkeypatch.setattr(MetricsLog, "write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        _run(hf_dir, tmp_path / "cut", keep=2)
    assert "interrupted after step 3, saved" in capsys.readouterr().err
    monkeypatch.setattr(MetricsLog, "write", write)
    assert [json.loads(x)["step"] for x in
            (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert _run(hf_dir, tmp_path / "cut")["resumed_from"] == 3
    _run(hf_dir, tmp_path / "full")
    cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in cut], _losses(tmp_path / "full"), rtol=1e-6)


def test_resume_under_other_settings_warns_naming_them(hf_dir, tmp_path, capsys):
    """A run resumed with another --lr and --batch-size, or on other data, continues but warns,
    naming each setting with the checkpoint's and the new value (it was silent)."""
    _run(hf_dir, tmp_path / "r", stop_after=2)
    capsys.readouterr()
    finetune(hf_dir / "hf", hf_dir / "data.jsonl", tmp_path / "r", steps=3, batch_size=3,
             seq_len=32, max_segments=4,
             opt=OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=STEPS),
             train=TrainConfig(compute_dtype="float32", gdn_impl="reference"),
             save_every=2, keep=1, progress=False)
    err = capsys.readouterr().err
    assert re.search(r"warning: resuming at step 2 under other settings than the checkpoint's: "
                     r"--batch-size 2 \(now 3\), --lr 0\.002 \(now 0\.001\); the remaining "
                     r"steps differ", err), err
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "a different document altogether"}) + "\n")
    finetune(hf_dir / "hf", other, tmp_path / "r", steps=4, batch_size=3, seq_len=32,
             max_segments=4,
             opt=OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=STEPS),
             train=TrainConfig(compute_dtype="float32", gdn_impl="reference"),
             save_every=2, keep=1, progress=False)
    err = capsys.readouterr().err
    assert re.search(r"other settings than the checkpoint's: --data '\S*data\.jsonl, packed "
                     r"rows [0-9a-f]{16}' \(now '\S*other\.jsonl, packed rows [0-9a-f]{16}'\)",
                     err), err
    assert "--lr" not in err
    # the loss's settings and another row length (which repacks the same documents)
    finetune(hf_dir / "hf", other, tmp_path / "r", steps=5, batch_size=3, seq_len=24,
             max_segments=4,
             opt=OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=STEPS),
             train=TrainConfig(compute_dtype="float32", gdn_impl="reference", aux_coef=0.5),
             save_every=2, keep=1, progress=False)
    err = capsys.readouterr().err
    assert re.search(r"resuming \S+ from step 4 \(checkpoint 4\) to step 5", err), err
    assert re.search(r"--seq-len 32 \(now 24\), --data '\S*other\.jsonl, packed rows "
                     r"[0-9a-f]{16}' \(now '\S*other\.jsonl, packed rows [0-9a-f]{16}, "
                     r"repacked by the --seq-len change'\), --aux-coef None \(now 0\.5\);",
                     err), err


def test_out_holding_a_checkpoint_is_refused(hf_dir):
    """--out pointing at a checkpoint (the source itself, say) is refused before anything is
    written into it."""
    before = sorted(p.name for p in (hf_dir / "hf").iterdir())
    with pytest.raises(ValueError, match="holds a checkpoint; the run's output \\(--out\\) needs"):
        _run(hf_dir, hf_dir / "hf")
    assert sorted(p.name for p in (hf_dir / "hf").iterdir()) == before


def test_out_whose_files_a_run_would_lose_is_refused(hf_dir, tmp_path):
    """An --out holding entries a run does not write, or a final/ (hf/ with export_hf) holding
    files its save does not write, is refused before anything is written or deleted."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError,
                       match=r"mine holds entries a finetune run does not write \(notes.txt\)"):
        _run(hf_dir, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    (out / "final").mkdir()
    (out / "final" / "important.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"final holds files the run's save does not "
                                              r"write \(important.txt\), which replacing final/"):
        _run(hf_dir, out)
    (out / "final" / "important.txt").unlink()
    (out / "final" / "params").mkdir()  # a file in a subdirectory: checked too
    (out / "final" / "params" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"final holds files the run's save does not "
                                              r"write \(params/mine.txt\)"):
        _run(hf_dir, out)
    shutil.rmtree(out / "final" / "params")
    (out / "hf").mkdir()
    (out / "hf" / "my_notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"hf holds files the run's save does not write "
                                              r"\(my_notes.txt\), which replacing hf/"):
        _run(hf_dir, out, export_hf=True)
    assert sorted(p.name for p in out.iterdir()) == ["final", "hf"]
    assert (out / "hf" / "my_notes.txt").read_text() == "keep"
    (out / "hf" / "my_notes.txt").unlink()
    (out / "hf" / "config.json").write_text("{}")  # an HF checkpoint copied there: no marker
    with pytest.raises(FileExistsError, match=r"hf has no qnext_export.json, which the run's "
                                              r"export writes: it is not an earlier export"):
        _run(hf_dir, out, export_hf=True)
    assert (out / "hf" / "config.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["final", "hf"]  # refused before any step
    # an export of another checkpoint put there (qnext export OTHER OUT/hf)
    (out / "hf" / "qnext_export.json").write_text(json.dumps(
        {"files": ["config.json", "qnext_export.json"], "source": str(tmp_path / "other")}))
    with pytest.raises(FileExistsError, match=r"hf holds an export of \S*other, not of this "
                                              r"run's final/"):
        _run(hf_dir, out, export_hf=True)
    (out / "hf" / "qnext_export.json").unlink()
    (out / "final").rmdir()
    (out / "final").symlink_to(out / "hf")  # the save renames a directory into final's place
    with pytest.raises(FileExistsError, match=r"final is a link; the run saves final/ as a new "
                                              r"directory"):
        _run(hf_dir, out)
    assert sorted(p.name for p in out.iterdir()) == ["final", "hf"]
    shutil.rmtree(out / "hf")
    (out / "final").unlink()
    notes = "my notes on the run\n{\"step\": 1}\n"  # a file of the run's name, not its log
    (out / "metrics.jsonl").write_text(notes)
    with pytest.raises(FileExistsError, match=r"metrics.jsonl line 1 is not a JSON object: not "
                                              r"a finetune run's metrics log"):
        _run(hf_dir, out)
    assert (out / "metrics.jsonl").read_text() == notes
    (out / "metrics.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(FileExistsError, match=r"metrics.jsonl is not UTF-8 text"):
        _run(hf_dir, out)
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]
    with pytest.raises(ValueError, match="--out: empty"):
        _run(hf_dir, "")
    with pytest.raises(FileNotFoundError, match=r"nope: no such checkpoint directory \(the "
                                                r"checkpoint to fine-tune: --checkpoint\)"):
        finetune(tmp_path / "nope", hf_dir / "data.jsonl", tmp_path / "o", steps=1)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty.jsonl: no tokens to pack \(empty dataset\)"):
        finetune(hf_dir / "hf", tmp_path / "empty.jsonl", tmp_path / "o", steps=1,
                 progress=False)
    assert not (tmp_path / "o").exists()
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(ValueError, match="dangling: a link to a missing directory"):
        _run(hf_dir, tmp_path / "dangling")
    assert not (tmp_path / "missing").exists()


def test_killed_saves_and_torn_metrics_lines_do_not_stop_a_rerun(hf_dir, tmp_path, capsys):
    """A temporary directory left by a killed save of final/ is named on stderr (and left
    alone); a torn last line of metrics.jsonl (a kill while writing it) is dropped on resume."""
    out = tmp_path / "run"
    _run(hf_dir, out, stop_after=2)
    (out / ".final.tmp-0123abcd").mkdir()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 5.')
    capsys.readouterr()
    result = _run(hf_dir, out)
    assert result["resumed_from"] == 2 and result["steps"] == STEPS
    assert ".final.tmp-0123abcd, left by a save that was killed" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in
            (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, STEPS + 1))
    assert (out / ".final.tmp-0123abcd").is_dir()
    # An hf/ export older than final/ is named.
    (out / "hf").mkdir()
    capsys.readouterr()
    _run(hf_dir, out)
    assert f"{out / 'hf'} holds an earlier export, not step {STEPS}'s" in capsys.readouterr().err


def test_tensorboard_without_a_writer_warns(tmp_path, monkeypatch, capsys):
    """--tensorboard with neither tensorboardX nor torch's tensorboard: metrics.jsonl only, and
    a warning that says so (it was silent)."""
    import sys

    from qnext_jax.train.run import MetricsLog

    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    log = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "tb")
    log.write({"step": 1, "loss": 2.0})
    log.close()
    assert "--tensorboard needs tensorboardX" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.0}
    assert not (tmp_path / "tb").exists()


def test_metrics_log_drops_the_steps_a_rerun_logs_again(tmp_path):
    """A run killed after logging steps 3 and 4 past its checkpoint at step 2: the rerun starts
    at 2, and metrics.jsonl keeps steps 1, 2 once each, then the new records."""
    from qnext_jax.train.run import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 9.0}) + "\n" for i in (1, 2, 3, 4)))
    log = MetricsLog(path, start=2)
    log.write({"step": 3, "loss": 1.0})
    log.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"step": 1, "loss": 9.0}, {"step": 2, "loss": 9.0}, {"step": 3, "loss": 1.0}]


def test_resume_under_another_structure_names_the_setting(hf_dir, tmp_path):
    """A checkpoint written without LoRA, resumed with --lora-rank 2: the error names the
    setting and both values before any restore (it ended in a cut Orbax tree message)."""
    _run(hf_dir, tmp_path / "r", stop_after=2)
    with pytest.raises(ValueError, match=r"step 2 was trained with --lora-rank 0 \(now 2\): "
                                         r"resume with the settings that wrote it"):
        finetune(hf_dir / "hf", hf_dir / "data.jsonl", tmp_path / "r", steps=STEPS,
                 batch_size=2, seq_len=32, max_segments=4,
                 opt=OptimizerConfig(learning_rate=2e-3, total_steps=STEPS),
                 train=TrainConfig(compute_dtype="float32", gdn_impl="reference", lora_rank=2),
                 save_every=2, keep=1, progress=False)
    with pytest.raises(ValueError, match=r"trained with seed 0, not 1 \(the data order and RNG "
                                         r"follow the seed\): resume with --seed 0, or use "
                                         r"another --out"):
        _run(hf_dir, tmp_path / "r", seed=1)


def test_sigterm_saves_the_state_as_ctrl_c_does(hf_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's preemption) at step 2 saves step 1, as Ctrl-C does, and the
    rerun resumes there; the handler before the run is back after it (SIGTERM saved nothing)."""
    from qnext_jax.train.step import Trainer

    step = Trainer.step
    calls = []

    def terminated_step(self, state, batch):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, state, batch)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(Trainer, "step", terminated_step)
    with pytest.raises(Terminated):  # a KeyboardInterrupt, which the CLI exits with as 143
        _run(hf_dir, tmp_path / "t")
    err = capsys.readouterr().err
    assert "SIGTERM received: saving the state" in err
    assert "interrupted after step 1, saved" in err, err
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(Trainer, "step", step)
    assert _run(hf_dir, tmp_path / "t", stop_after=1)["resumed_from"] == 1


def test_resume_with_another_models_checkpoint_names_it(hf_dir, tmp_path):
    """A run resumed with a --checkpoint of another shape (the same flags): the error names
    the checkpoint the run recorded and Orbax's whole mismatch, not a cut first line."""
    _run(hf_dir, tmp_path / "r", stop_after=2)
    other = tmp_path / "other"
    build_hf_checkpoint(other, {"vocab_size": 320, "num_hidden_layers": 2,
                                "full_attention_interval": 2, "moe_intermediate_size": 24})
    make_checkpoint_tokenizer(other)
    with pytest.raises(ValueError) as e:
        finetune(other, hf_dir / "data.jsonl", tmp_path / "r", steps=STEPS, batch_size=2,
                 seq_len=32, max_segments=4,
                 opt=OptimizerConfig(learning_rate=2e-3, total_steps=STEPS),
                 train=TrainConfig(compute_dtype="float32", gdn_impl="reference"),
                 save_every=2, keep=1, progress=False)
    msg = str(e.value)
    assert re.search(r"step 2 holds a train state of another structure than this run's; resume "
                     r"with the --checkpoint \(model\) and settings that wrote it \(recorded: "
                     r"\S*hf;", msg), msg
    assert not msg.rstrip().endswith(":") and len(msg.split("Orbax: ")[1]) > 40, msg


def test_a_finished_run_without_its_checkpoints_is_not_started_over(hf_dir, tmp_path):
    """A run whose checkpoints/ was deleted (to free space) keeps its final/ and hf/: a rerun
    is refused before training (it trained from step 0 and replaced them). A directory in
    checkpoints/ that is no checkpoint is named (it gave Orbax's KeyError traceback)."""
    out = tmp_path / "r"
    _run(hf_dir, out, export_hf=True)
    shutil.rmtree(out / "checkpoints")
    stamp = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(FileExistsError, match=r"holds final/ and hf/ but no checkpoint to "
                                              r"resume from .* replace final/ and hf/\. Move "
                                              r"them away.* --checkpoint \S*r/final\)"):
        _run(hf_dir, out, export_hf=True)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*")) == stamp
    (out / "checkpoints" / "5").mkdir(parents=True)
    (out / "checkpoints" / "5" / "n.txt").write_text("x")
    with pytest.raises(ValueError, match=r"checkpoints/5: not a train checkpoint \(no readable "
                                         r"meta"):
        _run(hf_dir, out)


def test_seq_len_past_the_model_and_out_of_memory_are_named(hf_dir, tmp_path, monkeypatch,
                                                            capsys):
    """--seq-len past max_position_embeddings warns (it ran silently); XLA's out-of-memory
    error ends the command with one line naming what to lower (it was a raw traceback)."""
    from qnext_jax import cli

    finetune(hf_dir / "hf", hf_dir / "data.jsonl", tmp_path / "long", steps=1, batch_size=1,
             seq_len=520, max_segments=4, progress=False, stop_after=0,
             train=TrainConfig(compute_dtype="float32", gdn_impl="reference"))
    assert ("warning: --seq-len 520 is past the model's max_position_embeddings (512)"
            in capsys.readouterr().err)

    def raising(message):
        def run(*args, **kwargs):
            raise RuntimeError(message)
        return run

    argv = ["finetune", "--checkpoint", str(hf_dir / "hf"), "--data", str(hf_dir / "data.jsonl"),
            "--out", str(tmp_path / "o"), "--steps", "1"]
    monkeypatch.setattr("qnext_jax.train.run.finetune", raising(
        "RESOURCE_EXHAUSTED: Out of memory allocating 1306923528952 bytes.\nmore detail"))
    with pytest.raises(SystemExit, match=r"^qnext finetune: out of device memory "
                                         r"\(RESOURCE_EXHAUSTED: Out of memory allocating "
                                         r"1306923528952 bytes\.\): lower --batch-size or "
                                         r"--seq-len"):
        cli.main(argv)
    monkeypatch.setattr("qnext_jax.train.run.finetune", raising("other"))
    with pytest.raises(RuntimeError, match="^other$"):  # other errors are not renamed
        cli.main(argv)
