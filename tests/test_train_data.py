"""Fine-tuning data: JSONL/text reading, chat rendering with assistant-only loss, packing with
segment ids, resumable batch order, and no leakage between packed documents in the model."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, tiny_config

from qnext_jax.modeling import Qwen3NextForCausalLM
from qnext_jax.train.data import (
    DocumentTokenizer,
    PackedDataset,
    data_files,
    pack_documents,
    read_documents,
)

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_checkpoint_tokenizer(path):
    """A tiny byte-level BPE tokenizer.json (trained here), chat template and config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, how are you?",
              "user assistant system answer question"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "chat_template.jinja").write_text(TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    if not (path / "config.json").exists():
        (path / "config.json").write_text(json.dumps({"eos_token_id": tok.token_to_id(
            "<|endoftext|>")}))
    return tok


def test_read_tokenize_and_chat_loss_mask(tmp_path):
    tok = make_checkpoint_tokenizer(tmp_path / "ckpt")
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello?"},
            {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "and"},
            {"role": "assistant", "content": "the lazy dog"}]
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "the quick brown fox"}) + "\n\n"
                    + json.dumps({"messages": chat}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    docs = read_documents(data)
    assert docs == [{"text": "the quick brown fox", "source": f"{data}:1"},
                    {"messages": chat, "source": f"{data}:3"}]
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_documents(tmp_path / "bad.jsonl")

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "b.txt").write_text("hello world")
    (texts / "a.md").write_text("the lazy dog")
    (texts / "skip.bin").write_bytes(b"\x00")
    (texts / "sub").mkdir()
    (texts / "sub" / "c.txt").write_text("not read")
    assert data_files(texts) == ([texts / "a.md", texts / "b.txt"], ["skip.bin", "sub/"])
    assert read_documents(texts) == [{"text": "the lazy dog", "source": str(texts / "a.md")},
                                     {"text": "hello world", "source": str(texts / "b.txt")}]
    assert read_documents(texts / "b.txt") == [{"text": "hello world",
                                                "source": str(texts / "b.txt")}]
    # the files data_files listed, read as listed (a file added since is not read)
    listed_files = data_files(texts)[0]
    (texts / "c.txt").write_text("added after the listing")
    assert read_documents(listed_files) == [
        {"text": "the lazy dog", "source": str(texts / "a.md")},
        {"text": "hello world", "source": str(texts / "b.txt")}]
    (tmp_path / "nocontent.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}))
    with pytest.raises(ValueError, match=r"nocontent\.jsonl:1: message 1: expected an object "
                                         r"with 'role' and 'content' strings, got "
                                         r"\{'role': 'assistant'\}$"):
        read_documents(tmp_path / "nocontent.jsonl")
    # an unknown role was taken silently
    (tmp_path / "robot.jsonl").write_text(
        json.dumps({"messages": [{"role": "robot", "content": "beep"}]}))
    with pytest.raises(ValueError, match=r"robot\.jsonl:1: message 0: role 'robot', expected "
                                         r"one of system, user, assistant, tool$"):
        read_documents(tmp_path / "robot.jsonl")
    # a .json file holding one JSON array (as HF datasets write) or one (pretty-printed) object;
    # a .json of one object per line still reads as JSONL; a bad line says JSONL is expected
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "a b"}, {"messages": chat}], indent=1))
    assert read_documents(tmp_path / "arr.json") == [
        {"text": "a b", "source": f"{tmp_path / 'arr.json'}[0]"},
        {"messages": chat, "source": f"{tmp_path / 'arr.json'}[1]"}]
    (tmp_path / "one.json").write_text(json.dumps({"text": "c d"}, indent=2))
    assert read_documents(tmp_path / "one.json") == [{"text": "c d",
                                                      "source": str(tmp_path / "one.json")}]
    (tmp_path / "lines.json").write_text('{"text": "e"}\n{"text": "f"}\n')
    assert [d["text"] for d in read_documents(tmp_path / "lines.json")] == ["e", "f"]
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "a b"}, {"txt": 1}]))
    with pytest.raises(ValueError, match=r"arr\.json\[1\]: expected an object with a 'text'"):
        read_documents(tmp_path / "arr.json")
    (tmp_path / "torn.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"torn\.jsonl:2: not valid JSON .*; expected one JSON "
                                         r"object per line \(JSONL\)"):
        read_documents(tmp_path / "torn.jsonl")
    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "x.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"nodata: no data files in this directory \(expected "
                                         r"\.jsonl / \.json or "):
        read_documents(tmp_path / "nodata")

    dt = DocumentTokenizer.from_checkpoint(tmp_path / "ckpt")
    eos = tok.token_to_id("<|endoftext|>")
    ids, trainable = dt.encode(docs[0])
    assert ids.tolist() == tok.encode("the quick brown fox").ids + [eos]
    assert trainable.all()

    ids, trainable = dt.encode(docs[1])
    full = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello?<|im_end|>\n"
            "<|im_start|>assistant\nhello world<|im_end|>\n<|im_start|>user\nand<|im_end|>\n"
            "<|im_start|>assistant\nthe lazy dog<|im_end|>\n")
    assert ids.tolist() == tok.encode(full, add_special_tokens=False).ids
    # the trained tokens are exactly the two assistant turns (content + end of turn)
    runs, cur = [], []
    for i, t in zip(ids.tolist(), trainable.tolist(), strict=True):
        if t:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [
        "hello world<|im_end|>\n", "the lazy dog<|im_end|>\n"]


def test_chat_line_without_assistant_turn_names_file_and_line(tmp_path):
    """A 'messages' line with nothing to train on fails naming FILE:LINE, as the reader's own
    errors do (it named neither)."""
    make_checkpoint_tokenizer(tmp_path / "ckpt")
    data = tmp_path / "train.jsonl"
    good = [{"role": "user", "content": "hello?"}, {"role": "assistant", "content": "hello"}]
    data.write_text("\n".join(json.dumps({"messages": m}) for m in (
        good, good, [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hello?"}])) + "\n")
    tok = DocumentTokenizer.from_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(data))}:3: a 'messages' document "
                       "has no assistant turn .*expected at least one message with role "
                       "'assistant'$"):
        PackedDataset.from_documents(read_documents(data), tok, seq_len=64)
    with pytest.raises(ValueError, match="^a 'messages' document has no assistant turn"):
        tok.encode({"messages": good[:1]})  # no source: the message alone


def test_packing_rows_segments_and_targets():
    rng = np.random.default_rng(0)
    lens = [5, 9, 3, 14, 2, 6]
    docs = [(rng.integers(1, 50, n).astype(np.int32), rng.random(n) > 0.3) for n in lens]
    rows = pack_documents(docs, seq_len=10, max_segments=3)
    ids, seg, tgt, mask = (rows[k] for k in ("input_ids", "segment_ids", "targets", "loss_mask"))
    # rebuild each document (pieces in order) from the rows and check targets / mask
    pieces = []
    for r in range(ids.shape[0]):
        assert seg[r].max() <= 2  # max_segments - 1 documents per row
        for s in range(1, seg[r].max() + 1):
            at = np.nonzero(seg[r] == s)[0]
            assert (np.diff(at) == 1).all()
            pieces.append((ids[r, at], tgt[r, at], mask[r, at]))
        assert (ids[r][seg[r] == 0] == 0).all() and (mask[r][seg[r] == 0] == 0).all()
    flat_ids = np.concatenate([p[0] for p in pieces])
    np.testing.assert_array_equal(flat_ids, np.concatenate([d[0] for d in docs]))
    k = 0
    for d_ids, d_tr in docs:
        n = len(d_ids)
        got_t = np.concatenate([p[1] for p in pieces])[k:k + n]
        got_m = np.concatenate([p[2] for p in pieces])[k:k + n]
        np.testing.assert_array_equal(got_t[:-1], d_ids[1:])
        np.testing.assert_array_equal(got_m, np.append(d_tr[1:], False).astype(np.float32))
        k += n

    # documents of one token each, or no trainable target: nothing to train on
    for bad in ([(np.array([7], np.int32), np.array([True]))] * 3,
                [(np.array([7, 8, 9], np.int32), np.zeros(3, bool))]):
        with pytest.raises(ValueError, match="no training targets in the dataset"):
            pack_documents(bad, seq_len=10, max_segments=3)

    ds = PackedDataset(rows, max_segments=3)
    seq = [b for _, (_, b) in zip(range(7), ds.batches(batch_size=3, seed=5))]
    resumed = [b for _, (_, b) in zip(range(3), ds.batches(batch_size=3, start_step=4,
                                                             seed=5))]
    for a, b in zip(seq[4:], resumed, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    # each epoch visits every row once
    n = ds.num_rows
    order = np.concatenate([ds.batch_at(s, 1, seed=5)["input_ids"] for s in range(n)])
    assert sorted(map(tuple, order.tolist())) == sorted(map(tuple, ids.tolist()))


def test_packed_documents_do_not_leak():
    """Each document of a packed batch (2 rows, documents back to back, padding) gets the same
    per-token logits and losses as when run alone: attention, the GDN conv and recurrent state
    and the positions all restart at each document."""
    cfg = tiny_config(num_hidden_layers=2, full_attention_interval=2)  # GDN + attention
    params = init_params(cfg)
    model = Qwen3NextForCausalLM(cfg, gdn_impl="reference")
    rng = np.random.default_rng(3)
    lens = [7, 9, 6, 11, 5]
    docs = [(rng.integers(1, cfg.vocab_size, n).astype(np.int32), np.ones(n, bool))
            for n in lens]
    rows = pack_documents(docs, seq_len=24, max_segments=4)
    assert rows["input_ids"].shape == (2, 24)
    fwd = jax.jit(lambda p, ids, seg: model.apply({"params": p}, ids, segment_ids=seg,
                                                  max_segments=4)[0])
    packed = np.asarray(fwd(params, rows["input_ids"], rows["segment_ids"]))
    alone_ids = np.zeros((len(docs), 24), np.int32)
    alone_mask = np.zeros((len(docs), 24), np.int32)
    for i, (d, _) in enumerate(docs):
        alone_ids[i, :len(d)] = d
        alone_mask[i, :len(d)] = 1
    alone = np.asarray(jax.jit(lambda p, ids, m: model.apply({"params": p}, ids,
                                                             attention_mask=m)[0])(
        params, alone_ids, alone_mask))

    def ce(logits, t):
        return -jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)[np.arange(len(t)), t]

    i = 0
    scale = np.abs(alone).max()
    for r in range(2):
        for s in range(1, rows["segment_ids"][r].max() + 1):
            at = rows["segment_ids"][r] == s
            d = docs[i][0]
            np.testing.assert_array_equal(rows["input_ids"][r, at], d)
            np.testing.assert_allclose(packed[r, at], alone[i, :len(d)], atol=2e-5 * scale)
            np.testing.assert_allclose(ce(packed[r, at][:-1], d[1:]),
                                       ce(alone[i, :len(d) - 1], d[1:]), atol=1e-4)
            i += 1
    assert i == len(docs)
