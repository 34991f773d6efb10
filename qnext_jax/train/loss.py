"""Training losses: masked next-token cross-entropy, the router load-balancing loss, MTP loss.

Batch format (what :mod:`qnext_jax.train.data` produces and every loss here reads), all [B, T]:

- ``input_ids`` int32: the tokens fed to the model.
- ``targets`` int32: the token to predict at each position (``input_ids`` shifted left by one
  within a document; anything where ``loss_mask`` is 0).
- ``loss_mask`` float32 / bool: 1 where ``targets`` counts in the loss.
- ``segment_ids`` int32 (optional): document id of each token in a packed row (1, 2, ...), 0 on
  padding. Attention is block-diagonal over segments; the GDN state and conv restart at each
  segment start; RoPE positions restart at 0.
- ``attention_mask`` (optional, unpacked batches only): 1 = token, 0 = padding.

The total loss follows transformers' ``Qwen3NextForCausalLM.forward(labels=...,
output_router_logits=True)``: mean cross-entropy over the counted targets plus
``router_aux_loss_coef * load_balancing_loss_func(router_logits, E, top_k, attention_mask)``;
plus, optionally, ``mtp_coef`` times the MTP head's mean cross-entropy on token i+2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qnext_jax.modeling.decoder import BLOCKS, scan_period

IGNORE_INDEX = -100


def batch_from_labels(input_ids, labels, attention_mask=None) -> dict[str, np.ndarray]:
    """Our batch dict from transformers-style ``labels`` (same shape as ``input_ids``; -100 =
    ignored; the model shifts them: position t predicts ``labels[:, t + 1]``).

    Args:
      input_ids, labels: [B, T] integer arrays. attention_mask: [B, T] or None.
    Returns:
      {"input_ids", "targets", "loss_mask" (float32)[, "attention_mask"]} as numpy arrays.
    """
    input_ids, labels = np.asarray(input_ids), np.asarray(labels)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels have shape {labels.shape}, expected input_ids' shape "
                         f"{input_ids.shape}")
    shifted = np.concatenate([labels[:, 1:], np.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    mask = shifted != IGNORE_INDEX
    out = {"input_ids": input_ids.astype(np.int32),
           "targets": np.where(mask, shifted, 0).astype(np.int32),
           "loss_mask": mask.astype(np.float32)}
    if attention_mask is not None:
        out["attention_mask"] = np.asarray(attention_mask).astype(np.int32)
    return out


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Sum of weighted token cross-entropies and the sum of weights.

    Args:
      logits: [B, T, V] (any float dtype; the log-softmax is computed in float32).
      targets: [B, T] int ids. weights: [B, T] (0 = not counted).
    Returns:
      (sum_t w_t * (logsumexp(logits_t) - logits_t[target_t]), sum_t w_t), float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    return jnp.sum((lse - picked) * w), jnp.sum(w)


def load_balancing_loss(router_logits: Sequence[jax.Array], num_experts: int, top_k: int,
                        token_mask: jax.Array | None = None) -> jax.Array:
    """Switch-Transformer load-balancing loss from the raw router logits of every MoE layer.

    Same math as transformers' ``load_balancing_loss_func`` (qwen3_next): over all layers'
    rows together, f_e = (top-k assignments to e) / rows and P_e = mean softmax probability of
    e; loss = E * sum_e f_e * P_e (the softmax is taken once, from the raw logits).

    Args:
      router_logits: one [N, E] array per MoE layer (N = B * T rows, row-major over [B, T]),
        or [..., N, E] with leading layer axes (several layers at once, e.g. a scanned model's
        stacked logits: the ops then do not grow with the depth).
      num_experts: E. top_k: experts per token.
      token_mask: [B, T] or [N] (1 = real token); padding rows are left out. None: all rows.
    Returns:
      float32 scalar (0.0 when there are no MoE layers).
    """
    if not router_logits:
        return jnp.zeros((), jnp.float32)
    counts = jnp.zeros((num_experts,), jnp.float32)
    prob_sum = jnp.zeros((num_experts,), jnp.float32)
    rows = jnp.zeros((), jnp.float32)
    m = None if token_mask is None else token_mask.reshape(-1, 1).astype(jnp.float32)  # [N, 1]
    for logits in router_logits:
        layers = math.prod(logits.shape[:-2])
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [..., N, E]
        _, chosen = jax.lax.top_k(probs, top_k)  # [..., N, k]
        onehot = jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32).sum(axis=-2)  # [..., N, E]
        if m is None:
            rows = rows + layers * probs.shape[-2]
        else:
            onehot, probs = onehot * m, probs * m
            rows = rows + layers * m.sum()
        counts = counts + onehot.reshape(-1, num_experts).sum(axis=0)
        prob_sum = prob_sum + probs.reshape(-1, num_experts).sum(axis=0)
    rows = jnp.maximum(rows, 1.0)
    return num_experts * jnp.sum((counts / rows) * (prob_sum / rows))


def collect_router_logits(intermediates: Mapping[str, Any], config) -> list[jax.Array]:
    """The sown ``router_logits`` of the main model's MoE layers: one [N, E] per layer in layer
    order; from a scanned model (``scan_layers``) one [L / P, N, E] per MoE layer of the block,
    in block order (for :func:`load_balancing_loss`, which takes either).

    Args:
      intermediates: the ``"intermediates"`` collection returned by ``model.apply(...,
        mutable=["intermediates"])``.
      config: the model's config (the MTP head's router is not included, as in transformers,
        which has no MTP head).
    """
    if BLOCKS in intermediates:
        layers, n = intermediates[BLOCKS], scan_period(config)
    else:
        layers, n = intermediates, config.num_hidden_layers
    out = []
    for i in range(n):
        sown = layers.get(f"layers_{i}", {}).get("mlp", {}).get("router_logits")
        if sown is not None:
            out.extend(sown)
    return out


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the model call taken from a batch dict."""
    kw = {}
    if batch.get("attention_mask") is not None:
        kw["attention_mask"] = batch["attention_mask"]
    if batch.get("segment_ids") is not None:
        kw["segment_ids"] = batch["segment_ids"]
    return kw


def token_mask_of(batch: Mapping[str, Any]) -> jax.Array | None:
    """[B, T] real-token mask of a batch (segment_ids > 0, or the attention mask), or None."""
    if batch.get("segment_ids") is not None:
        return batch["segment_ids"] > 0
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].astype(bool)
    return None


def loss_terms(model, params, batch: Mapping[str, Any], *, mtp: bool = False,
               max_segments: int | None = None) -> dict[str, jax.Array]:
    """Forward pass and the unnormalised pieces of the training loss.

    Args:
      model: a :class:`~qnext_jax.modeling.Qwen3NextForCausalLM`.
      params: its params tree.
      batch: see the module docstring.
      mtp: also compute the MTP head's cross-entropy (the config must have an MTP head).
      max_segments: static bound on the segments per packed row (see the model's call).
    Returns:
      {"ce_sum", "ce_count", "aux" (load-balancing loss, unscaled), "mtp_sum", "mtp_count"}:
      float32 scalars (mtp terms 0 without ``mtp``).
    """
    cfg = model.config
    kw = model_inputs(batch)
    if max_segments is not None and "segment_ids" in kw:
        kw["max_segments"] = max_segments
    (logits, _, hidden), state = model.apply(
        {"params": params}, batch["input_ids"], output_hidden_states=True,
        mutable=["intermediates"], **kw)
    ce_sum, ce_count = cross_entropy_sum(logits, batch["targets"], batch["loss_mask"])
    token_mask = token_mask_of(batch)
    router = collect_router_logits(state.get("intermediates", {}), cfg)
    aux = load_balancing_loss(router, cfg.num_experts, cfg.num_experts_per_tok, token_mask)
    out = {"ce_sum": ce_sum, "ce_count": ce_count, "aux": aux,
           "mtp_sum": jnp.zeros((), jnp.float32), "mtp_count": jnp.zeros((), jnp.float32)}
    if mtp:
        out["mtp_sum"], out["mtp_count"] = mtp_loss_terms(model, params, batch, hidden[-1],
                                                          max_segments)
    return out


def mtp_loss_terms(model, params, batch, final_hidden, max_segments=None):
    """MTP cross-entropy sum and count: from h_i and token i+1 (``targets[:, i]``) predict token
    i+2 (``targets[:, i + 1]``), counted where both targets count (same document)."""
    B = batch["input_ids"].shape[0]
    targets = batch["targets"]
    mask = batch["loss_mask"].astype(jnp.float32)
    next_ids = targets  # token i+1 (0 where not counted; masked out below)
    mtp_targets = jnp.concatenate([targets[:, 1:], jnp.zeros((B, 1), targets.dtype)], axis=1)
    mtp_mask = mask * jnp.concatenate([mask[:, 1:], jnp.zeros((B, 1), mask.dtype)], axis=1)
    kw = model_inputs(batch)
    if max_segments is not None and "segment_ids" in kw:
        kw["max_segments"] = max_segments
    logits, _, _ = model.apply({"params": params}, final_hidden, next_ids, kw,
                               method=_mtp_forward)
    return cross_entropy_sum(logits, mtp_targets, mtp_mask)


def _mtp_forward(module, final_hidden, next_ids, kw):
    """Runs the MTP head on the main model's final hidden states (positions as the model's)."""
    segment_ids = kw.get("segment_ids")
    attention_mask = kw.get("attention_mask")
    token_mask, positions = module._positions_and_masks(next_ids, attention_mask, None,
                                                        segment_ids)
    return module.mtp_logits(final_hidden, next_ids, positions, token_mask,
                             segment_ids=segment_ids)


def total_loss(terms: Mapping[str, jax.Array], aux_coef: float, mtp_coef: float = 0.0,
               ce_count=None, mtp_count=None) -> jax.Array:
    """mean CE + aux_coef * aux + mtp_coef * mean MTP CE (counts may be given globally, for
    gradient accumulation)."""
    ce_count = terms["ce_count"] if ce_count is None else ce_count
    loss = terms["ce_sum"] / jnp.maximum(ce_count, 1.0) + aux_coef * terms["aux"]
    if mtp_coef:
        mtp_count = terms["mtp_count"] if mtp_count is None else mtp_count
        loss = loss + mtp_coef * terms["mtp_sum"] / jnp.maximum(mtp_count, 1.0)
    return loss


def loss_fn(params, model, batch, *, aux_coef: float | None = None, mtp_coef: float = 0.0,
            max_segments: int | None = None):
    """The scalar training loss of one batch and its parts (for ``jax.value_and_grad`` with
    ``has_aux=True``). ``aux_coef`` defaults to ``config.router_aux_loss_coef``."""
    aux_coef = model.config.router_aux_loss_coef if aux_coef is None else aux_coef
    terms = loss_terms(model, params, batch, mtp=bool(mtp_coef), max_segments=max_segments)
    return total_loss(terms, aux_coef, mtp_coef), terms
