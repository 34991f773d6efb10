"""The whole model against transformers' Qwen3NextForCausalLM on the same weights (float32).

Each config: transformers builds and saves a random checkpoint; ``qnext convert`` turns it into
an Orbax checkpoint; logits of a batch must agree within 1e-4 * max |logit|, every layer's
hidden state must be close, and 32 greedy tokens from ``qnext generate`` (and from the Python
API on a batch) must equal transformers' ``generate``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import build_hf_model

from qnext_jax import generate, load
from qnext_jax.cli import main as qnext_main
from qnext_jax.crosscheck import LOGIT_RTOL, compare, hf_forward, jax_forward

CONFIGS = {
    # The 80B layout scaled down: Hv = 2 Hk, 8:1 query:kv heads, full attention every 4th layer,
    # top-4 of 16 experts; saved in shards so the index path is used.
    "80b_ratios_sharded": ({}, "30KB"),
    # Dense MLP layers from mlp_only_layers and decoder_sparse_step = 2.
    "mlp_only_sparse_step2": ({"mlp_only_layers": [0], "decoder_sparse_step": 2}, None),
    # No renormalisation of the top-k weights, tied embeddings, attention biases.
    "no_topk_norm_tied_bias": ({"norm_topk_prob": False, "tie_word_embeddings": True,
                                "attention_bias": True}, None),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    overrides, shard = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = build_hf_model(overrides, seed=len(request.param))
    kw = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(root / "hf", **kw)
    if shard is not None:
        assert (root / "hf" / "model.safetensors.index.json").exists()
    assert qnext_main(["convert", str(root / "hf"), str(root / "orbax")]) == 0
    return request.param, model, root


def test_logits_and_hidden_states_match_transformers(converted):
    name, _, root = converted
    config, params = load(root / "orbax")
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 29))
    hf_hidden, hf_logits = hf_forward(root / "hf", ids)
    our_hidden, our_logits = jax_forward(config, params, ids)
    report = compare(hf_hidden, hf_logits, our_hidden, our_logits)
    print(f"\n[{name}]\n{report.table()}")
    rows = [r.split(" | ")[0].lstrip("| ") for r in report.table().splitlines()[2:]]
    L = config.num_hidden_layers
    assert rows[:L + 2] == ["embeddings", *(f"layer {i}" for i in range(L - 1)),
                            f"layer {L - 1} + final norm", "logits"]
    assert report.logits_rel <= LOGIT_RTOL, report.table()
    assert report.greedy_equal
    for diff, scale in zip(report.hidden_max_abs, report.hidden_scale):
        assert diff <= 1e-4 * max(scale, 1.0), report.table()


def test_greedy_generation_matches_transformers(converted, capsys):
    _, model, root = converted
    config, params = load(root / "orbax")
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(prompt), max_new_tokens=32, do_sample=False,
                             attention_mask=torch.ones(prompt.shape, dtype=torch.long))
    ref = ref[:, prompt.shape[1]:].numpy()
    assert ref.shape == (2, 32)

    capsys.readouterr()
    assert qnext_main(["generate", "--checkpoint", str(root / "orbax"), "--token-ids",
                       ",".join(map(str, prompt[0])), "--max-new-tokens", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["token_ids"] == ref[0].tolist()

    with jax.default_matmul_precision("highest"):
        ours = generate(config, params, jnp.asarray(prompt), max_new_tokens=32)
    np.testing.assert_array_equal(ours, ref)


def test_cli_crosscheck_without_torch_names_the_extra(monkeypatch):
    """Without torch / transformers (a plain `pip install -e .`) the command says which extra to
    install, in one line, rather than a ModuleNotFoundError traceback."""
    import qnext_jax.crosscheck

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'torch'")

    monkeypatch.setattr(qnext_jax.crosscheck, "crosscheck", missing)
    with pytest.raises(SystemExit, match=r"qnext crosscheck: needs torch and transformers "
                                         r"\(No module named 'torch'\): pip install -e "
                                         r"'\.\[crosscheck\]'"):
        qnext_main(["crosscheck", "some_dir"])


def test_cli_crosscheck_of_a_converted_checkpoint_says_to_export_it(tmp_path):
    """crosscheck runs transformers on an HF checkpoint: given a converted one it says so, in
    one line naming the export."""
    (tmp_path / "params_index.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"qnext crosscheck: .* a converted checkpoint; "
                                         r"crosscheck runs transformers on an HF checkpoint: "
                                         r"export it first \(qnext export "):
        qnext_main(["crosscheck", str(tmp_path)])
