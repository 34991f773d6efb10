"""Generation: cached greedy decoding equals uncached argmax, sampling filters, eos, the CLI, and
the scanned model (scan_layers) against the unrolled one."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SCAN_TWO_PERIODS, init_params, tiny_config

from qnext_jax.cli import main as qnext_main
from qnext_jax.generate import SCANNED_DECODE_GPU_OPTIONS, Generator, generate, sample_logits
from qnext_jax.modeling import Qwen3NextForCausalLM
from qnext_jax.modeling.decoder import stack_layers


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, init_params(cfg, seed=7)


def test_greedy_generation_equals_uncached_argmax_loop(tiny):
    cfg, params = tiny
    model = Qwen3NextForCausalLM(cfg)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[0].argmax(-1))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5)).astype(np.int32)
    gen = Generator(cfg)
    out = gen.generate(params, ids, max_new_tokens=6).tokens
    # Causal: the logits at position t see tokens <= t only, so one fixed-size buffer serves.
    seq = np.concatenate([ids, np.zeros((2, 6), np.int32)], axis=1)
    for t in range(5, 11):
        seq[:, t] = np.asarray(fwd(params, seq))[:, t - 1]
    np.testing.assert_array_equal(out, seq[:, 5:])
    # One compiled decode loop serves every token.
    assert _programs(gen, "decode") == 1


def _programs(gen, name):
    """The compiled programs of a Generator named ``name`` ("prefill" or "decode")."""
    return [key[0] for key in gen._compiled].count(name)


def test_nearby_lengths_reuse_compiled_programs(tiny):
    """Prompt lengths round up to PROMPT_BUCKET and caches to CACHE_BUCKET: other prompt lengths
    and max_new_tokens inside the buckets run the programs compiled by the first call."""
    cfg, params = tiny
    gen = Generator(cfg)
    rng = np.random.default_rng(1)
    for T, new in ((5, 6), (9, 3), (1, 12)):
        ids = rng.integers(0, cfg.vocab_size, (2, T)).astype(np.int32)
        out = gen.generate(params, ids, max_new_tokens=new).tokens
        assert out.shape == (2, new)
    assert _programs(gen, "prefill") == 1
    assert _programs(gen, "decode") == 1


def test_cache_is_sized_up_front_by_prompt_and_max_new_tokens(tiny, monkeypatch, capsys):
    """What the README's generate section says: the cache is allocated before the prefill for
    the prompt (rounded up to PROMPT_BUCKET = 64 tokens, or to the prefill chunk) plus
    max_new_tokens, the sum rounded up to CACHE_BUCKET = 256 slots; those slots are the K/V
    length of the attention layers, the GDN states do not depend on them; `qnext generate`
    warns past max_position_embeddings and goes on to allocate the cache."""
    import importlib

    from qnext_jax.cache import init_cache

    qgen = importlib.import_module("qnext_jax.generate")  # qnext_jax.generate is the function

    cfg, params = tiny
    sizes = []

    class Allocated(Exception):
        pass

    def record(config, batch_size, max_length, *args, **kwargs):
        sizes.append(max_length)
        raise Allocated  # stop before compiling anything

    monkeypatch.setattr(qgen, "init_cache", record)
    cases = ((5, 6, None, 256), (70, 200, None, 512),  # 64 + 6 -> 256; 128 + 200 -> 512
             (70, 160, 48, 256), (70, 161, 48, 512))   # chunks of 48: 96 + 160, 96 + 161
    for T, new, chunk, want in cases:
        with pytest.raises(Allocated):
            Generator(cfg, prefill_chunk_size=chunk).generate(
                params, np.zeros((1, T), np.int32), max_new_tokens=new)
        assert sizes[-1] == want, (T, new, chunk)
    small, big = init_cache(cfg, 1, 256), init_cache(cfg, 1, 512)
    attn = [i for i in range(cfg.num_hidden_layers) if cfg.is_full_attention(i)]
    gdn = [i for i in range(cfg.num_hidden_layers) if not cfg.is_full_attention(i)]
    assert attn and gdn
    for i in attn:
        assert small[f"layers_{i}"]["key"].shape == (1, cfg.num_key_value_heads, 256,
                                                     cfg.head_dim)
        assert big[f"layers_{i}"]["value"].shape[2] == 512
    for i in gdn:
        assert jax.tree_util.tree_map(jnp.shape, small[f"layers_{i}"]) == \
            jax.tree_util.tree_map(jnp.shape, big[f"layers_{i}"])

    capsys.readouterr()
    with pytest.raises(Allocated):  # the demo model: max_position_embeddings 4096
        qnext_main(["generate", "--prompt", "Hi", "--max-new-tokens", "4095"])
    assert re.search(r"warning: \d+ prompt \+ 4095 new tokens go past the model's "
                     r"max_position_embeddings \(4096\)", capsys.readouterr().err)
    assert sizes[-1] == 4352  # 64 + 4095, rounded up to 256


def test_eos_stops_generation(tiny):
    cfg, params = tiny
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 4)).astype(np.int32)
    gen = Generator(cfg)
    first = gen.generate(params, ids, max_new_tokens=3).tokens
    stopped = gen.generate(params, ids, max_new_tokens=3, eos_token_id=int(first[0, 0])).tokens
    assert stopped.tolist() == [[first[0, 0]]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decode_steps_per_call_give_the_same_tokens(tiny, temperature):
    """The on-device decode loop: any number of steps per call gives the tokens of one step per
    call (greedy, and sampled: each step splits the key as the single steps did), stops at eos
    inside a burst (rows repeat their eos), and times every decode token."""
    cfg, params = tiny
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 5)).astype(np.int32)
    kw = {"max_new_tokens": 11, "temperature": temperature, "top_k": 30, "seed": 9}
    ref = Generator(cfg, decode_steps_per_call=1).generate(params, ids, **kw)
    assert ref.decode_tokens == ref.decode_steps == 10
    for n in (3, 16):
        gen = Generator(cfg, decode_steps_per_call=n)
        out = gen.generate(params, ids, **kw)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        assert out.decode_tokens == out.decode_steps == 10
        assert _programs(gen, "decode") == 1  # the last, shorter burst runs the same program
    # eos: row 0's 5th token (in the second burst of 3) and row 1's 7th token are stop ids
    # (either may come earlier in a row): rows repeat their first eos, and the loop stops when
    # both rows did, by the 7th token.
    eos = (int(ref.tokens[0, 4]), int(ref.tokens[1, 6]))
    want = Generator(cfg, decode_steps_per_call=1).generate(params, ids, eos_token_id=eos, **kw)
    got = Generator(cfg, decode_steps_per_call=3).generate(params, ids, eos_token_id=eos, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.tokens.shape[1] <= 7
    first_eos = np.argmax(np.isin(got.tokens[0], eos))
    assert first_eos <= 4 and np.all(got.tokens[0, first_eos:] == got.tokens[0, first_eos])


def test_decode_loop_buffer_is_bounded_by_the_tokens_left(tiny):
    """A decode_steps_per_call far above max_new_tokens compiles a loop buffer of the steps
    that can run (a power of two, at least the default 16), not of decode_steps_per_call."""
    cfg, params = tiny
    gen = Generator(cfg, decode_steps_per_call=10**9)
    ids = np.zeros((1, 3), np.int32)
    out = gen.generate(params, ids, max_new_tokens=40).tokens
    np.testing.assert_array_equal(out, Generator(cfg).generate(params, ids,
                                                               max_new_tokens=40).tokens)
    blocks = [dict(key[3])["block"] for key in gen._compiled if key[0] == "decode"]
    assert blocks == [64]  # 39 decode steps
    gen.generate(params, ids, max_new_tokens=5)
    assert sorted(dict(key[3])["block"] for key in gen._compiled if key[0] == "decode") == [
        16, 64]


def test_bad_prompts_and_params_layouts_are_named(tiny, two_periods):
    """Float token ids (which int32 would truncate), an empty prompt or batch, 1-D ids into the
    model, and params of the other layout (per layer vs stacked) get errors naming them."""
    cfg, params = tiny
    gen = Generator(cfg)
    with pytest.raises(ValueError, match="token ids must be integers, got dtype float32"):
        gen.generate(params, jnp.asarray([[1.5, 2.0]]), max_new_tokens=1)
    with pytest.raises(ValueError, match="token ids must be integers, got dtype float64"):
        gen.generate(params, [[1.5, 2.0], [3.0]], max_new_tokens=1)  # left-padded here
    for empty in ([[]], np.zeros((1, 0), np.int32), np.zeros((0, 3), np.int32)):
        with pytest.raises(ValueError, match="at least one prompt of at least one token"):
            gen.generate(params, empty, max_new_tokens=1)
    model = Qwen3NextForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\] token ids, got "
                                         r"shape \(3,\)"):
        model.apply({"params": params}, jnp.asarray([1, 2, 3]))
    cfg8, per_layer = two_periods
    ids = jnp.asarray([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"scan_layers=True needs the stacked params of "
                                         r"stack_layers\(params, config\), got per-layer"):
        Qwen3NextForCausalLM(cfg8, scan_layers=True).apply({"params": per_layer}, ids)
    with pytest.raises(ValueError, match="scan_layers=False needs per-layer params"):
        Qwen3NextForCausalLM(cfg8).apply({"params": stack_layers(per_layer, cfg8)}, ids)


def test_decode_steps_per_call_must_be_positive(tiny, capsys):
    with pytest.raises(ValueError, match="decode_steps_per_call must be >= 1, got 0"):
        Generator(tiny[0], decode_steps_per_call=0)
    with pytest.raises(SystemExit):
        qnext_main(["generate", "--prompt", "Hi", "--decode-steps-per-call", "0"])
    assert "--decode-steps-per-call" in capsys.readouterr().err
    assert qnext_main(["generate", "--prompt", "Hi", "--max-new-tokens", "3", "--json",
                       "--decode-steps-per-call", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["decode_steps_per_call"] == 2


def test_cli_compilation_cache_serves_a_rerun(tmp_path):
    """``--compilation-cache DIR``: the first run stores its compiled programs there, a rerun
    loads them (nothing new stored) and gives the same tokens; ``auto`` uses
    $XDG_CACHE_HOME/qnext-jax/xla; ``none`` stores nothing. Fresh processes, as the cache is set
    once per process (this one's is the test suite's)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def run(where):
        out = subprocess.run([sys.executable, "-m", "qnext_jax.cli", "generate", "--prompt",
                              "Hi", "--max-new-tokens", "3", "--json", "--compilation-cache",
                              where], env=env, cwd=tmp_path, capture_output=True, text=True,
                             check=True, timeout=300)
        return json.loads(out.stdout)["token_ids"]

    def entries(d):
        return sorted(p.name for p in d.iterdir())

    cache = tmp_path / "cache"
    first = run(str(cache))
    stored = entries(cache)
    assert stored
    assert run(str(cache)) == first
    assert entries(cache) == stored
    assert run("none") == first
    assert entries(tmp_path) == ["cache"]  # neither a "none" directory nor the XDG default
    assert run("auto") == first
    assert entries(tmp_path / "xdg" / "qnext-jax" / "xla")
    with pytest.raises(SystemExit, match="qnext generate: --compilation-cache: .*a_file is not "
                                         "a directory"):
        (tmp_path / "a_file").write_text("")
        qnext_main(["generate", "--prompt", "Hi", "--compilation-cache",
                    str(tmp_path / "a_file")])


def test_cli_prompts_file_batch_equals_each_prompt_alone(tmp_path, capsys):
    """--prompts-file: prompts of unequal lengths (text and token ids) in one left-padded
    batch give each prompt's tokens alone (the demo model, float32, greedy)."""
    lines = [{"prompt": "Hi"}, {"token_ids": [72, 101, 108, 108, 111, 44, 32, 119]},
             {"prompt": "A longer prompt than the others"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    common = ["--max-new-tokens", "5", "--json"]
    assert qnext_main(["generate", "--prompts-file", str(path), *common]) == 0
    batch = json.loads(capsys.readouterr().out)
    assert len(batch["results"]) == 3
    for line, got in zip(lines, batch["results"]):
        flag = (["--prompt", line["prompt"]] if "prompt" in line else
                ["--token-ids", ",".join(map(str, line["token_ids"]))])
        qnext_main(["generate", *flag, *common])
        alone = json.loads(capsys.readouterr().out)
        assert got["prompt_ids"] == alone["prompt_ids"]
        assert got["token_ids"] == alone["token_ids"]  # up to 5, or to the first end token
        assert 1 <= len(got["token_ids"]) <= 5
    assert batch["decode_tokens_per_s"] > 0
    # Without --json: one line per prompt, then the summary on stderr.
    qnext_main(["generate", "--prompts-file", str(path), "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert [line[:4] for line in out.splitlines() if line] == ["[0] ", "[1] ", "[2] "]
    assert re.search(r"\[qnext\] 3 prompt\(s\), \d+ tokens in all, generated \d+;", err), err


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "a"}\nnot json\n', r"line 2: not JSON"),
    ('{"text": "a"}\n', r'line 1: expected an object with "prompt" \(text\) or "token_ids"'),
    ('{"prompt": "a", "token_ids": [1]}\n', r'line 1: give "prompt" or "token_ids", not both'),
    ('\ufeff{"prompt": "a", "x": 1}\n', r"line 1: unknown key\(s\) 'x'"),  # BOM skipped
    ('{"token_ids": [1, "2"]}\n', r'line 1: "token_ids" must be a non-empty list of ints'),
    ('{"token_ids": []}\n', r'line 1: "token_ids" must be a non-empty list of ints'),
    ('{"prompt": 3}\n', r'line 1: "prompt" must be text'),
    ('{"token_ids": [1, 99999]}\n',
     r"--prompts-file \S+p\.jsonl line 1's token ids must be in \[0, vocab_size = 260\): got 99999"),
    ('{"prompt": "a", "system": "b"}\n', (r"line 1: unknown key\(s\) 'system'; a line holds "
                                           r"'prompt' or 'token_ids' \(\"system\" with --chat\)")),
    ("\n\n", r"no prompts \(one JSON object a line\)"),
])
def test_cli_prompts_file_errors_name_the_line(tmp_path, content, expected):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit, match=expected):
        qnext_main(["generate", "--prompts-file", str(path)])


def test_cli_prompts_file_conflicts_and_missing_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(SystemExit, match="give --prompts-file FILE or --prompt / --token-ids"):
        qnext_main(["generate", "--prompts-file", str(path), "--prompt", "b"])
    with pytest.raises(SystemExit, match="--prompts-file: cannot read .*missing.jsonl"):
        qnext_main(["generate", "--prompts-file", str(tmp_path / "missing.jsonl")])


def test_seeded_sampling_is_reproducible(tiny):
    cfg, params = tiny
    ids = np.zeros((1, 3), np.int32)
    gen = Generator(cfg)
    a = gen.generate(params, ids, max_new_tokens=8, temperature=1.5, seed=3).tokens
    b = gen.generate(params, ids, max_new_tokens=8, temperature=1.5, seed=3).tokens
    c = gen.generate(params, ids, max_new_tokens=8, temperature=1.5, seed=4).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.05, 0.6, 0.25, 0.1]] * 2000))
    key = jax.random.key(0)
    assert set(np.asarray(sample_logits(logits, key, 0.0, None, None))) == {1}
    assert set(np.asarray(sample_logits(logits, key, 1.0, 1, None))) == {1}
    assert set(np.asarray(sample_logits(logits, key, 1.0, 2, None))) == {1, 2}
    assert set(np.asarray(sample_logits(logits, key, 1.0, None, 0.5))) == {1}
    assert set(np.asarray(sample_logits(logits, key, 1.0, None, 0.8))) == {1, 2}
    draws = np.asarray(sample_logits(logits, key, 1.0, None, None))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.05, 0.6, 0.25, 0.1], atol=0.04)


def test_cli_demo_model_generates(capsys):
    assert qnext_main(["generate", "--prompt", "Hi", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompt_ids"] == [72, 105]
    assert 1 <= len(out["token_ids"]) <= 4 and isinstance(out["text"], str)
    assert out["prefill_tokens_per_s"] > 0


def test_demo_model_dtype_keeps_the_float32_leaves():
    """``qnext generate --dtype`` on the demo model casts as ``load(..., dtype=)`` does: the
    GDN decay parameters (FLOAT32_NAMES) stay float32, every other float leaf is cast."""
    from qnext_jax.convert.name_map import FLOAT32_NAMES
    from qnext_jax.demo import demo_model

    _, params = demo_model(dtype=jnp.bfloat16)
    kept = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if path[-1].key in FLOAT32_NAMES:
            kept.append(path[-1].key)
            assert x.dtype == jnp.float32, path
        else:
            assert x.dtype == jnp.bfloat16, path
    assert set(kept) == set(FLOAT32_NAMES)


def test_cli_rejects_bad_token_ids(monkeypatch):
    """Bad prompts stop before the demo model's weights are built."""
    import qnext_jax.demo

    def unexpected(dtype=None):
        raise AssertionError("the demo weights were built before the prompt was checked")

    monkeypatch.setattr(qnext_jax.demo, "demo_model", unexpected)
    with pytest.raises(SystemExit, match=r"must be in \[0, vocab_size = 260\): got 99999 at "
                                         r"position 1, -2 at position 2$"):
        qnext_main(["generate", "--token-ids", "1,99999,-2"])
    with pytest.raises(SystemExit, match=r"got -1 at position 0$"):  # a leading "-": not an option
        qnext_main(["generate", "--token-ids", "-1,2"])
    with pytest.raises(SystemExit, match="expected integers"):
        qnext_main(["generate", "--token-ids", "1,a"])
    with pytest.raises(SystemExit, match="not both"):
        qnext_main(["generate", "--prompt", "Hi", "--token-ids", "1,2"])
    for empty_entry in ("1,,2", "1,2,", ",1"):
        with pytest.raises(SystemExit, match="expected integers"):
            qnext_main(["generate", "--token-ids", empty_entry])
    with pytest.raises(SystemExit, match="layer pattern that repeats"):  # the 4-layer demo
        qnext_main(["generate", "--prompt", "Hi", "--scan-layers"])


def test_generator_rejects_ids_outside_the_vocabulary():
    """Out-of-vocabulary ids of real tokens are named (they would embed as NaN silently);
    padding positions are not checked."""
    from conftest import init_params, tiny_config

    from qnext_jax.generate import Generator, check_token_ids

    cfg = tiny_config()
    gen = Generator(cfg)
    with pytest.raises(ValueError, match=rf"must be in \[0, vocab_size = {cfg.vocab_size}\): "
                                         rf"got {cfg.vocab_size} at position 1 of prompt 1$"):
        gen.generate(init_params(cfg), [[1, 2], [3, cfg.vocab_size]], max_new_tokens=1)
    check_token_ids([[-5, 1]], cfg.vocab_size, attention_mask=[[0, 1]])  # padding: not checked
    with pytest.raises(ValueError, match="must be integers, got dtype float32"):
        check_token_ids(np.array([[1.0, 2.0]], np.float32), cfg.vocab_size)
    with pytest.raises(ValueError, match=r"got -5 at position 0, .*, -5 at position 4 and 1 more$"):
        check_token_ids([[-5] * 6], cfg.vocab_size)


def test_cli_clear_errors_before_building(tmp_path, capsys, monkeypatch):
    """A missing or unfit checkpoint, a kernel for another platform, the demo model with options
    it cannot serve: one line naming the option, no traceback, before any model is built."""
    with pytest.raises(SystemExit, match="^qnext generate: --checkpoint: .*missing does not exist"):
        qnext_main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "Hi"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="--checkpoint: .*empty: neither a converted checkpoint"):
        qnext_main(["generate", "--checkpoint", str(tmp_path / "empty"), "--prompt", "Hi"])
    (tmp_path / "hf").mkdir()  # a broken config, a broken index: one line each
    (tmp_path / "hf" / "config.json").write_text('{"model_type": ')
    with pytest.raises(SystemExit, match=r"--checkpoint: .*config.json is not valid JSON"):
        qnext_main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "Hi"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    (tmp_path / "broken" / "params_index.json").write_text("{")
    with pytest.raises(SystemExit, match=r"--checkpoint: .*params_index.json is not valid JSON"):
        qnext_main(["generate", "--checkpoint", str(tmp_path / "broken"), "--prompt", "Hi"])
    for impl, platform in (("pallas_triton", "GPU"), ("pallas_mosaic_gpu", "GPU"),
                           ("pallas_tpu", "TPU")):  # on the CPU
        with pytest.raises(SystemExit, match=f"--gdn-impl {impl} runs on a {platform}"):
            qnext_main(["generate", "--prompt", "Hi", "--gdn-impl", impl])
    monkeypatch.setenv("PALLAS_GDN_IMPL", "pallas_triton")  # the op's override of auto
    with pytest.raises(SystemExit, match="PALLAS_GDN_IMPL=pallas_triton runs on a GPU; this "
                                         "JAX's backend is cpu: unset it, or set it to reference"):
        qnext_main(["generate", "--prompt", "Hi"])
    monkeypatch.setenv("PALLAS_GDN_IMPL", "triton")
    with pytest.raises(SystemExit, match="environment variable PALLAS_GDN_IMPL must be one of "):
        qnext_main(["generate", "--prompt", "Hi"])
    monkeypatch.delenv("PALLAS_GDN_IMPL")
    for impl in ("gather_pallas", "tokamax:mosaic", "tokamax:triton"):
        with pytest.raises(SystemExit, match=f"--moe-impl {impl} runs on a GPU"):
            qnext_main(["generate", "--prompt", "Hi", "--moe-impl", impl])
    with pytest.raises(SystemExit, match="--attn-impl tokamax:mosaic runs on a GPU.*auto or xla"):
        qnext_main(["generate", "--prompt", "Hi", "--attn-impl", "tokamax:mosaic"])
    import qnext_jax.modeling.layers

    monkeypatch.setattr(qnext_jax.modeling.layers, "import_tokamax",
                        lambda: (None, ImportError("no tokamax")))
    with pytest.raises(SystemExit, match="--moe-impl tokamax needs the optional tokamax"):
        qnext_main(["generate", "--prompt", "Hi", "--moe-impl", "tokamax"])
    with pytest.raises(SystemExit, match="--rope-scaling: .*'yarn' needs a number 'factor'"):
        qnext_main(["generate", "--prompt", "Hi", "--rope-scaling", "yarn"])
    with pytest.raises(SystemExit) as e:
        qnext_main(["generate", "--prompt", "Hi", "--prefill-chunk-size", "0"])
    assert e.value.code == 2 and "--prefill-chunk-size: expected a positive integer" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit, match="--speculative-tokens needs a --checkpoint"):
        qnext_main(["generate", "--prompt", "Hi", "--speculative-tokens", "2"])
    with pytest.raises(SystemExit, match="--chat needs a --checkpoint with tokenizer.json and a "
                                         "chat template: the demo model has none"):
        qnext_main(["generate", "--chat", "--prompt", "hi"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        qnext_main(["generate", "--prompt", "Hi", "--speculative-tokens", "-1"])
    assert e.value.code == 2
    assert "--speculative-tokens: expected an integer >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--system TEXT is the system message of --chat: add "
                       "--chat .*or drop --system"):  # was silently ignored
        qnext_main(["generate", "--prompt", "Hi", "--system", "Be brief."])


def test_cli_warns_that_greedy_ignores_top_k(capsys):
    qnext_main(["generate", "--prompt", "Hi", "--max-new-tokens", "1", "--top-k", "5", "--json"])
    assert "--temperature 0 decodes greedily" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,expected", [
    ("--max-new-tokens", "0", "an integer >= 1"),
    ("--temperature", "-1", "a number >= 0"),
    ("--top-k", "0", "an integer >= 1"),
    ("--top-p", "1.5", "a number in \\(0, 1\\]"),
    ("--gdn-impl", "bogus", "invalid choice"),
    ("--dtype", "float8", "invalid choice"),
    ("--mesh", "", "expected AXIS=SIZE pairs such as 'data=1,expert=8'.*got ''"),
    ("--mesh", " , ", "expected AXIS=SIZE pairs such as 'data=1,expert=8'.*got ' , '"),
])
def test_cli_rejects_bad_generation_options(flag, value, expected, capsys):
    """Bad options stop before any model is built, naming the option and what it expects."""
    with pytest.raises(SystemExit) as e:
        qnext_main(["generate", "--prompt", "Hi", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err
    assert re.search(expected, err), err


def test_generator_rejects_bad_sampling_values(tiny):
    cfg, params = tiny
    gen = Generator(cfg)
    for kw, match in (({"temperature": -0.5}, "temperature must be >= 0"),
                      ({"temperature": 1.0, "top_k": 0}, "top_k must be >= 1"),
                      ({"temperature": 1.0, "top_p": 0.0}, "top_p must be in")):
        with pytest.raises(ValueError, match=match):
            gen.generate(params, [[1, 2, 3]], max_new_tokens=2, **kw)


def test_generator_and_model_reject_bad_padding_and_cache_batch(tiny):
    """A row ending in padding (right padding, or no token at all) would sample after a pad
    slot: named. A cache of another batch size is named before any layer runs."""
    from qnext_jax import init_cache

    cfg, params = tiny
    gen = Generator(cfg)
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    for mask, row in (([[1, 1, 1], [1, 1, 0]], 1), ([[0, 0, 0], [0, 1, 1]], 0)):
        with pytest.raises(ValueError, match=f"row {row} ends in padding: every row must end "
                                             "with a token"):
            gen.generate(params, ids, attention_mask=mask, max_new_tokens=1)
    model = Qwen3NextForCausalLM(cfg)
    with pytest.raises(ValueError, match="cache is for batch size 3, input_ids has 2 rows"):
        model.apply({"params": params}, jnp.asarray(ids), cache=init_cache(cfg, 3, 16))


@pytest.fixture(scope="module")
def two_periods():
    cfg = tiny_config(**SCAN_TWO_PERIODS)
    return cfg, init_params(cfg, seed=7)


def test_scan_layers_generator_equals_unrolled(two_periods):
    """Generator(scan_layers=True): greedy tokens and seeded samples (a sample flips with any
    logit change near a draw boundary) equal the unrolled Generator's, from per-layer or
    already stacked params."""
    cfg, params = two_periods
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 6)).astype(np.int32)
    plain, scanned = Generator(cfg), Generator(cfg, scan_layers=True)
    stacked = scanned.prepare_params(params)
    assert "blocks" in stacked and "layers_0" not in stacked
    assert scanned.prepare_params(stacked) is stacked
    for kw in ({}, {"temperature": 1.0, "top_k": 20, "seed": 5}):
        ref = plain.generate(params, ids, max_new_tokens=8, **kw).tokens
        np.testing.assert_array_equal(scanned.generate(params, ids, max_new_tokens=8, **kw).tokens,
                                      ref)
        np.testing.assert_array_equal(scanned.generate(stacked, ids, max_new_tokens=8, **kw).tokens,
                                      ref)
    # One compiled decode loop per sampling setting, for every token and both param layouts.
    assert _programs(scanned, "decode") == 2
    # The unrolled Generator takes stacked params too (unstacked for it); generate() scans.
    greedy = plain.generate(params, ids, max_new_tokens=4).tokens
    np.testing.assert_array_equal(plain.generate(stacked, ids, max_new_tokens=4).tokens, greedy)
    np.testing.assert_array_equal(generate(cfg, stack_layers(params, cfg), ids, max_new_tokens=4,
                                           scan_layers=True), greedy)


def test_scanned_decode_compiler_options_only_on_gpu(two_periods, monkeypatch):
    """The scanned model's decode loop asks XLA for cuBLAS GEMMs on a GPU (Triton GEMM fusions
    copied each layer's weight slice every step); the unrolled one and other backends keep
    XLA's defaults."""
    cfg, _ = two_periods
    assert Generator(cfg, scan_layers=True).decode_compiler_options is None  # the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert Generator(cfg, scan_layers=True).decode_compiler_options == \
        SCANNED_DECODE_GPU_OPTIONS
    assert Generator(cfg).decode_compiler_options is None


@pytest.mark.gpu
def test_gpu_scanned_decode_equals_unrolled(two_periods):
    """On a GPU the scanned decode loop (compiled with its XLA options) gives the unrolled
    Generator's greedy tokens (float32, highest precision)."""
    cfg, params = two_periods
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (3, 7)).astype(np.int32)
    hi = jax.lax.Precision.HIGHEST
    plain = Generator(cfg, precision=hi)
    scanned = Generator(cfg, precision=hi, scan_layers=True)
    assert scanned.decode_compiler_options
    np.testing.assert_array_equal(scanned.generate(params, ids, max_new_tokens=12).tokens,
                                  plain.generate(params, ids, max_new_tokens=12).tokens)


def test_cli_generate_scan_layers(two_periods, monkeypatch, capsys):
    """``qnext generate --scan-layers`` gives the tokens of the plain command (a two-period
    stand-in for the demo model); the 4-layer demo model (one period) is refused clearly."""
    import qnext_jax.demo

    with pytest.raises(SystemExit, match="layer pattern that repeats"):
        qnext_main(["generate", "--prompt", "Hi", "--max-new-tokens", "2", "--scan-layers"])
    monkeypatch.setattr(qnext_jax.demo, "demo_model", lambda dtype=None: two_periods)
    monkeypatch.setattr(qnext_jax.demo, "DEMO_CONFIG", two_periods[0])
    runs = []
    for extra in ([], ["--scan-layers"]):
        capsys.readouterr()
        assert qnext_main(["generate", "--token-ids", "5,17,3,40", "--max-new-tokens", "6",
                           "--json", *extra]) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"])
    assert len(runs[0]) >= 1 and runs[1] == runs[0]
