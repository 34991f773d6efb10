"""Decoder layers, the causal LM and the MTP head of Qwen3-Next.

Layer i mixes tokens with gated attention when ``config.layer_types[i] == "full_attention"``
and with the Gated DeltaNet otherwise; its FFN is the sparse MoE when
``config.is_sparse_moe(i)``, else a dense SwiGLU MLP (transformers' ``Qwen3NextDecoderLayer``).
The MTP head (``mtp.*`` in the released checkpoint) predicts token i+2 from the main model's
final-normed hidden state h_i and the embedding of token i+1:
``mtp.norm(layer(fc([pre_fc_norm_embedding(embed(t_{i+1})), pre_fc_norm_hidden(h_i)])))``.

Two parameter layouts of the decoder layers:

* per layer (the converter's, the checkpoints', generation's): ``params["layers_{i}"]``;
* scanned (``Qwen3NextForCausalLM(scan_layers=True)``, compile time flat in depth): the layer
  pattern repeats with period P (:func:`scan_period`; 4 for the 80B config: 3 GDN + 1
  attention), the model runs ``jax.lax.scan`` over the L / P blocks of P layers, and
  ``params["blocks"]["layers_{j}"]`` (j < P) holds layer j of every block stacked on a leading
  axis of size L / P: ``params["blocks"]["layers_{j}"][b]`` is ``params["layers_{b * P + j}"]``.
  The cache of a scanned model is stacked the same way (``init_cache(..., scan_layers=True)``:
  ``cache["blocks"]["layers_{j}"]``); the scan carries it whole and updates each block's slice
  in place.

:func:`stack_layers` and :func:`unstack_layers` convert between the two (exactly), for params
and caches alike. Both layouts run the same layers through :func:`run_layers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnext_jax import sharding
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling.attention import Qwen3NextAttention
from qnext_jax.modeling.gated_deltanet import Qwen3NextGatedDeltaNet
from qnext_jax.modeling.layers import dense
from qnext_jax.modeling.moe import Qwen3NextMLP, Qwen3NextSparseMoeBlock
from qnext_jax.modeling.norms import RMSNorm
from qnext_jax.modeling.rope import rope_cos_sin


class Qwen3NextDecoderLayer(nn.Module):
    """x = x + mixer(input_layernorm(x)); x = x + ffn(post_attention_layernorm(x))."""

    config: Qwen3NextConfig
    full_attention: bool
    sparse_moe: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    gdn_impl: str = "auto"
    moe_impl: str = "auto"
    attn_impl: str = "auto"
    decode_kernels: bool = True  # see Qwen3NextSparseMoeBlock (False in the layer scan)

    @nn.compact
    def __call__(self, x, cos, sin, token_mask, cache=None, cache_index=None, kv_valid=None,
                 segment_ids=None, cu_seqlens=None, expert_stack=None):
        """``expert_stack``: None, or (in the layer scan, for an MoE layer) the scan's whole
        stacks of this layer's expert weights and the block's index (see
        ``Qwen3NextExperts``)."""
        cfg = self.config
        mod = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype)
        h = RMSNorm(name="input_layernorm", **norm)(x)
        if self.full_attention:
            h, new_cache = Qwen3NextAttention(cfg, attn_impl=self.attn_impl, name="self_attn",
                                              **mod)(
                h, cos, sin, token_mask, cache, cache_index, kv_valid, segment_ids)
        else:
            h, new_cache = Qwen3NextGatedDeltaNet(cfg, gdn_impl=self.gdn_impl,
                                                  name="linear_attn", **mod)(
                h, token_mask, cache, segment_ids, cu_seqlens)
        x = x + h.astype(x.dtype)
        h = RMSNorm(name="post_attention_layernorm", **norm)(x)
        if self.sparse_moe:
            h = Qwen3NextSparseMoeBlock(cfg, moe_impl=self.moe_impl,
                                        decode_kernels=self.decode_kernels, name="mlp", **mod)(
                h, expert_stack)
        else:
            h = Qwen3NextMLP(cfg.intermediate_size, cfg.hidden_size, std=cfg.initializer_range,
                             name="mlp", **mod)(h)
        return x + h.astype(x.dtype), new_cache


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] bool: True where a run of equal segment ids begins (position 0 included)."""
    B = segment_ids.shape[0]
    return jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                           axis=1)


def segment_cu_seqlens(segment_ids: jax.Array, max_segments: int) -> jax.Array:
    """Per-row packed-sequence offsets: [B, max_segments + 1] int32 (FLA's cu_seqlens of each
    row).

    Row b lists the starts of its runs of equal segment id (padding runs included), then T:
    missing runs are empty sequences at the row's end; jit-compatible (static size). A row with
    more than ``max_segments`` runs merges its last ones.
    """
    B, T = segment_ids.shape
    starts = segment_starts(segment_ids)
    pos = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments, fill_value=T)[0])(starts)
    return jnp.concatenate([pos, jnp.full((B, 1), T, pos.dtype)], axis=1).astype(jnp.int32)


REMAT_POLICIES = ("none", "full", "dots")

BLOCKS = "blocks"  # params key of the scanned layout's stacked layers (see the module docstring)


def remat_layer(remat: str):
    """The decoder-layer class for a remat policy name (see ``Qwen3NextForCausalLM.remat``)."""
    if remat == "none":
        return Qwen3NextDecoderLayer
    if remat == "full":
        return nn.remat(Qwen3NextDecoderLayer, prevent_cse=True)
    if remat == "dots":
        return nn.remat(Qwen3NextDecoderLayer, prevent_cse=True,
                        policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")


def scan_period(config: Qwen3NextConfig) -> int:
    """The period P of the layer pattern: the smallest P < L dividing L (L =
    ``num_hidden_layers``) such that layers i and i + P have the same kind (mixer and FFN:
    ``layer_types[i]``, ``is_sparse_moe(i)``) for every i.

    Raises:
      ValueError: no such P: the pattern does not repeat (e.g. an ``mlp_only_layers`` entry
        breaks it, or L is one period), so the layers cannot run as a scan.
    """
    L = config.num_hidden_layers
    kinds = [(config.layer_types[i], config.is_sparse_moe(i)) for i in range(L)]
    for p in range(1, L):
        if L % p == 0 and all(kinds[i] == kinds[i + p] for i in range(L - p)):
            return p
    raise ValueError(
        f"scan_layers needs a layer pattern that repeats, but the {L} layers (layer_types, "
        f"sparse MoE per layer: {kinds}) have no period P < {L} dividing num_hidden_layers "
        "(one period is nothing to scan); run them unscanned: scan_layers=False (qnext: without "
        "--scan-layers)")


def unstacked_ndim(path: Sequence, shape: Sequence[int]) -> int:
    """Rank of a params leaf as one layer sees it: the block axis of the scanned layout (a path
    under ``params["blocks"]``) does not count. ``path``: keys (str or jax key-path entries)."""
    first = getattr(path[0], "key", path[0]) if path else None
    return len(shape) - (first == BLOCKS)


def stack_layers(params: dict, config: Qwen3NextConfig) -> dict:
    """Per-layer params (``params["layers_{i}"]``) -> the scanned layout (module docstring);
    other entries are kept as they are. Works on arrays, tracers and ShapeDtypeStructs (under
    ``jax.eval_shape``).

    Raises:
      ValueError: a non-periodic layer pattern (:func:`scan_period`) or a missing layer.
    """
    P = scan_period(config)
    L = config.num_hidden_layers
    names = [f"layers_{i}" for i in range(L)]
    missing = [n for n in names if n not in params]
    if missing and BLOCKS in params:
        raise ValueError(f"stack_layers: params are already in the scanned layout (a {BLOCKS!r} "
                         "entry, no layers_0...): pass them as they are")
    if missing:
        raise ValueError(f"stack_layers: params have no {', '.join(missing)} (expected the "
                         f"per-layer layout of {L} layers)")
    out = {k: v for k, v in params.items() if k not in names}
    out[BLOCKS] = {f"layers_{j}": jax.tree_util.tree_map(
        lambda *xs: jnp.stack(xs), *(params[names[i]] for i in range(j, L, P)))
        for j in range(P)}
    return out


def unstack_layers(tree: dict, config: Qwen3NextConfig) -> dict:
    """The scanned layout -> per layer: the inverse of :func:`stack_layers`. Also unstacks a
    collection shaped like the params (e.g. the sown ``intermediates`` of a scanned apply, where
    only some layers have entries).

    Raises:
      ValueError: a non-periodic layer pattern, no ``"blocks"`` entry, or a block axis that is
        not L / P long.
    """
    P = scan_period(config)
    N = config.num_hidden_layers // P
    if BLOCKS not in tree:
        raise ValueError(f"unstack_layers: no {BLOCKS!r} entry (not the scanned layout)")
    blocks = tree[BLOCKS]
    for path, x in jax.tree_util.tree_flatten_with_path(blocks)[0]:
        if x.shape[:1] != (N,):
            raise ValueError(f"unstack_layers: {BLOCKS}{jax.tree_util.keystr(path)} has shape "
                             f"{x.shape}, expected a leading axis of L / P = {N} blocks")
    out = {k: v for k, v in tree.items() if k != BLOCKS}
    for i in range(config.num_hidden_layers):
        b, j = divmod(i, P)
        if f"layers_{j}" in blocks:
            out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, b=b: x[b],
                                                        blocks[f"layers_{j}"])
    return out


def make_layers(config: Qwen3NextConfig, kinds_of: Sequence[int], remat: str = "none",
                **kwargs) -> list:
    """Decoder layers named ``layers_0``, ``layers_1``, ...: layer n has the kind (mixer, FFN)
    of model layer ``kinds_of[n]``. Call inside a module's ``setup``; ``kwargs`` go to each
    layer (dtype, param_dtype, precision, gdn_impl, moe_impl, attn_impl, decode_kernels)."""
    layer_cls = remat_layer(remat)
    return [layer_cls(config, full_attention=config.is_full_attention(i),
                      sparse_moe=config.is_sparse_moe(i), name=f"layers_{n}", **kwargs)
            for n, i in enumerate(kinds_of)]


def run_layers(layers: Sequence[nn.Module], x, cos, sin, token_mask, cache=None,
               cache_index=None, kv_valid=None, segment_ids=None, cu_seqlens=None,
               expert_stacks=None):
    """Run decoder layers in order: the one loop over layers of both parameter layouts (the
    unrolled model runs all L layers, the scan's body the P layers of a block).

    Args:
      layers: the modules of :func:`make_layers` (layer n reads ``cache["layers_{n}"]``).
      x: [B, T, d]; the other arguments as for :class:`Qwen3NextDecoderLayer`.
      cache: None, or {"layers_{n}": that layer's cache} for these layers.
      expert_stacks: None, or {"layers_{n}": layer n's ``expert_stack``} for the MoE layers
        (see :class:`Qwen3NextDecoderLayer`).
    Returns:
      (x [B, T, d], the output of each layer (a list of [B, T, d]), the new
      {"layers_{n}": cache} or None without a cache).
    """
    outs, new_cache = [], {}
    for n, layer in enumerate(layers):
        name = f"layers_{n}"
        x, new_cache[name] = layer(x, cos, sin, token_mask,
                                   None if cache is None else cache[name], cache_index,
                                   kv_valid, segment_ids, cu_seqlens,
                                   (expert_stacks or {}).get(name))
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        outs.append(x)
    return x, outs, (None if cache is None else new_cache)


class Qwen3NextLayerBlock(nn.Module):
    """One period of the layer pattern, ``layers_0`` .. ``layers_{P-1}``: the body of the layer
    scan. The carry (``x`` [B, T, d], the stacked cache of all blocks ({"layers_{j}": ...} with
    the block axis first) or None) -> (the carry with block ``block_index``'s cache updated in
    place, the P layers' outputs [P, B, T, d]). The cache is carried whole rather than scanned
    in and out by slices, which XLA allocated anew and copied back on every call (the decode
    loop's cache copies). ``expert_stacks`` (None, or {"layers_{j}": (gate_proj, up_proj,
    down_proj)} of the MoE layers: the whole stacks over the blocks, a broadcast input) and
    ``block_index`` (this block's, a scanned input) let the decode kernels read the block's
    experts in place (see ``Qwen3NextExperts``)."""

    config: Qwen3NextConfig
    period: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    gdn_impl: str = "auto"
    moe_impl: str = "auto"
    attn_impl: str = "auto"
    remat: str = "none"

    def setup(self):
        # Layer j of a block has the kind of layer j (the pattern repeats with period P). Its
        # expert weights are the scan's slices of the stacked params, which XLA would copy
        # whole to hand to a Pallas kernel: auto takes the decode kernels here only given the
        # whole stacks (expert_stacks), which they index by the block.
        self.layers = make_layers(self.config, range(self.period), self.remat,
                                  gdn_impl=self.gdn_impl, moe_impl=self.moe_impl,
                                  attn_impl=self.attn_impl, dtype=self.dtype,
                                  param_dtype=self.param_dtype, precision=self.precision,
                                  decode_kernels=False)

    def __call__(self, carry, cos, sin, token_mask, segment_ids, cu_seqlens, cache_index,
                 kv_valid, expert_stacks, block_index):
        x, cache = carry
        stacks = None if expert_stacks is None else {
            name: (*weights, block_index) for name, weights in expert_stacks.items()}
        block_cache = None if cache is None else jax.tree.map(
            lambda c: jax.lax.dynamic_index_in_dim(c, block_index, keepdims=False), cache)
        x, outs, new_cache = run_layers(self.layers, x, cos, sin, token_mask, block_cache,
                                        cache_index, kv_valid, segment_ids, cu_seqlens, stacks)
        extra = None
        if cache is not None:
            # The carry keeps the cache's entries; one a layer adds (speculative decoding's
            # per-token states) leaves as a scanned output, one it drops (their marker) as None.
            extra = {name: {key: layer.get(key) for key in {*layer, *cache[name]}
                            if key not in layer or key not in cache[name]}
                     for name, layer in new_cache.items()}
            kept = {name: {key: layer.get(key, block_cache[name][key]) for key in cache[name]}
                    for name, layer in new_cache.items()}
            cache = jax.tree.map(lambda c, n: jax.lax.dynamic_update_index_in_dim(
                c, n.astype(c.dtype), block_index, 0), cache, kept)
        return (x, cache), (jnp.stack(outs), extra)  # unused outputs: dead code under jit


class Qwen3NextMTP(nn.Module):
    """The multi-token-prediction head (params ``mtp``); returns the normed hidden [B, T, d]."""

    config: Qwen3NextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    moe_impl: str = "auto"
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, next_embeds, hidden, cos, sin, token_mask, cache=None, cache_index=None,
                 kv_valid=None, segment_ids=None):
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype)
        mod = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        e = RMSNorm(name="pre_fc_norm_embedding", **norm)(next_embeds)
        h = RMSNorm(name="pre_fc_norm_hidden", **norm)(hidden)
        x = dense(cfg.hidden_size, name="fc", std=cfg.initializer_range, **mod)(
            jnp.concatenate([e, h], axis=-1))
        new_caches = {}
        for i in range(cfg.mtp_num_hidden_layers):
            name = f"layers_{i}"
            x, new_caches[name] = Qwen3NextDecoderLayer(
                cfg, full_attention=True, sparse_moe=cfg.num_experts > 0,
                moe_impl=self.moe_impl, attn_impl=self.attn_impl, name=name, **mod)(
                x, cos, sin, token_mask, None if cache is None else cache[name], cache_index,
                kv_valid, segment_ids)
        x = RMSNorm(name="norm", **norm)(x)
        return x, (new_caches if cache is not None else None)


class Qwen3NextForCausalLM(nn.Module):
    """The Qwen3-Next causal LM (transformers' ``Qwen3NextForCausalLM``), functional.

    ``apply({"params": p}, input_ids, cache=None, attention_mask=None)`` -> ``(logits, cache)``.

    Attributes:
      config: the model's :class:`Qwen3NextConfig`.
      dtype: compute dtype (activations); params are cast to it.
      param_dtype: dtype of freshly initialised params (A_log, dt_bias are always float32).
      precision: matmul precision (``jax.lax.Precision.HIGHEST`` for float32 cross-checks on GPU).
      gdn_impl: the Gated DeltaNet backend (``"auto"``, ``"reference"``, ...).
      moe_impl: the routed experts' implementation (``qnext_jax.modeling.moe.MOE_IMPLS``;
        ``"auto"`` chooses by platform and token count, see ``moe.grouped_experts``; the decode
        paths ``gather`` and ``gather_pallas`` serve calls of at most E / 2 token-slots, larger
        ones (prefill) run auto). E.g.
        ``"gather_pallas"``, the decode kernels that read only the chosen experts' weights in
        place (with the router and the routing inside them where they fit, which ``"auto"``
        also takes on a GPU without ``scan_layers`` and without a mesh: see
        ``moe.Qwen3NextExperts.fuses_shared``); not under ``scan_layers``, where each layer's
        expert weights are a slice of the stacked params that XLA copies whole to pass to a
        kernel (the 80B on two H200s: 53.3 against 14.5 ms a step).
      attn_impl: the softmax attention of multi-token steps over a cache (prefill,
        speculative verification; ``attention.ATTN_IMPLS``): "xla" (einsum softmax, blocked
        over K/V for long caches), "tokamax" / "tokamax:mosaic" / "tokamax:triton" (tokamax's
        flash-attention kernels, GPU; under a mesh, per batch and K/V-head shard), or "auto":
        tokamax for bf16/fp16 on GPU when installed, else xla. Decode steps and calls without
        a cache (training, plain forward) always run xla.
      remat: rematerialisation of each decoder layer for training: "none", "full" (keep only
        the layer inputs) or "dots" (also keep matmul outputs without batch dims).
      scan_layers: run the decoder layers as a scan over the blocks of the periodic layer
        pattern (compile time independent of depth); params in the scanned layout (module
        docstring; :func:`stack_layers`) and, with a cache, the stacked cache of
        ``init_cache(..., scan_layers=True)`` (the same block axis). Everything the per-layer
        model runs runs the same way (cached prefill and decode, speculative verification,
        packed segments, hidden states). A non-periodic pattern raises ValueError.
    """

    config: Qwen3NextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    gdn_impl: str = "auto"
    moe_impl: str = "auto"
    attn_impl: str = "auto"
    remat: str = "none"
    scan_layers: bool = False

    def setup(self):
        cfg = self.config
        mod = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                     param_dtype=self.param_dtype,
                                     embedding_init=nn.initializers.normal(cfg.initializer_range))
        if self.scan_layers:
            period = scan_period(cfg)
            # The stacked cache rides in the carry (block axis first, like the params); the
            # block's index is the scanned input; everything else is the same for every block.
            b = nn.broadcast
            scanned = nn.scan(Qwen3NextLayerBlock, variable_axes={"params": 0, "intermediates": 0},
                              split_rngs={"params": True},
                              in_axes=(b, b, b, b, b, b, b, b, 0),
                              length=cfg.num_hidden_layers // period)
            # The attribute's name is the params key: BLOCKS.
            self.blocks = scanned(cfg, period, gdn_impl=self.gdn_impl, moe_impl=self.moe_impl,
                                  attn_impl=self.attn_impl, remat=self.remat, **mod)
        else:
            self.layers = make_layers(cfg, range(cfg.num_hidden_layers), self.remat,
                                      gdn_impl=self.gdn_impl, moe_impl=self.moe_impl,
                                      attn_impl=self.attn_impl, **mod)
        self.norm = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, name="lm_head", std=cfg.initializer_range, **mod)
        if cfg.mtp_num_hidden_layers > 0:
            self.mtp = Qwen3NextMTP(cfg, moe_impl=self.moe_impl, attn_impl=self.attn_impl, **mod)

    def _expert_stacks(self):
        """The scanned layout's expert weights as a broadcast input of the layer scan: {"layers_
        {j}": (gate_proj, up_proj, down_proj)} of the block's MoE layers, each [L / P, E, ...],
        or None while initializing. Unused (dead code under jit) unless the decode kernels take
        them."""
        if self.is_initializing() or not self.has_variable("params", BLOCKS):
            return None
        blocks = self.variables["params"][BLOCKS]
        return {name: tuple(layer["mlp"]["experts"][w]
                            for w in ("gate_proj", "up_proj", "down_proj"))
                for name, layer in blocks.items() if "experts" in layer.get("mlp", {})}

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: [B, T, d] -> [B, T, vocab] (the embedding's transpose when tied)."""
        if self.config.tie_word_embeddings:
            table = self.embed_tokens.embedding.astype(self.dtype)  # [vocab, d]
            return jnp.einsum("BTD,VD->BTV", hidden.astype(self.dtype), table,
                              precision=self.precision)
        return self.lm_head(hidden)

    def _positions_and_masks(self, input_ids, attention_mask, cache, segment_ids=None):
        B, T = input_ids.shape
        if attention_mask is None:
            token_mask = jnp.ones((B, T), bool)
        else:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected "
                                 f"input_ids' shape {(B, T)}")
            token_mask = attention_mask.astype(bool)
        if segment_ids is not None:
            if segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids has shape {segment_ids.shape}, expected "
                                 f"input_ids' shape {(B, T)}")
            if cache is not None:
                raise ValueError("segment_ids (packed sequences) are for cache-free forward "
                                 "passes (training); got a cache")
            token_mask = jnp.logical_and(token_mask, segment_ids > 0)
            t = jnp.arange(T, dtype=jnp.int32)
            starts = segment_starts(segment_ids)
            first = jax.lax.cummax(jnp.where(starts, t[None, :], 0), axis=1)
            return token_mask, t[None, :] - first  # positions restart in each segment
        start = jnp.zeros((B,), jnp.int32) if cache is None else cache["positions"]
        positions = start[:, None] + jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1
        positions = jnp.maximum(positions, 0)  # padding before the first token
        return token_mask, positions

    def __call__(self, input_ids, cache=None, attention_mask=None, output_hidden_states=False,
                 segment_ids=None, max_segments=None):
        """Run the model on new tokens.

        Args:
          input_ids: [B, T] int token ids.
          cache: None (no state in or out), or the pytree of :func:`qnext_jax.init_cache` (with
            ``scan_layers=True`` for a scanned model); the new tokens are appended after the
            ``cache["index"]`` slots already filled.
          attention_mask: [B, T] (1 = token, 0 = padding), for the new tokens only. Positions
            count real tokens only, so left padding does not shift RoPE.
          output_hidden_states: also return the per-layer hidden states.
          segment_ids: [B, T] int (no cache): packed documents, 1, 2, ... per row, 0 on padding.
            Attention is block-diagonal over segments, the GDN conv and state restart at each
            segment start and positions restart at 0 (each document as if alone).
          max_segments: static bound on the runs of equal segment id per row (padding runs
            included); default T. Rows with more runs leak GDN state between their last ones.
        Returns:
          (logits [B, T, vocab], new cache or None), plus a tuple of hidden states
          (embeddings, after each layer, final normed) [B, T, d] when output_hidden_states.
        Raises:
          ValueError: input_ids not 2-D; params or a cache whose layout (per layer or stacked)
            is not the model's; per-layer params of more layers than the config's; a cache too
            short for the new tokens (checked when not traced) or of another batch size.
        """
        cfg = self.config
        if jnp.ndim(input_ids) != 2:
            raise ValueError(f"input_ids must be [batch, length] token ids, got shape "
                             f"{jnp.shape(input_ids)}")
        if not self.is_initializing() and \
                self.has_variable("params", BLOCKS if not self.scan_layers else "layers_0"):
            raise ValueError(
                "the params' layout does not match the model's: " + (
                    "scan_layers=True needs the stacked params of stack_layers(params, config), "
                    "got per-layer entries (layers_0, ...)" if self.scan_layers else
                    f"scan_layers=False needs per-layer params (unstack_layers(params, config)), "
                    f"got a stacked {BLOCKS!r} entry"))
        extra = f"layers_{cfg.num_hidden_layers}"
        if not self.is_initializing() and not self.scan_layers and \
                self.has_variable("params", extra):
            raise ValueError(f"the params have more layers than the config's "
                             f"num_hidden_layers = {cfg.num_hidden_layers} (they hold {extra}): "
                             "params of another model? Load config and params together "
                             "(qnext_jax.convert.load)")
        if cache is not None and (BLOCKS in cache) != self.scan_layers:
            raise ValueError(
                "the cache's layout does not match the model's: " + (
                    "scan_layers=True needs the stacked cache of init_cache(..., "
                    "scan_layers=True) (or cache.stack_cache), got per-layer entries"
                    if self.scan_layers else
                    "scan_layers=False needs the per-layer cache of init_cache(...) (or "
                    f"cache.unstack_cache), got a stacked {BLOCKS!r} entry"))
        B, T = input_ids.shape
        if cache is not None and cache["valid"].shape[0] != B:
            raise ValueError(f"the cache is for batch size {cache['valid'].shape[0]}, "
                             f"input_ids has {B} rows")
        token_mask, positions = self._positions_and_masks(input_ids, attention_mask, cache,
                                                          segment_ids)
        cu_seqlens = None
        if segment_ids is not None:
            cu_seqlens = segment_cu_seqlens(segment_ids, T if max_segments is None else
                                            min(int(max_segments), T))
        cos, sin = rope_cos_sin(cfg, positions, self.dtype)
        x = sharding.constrain(self.embed_tokens(input_ids), ("batch", "length", "act_embed"))
        cache_index = kv_valid = None
        if cache is not None:
            cache_index = cache["index"]
            if not isinstance(cache_index, jax.core.Tracer) and \
                    int(cache_index) + T > cache["valid"].shape[1]:
                raise ValueError(f"cache holds {cache['valid'].shape[1]} positions, "
                                 f"{int(cache_index)} used, {T} new tokens do not fit")
            kv_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], token_mask,
                                                           cache_index, axis=1)
        hidden = [x]
        if self.scan_layers:
            (x, blocks_cache), (outs, extra) = self.blocks(
                (x, None if cache is None else cache[BLOCKS]), cos, sin, token_mask,
                segment_ids, cu_seqlens, cache_index, kv_valid, self._expert_stacks(),
                jnp.arange(cfg.num_hidden_layers // scan_period(cfg), dtype=jnp.int32))
            if blocks_cache is not None:  # with what the layers added, less what they dropped
                blocks_cache = {name: {key: v for key, v in {**layer, **extra[name]}.items()
                                       if v is not None}
                                for name, layer in blocks_cache.items()}
            new_cache = {BLOCKS: blocks_cache}
            if output_hidden_states:  # outs [L / P, P, B, T, d], layer b * P + j at [b, j]
                hidden.extend(outs.reshape((cfg.num_hidden_layers,) + x.shape))
        else:
            x, outs, new_cache = run_layers(self.layers, x, cos, sin, token_mask, cache,
                                            cache_index, kv_valid, segment_ids, cu_seqlens)
            hidden.extend(outs)
        x = self.norm(x)
        hidden.append(x)
        logits = self.logits(x)
        if cfg.mtp_num_hidden_layers > 0 and self.is_initializing():
            self.mtp_logits(x, input_ids, positions, token_mask, segment_ids=segment_ids)
        if cache is not None:
            new_cache["index"] = cache_index + T
            new_cache["positions"] = cache["positions"] + jnp.sum(token_mask, axis=1,
                                                                  dtype=jnp.int32)
            new_cache["valid"] = kv_valid
            if "mtp" in cache:
                new_cache["mtp"] = cache["mtp"]
        else:
            new_cache = None
        if output_hidden_states:
            return logits, new_cache, tuple(hidden)
        return logits, new_cache

    def mtp_logits(self, hidden, next_ids, positions, token_mask=None, cache=None,
                   cache_index=None, kv_valid=None, segment_ids=None):
        """MTP head: logits for token i+2 from h_i [B, T, d] and token i+1 ids [B, T].

        ``positions`` [B, T] are the positions of tokens i; ``cache`` is the MTP's own
        {"layers_0": {"key", "value"}} (or None); ``segment_ids`` [B, T] (no cache) makes its
        attention block-diagonal. Returns (logits, mtp hidden, new mtp cache).
        """
        if self.config.mtp_num_hidden_layers == 0:
            raise ValueError("this config has no MTP head (mtp_num_hidden_layers = 0)")
        if token_mask is None:
            token_mask = jnp.ones(next_ids.shape, bool)
        cos, sin = rope_cos_sin(self.config, positions, self.dtype)
        h, new_cache = self.mtp(self.embed_tokens(next_ids), hidden, cos, sin, token_mask, cache,
                                cache_index, kv_valid, segment_ids)
        return self.logits(h), h, new_cache
