"""Training loss: cross-entropy + router load-balancing loss (+ MTP) against transformers.

The reference is transformers' own ``Qwen3NextForCausalLM`` (float32, ``labels`` and
``output_router_logits=True``: mean shifted cross-entropy + router_aux_loss_coef *
``load_balancing_loss_func``) and its ``loss.backward()`` gradients, on the same weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_params, tiny_config
from hf_fixtures import build_hf_model

from qnext_jax.convert import load
from qnext_jax.convert import name_map as nm
from qnext_jax.modeling import Qwen3NextForCausalLM
from qnext_jax.train import loss as L


def test_load_balancing_loss_matches_transformers():
    import torch
    from transformers.models.qwen3_next.modeling_qwen3_next import load_balancing_loss_func

    rng = np.random.default_rng(0)
    B, T, E, k = 2, 5, 8, 3
    logits = [rng.standard_normal((B * T, E)).astype(np.float32) * 2 for _ in range(3)]
    mask = np.ones((B, T), np.int64)
    mask[1, 3:] = 0
    for m in (None, mask):
        ref = load_balancing_loss_func(tuple(torch.from_numpy(x) for x in logits), E, k,
                                       None if m is None else torch.from_numpy(m))
        ours = L.load_balancing_loss([jnp.asarray(x) for x in logits], E, k,
                                     None if m is None else jnp.asarray(m))
        np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)
        stacked = L.load_balancing_loss([jnp.stack(logits)], E, k,  # a scanned model's form
                                        None if m is None else jnp.asarray(m))
        np.testing.assert_allclose(float(stacked), float(ref), rtol=1e-6)
    # Uniform routing gives the minimum, k (f_e = k/E, P_e = 1/E).
    flat = L.load_balancing_loss([jnp.zeros((4, E))], E, k)
    assert float(flat) == pytest.approx(k, rel=1e-6)


def _relerr(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-30))


def test_loss_and_grads_match_transformers(tmp_path):
    """One batch (a right-padded row, ignored labels): our loss and every parameter's gradient
    equal PyTorch's loss.backward() within 1e-4 relative (aux loss on, coefficient 0.3)."""
    import torch

    model_t = build_hf_model({"router_aux_loss_coef": 0.3, "num_hidden_layers": 2,
                              "full_attention_interval": 2})  # GDN + attention layer
    # Slow decays (A in [0.02, 0.3], as in trained models): with the fixture's A in [1, 16)
    # the state dies within a token or two, dL/dA_log is ~1e-6 and float32 cancellation alone
    # makes it differ by ~1e-3 relative between any two implementations.
    with torch.no_grad():
        for n, p in model_t.named_parameters():
            if n.endswith("A_log"):
                p.copy_(torch.log(torch.linspace(0.02, 0.3, p.numel())))
    model_t.save_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    B, T = 2, 12
    ids = rng.integers(0, 256, (B, T)).astype(np.int64)
    attn = np.ones((B, T), np.int64)
    attn[1, 9:] = 0
    labels = np.where(attn == 1, ids, -100)
    labels[0, 4] = -100

    out = model_t(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn),
                  labels=torch.from_numpy(labels), output_router_logits=True)
    out.loss.backward()
    ref_loss = float(out.loss.detach())
    ref_aux = float(out.aux_loss.detach())
    grads_t = {n: p.grad.detach().numpy() for n, p in model_t.named_parameters()}

    config, params = load(tmp_path)
    assert config.router_aux_loss_coef == pytest.approx(0.3)
    model = Qwen3NextForCausalLM(config, gdn_impl="reference",
                                 precision=jax.lax.Precision.HIGHEST)
    batch = {k: jnp.asarray(v) for k, v in L.batch_from_labels(ids, labels, attn).items()}
    (loss, terms), grads = jax.jit(jax.value_and_grad(
        lambda p: L.loss_fn(p, model, batch), has_aux=True))(params)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert float(terms["aux"]) == pytest.approx(ref_aux, rel=1e-5)

    fused = set(nm.moe_prefixes(config))
    checked = 0
    for leaf in nm.name_map(config, fused_experts=fused):
        expected = leaf.assemble(lambda n, i: grads_t[n] if i is None else grads_t[n][i])
        got = grads
        for key in leaf.path:
            got = got[key]
        err = _relerr(got, expected)
        assert err < 1e-4, f"{leaf.key}: relative grad error {err:.2e}"
        checked += 1
    assert checked == len(jax.tree_util.tree_leaves(grads))


def test_mtp_loss_counts_token_after_next():
    """The MTP term is the CE of the MTP head's logits for token i+2, over pairs of counted
    targets; checked against the head called directly."""
    cfg = tiny_config(num_hidden_layers=2, mtp_num_hidden_layers=1)
    params = init_params(cfg, scale=0.2)
    model = Qwen3NextForCausalLM(cfg, gdn_impl="reference")
    rng = np.random.default_rng(2)
    ids = rng.integers(0, cfg.vocab_size, (1, 10)).astype(np.int32)
    labels = ids.copy()
    labels[0, 6] = -100
    batch = {k: jnp.asarray(v) for k, v in L.batch_from_labels(ids, labels).items()}

    @jax.jit
    def run(p):
        terms = L.loss_terms(model, p, batch, mtp=True)
        _, _, hidden = model.apply({"params": p}, batch["input_ids"], output_hidden_states=True)
        pos = jnp.arange(10)[None]
        logits, _, _ = model.apply({"params": p}, hidden[-1], batch["targets"], pos,
                                   method=model.mtp_logits)
        return terms, logits

    terms, logits = run(params)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[0], axis=-1)
    # position i predicts ids[i+2] from h_i and ids[i+1]; labels[6] ignored removes i = 4, 5
    pairs = [i for i in range(8) if i + 1 != 6 and i + 2 != 6]
    expected = -sum(float(logp[i, ids[0, i + 2]]) for i in pairs)
    assert float(terms["mtp_count"]) == len(pairs)
    assert float(terms["mtp_sum"]) == pytest.approx(expected, rel=1e-5)
