"""Batches of unequal prompts (padding anywhere never leaks into the conv / recurrent state or the
attention) and chunked prefill (== one-shot prefill), against float64 numpy and against each
sequence run alone, unpadded, in one piece."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SCAN_TWO_PERIODS, init_params, tiny_config

from qnext_jax.generate import Generator, pad_prompts
from qnext_jax.modeling import attention
from qnext_jax.modeling.gated_deltanet import causal_conv1d

NEW = 6  # tokens generated per test
LENGTHS = (3, 7)


def _conv_reference(x, w, state, mask):
    """float64: each real token convolves the K-1 previous real inputs (state first)."""
    K = w.shape[0]
    out = np.zeros(x.shape)
    states, finals = [], []
    for b in range(x.shape[0]):
        hist = list(np.asarray(state[b], np.float64).T)  # K-1 rows of [C]
        per = []
        for t in range(x.shape[1]):
            if mask[b, t]:
                hist.append(np.asarray(x[b, t], np.float64))
                out[b, t] = sum(w[j] * hist[len(hist) - K + j] for j in range(K))
            per.append(np.stack(hist[-(K - 1):], axis=1))
        states.append(per)
        finals.append(np.stack(hist[-(K - 1):], axis=1))
    return out, np.stack(finals), np.stack([np.stack(s) for s in states])


def test_conv_skips_padding_anywhere(rng):
    B, T, C, K = 3, 9, 5, 4
    x = rng.standard_normal((B, T, C)).astype(np.float32)
    w = rng.standard_normal((K, C)).astype(np.float32)
    state = rng.standard_normal((B, C, K - 1)).astype(np.float32)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1],    # left
                     [1, 1, 0, 1, 0, 0, 1, 1, 0],    # middle and right
                     [0, 0, 0, 0, 0, 0, 0, 0, 0]],   # nothing real: state unchanged
                    bool)
    y, final, per = causal_conv1d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(state),
                                  jnp.asarray(mask), per_token_states=True)
    ref_y, ref_final, ref_per = _conv_reference(x, w, state, mask)
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(final), ref_final, rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(per), ref_per, rtol=0, atol=0)
    # Without a mask: the plain causal conv (all tokens real).
    y2, final2 = causal_conv1d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(state))
    ref2, ref_final2, _ = _conv_reference(x, w, state, np.ones_like(mask))
    np.testing.assert_allclose(np.asarray(y2), ref2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(final2), ref_final2)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(num_hidden_layers=2, layer_types=("linear_attention", "full_attention"))
    params = init_params(cfg, seed=11)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in LENGTHS]
    gen = Generator(cfg)
    alone = [gen.generate(params, [p], max_new_tokens=NEW).tokens[0] for p in prompts]
    return cfg, params, prompts, gen, np.stack(alone)


def _junk_padded(prompt, pattern, vocab, seed):
    """Place ``prompt`` on the 1-slots of ``pattern``; junk ids (masked) elsewhere."""
    pattern = np.asarray(pattern, np.int32)
    assert pattern.sum() == len(prompt) and pattern[-1] == 1
    ids = np.random.default_rng(seed).integers(0, vocab, pattern.size).astype(np.int32)
    ids[pattern == 1] = prompt
    return ids, pattern


def test_padded_batch_equals_each_sequence_alone(setup):
    cfg, params, prompts, gen, alone = setup
    # A list of unequal prompts: left-padded by generate itself.
    out = gen.generate(params, prompts, max_new_tokens=NEW).tokens
    np.testing.assert_array_equal(out, alone)
    ids, mask = pad_prompts(prompts)
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1, 1], [1] * 7]
    # Padding in the middle as well as on the left, junk ids under the mask; batch of 2 ...
    rows = [_junk_padded(prompts[0], [0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1], cfg.vocab_size, 1),
            _junk_padded(prompts[1], [0, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1], cfg.vocab_size, 2)]
    ids = np.stack([r[0] for r in rows])
    mask = np.stack([r[1] for r in rows])
    out = gen.generate(params, ids, attention_mask=mask, max_new_tokens=NEW).tokens
    np.testing.assert_array_equal(out, alone)
    # ... and at batch size 1.
    out1 = gen.generate(params, ids[1:], attention_mask=mask[1:], max_new_tokens=NEW).tokens
    np.testing.assert_array_equal(out1[0], alone[1])


def test_blocked_attention_matches_numpy(rng):
    B, T, K, G, D, S = 2, 5, 2, 3, 4, 19
    q = rng.standard_normal((B, T, K, G, D)).astype(np.float32)
    k = rng.standard_normal((B, K, S, D)).astype(np.float32)  # the cache layout
    v = rng.standard_normal((B, K, S, D)).astype(np.float32)
    mask = rng.random((B, T, S)) < 0.5
    mask[:, :, 9] = True  # every query sees a key; some blocks are fully masked
    mask[:, :, :8] = False
    out = attention.blocked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                      jnp.asarray(mask), 0.5, block=4)
    logits = np.einsum("btkgd,bksd->bkgts", q.astype(np.float64), k) * 0.5
    logits = np.where(mask[:, None, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ref = np.einsum("bkgts,bksd->btkgd", probs, v)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_one_shot(setup, monkeypatch):
    cfg, params, prompts, _, alone = setup
    # Small KV blocks: the chunks attend over the cache block by block (online softmax), as a
    # long prompt does, while the reference ran the plain softmax.
    monkeypatch.setattr(attention, "KV_BLOCK", 4)
    # Prompts of 3 and 7 left-padded to 7 in chunks of 2: row 0's first chunk is all padding,
    # the last chunk has a masked tail; every chunk runs the same compiled program.
    gen = Generator(cfg, prefill_chunk_size=2)
    out = gen.generate(params, prompts, max_new_tokens=NEW).tokens
    np.testing.assert_array_equal(out, alone)
    assert [key[0] for key in gen._compiled].count("prefill") == 1
    # Logits-level: the cache after the chunked prefill continues exactly like one-shot.
    one = Generator(cfg).generate(params, [prompts[1]], max_new_tokens=NEW, temperature=1.0,
                                  seed=3).tokens
    chunked = gen.generate(params, [prompts[1]], max_new_tokens=NEW, temperature=1.0,
                           seed=3).tokens
    np.testing.assert_array_equal(chunked, one)


def test_scan_layers_padded_batch_and_chunked_prefill_equal_unrolled(monkeypatch):
    """The scanned model (two periods of the 80B pattern) on a batch of unequal prompts, with
    padding left and in the middle, one-shot and in chunks of 2 (blocked attention over the
    cache), gives the unrolled model's greedy tokens."""
    cfg = tiny_config(**SCAN_TWO_PERIODS)
    params = init_params(cfg, seed=11)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in LENGTHS]
    ref = Generator(cfg).generate(params, prompts, max_new_tokens=NEW).tokens
    scanned = Generator(cfg, scan_layers=True)
    stacked = scanned.prepare_params(params)
    np.testing.assert_array_equal(scanned.generate(stacked, prompts, max_new_tokens=NEW).tokens,
                                  ref)
    rows = [_junk_padded(prompts[0], [0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1], cfg.vocab_size, 1),
            _junk_padded(prompts[1], [0, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1], cfg.vocab_size, 2)]
    out = scanned.generate(stacked, np.stack([r[0] for r in rows]),
                           attention_mask=np.stack([r[1] for r in rows]),
                           max_new_tokens=NEW).tokens
    np.testing.assert_array_equal(out, ref)
    monkeypatch.setattr(attention, "KV_BLOCK", 4)
    chunked = Generator(cfg, scan_layers=True, prefill_chunk_size=2)
    np.testing.assert_array_equal(chunked.generate(stacked, prompts, max_new_tokens=NEW).tokens,
                                  ref)
    assert [key[0] for key in chunked._compiled].count("prefill") == 1
