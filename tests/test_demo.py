"""The demo checkpoint (qnext_jax.demo.save_demo_checkpoint): an HF checkpoint with a
byte-level tokenizer and a chat template that the commands needing a checkpoint take offline."""

import json

import numpy as np
import pytest

from qnext_jax.chat import load_chat_template, render_chat, special_tokens, stop_token_ids
from qnext_jax.cli import main as qnext_main
from qnext_jax.convert import load
from qnext_jax.demo import DEMO_CONFIG, save_demo_checkpoint
from qnext_jax.tokenizer import load_tokenizer


def test_demo_checkpoint_tokenizer_and_template(tmp_path):
    out = save_demo_checkpoint(tmp_path / "demo", num_hidden_layers=8, mtp_num_hidden_layers=1,
                               seed=3)
    config, params = load(out)
    assert (config.num_hidden_layers, config.mtp_num_hidden_layers) == (8, 1)
    assert config.vocab_size == DEMO_CONFIG.vocab_size and "mtp" in params
    tok = load_tokenizer(out)
    text = "héllo, wörld\n\t~ \x00"
    assert tok.encode(text) == list(text.encode("utf-8"))  # token i < 256 is byte i
    assert tok.encode("a<|im_end|>b<|im_start|>") == [97, 256, 98, 258]
    assert tok.decode(tok.encode(text) + [256]) == text  # specials decode to nothing
    template = load_chat_template(out)
    rendered = render_chat(template, [{"role": "user", "content": "hi"}], special_tokens(out))
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert 256 in stop_token_ids(out, template, tok, tuple(config.eos_token_ids))
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    with pytest.raises(ValueError, match="multiple of 4 .* got 6"):
        save_demo_checkpoint(tmp_path / "six", num_hidden_layers=6)
    with pytest.raises(FileExistsError):
        save_demo_checkpoint(out)
    # its own earlier output (tokenizer files included) is replaced; `qnext export --overwrite`
    # of a converted checkpoint into it is refused (it is no earlier `qnext export` output)
    assert save_demo_checkpoint(out, overwrite=True) == out
    from qnext_jax.convert import hf_to_orbax, orbax_to_hf

    hf_to_orbax(out, tmp_path / "conv", progress=False)
    with pytest.raises(FileExistsError, match=r"demo holds a checkpoint written from in-memory "
                                              r"params .* not an earlier `qnext export` output"):
        orbax_to_hf(tmp_path / "conv", out, overwrite=True, progress=False)
    assert (out / "tokenizer.json").is_file()


def test_demo_checkpoint_serves_chat_and_finetune(tmp_path, capsys):
    """`qnext generate --chat` and `qnext finetune` (text and chat documents, then the HF
    export) run on the demo checkpoint, with no download."""
    out = save_demo_checkpoint(tmp_path / "demo")
    assert qnext_main(["generate", "--checkpoint", str(out), "--chat", "--prompt", "hi",
                       "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[-1])["token_ids"]) >= 1
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "a tiny document, two dozen bytes"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello there"}]}) + "\n")
    assert qnext_main(["finetune", "--checkpoint", str(out), "--data", str(data), "--out",
                       str(tmp_path / "ft"), "--steps", "1", "--batch-size", "2", "--seq-len",
                       "32", "--export-hf"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["steps"] == 1 and np.isfinite(result["loss"]) and result["tokens"] > 0
    assert load_tokenizer(tmp_path / "ft" / "hf").encode("hi") == [104, 105]
