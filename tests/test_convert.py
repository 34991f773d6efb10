"""The converter: HF safetensors <-> our Orbax params, checked against transformers' own files.

Expected params are derived here independently of qnext_jax.convert.name_map: from the HF tensor
names by rule (layers.N -> layers_N, 2-D weight -> kernel transposed, conv [C,1,K] -> [K,C],
experts stacked), and the 80B tensor list from config arithmetic (DESIGN.md section 4).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hf_fixtures import (
    add_mtp_tensors,
    build_hf_checkpoint,
    build_hf_model,
    fuse_experts,
    read_hf_tensors,
)

from qnext_jax.config import Qwen3NextConfig
from qnext_jax.convert import CheckpointMismatchError, hf_to_orbax, load, orbax_to_hf
from qnext_jax.convert import name_map as nm

REPO = Path(__file__).resolve().parents[1]

# Config variants (overrides of hf_fixtures.TINY_HF).
BASE = {}
DENSE_TIED_BIAS = {"mlp_only_layers": [0], "decoder_sparse_step": 2, "tie_word_embeddings": True,
                   "attention_bias": True, "norm_topk_prob": False}


# ------------------------------------------------------------------------ independent reference
def _set(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    assert path[-1] not in tree, path
    tree[path[-1]] = value


def flat(tree: dict, prefix=()) -> dict[tuple, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = np.asarray(v)
    return out


def expected_params(tensors: dict[str, np.ndarray], tied: bool = False) -> dict:
    """Our params tree from HF tensors (per-expert names), by rule."""
    tree, experts = {}, {}
    for name, t in tensors.items():
        if tied and name == "lm_head.weight":
            continue
        parts = name.split(".")
        parts = parts[1:] if parts[0] == "model" else parts
        path, i = [], 0
        while i < len(parts):
            if parts[i] == "layers":
                path.append(f"layers_{parts[i + 1]}")
                i += 2
            else:
                path.append(parts[i])
                i += 1
        if "experts" in path:
            j = path.index("experts")
            experts.setdefault(tuple(path[:j + 1] + [path[j + 2]]), {})[int(path[j + 1])] = t.T
            continue
        if name == "model.embed_tokens.weight":
            _set(tree, path[:-1] + ["embedding"], t)
        elif path[-1] == "weight" and t.ndim == 2:
            _set(tree, path[:-1] + ["kernel"], t.T)
        elif path[-1] == "weight" and t.ndim == 3:
            _set(tree, path[:-1] + ["kernel"], t[:, 0, :].T)
        else:
            _set(tree, path, t)
    for path, by_e in experts.items():
        _set(tree, list(path), np.stack([by_e[e] for e in range(len(by_e))]))
    return tree


def assert_trees_equal(got: dict, want: dict):
    g, w = flat(got), flat(want)
    assert sorted(g) == sorted(w), (sorted(set(g) ^ set(w)))
    for k in w:
        assert g[k].shape == w[k].shape, (k, g[k].shape, w[k].shape)
        np.testing.assert_array_equal(g[k].astype(np.float32), w[k].astype(np.float32),
                                      err_msg="/".join(k))


def hf_names_80b(c: dict, mtp_layers: int = 1) -> dict[str, tuple[int, ...]]:
    """Every tensor of the released Qwen3-Next-80B-A3B checkpoint, from its config alone."""
    d, v, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    hd, nq, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    hk, hv = c["linear_num_key_heads"], c["linear_num_value_heads"]
    dk, dv, kk = c["linear_key_head_dim"], c["linear_value_head_dim"], c["linear_conv_kernel_dim"]
    ne, mi, si = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
           "lm_head.weight": (v, d)}

    def layer(p, full):
        out.update({f"{p}.input_layernorm.weight": (d,),
                    f"{p}.post_attention_layernorm.weight": (d,)})
        if full:
            out.update({f"{p}.self_attn.q_proj.weight": (2 * nq * hd, d),
                        f"{p}.self_attn.k_proj.weight": (nkv * hd, d),
                        f"{p}.self_attn.v_proj.weight": (nkv * hd, d),
                        f"{p}.self_attn.o_proj.weight": (d, nq * hd),
                        f"{p}.self_attn.q_norm.weight": (hd,),
                        f"{p}.self_attn.k_norm.weight": (hd,)})
        else:
            out.update({f"{p}.linear_attn.in_proj_qkvz.weight": (2 * hk * dk + 2 * hv * dv, d),
                        f"{p}.linear_attn.in_proj_ba.weight": (2 * hv, d),
                        f"{p}.linear_attn.conv1d.weight": (2 * hk * dk + hv * dv, 1, kk),
                        f"{p}.linear_attn.A_log": (hv,), f"{p}.linear_attn.dt_bias": (hv,),
                        f"{p}.linear_attn.norm.weight": (dv,),
                        f"{p}.linear_attn.out_proj.weight": (d, hv * dv)})
        out[f"{p}.mlp.gate.weight"] = (ne, d)
        for e in range(ne):
            out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (mi, d)
            out[f"{p}.mlp.experts.{e}.up_proj.weight"] = (mi, d)
            out[f"{p}.mlp.experts.{e}.down_proj.weight"] = (d, mi)
        out.update({f"{p}.mlp.shared_expert.gate_proj.weight": (si, d),
                    f"{p}.mlp.shared_expert.up_proj.weight": (si, d),
                    f"{p}.mlp.shared_expert.down_proj.weight": (d, si),
                    f"{p}.mlp.shared_expert_gate.weight": (1, d)})

    for i in range(L):
        layer(f"model.layers.{i}", (i + 1) % c["full_attention_interval"] == 0)
    if mtp_layers:
        out.update({"mtp.fc.weight": (d, 2 * d), "mtp.pre_fc_norm_embedding.weight": (d,),
                    "mtp.pre_fc_norm_hidden.weight": (d,), "mtp.norm.weight": (d,)})
        for i in range(mtp_layers):
            layer(f"mtp.layers.{i}", True)
    return out


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """HF checkpoints written by transformers: {name: (dir, tensors)}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    out["single"] = (root / "single",
                     build_hf_checkpoint(root / "single", BASE, seed=0, tokenizer=True))
    out["sharded"] = (root / "sharded",
                      build_hf_checkpoint(root / "sharded", DENSE_TIED_BIAS, seed=1,
                                          max_shard_size="20KB"))
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    assert not (root / "single" / "model.safetensors.index.json").exists()
    # MTP added to a sharded checkpoint (new shard listed in the index)
    d = root / "mtp"
    t = build_hf_checkpoint(d, BASE, seed=2, max_shard_size="50KB")
    t.update(add_mtp_tensors(d, seed=3))
    out["mtp"] = (d, t)
    return out


def _convert(src: Path, tmp_path: Path, name="out", **kw) -> Path:
    out = tmp_path / name
    hf_to_orbax(src, out, progress=False, **kw)
    return out


# --------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("which", ["single", "sharded", "mtp"])
def test_name_map_matches_transformers_files(ckpts, which):
    """Our name map lists exactly the tensors transformers wrote (plus the added mtp.*)."""
    d, tensors = ckpts[which]
    config = Qwen3NextConfig.from_hf(d)
    if which == "mtp":
        config = config.replace(mtp_num_hidden_layers=1)
    expected = nm.expected_tensors(nm.name_map(config))
    assert expected == {n: t.shape for n, t in tensors.items()}


@pytest.mark.parametrize("which", ["single", "sharded", "mtp"])
def test_hf_to_orbax_round_trip(ckpts, which, tmp_path):
    d, tensors = ckpts[which]
    out = _convert(d, tmp_path)
    config, params = load(out)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["mtp_num_hidden_layers"] == (1 if which == "mtp" else 0)
    assert config.mtp_num_hidden_layers == cfg_json["mtp_num_hidden_layers"]
    assert_trees_equal(params, expected_params(tensors, tied=config.tie_word_embeddings))
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    assert all(x.dtype == np.float32 for x in flat(params).values())
    if which == "single":  # tokenizer files copied byte for byte
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                  "generation_config.json"):
            assert (out / f).read_bytes() == (d / f).read_bytes()
    # an HF directory loads directly (in-memory conversion) to the same params
    _, direct = load(d)
    assert_trees_equal(direct, params)


def test_relative_paths(ckpts, tmp_path, monkeypatch):
    """Relative directories work for convert, load and export (Orbax itself wants absolute
    paths; a fresh user's `qnext convert hf out` failed with "Checkpoint path should be
    absolute")."""
    d, tensors = ckpts["single"]
    monkeypatch.chdir(tmp_path)
    hf_to_orbax(d, "rel_out", progress=False)
    _, params = load("rel_out")
    assert_trees_equal(params, expected_params(tensors, tied=Qwen3NextConfig.from_hf(d)
                                               .tie_word_embeddings))
    orbax_to_hf("rel_out", "rel_hf", progress=False)
    assert_trees_equal(load("rel_hf")[1], params)


def test_cli_names_missing_directories(ckpts, tmp_path, capsys):
    """convert / export / crosscheck on a directory that is not there, crosscheck with a token id
    outside the vocabulary: one line naming the command and the problem, no traceback."""
    from qnext_jax.cli import main

    missing = str(tmp_path / "nope")
    for argv, expected in (
        (["crosscheck", "--token-ids", "1,2,999999", str(ckpts["single"][0])],
         r"qnext crosscheck: token ids must be in \[0, vocab_size = \d+\): got 999999"),
        (["convert", missing, str(tmp_path / "o")], "qnext convert: .*nope"),
        (["export", missing, str(tmp_path / "h")], "qnext export: .*nope does not exist"),
        (["crosscheck", missing], "qnext crosscheck: .*nope"),
    ):
        with pytest.raises(SystemExit, match=expected):
            main(argv)


def test_fused_v5_expert_names(ckpts, tmp_path):
    d, tensors = ckpts["mtp"]
    fused = tmp_path / "fused"
    shutil.copytree(d, fused)
    new = fuse_experts(fused, sharded=True)
    assert "model.layers.0.mlp.experts.gate_up_proj" in new
    assert "mtp.layers.0.mlp.experts.gate_up_proj" in new
    assert not any(".experts.0." in n for n in new)
    out = _convert(fused, tmp_path)
    _, params = load(out)
    assert_trees_equal(params, expected_params(tensors))


def test_dtype_bfloat16_keeps_gdn_decay_in_float32(ckpts, tmp_path):
    d, tensors = ckpts["single"]
    out = _convert(d, tmp_path, dtype="bfloat16")
    index = json.loads((out / "params_index.json").read_text())
    for key, meta in index["leaves"].items():
        want = "float32" if key.endswith(("A_log", "dt_bias")) else "bfloat16"
        assert meta["dtype"] == want, key
    source = json.loads((d / "config.json").read_text())
    assert source["dtype"] == "float32"  # the written config names the cast, not the source
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "bfloat16"
    _, params = load(out)
    want = expected_params(tensors)
    for k, v in flat(params).items():
        ref = flat(want)[k]
        if k[-1] in ("A_log", "dt_bias"):
            assert v.dtype == np.float32
            np.testing.assert_array_equal(v, ref)
        else:
            assert v.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(v, ref.astype(ml_dtypes.bfloat16))
    # load(dtype=...) casts while reading, A_log / dt_bias stay float32
    _, p32 = load(out, dtype=np.float32)
    assert all(x.dtype == np.float32 for x in flat(p32).values())
    _, p16 = load(d, dtype="bfloat16")
    assert p16["layers_0"]["linear_attn"]["A_log"].dtype == np.float32
    assert p16["layers_0"]["mlp"]["experts"]["up_proj"].dtype == ml_dtypes.bfloat16


def test_load_with_shardings(ckpts, tmp_path):
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    d, tensors = ckpts["single"]
    out = _convert(d, tmp_path)
    mesh = Mesh(np.array(jax.devices()), ("x",))
    n = len(jax.devices())

    def plan(abstract):
        def spec(x):
            return P("x") if x.shape[0] % n == 0 and x.ndim > 1 else P()
        return jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), abstract)

    _, params = load(out, mesh=mesh, shardings=plan)
    shardings = plan(nm.abstract_params(Qwen3NextConfig.from_hf(out)))
    got = jax.tree.map(lambda x: x.sharding, params)
    assert jax.tree.all(jax.tree.map(lambda a, b: a == b, got, shardings))
    assert_trees_equal(params, expected_params(tensors))
    _, rep = load(out, mesh=mesh)  # mesh alone: replicated
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(rep))


def test_mismatch_is_one_error_listing_each_and_writes_nothing(ckpts, tmp_path):
    from safetensors.numpy import save_file

    d, tensors = ckpts["single"]
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    t = dict(tensors)
    del t["model.layers.1.linear_attn.A_log"]
    del t["model.layers.3.mlp.experts.5.up_proj.weight"]
    t["model.layers.0.mlp.foo.weight"] = np.zeros((3, 2), np.float32)
    t["model.norm.weight"] = np.zeros((32,), np.float32)
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CheckpointMismatchError) as ei:
        hf_to_orbax(bad, out, progress=False)
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert "2 missing, 1 unexpected, 1 with the wrong shape" in msg
    assert "model.layers.1.linear_attn.A_log: expected [4]" in msg
    assert "model.layers.3.mlp.experts.5.up_proj.weight: expected [32, 64]" in msg
    assert "unexpected: model.layers.0.mlp.foo.weight: found [3, 2]" in msg
    assert "model.norm.weight: expected [64], found [32]" in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no temp dir left behind
    with pytest.raises(CheckpointMismatchError):
        load(bad)


def test_refuses_non_empty_out_dir_and_cleans_up_on_failure(ckpts, tmp_path, monkeypatch):
    d, _ = ckpts["single"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        hf_to_orbax(d, out, progress=False)
    # overwrite replaces an earlier output only, not a directory holding other files
    with pytest.raises(FileExistsError, match=r"holds files not written by `qnext convert` "
                                              r"\(keep.txt\), which replacing it would delete"):
        hf_to_orbax(d, out, overwrite=True, progress=False)
    assert (out / "keep.txt").exists()
    conv = _convert(d, tmp_path, "conv")
    hf_to_orbax(d, conv, overwrite=True, progress=False)  # an earlier output: replaced
    with pytest.raises(FileExistsError, match=r"not written by `qnext export` \(keep.txt\)"):
        orbax_to_hf(conv, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    hf = tmp_path / "hf_out"
    orbax_to_hf(conv, hf, progress=False)
    orbax_to_hf(conv, hf, overwrite=True, progress=False)  # an earlier export: replaced
    # an HF checkpoint with files of its own (a download's notes, a .git): refused, kept
    (hf / "NOTES.md").write_text("mine")
    (hf / ".git").mkdir()
    with pytest.raises(FileExistsError, match=r"by `qnext export` \(\.git, NOTES\.md\)"):
        orbax_to_hf(conv, hf, overwrite=True, progress=False)
    assert (hf / "NOTES.md").read_text() == "mine"
    # an original HF checkpoint (the conversion's own source: the same file names as an
    # export, without the export's marker): refused, kept, by the API and the CLI
    stamp = sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir())
    with pytest.raises(FileExistsError, match=r"has no qnext_export.json, .* not an earlier "
                                              r"`qnext export` output"):
        orbax_to_hf(conv, d, overwrite=True, progress=False)
    from qnext_jax.cli import main

    with pytest.raises(SystemExit, match="has no qnext_export.json"):
        main(["export", str(conv), str(d), "--overwrite"])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir()) == stamp
    (tmp_path / "link").symlink_to(hf)  # a link to an earlier export: named, not followed
    with pytest.raises(FileExistsError, match=r"link is a symbolic link \(to \S*hf_out\)"):
        orbax_to_hf(conv, tmp_path / "link", overwrite=True, progress=False)
    assert (tmp_path / "link").is_symlink() and (hf / "NOTES.md").exists()
    (tmp_path / "link").unlink()
    (conv / "mydata").mkdir()
    with pytest.raises(FileExistsError, match=r"not written by `qnext convert` \(mydata\)"):
        hf_to_orbax(d, conv, overwrite=True, progress=False)
    (conv / "mydata").rmdir()
    with pytest.raises(FileNotFoundError, match="is a file: give the checkpoint's directory"):
        load(conv / "config.json")
    # a failure while writing leaves neither the temp dir nor a changed out_dir
    from qnext_jax.convert import orbax_store

    def boom(self):
        raise OSError("disk full")

    monkeypatch.setattr(orbax_store.ParamWriter, "close", boom)
    before = sorted(p.name for p in conv.rglob("*"))
    with pytest.raises(OSError, match="disk full"):
        hf_to_orbax(d, conv, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "hf_out", "out"]
    assert sorted(p.name for p in conv.rglob("*")) == before
    monkeypatch.undo()
    hf_to_orbax(d, conv, progress=False, overwrite=True)
    assert (conv / "params_index.json").is_file()


def test_refuses_to_replace_its_input_and_integer_dtypes(ckpts, tmp_path, capsys):
    """Converting or exporting into the input directory (or a directory holding it) would delete
    the input, into a directory inside it would change it: refused, the input intact. An integer dtype would store every weight as 0:
    refused by the API and by the CLI."""
    from qnext_jax.cli import main
    from qnext_jax.convert import params_to_hf

    src = tmp_path / "hf"
    shutil.copytree(ckpts["single"][0], src)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, tmp_path):
        with pytest.raises(ValueError, match="would replace the input"):
            hf_to_orbax(src, out, progress=False, overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == before
    orbax = _convert(src, tmp_path)
    with pytest.raises(ValueError, match="would replace the input"):
        orbax_to_hf(orbax, orbax, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="is inside the input .* would change it"):
        orbax_to_hf(orbax, orbax / "params", overwrite=True, progress=False)
    with pytest.raises(SystemExit, match="is inside the input"):
        main(["export", str(orbax), str(orbax / "params"), "--overwrite"])
    with pytest.raises(SystemExit, match=r"^qnext export: \S*nope does not exist$"):
        main(["export", str(tmp_path / "nope"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="an HF checkpoint, which needs no export"):
        main(["export", str(src), str(tmp_path / "out")])
    with pytest.raises(ValueError, match="is inside the input"):
        hf_to_orbax(src, src / "converted", progress=False)
    assert (orbax / "params_index.json").is_file()
    assert sorted(p.name for p in src.iterdir()) == before
    assert load(orbax)[0] is not None  # the converted checkpoint still loads
    for bad in ("int8", "bf16"):
        with pytest.raises(ValueError, match=f"dtype must be one of float32, bfloat16, float16, "
                                             f"float64, got '{bad}'"):
            hf_to_orbax(src, tmp_path / "x", dtype=bad, progress=False)
    config, params = load(orbax)
    with pytest.raises(ValueError, match="got 'int32'"):
        params_to_hf(config, params, tmp_path / "y", dtype="int32")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(SystemExit) as e:
        main(["convert", str(src), str(tmp_path / "z"), "--dtype", "int8"])
    assert e.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="qnext convert: the output directory"):
        main(["convert", str(src), str(src), "--overwrite"])
    # A fine-tuning run's final params look like a convert output; --overwrite keeps them.
    run = tmp_path / "run"
    main(["convert", str(src), str(run / "final")])
    (run / "metrics.jsonl").write_text("")
    stamp = sorted((p.name, p.stat().st_mtime_ns) for p in (run / "final").iterdir())
    for cmd in (["convert", str(src)], ["export", str(orbax)]):
        with pytest.raises(SystemExit, match=r"\S*run/final holds the fine-tuned "
                                             r"params of the run in \S*run, which replacing"):
            main([*cmd, str(run / "final"), "--overwrite"])
    for call in (lambda: hf_to_orbax(src, run / "final", overwrite=True, progress=False),
                 lambda: orbax_to_hf(orbax, run / "final", overwrite=True, progress=False)):
        with pytest.raises(FileExistsError, match="holds the fine-tuned params of the run"):
            call()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (run / "final").iterdir()) == stamp
    (run / "metrics.jsonl").unlink()  # no longer a run: an earlier convert output, replaced
    assert main(["convert", str(src), str(run / "final"), "--overwrite"]) == 0


@pytest.mark.parametrize("which", ["sharded", "mtp"])
def test_orbax_to_hf_loads_in_transformers(ckpts, which, tmp_path):
    import torch
    from transformers import Qwen3NextForCausalLM

    d, tensors = ckpts[which]
    out = _convert(d, tmp_path)
    back = tmp_path / "back"
    orbax_to_hf(out, back, max_shard_size="30KB", progress=False)
    assert (back / "model.safetensors.index.json").is_file()
    written = read_hf_tensors(back)
    assert sorted(written) == sorted(tensors)  # released per-expert names, mtp.* included
    for k, v in tensors.items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
    model = Qwen3NextForCausalLM.from_pretrained(back, dtype=torch.float32)
    seed, overrides = (1, DENSE_TIED_BIAS) if which == "sharded" else (2, BASE)
    ref = build_hf_model(overrides, seed=seed).state_dict()
    got = model.state_dict()
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_written_config_names_the_saved_dtype(tmp_path):
    """The HF config.json written by params_to_hf (finetune --export-hf, --save-dtype) and by
    orbax_to_hf (qnext export) names the dtype of the tensors written, not the source's: a fresh
    user's bf16 export said "torch_dtype": "float32"."""
    from conftest import init_params, tiny_config

    from qnext_jax.convert import params_to_hf
    from qnext_jax.convert.safetensors_io import read_header
    from qnext_jax.train.run import save_params

    config = tiny_config()  # torch_dtype "bfloat16"; init_params' leaves are float32
    params = init_params(config)
    f32 = {**config.to_dict(), "torch_dtype": "float32", "dtype": "float32"}
    orbax_bf16 = save_params(config, params, tmp_path / "orbax", config_json=f32,
                             dtype="bfloat16")
    cases = [  # (written dir, dtype of its tensors, does its config have "dtype")
        (params_to_hf(config, params, tmp_path / "f32"), "float32", False),
        (params_to_hf(config, params, tmp_path / "bf16", dtype="bfloat16", config_json=f32),
         "bfloat16", True),
        (orbax_to_hf(orbax_bf16, tmp_path / "export", progress=False), "bfloat16", True),
    ]
    for d, want, has_dtype in cases:
        header, _ = read_header(d / "model.safetensors")
        decay = {n for n in header if n.endswith(("A_log", "dt_bias"))}
        assert decay and {header[n].dtype.name for n in decay} == {"float32"}
        assert {info.dtype.name for n, info in header.items() if n not in decay} == {want}, d
        raw = json.loads((d / "config.json").read_text())
        assert raw["torch_dtype"] == want, d
        assert raw.get("dtype") == (want if has_dtype else None), d


def _word_tokenizer(path: Path, words: int, specials=("<|endoftext|>",)) -> Path:
    """A WordLevel tokenizer.json with ids 0..words-1, then the special tokens after them."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(words)}, unk_token="w0"))
    tok.add_special_tokens(list(specials))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def test_export_refuses_a_tokenizer_beyond_vocab_size(tmp_path):
    """A tokenizer whose ids (its special tokens included) reach the model's vocab_size is
    refused by params_to_hf (finetune --export-hf) and by orbax_to_hf (qnext export), naming the
    tokenizer's directory, its size and vocab_size, before anything is written; one that fits
    (highest id vocab_size - 1) is exported with its files. A fresh user's export took a
    tokenizer of ids the model cannot embed."""
    from conftest import init_params, tiny_config

    from qnext_jax.cli import main
    from qnext_jax.convert import params_to_hf
    from qnext_jax.tokenizer import max_token_id
    from qnext_jax.train.run import save_params

    config = tiny_config()  # vocab_size 96
    params = init_params(config)
    fits = _word_tokenizer(tmp_path / "fits", 95)      # special token id 95
    big = _word_tokenizer(tmp_path / "big", 96)        # special token id 96
    assert (max_token_id(fits), max_token_id(big)) == (95, 96)
    msg = (f"{big}: the tokenizer produces ids up to 96 (size 97, added and special tokens "
           "included), beyond the model's vocab_size 96")
    with pytest.raises(ValueError, match=re.escape(msg)):
        params_to_hf(config, params, tmp_path / "out", tokenizer_dir=big)
    orbax = save_params(config, params, tmp_path / "orbax", tokenizer_dir=big)
    with pytest.raises(ValueError, match=re.escape(msg.replace(str(big), str(orbax)))):
        orbax_to_hf(orbax, tmp_path / "out", progress=False)
    with pytest.raises(SystemExit, match=re.escape(
            f"qnext export: {orbax}: the tokenizer produces ids up to 96 (size 97")):
        main(["export", str(orbax), str(tmp_path / "out")])
    # nothing written: no output directory, no temporary one beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "fits", "orbax"]

    # tokenizer_config.json's added_tokens_decoder counts too (transformers adds those ids)
    (fits / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"96": {"content": "<x>", "special": True}}}))
    assert max_token_id(fits) == 96
    with pytest.raises(ValueError, match=r"ids up to 96 \(size 97"):
        params_to_hf(config, params, tmp_path / "out", tokenizer_dir=fits)
    (fits / "tokenizer_config.json").unlink()
    out = params_to_hf(config, params, tmp_path / "out", tokenizer_dir=fits)
    assert (out / "tokenizer.json").read_bytes() == (fits / "tokenizer.json").read_bytes()
    # no tokenizer, or a placeholder listing no ids: nothing to check
    assert max_token_id(tmp_path / "orbax" / "params") is None
    (tmp_path / "ph").mkdir()
    (tmp_path / "ph" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    assert max_token_id(tmp_path / "ph") is None
    params_to_hf(config, params, tmp_path / "out2", tokenizer_dir=tmp_path / "ph")
    # Unigram's vocabulary is a list: its ids are the positions
    from tokenizers import Tokenizer, models

    Tokenizer(models.Unigram([(f"u{i}", -1.0) for i in range(97)], 0, False)).save(
        str(tmp_path / "ph" / "tokenizer.json"))
    assert max_token_id(tmp_path / "ph") == 96


def test_80b_name_map_covers_the_released_checkpoint():
    config = Qwen3NextConfig.from_preset("qwen3-next-80b-a3b")
    raw = json.loads((REPO / "qnext_jax" / "presets" / "qwen3-next-80b-a3b.json").read_text())
    with_mtp = config.replace(mtp_num_hidden_layers=1)
    want = hf_names_80b(raw, mtp_layers=1)
    got = nm.expected_tensors(nm.name_map(with_mtp))
    assert len(want) == 75944  # 3 + 36 GDN x 1550 + 12 attention x 1549 + MTP 4 + 1549
    assert got == want
    # a few shapes straight from the published checkpoint listing (DESIGN.md section 4)
    assert got["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (12288, 2048)
    assert got["model.layers.0.linear_attn.conv1d.weight"] == (8192, 1, 4)
    assert got["model.layers.3.self_attn.q_proj.weight"] == (8192, 2048)
    assert got["model.layers.47.mlp.experts.511.down_proj.weight"] == (2048, 512)
    assert got["mtp.fc.weight"] == (2048, 4096)
    assert nm.expected_tensors(nm.name_map(config)).keys() == {
        k for k in want if not k.startswith("mtp.")}
    params = nm.param_count(nm.name_map(config))
    assert round(params / 1e9, 2) == 79.67
    # 48 layers; experts stacked: 3 leaves per MoE block instead of 3 x 512 tensors
    leaves = nm.name_map(with_mtp)
    assert len(leaves) == len(want) - 49 * 3 * 511
    assert sum(leaf.float32 for leaf in leaves) == 2 * 36


# ------------------------------------------------------------------------- streaming / memory
_MEM_SCRIPT = textwrap.dedent("""
    import json, sys
    from qnext_jax.convert import hf_to_orbax

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    warm, big, out = sys.argv[1:4]
    hf_to_orbax(warm, out + "_warm", progress=False)   # imports, thread pools, caches
    before = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM) to now
            f.write("5")
        reset = True
    except OSError:
        reset = False
    res = hf_to_orbax(big, out, progress=True)
    print(json.dumps({"before": before, "peak": status("VmHWM"), "reset": reset,
                      "leaves": res.num_leaves, "bytes": res.param_bytes}))
""")


def _synthetic_config(num_layers: int, hidden: int, experts: int, moe_inter: int, vocab: int):
    return {
        "model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"],
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 64, "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4,
        "full_attention_interval": 4, "num_experts": experts, "num_experts_per_tok": 2,
        "moe_intermediate_size": moe_inter, "shared_expert_intermediate_size": moe_inter,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False,
        "partial_rotary_factor": 0.25, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    }


def _write_synthetic(path: Path, cfg: dict) -> int:
    """A bf16 checkpoint of ``cfg`` written directly with safetensors, one shard per layer."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    names = hf_names_80b(cfg, mtp_layers=0)
    by_shard: dict[str, dict] = {}
    for name, shape in names.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        by_shard.setdefault(f"layer{m.group(1)}" if m else "rest", {})[name] = shape
    weight_map, total = {}, 0
    rng = np.random.default_rng(0)
    for k, (shard, entries) in enumerate(by_shard.items()):
        fname = f"model-{k:05d}.safetensors"
        arrays = {}
        for name, shape in entries.items():  # random finite bf16 bit patterns: incompressible
            arrays[name] = rng.integers(0, 0x7F00, shape, dtype=np.uint16).view(
                ml_dtypes.bfloat16)
            total += arrays[name].nbytes
            weight_map[name] = fname
        save_file(arrays, path / fname, metadata={"format": "pt"})
        del arrays
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def test_streaming_peak_memory(tmp_path):
    """Converting a ~790 MB checkpoint grows peak RSS by a small multiple of its largest array.

    Measured after a warm-up conversion in the same process (imports, thread pools); VmHWM is
    reset just before. The allowance covers Orbax/tensorstore's write buffers and what glibc keeps
    of freed blocks below its 32 MB mmap threshold.
    """
    cfg = _synthetic_config(num_layers=10, hidden=512, experts=64, moe_inter=384, vocab=8192)
    total = _write_synthetic(tmp_path / "big", cfg)
    _write_synthetic(tmp_path / "warm", _synthetic_config(1, 64, 4, 32, 256))
    largest = 64 * 512 * 384 * 2  # a stacked expert array, bf16: 25.2 MB
    assert total > 750e6
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(tmp_path / "warm"),
                           str(tmp_path / "big"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = res["peak"] - res["before"]
    bound = 5 * largest + 128 * 2**20
    print(f"checkpoint {total / 1e6:.0f} MB, largest array {largest / 1e6:.1f} MB, peak RSS "
          f"growth {growth / 1e6:.0f} MB (bound {bound / 1e6:.0f} MB; VmHWM reset: "
          f"{res['reset']})")
    assert "peak host memory (RSS)" in proc.stderr
    assert bound * 3 < total
    assert growth < bound
    # spot-check values: a stacked expert leaf and the conv kernel
    _, params = load(tmp_path / "out")
    from qnext_jax.convert.safetensors_io import read_header, read_tensor

    index = json.loads((tmp_path / "big" / "model.safetensors.index.json").read_text())
    for name, leaf in [("model.layers.5.mlp.experts.17.down_proj.weight",
                        params["layers_5"]["mlp"]["experts"]["down_proj"][17]),
                       ("model.layers.2.linear_attn.conv1d.weight",
                        params["layers_2"]["linear_attn"]["conv1d"]["kernel"])]:
        info = read_header(tmp_path / "big" / index["weight_map"][name])[0][name]
        t = read_tensor(info)
        want = t.T if t.ndim == 2 else t[:, 0, :].T
        np.testing.assert_array_equal(np.asarray(leaf), want)


def test_truncated_safetensors_file_is_named_truncated(tmp_path):
    """A safetensors file cut short (an interrupted download) says "truncated", where its last
    tensor ends and how many bytes the file has."""
    from qnext_jax.convert.safetensors_io import SafetensorsWriter, read_header

    path = tmp_path / "model.safetensors"
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((4, 5), np.float32)
    with SafetensorsWriter(path, [("a", a.dtype, a.shape), ("b", b.dtype, b.shape)]) as w:
        w.write("a", a)
        w.write("b", b)
    header, _ = read_header(path)
    assert header["b"].shape == (4, 5)
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ValueError, match=rf"truncated: tensor 'b' ends at byte {len(data)} of the "
                                         rf"file .* but the file has {len(data) - 8} bytes"):
        read_header(path)


def test_overwrite_refuses_files_put_into_an_outputs_subdirectories(ckpts, tmp_path):
    """--overwrite replaces an earlier output only when every file under it, in its
    subdirectories too, is one the earlier output wrote: a file put into a convert output's
    params/, a directory put into an export, a file of one of the command's names added by
    hand, is named (its path in the output) and kept; the output is not replaced. A fresh user
    lost such a file (only the top-level names were checked)."""
    d, _ = ckpts["single"]
    conv = _convert(d, tmp_path, "conv")
    (conv / "params" / "extra.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not written by `qnext convert` "
                                              r"\(params/extra\.txt\), which replacing it"):
        hf_to_orbax(d, conv, overwrite=True, progress=False)
    assert (conv / "params" / "extra.txt").read_text() == "mine"
    (conv / "params" / "extra.txt").unlink()
    # inside Orbax's group directories too (what the conversion wrote there is listed)
    (conv / "params" / "00000" / "notes.txt").write_text("mine")
    (conv / "params" / "00009").mkdir()
    (conv / "params" / "00009" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not written by `qnext convert` "
                                              r"\(params/00000/notes\.txt, params/00009\)"):
        hf_to_orbax(d, conv, overwrite=True, progress=False)
    assert (conv / "params" / "00000" / "notes.txt").read_text() == "mine"
    (conv / "params" / "00000" / "notes.txt").unlink()
    shutil.rmtree(conv / "params" / "00009")
    hf_to_orbax(d, conv, overwrite=True, progress=False)  # the output alone: replaced
    hf = tmp_path / "hf"
    orbax_to_hf(conv, hf, progress=False)
    (hf / "notes").mkdir()
    (hf / "notes" / "a.txt").write_text("a")
    (hf / "notes" / "b.txt").write_text("b")
    (hf / "sub" / "deeper").mkdir(parents=True)
    (hf / "sub" / "deeper" / "config.json").write_text("{}")  # an export's name, not its place
    with pytest.raises(FileExistsError, match=r"not written by `qnext export` \(notes, sub\)"):
        orbax_to_hf(conv, hf, overwrite=True, progress=False)
    assert (hf / "notes" / "b.txt").read_text() == "b"
    assert (hf / "sub" / "deeper" / "config.json").is_file()
    shutil.rmtree(hf / "notes")
    shutil.rmtree(hf / "sub")
    # a file of a name the command writes, added by hand (the source has none; each output
    # lists what it wrote: the params index, qnext_export.json): refused, kept
    for out, listing, command, rewrite in (
            (conv, "params_index.json", "convert",
             lambda: hf_to_orbax(d, conv, overwrite=True, progress=False)),
            (hf, "qnext_export.json", "export",
             lambda: orbax_to_hf(conv, hf, overwrite=True, progress=False))):
        assert "added_tokens.json" not in json.loads((out / listing).read_text())["files"]
        (out / "added_tokens.json").write_text('{"<x>": 96}')
        with pytest.raises(FileExistsError, match=rf"not written by `qnext {command}` "
                                                  r"\(added_tokens\.json\)"):
            rewrite()
        assert (out / "added_tokens.json").read_text() == '{"<x>": 96}'
        (out / "added_tokens.json").unlink()
        rewrite()


def test_params_to_hf_refuses_a_tokenizer_dir_without_tokenizer_files(tmp_path):
    """tokenizer_dir that does not exist, or holds no tokenizer file, is refused before
    anything is written (it wrote a checkpoint without a tokenizer, silently)."""
    from conftest import init_params, tiny_config

    from qnext_jax.convert import params_to_hf
    from qnext_jax.train.run import save_params

    config = tiny_config()
    params = init_params(config)
    (tmp_path / "empty").mkdir()
    for write in (params_to_hf, save_params):
        with pytest.raises(FileNotFoundError, match=r"tokenizer_dir \S*nope: no such "
                                                    r"directory"):
            write(config, params, tmp_path / "out", tokenizer_dir=tmp_path / "nope")
        with pytest.raises(ValueError, match=r"tokenizer_dir \S*empty: holds no tokenizer files "
                                             r"\(expected tokenizer\.json"):
            write(config, params, tmp_path / "out", tokenizer_dir=tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_api_refuses_bad_arguments_naming_them(ckpts, tmp_path):
    """A mesh spec string for load's mesh, a dtype outside the float ones, params_to_hf given
    None for the config or the params, and generate given the params of a deeper model: each
    named (they gave AttributeErrors, a bare numpy TypeError, or silently used the first
    layers)."""
    from conftest import init_params, tiny_config

    from qnext_jax.convert import params_to_hf
    from qnext_jax.generate import generate

    d, _ = ckpts["single"]
    with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh, got str 'tensor=2': "
                                        r"make one with qnext_jax.sharding.make_mesh"):
        load(d, mesh="tensor=2")
    with pytest.raises(ValueError, match=r"dtype must be one of float32, bfloat16, float16, "
                                         r"float64, got 'float8'"):
        load(d, dtype="float8")
    config = tiny_config()
    params = init_params(config)
    with pytest.raises(TypeError, match="params must be the model's params .* got NoneType"):
        params_to_hf(config, None, tmp_path / "x")
    with pytest.raises(TypeError, match="config must be a Qwen3NextConfig, got NoneType"):
        params_to_hf(None, params, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    shallow = config.replace(num_hidden_layers=config.num_hidden_layers - 1)
    with pytest.raises(ValueError, match=rf"the params have more layers than the config's "
                                         rf"num_hidden_layers = {shallow.num_hidden_layers}"):
        generate(shallow, params, [[1, 2]], max_new_tokens=1)


def test_convert_names_a_converted_input_and_long_mismatch_lists(ckpts, tmp_path):
    """Converting a convert output says what it is (it said no safetensors file was found); a
    mismatch of more than 50 tensors of a kind names the attribute that holds them all."""
    from qnext_jax.cli import main

    conv = _convert(ckpts["single"][0], tmp_path)
    with pytest.raises(SystemExit, match=r"^qnext convert: \S*out is a `qnext convert` output "
                                         r"already \(it holds params_index\.json\), not an HF "
                                         r"checkpoint"):
        main(["convert", str(conv), str(tmp_path / "again")])
    shutil.copytree(conv, tmp_path / "run" / "final")  # a finetune run's OUT: named
    with pytest.raises(SystemExit, match=r"run has no config\.json \(a qnext finetune output: "
                                         r"its params are in \S*run/final\)"):
        main(["convert", str(tmp_path / "run"), str(tmp_path / "again")])
    err = CheckpointMismatchError("d", missing=[(f"t{i}", (2,)) for i in range(53)])
    assert str(err).splitlines()[-1] == "  ... and 3 more missing (all in the error's .missing)"
    assert len(err.missing) == 53
