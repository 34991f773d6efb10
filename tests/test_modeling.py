"""Model-level checks against float64 numpy formulas and against itself (cache, padding)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SCAN_TWO_PERIODS, init_params, tiny_config
from np_reference import attention_moe_layer, f64, gated_attention, rms_norm

from qnext_jax.cache import (
    init_cache,
    keep_token_state,
    stack_cache,
    track_token_states,
    unstack_cache,
)
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling import Qwen3NextForCausalLM
from qnext_jax.modeling.attention import Qwen3NextAttention
from qnext_jax.modeling.decoder import scan_period, stack_layers, unstack_layers
from qnext_jax.modeling.rope import rope_cos_sin

HIGHEST = jax.lax.Precision.HIGHEST


def _apply(config, dtype=jnp.float32, scan_layers=False):
    model = Qwen3NextForCausalLM(config, dtype=dtype, precision=HIGHEST, scan_layers=scan_layers)
    return jax.jit(lambda p, x, cache=None, mask=None: model.apply(
        {"params": p}, x, cache=cache, attention_mask=mask))


def test_attention_block_matches_numpy(rng):
    cfg = tiny_config()
    T = 11
    x = rng.standard_normal((1, T, cfg.hidden_size)).astype(np.float32)
    attn = Qwen3NextAttention(cfg, precision=HIGHEST)
    pos = jnp.arange(T)[None]
    cos, sin = rope_cos_sin(cfg, pos, jnp.float32)
    mask = jnp.ones((1, T), bool)
    p = attn.init(jax.random.key(1), x, cos, sin, mask)["params"]
    p = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(2), w.shape), p)
    y, _ = attn.apply({"params": p}, x, cos, sin, mask)
    ref = gated_attention(jax.tree.map(np.asarray, p), f64(x[0]), cfg, np.arange(T))
    np.testing.assert_allclose(np.asarray(y[0]), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_prefill_then_decode_equals_full_prefill(dtype):
    cfg = tiny_config()
    params = init_params(cfg, scale=0.1)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 70)))
    exact, _ = _apply(cfg)(params, ids)  # float32, one prefill
    if dtype == jnp.bfloat16:
        params = jax.tree.map(lambda w: w.astype(dtype) if w.ndim > 1 else w, params)
    fn = _apply(cfg, dtype)
    full, _ = fn(params, ids)
    cache = init_cache(cfg, 2, 72, dtype)
    pieces = []
    for a, b in [(0, 37), (37, 65), (65, 66), (66, 67), (67, 70)]:
        logits, cache = fn(params, ids[:, a:b], cache)
        pieces.append(logits)
    assert int(cache["index"]) == 70
    split = jnp.concatenate(pieces, axis=1).astype(jnp.float32)
    scale = float(jnp.max(jnp.abs(exact)))
    split_err = float(jnp.max(jnp.abs(split - exact))) / scale
    if dtype == jnp.float32:
        assert split_err < 1e-4, split_err
    else:  # bf16: the cached path may not be further from float32 than one bf16 prefill is
        full_err = float(jnp.max(jnp.abs(full.astype(jnp.float32) - exact))) / scale
        assert split_err < max(2 * full_err, 1e-2), (split_err, full_err)


def test_one_row_matmuls_as_two_rows_give_the_same_decode(monkeypatch):
    """On a GPU, single-row projections that XLA would strength-reduce run with a zero second
    row (layers.row_matmul): which ones, and, forced on the CPU, the same decode logits (batch
    1, one token after a prefill; float32 and bf16)."""
    from qnext_jax.modeling import layers

    monkeypatch.setattr(layers, "_on_gpu", lambda: True)
    one = jnp.ones((1, 1, 4096), jnp.bfloat16)
    assert layers._one_row_dot(one, 2048)  # the 80B's out_proj: 8.4e6 elements
    assert not layers._one_row_dot(one[..., :2048], 12288)  # in_proj_qkvz: 2.5e7, a GEMM
    assert not layers._one_row_dot(jnp.ones((2, 1, 4096)), 2048)  # two rows
    calls = []
    plain = layers.row_matmul(lambda x: calls.append(x.shape) or x @ jnp.eye(4096, 8), one, 8)
    assert calls == [(2, 4096)] and plain.shape == (1, 1, 8)

    cfg = tiny_config()
    ids = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 9)))
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        params = jax.tree.map(lambda w, dtype=dtype: w.astype(dtype) if w.ndim > 1 else w,
                              init_params(cfg, scale=0.1))
        logits = {}
        for on_gpu in (False, True):
            monkeypatch.setattr(layers, "_on_gpu", lambda on_gpu=on_gpu: on_gpu)
            fn = _apply(cfg, dtype)
            _, cache = fn(params, ids[:, :8], init_cache(cfg, 1, 16, dtype))
            logits[on_gpu] = fn(params, ids[:, 8:], cache)[0].astype(jnp.float32)
        err = float(jnp.max(jnp.abs(logits[True] - logits[False])))
        assert err <= tol * float(jnp.max(jnp.abs(logits[False]))), (dtype, err)


@pytest.mark.parametrize("lengths", [(6,), (13, 20, 1)])
def test_left_padded_batch_equals_each_sequence_alone(lengths):
    cfg = tiny_config()
    params = init_params(cfg, seed=3)
    fn = _apply(cfg)
    rng = np.random.default_rng(sum(lengths))
    T = max(lengths) + 2  # every row padded, also at batch size 1
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    ids = np.zeros((len(seqs), T), np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = s
        ids[i, :T - len(s)] = rng.integers(0, cfg.vocab_size, T - len(s))  # junk under the mask
        mask[i, T - len(s):] = 1
    cache = init_cache(cfg, len(seqs), T + 3)
    batch_logits, cache = fn(params, jnp.asarray(ids), cache, jnp.asarray(mask))
    nxt = rng.integers(0, cfg.vocab_size, (len(seqs), 1))
    step_logits, _ = fn(params, jnp.asarray(nxt, jnp.int32), cache)
    for i, s in enumerate(seqs):
        c1 = init_cache(cfg, 1, len(s) + 1)
        alone, c1 = fn(params, jnp.asarray(s[None], jnp.int32), c1)
        alone_step, _ = fn(params, jnp.asarray(nxt[i:i + 1], jnp.int32), c1)
        scale = float(np.abs(alone).max())
        np.testing.assert_allclose(np.asarray(batch_logits[i, T - len(s):]), np.asarray(alone[0]),
                                   rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(np.asarray(step_logits[i]), np.asarray(alone_step[0]),
                                   rtol=0, atol=1e-4 * scale)


def test_mtp_head_from_checkpoint_matches_numpy(rng, tmp_path):
    """mtp.* tensors (released names and shapes) added to a transformers checkpoint, converted,
    then the MTP head against its formula in float64 numpy."""
    from hf_fixtures import add_mtp_tensors, build_hf_checkpoint

    from qnext_jax.convert import hf_to_orbax, load

    build_hf_checkpoint(tmp_path / "hf", {"num_hidden_layers": 2}, seed=4)
    add_mtp_tensors(tmp_path / "hf", seed=5, scale=0.2)
    hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", progress=False)
    cfg, params = load(tmp_path / "orbax")
    assert cfg.mtp_num_hidden_layers == 1
    model = Qwen3NextForCausalLM(cfg, precision=HIGHEST)
    T = 9
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T + 1)), jnp.int32)
    hidden = jnp.asarray(rng.standard_normal((1, T, cfg.hidden_size)), jnp.float32)
    positions = jnp.arange(T)[None]
    logits, _, _ = model.apply({"params": params}, hidden, ids[:, 1:], positions,
                               method=Qwen3NextForCausalLM.mtp_logits)
    p = jax.tree.map(np.asarray, params)
    m = p["mtp"]
    e = rms_norm(p["embed_tokens"]["embedding"][np.asarray(ids[0, 1:])],
                 m["pre_fc_norm_embedding"]["weight"])
    h = rms_norm(np.asarray(hidden[0]), m["pre_fc_norm_hidden"]["weight"])
    x = np.concatenate([e, h], -1) @ f64(m["fc"]["kernel"])  # embedding first
    x = attention_moe_layer(m["layers_0"], x, cfg, np.arange(T))
    ref = rms_norm(x, m["norm"]["weight"]) @ f64(p["lm_head"]["kernel"])
    np.testing.assert_allclose(np.asarray(logits[0]), ref, rtol=1e-4,
                               atol=1e-5 * np.abs(ref).max())


def test_80b_parameter_count_from_config_alone():
    cfg = Qwen3NextConfig.from_preset("qwen3-next-80b-a3b")
    model = Qwen3NextForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert round(n / 1e9, 2) == 79.67, n
    with_mtp = jax.eval_shape(Qwen3NextForCausalLM(cfg.replace(mtp_num_hidden_layers=1)).init,
                              jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    assert round(sum(math.prod(x.shape) for x in jax.tree.leaves(with_mtp)) / 1e9, 1) == 81.3


def test_cache_too_short_is_rejected():
    cfg = tiny_config()
    params = init_params(cfg)
    model = Qwen3NextForCausalLM(cfg)
    with pytest.raises(ValueError, match="cache holds 4 positions"):
        model.apply({"params": params}, jnp.zeros((1, 5), jnp.int32),
                    cache=init_cache(cfg, 1, 4))


# ------------------------------------------------------------------- scan over layer blocks
# Period 4, 2 blocks: GDN + MoE, attention + dense MLP, attention + MoE, attention + dense MLP
# (one GDN per block keeps the compile short; the 80B pattern's period: scan_period's check).
SCAN_CFG = {"num_hidden_layers": 8, "mlp_only_layers": (1, 3, 5, 7),
            "layer_types": (("linear_attention",) + ("full_attention",) * 3) * 2}


def test_stack_unstack_layers_round_trip_and_scanned_init_layout():
    cfg = tiny_config(**SCAN_CFG)
    assert scan_period(cfg) == 4
    assert scan_period(Qwen3NextConfig.from_preset("qwen3-next-80b-a3b")) == 4
    params = init_params(cfg)
    stacked = stack_layers(params, cfg)
    assert not any(k.startswith("layers_") for k in stacked)
    np.testing.assert_array_equal(stacked["blocks"]["layers_3"]["self_attn"]["q_proj"]["kernel"][1],
                                  params["layers_7"]["self_attn"]["q_proj"]["kernel"])
    # The scanned model's own params tree is exactly this layout.
    model = Qwen3NextForCausalLM(cfg, scan_layers=True)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    assert jax.tree.map(lambda x: x.shape, shapes["params"]) == \
        jax.tree.map(lambda x: x.shape, stacked)
    back = unstack_layers(stacked, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="already in the scanned layout"):
        stack_layers(stacked, cfg)
    with pytest.raises(ValueError, match="params have no layers_5"):
        stack_layers({k: v for k, v in params.items() if k != "layers_5"}, cfg)


def test_scanned_layers_equal_unrolled_logits_hidden_and_grads():
    """Packed segments, per-layer remat inside the scan, router logits for the aux loss."""
    from qnext_jax.train import loss as L

    cfg = tiny_config(**SCAN_CFG)
    params = init_params(cfg, scale=0.1)  # at 0.3, 1e-7 input noise moves grads by 3e-4
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], jnp.int32)

    def run(model, p):
        def f(p):
            (logits, _, hidden), state = model.apply(
                {"params": p}, ids, segment_ids=seg, output_hidden_states=True,
                mutable=["intermediates"])
            ce, _ = L.cross_entropy_sum(logits, jnp.roll(ids, -1, axis=1), seg > 0)
            router = L.collect_router_logits(state["intermediates"], cfg)
            assert sum(math.prod(r.shape[:-2]) for r in router) == 4  # the MoE layers
            aux = L.load_balancing_loss(router, cfg.num_experts, cfg.num_experts_per_tok,
                                        seg > 0)
            return ce + aux, (logits, hidden)
        return jax.jit(jax.value_and_grad(f, has_aux=True))(p)

    unrolled = Qwen3NextForCausalLM(cfg, precision=HIGHEST)
    scanned = Qwen3NextForCausalLM(cfg, precision=HIGHEST, scan_layers=True, remat="dots")
    (loss0, (logits0, hidden0)), grads0 = run(unrolled, params)
    (loss1, (logits1, hidden1)), grads1 = run(scanned, stack_layers(params, cfg))
    assert float(loss1) == pytest.approx(float(loss0), rel=1e-6)
    assert len(hidden1) == len(hidden0) == cfg.num_hidden_layers + 2
    for a, b in zip((logits1, *hidden1), (logits0, *hidden0), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(np.asarray(b)).max()))
    grads1 = unstack_layers(grads1, cfg)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads1)[0],
                            jax.tree.leaves(grads0), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(np.abs(b).max()),
                                   err_msg=jax.tree_util.keystr(path))
    # The remat policy applies to each of the P layers inside the scan's body.
    jaxpr = jax.make_jaxpr(lambda p: scanned.apply({"params": p}, ids))(stack_layers(params, cfg))
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert sum(e.primitive.name.startswith(("remat", "checkpoint"))
               for e in scan.params["jaxpr"].eqns) == 4


def test_scan_layers_rejects_non_periodic_patterns():
    cfg = tiny_config(**{**SCAN_CFG, "mlp_only_layers": (1,)})  # layer 1 dense, layer 5 MoE
    with pytest.raises(ValueError, match="layer pattern that repeats"):
        scan_period(cfg)
    with pytest.raises(ValueError, match="layer pattern that repeats"):
        jax.eval_shape(Qwen3NextForCausalLM(cfg, scan_layers=True).init, jax.random.key(0),
                       jnp.zeros((1, 1), jnp.int32))
    with pytest.raises(ValueError, match="layer pattern that repeats"):
        stack_layers(init_params(cfg), cfg)
    with pytest.raises(ValueError, match="layer pattern that repeats"):
        init_cache(cfg, 1, 4, scan_layers=True)
    with pytest.raises(ValueError, match="layer pattern that repeats"):  # one period only
        scan_period(tiny_config(num_hidden_layers=4))
    cfg = tiny_config(**SCAN_CFG)
    with pytest.raises(ValueError, match="no 'blocks' entry"):
        unstack_layers(init_params(cfg), cfg)


# ------------------------------------------------------- scan over layer blocks, with a cache
def _close(got, ref, what: str, rel: float = 1e-5):
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0,
                               atol=rel * max(float(np.abs(ref).max()), 1e-30), err_msg=what)


def _greedy_run(fn, params, cache, prompt, mask, pieces, new: int):
    """Prefill ``prompt`` [B, T] in ``pieces`` (slot ranges) carrying ``cache``, then ``new``
    greedy decode steps. Returns (logits of every call, greedy tokens [B, new], cache)."""
    logits = []
    for a, b in pieces:
        out, cache = fn(params, jnp.asarray(prompt[:, a:b]), cache, jnp.asarray(mask[:, a:b]))
        logits.append(out)
    tokens = []
    ones = jnp.ones((prompt.shape[0], 1), jnp.int32)
    for _ in range(new):
        tokens.append(jnp.argmax(logits[-1][:, -1], -1).astype(jnp.int32))
        out, cache = fn(params, tokens[-1][:, None], cache, ones)
        logits.append(out)
    return logits, np.stack(tokens, axis=1), cache


@pytest.fixture(scope="module")
def two_periods():
    """Two periods of the 80B layer pattern (3 GDN + 1 attention): config, per-layer and stacked
    params, and the jitted unrolled and scanned models."""
    cfg = tiny_config(**SCAN_TWO_PERIODS)
    params = init_params(cfg, scale=0.1)
    return (cfg, params, stack_layers(params, cfg), _apply(cfg),
            _apply(cfg, scan_layers=True))


def test_scanned_cached_generation_equals_unrolled(two_periods):
    """The scanned model with its stacked cache against the unrolled model with the per-layer
    cache, same params, two periods of the 80B pattern (3 GDN + 1 attention): one-shot prefill
    + decode, chunked prefill (5 + 4) + decode, and a left-padded batch of unequal prompts
    (junk ids under the mask). Logits of every call within 1e-5 of max |logit|, identical greedy
    tokens, and the final cache, unstacked, equal to the per-layer one."""
    cfg, params, stacked, unrolled, scanned = two_periods
    B, T, S, NEW = 2, 9, 16, 3
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    padded = np.ones((B, T), np.int32)
    padded[0, :4] = 0  # row 0: a prompt of 5 behind 4 padded slots
    cases = {"one-shot": ([(0, T)], np.ones((B, T), np.int32)),
             "chunked": ([(0, 5), (5, T)], np.ones((B, T), np.int32)),
             "padded": ([(0, T)], padded)}
    for name, (pieces, mask) in cases.items():
        ref_logits, ref_tokens, ref_cache = _greedy_run(
            unrolled, params, init_cache(cfg, B, S), prompt, mask, pieces, NEW)
        got_logits, got_tokens, got_cache = _greedy_run(
            scanned, stacked, init_cache(cfg, B, S, scan_layers=True), prompt, mask, pieces,
            NEW)
        np.testing.assert_array_equal(got_tokens, ref_tokens, err_msg=name)
        for step, (a, b) in enumerate(zip(got_logits, ref_logits, strict=True)):
            _close(a, b, f"{name}: logits of call {step}")
        assert "blocks" in got_cache and "layers_0" not in got_cache
        got_cache = unstack_cache(got_cache, cfg)
        assert jax.tree.structure(got_cache) == jax.tree.structure(ref_cache)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got_cache)[0],
                                jax.tree.leaves(ref_cache), strict=True):
            _close(a, b, f"{name}: cache{jax.tree_util.keystr(path)}")


def test_scanned_model_continues_a_stacked_per_layer_cache_and_catches_wrong_layouts(two_periods):
    """A per-layer cache, stacked (stack_cache), continues in the scanned model exactly as in
    the unrolled one; the same cache with its blocks swapped (block b's state given to block
    1 - b) is far outside the tolerance of the equality tests, and a cache in the other
    layout is rejected."""
    cfg, params, stacked, unrolled, scanned = two_periods
    rng = np.random.default_rng(6)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    nxt = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 1)), jnp.int32)
    _, cache = unrolled(params, prompt, init_cache(cfg, 2, 12))
    ref, _ = unrolled(params, nxt, cache)
    got, _ = scanned(stacked, nxt, stack_cache(cache, cfg))
    _close(got, ref, "decode after stack_cache")
    swapped = stack_cache(cache, cfg)
    swapped["blocks"] = jax.tree.map(lambda x: x[::-1], swapped["blocks"])
    wrong, _ = scanned(stacked, nxt, swapped)
    err = float(jnp.max(jnp.abs(wrong - ref))) / float(jnp.max(jnp.abs(ref)))
    assert err > 1e-3, err  # 100x the 1e-5 tolerance: a layout slip cannot pass
    with pytest.raises(ValueError, match="needs the stacked cache"):
        scanned(stacked, nxt, cache)
    with pytest.raises(ValueError, match="needs the per-layer cache"):
        unrolled(params, nxt, stack_cache(cache, cfg))
    # The stacked layout: layer b * P + j at [b] of blocks/layers_j, round trip exact.
    stacked_cache = stack_cache(cache, cfg)
    np.testing.assert_array_equal(stacked_cache["blocks"]["layers_2"]["recurrent_state"][1],
                                  cache["layers_6"]["recurrent_state"])
    np.testing.assert_array_equal(stacked_cache["blocks"]["layers_3"]["key"][0],
                                  cache["layers_3"]["key"])
    assert jax.tree.map(lambda x: (x.shape, x.dtype), stacked_cache) == jax.tree.map(
        lambda x: (x.shape, x.dtype), init_cache(cfg, 2, 12, scan_layers=True))
    for a, b in zip(jax.tree.leaves(unstack_cache(stacked_cache, cfg)), jax.tree.leaves(cache),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_scanned_verify_forward_keeps_the_same_per_token_states(two_periods):
    """Speculative verification through the scan: a 3-token forward on a
    track_token_states cache gives the unrolled model's logits and, rolled back to each token
    (keep_token_state), its GDN conv and recurrent states."""
    cfg, params, stacked, unrolled, scanned = two_periods
    rng = np.random.default_rng(8)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    verify = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 3)), jnp.int32)
    _, cache = unrolled(params, prompt, init_cache(cfg, 2, 12))
    ref_logits, ref_cache = unrolled(params, verify, track_token_states(cache))
    got_logits, got_cache = scanned(stacked, verify, track_token_states(stack_cache(cache, cfg)))
    _close(got_logits, ref_logits, "verify logits")
    assert got_cache["blocks"]["layers_0"]["recurrent_states"].shape[:3] == (2, 2, 3)
    for a in range(3):
        ref = keep_token_state(ref_cache, jnp.int32(a))
        got = unstack_cache(keep_token_state(got_cache, jnp.int32(a)), cfg)
        assert jax.tree.structure(got) == jax.tree.structure(ref)
        for i in range(cfg.num_hidden_layers):
            for key, x in ref[f"layers_{i}"].items():
                _close(got[f"layers_{i}"][key], x, f"token {a}: layers_{i}/{key}")
    # Rolled back to token 1: the state of a plain forward over the first 2 tokens.
    _, plain = unrolled(params, verify[:, :2], cache)
    kept = keep_token_state(ref_cache, jnp.int32(1))
    for key in ("conv_state", "recurrent_state"):
        _close(kept["layers_4"][key], plain["layers_4"][key], f"rollback: {key}")


@pytest.mark.gpu
def test_gpu_single_row_projections_stay_dots_and_match_the_cpu():
    """On a GPU the 80B's out_proj for one token ([1, 4096] @ [4096, 2048], bf16) is a dot with
    layers.row_matmul and XLA's multiply + reduce without it (if XLA stops doing that, the
    workaround can go), and a batch-1 decode step matches the same step on the CPU (float32,
    highest precision)."""
    from qnext_jax.modeling import layers

    proj = layers.dense(2048, name="out_proj", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                        precision=None, std=0.02)
    x = jax.random.normal(jax.random.key(0), (1, 1, 4096), jnp.bfloat16)
    p = proj.init(jax.random.key(1), x)
    layers_on_gpu = layers._on_gpu
    try:
        for padded in (True, False):
            layers._on_gpu = lambda padded=padded: padded
            hlo = jax.jit(lambda p, x: proj.apply(p, x)).lower(p, x).compile().as_text()
            multiplies = [line for line in hlo.splitlines()
                          if " multiply(" in line and "dot_general" in line]
            assert bool(multiplies) != padded, (padded, multiplies[:2])
    finally:
        layers._on_gpu = layers_on_gpu

    cfg = tiny_config()
    params = init_params(cfg, scale=0.1)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 9)))
    fn = _apply(cfg)
    _, cache = fn(params, ids[:, :8], init_cache(cfg, 1, 16))
    gpu = fn(params, ids[:, 8:], cache)[0]
    # The CPU reference: jnp paths only (auto would pick GPU kernels: the backend is "gpu").
    model = Qwen3NextForCausalLM(cfg, precision=HIGHEST, gdn_impl="reference", moe_impl="gather",
                                 attn_impl="xla")
    step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
    cpu = jax.devices("cpu")[0]
    layers._on_gpu = lambda: False
    try:
        p_cpu, ids_cpu, c = jax.device_put((params, ids, init_cache(cfg, 1, 16)), cpu)
        _, c = step(p_cpu, ids_cpu[:, :8], c)
        ref = step(p_cpu, ids_cpu[:, 8:], c)[0]
    finally:
        layers._on_gpu = layers_on_gpu
    gpu, ref = np.asarray(gpu), np.asarray(ref)
    err = float(np.max(np.abs(gpu - ref)))
    assert err <= 1e-4 * float(np.max(np.abs(ref))), err
