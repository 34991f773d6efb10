"""YaRN rotary tables against transformers' (``ROPE_INIT_FUNCTIONS['yarn']`` and
``Qwen3NextRotaryEmbedding``) up to position 1,010,000, and ``qnext generate --rope-scaling``."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import hf_config

from qnext_jax.cli import main as qnext_main
from qnext_jax.cli import parse_rope_scaling
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling.rope import rope_cos_sin, rope_inv_freq

# 80B's rope (theta 1e7, head_dim 256, partial 0.25) with Qwen's recommended 1M extension; a
# variant with mscale / mscale_all_dim, explicit betas and no truncation; an explicit factor.
CASES = {
    "qwen_1m": ({"factor": 4.0, "original_max_position_embeddings": 262144},
                {"rope_theta": 1e7, "head_dim": 256, "max_position_embeddings": 1010000}),
    "mscale_betas_untruncated": ({"factor": 8.0, "original_max_position_embeddings": 32768,
                                  "mscale": 0.8, "mscale_all_dim": 0.5, "beta_fast": 16.0,
                                  "beta_slow": 2.0, "truncate": False},
                                 {"rope_theta": 1e6, "head_dim": 128, "max_position_embeddings": 262144}),
    "attention_factor": ({"factor": 2.0, "original_max_position_embeddings": 4096,
                          "attention_factor": 1.25}, {"rope_theta": 1e4, "head_dim": 64,
                                                          "partial_rotary_factor": 0.5}),
}
POSITIONS = np.unique(np.concatenate([
    np.arange(0, 64), [262143, 262144, 262145, 524288, 1000000, 1009999, 1010000],
    np.random.default_rng(0).integers(0, 1010001, 400)]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_yarn_matches_transformers_to_1m_positions(case):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding

    scaling, overrides = CASES[case]
    hf = hf_config({"rope_scaling": {"rope_type": "yarn", **scaling}, **overrides})
    ours = Qwen3NextConfig.from_dict(hf.to_dict())  # through the v5 rope_parameters form
    assert ours.rope_scaling_params["rope_type"] == "yarn"
    ref = Qwen3NextRotaryEmbedding(hf)
    inv_freq, attention_factor = rope_inv_freq(ours)
    ref_inv_freq = ref.inv_freq.numpy()
    # The same float32 formula; torch's pow and division may round the last bits differently
    # from numpy's (torch 2.14 did at 2 and 4 of the entries of two cases: 1e-7 and 2e-7).
    np.testing.assert_allclose(inv_freq, ref_inv_freq, rtol=5e-7, atol=0)
    assert attention_factor == pytest.approx(ref.attention_scaling, rel=1e-12)

    cos_ref, sin_ref = ref(torch.zeros(1), torch.as_tensor(POSITIONS[None]))
    cos, sin = rope_cos_sin(ours, jnp.asarray(POSITIONS[None], jnp.int32), jnp.float32)
    cos, sin, cos_ref, sin_ref = (np.asarray(x)[0] for x in (cos, sin, cos_ref, sin_ref))
    # Both take the float32 product position * inv_freq and its float32 cos / sin. Ours: within
    # float32 rounding of the float64 cos / sin of its own angle (up to ~1e6 rad). Against
    # transformers': that, plus the angles' difference from the inverse frequencies' last bits
    # (|d cos|, |d sin| <= |d angle|; 0.036 at a million positions).
    pos = POSITIONS[:, None].astype(np.float32)
    angle, ref_angle = (np.concatenate([pos * f, pos * f], axis=-1).astype(np.float64)
                        for f in (inv_freq.astype(np.float32), ref_inv_freq))
    tol = 4e-7 * attention_factor
    np.testing.assert_allclose(cos, np.cos(angle) * attention_factor, rtol=0, atol=tol)
    np.testing.assert_allclose(sin, np.sin(angle) * attention_factor, rtol=0, atol=tol)
    slack = attention_factor * np.abs(angle - ref_angle) + tol
    assert np.all(np.abs(cos - cos_ref) <= slack) and np.all(np.abs(sin - sin_ref) <= slack)


def test_yarn_from_v4_flat_config_equals_v5():
    flat = {**hf_config().to_dict(), "rope_theta": 1e7, "partial_rotary_factor": 0.25,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                             "original_max_position_embeddings": 262144}}
    flat.pop("rope_parameters", None)
    v4 = Qwen3NextConfig.from_dict(flat)
    v5 = Qwen3NextConfig.from_dict(hf_config(
        {"rope_theta": 1e7, "rope_scaling": CASES["qwen_1m"][0] | {"rope_type": "yarn"}}
    ).to_dict())
    np.testing.assert_array_equal(rope_inv_freq(v4)[0], rope_inv_freq(v5)[0])


def test_parse_rope_scaling():
    assert parse_rope_scaling("yarn:factor=4,original_max_position_embeddings=262144") == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
    assert parse_rope_scaling('{"rope_type": "yarn", "factor": 2}') == {"rope_type": "yarn",
                                                                       "factor": 2}
    assert parse_rope_scaling("yarn:factor=2,truncate=false")["truncate"] is False
    assert parse_rope_scaling("none") is None
    for bad in ("yarn:factor", "{not json", "yarn:factor=x"):
        with pytest.raises(SystemExit, match="--rope-scaling"):
            parse_rope_scaling(bad)


def test_cli_rope_scaling_changes_the_model(capsys):
    from qnext_jax import generate
    from qnext_jax.demo import demo_model

    spec = "yarn:factor=8,original_max_position_embeddings=16"
    assert qnext_main(["generate", "--token-ids", "5,6,7,8,9", "--max-new-tokens", "3",
                       "--rope-scaling", spec, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rope_scaling"] == parse_rope_scaling(spec)
    config, params = demo_model()
    config = config.replace(rope_scaling=parse_rope_scaling(spec))
    ref = generate(config, params, np.asarray([[5, 6, 7, 8, 9]]), max_new_tokens=3)
    assert out["token_ids"] == ref[0][:len(out["token_ids"])].tolist()
