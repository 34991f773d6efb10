"""Qwen3NextConfig from HF config.json (v4 flat and v5 forms), the 80B preset, errors."""

from __future__ import annotations

import json

import pytest

from qnext_jax.config import ConfigError, Qwen3NextConfig

# Facts of the released Qwen3-Next-80B-A3B-Instruct config.json (v4 flat form).
RELEASED_80B = {
    "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 16,
    "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "vocab_size": 151936, "rope_theta": 10000000,
    "partial_rotary_factor": 0.25, "full_attention_interval": 4, "intermediate_size": 5120,
    "max_position_embeddings": 262144, "eos_token_id": 151645, "tie_word_embeddings": False,
}


def test_80b_preset():
    cfg = Qwen3NextConfig.from_preset("qwen3-next-80b-a3b")
    for k, v in RELEASED_80B.items():
        assert getattr(cfg, k) == v, k
    assert cfg.rotary_dim == 64
    assert cfg.layer_types.count("full_attention") == 12
    assert [i for i in range(48) if cfg.is_full_attention(i)] == list(range(3, 48, 4))
    assert all(cfg.is_sparse_moe(i) for i in range(48))
    assert cfg.linear_conv_dim == 8192


def _v4(**kw):
    raw = {"model_type": "qwen3_next", **RELEASED_80B, "num_hidden_layers": 8,
           "rope_scaling": None, "mlp_only_layers": [], "decoder_sparse_step": 1}
    raw.update(kw)
    return raw


def test_v4_flat_and_v5_forms_agree(tmp_path):
    v4 = _v4(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 262144})
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "partial_rotary_factor",
                                                   "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000000,
                             "partial_rotary_factor": 0.25, "factor": 4.0,
                             "original_max_position_embeddings": 262144}
    v5["layer_types"] = ["linear_attention"] * 3 + ["full_attention"] + \
        ["linear_attention"] * 3 + ["full_attention"]
    (tmp_path / "config.json").write_text(json.dumps(v5))
    a, b = Qwen3NextConfig.from_dict(v4), Qwen3NextConfig.from_hf(tmp_path)
    assert a.layer_types == b.layer_types
    assert a.rope_theta == b.rope_theta and a.partial_rotary_factor == b.partial_rotary_factor
    assert a.rope_scaling_params["factor"] == b.rope_scaling_params["factor"] == 4.0
    assert b.rope_scaling_params["rope_type"] == "yarn"


def test_explicit_layer_types_sparse_step_and_mlp_only():
    cfg = Qwen3NextConfig.from_dict(_v4(
        layer_types=["full_attention", "linear_attention"] * 4, decoder_sparse_step=2,
        mlp_only_layers=[3]))
    assert cfg.is_full_attention(0) and not cfg.is_full_attention(1)
    assert [i for i in range(8) if cfg.is_sparse_moe(i)] == [1, 5, 7]


def test_round_trip_through_to_dict():
    cfg = Qwen3NextConfig.from_dict(_v4(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    assert Qwen3NextConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("change,field", [
    ({"model_type": "qwen3_moe"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"linear_num_value_heads": 24, "linear_num_key_heads": 16}, "linear_num_value_heads"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),
    ({"layer_types": ["sliding_attention"] * 8}, "layer_types"),
    ({"num_experts_per_tok": 600}, "num_experts_per_tok"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling"),  # no factor
    ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "yarn", "factr": 4.0, "factor": 4.0}}, "rope_scaling"),
])
def test_bad_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        Qwen3NextConfig.from_dict(_v4(**change))


def test_misspelt_rope_key_is_named():
    """A misspelt 'factor' (and so no factor) names the unknown key, not the missing factor."""
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['factr'\] for rope_type 'yarn'"):
        Qwen3NextConfig.from_dict(_v4(rope_scaling={"rope_type": "yarn", "factr": 4.0}))


def test_missing_required_field_is_named(tmp_path):
    raw = _v4()
    del raw["linear_key_head_dim"]
    with pytest.raises(ConfigError, match="linear_key_head_dim"):
        Qwen3NextConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen3NextConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3NextConfig.from_hf(tmp_path)
