"""The optimizer: optax AdamW, linear warmup + cosine decay, global-norm clipping, freezing.

    opt = OptimizerConfig(learning_rate=1e-5, warmup_steps=100, total_steps=2000, train="attention")
    tx = make_optimizer(opt, params)          # an optax.GradientTransformation
    lr_at = make_schedule(opt)                # step -> learning rate

Optimizer state and the master params are float32 whatever the compute dtype (the train step
keeps float32 params and casts them in the model's matmuls).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import optax

from qnext_jax.modeling.decoder import unstacked_ndim

# Named parameter groups for ``OptimizerConfig.train``: a leaf belongs to the group when its
# "/"-joined path matches the regex.
TRAIN_GROUPS: dict[str, str] = {
    "all": r".*",
    "attention": r"(^|/)(self_attn|linear_attn)/",          # gated attention + Gated DeltaNet
    "experts": r"(^|/)mlp/experts/",                         # routed experts only
    "mlp": r"(^|/)mlp/",                                     # every FFN (router, shared, dense)
    "router": r"(^|/)mlp/gate/",
    "norms": r"(norm|layernorm)[^/]*/weight$",
    "lm_head": r"^(lm_head|embed_tokens)/",
    "mtp": r"^mtp/",
}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + schedule + clipping + which params train.

    Attributes:
      learning_rate: peak learning rate (after warmup).
      warmup_steps: linear warmup from 0 to ``learning_rate``.
      total_steps: steps of the whole run (the cosine decays over total_steps - warmup_steps).
      min_lr_ratio: the cosine ends at ``learning_rate * min_lr_ratio``.
      weight_decay: decoupled weight decay, applied to matrices only (ndim >= 2 per layer: not
        to norms, biases, A_log, dt_bias, also when stacked in the scanned layout).
      b1, b2, eps: Adam moments.
      clip_norm: clip the (trainable) gradients to this global norm; None: no clipping.
      train: which params train: a group of :data:`TRAIN_GROUPS` ("all", "attention",
        "experts", "mlp", "router", "norms", "lm_head", "mtp"), several joined with "+", or
        "re:REGEX" matched against the "/"-joined param path. The rest stay frozen (their
        updates are zero and they hold no optimizer state).
    """

    learning_rate: float = 1e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    train: str = "all"

    def __post_init__(self):
        train_regex(self.train)  # a bad selection fails here, before a run starts


def make_schedule(cfg: OptimizerConfig) -> Callable:
    """Learning rate per step: linear warmup 0 -> peak over ``warmup_steps``, then cosine to
    ``peak * min_lr_ratio`` at ``total_steps``."""
    warm = max(int(cfg.warmup_steps), 0)
    total = max(int(cfg.total_steps), warm + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warm else cfg.learning_rate, peak_value=cfg.learning_rate,
        warmup_steps=warm, decay_steps=total, end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def train_regex(train: str) -> re.Pattern:
    """The compiled regex of a ``train`` selection (see :class:`OptimizerConfig`).

    Raises:
      ValueError: an unknown group name (lists the known ones); "re:" before a pattern that
        is not a regular expression.
    """
    if train.startswith("re:"):
        try:
            return re.compile(train[3:])
        except re.error as e:
            raise ValueError(f"train {train!r}: not a valid regular expression after 're:' "
                             f"({e})") from None
    parts = []
    for name in train.split("+"):
        name = name.strip()
        if name not in TRAIN_GROUPS:
            raise ValueError(f"train: unknown parameter group {name!r}; known: "
                             f"{', '.join(TRAIN_GROUPS)} (join with '+'), or 're:REGEX'")
        parts.append(f"(?:{TRAIN_GROUPS[name]})")
    return re.compile("|".join(parts))


def trainable_mask(params, train: str = "all"):
    """A tree of bools like ``params``: True where the leaf trains.

    Raises:
      ValueError: the selection matches no parameter.
    """
    rx = train_regex(train)
    mask = jax.tree_util.tree_map_with_path(lambda p, _: bool(rx.search(_path_str(p))), params)
    if not any(jax.tree_util.tree_leaves(mask)):
        raise ValueError(f"train={train!r} selects no parameter")
    return mask


def make_optimizer(cfg: OptimizerConfig, params) -> optax.GradientTransformation:
    """The optax transformation of ``cfg`` for a params tree (arrays or ShapeDtypeStructs).

    clip_by_global_norm(clip_norm) -> adamw(schedule, b1, b2, eps, weight_decay on matrices),
    under ``optax.multi_transform`` with ``set_to_zero`` for frozen params when ``train`` is
    not "all" (clipping then sees the trainable gradients only).
    """
    def decay_mask(tree):  # a callable: works on multi_transform's masked sub-trees too
        return jax.tree_util.tree_map_with_path(lambda p, x: unstacked_ndim(p, x.shape) >= 2,
                                                tree)

    chain = []
    if cfg.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    tx = optax.chain(*chain)
    if cfg.train == "all":
        return tx
    mask = trainable_mask(params, cfg.train)
    labels = jax.tree_util.tree_map(lambda m: "train" if m else "frozen", mask)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
