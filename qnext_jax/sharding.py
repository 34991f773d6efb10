"""The sharding plan: one mesh with axes (data, fsdp, expert, tensor), logical axes, one rules table.

Every parameter and cache leaf gets *logical* axis names derived from its path and shape
(:func:`param_logical_axes`, :func:`cache_logical_axes`); a rules table maps each logical name to
zero or more mesh axes (:data:`DEFAULT_RULES`); :func:`logical_to_spec` turns the two into a
``PartitionSpec``::

    from qnext_jax import sharding
    mesh = sharding.make_mesh("data=2,expert=4")                    # 8 devices
    config, params = qnext_jax.load("CKPT", mesh=mesh)              # restored sharded
    # (sharding.param_shardings(config, mesh): the NamedSharding of every leaf)
    with sharding.activate(mesh):                                    # at trace time
        logits, cache = jax.jit(model.apply)({"params": params}, ids)

Defaults (:data:`DEFAULT_RULES`):

==============  ==========================  =============================================
logical         mesh axes                   used by
==============  ==========================  =============================================
batch           data, fsdp, expert          activations, cache batch dim
length          (replicated)                sequence / cache slots
embed           fsdp                        the hidden dim of weights (FSDP)
act_embed       (replicated)                the hidden dim of activations
heads           tensor                      q/o projections, GDN projections, GDN state
kv_heads        tensor                      k/v projections, K/V cache
mlp             tensor                      MoE / shared / dense intermediate dim
experts         expert, tensor              stacked routed experts [E, ...]
vocab           tensor                      embedding rows, lm_head columns
layers          (replicated)                the block axis of scanned params, caches
==============  ==========================  =============================================

Fallback: a dimension whose size is not divisible by the product of its mesh axes keeps the
longest prefix of those axes that divides it (possibly none: replicated), and a mesh axis is used
at most once per array (later dims lose it). E.g. TINY_HF's single kv head stays replicated on
``tensor=2``; a batch of 2 on ``expert=8`` stays replicated. The result is always correct (XLA's
SPMD partitioner inserts whatever communication a layout needs); the rules only decide speed and
memory.

The routed experts split over ``expert`` x ``tensor`` (their intermediate dim then keeps whole:
``tensor`` is taken), as vLLM's expert parallelism spans its tensor-parallel group: on
``tensor=2`` the attention and Gated DeltaNet heads, the shared expert and the vocabulary split in
two and each device holds half the experts, so no layer's work is repeated on both devices.
Expert parallelism (the MoE block, :func:`qnext_jax.modeling.moe.expert_parallel_experts`) is
used when a mesh is active (:func:`activate`) whose experts split (``expert`` or ``tensor`` above
1, dividing the number of experts). Ops XLA cannot partition (the Pallas kernels of the Gated
DeltaNet, flash attention) run per shard through :func:`map_shards`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

MESH_AXES = ("data", "fsdp", "expert", "tensor")

DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", ()),
    ("embed", ("fsdp",)),
    ("act_embed", ()),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("experts", ("expert", "tensor")),
    ("vocab", ("tensor",)),
    ("layers", ()),
)


# ----------------------------------------------------------------------------------- the mesh
def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``"data=2,expert=4"`` (or a dict) -> {data, fsdp, expert, tensor: size}; missing axes 1.

    Raises:
      ValueError: an unknown axis name, a repeated axis, or a size that is not a positive int.
    """
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not AXIS=SIZE (axes: "
                                 f"{', '.join(MESH_AXES)})")
            name, size = part.split("=", 1)
            items.append((name, size))
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for name, size in items:
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; the axes are "
                             f"{', '.join(MESH_AXES)}")
        if name in seen:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            n = int(size)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be a positive integer, "
                             f"got {size!r} (axes are separated by commas: "
                             "'tensor=2,expert=4')")
        sizes[name] = n
    return sizes


def make_mesh(spec: str | Mapping[str, int] = "", devices: Sequence | None = None):
    """A ``jax.sharding.Mesh`` with axes (data, fsdp, expert, tensor) from a spec.

    Args:
      spec: ``"data=1,expert=8"``-style string or dict; absent axes have size 1. An empty spec
        puts every device on ``data``.
      devices: the devices to use (default ``jax.devices()``, all processes' devices).
    Raises:
      ValueError: a malformed spec, or a product of sizes different from the device count.
    """
    import jax

    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    if all(v == 1 for v in sizes.values()):
        sizes["data"] = len(devices)
    total = math.prod(sizes.values())
    if total != len(devices):
        desc = ",".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"mesh spec {spec!r} ({desc}) needs {total} devices, but "
                         f"{len(devices)} {'is' if len(devices) == 1 else 'are'} available "
                         f"(jax.device_count() = {jax.device_count()}); the product of the axis "
                         "sizes must equal the device count (on a CPU, XLA_FLAGS="
                         "--xla_force_host_platform_device_count=N before jax starts gives N)")
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices,
                                            allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 (CPU or unusual topologies: plain order)
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return jax.sharding.Mesh(arr, MESH_AXES)


def mesh_sizes(mesh) -> dict[str, int]:
    """{axis: size} of a mesh (axes absent from it count as 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    sizes.update(dict(mesh.shape))
    return sizes


# ------------------------------------------------------------------------- logical -> spec
def _rules_dict(rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, axes in (rules.items() if isinstance(rules, Mapping) else rules):
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        out[name] = tuple(axes)
    return out


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh,
                    rules=DEFAULT_RULES):
    """The ``PartitionSpec`` for an array of ``shape`` with logical axes ``logical``.

    A logical name absent from ``rules`` (or None) is replicated. Each dim keeps the longest
    prefix of its mesh axes whose size product divides the dim and that no earlier dim used;
    mesh axes of size 1 are dropped.
    """
    from jax.sharding import PartitionSpec

    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    table = _rules_dict(rules)
    sizes = mesh_sizes(mesh)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        kept: list[str] = []
        prod = 1
        for ax in table.get(name, ()) if name is not None else ():
            if ax not in sizes or ax in used or sizes[ax] == 1:
                continue
            if dim % (prod * sizes[ax]):
                break
            kept.append(ax)
            prod *= sizes[ax]
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def batch_axes(batch: int, mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes a batch (or flat token) dim of size ``batch`` is sharded over."""
    s = logical_to_spec(("batch",), (batch,), mesh, rules)
    if not s or s[0] is None:
        return ()
    return (s[0],) if isinstance(s[0], str) else tuple(s[0])


# ------------------------------------------------------------------------ parameter axes
def param_logical_axes(path: Sequence[str], shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axes of one params leaf from its path (e.g. ("layers_0", "mlp", "experts",
    "gate_proj")) and shape. Leaves of the scanned layout (under ``"blocks"``, see
    :mod:`qnext_jax.modeling.decoder`) get a leading "layers" axis before their layer's axes.

    Raises:
      ValueError: a leaf this plan does not know (names the path).
    """
    from qnext_jax.modeling.decoder import BLOCKS

    path = tuple(path)
    if path[:1] == (BLOCKS,):
        return ("layers",) + param_logical_axes(path[1:], shape[1:])
    leaf, parent = path[-1], path[-2] if len(path) > 1 else ""
    nd = len(shape)
    where = "/".join(path)
    if path[-2:] == ("embed_tokens", "embedding"):
        return ("vocab", "embed")
    if parent == "lm_head":
        return ("embed", "vocab") if leaf == "kernel" else ("vocab",)
    if nd == 1 and leaf == "weight":  # every RMSNorm (incl. q/k norm, the gated GDN norm)
        return (None,)
    if leaf in ("A_log", "dt_bias"):
        return ("heads",)
    if "experts" in path and leaf in ("gate_proj", "up_proj", "down_proj") and nd == 3:
        return ("experts", "embed", "mlp") if leaf != "down_proj" else ("experts", "mlp", "embed")
    if parent == "conv1d" and leaf == "kernel":  # HF channel order: replicated (see
        return (None, None)  # gated_deltanet.DepthwiseConv1d; K x conv_dim values)
    kernel_axes = {
        "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"),
        "v_proj": ("embed", "kv_heads"), "o_proj": ("heads", "embed"),
        "in_proj_qkvz": ("embed", "heads"), "in_proj_ba": ("embed", "heads"),
        "out_proj": ("heads", "embed"),
        "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
        "down_proj": ("mlp", "embed"),
        "gate": ("embed", None),  # the router: replicated over experts, tokens route locally
        "shared_expert_gate": ("embed", None),
        "fc": (None, "embed"),  # MTP fc [2d, d]
    }
    if parent in kernel_axes:
        axes = kernel_axes[parent]
        if leaf == "kernel" and nd == 2:
            return axes
        if leaf == "bias" and nd == 1:
            return (axes[1],)
    raise ValueError(f"no logical axes known for params leaf {where} of shape {tuple(shape)}")


def _map_tree(tree, fn, path=()):
    if isinstance(tree, Mapping):
        return {k: _map_tree(v, fn, path + (k,)) for k, v in tree.items()}
    return fn(path, tree)


def param_partition_specs(config, mesh, rules=DEFAULT_RULES, scan_layers: bool = False) -> dict:
    """A ``PartitionSpec`` per params leaf of ``config`` (nested dict like the params; in the
    scanned layout of ``stack_layers`` when ``scan_layers``)."""
    import jax

    from qnext_jax.convert.name_map import abstract_params
    from qnext_jax.modeling.decoder import stack_layers

    shapes = abstract_params(config)
    if scan_layers:
        shapes = jax.eval_shape(lambda p: stack_layers(p, config), shapes)
    return _map_tree(shapes, lambda p, s: logical_to_spec(
        param_logical_axes(p, s.shape), s.shape, mesh, rules))


def param_shardings(config, mesh, rules=DEFAULT_RULES, scan_layers: bool = False) -> dict:
    """A ``NamedSharding`` per params leaf (the structure of ``convert.abstract_params``, or its
    scanned layout when ``scan_layers``), for ``qnext_jax.load(path, mesh=mesh,
    shardings=...)`` and jit in/out shardings."""
    from jax.sharding import NamedSharding

    return _map_tree(param_partition_specs(config, mesh, rules, scan_layers),
                     lambda _, spec: NamedSharding(mesh, spec))


def tree_shardings(mesh, rules=DEFAULT_RULES):
    """A callable: params tree (arrays or ``ShapeDtypeStruct``) -> ``NamedSharding`` tree.

    For ``load(path, mesh=mesh, shardings=tree_shardings(mesh))`` when the config is not known
    before loading, and for ``jax.device_put(params, tree_shardings(mesh)(params))``.
    """
    from jax.sharding import NamedSharding

    return lambda tree: _map_tree(tree, lambda p, s: NamedSharding(mesh, logical_to_spec(
        param_logical_axes(p, s.shape), s.shape, mesh, rules)))


# ----------------------------------------------------------------------------- cache axes
def cache_logical_axes(path: Sequence[str], shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axes of one leaf of :func:`qnext_jax.init_cache`'s pytree (either layout: leaves
    of the stacked layout, under ``"blocks"``, get a leading "layers" axis before their layer's
    axes, as the scanned params do). Also the per-token states of speculative verification
    (``qnext_jax.cache.track_token_states``).

    Raises:
      ValueError: a leaf this plan does not know (names the path).
    """
    from qnext_jax.modeling.decoder import BLOCKS

    path = tuple(path)
    if path[:1] == (BLOCKS,):
        return ("layers",) + cache_logical_axes(path[1:], shape[1:])
    leaf = path[-1]
    if leaf in ("key", "value"):
        return ("batch", "kv_heads", "length", None)
    if leaf == "conv_state":
        return ("batch", "heads", None)
    if leaf == "recurrent_state":
        return ("batch", "heads", None, None)
    if leaf == "conv_states":
        return ("batch", "length", "heads", None)
    if leaf == "recurrent_states":
        return ("batch", "length", "heads", None, None)
    if leaf == "positions":
        return ("batch",)
    if leaf == "valid":
        return ("batch", "length")
    if len(shape) == 0:
        return ()
    raise ValueError(f"no logical axes known for cache leaf {'/'.join(path)} of shape "
                     f"{tuple(shape)}")


def cache_partition_specs(config, mesh, batch_size: int, max_length: int, dtype=None,
                          rules=DEFAULT_RULES, scan_layers: bool = False) -> dict:
    """A ``PartitionSpec`` per leaf of ``init_cache(config, batch_size, max_length, dtype,
    scan_layers=scan_layers)`` (the stacked layout when ``scan_layers``: each stacked leaf keeps
    its layer's spec behind a replicated block axis)."""
    import jax
    import jax.numpy as jnp

    from qnext_jax.cache import init_cache

    shapes = jax.eval_shape(lambda: init_cache(config, batch_size, max_length,
                                               jnp.float32 if dtype is None else dtype,
                                               scan_layers=scan_layers))
    return _map_tree(shapes, lambda p, s: logical_to_spec(cache_logical_axes(p, s.shape),
                                                          s.shape, mesh, rules))


def cache_shardings(config, mesh, batch_size: int, max_length: int, dtype=None,
                    rules=DEFAULT_RULES, scan_layers: bool = False) -> dict:
    """A ``NamedSharding`` per leaf of ``init_cache(config, batch_size, max_length, dtype,
    scan_layers=scan_layers)``: batch over the batch axes (data first), heads over tensor (with
    the divisibility fallback), the block axis of the stacked layout replicated."""
    from jax.sharding import NamedSharding

    return _map_tree(cache_partition_specs(config, mesh, batch_size, max_length, dtype, rules,
                                           scan_layers),
                     lambda _, spec: NamedSharding(mesh, spec))


def named(mesh, logical: Sequence[str | None], shape: Sequence[int], rules=DEFAULT_RULES):
    """``NamedSharding`` of an array with logical axes (e.g. input ids ("batch", "length"))."""
    from jax.sharding import NamedSharding

    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


# ------------------------------------------------------- the active mesh (at trace time)
@dataclasses.dataclass(frozen=True)
class _Active:
    mesh: object
    rules: tuple


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("qnext_mesh",
                                                                         default=None)


@contextlib.contextmanager
def activate(mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """Make ``mesh`` and ``rules`` visible to the modules traced inside the block: activation
    constraints (:func:`constrain`) and the expert-parallel MoE. ``mesh=None`` deactivates."""
    token = _ACTIVE.set(None if mesh is None else _Active(mesh, tuple(
        _rules_dict(rules).items())))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh():
    """(mesh, rules) set by :func:`activate`, or None."""
    a = _ACTIVE.get()
    return None if a is None else (a.mesh, a.rules)


def constrain(x, logical: Sequence[str | None]):
    """``with_sharding_constraint`` of ``x`` to its logical axes under the active mesh (no-op
    without one)."""
    a = _ACTIVE.get()
    if a is None:
        return x
    import jax
    from jax.sharding import NamedSharding

    spec = logical_to_spec(logical, x.shape, a.mesh, a.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(a.mesh, spec))


def map_shards(fn, args: Sequence, in_logical: Sequence, out_logical):
    """``fn(*args)`` run on each device's shard of its arguments (``jax.shard_map``) under the
    active mesh, for ops XLA cannot partition itself (Pallas kernels: XLA would gather their
    operands whole to every device).

    Args:
      fn: arrays -> a tuple of arrays; it must be correct on any shard the specs give it (a
        per-head, per-sequence op split over batch and heads).
      args: the arrays. in_logical: per argument, its logical axes (a tuple as for
        :func:`constrain`). out_logical: per output, its logical axes.
    Each logical name resolves once for all the arguments: to the mesh axes of the rules whose
    size product divides every dim that carries the name (the longest prefix, as in
    :func:`logical_to_spec`), so dims sharing a name are split alike; a GQA kernel labels its
    query heads with the key heads' name, for instance, so each device holds the query heads of
    its own key heads. A mesh axis goes to the first name that takes it; an output name that
    no argument carries is replicated.
    Returns:
      ``fn``'s outputs, global; ``fn(*args)`` itself without an active mesh or when no
      argument dim is split.
    Raises:
      ValueError: logical axes whose length is not the argument's rank.
    """
    a = _ACTIVE.get()
    if a is None:
        return fn(*args)
    import jax
    from jax.sharding import PartitionSpec

    dims: dict[str, int] = {}
    for x, logical in zip(args, in_logical):
        if len(logical) != x.ndim:
            raise ValueError(f"map_shards: logical axes {tuple(logical)} do not match an "
                             f"argument of shape {x.shape}")
        for name, size in zip(logical, x.shape):
            if name is not None:
                dims[name] = math.gcd(dims.get(name, 0), size)
    names = list(dims)
    resolved = logical_to_spec(names, [dims[n] for n in names], a.mesh, a.rules)
    axes = dict(zip(names, tuple(resolved) + (None,) * (len(names) - len(resolved))))
    if all(v is None for v in axes.values()):
        return fn(*args)

    def spec(logical):
        return PartitionSpec(*(None if n is None else axes.get(n) for n in logical))

    return jax.shard_map(fn, mesh=a.mesh, in_specs=tuple(spec(lg) for lg in in_logical),
                         out_specs=tuple(spec(lg) for lg in out_logical),
                         check_vma=False)(*args)


def constrain_cache(cache):
    """:func:`constrain` every leaf of a cache pytree to :func:`cache_logical_axes` (no-op
    without an active mesh): the cache's out-sharding inside jitted prefill/decode."""
    if _ACTIVE.get() is None or cache is None:
        return cache
    return _map_tree(cache, lambda p, x: constrain(x, cache_logical_axes(p, x.shape)))
