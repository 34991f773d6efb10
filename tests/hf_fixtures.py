"""Tiny Hugging Face Qwen3-Next checkpoints written by transformers itself (test helpers).

    from hf_fixtures import build_hf_checkpoint, add_mtp_tensors, fuse_experts, read_hf_tensors
    tensors = build_hf_checkpoint(tmp_path / "hf", {"mlp_only_layers": [0]}, seed=0,
                                  max_shard_size="20KB")   # {name: float32 numpy array}

``build_hf_checkpoint`` initialises ``transformers.Qwen3NextForCausalLM`` from a fixed torch seed
(float32), perturbs the 1-D parameters (norm weights are initialised to 0 or 1, A_log/dt_bias to
fixed ranges) so that every tensor is distinct, and saves it with ``save_pretrained``; the
transformers installed here writes the per-expert names (``mlp.experts.{e}.gate_proj.weight``).
``add_mtp_tensors`` adds random ``mtp.*`` tensors (names and shapes of the released checkpoint,
which transformers neither builds nor loads); ``fuse_experts`` rewrites the experts in the fused
v5 form (``mlp.experts.gate_up_proj`` [E, 2I, d], gate rows first; ``mlp.experts.down_proj``
[E, d, I]).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

# The 80B config scaled down, keeping its ratios: 8:1 query:kv heads (16:2), Hv = 2 Hk, a full
# attention layer every 4, head_dim = 2 * linear head dims' ratio kept loosely, top-4 of 16.
TINY_HF = dict(  # noqa: C408 (keyword form reads like a config)
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=1, head_dim=16, partial_rotary_factor=0.25,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=4,
    num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True,
    rms_norm_eps=1e-6, max_position_embeddings=512, rope_theta=10000.0,
    tie_word_embeddings=False, attention_bias=False,
)


def hf_config(overrides: dict | None = None):
    """A transformers ``Qwen3NextConfig`` of ``TINY_HF`` updated with ``overrides``."""
    from transformers import Qwen3NextConfig

    kw = {**TINY_HF, **(overrides or {})}
    rope = {"rope_type": "default", "rope_theta": kw.pop("rope_theta"),
            "partial_rotary_factor": kw.pop("partial_rotary_factor")}
    if kw.get("rope_scaling"):
        rope.update(kw.pop("rope_scaling"))
    kw.pop("rope_scaling", None)
    return Qwen3NextConfig(rope_parameters=rope, dtype="float32", **kw)


def build_hf_model(overrides: dict | None = None, seed: int = 0, perturb: float = 0.1):
    """A float32 ``Qwen3NextForCausalLM`` (eval mode) with seeded random weights."""
    import torch
    from transformers import Qwen3NextForCausalLM

    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(hf_config(overrides)).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                p.add_(perturb * torch.randn(p.shape, generator=gen))
    return model


def read_hf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint directory (single file or sharded) as numpy arrays."""
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _write_tensors(path: Path, tensors: dict[str, np.ndarray], sharded: bool) -> None:
    """Replace the safetensors of ``path`` by ``tensors`` (one file, or 2 shards + index)."""
    from safetensors.numpy import save_file

    for f in list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json")):
        f.unlink()
    names = list(tensors)
    if not sharded:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, path / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
         "weight_map": weight_map}, indent=1))


def build_hf_checkpoint(path: str | Path, overrides: dict | None = None, *, seed: int = 0,
                        max_shard_size: str | int | None = None, perturb: float = 0.1,
                        tokenizer: bool = False) -> dict[str, np.ndarray]:
    """Save a tiny random transformers checkpoint at ``path``; returns its tensors.

    Args:
      overrides: config fields to change from ``TINY_HF`` (e.g. mlp_only_layers,
        decoder_sparse_step, tie_word_embeddings, attention_bias, num_hidden_layers).
      max_shard_size: passed to ``save_pretrained`` (e.g. "20KB" forces the sharded index).
      tokenizer: also write small placeholder tokenizer files (tokenizer.json, ...).
    """
    path = Path(path)
    model = build_hf_model(overrides, seed, perturb)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    if tokenizer:
        (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
        (path / "tokenizer_config.json").write_text('{"model_max_length": 512}\n')
        (path / "chat_template.jinja").write_text("{{ messages }}\n")
    return read_hf_tensors(path)


def mtp_tensor_shapes(config: dict, num_layers: int = 1) -> dict[str, tuple[int, ...]]:
    """Names and torch shapes of the ``mtp.*`` tensors (DESIGN.md section 4) for a config dict."""
    d, hd = config["hidden_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    ne, mi = config["num_experts"], config["moe_intermediate_size"]
    si = config["shared_expert_intermediate_size"]
    out = {"mtp.fc.weight": (d, 2 * d), "mtp.pre_fc_norm_embedding.weight": (d,),
           "mtp.pre_fc_norm_hidden.weight": (d,), "mtp.norm.weight": (d,)}
    for i in range(num_layers):
        p = f"mtp.layers.{i}"
        out.update({
            f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (nq * hd * 2, d),
            f"{p}.self_attn.k_proj.weight": (nkv * hd, d),
            f"{p}.self_attn.v_proj.weight": (nkv * hd, d),
            f"{p}.self_attn.o_proj.weight": (d, nq * hd),
            f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,),
            f"{p}.mlp.gate.weight": (ne, d),
            f"{p}.mlp.shared_expert.gate_proj.weight": (si, d),
            f"{p}.mlp.shared_expert.up_proj.weight": (si, d),
            f"{p}.mlp.shared_expert.down_proj.weight": (d, si),
            f"{p}.mlp.shared_expert_gate.weight": (1, d),
        })
        if config.get("attention_bias"):
            for proj, n in (("q_proj", nq * hd * 2), ("k_proj", nkv * hd), ("v_proj", nkv * hd),
                            ("o_proj", d)):
                out[f"{p}.self_attn.{proj}.bias"] = (n,)
        for e in range(ne):
            out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (mi, d)
            out[f"{p}.mlp.experts.{e}.up_proj.weight"] = (mi, d)
            out[f"{p}.mlp.experts.{e}.down_proj.weight"] = (d, mi)
    return out


def add_mtp_tensors(path: str | Path, *, seed: int = 0, num_layers: int = 1,
                    scale: float = 0.05) -> dict[str, np.ndarray]:
    """Add random float32 ``mtp.*`` tensors to the checkpoint at ``path`` (kept in its single-file
    or sharded form; sharded: a new shard listed in the index). Returns the added tensors."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    rng = np.random.default_rng(seed)
    added = {}
    for name, shape in mtp_tensor_shapes(config, num_layers).items():
        base = 0.0 if len(shape) > 1 else (1.0 if name.endswith("layernorm.weight") else 0.0)
        added[name] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        from safetensors.numpy import save_file

        fname = "model-mtp.safetensors"
        save_file(added, path / fname, metadata={"format": "pt"})
        meta = json.loads(index.read_text())
        meta["weight_map"].update({n: fname for n in added})
        index.write_text(json.dumps(meta, indent=1))
    else:
        _write_tensors(path, {**read_hf_tensors(path), **added}, sharded=False)
    return added


def fuse_experts(path: str | Path, sharded: bool = False) -> dict[str, np.ndarray]:
    """Rewrite the experts of every MoE block in the fused v5 form; returns the new tensors."""
    path = Path(path)
    tensors = read_hf_tensors(path)
    pat = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    groups: dict[str, dict[tuple[str, int], np.ndarray]] = {}
    out = {}
    for name, t in tensors.items():
        m = pat.match(name)
        if m:
            groups.setdefault(m.group(1), {})[(m.group(3), int(m.group(2)))] = t
        else:
            out[name] = t
    for prefix, g in groups.items():
        ne = 1 + max(e for _, e in g)
        out[f"{prefix}.gate_up_proj"] = np.stack(
            [np.concatenate([g["gate_proj", e], g["up_proj", e]], axis=0) for e in range(ne)])
        out[f"{prefix}.down_proj"] = np.stack([g["down_proj", e] for e in range(ne)])
    _write_tensors(path, out, sharded)
    return out
