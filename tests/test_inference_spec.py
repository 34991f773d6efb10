"""MTP speculative decoding: greedy output identical to plain greedy decoding for N in {1, 2, 3},
on a random checkpoint (drafts almost never accepted: every round rolls back) and on one whose
MTP head is built to agree with the main model most of the time (long accepted runs, partial
rollbacks)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import SCAN_TWO_PERIODS, init_params, tiny_config

from qnext_jax.generate import Generator

NEW = 10


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(num_hidden_layers=2, layer_types=("linear_attention", "full_attention"),
                      mtp_num_hidden_layers=1)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (4, 7)]
    return cfg, prompts


def agreeing_mtp_params(cfg, eps: float = 0.02):
    """A checkpoint whose MTP head predicts what the main model predicts, most of the time.

    The main model's mixers and FFNs are scaled by ``eps``, so its hidden state at token t is
    close to norm(embed(t)) and its prediction mostly a function f(t) of the current token.
    The MTP head is made to compute exactly f(t_{i+1}) for token i+2: fc passes the normed
    embedding of t_{i+1} through (hidden half zero), its decoder layer adds nothing (o_proj and
    the MoE zero), and mtp.norm uses the main final norm's weight. Context (eps) makes the two
    disagree sometimes, so rounds end in a rollback to a partially accepted prefix.
    """
    p = jax.tree.map(np.array, init_params(cfg, seed=4))
    for i in range(cfg.num_hidden_layers):
        layer = p[f"layers_{i}"]
        mixer = layer["self_attn"]["o_proj"] if cfg.is_full_attention(i) else \
            layer["linear_attn"]["out_proj"]
        mixer["kernel"] *= eps
        layer["mlp"] = jax.tree.map(lambda w: w * eps, layer["mlp"])
    m = p["mtp"]
    d = cfg.hidden_size
    m["fc"]["kernel"] = np.concatenate([np.eye(d), np.zeros((d, d))], axis=0).astype(np.float32)
    m["pre_fc_norm_embedding"]["weight"][:] = 0.0
    m["norm"]["weight"] = p["norm"]["weight"].copy()
    m["layers_0"]["self_attn"]["o_proj"]["kernel"][:] = 0.0
    m["layers_0"]["mlp"] = jax.tree.map(np.zeros_like, m["layers_0"]["mlp"])
    return jax.tree.map(np.asarray, p)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_speculative_equals_plain_greedy(setup, n):
    cfg, prompts = setup
    plain = Generator(cfg)
    spec = Generator(cfg, speculative_tokens=n)
    for params, accepted_often in ((init_params(cfg, seed=8), False),
                                   (agreeing_mtp_params(cfg), True)):
        ref = plain.generate(params, prompts, max_new_tokens=NEW).tokens
        out = spec.generate(params, prompts, max_new_tokens=NEW)
        np.testing.assert_array_equal(out.tokens, ref)
        assert out.spec_proposed == n * out.spec_rounds
        print(f"N={n} accepted_often={accepted_often}: acceptance {out.acceptance_rate:.2f} "
              f"over {out.spec_rounds} rounds")
        if accepted_often:
            assert out.acceptance_rate >= 0.4
            assert out.spec_rounds < NEW - 1  # fewer main-model forwards than plain decoding
        if n == 2:  # batch size 1 as well (the acceptance is not limited by another row)
            one = spec.generate(params, [prompts[1]], max_new_tokens=NEW).tokens
            np.testing.assert_array_equal(one[0], ref[1])


def test_speculative_after_chunked_prefill(setup):
    cfg, prompts = setup
    params = agreeing_mtp_params(cfg)
    ref = Generator(cfg).generate(params, prompts, max_new_tokens=NEW).tokens
    # Chunks of 3: the MTP entries of each chunk's last slot take the next chunk's first token.
    out = Generator(cfg, speculative_tokens=2, prefill_chunk_size=3).generate(
        params, prompts, max_new_tokens=NEW)
    np.testing.assert_array_equal(out.tokens, ref)
    assert out.acceptance_rate >= 0.4


def test_speculative_equals_plain_greedy_bf16():
    """bf16 weights and compute: the verify forward (N + 1 tokens) and the plain decode step (one
    token) must route the MoE the same way. This case has a bf16 tie in the router at one of
    the verified positions, which XLA's excess precision (the float32 sums of the bf16 router
    matmul, kept or not depending on fusion) once broke differently in the two programs, so
    the outputs parted at the 6th token."""
    import jax.numpy as jnp
    cfg = tiny_config(num_hidden_layers=4, mtp_num_hidden_layers=1)
    prompt = [np.random.default_rng(0).integers(0, cfg.vocab_size, 20).tolist()]
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x,
                          init_params(cfg, seed=1))
    ref = Generator(cfg, dtype=jnp.bfloat16).generate(params, prompt, max_new_tokens=30).tokens
    out = Generator(cfg, dtype=jnp.bfloat16, speculative_tokens=2).generate(
        params, prompt, max_new_tokens=30).tokens
    np.testing.assert_array_equal(out, ref)


def test_speculative_needs_mtp_and_greedy(setup):
    cfg, _ = setup
    with pytest.raises(ValueError, match="mtp_num_hidden_layers = 0"):
        Generator(cfg.replace(mtp_num_hidden_layers=0), speculative_tokens=2)
    with pytest.raises(ValueError, match="greedy only"):
        next(Generator(cfg, speculative_tokens=2).stream(init_params(cfg), [[1, 2]],
                                                         temperature=1.0))


def test_scan_layers_speculative_equals_unrolled():
    """Speculative decoding through the scanned model (stacked cache: per-token GDN states
    behind the block axis, rolled back per block) gives the unrolled model's greedy tokens: on
    random params (drafts rejected: every round rolls back to its first token, and the GDN
    layers weigh fully) and on agreeing ones (partial rollbacks), also after a chunked
    prefill."""
    cfg = tiny_config(**SCAN_TWO_PERIODS)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, cfg.vocab_size, k).tolist() for k in (4, 7)]
    plain = Generator(cfg)
    spec = Generator(cfg, speculative_tokens=3, scan_layers=True)
    for params, accepted_often in ((init_params(cfg, seed=8), False),
                                   (agreeing_mtp_params(cfg), True)):
        ref = plain.generate(params, prompts, max_new_tokens=NEW).tokens
        stacked = spec.prepare_params(params)
        out = spec.generate(stacked, prompts, max_new_tokens=NEW)
        np.testing.assert_array_equal(out.tokens, ref)
        assert (out.acceptance_rate >= 0.4) == accepted_often, out.acceptance_rate
    chunked = Generator(cfg, speculative_tokens=3, scan_layers=True, prefill_chunk_size=3)
    np.testing.assert_array_equal(chunked.generate(stacked, prompts, max_new_tokens=NEW).tokens,
                                  ref)
