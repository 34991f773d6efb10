"""The flash-attention path (``attn_impl="tokamax*"``, tokamax's kernels on GPU) on the CPU: its
wiring (cache layout, key mask as a bias, causal mask at each query's slot, padding queries)
with a stand-in for the kernels that follows tokamax's documented contract, and with tokamax's
own XLA implementation when tokamax is installed; the choice between paths and bad names."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SCAN_TWO_PERIODS, init_params, tiny_config
from np_reference import softmax

from qnext_jax.cache import init_cache
from qnext_jax.generate import Generator
from qnext_jax.modeling import Qwen3NextForCausalLM, attention

HIGHEST = jax.lax.Precision.HIGHEST


def contract_op(q, k, v, *, bias, is_causal, q_indices, logits_scale, precision=None):
    """tokamax's dot-product attention contract: q [B, T, H, D], k/v [B, S, Hkv, D] (query head
    h reads K/V head h // (H / Hkv)), softmax(logits_scale * q k^T + bias) with key s hidden
    from query t when s > q_indices[t] (is_causal)."""
    assert is_causal
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k, precision=HIGHEST) * logits_scale + bias
    visible = jnp.arange(k.shape[1])[None, :] <= q_indices[0, 0][:, None]  # [T, S]
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, v, precision=HIGHEST).astype(q.dtype)


def _tokamax_xla_op():
    """tokamax's XLA dot-product attention (its reference implementation), or skip."""
    pytest.importorskip("tokamax")
    from tokamax._src.ops.attention.base import DotProductAttention

    return DotProductAttention()


OPS = {"contract": lambda: contract_op, "tokamax_xla": _tokamax_xla_op}


class Counted:
    """An op that counts its calls (each trace of the flash path calls it once)."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.op(*args, **kwargs)


@pytest.fixture(params=[("contract", -jnp.inf), ("contract", -1e30), ("tokamax_xla", -jnp.inf)],
                ids=["contract-inf", "contract-finite", "tokamax-xla"])
def flash_op(request, monkeypatch):
    """Route flash_attention to a CPU op, with the masked-key bias of the Mosaic GPU (-inf) or
    the Triton (finite) kernel."""
    name, masked = request.param
    op = Counted(OPS[name]())
    monkeypatch.setattr(attention, "_flash_ops", lambda impl: [(op, masked)])
    return op


def test_flash_attention_matches_float64(flash_op, rng):
    """GQA over a cache with left padding, a hole (a masked tail of an earlier chunk) and a
    query offset, at odd sizes; padding queries are the caller's."""
    B, T, S, H, Hkv, D, start = 2, 7, 23, 6, 2, 8, 11
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)  # the cache layout
    v = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    valid = np.arange(S)[None, :] < start + T
    valid = np.repeat(valid, B, 0)
    valid[1, :4] = False  # left padding
    valid[1, 7:9] = False  # a hole before the new tokens
    q_slot = start + np.arange(T, dtype=np.int32)
    out = attention.flash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                    jnp.asarray(valid), jnp.asarray(q_slot), 0.3)
    G = H // Hkv
    logits = np.einsum("bthd,bhsd->bhts", q.astype(np.float64), np.repeat(k, G, 1)) * 0.3
    mask = valid[:, None, None, :] & (np.arange(S)[None, :] <= q_slot[:, None])
    probs = softmax(np.where(mask, logits, -np.inf))
    ref = np.einsum("bhts,bhsd->bthd", probs, np.repeat(v, G, 1))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)


def test_model_flash_path_equals_xla_path(flash_op):
    """Cached prefill of a left-padded batch in chunks (masked tails), then decode: the same
    logits through the flash path as through the XLA softmax, and the same greedy tokens. Eight
    layers: the padding queries' rows (NaN from a kernel when unmasked) feed later layers."""
    cfg = tiny_config(num_hidden_layers=8)
    params = init_params(cfg, seed=4)
    rng = np.random.default_rng(9)
    ids = rng.integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.int32)
    mask[1, :5] = 0

    def prefill(impl):
        model = Qwen3NextForCausalLM(cfg, attn_impl=impl)
        cache = init_cache(cfg, 2, 16)
        logits, _ = model.apply({"params": params}, jnp.asarray(ids), cache=cache,
                                attention_mask=jnp.asarray(mask))
        return np.asarray(logits)

    flash, calls = prefill("tokamax"), flash_op.calls
    assert calls == 2  # the two attention layers
    assert np.isfinite(flash).all()
    valid = mask.astype(bool)
    np.testing.assert_allclose(flash[valid], prefill("xla")[valid], rtol=2e-5, atol=2e-5)
    assert flash_op.calls == calls  # xla: no flash call
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 8)]
    ref = Generator(cfg, attn_impl="xla").generate(params, prompts, max_new_tokens=4).tokens
    gen = Generator(cfg, attn_impl="tokamax", prefill_chunk_size=3)
    np.testing.assert_array_equal(gen.generate(params, prompts, max_new_tokens=4).tokens, ref)
    assert flash_op.calls > calls


def test_scan_and_speculative_flash_path_equals_xla_path(monkeypatch):
    """The layer scan with the MTP head and speculative decoding (verification of 3 tokens over
    the cache): the flash path is taken and gives the XLA path's greedy tokens."""
    op = Counted(contract_op)
    monkeypatch.setattr(attention, "_flash_ops", lambda impl: [(op, -jnp.inf)])
    cfg = tiny_config(**SCAN_TWO_PERIODS)
    params = init_params(cfg, seed=6)
    prompts = [np.random.default_rng(2).integers(0, cfg.vocab_size, n).tolist() for n in (4, 6)]
    kw = {"speculative_tokens": 2, "scan_layers": True}
    ref = Generator(cfg, attn_impl="xla", **kw).generate(params, prompts, max_new_tokens=6)
    assert op.calls == 0
    out = Generator(cfg, attn_impl="tokamax", **kw).generate(params, prompts, max_new_tokens=6)
    assert op.calls > 0
    np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_auto_choice(monkeypatch):
    """auto: flash for multi-token bf16/fp16 calls with a cache on a GPU with tokamax's GPU ops
    (under a mesh too: the kernel runs per shard); XLA on the CPU, without a cache (training),
    for one token (decode), float32, or when tokamax.ops.gpu does not import (as without
    jax-triton). An explicit tokamax impl takes every multi-token cached call."""
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(attention, "_import_flash", lambda: (object(), None))  # installed
    assert not attention._use_flash("auto", jnp.bfloat16, 64, cached=True)
    assert attention._use_flash("tokamax:triton", jnp.float32, 2, cached=True)
    for impl in ("tokamax", "xla"):
        assert not attention._use_flash(impl, jnp.bfloat16, 64, cached=False)
        assert not attention._use_flash(impl, jnp.bfloat16, 1, cached=True)
    assert not attention._use_flash("xla", jnp.bfloat16, 64, cached=True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention._use_flash("auto", jnp.bfloat16, 64, cached=True)
    assert attention._use_flash("auto", jnp.float16, 2, cached=True)
    assert not attention._use_flash("auto", jnp.bfloat16, 1, cached=True)
    assert not attention._use_flash("auto", jnp.float32, 64, cached=True)
    assert not attention._use_flash("auto", jnp.bfloat16, 64, cached=False)
    monkeypatch.setattr(attention, "_import_flash", lambda: (None, ImportError("jax_triton")))
    assert not attention._use_flash("auto", jnp.bfloat16, 64, cached=True)


TRITON_MASKED = float(np.float32(-1e30))  # the Triton kernel's masked-key bias, as recorded


class FakeKernel:
    """A tokamax attention op class that records the masked-key bias it got and can refuse."""

    log: list
    refuse = False

    def __call__(self, q, k, v, *, bias, **kwargs):
        self.log.append((type(self).__name__, float(jnp.min(bias))))
        if self.refuse:
            raise NotImplementedError("not on this GPU")
        return contract_op(q, k, v, bias=bias, **kwargs)


@pytest.mark.parametrize("hopper", [True, False])
def test_kernel_choice_and_masked_bias(monkeypatch, rng, hopper):
    """"tokamax": Mosaic GPU (bias -inf) on Hopper, Triton (bias -1e30) when Mosaic refuses the
    inputs or off Hopper; "tokamax:<kernel>" takes that kernel alone; nothing taking the inputs
    names both refusals; a non-tokamax impl is refused."""
    log = []
    mosaic = type("PallasMosaicFlashAttention", (FakeKernel,), {"log": log})
    triton = type("PallasTritonFlashAttention", (FakeKernel,), {"log": log})
    gpu = types.SimpleNamespace(PallasMosaicFlashAttention=mosaic,
                                PallasTritonFlashAttention=triton)
    monkeypatch.setattr(attention, "_import_flash", lambda: (gpu, None))
    monkeypatch.setattr(attention, "_is_hopper", lambda: hopper)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((1, 2, 2, 4), (1, 1, 5, 4), (1, 1, 5, 4)))
    valid, q_slot = jnp.arange(5)[None] > 0, jnp.arange(3, 5)
    args = (q, k, v, valid, q_slot, 0.5)
    ref = contract_op(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
                      bias=jnp.where(valid, 0.0, -jnp.inf)[:, None, None], is_causal=True,
                      q_indices=q_slot[None, None], logits_scale=0.5)
    np.testing.assert_allclose(np.asarray(attention.flash_attention(*args)), np.asarray(ref),
                               rtol=1e-6)
    first = ("PallasMosaicFlashAttention", -np.inf) if hopper else (
        "PallasTritonFlashAttention", TRITON_MASKED)
    assert log == [first]
    log.clear()
    attention.flash_attention(*args, impl="tokamax:mosaic")
    assert log == [("PallasMosaicFlashAttention", -np.inf)]
    log.clear()
    mosaic.refuse = True
    attention.flash_attention(*args)
    assert log == ([("PallasMosaicFlashAttention", -np.inf)] if hopper else []) + [
        ("PallasTritonFlashAttention", TRITON_MASKED)]
    triton.refuse = True
    with pytest.raises(NotImplementedError, match="PallasTritonFlashAttention: not on this"):
        attention.flash_attention(*args)
    with pytest.raises(ValueError, match="impl must be one of .*'tokamax:triton'.*'xla'"):
        attention.flash_attention(*args, impl="xla")


def test_unknown_attn_impl_is_named():
    cfg = tiny_config()
    model = Qwen3NextForCausalLM(cfg, attn_impl="flash")
    with pytest.raises(ValueError, match=r"attn_impl must be one of .*'tokamax:mosaic'.*'flash'"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32)))
    with pytest.raises(ValueError, match=r"attn_impl must be one of .*'flash'"):
        Generator(cfg, attn_impl="flash")


def test_tokamax_missing_names_the_install(monkeypatch):
    """An explicit tokamax impl off a GPU names the platform; on a GPU without tokamax's GPU
    ops (tokamax or jax-triton missing) it names the extra to install."""
    args = (jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 1, 3, 4)), jnp.zeros((1, 1, 3, 4)),
            jnp.ones((1, 3), bool), jnp.arange(2), 0.5, "tokamax")
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    with pytest.raises(ValueError, match="GPU kernels; this JAX's backend is cpu: use attn_impl"):
        attention.flash_attention(*args)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "_import_flash",
                        lambda: (None, ModuleNotFoundError("No module named 'jax_triton'")))
    with pytest.raises(ImportError, match=r"tokamax and jax-triton .*qnext-jax\[gpu\]"):
        attention.flash_attention(*args)
