"""The jitted train step: loss + grads (with accumulation), optax update, metrics; optionally
sharded over a mesh (params and optimizer state by the sharding plan, the batch over the batch
axes).

    trainer = Trainer(config, OptimizerConfig(...), TrainConfig(compute_dtype="bfloat16"))
    state = trainer.init_state(params, seed=0)
    state, metrics = trainer.step(state, batch)   # batch: see qnext_jax.train.loss

The train state is a plain dict pytree ``{"step": int32, "params": float32 tree, "opt_state",
"rng": uint32[2]}`` (what the Orbax checkpoints hold), plus ``"lora"`` (the adapters) with LoRA.
With ``TrainConfig.scan_layers`` the state's params (and optimizer state, adapters) are in the
model's scanned layout (``qnext_jax.modeling.decoder.stack_layers``); the Trainer's methods take
and return params in the per-layer layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qnext_jax import sharding
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling import Qwen3NextForCausalLM
from qnext_jax.modeling.decoder import scan_period, stack_layers, unstack_layers
from qnext_jax.train import loss as L
from qnext_jax.train.lora import DEFAULT_TARGETS, init_lora, merge
from qnext_jax.train.optimizer import OptimizerConfig, make_optimizer, make_schedule

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "attention_mask")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the step computes.

    Attributes:
      compute_dtype: activations / matmul dtype ("bfloat16" or "float32"); params and optimizer
        state stay float32.
      remat: per-layer rematerialisation: "none", "full" or "dots" (see the model's ``remat``).
      grad_accum: micro-batches per step (the batch's leading dim must divide by it); the
        cross-entropy is normalised by the whole batch's token count, so accumulation gives the
        large-batch gradient (the router aux loss is the mean of the micro-batches' losses).
      aux_coef: router load-balancing coefficient (None: config.router_aux_loss_coef).
      mtp_coef: weight of the MTP head's loss (0: off; needs an MTP head).
      max_segments: static bound on documents (runs of a segment id) per packed row.
      gdn_impl: the Gated DeltaNet backend ("auto", "reference", ...).
      precision: matmul precision (None: default; "highest" for float32 cross-checks on GPU).
      lora_rank: > 0 trains LoRA adapters of this rank instead of the params (which stay
        frozen; the optimizer sees the adapters only; ``OptimizerConfig.train`` is ignored).
      lora_alpha: the adapters' scale is lora_alpha / lora_rank.
      lora_targets: regex over "/"-joined param paths of the adapted kernels.
      scan_layers: run the layers as a scan over the blocks of the periodic layer pattern
        (compile time flat in depth; see the model's ``scan_layers``). Train-state checkpoints
        then hold the scanned layout: resume with the same setting.
    """

    compute_dtype: str = "bfloat16"
    remat: str = "none"
    grad_accum: int = 1
    aux_coef: float | None = None
    mtp_coef: float = 0.0
    max_segments: int | None = None
    gdn_impl: str = "auto"
    precision: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = DEFAULT_TARGETS
    scan_layers: bool = False


def _mtp_mask(mask):
    return mask * jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def state_shardings(state_shapes, param_sh, mesh):
    """Shardings of a train state: each params-shaped leaf of the optimizer state (Adam's mu and
    nu) like its param (matched by path suffix and shape), everything else replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    flat_params = {_path_keys(p): s for p, s in
                   jax.tree_util.tree_flatten_with_path(param_sh)[0]}
    shapes = {_path_keys(p): s.shape for p, s in
              jax.tree_util.tree_flatten_with_path(state_shapes["params"])[0]}
    by_len: dict[int, dict] = {}
    for k, v in flat_params.items():
        by_len.setdefault(len(k), {})[k] = v

    def pick(path, leaf):
        keys = tuple(k for k in _path_keys(path) if isinstance(k, str))
        for n, table in by_len.items():
            suffix = keys[-n:] if len(keys) >= n else None
            if suffix in table and shapes[suffix] == leaf.shape:
                return table[suffix]
        return replicated

    out = jax.tree_util.tree_map_with_path(pick, {k: v for k, v in state_shapes.items()
                                                   if k != "params"})
    out["params"] = param_sh
    return out


class Trainer:
    """Builds the model, optimizer and the jitted train step for one config.

    Args:
      config: the model config.
      opt: :class:`OptimizerConfig`.
      train: :class:`TrainConfig`.
      mesh: a ``jax.sharding.Mesh`` (axes data, fsdp, expert, tensor) or None (one device).
        With a mesh, params and optimizer state are sharded by ``qnext_jax.sharding`` and the
        batch over the batch axes; the MoE runs expert-parallel.
    """

    def __init__(self, config: Qwen3NextConfig, opt: OptimizerConfig | None = None,
                 train: TrainConfig | None = None, mesh=None):
        self.config = config
        self.opt = opt or OptimizerConfig()
        self.train = train or TrainConfig()
        self.mesh = mesh
        t = self.train
        if t.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {t.grad_accum}")
        if t.mtp_coef and config.mtp_num_hidden_layers == 0:
            raise ValueError("mtp_coef > 0 needs a checkpoint with an MTP head "
                             "(mtp_num_hidden_layers = 0)")
        if t.scan_layers:
            scan_period(config)  # a non-periodic layer pattern fails here
        precision = None if t.precision is None else jax.lax.Precision(t.precision.upper()) \
            if isinstance(t.precision, str) else t.precision
        self.model = Qwen3NextForCausalLM(config, dtype=jnp.dtype(t.compute_dtype),
                                          param_dtype=jnp.float32, precision=precision,
                                          gdn_impl=t.gdn_impl, remat=t.remat,
                                          scan_layers=t.scan_layers)
        self.aux_coef = config.router_aux_loss_coef if t.aux_coef is None else t.aux_coef
        self.schedule = make_schedule(self.opt)
        self.tx = None
        self._step = None
        self._state_sh = None

    # ------------------------------------------------------------------ state
    def _to_model(self, params):
        """Per-layer params -> the model's layout (scanned with ``scan_layers``)."""
        return stack_layers(params, self.config) if self.train.scan_layers else params

    def init_state(self, params, seed: int = 0) -> dict:
        """A fresh train state from (any dtype) per-layer params: float32 master copy,
        optimizer state, step 0, an RNG key from ``seed`` (placed on the mesh when there is
        one)."""
        # A copy: the step donates the state, the caller's params must survive.
        params = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32, copy=True),
                                        self._to_model(params))
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "rng": jax.random.key_data(jax.random.key(seed))}
        if self.lora:
            state["lora"] = init_lora(params, self.train.lora_rank, self.train.lora_targets, seed)
        self.tx = self._make_tx(state)
        state["opt_state"] = self.tx.init(self._trainable(state))
        if self.mesh is not None:
            state = jax.device_put(state, self.state_shardings(state))
        elif len(devices := jax.tree_util.tree_leaves(params)[0].devices()) == 1:
            # every leaf committed to the params' device, as the step's outputs are (a state of
            # committed params and uncommitted counters compiled the step a second time)
            state = jax.device_put(state, next(iter(devices)))
        return state

    def abstract_state(self, params_shapes) -> dict:
        """The train state's ShapeDtypeStructs for per-layer params of these shapes (for
        restoring)."""
        params_shapes = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params_shapes)
        def build(p):
            p = self._to_model(p)
            state = {"step": jnp.zeros((), jnp.int32), "params": p,
                     "rng": jax.random.key_data(jax.random.key(0))}
            if self.lora:
                state["lora"] = init_lora(p, self.train.lora_rank, self.train.lora_targets)
            tx = self._make_tx(state)
            state["opt_state"] = tx.init(self._trainable(state))
            return state

        out = jax.eval_shape(build, params_shapes)
        if self.tx is None:
            self.tx = self._make_tx(out)
        return out

    @property
    def lora(self) -> bool:
        return self.train.lora_rank > 0

    def _trainable(self, state):
        return state["lora"] if self.lora else state["params"]

    def _make_tx(self, state):
        if self.lora:
            return make_optimizer(dataclasses.replace(self.opt, train="all"), state["lora"])
        return make_optimizer(self.opt, state["params"])

    def _full_params(self, params, lora):
        if lora is None:
            return params
        return merge(params, lora, self.train.lora_alpha, self.train.lora_rank)

    def export_params(self, state) -> dict:
        """The model params of a state in the per-layer layout (LoRA adapters merged in)."""
        params = state["params"]
        if self.lora:
            params = jax.jit(self._full_params)(params, state["lora"])
        return unstack_layers(params, self.config) if self.train.scan_layers else params

    def state_shardings(self, state) -> dict | None:
        """NamedShardings of the train state on the mesh (None without a mesh)."""
        if self.mesh is None:
            return None
        if self._state_sh is None:
            param_sh = sharding.tree_shardings(self.mesh)(state["params"])
            self._state_sh = state_shardings(state, param_sh, self.mesh)
        return self._state_sh

    def batch_shardings(self, batch) -> dict | None:
        if self.mesh is None:
            return None
        return {k: sharding.named(self.mesh, ("batch", "length"), v.shape)
                for k, v in batch.items()}

    # ------------------------------------------------------------------ step
    def _loss_and_grads(self, params, batch, lora=None):
        """Loss, terms and grads w.r.t. ``params`` (or w.r.t. ``lora`` when given)."""
        t, model = self.train, self.model
        A = t.grad_accum
        mask = batch["loss_mask"].astype(jnp.float32)
        ce_count = jnp.sum(mask)
        mtp_count = jnp.sum(_mtp_mask(mask))
        mtp = bool(t.mtp_coef)

        def micro_loss(p, mb):
            full = p if lora is None else self._full_params(params, p)
            terms = L.loss_terms(model, full, mb, mtp=mtp, max_segments=t.max_segments)
            loss = terms["ce_sum"] / jnp.maximum(ce_count, 1.0) + self.aux_coef * terms["aux"] / A
            if mtp:
                loss = loss + t.mtp_coef * terms["mtp_sum"] / jnp.maximum(mtp_count, 1.0)
            return loss, terms

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        wrt = params if lora is None else lora
        if A == 1:
            (loss, terms), grads = grad_fn(wrt, batch)
            return loss, terms, grads
        B = batch["input_ids"].shape[0]
        if B % A:
            raise ValueError(f"batch size {B} does not divide into grad_accum = {A} micro-batches")
        micro = jax.tree_util.tree_map(lambda x: x.reshape((A, B // A) + x.shape[1:]), batch)

        def body(carry, mb):
            loss_acc, terms_acc, g_acc = carry
            (loss, terms), g = grad_fn(wrt, mb)
            g_acc = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            terms_acc = jax.tree_util.tree_map(jnp.add, terms_acc, terms)
            return (loss_acc + loss, terms_acc, g_acc), None

        zeros_g = jax.tree_util.tree_map(jnp.zeros_like, wrt)
        zeros_t = {k: jnp.zeros((), jnp.float32) for k in
                   ("ce_sum", "ce_count", "aux", "mtp_sum", "mtp_count")}
        (loss, terms, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros_t,
                                                      zeros_g), micro)
        terms = dict(terms, aux=terms["aux"] / A)
        return loss, terms, grads

    def _step_fn(self, state, batch):
        params = state["params"]
        lora = state.get("lora")
        loss, terms, grads = self._loss_and_grads(params, batch, lora)
        trainable = params if lora is None else lora
        updates, opt_state = self.tx.update(grads, state["opt_state"], trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {
            "loss": loss,
            "ce": terms["ce_sum"] / jnp.maximum(terms["ce_count"], 1.0),
            "aux": terms["aux"],
            "tokens": terms["ce_count"],
            "grad_norm": optax.global_norm(grads),
            "lr": self.schedule(state["step"]),
        }
        if self.train.mtp_coef:
            metrics["mtp"] = terms["mtp_sum"] / jnp.maximum(terms["mtp_count"], 1.0)
        new_state = {"step": state["step"] + 1, "params": params if lora is not None else
                     trainable, "opt_state": opt_state, "rng": state["rng"]}
        if lora is not None:
            new_state["lora"] = trainable
        return new_state, metrics

    def step(self, state: dict, batch: Mapping[str, Any]):
        """One optimizer step on ``batch`` (numpy or jax arrays; keys of :data:`BATCH_KEYS`).
        Returns (new state, metrics dict of float32 scalars: loss, ce, aux, [mtp], tokens,
        grad_norm, lr). The input state is donated."""
        batch = {k: jnp.asarray(v) for k, v in batch.items() if k in BATCH_KEYS and v is not None}
        if self.tx is None:
            self.tx = self._make_tx(state)
        if self._step is None:
            if self.mesh is None:
                self._step = jax.jit(self._step_fn, donate_argnums=0)
            else:
                st_sh = self.state_shardings(state)
                self._step = jax.jit(self._step_fn, donate_argnums=0,
                                     in_shardings=(st_sh, self.batch_shardings(batch)),
                                     out_shardings=(st_sh, None))
        if self.mesh is None:
            return self._step(state, batch)
        batch = jax.device_put(batch, self.batch_shardings(batch))
        with sharding.activate(self.mesh):
            return self._step(state, batch)

    def loss(self, params, batch) -> jax.Array:
        """The loss of one batch (no update; jitted once per shape); ``params``: per-layer
        params or a train state (its LoRA adapters merged)."""
        batch = {k: jnp.asarray(v) for k, v in batch.items() if k in BATCH_KEYS and v is not None}
        if not hasattr(self, "_loss_jit"):
            t = self.train
            self._loss_jit = jax.jit(lambda p, b: L.total_loss(
                L.loss_terms(self.model, self._to_model(p), b, mtp=bool(t.mtp_coef),
                             max_segments=t.max_segments),
                self.aux_coef, t.mtp_coef))
        if isinstance(params, dict) and "params" in params and "step" in params:  # a state
            params = self.export_params(params)
        return self._loss_jit(params, batch)
