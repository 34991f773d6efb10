"""Qwen3-Next configuration: a frozen dataclass built from a Hugging Face ``config.json``.

Both serialisations that transformers writes are accepted:

* v4 "flat" form (the released Qwen3-Next-80B-A3B checkpoint): ``rope_theta``,
  ``partial_rotary_factor`` and ``rope_scaling`` at top level, no ``layer_types``
  (derived: layer i is full attention iff ``(i + 1) % full_attention_interval == 0``).
* v5 form: ``rope_parameters`` (``rope_theta``, ``partial_rotary_factor``, ``rope_type`` and
  the YaRN fields) and an explicit ``layer_types`` list.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

MODEL_TYPE = "qwen3_next"
PRESETS = {"qwen3-next-80b-a3b": "qwen3-next-80b-a3b.json"}

_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
)

# The keys of rope_scaling (or of v5's rope_parameters, which also carry rope_theta and
# partial_rotary_factor) that modeling/rope.py reads, per rope_type (HF's names).
_ROPE_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_ROPE_KEYS = {
    "default": _ROPE_COMMON,
    "linear": _ROPE_COMMON | {"factor"},
    "yarn": _ROPE_COMMON | {"factor", "original_max_position_embeddings", "beta_fast",
                            "beta_slow", "truncate", "attention_factor", "mscale",
                            "mscale_all_dim"},
}


class ConfigError(ValueError):
    """A config.json that does not describe a valid Qwen3-Next model."""


def read_config_json(path: str | Path) -> dict:
    """The raw dict of an HF ``config.json`` (a file, or a directory holding one).

    Raises:
      ConfigError: no such file, or not JSON (naming the file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


@dataclasses.dataclass(frozen=True)
class Qwen3NextConfig:
    """Hyper-parameters of a Qwen3-Next model (field names and defaults as in transformers).

    Sizes are counts of elements; ``layer_types[i]`` is ``"linear_attention"`` (Gated DeltaNet)
    or ``"full_attention"`` (gated softmax attention).
    """

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    rope_scaling: tuple | None = None  # the HF dict, frozen as sorted (key, value) pairs
    attention_bias: bool = False
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 10
    num_experts: int = 512
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: tuple[int, ...] = ()
    layer_types: tuple[str, ...] = ()
    full_attention_interval: int = 4
    mtp_num_hidden_layers: int = 0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        if not self.layer_types:
            interval = self.full_attention_interval
            types = tuple(
                "full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)
            )
            object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if isinstance(self.rope_scaling, dict):
            frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                  for k, v in self.rope_scaling.items()))
            object.__setattr__(self, "rope_scaling", frozen)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._validate()

    # ----------------------------------------------------------------------------- validation
    def _validate(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config field {field!r}: {msg}")

        for name in _REQUIRED + ("head_dim", "linear_conv_kernel_dim"):
            need(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"must divide num_attention_heads ({self.num_attention_heads}), "
            f"got {self.num_key_value_heads}",
        )
        need(
            self.linear_num_value_heads % self.linear_num_key_heads == 0,
            "linear_num_value_heads",
            f"must be a multiple of linear_num_key_heads ({self.linear_num_key_heads}), "
            f"got {self.linear_num_value_heads}",
        )
        need(
            len(self.layer_types) == self.num_hidden_layers,
            "layer_types",
            f"has {len(self.layer_types)} entries, expected num_hidden_layers = "
            f"{self.num_hidden_layers}",
        )
        bad = sorted({t for t in self.layer_types} - {"full_attention", "linear_attention"})
        need(not bad, "layer_types", f"unknown layer type(s) {bad}; expected "
             "'full_attention' or 'linear_attention'")
        need(self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
             "partial_rotary_factor",
             f"head_dim * partial_rotary_factor = {self.rotary_dim} must be even and in "
             f"(0, head_dim = {self.head_dim}]")
        if self.num_experts > 0:
            need(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                 f"must be in [1, num_experts = {self.num_experts}], got {self.num_experts_per_tok}")
            need(self.decoder_sparse_step > 0, "decoder_sparse_step", "must be positive")
        if self.hidden_act != "silu":
            raise ConfigError(f"config field 'hidden_act': only 'silu' is supported, got "
                              f"{self.hidden_act!r}")
        if self.rope_scaling is not None:
            params = self.rope_scaling_params
            kind = params.get("rope_type", params.get("type"))
            need(kind in _ROPE_KEYS, "rope_scaling",
                 f"rope_type {kind!r} is not supported (expected 'yarn', 'linear' or 'default')")
            unknown = sorted(set(params) - _ROPE_KEYS[kind])  # first: a misspelt 'factor'
            need(not unknown, "rope_scaling", f"unknown key(s) {unknown} for rope_type {kind!r}; "
                 f"expected some of {sorted(_ROPE_KEYS[kind])}")
            if kind in ("yarn", "linear"):
                factor = params.get("factor")
                need(isinstance(factor, (int, float)) and not isinstance(factor, bool)
                     and factor >= 1, "rope_scaling",
                     f"rope_type {kind!r} needs a number 'factor' >= 1, got {factor!r}")

    # ------------------------------------------------------------------------- derived sizes
    @property
    def rope_scaling_params(self) -> dict | None:
        """``rope_scaling`` as the HF dict (None when absent)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the GDN depthwise conv: all q | all k | all v."""
        return (2 * self.linear_num_key_heads * self.linear_key_head_dim
                + self.linear_num_value_heads * self.linear_value_head_dim)

    def is_full_attention(self, layer: int) -> bool:
        return self.layer_types[layer] == "full_attention"

    def is_sparse_moe(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # ------------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Qwen3NextConfig":
        """Build from the dict of an HF config.json (v4 flat or v5 ``rope_parameters`` form).

        Raises:
          ConfigError: wrong ``model_type``, a missing required field, inconsistent head counts.
        """
        raw = dict(raw)
        if raw.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"config field 'model_type': expected {MODEL_TYPE!r}, got "
                              f"{raw.get('model_type')!r}")
        missing = [f for f in _REQUIRED if f not in raw]
        if missing:
            raise ConfigError(f"config is missing required field(s): {', '.join(missing)}")
        rope_params = raw.pop("rope_parameters", None)
        if rope_params:
            rope_params = dict(rope_params)
            raw.setdefault("rope_theta", rope_params.pop("rope_theta", 10000.0))
            raw.setdefault("partial_rotary_factor", rope_params.pop("partial_rotary_factor", 1.0))
            kind = rope_params.get("rope_type", "default")
            if kind != "default" and raw.get("rope_scaling") is None:
                raw["rope_scaling"] = rope_params
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw["dtype"]
        fields = {f.name for f in dataclasses.fields(cls)}
        nullable = {"rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id"}
        kwargs = {k: v for k, v in raw.items()
                  if k in fields and (v is not None or k in nullable)}
        for key in ("mlp_only_layers", "layer_types"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_hf(cls, path: str | Path) -> "Qwen3NextConfig":
        """Read an HF ``config.json`` (a file, or a directory holding one)."""
        return cls.from_dict(read_config_json(path))

    @classmethod
    def from_preset(cls, name: str) -> "Qwen3NextConfig":
        """A released configuration, e.g. ``"qwen3-next-80b-a3b"`` (Qwen3-Next-80B-A3B-Instruct)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        text = resources.files("qnext_jax.presets").joinpath(PRESETS[name]).read_text()
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        """The v5 form of config.json (``layer_types`` explicit, rope fields at top level too)."""
        out = dataclasses.asdict(self)
        out["layer_types"] = list(self.layer_types)
        out["rope_scaling"] = self.rope_scaling_params
        out["mlp_only_layers"] = list(self.mlp_only_layers)
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        out["model_type"] = MODEL_TYPE
        out["architectures"] = ["Qwen3NextForCausalLM"]
        return out

    def replace(self, **changes) -> "Qwen3NextConfig":
        """A copy with ``changes``; ``layer_types`` is re-derived when the depth changes."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)
