"""Chat templates rendered like transformers' ``apply_chat_template``, the template's stop tokens,
streaming detokenization, and ``qnext generate --chat`` end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
from hf_fixtures import build_hf_checkpoint

from qnext_jax.chat import (
    StreamDecoder,
    load_chat_template,
    render_chat,
    special_tokens,
    stop_token_ids,
)
from qnext_jax.cli import main as qnext_main
from qnext_jax.tokenizer import ByteTokenizer, HFTokenizer

# A Qwen-style template: system prompt default, loop with loopcontrols-free logic, tojson,
# raise_exception, whitespace control (trim_blocks / lstrip_blocks matter).
TEMPLATE = """{%- if messages[0].role != 'system' %}
<|im_start|>system
You are helpful.<|im_end|>
{% endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('bad role ' + message.role) }}
    {%- endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if tools %}{{ tools | tojson }}{% endif %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
WORDS = ["system", "user", "assistant", "You", "are", "helpful.", "hello", "there", "how", "is",
         "it", "going", "fine", "thanks", "a", "b", "c", "\n"]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def write_tokenizer(path):
    """A WordLevel tokenizer (words split on spaces, newlines kept as tokens) + its config."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| "), behavior="isolated")
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens([" "])
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [
        tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "hf"
    build_hf_checkpoint(path, {"num_hidden_layers": 2, "full_attention_interval": 2,
                               "num_experts": 4, "num_experts_per_tok": 2})
    write_tokenizer(path)
    return path


MESSAGES = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "a b c"}, {"role": "user", "content": "how is it going"},
     {"role": "assistant", "content": "fine thanks"}, {"role": "user", "content": "a"}],
]


@pytest.mark.parametrize("i", range(len(MESSAGES)))
def test_render_matches_transformers(ckpt, i):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(ckpt))
    template = load_chat_template(ckpt)
    assert template == TEMPLATE
    for gen_prompt in (True, False):
        ref = hf.apply_chat_template(MESSAGES[i], tokenize=False,
                                     add_generation_prompt=gen_prompt)
        ours = render_chat(template, MESSAGES[i], special_tokens(ckpt),
                           add_generation_prompt=gen_prompt)
        assert ours == ref
    ref_ids = hf.apply_chat_template(MESSAGES[i], tokenize=True, add_generation_prompt=True)
    if hasattr(ref_ids, "keys"):  # a BatchEncoding in transformers v5
        ref_ids = ref_ids["input_ids"]
    ours = render_chat(template, MESSAGES[i], special_tokens(ckpt))
    assert HFTokenizer(ckpt / "tokenizer.json").encode(ours) == list(ref_ids)


def test_stop_tokens_and_stream_decoder(ckpt):
    tok = HFTokenizer(ckpt / "tokenizer.json")
    im_end, eot = tok.encode("<|im_end|>")[0], tok.encode("<|endoftext|>")[0]
    stops = stop_token_ids(ckpt, load_chat_template(ckpt), tok, config_eos=(3,))
    assert set(stops) == {3, im_end, eot}
    ids = tok.encode("hello there\nhow is it")
    dec = StreamDecoder(tok)
    assert "".join(dec.push(t) for t in ids) == tok.decode(ids) == "hello there\nhow is it"
    # A text that ends inside a UTF-8 sequence is held back, then flushed as U+FFFD.
    byte_tok = ByteTokenizer()
    ids = byte_tok.encode("a\u00e9")[:-1]  # "a" and the first of the two bytes of "é"
    dec = StreamDecoder(byte_tok)
    pushed = "".join(dec.push(t) for t in ids)
    assert pushed == "a"
    assert pushed + dec.flush() == byte_tok.decode(ids) == "a\ufffd"


def test_cli_chat_streams_and_stops(ckpt, capsys):
    from transformers import AutoTokenizer

    args = ["generate", "--checkpoint", str(ckpt), "--chat", "--prompt", "hello there",
            "--max-new-tokens", "5"]
    assert qnext_main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    ref = hf.apply_chat_template(MESSAGES[0], tokenize=False, add_generation_prompt=True)
    assert out["prompt_ids"] == hf(ref, add_special_tokens=False)["input_ids"]
    assert hf.convert_tokens_to_ids("<|im_end|>") in out["stop_token_ids"]
    assert 1 <= len(out["token_ids"]) <= 5
    # Without --json the text is streamed to stdout as it is produced: the same text.
    assert qnext_main(args) == 0
    streamed = capsys.readouterr().out
    assert streamed.rstrip("\n") == HFTokenizer(ckpt / "tokenizer.json").decode(
        [t for t in out["token_ids"] if t not in out["stop_token_ids"]])


def test_cli_chat_prompts_file(ckpt, tmp_path, capsys):
    """--chat with --prompts-file: each line's "prompt" (and "system") rendered as transformers'
    template renders it, one batch; token ids are refused under --chat, naming the line."""
    from transformers import AutoTokenizer

    path = tmp_path / "chat.jsonl"
    path.write_text('{"prompt": "hello there"}\n{"prompt": "a", "system": "a b c"}\n')
    assert qnext_main(["generate", "--checkpoint", str(ckpt), "--chat", "--prompts-file",
                       str(path), "--max-new-tokens", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    for got, messages in zip(results, ([{"role": "user", "content": "hello there"}],
                                       [{"role": "system", "content": "a b c"},
                                        {"role": "user", "content": "a"}]), strict=True):
        ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert got["prompt_ids"] == hf(ref, add_special_tokens=False)["input_ids"]
        assert 1 <= len(got["token_ids"]) <= 3
    path.write_text('{"prompt": "hi"}\n{"token_ids": [1, 2]}\n')
    with pytest.raises(SystemExit,
                       match=r'--prompts-file \S+chat\.jsonl line 2: --chat renders "prompt" '):
        qnext_main(["generate", "--checkpoint", str(ckpt), "--chat", "--prompts-file", str(path)])
