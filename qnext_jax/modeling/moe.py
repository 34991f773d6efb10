"""Feed-forward blocks: the dense SwiGLU MLP and the dropless sparse MoE of Qwen3-Next.

Follows transformers' ``Qwen3NextMLP`` and ``Qwen3NextSparseMoeBlock``: router logits x W^T in the
model dtype, softmax over all experts in float32, top-k, optional renormalisation of the k
weights, experts ``down(silu(gate(x)) * up(x))`` combined with the router weights, plus the
sigmoid-gated shared expert. Dropless: tokens are sorted by expert and every expert runs as one
group of a grouped matmul (``jax.lax.ragged_dot``), so no token is ever dropped. On GPUs, where
XLA (jax 0.11/0.12) lowers ragged_dot to a dense [rows, experts, ...] expansion (52 ms at 1k
tokens, out of memory at 16k on an H200 for the 80B block), :func:`grouped_experts` uses
tokamax's ``ragged_dot`` (its Pallas Mosaic GPU grouped-matmul kernel; the optional ``gpu``
extra) when it is installed, and otherwise padded per-expert tiles (decode) or a static
per-expert capacity with a dropless fallback (see its ``impl``); scripts/bench_moe.py measures
them.

Expert parallelism (:func:`expert_parallel_experts`): under a mesh made active with
``qnext_jax.sharding.activate`` whose ``expert`` axis divides the number of experts, the routed
experts run under ``shard_map``: each device holds E / n_expert experts (and, with a ``tensor``
axis dividing the intermediate size, a slice of their intermediate dim). Dispatch is an
all-gather of the tokens (and their top-k choices) over the ``expert`` axis; each device runs its
local experts on every row routed to them (dropless: the row buffer is N * k, the worst case)
and the combine is a reduce-scatter (``psum_scatter``) back to the tokens' devices (a ``psum``
over ``tensor`` first when the intermediate dim is split). This exact, dropless scheme was
chosen over ``ragged_all_to_all``: it has the same worst-case buffer, lowers on every backend
(CPU included) and on jax 0.11 and 0.12, and moves N * d activations per direction, which is the
cheap side at decode batch sizes. The router and the shared expert run outside the
``shard_map``, where the tokens live.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.moe import BlockSizes as GatheredBlockSizes
from pallas_kernels.moe import (
    gathered_expert_outputs,
    gathered_expert_outputs_reference,
    gathered_experts,
    gathered_experts_reference,
    routed_experts,
)
from qnext_jax import sharding
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling.layers import (
    DenseKernel,
    _on_gpu,
    dense,
    import_tokamax,
    row_matmul,
)


class Qwen3NextMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``; x [..., d] -> [..., d].

    ``kernels_only=True`` returns the kernels instead, (gate_proj, up_proj [d, I], down_proj
    [I, d]) in ``dtype``, for the fused decode kernel of the MoE block (x is then not used)."""

    intermediate_size: int
    hidden_size: int
    std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, kernels_only: bool = False):
        d, inner = self.hidden_size, self.intermediate_size
        gate, up, down = (DenseKernel(shape, self.std, self.param_dtype, name=name)().astype(
            self.dtype) for name, shape in (("gate_proj", (d, inner)), ("up_proj", (d, inner)),
                                            ("down_proj", (inner, d))))
        if kernels_only:
            return gate, up, down
        def dot(x, w):
            return row_matmul(functools.partial(jnp.dot, b=w, precision=self.precision), x,
                              w.shape[1])

        x = x.astype(self.dtype)
        return dot(jax.nn.silu(dot(x, gate)) * dot(x, up), down)


ARGMAX_TOP_K_MIN_ROWS = 1024  # GPU: from this many tokens, top-k by repeated argmax
RANK_TOP_K_MAX_ROWS = 16  # GPU: up to this many tokens (decode), top-k by ranking


def rank_top_k(probs: jax.Array, k: int):
    """``lax.top_k`` over the last axis of [..., E] by each value's rank (the count of values
    above it, or equal at a lower id) from all E x E comparisons, and the ids of ranks 0..k-1:
    one or two fusions, no sort; the work grows as rows x E^2 (at 256 x 512 rows it stopped
    an H200 with an illegal memory access, jax 0.11.2: a form for decode sizes only)."""
    ids = jnp.arange(probs.shape[-1], dtype=jnp.int32)
    mine, other = probs[..., :, None], probs[..., None, :]
    beats = (other > mine) | ((other == mine) & (ids < ids[:, None]))  # [..., E, E]
    rank = jnp.sum(beats, axis=-1, dtype=jnp.int32)  # [..., E]
    slot = rank[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]  # [..., k, E]
    return (jnp.sum(jnp.where(slot, probs[..., None, :], 0), axis=-1),
            jnp.sum(jnp.where(slot, ids, 0), axis=-1))


def argmax_top_k(probs: jax.Array, k: int):
    """``lax.top_k`` over the last axis of [..., E] as k rounds of argmax, each masking its
    winner (argmax takes the first maximum, so ties go to the lower id): a few fusions a round,
    no sort."""
    ids = jnp.arange(probs.shape[-1], dtype=jnp.int32)
    left, weights, experts = probs, [], []
    for _ in range(k):
        e = jnp.argmax(left, axis=-1).astype(jnp.int32)
        weights.append(jnp.take_along_axis(probs, e[..., None], axis=-1)[..., 0])
        experts.append(e)
        left = jnp.where(ids == e[..., None], -jnp.inf, left)
    return jnp.stack(weights, axis=-1), jnp.stack(experts, axis=-1)


def _top_k(probs: jax.Array, k: int):
    """``lax.top_k`` over the last axis of probabilities [..., E]: the same experts and
    weights, ties to the lower id as top_k puts them (rows holding NaN may differ). On GPU,
    where XLA's top_k sorts every row (scripts/bench_topk.py times the three forms):
    - up to RANK_TOP_K_MAX_ROWS rows (decode), :func:`rank_top_k`: the sort was a 5.4 us
      kernel of the 55 us 80B block at one token; the 80B block (jnp gather experts, in a
      jitted loop, H200) took 110 / 175 / 619 us at 1 / 2 / 8 tokens against 117 / 183 / 626
      with argmax_top_k, and at 32 / 64 tokens 461 / 699 against 457 / 692 with top_k;
    - from ARGMAX_TOP_K_MIN_ROWS rows, :func:`argmax_top_k`: 0.23-0.27 against 0.51 ms for
      16384 x 512 on an H200;
    - in between, top_k."""
    rows = math.prod(probs.shape[:-1])
    if not _on_gpu() or RANK_TOP_K_MAX_ROWS < rows < ARGMAX_TOP_K_MIN_ROWS:
        return jax.lax.top_k(probs, k)
    if rows <= RANK_TOP_K_MAX_ROWS:
        return rank_top_k(probs, k)
    return argmax_top_k(probs, k)


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool):
    """Top-k routing: (weights [N, k] float32, expert ids [N, k] int32) from logits [N, E].

    The softmax sees exactly the values ``router_logits`` hold, as transformers' router does.
    Under jit XLA may skip the rounding of a bf16 dot's float32 sums to bf16 when a float32 use
    follows (its "excess precision", taken or not depending on fusion: on the CPU it is), and
    logits that tie in bf16 were then ranked by their unrounded sums instead of as ties
    (``lax.top_k`` puts the lower expert id first). With the 80B router (512 experts, top-10)
    about one token in ten has a bf16 tie between its 10th and 11th choice, and swapping that
    one expert moves the token's output by ~0.16 relative L2. ``lax.reduce_precision`` rounds
    the sums back (a no-op on values the logits hold).
    """
    logits = router_logits.astype(jnp.float32)
    info = jnp.finfo(router_logits.dtype)
    if info.bits < 32:
        logits = jax.lax.reduce_precision(logits, exponent_bits=info.nexp,
                                          mantissa_bits=info.nmant)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = _top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


MOE_IMPLS = ("auto", "ragged_dot", "gather", "gather_pallas", "tiles", "capacity", "tokamax")
DECODE_IMPLS = ("gather", "gather_pallas")  # per-token weight gathers: for a few tokens


def _decode_sized(rows: int, num_experts: int) -> bool:
    """A call of ``rows`` token-slots (tokens x top-k) is decode-sized: at most E / 2, where
    gathering each slot's expert weights reads no more than the experts themselves."""
    return rows <= num_experts // 2


TOKAMAX_ROW_MULTIPLE = 128  # rows handed to tokamax's ragged_dot: a multiple of its row tile
# tokamax's Mosaic GPU ragged_dot on Hopper (sm90) where the experts' groups average at least
# TOKAMAX_SM90_MIN_GROUP rows (prefill): (block_m, block_n, block_k, num_stages), a persistent
# grid walking row blocks first. scripts/tune_moe.py on an H200, the 80B block at 16384 tokens
# (320 rows an expert), the best of 42 configs against tokamax 0.0.17's heuristic (64, 64, 128,
# 2 stages, not persistent), ms a call: gate / up [163840, 2048] x [512, 2048, 512] 0.691
# against 1.192, down [163840, 512] x [512, 512, 2048] 0.920 against 1.214. At 1024 tokens
# (20 rows an expert) the heuristic was the fastest of 19 configs.
TOKAMAX_SM90_BLOCKS = (128, 128, 64, 6)
TOKAMAX_SM90_MIN_GROUP = 128
# The ``capacity`` impl's static rows per expert: mean + CAPACITY_SIGMAS * sqrt(mean) + 8.
CAPACITY_SIGMAS = 4.0


def _parse_impl(impl: str, fn: str) -> tuple[str, str | None]:
    """``impl`` as (one of MOE_IMPLS, tokamax implementation or None): "tokamax:mosaic" ->
    ("tokamax", "mosaic"). Raises ValueError (naming ``fn``) for an unknown impl."""
    name, _, implementation = (impl if isinstance(impl, str) else "").partition(":")
    if name not in MOE_IMPLS or (implementation and name != "tokamax"):
        raise ValueError(f"{fn}: impl must be one of {MOE_IMPLS} or 'tokamax:<implementation>', "
                         f"got {impl!r}")
    return name, implementation or None


def _tokamax_ragged_dot(implementation: str | None, blocks: tuple[int, ...] | None = None):
    """``tokamax.ragged_dot`` (same arguments as ``jax.lax.ragged_dot``) with its
    ``implementation``: "mosaic" (Pallas Mosaic GPU, bf16/fp16 on sm90+), "triton" (registered
    by tokamax only when jax-triton imports), "xla" (``jax.lax.ragged_dot``), or None: the first
    of those that takes the inputs. ``blocks`` (block_m, block_n, block_k, num_stages): run the
    Mosaic GPU kernel with these blocks on a persistent grid that walks the row blocks first,
    instead of tokamax's heuristic (callers pass them only for inputs that kernel takes).
    Raises ImportError when tokamax is not installed."""
    tokamax, error = import_tokamax()
    if tokamax is None:
        raise ImportError("grouped_experts(impl='tokamax') needs the optional tokamax package: "
                          "pip install 'qnext-jax[gpu]' (or pip install tokamax)") from error
    if blocks is not None:
        from tokamax.ops.gpu import PallasMosaicRaggedDot, PallasMosaicRaggedDotConfig

        bm, bn, bk, stages = blocks
        implementation = [PallasMosaicRaggedDot(config=PallasMosaicRaggedDotConfig(
            block_m=bm, block_n=bn, block_k=bk, num_stages=stages, split_k=1, persistent=True,
            grid_minor_dim=0, grid_tile_width=1))]  # 0: tokamax's MatmulDimension.M
    return functools.partial(tokamax.ragged_dot, implementation=implementation)


def _tokamax_sm90_blocks(implementation: str | None, xs, gate_proj,
                         experts_total: int) -> tuple[int, ...] | None:
    """TOKAMAX_SM90_BLOCKS where tokamax would run its Mosaic GPU kernel (``implementation``
    "mosaic" or None, bf16/fp16 rows and experts of one dtype) on an sm90 GPU and the routed rows
    xs [M, d] average at least TOKAMAX_SM90_MIN_GROUP an expert of ``experts_total``; else None
    (tokamax's heuristic)."""
    dev = jax.devices()[0]
    if (implementation in (None, "mosaic") and xs.dtype in (jnp.bfloat16, jnp.float16)
            and gate_proj.dtype == xs.dtype and dev.platform == "gpu"
            and getattr(dev, "compute_capability", None) == "9.0"
            and xs.shape[0] >= TOKAMAX_SM90_MIN_GROUP * experts_total):
        return TOKAMAX_SM90_BLOCKS
    return None


def _gpu_auto_impl(rows: int, num_experts: int, dtype) -> str:
    """``auto`` on GPU: gather at decode (at most E / 2 rows), else tokamax when installed and
    the experts are bf16/fp16 (what its Mosaic GPU kernel takes), else capacity. From
    scripts/bench_moe.py on an H200 (80B block, bf16), ms per call inside a jitted loop, gather
    / tokamax / gather_pallas: T = 1 0.105 / 0.145 / 0.083; T = 8 0.337 / 0.227 / 0.170;
    T = 32 1.180 / 0.494 / 0.483; T = 64 tokamax 0.69 (plain calls: T = 1024 tokamax 1.51 /
    capacity 1.87 ms; T = 16384 tokamax 7.98 / capacity 11.93 ms; both with the scatter-add
    combine of then, tokamax 5.33 ms with the gathered one, 3.53 ms with TOKAMAX_SM90_BLOCKS).
    The Pallas decode kernels with the router, routing and shared expert inside them (T = 1
    0.037 ms) are auto's choice before this one where they fit: see
    Qwen3NextExperts.fuses_shared (under a layer scan given the whole stacks of expert weights,
    whose slices XLA would copy whole for a kernel; not under a mesh); this gather serves the
    rest."""
    if _decode_sized(rows, num_experts):
        return "gather"
    if dtype in (jnp.bfloat16, jnp.float16) and import_tokamax()[0] is not None:
        return "tokamax"
    return "capacity"


@jax.custom_vjp
def _permute_rows(x, perm, inverse):
    """``x[perm]`` for a permutation ``perm`` of x's rows (``inverse`` its inverse), whose
    gradient is the gather ``g[inverse]``: XLA's transpose of a gather is a scatter-add,
    2.6 ms of the 7.8 ms 80B MoE block at 16384 tokens on an H200 when the combine was one."""
    return x.at[perm].get(unique_indices=True)


def _permute_rows_fwd(x, perm, inverse):
    return _permute_rows(x, perm, inverse), inverse


def _permute_rows_bwd(inverse, g):
    return g.at[inverse].get(unique_indices=True), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dispatch_rows(x, order, inverse, k: int, words: bool):
    """xs [N*k, d] with xs[r] = x[order[r] // k], x [N, d], for a permutation ``order`` of the
    N*k slots (``inverse`` its inverse); the gradient dx[n] = sum_j g[inverse[n k + j]] is a
    gather and a sum (XLA's transpose of a gather is a scatter-add). ``words``: rows of 2-byte
    elements and even width move as 4-byte words (for GPUs: XLA's gather took 0.43 ms for the
    80B block's [163840, 2048] bf16 rows at 16384 tokens on an H200, 0.33 ms as uint32 pairs;
    here the rows go to a kernel, whereas where a fusion consumes a gather, as the combine's
    sum does, the bitcast keeps XLA from fusing it: 0.18 -> 0.53 ms)."""
    rows = order // k
    if not words or x.dtype.itemsize != 2 or x.shape[1] % 2:
        return x.at[rows].get()
    words = jax.lax.bitcast_convert_type(x.reshape(x.shape[0], -1, 2), jnp.uint32)
    return jax.lax.bitcast_convert_type(words.at[rows].get(), x.dtype).reshape(order.size, -1)


def _dispatch_rows_fwd(x, order, inverse, k, words):
    return _dispatch_rows(x, order, inverse, k, words), inverse


def _dispatch_rows_bwd(k, words, inverse, g):
    rows = g.at[inverse].get(unique_indices=True)
    return jnp.sum(rows.reshape(-1, k, g.shape[1]), axis=1), None, None


_dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


def _sort_by_expert(x, keys, k: int):
    """Rows of x [N, d] repeated for each of their k slots and sorted by ``keys`` [N*k] (stable):
    (xs [N*k, d], order, inverse) with xs[r] = x[order[r] // k] and ``inverse`` the slot ->
    sorted-row permutation that :func:`_combine_sorted` takes back."""
    order = jnp.argsort(keys, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(
        jnp.arange(order.size, dtype=order.dtype), unique_indices=True)
    return _dispatch_rows(jnp.asarray(x), order, inverse, k, _on_gpu()), order, inverse


def _combine_sorted(y, order, inverse, weights, valid=None):
    """[N, d] float32: sum_j weights[n, j] y[inverse[n k + j]], y [N*k, d] the experts' rows in
    sorted order; rows whose ``valid`` [N, k] is False are dropped (masked, so their values never
    reach the sum). Gathers, no scatter-add, forward and backward."""
    N, k = weights.shape
    return _weighted_sum(_permute_rows(y, inverse, order).reshape(N, k, -1), weights, valid)


@jax.checkpoint
def _weighted_sum(rows, weights, valid=None):
    """sum_j weights[n, j] rows[n, j] in float32: rows [N, k, d], weights [N, k] -> [N, d];
    rows whose ``valid`` [N, k] is False are masked out, not weighted by 0 (a stand-in
    expert's or an unwritten row's inf or NaN never reaches the sum). Rematerialised in the
    backward, which so keeps the rows in their dtype, not a float32 copy."""
    if valid is not None:
        rows = jnp.where(valid[..., None], rows, jnp.zeros((), rows.dtype))
    w = weights.astype(jnp.float32)[..., None]
    return jnp.sum(rows.astype(jnp.float32) * w, axis=1)


def _ragged_experts(xs, group_sizes, gate_proj, up_proj, down_proj, precision, ragged_dot,
                    zero_tail: bool = False):
    """Expert MLP of rows sorted by expert: one grouped matmul per projection with
    ``ragged_dot`` (``jax.lax.ragged_dot`` or tokamax's: lhs [M, K], rhs [E, K, N],
    group_sizes [E] -> [M, N]). ``zero_tail``: the gate and up outputs' rows past
    ``sum(group_sizes)``, and so their cotangents, are set to 0: a ragged_dot that leaves those
    rows unwritten would otherwise carry their garbage, and that of the down projection's input
    gradient, into the gate and up weight gradients, whose last group's block reads them."""
    def dot(w):
        y = ragged_dot(xs, w, group_sizes, precision=precision)
        if zero_tail:
            y = jnp.where((jnp.arange(y.shape[0]) < jnp.sum(group_sizes))[:, None], y,
                          jnp.zeros((), y.dtype))
        return y

    h = jax.nn.silu(dot(gate_proj)) * dot(up_proj)
    return ragged_dot(h, down_proj, group_sizes, precision=precision)


@jax.custom_vjp
def _grad_only_of_groups(w, group_sizes):
    """The identity on expert weights w [E, ...] whose gradient is zero for experts with no rows
    (group_sizes [E]): tokamax's Mosaic GPU weight gradient (0.0.17) leaves those experts'
    slices unwritten, which read NaN on an H200."""
    return w


def _grad_only_of_groups_fwd(w, group_sizes):
    return w, group_sizes


def _grad_only_of_groups_bwd(group_sizes, g):
    used = (group_sizes > 0).reshape((-1,) + (1,) * (g.ndim - 1))
    return jnp.where(used, g, jnp.zeros((), g.dtype)), None


_grad_only_of_groups.defvjp(_grad_only_of_groups_fwd, _grad_only_of_groups_bwd)


def _tokamax_experts(xs, group_sizes, gate_proj, up_proj, down_proj, precision,
                     implementation: str | None, experts_total: int | None = None):
    """:func:`_ragged_experts` through tokamax's ``ragged_dot``. Its Mosaic GPU kernel takes row
    counts that are a multiple of its tiling (10 rows at decode failed on the H200), so zero rows
    past the last group pad xs to a multiple of TOKAMAX_ROW_MULTIPLE; their outputs are dropped.
    Rows of xs past ``sum(group_sizes)`` come back unwritten (forward) and their gradient rows
    too (backward): callers with such rows mask both (see :func:`expert_parallel_experts`).
    The weight gradients of experts without rows, which tokamax leaves unwritten, are zeroed
    here, as are the gate and up outputs' rows past the groups (``zero_tail``): on an H200
    both gave NaN in the weight gradients.
    ``experts_total``: the model's experts (default gate_proj's: fewer under expert parallelism),
    over which the rows' mean group size picks the kernel's blocks (:func:`_tokamax_sm90_blocks`)."""
    M = xs.shape[0]
    pad = -M % TOKAMAX_ROW_MULTIPLE
    blocks = _tokamax_sm90_blocks(implementation, xs, gate_proj,
                                  experts_total or gate_proj.shape[0])
    gate_proj, up_proj, down_proj = (_grad_only_of_groups(w, group_sizes)
                                     for w in (gate_proj, up_proj, down_proj))
    return _ragged_experts(jnp.pad(xs, ((0, pad), (0, 0))), group_sizes, gate_proj, up_proj,
                           down_proj, precision, _tokamax_ragged_dot(implementation, blocks),
                           zero_tail=True)[:M]


def _capacities(rows: int, num_experts: int) -> tuple[int, ...]:
    """The static per-expert capacities the ``capacity`` impl compiles, smallest first:
    mean + CAPACITY_SIGMAS sqrt(mean) + 8, then 2x and 4x the mean (where larger), multiples
    of 8."""
    mean = rows / num_experts
    r8 = lambda c: int(-(-c // 8) * 8)
    caps = [r8(mean + CAPACITY_SIGMAS * mean ** 0.5 + 8)]
    for f in (2, 4):
        if r8(f * mean) > caps[-1]:
            caps.append(r8(f * mean))
    return tuple(caps)


def _capacity_experts(xs, sorted_e, group_sizes, gate_proj, up_proj, down_proj, precision,
                      capacity):
    """Expert MLP of rows sorted by expert laid out as [E, capacity, d] (one plain batched
    matmul per projection, weights read once, not gathered). Only valid when every group has
    at most ``capacity`` rows (the caller checks and falls back to the tiles)."""
    M, d = xs.shape
    E = gate_proj.shape[0]
    se = jnp.minimum(sorted_e, E - 1)
    gstart = jnp.cumsum(group_sizes) - group_sizes
    dest = jnp.where(sorted_e < E, se * capacity + jnp.arange(M) - gstart[se], E * capacity)
    xp = jnp.zeros((E * capacity, d), xs.dtype).at[dest].set(xs, mode="drop")
    xp = xp.reshape(E, capacity, d)
    h = jax.nn.silu(jnp.einsum("ecd,edi->eci", xp, gate_proj, precision=precision)) * \
        jnp.einsum("ecd,edi->eci", xp, up_proj, precision=precision)
    y = jnp.einsum("eci,eid->ecd", h, down_proj, precision=precision)
    return y.reshape(E * capacity, d).at[dest].get(mode="fill", fill_value=0)


def _tile_rows(rows: int, num_experts: int) -> int:
    """Rows per tile of the ``tiles`` impl: the power of two at or above the mean group size,
    in [1, 128] (1 at decode: each row its own tile, i.e. a per-row gather of its expert)."""
    mean = -(-rows // num_experts)
    return int(min(128, 1 << max(0, (mean - 1).bit_length())))


def _tiled_experts(xs, sorted_e, group_sizes, gate_proj, up_proj, down_proj, precision,
                   tile_rows):
    """Expert MLP of rows sorted by expert: each group padded to whole tiles of ``tile_rows``
    rows, every tile one batched matmul against its expert's weights (gathered per tile).
    Rows with ``sorted_e >= E`` (sorted last; other devices' experts) give 0."""
    M, d = xs.shape
    E = gate_proj.shape[0]
    tm = tile_rows
    padded = (group_sizes + tm - 1) // tm * tm  # [E]
    pend = jnp.cumsum(padded)
    pstart = pend - padded
    gstart = jnp.cumsum(group_sizes) - group_sizes
    # Static bound: every non-empty group wastes < tm rows, at most min(E, M) groups.
    mp = -(-(M + min(E, M) * (tm - 1)) // tm) * tm
    n_tiles = mp // tm
    se = jnp.minimum(sorted_e, E - 1)
    dest = jnp.where(sorted_e < E, pstart[se] + jnp.arange(M) - gstart[se], mp)  # padded slot
    xp = jnp.zeros((mp, d), xs.dtype).at[dest].set(xs, mode="drop").reshape(n_tiles, tm, d)
    tile_e = jnp.minimum(jnp.searchsorted(pend, jnp.arange(n_tiles) * tm, side="right"), E - 1)
    h = jax.nn.silu(jnp.einsum("tmd,tdi->tmi", xp, gate_proj[tile_e], precision=precision)) * \
        jnp.einsum("tmd,tdi->tmi", xp, up_proj[tile_e], precision=precision)
    y = jnp.einsum("tmi,tid->tmd", h, down_proj[tile_e], precision=precision)
    return y.reshape(mp, d).at[dest].get(mode="fill", fill_value=0)  # [M, d], sorted order


def grouped_experts(x, weights, experts, gate_proj, up_proj, down_proj, precision=None,
                    impl: str = "auto", tile_rows: int | None = None, layer=None):
    """Dropless routed experts by sorting tokens and one grouped matmul per projection.

    Args:
      x: [N, d] tokens. weights: [N, k] router weights (in x's dtype). experts: [N, k] int ids.
      gate_proj, up_proj: [E, d, I]; down_proj: [E, I, d].
      impl: ``"ragged_dot"`` (``jax.lax.ragged_dot``: native on TPU and CPU), ``"gather"``
        (no sort: each token's k experts' weights gathered and applied, [N, k, d, I] gathered
        per projection; for decode), ``"gather_pallas"`` (the same with
        ``pallas_kernels.moe.gathered_experts``' Pallas Triton kernels, which read the chosen
        experts' weights in place: GPU only, with their default blocks I a multiple of 256 and d
        of 1024: ``pallas_kernels.moe.BlockSizes.mismatch`` names what else fails), ``"tokamax"``
        (tokamax's ``ragged_dot``, the optional ``gpu`` extra: on GPUs its Pallas Mosaic GPU
        kernel for bf16/fp16, falling back to its Triton kernel or XLA for other inputs;
        ``"tokamax:mosaic"``, ``"tokamax:triton"``, ``"tokamax:xla"`` force one of them),
        ``"tiles"`` (each expert's rows padded to tiles, one batched matmul over tiles with
        per-tile gathered weights: for GPUs, where XLA (jax <= 0.12) lowers ragged_dot to a
        dense [rows, experts, ...] expansion that runs out of memory at 16k tokens),
        ``"capacity"`` (rows laid out [E, C, d] with a static C of mean + 4 sqrt(mean) + 8 rows
        per expert, plain batched matmuls; when some expert gets more than C rows a
        ``lax.cond`` runs ``tiles`` instead, so it stays dropless and exact; two larger
        capacities, 2x and 4x the mean, are tried first under ``lax.switch``), or ``"auto"``
        (on GPU: ``gather`` when there are at most E / 2 rows (decode), else ``tokamax`` when it
        is installed and the experts are bf16/fp16, else ``capacity``; elsewhere
        ``ragged_dot``).
      tile_rows: rows per tile of ``tiles`` (at least 1; default: :func:`_tile_rows`).
      layer: None, or an integer scalar (the layer scan's block index): the projections are
        then stacks over layers ([L, E, d, I], [L, E, d, I], [L, E, I, d]) and layer
        ``layer``'s experts run; ``gather_pallas`` reads them from the stacks in place, the
        other impls from that layer's slice.
    Returns:
      [N, d]: sum_k weights[n, k] * expert_{experts[n, k]}(x[n]). Differentiable in reverse
      mode (``jax.grad``, ``jax.vjp``); the sorting impls' row permutations are a custom_vjp,
      so forward mode (``jax.jvp``, ``jax.jacfwd``) is not defined through them.
    Raises:
      ValueError: an unknown ``impl``, ``tile_rows`` below 1. ImportError: ``tokamax``
        without tokamax installed.
    """
    impl, tokamax_implementation = _parse_impl(impl, "grouped_experts")
    if tile_rows is not None and tile_rows < 1:
        raise ValueError(f"grouped_experts: tile_rows must be at least 1 (or None for the "
                         f"default), got {tile_rows}")
    N, k = experts.shape
    E = gate_proj.shape[-3]
    if impl == "auto":
        impl = ("ragged_dot" if not _on_gpu() else
                _gpu_auto_impl(N * k, E, gate_proj.dtype))
    if impl == "gather_pallas":
        return gathered_experts(x, weights, experts, gate_proj, up_proj, down_proj, layer=layer)
    if layer is not None:
        gate_proj, up_proj, down_proj = (w[layer] for w in (gate_proj, up_proj, down_proj))
    if impl == "gather":
        return gathered_experts_reference(x, weights, experts, gate_proj, up_proj, down_proj,
                                          precision)
    flat = experts.reshape(-1)  # [N*k]
    xs, order, inverse = _sort_by_expert(x, flat, k)  # [N*k, d]
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    if impl == "tiles":
        y = _tiled_experts(xs, flat[order], group_sizes, gate_proj, up_proj, down_proj,
                           precision, tile_rows or _tile_rows(N * k, E))
    elif impl == "capacity":
        caps = _capacities(N * k, E)
        operands = (xs, flat[order], group_sizes, gate_proj, up_proj, down_proj)
        branches = [functools.partial(_capacity_experts, precision=precision, capacity=c)
                    for c in caps]
        branches.append(functools.partial(_tiled_experts, precision=precision,
                                          tile_rows=tile_rows or _tile_rows(N * k, E)))
        # The smallest capacity holding the largest group; the tiles when none does.
        index = jnp.searchsorted(jnp.asarray(caps), jnp.max(group_sizes), side="left")
        y = jax.lax.switch(index, branches, *operands)
    elif impl == "tokamax":
        y = _tokamax_experts(xs, group_sizes, gate_proj, up_proj, down_proj, precision,
                             tokamax_implementation)
    else:
        y = _ragged_experts(xs, group_sizes, gate_proj, up_proj, down_proj, precision,
                            jax.lax.ragged_dot)  # [N*k, d]
    return _combine_sorted(y, order, inverse, weights).astype(x.dtype)


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def expert_parallel_experts(x, weights, experts, gate_proj, up_proj, down_proj, mesh,
                            rules=sharding.DEFAULT_RULES, precision=None, impl: str = "auto",
                            layer=None):
    """:func:`grouped_experts` split over the mesh's expert (and tensor) axes with ``shard_map``.

    Same arguments and result as :func:`grouped_experts` (global shapes), plus ``mesh`` and the
    logical ``rules`` ("experts" -> expert axes, "mlp" -> intermediate-dim axes, "batch" -> the
    axes the tokens live on). Falls back to :func:`grouped_experts` (under XLA's partitioner)
    when no mesh axis divides the experts or the intermediate dim. Inside the ``shard_map``
    the local experts run as ``gather`` (each token's local experts; the others' slots give
    0, though every device gathers all k slots' weights, its first expert's for the others),
    ``gather_pallas`` (the Pallas kernels, given the other devices' slots as negative ids:
    their programs read no weights), ``tiles``, ``tokamax``
    (``"tokamax:<implementation>"`` too) or, for any other impl, ``jax.lax.ragged_dot``;
    ``auto`` on GPU chooses like :func:`grouped_experts` between gather and tokamax;
    ``capacity`` (auto's or given) runs as tiles here. The rows routed to other devices'
    experts sort past the last local group, where tokamax's GPU kernels leave their outputs
    (and gradient rows) unwritten: both are masked out.

    ``layer``: None, or an integer scalar (the layer scan's block index): the projections are
    then stacks over layers ([L, E, d, I], [L, E, d, I], [L, E, I, d], as a scanned model's
    params hold them) and layer ``layer``'s experts run; the decode impls read them from the
    stacks in place, the others from that layer's slice.
    """
    N, k = experts.shape
    E, d, inner = gate_proj.shape[-3:]
    wspec = sharding.logical_to_spec(("experts", None, "mlp"), (E, d, inner), mesh, rules)
    wspec = tuple(wspec) + (None,) * (3 - len(wspec))
    e_axes, m_axes = _axes(wspec[0]), _axes(wspec[2])
    if not e_axes and not m_axes:
        return grouped_experts(x, weights, experts, gate_proj, up_proj, down_proj, precision,
                               impl, layer=layer)
    impl, tokamax_implementation = _parse_impl(impl, "expert_parallel_experts")
    if impl == "auto":
        impl = "ragged_dot" if not _on_gpu() else _gpu_auto_impl(
            N * k, E, gate_proj.dtype)
    impl = "tiles" if impl == "capacity" else impl
    if layer is not None and impl not in DECODE_IMPLS:
        gate_proj, up_proj, down_proj = (w[layer] for w in (gate_proj, up_proj, down_proj))
        layer = None
    if impl == "gather_pallas":
        parts = math.prod(mesh.shape[a] for a in m_axes)
        if (why := GatheredBlockSizes().mismatch(d, inner // parts)) is not None:
            raise ValueError(f"expert_parallel_experts: gather_pallas runs on each device's "
                             f"shard of the experts, I = {inner} / {parts} over {m_axes}: {why}")
    e_total = E
    tok = sharding.batch_axes(N, mesh, rules)
    gather = tuple(a for a in tok if a in e_axes)
    tok = tuple(a for a in tok if a not in e_axes) + gather  # gathered axes innermost
    P = jax.sharding.PartitionSpec
    tspec = P(tok if tok else None, None)
    e0 = e_axes if e_axes else None
    m0 = m_axes if m_axes else None

    def body(x, weights, experts, gate, up, down, layer):
        if gather:  # dispatch: every device of an expert group sees the group's tokens
            x = jax.lax.all_gather(x, gather, axis=0, tiled=True)
            weights = jax.lax.all_gather(weights, gather, axis=0, tiled=True)
            experts = jax.lax.all_gather(experts, gather, axis=0, tiled=True)
        n = x.shape[0]
        e_loc = gate.shape[-3]
        first = jax.lax.axis_index(e_axes) * e_loc if e_axes else 0
        if impl in DECODE_IMPLS:
            local = experts - first  # [n, k]
            valid = (local >= 0) & (local < e_loc)
            ids = jnp.where(valid, local, -1)  # other devices' experts: negative, zero rows
            if impl == "gather_pallas":
                y = gathered_expert_outputs(x, ids, gate, up, down, layer=layer)
            else:  # XLA reads a stacked layer's gathered experts without slicing it first
                if layer is not None:
                    gate, up, down = (w[layer] for w in (gate, up, down))
                y = gathered_expert_outputs_reference(x, ids, gate, up, down, precision)
            return combine(_weighted_sum(y, weights, valid)).astype(x.dtype)
        local = experts.reshape(-1) - first  # [n*k]
        valid = (local >= 0) & (local < e_loc)
        key = jnp.where(valid, local, e_loc)  # rows for other devices' experts sort last
        xs, order, inverse = _sort_by_expert(x, key, k)  # [n*k, d]
        group_sizes = jnp.bincount(key, length=e_loc + 1)[:e_loc].astype(jnp.int32)
        if impl == "tiles":
            y = _tiled_experts(xs, key[order], group_sizes, gate, up, down, precision,
                               _tile_rows(n * k // max(1, e_total // e_loc), e_loc))
        elif impl == "tokamax":  # the where also masks the unwritten gradient rows of xs
            xs = jnp.where(valid[order][:, None], xs, 0)
            y = _tokamax_experts(xs, group_sizes, gate, up, down, precision,
                                 tokamax_implementation, e_total)
        else:
            y = _ragged_experts(xs, group_sizes, gate, up, down, precision,
                                jax.lax.ragged_dot)  # [n*k, d]
        out = _combine_sorted(y, order, inverse, weights, valid.reshape(n, k))
        return combine(out).astype(x.dtype)

    def combine(out):  # [n, d] float32 partial sums of this device -> the tokens' rows
        if m_axes:  # partial sums over the intermediate dim
            out = jax.lax.psum(out, m_axes)
        rest = tuple(a for a in e_axes if a not in gather)
        if rest:
            out = jax.lax.psum(out, rest)
        if gather:  # combine: back to the tokens' devices, summed over the expert group
            out = jax.lax.psum_scatter(out, gather, scatter_dimension=0, tiled=True)
        return out

    lead = () if layer is None else (None,)  # the stacks' layer axis: not split
    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(tspec, tspec, tspec, P(*lead, e0, None, m0),
                                 P(*lead, e0, None, m0), P(*lead, e0, m0, None), P()),
                       out_specs=tspec, check_vma=False)
    return fn(x, weights, experts, gate_proj, up_proj, down_proj,
              None if layer is None else jnp.asarray(layer, jnp.int32))


class Qwen3NextExperts(nn.Module):
    """The stacked routed experts: gate_proj, up_proj [E, d, I] and down_proj [E, I, d].

    ``impl``: the implementation of :func:`grouped_experts` (one device) or
    :func:`expert_parallel_experts` (under a mesh); the decode paths (``DECODE_IMPLS``, which
    gather each token's experts' weights) serve calls of at most E / 2 token-slots, as auto's
    choice does, and a larger call (a prefill) runs ``auto``. ``decode_kernels``: whether
    ``auto`` may take the Pallas decode kernels with the routing inside them on a GPU
    (:meth:`fuses_shared`); False in the layer scan, whose slices of the stacked expert weights
    XLA would copy whole to hand to a kernel. There the call may instead be given ``stacked``:
    the scan's whole stacks of this layer's expert weights (gate_proj, up_proj [L / P, E, d, I],
    down_proj [L / P, E, I, d]) and the block's index, which the kernels read in place (the
    layer's own params, the scan's slices, are then not read).
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    impl: str = "auto"
    decode_kernels: bool = True

    @nn.compact
    def __call__(self, x, weights=None, experts=None, *, router=None, shared=None,
                 stacked=None):
        """x [N, d] -> [N, d], each token's routed experts, given either
        - weights [N, k] (router weights) and experts [N, k] int (:func:`route`'s), or
        - ``router`` (router_weight [d, E], top_k, norm_topk_prob) and ``shared``
          (shared_expert_gate [d, 1], gate [d, I], up [d, I], down [I, d]): the
          ``gather_pallas`` decode kernels make the router's matmul, route each token and add
          its sigmoid-gated shared expert, computed as one more row (``routed_experts``;
          :meth:`fuses_shared`).
        ``stacked`` (the layer scan's stacks of gate, up, down and the block index, or None)
        serves the decode kernels (with a mesh, its decode impls), in this layer's dtype."""
        E, d, inner = self.num_experts, self.hidden_size, self.intermediate_size
        impl = self.impl
        init = nn.initializers.normal(self.std)
        gate = self.param("gate_proj", init, (E, d, inner), self.param_dtype)
        up = self.param("up_proj", init, (E, d, inner), self.param_dtype)
        down = self.param("down_proj", init, (E, inner, d), self.param_dtype)
        cast = lambda w: w.astype(self.dtype)
        if router is not None or shared is not None:
            if router is None or shared is None or not self.fuses_shared(
                    x.shape[0] * router[1], shared[1].shape[1], stacked):
                raise ValueError("Qwen3NextExperts: the router logits and a shared expert are "
                                 "only taken together, by the gather_pallas decode kernels "
                                 "(see fuses_shared)")
            router_weight, top_k, norm_topk_prob = router
            if stacked is not None:  # in place, in this layer's dtype (fuses_shared checks)
                *stacks, index = stacked
                return routed_experts(x, router_weight, *stacks, layer=index, top_k=top_k,
                                      norm_topk_prob=norm_topk_prob, shared=shared)[0]
            return routed_experts(x, router_weight, cast(gate), cast(up), cast(down),
                                  top_k=top_k, norm_topk_prob=norm_topk_prob, shared=shared)[0]
        if impl in DECODE_IMPLS and not _decode_sized(experts.size, E):  # a prefill
            impl = "auto"
        weights = weights.astype(self.dtype)
        projections, layer = (cast(gate), cast(up), cast(down)), None
        if (stacked is not None and stacked[0].dtype == jnp.dtype(self.dtype)
                and _decode_sized(experts.size, E)):  # the decode impls read them in place
            *projections, layer = stacked
        active = sharding.active_mesh()
        if active is not None:
            mesh, rules = active
            return expert_parallel_experts(x, weights, experts, *projections, mesh, rules,
                                           self.precision, impl, layer=layer)
        return grouped_experts(x, weights, experts, *projections, self.precision, impl=impl,
                               layer=layer)

    def fuses_shared(self, rows: int, shared_inner: int, stacked=None) -> bool:
        """Whether a call of ``rows`` token-slots takes the router's weight and a shared expert
        of intermediate size ``shared_inner``, routing and computing both inside its kernels:
        impl ``gather_pallas``, or ``auto`` on a GPU with ``decode_kernels`` or ``stacked``
        (the layer scan's stacks, which must then be in this layer's dtype: a cast would copy
        them whole), at decode size, no active mesh, the shared expert of the routed experts'
        sizes (Qwen3-Next's 512) and E a power of 2 (the 80B's 512). On one H200, 8 unscanned
        layers of the 80B at batch 1 without a mesh (profiles of 5 steps, two runs each): the
        jnp gather 299 kernels and 1.39 ms busy a step, 2.00-2.24 ms a step; these kernels 195
        and 1.01 ms, 1.84-1.96 ms."""
        if stacked is not None and stacked[0].dtype != jnp.dtype(self.dtype):
            return False
        kernels = self.impl == "gather_pallas" or (
            self.impl == "auto" and (self.decode_kernels or stacked is not None) and _on_gpu())
        return (kernels and _decode_sized(rows, self.num_experts)
                and sharding.active_mesh() is None and shared_inner == self.intermediate_size
                and GatheredBlockSizes().mismatch(self.hidden_size, shared_inner,
                                                  self.num_experts) is None)


class Qwen3NextSparseMoeBlock(nn.Module):
    """Router + routed experts + sigmoid-gated shared expert. x [B, T, d] -> [B, T, d].

    The raw router logits [B*T, E] are sown as ``intermediates/router_logits`` (for the
    load-balancing loss). With ``moe_impl="gather_pallas"``, or ``"auto"`` on a GPU with
    ``decode_kernels`` or (in the layer scan) ``expert_stack``, at decode size the router's
    matmul, the top-k
    routing and the shared expert run inside the routed experts' Pallas kernels
    (:meth:`Qwen3NextExperts.fuses_shared`; the logits are then made in XLA too only when
    ``intermediates`` is mutable, to be sown); otherwise :func:`route` runs here.
    """

    config: Qwen3NextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    moe_impl: str = "auto"
    decode_kernels: bool = True

    @nn.compact
    def __call__(self, x, expert_stack=None):
        """``expert_stack``: None, or the layer scan's (gate_proj, up_proj, down_proj stacks,
        block index) for the decode kernels (``Qwen3NextExperts``' ``stacked``)."""
        cfg = self.config
        B, T, d = x.shape
        mod = {"dtype": self.dtype, "param_dtype": self.param_dtype, "precision": self.precision}
        flat = x.reshape(B * T, d).astype(self.dtype)
        k, std = cfg.num_experts_per_tok, cfg.initializer_range
        routed = Qwen3NextExperts(cfg.num_experts, d, cfg.moe_intermediate_size, std=std,
                                  impl=self.moe_impl, decode_kernels=self.decode_kernels,
                                  name="experts", **mod)
        shared = Qwen3NextMLP(cfg.shared_expert_intermediate_size, d, std=std,
                              name="shared_expert", **mod)
        if routed.fuses_shared(B * T * k, cfg.shared_expert_intermediate_size, expert_stack):
            # The kernels take the router's and the shared gate's weights (same param paths).
            router_weight, shared_gate = (
                DenseKernel((d, n), std, self.param_dtype, name=name)().astype(self.dtype)
                for n, name in ((cfg.num_experts, "gate"), (1, "shared_expert_gate")))
            if self.is_mutable_collection("intermediates"):
                self.sow("intermediates", "router_logits",
                         jnp.dot(flat, router_weight, precision=self.precision))
            out = routed(flat, router=(router_weight, k, cfg.norm_topk_prob),
                         shared=(shared_gate, *shared(flat, kernels_only=True)),
                         stacked=expert_stack)
        else:
            logits = dense(cfg.num_experts, name="gate", std=std, **mod)(flat)
            self.sow("intermediates", "router_logits", logits)
            weights, experts = route(logits, k, cfg.norm_topk_prob)
            shared_gate = dense(1, name="shared_expert_gate", std=std, **mod)(flat)
            out = routed(flat, weights, experts, stacked=expert_stack) + \
                jax.nn.sigmoid(shared_gate) * shared(flat)
        return out.reshape(B, T, d)
