"""The map between Hugging Face tensor names and our Flax params tree.

For a :class:`~qnext_jax.config.Qwen3NextConfig`, :func:`name_map` lists every leaf of our params
pytree (``Leaf``: its path, shape, and the HF tensors it is built from with their torch shapes).
One list serves the converter in both directions and the checks of the released 80B checkpoint.

Transforms (torch ``nn.Linear.weight`` is [out, in]; a Linen ``Dense`` kernel is [in, out]):

=================  ======================================  ==============================
kind               HF tensor(s)                            our leaf
=================  ======================================  ==============================
``copy``           ``w`` [n]                               [n] (norms; A_log, dt_bias in f32)
``embed``          ``embed_tokens.weight`` [V, d]          ``embedding`` [V, d]
``linear``         ``w`` [out, in]                         ``kernel`` = w.T [in, out]
``bias``           ``b`` [out]                             ``bias`` [out]
``conv``           ``conv1d.weight`` [C, 1, K]             ``kernel`` = w[:, 0, :].T [K, C]
``experts``        ``experts.{e}.P.weight`` [out, in] x E  stacked w_e.T -> [E, in, out]
``fused_gate``     ``experts.gate_up_proj`` [E, 2I, d]     [:, :I, :] -> [E, d, I]
``fused_up``       ``experts.gate_up_proj`` [E, 2I, d]     [:, I:, :] -> [E, d, I]
``fused_down``     ``experts.down_proj`` [E, d, I]         transposed -> [E, I, d]
=================  ======================================  ==============================

The fused forms are what transformers v5 holds in memory (``Qwen3NextExperts``:
``gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)``, so rows [0, I) are the gate); the
released checkpoint and transformers' ``save_pretrained`` use the per-expert names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from qnext_jax.config import Qwen3NextConfig

# Leaves kept in float32 whatever the checkpoint or requested dtype (the GDN decay parameters).
FLOAT32_NAMES = ("A_log", "dt_bias")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of our params tree and the HF tensors it is made from.

    Attributes:
      path: keys from the root of the params tree, e.g. ("layers_0", "mlp", "gate", "kernel").
      shape: the leaf's shape.
      kind: the transform (see the module docstring).
      sources: HF tensor names; several for ``experts`` (expert e at position e).
      source_shape: the torch shape of each source tensor.
      float32: always stored in float32 (A_log, dt_bias).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    kind: str
    sources: tuple[str, ...]
    source_shape: tuple[int, ...]
    float32: bool = False

    @property
    def key(self) -> str:
        """The path joined with "/" (used as the leaf's name on disk and in messages)."""
        return "/".join(self.path)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def out_dtype(self, source_dtype: np.dtype, dtype: np.dtype | None) -> np.dtype:
        if self.float32:
            return np.dtype(np.float32)
        return np.dtype(dtype) if dtype is not None else np.dtype(source_dtype)

    # ------------------------------------------------------------------ HF -> ours
    def assemble(self, read: Callable[[str, int | None], np.ndarray],
                 dtype: np.dtype | None = None) -> np.ndarray:
        """Build the leaf from HF tensors.

        Args:
          read: ``read(name, index)`` returns HF tensor ``name`` (``index`` None) or its slice
            ``[index]`` along the first axis. Stacked expert leaves are filled one expert at a
            time, so at most one output array plus one expert slice is in memory.
          dtype: output dtype (None keeps the checkpoint's); ignored for float32 leaves.
        Returns:
          A C-contiguous numpy array of shape ``self.shape``.
        """
        k = self.kind
        if k in ("copy", "embed", "bias"):
            t = read(self.sources[0], None)
            return np.ascontiguousarray(t.astype(self.out_dtype(t.dtype, dtype), copy=False))
        if k == "linear":
            t = read(self.sources[0], None)
            return np.ascontiguousarray(t.T.astype(self.out_dtype(t.dtype, dtype)))
        if k == "conv":
            t = read(self.sources[0], None)
            return np.ascontiguousarray(t[:, 0, :].T.astype(self.out_dtype(t.dtype, dtype)))
        out = None
        num_experts = self.shape[0]
        for e in range(num_experts):
            if k == "experts":
                t = read(self.sources[e], None).T  # [out, in] -> [in, out]
            else:
                t = read(self.sources[0], e)  # gate_up [2I, d] or down [d, I]
                if k == "fused_gate":
                    t = t[: t.shape[0] // 2]
                elif k == "fused_up":
                    t = t[t.shape[0] // 2:]
                t = t.T
            if out is None:
                out = np.empty(self.shape, self.out_dtype(t.dtype, dtype))
            out[e] = t
        return out

    # ------------------------------------------------------------------ ours -> HF
    def split(self, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """The HF tensors (per-expert released names) of a leaf value: (name, torch-layout array).

        Only for per-expert maps (``name_map(config)``, not a fused one).
        """
        k = self.kind
        if k in ("copy", "embed", "bias"):
            yield self.sources[0], array
        elif k == "linear":
            yield self.sources[0], np.ascontiguousarray(array.T)
        elif k == "conv":
            yield self.sources[0], np.ascontiguousarray(array.T[:, None, :])
        elif k == "experts":
            for e, name in enumerate(self.sources):
                yield name, np.ascontiguousarray(array[e].T)
        else:
            raise ValueError(f"{self.key}: cannot split a fused-source leaf ({k})")


def _linear(path, name, n_in, n_out, bias=False) -> list[Leaf]:
    out = [Leaf(path + ("kernel",), (n_in, n_out), "linear", (name + ".weight",), (n_out, n_in))]
    if bias:
        out.append(Leaf(path + ("bias",), (n_out,), "bias", (name + ".bias",), (n_out,)))
    return out


def _norm(path, name, n) -> Leaf:
    return Leaf(path + ("weight",), (n,), "copy", (name + ".weight",), (n,))


def _decoder_layer(c: Qwen3NextConfig, hf: str, path: tuple[str, ...], *, full_attention: bool,
                   sparse_moe: bool, fused_experts: bool) -> list[Leaf]:
    """Leaves of one decoder layer with HF prefix ``hf`` (e.g. "model.layers.3")."""
    d = c.hidden_size
    leaves = [_norm(path + ("input_layernorm",), hf + ".input_layernorm", d),
              _norm(path + ("post_attention_layernorm",), hf + ".post_attention_layernorm", d)]
    if full_attention:
        p, h = path + ("self_attn",), hf + ".self_attn"
        hd, nq, nkv, b = c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.attention_bias
        leaves += _linear(p + ("q_proj",), h + ".q_proj", d, nq * 2 * hd, b)
        leaves += _linear(p + ("k_proj",), h + ".k_proj", d, nkv * hd, b)
        leaves += _linear(p + ("v_proj",), h + ".v_proj", d, nkv * hd, b)
        leaves += _linear(p + ("o_proj",), h + ".o_proj", nq * hd, d, b)
        leaves += [_norm(p + ("q_norm",), h + ".q_norm", hd), _norm(p + ("k_norm",), h + ".k_norm", hd)]
    else:
        p, h = path + ("linear_attn",), hf + ".linear_attn"
        hk, hv = c.linear_num_key_heads, c.linear_num_value_heads
        dk, dv, kk, conv = (c.linear_key_head_dim, c.linear_value_head_dim,
                            c.linear_conv_kernel_dim, c.linear_conv_dim)
        leaves += _linear(p + ("in_proj_qkvz",), h + ".in_proj_qkvz", d, 2 * hk * dk + 2 * hv * dv)
        leaves += _linear(p + ("in_proj_ba",), h + ".in_proj_ba", d, 2 * hv)
        leaves.append(Leaf(p + ("conv1d", "kernel"), (kk, conv), "conv", (h + ".conv1d.weight",),
                           (conv, 1, kk)))
        for name in FLOAT32_NAMES:
            leaves.append(Leaf(p + (name,), (hv,), "copy", (f"{h}.{name}",), (hv,), float32=True))
        leaves.append(_norm(p + ("norm",), h + ".norm", dv))
        leaves += _linear(p + ("out_proj",), h + ".out_proj", hv * dv, d)
    p, h = path + ("mlp",), hf + ".mlp"
    if sparse_moe:
        ne, mi, si = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
        leaves += _linear(p + ("gate",), h + ".gate", d, ne)
        ep, eh = p + ("experts",), h + ".experts"
        if fused_experts:
            leaves += [
                Leaf(ep + ("gate_proj",), (ne, d, mi), "fused_gate", (eh + ".gate_up_proj",),
                     (ne, 2 * mi, d)),
                Leaf(ep + ("up_proj",), (ne, d, mi), "fused_up", (eh + ".gate_up_proj",),
                     (ne, 2 * mi, d)),
                Leaf(ep + ("down_proj",), (ne, mi, d), "fused_down", (eh + ".down_proj",),
                     (ne, d, mi)),
            ]
        else:
            for proj, (n_in, n_out) in (("gate_proj", (d, mi)), ("up_proj", (d, mi)),
                                        ("down_proj", (mi, d))):
                leaves.append(Leaf(ep + (proj,), (ne, n_in, n_out), "experts",
                                   tuple(f"{eh}.{e}.{proj}.weight" for e in range(ne)),
                                   (n_out, n_in)))
        sp, sh = p + ("shared_expert",), h + ".shared_expert"
        leaves += _linear(sp + ("gate_proj",), sh + ".gate_proj", d, si)
        leaves += _linear(sp + ("up_proj",), sh + ".up_proj", d, si)
        leaves += _linear(sp + ("down_proj",), sh + ".down_proj", si, d)
        leaves += _linear(p + ("shared_expert_gate",), h + ".shared_expert_gate", d, 1)
    else:
        i = c.intermediate_size
        leaves += _linear(p + ("gate_proj",), h + ".gate_proj", d, i)
        leaves += _linear(p + ("up_proj",), h + ".up_proj", d, i)
        leaves += _linear(p + ("down_proj",), h + ".down_proj", i, d)
    return leaves


def moe_prefixes(config: Qwen3NextConfig) -> list[str]:
    """HF prefixes ("model.layers.N.mlp", "mtp.layers.N.mlp") of the sparse-MoE blocks."""
    out = [f"model.layers.{i}.mlp" for i in range(config.num_hidden_layers)
           if config.is_sparse_moe(i)]
    if config.num_experts > 0:
        out += [f"mtp.layers.{i}.mlp" for i in range(config.mtp_num_hidden_layers)]
    return out


def name_map(config: Qwen3NextConfig, fused_experts: frozenset[str] | set[str] = frozenset()
             ) -> list[Leaf]:
    """Every leaf of the params tree of ``config``, in HF checkpoint order.

    Args:
      config: the model config; ``mtp_num_hidden_layers > 0`` adds the ``mtp`` subtree (each MTP
        layer is a full-attention, sparse-MoE layer, whatever layer_types/mlp_only_layers say).
      fused_experts: HF MoE prefixes (see :func:`moe_prefixes`) whose experts are stored in the
        fused v5 form (``experts.gate_up_proj`` / ``experts.down_proj``).
    """
    c, d = config, config.hidden_size
    leaves = [Leaf(("embed_tokens", "embedding"), (c.vocab_size, d), "embed",
                   ("model.embed_tokens.weight",), (c.vocab_size, d))]
    for i in range(c.num_hidden_layers):
        hf = f"model.layers.{i}"
        leaves += _decoder_layer(c, hf, (f"layers_{i}",), full_attention=c.is_full_attention(i),
                                 sparse_moe=c.is_sparse_moe(i),
                                 fused_experts=hf + ".mlp" in fused_experts)
    leaves.append(_norm(("norm",), "model.norm", d))
    if not c.tie_word_embeddings:
        leaves += _linear(("lm_head",), "lm_head", d, c.vocab_size)
    if c.mtp_num_hidden_layers > 0:
        leaves += _linear(("mtp", "fc"), "mtp.fc", 2 * d, d)
        leaves.append(_norm(("mtp", "pre_fc_norm_embedding"), "mtp.pre_fc_norm_embedding", d))
        leaves.append(_norm(("mtp", "pre_fc_norm_hidden"), "mtp.pre_fc_norm_hidden", d))
        for i in range(c.mtp_num_hidden_layers):
            hf = f"mtp.layers.{i}"
            leaves += _decoder_layer(c, hf, ("mtp", f"layers_{i}"), full_attention=True,
                                     sparse_moe=c.num_experts > 0,
                                     fused_experts=hf + ".mlp" in fused_experts)
        leaves.append(_norm(("mtp", "norm"), "mtp.norm", d))
    return leaves


def expected_tensors(leaves: list[Leaf]) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: torch shape} of a name map (fused sources listed once)."""
    out: dict[str, tuple[int, ...]] = {}
    for leaf in leaves:
        for name in leaf.sources:
            out[name] = leaf.source_shape
    return out


def param_count(leaves: list[Leaf]) -> int:
    return sum(leaf.size for leaf in leaves)


def tree_from_leaves(leaves: list[Leaf], values) -> dict:
    """A nested dict with ``values[i]`` (or ``values(leaf)`` when callable) at ``leaves[i].path``."""
    tree: dict = {}
    for i, leaf in enumerate(leaves):
        node = tree
        for k in leaf.path[:-1]:
            node = node.setdefault(k, {})
        node[leaf.path[-1]] = values(leaf) if callable(values) else values[i]
    return tree


def abstract_params(config: Qwen3NextConfig, dtype=None) -> dict:
    """The params tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves (float32 by default;
    A_log and dt_bias always float32)."""
    import jax

    dt = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
    return tree_from_leaves(
        name_map(config),
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, np.float32 if leaf.float32 else dt))
