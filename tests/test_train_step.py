"""Train step: AdamW + schedule + clipping, accumulation, remat, freezing; loss goes down."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import init_params, tiny_config

from qnext_jax.train.optimizer import OptimizerConfig, make_schedule, trainable_mask
from qnext_jax.train.step import TrainConfig, Trainer


def _repeated_text_batch(cfg, B=2, T=32):
    text = np.array([(7 * i) % 23 + 3 for i in range(11)], np.int32)  # period-11 "text"
    row = np.tile(text, T // len(text) + 2)
    ids = np.stack([row[i:i + T] for i in range(B)])
    targets = np.stack([row[i + 1:i + T + 1] for i in range(B)])
    return {"input_ids": ids, "targets": targets, "loss_mask": np.ones((B, T), np.float32)}


def test_step_compiles_once_for_loaded_params():
    """Params committed to a device (as ``load`` returns them): the second step reuses the
    first step's executable."""
    cfg = tiny_config(num_hidden_layers=1)
    params = jax.device_put(init_params(cfg), jax.devices()[0])
    trainer = Trainer(cfg, OptimizerConfig(total_steps=3), TrainConfig(gdn_impl="reference"))
    state = trainer.init_state(params)
    batch = _repeated_text_batch(cfg, T=16)
    for _ in range(2):
        state, _ = trainer.step(state, batch)
    assert trainer._step._cache_size() == 1


def test_schedule_warmup_cosine():
    s = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110,
                                      min_lr_ratio=0.1))
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cosine midpoint
    assert float(s(110)) == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("gdn_impl", ["reference", pytest.param("auto", marks=pytest.mark.gpu)])
def test_loss_decreases_over_30_steps(gdn_impl):
    """bf16 compute, float32 master params and Adam state, per-layer remat, 2 micro-batches; on
    a GPU also with auto's kernels (the GDN's Triton forward and backward, tokamax's grouped
    matmul for the MoE where installed: its unwritten weight-gradient rows once made the
    experts' weights NaN after one step)."""
    cfg = tiny_config(num_hidden_layers=2, full_attention_interval=2)  # GDN + attention
    trainer = Trainer(cfg, OptimizerConfig(learning_rate=3e-3, warmup_steps=3, total_steps=30,
                                           weight_decay=0.01, clip_norm=1.0),
                      TrainConfig(compute_dtype="bfloat16", remat="full", grad_accum=2,
                                  gdn_impl=gdn_impl))
    state = trainer.init_state(init_params(cfg, scale=0.1), seed=0)
    batch = _repeated_text_batch(cfg)
    losses = []
    for _ in range(30):
        state, m = trainer.step(state, batch)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses))
    assert float(m["aux"]) >= cfg.num_experts_per_tok * 0.99  # router logits sown under remat
    assert state["params"]["layers_0"]["linear_attn"]["A_log"].dtype == np.float32
    assert jax.tree_util.tree_leaves(state["opt_state"])[1].dtype == np.float32
    assert int(state["step"]) == 30
    assert losses[-1] < 0.35 * losses[0], losses


def test_accumulation_remat_and_freezing_match_one_big_batch():
    """One step with 2 micro-batches and remat="dots" gives the params of one step on the whole
    batch without remat (aux loss off: it is per micro-batch by design); with train="attention"
    only the mixers' params move."""
    cfg = tiny_config(num_hidden_layers=2, full_attention_interval=2)
    params = init_params(cfg, scale=0.1)
    batch = _repeated_text_batch(cfg, B=2, T=16)
    batch["loss_mask"][1, :5] = 0  # uneven token counts per micro-batch
    # Adam's first step is lr * g / (|g| + eps): with eps well above the gradients' summation
    # noise, elements whose gradient is near zero move by a tiny, smooth amount (with eps 1e-8
    # one element of 4096 moved by 4% of lr more in one run than the other: a sign flip of noise).
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, train="attention",
                          eps=1e-3)
    out = []
    for accum, remat in ((1, "none"), (2, "dots")):
        tr = Trainer(cfg, opt, TrainConfig(compute_dtype="float32", remat=remat,
                                           grad_accum=accum, aux_coef=0.0, gdn_impl="reference"))
        state, m = tr.step(tr.init_state(params), batch)
        out.append((jax.tree_util.tree_map(np.asarray, state["params"]), m))
    (p1, m1), (p2, m2) = out
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-4)
    mask = trainable_mask(params, "attention")
    for path, train in jax.tree_util.tree_flatten_with_path(mask)[0]:
        a, b, p0 = (np.asarray(_get(t, path)) for t in (p1, p2, params))
        # What summation-order noise is left: bound it by 1% of one step (lr).
        np.testing.assert_allclose(a, b, rtol=0, atol=0.01 * opt.learning_rate,
                                   err_msg=str(path))
        if train:
            assert not np.allclose(a, p0), path
        else:
            np.testing.assert_array_equal(a, p0, err_msg=str(path))


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_lora_trains_adapters_only_and_merges():
    """LoRA: the adapted model starts equal to the base (b = 0), only the adapters move, the
    loss goes down, and the exported params are W + (alpha / r) a b."""
    cfg = tiny_config(num_hidden_layers=2, full_attention_interval=2)
    params = init_params(cfg, scale=0.1)
    batch = _repeated_text_batch(cfg, B=2, T=16)
    tr = Trainer(cfg, OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10),
                 TrainConfig(compute_dtype="float32", lora_rank=4, lora_alpha=8.0, aux_coef=0.0,
                             gdn_impl="reference"))
    state = tr.init_state(params)
    experts = state["lora"]["layers_0"]["mlp"]["experts"]["gate_proj"]
    assert experts["a"].shape == (cfg.num_experts, cfg.hidden_size, 4)
    assert "q_proj" in state["lora"]["layers_1"]["self_attn"]
    assert "norm" not in state["lora"]
    base_loss = float(tr.loss(params, batch))
    assert float(tr.loss(state, batch)) == pytest.approx(base_loss, rel=1e-6)
    for _ in range(5):
        state, _ = tr.step(state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(state["params"]),
                    jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(tr.loss(state, batch)) < 0.9 * base_loss
    merged = tr.export_params(state)
    lo = state["lora"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    expected = np.asarray(params["layers_1"]["self_attn"]["q_proj"]["kernel"], np.float64) + \
        2.0 * np.asarray(lo["a"], np.float64) @ np.asarray(lo["b"], np.float64)
    np.testing.assert_allclose(merged["layers_1"]["self_attn"]["q_proj"]["kernel"], expected,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["norm"]["weight"], params["norm"]["weight"])


def test_scan_layers_state_layout_weight_decay_and_lora():
    """With scan_layers the state holds the scanned layout (params, Adam state, LoRA adapters),
    the Trainer's params in and out are per layer, and weight decay skips stacked norms (the
    scanned loss and grads equal the unrolled ones: test_modeling)."""
    from qnext_jax.modeling.decoder import stack_layers
    from qnext_jax.train.optimizer import make_optimizer

    cfg = tiny_config(num_hidden_layers=4, full_attention_interval=2)  # period 2, 2 blocks
    params = init_params(cfg, scale=0.1)
    opt = OptimizerConfig(learning_rate=0.1, weight_decay=0.5, clip_norm=None)
    tr = Trainer(cfg, opt, TrainConfig(scan_layers=True, lora_rank=2))
    state = tr.init_state(params)
    assert "layers_0" not in state["params"]
    assert state["params"]["blocks"]["layers_0"]["input_layernorm"]["weight"].shape == \
        (2, cfg.hidden_size)
    a = state["lora"]["blocks"]["layers_1"]["self_attn"]["q_proj"]["kernel"]["a"]
    assert a.shape == (2, cfg.hidden_size, 2)
    assert jax.tree.map(lambda x: x.shape, tr.abstract_state(params)) == \
        jax.tree.map(lambda x: x.shape, state)
    exported = tr.export_params(state)  # b = 0: the merged params are the base params
    assert jax.tree.structure(exported) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # AdamW on the stacked layout: zero gradients leave only the decay, on matrices only.
    stacked = stack_layers(params, cfg)
    tx = make_optimizer(opt, stacked)
    updates = jax.jit(lambda p: tx.update(jax.tree.map(jax.numpy.zeros_like, p), tx.init(p),
                                          p)[0])(stacked)
    blocks = updates["blocks"]["layers_0"]
    np.testing.assert_array_equal(blocks["input_layernorm"]["weight"], 0.0)
    np.testing.assert_array_equal(blocks["linear_attn"]["A_log"], 0.0)
    kernel = stacked["blocks"]["layers_0"]["linear_attn"]["out_proj"]["kernel"]
    np.testing.assert_allclose(blocks["linear_attn"]["out_proj"]["kernel"],
                               -0.1 * 0.5 * np.asarray(kernel), rtol=1e-6)
    with pytest.raises(ValueError, match="layer pattern that repeats"):
        Trainer(tiny_config(), opt, TrainConfig(scan_layers=True))
