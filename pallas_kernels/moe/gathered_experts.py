"""Decode MoE: each token's k routed experts, reading only their weights, without copies.

    out[n] = sum_j weights[n, j] * down_e (silu(x[n] gate_e) * (x[n] up_e)),   e = experts[n, j]

with gate_proj, up_proj [E, d, I] and down_proj [E, I, d] the stacked expert weights (the
layout of qnext_jax's Qwen3NextExperts). :func:`gathered_experts_reference` is the jnp form: it
gathers the chosen experts' weights ([N, k, d, I] per projection, a copy XLA materializes) and
runs batched matmuls. :func:`gathered_experts` runs two Pallas Triton kernels that index the
expert weights in place by the expert id (a scalar loaded in the kernel), so each chosen
expert's weights are read once from HBM and never copied. Rows r = n * k + j are the (token,
slot) pairs, e = experts[n, j]:

  kernel "gate_up", split over d: one program per (row r, block of BI intermediate columns,
  one of S slices of d / S rows), its float32 partial sums
    g_part[s, r, block] = x[n, slice] gate_e[slice, block],  u_part likewise with up_e;
  kernel "down", split over I: one program per (row r, block of BD output columns, one of S'
  slices of I / S' rows), h made from the partial sums as it reads them:
    h[r, slice] = silu(sum_s g_part[s, r, slice]) * sum_s u_part[s, r, slice]  (in x's dtype)
    y[s', r, block] = h[r, slice] down_e[slice, block]                          (float32)
  then, in jnp, out[n] = sum_j weights[n, j] sum_s' y[s', n k + j]     (float32, to x's dtype)

With a shared expert of the same sizes (Qwen3-Next's), its rows r = N k + n follow the routed
ones and read its weights instead (``shared``): it costs no kernel of its own.

:func:`gathered_expert_outputs` is the two kernels alone: y, each slot's expert output before the
weighting (expert parallelism drops the slots of other devices' experts from it first).

Both kernels are matrix-vector products (one token row), summed with elementwise multiplies in
float32: at decode the cost is the weight bytes, not FLOPs, so the blocks are wide (BI, BD =
128 columns: 256 contiguous bytes of each bf16 weight row per load, read in steps of BR rows)
and the grid is large (d split S ways) for the HBM bandwidth. At the 80B's sizes (d 2048, I 512,
k 10 + the shared expert, one token) the defaults give gate_up a grid of (11, 4, 8) = 352
programs of 256 rows of gate_e and up_e each, down one of (11, 16, 2) = 352 programs of 256 rows;
69 MB of weights in all.
The gradient (``jax.custom_vjp``) is that of the jnp reference, recomputed; training batches
take the grouped-matmul paths anyway.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and launch parameters of the two kernels (powers of 2 for Triton).

    block_i: intermediate columns per "gate_up" program (dividing I); block_d: output columns
    per "down" program (dividing d); block_r: weight rows per step of either kernel's reduction
    (dividing I / down_splits and d / splits); splits: the slices of d that "gate_up" splits
    its reduction into (partial sums added in "down"); down_splits: the slices of I that
    "down" splits its reduction into (partial sums added in jnp); num_warps: Triton warps.
    The defaults suit the 80B's d 2048, I 512 on an H200: grids of N k x 4 x 8 ("gate_up") and
    N k x 16 x 2 ("down") programs, each reading 128 KB and 64 KB of weights in 2 steps of 128
    rows. Measured there (the routed experts alone, one token, 80B sizes, in a jitted loop,
    with down_splits 1 and h made in jnp): 0.042 ms; block_r 64: 0.048, 32: 0.058; splits 4:
    0.056, 16: 0.043 (block_r 64); the jnp gather 0.067 ms.
    """

    block_i: int = 128
    block_d: int = 128
    block_r: int = 128
    splits: int = 8
    down_splits: int = 2
    num_warps: int = 4

    def mismatch(self, d: int, inner: int) -> str | None:
        """Why these blocks do not fit d and I (a message), or None when they do."""
        for of in ("block_i", "block_d", "block_r", "num_warps"):
            size = getattr(self, of)
            if size < 1 or size & (size - 1):
                return f"{of} = {size} must be a power of 2 (a Triton block size)"
        for of in ("splits", "down_splits"):
            if getattr(self, of) < 1:
                return f"{of} = {getattr(self, of)} must be at least 1"
        for name, size, multiple, of in (
                ("I", inner, self.block_i, "block_i"),
                ("I", inner, self.down_splits * self.block_r, "down_splits * block_r"),
                ("d", d, self.block_d, "block_d"),
                ("d", d, self.splits * self.block_r, "splits * block_r")):
            if size % multiple:
                return f"{name} = {size} must be a multiple of {of} = {multiple}"
        return None


def gathered_expert_outputs_reference(x, experts, gate_proj, up_proj, down_proj,
                                      precision=None):
    """Each token's k expert outputs, jnp: x [N, d], experts [N, k] -> [N, k, d] in x's dtype,
    ``expert_{experts[n, j]}(x[n])``, by gathering the chosen experts' weights ([N, k, d, I]
    per projection) into batched matmuls."""
    h = jax.nn.silu(jnp.einsum("nd,nkdi->nki", x, gate_proj[experts], precision=precision)) * \
        jnp.einsum("nd,nkdi->nki", x, up_proj[experts], precision=precision)
    return jnp.einsum("nki,nkid->nkd", h, down_proj[experts], precision=precision)


def gathered_experts_reference(x, weights, experts, gate_proj, up_proj, down_proj,
                               precision=None):
    """jnp form of :func:`gathered_experts` (:func:`gathered_expert_outputs_reference` combined
    with the router weights, in x's dtype). Same arguments and result."""
    y = gathered_expert_outputs_reference(x, experts, gate_proj, up_proj, down_proj, precision)
    return jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype), precision=precision)


def _whole(shape):
    """BlockSpec of a whole array (indexed inside the kernel)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _row_block(r, block_r):
    return pl.ds(pl.multiple_of(r * block_r, block_r), block_r)


def _by_row(r, nk, routed, shared):
    """Row r's work: ``routed()`` for the routed rows r < nk; without a shared expert
    (``shared`` None) every row is routed, else the rows from nk run ``shared()``."""
    if shared is None:
        routed()
        return
    pl.when(r < nk)(routed)
    pl.when(r >= nk)(shared)


def _gate_up_kernel(ids_ref, x_ref, gate_ref, up_ref, *refs, k, nk, block_r, steps):
    # refs: (shared gate [d, I], shared up [d, I],) g_part, u_part blocks [1, 1, BI].
    *shared, g_ref, u_ref = refs
    r, c, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    BI = g_ref.shape[-1]
    cols = pl.ds(c * BI, BI)

    def run(n, gate_at, up_at):  # token n's row of partial sums, weights read through *_at
        def body(t, acc):
            rows = _row_block(s * steps + t, block_r)  # steps of block_r rows per split
            xs = x_ref[n, rows].astype(jnp.float32)[:, None]  # [BR, 1]
            g = acc[0] + jnp.sum(xs * gate_at(rows).astype(jnp.float32), axis=0)
            u = acc[1] + jnp.sum(xs * up_at(rows).astype(jnp.float32), axis=0)
            return g, u

        zero = jnp.zeros((BI,), jnp.float32)
        g, u = lax.fori_loop(0, steps, body, (zero, zero))
        g_ref[0, 0, :] = g
        u_ref[0, 0, :] = u

    def routed():
        e = ids_ref[r]
        run(r // k, lambda rows: gate_ref[e, rows, cols], lambda rows: up_ref[e, rows, cols])

    _by_row(r, nk, routed, (lambda: run(r - nk, lambda rows: shared[0][rows, cols],
                                        lambda rows: shared[1][rows, cols])) if shared else None)


def _down_kernel(ids_ref, g_ref, u_ref, down_ref, *refs, nk, block_r, steps, dtype):
    # g_ref, u_ref: the [S, R, I] float32 partial sums; refs: (shared down [I, d],) y block.
    *shared, y_ref = refs
    r, c, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    BD = y_ref.shape[-1]
    cols = pl.ds(c * BD, BD)

    def run(down_at):
        def body(t, acc):
            rows = _row_block(s * steps + t, block_r)
            g = jnp.sum(g_ref[:, r, rows], axis=0)  # [BR]: the sums over the d splits
            u = jnp.sum(u_ref[:, r, rows], axis=0)
            h = (g / (1.0 + jnp.exp(-g)) * u).astype(dtype).astype(jnp.float32)  # silu(g) u
            return acc + jnp.sum(h[:, None] * down_at(rows).astype(jnp.float32), axis=0)

        y_ref[0, 0, :] = lax.fori_loop(0, steps, body, jnp.zeros((BD,), jnp.float32))

    def routed():
        e = ids_ref[r]
        run(lambda rows: down_ref[e, rows, cols])

    _by_row(r, nk, routed, (lambda: run(lambda rows: shared[0][rows, cols])) if shared else None)


def _check(x, experts, gate_proj, up_proj, down_proj, shared, blocks):
    N, d = x.shape
    E, d_w, inner = gate_proj.shape
    if experts.ndim != 2 or experts.shape[0] != N:
        raise ValueError(f"gathered_experts: experts {experts.shape} must be [N = {N}, k]")
    if d_w != d or up_proj.shape != gate_proj.shape or down_proj.shape != (E, inner, d):
        raise ValueError(f"gathered_experts: expected gate_proj, up_proj [E, d = {d}, I] and "
                         f"down_proj [E, I, d]; got {gate_proj.shape}, {up_proj.shape}, "
                         f"{down_proj.shape}")
    if shared and tuple(w.shape for w in shared) != ((d, inner), (d, inner), (inner, d)):
        raise ValueError(f"gathered_experts: the shared expert's gate_proj, up_proj, down_proj "
                         f"must be [d, I], [d, I], [I, d] with the routed experts' d = {d}, "
                         f"I = {inner}; got {tuple(tuple(w.shape) for w in shared)}")
    if (why := blocks.mismatch(d, inner)) is not None:
        raise ValueError(f"gathered_experts: {why}")


def _outputs_reference(x, experts, gate_proj, up_proj, down_proj, shared):
    """[N k (+ N), d] float32: each (token, slot) row's expert output, then each token's shared
    expert output."""
    y = gathered_expert_outputs_reference(x, experts, gate_proj, up_proj, down_proj)
    y = y.astype(jnp.float32).reshape(-1, x.shape[1])
    if not shared:
        return y
    # The shared expert as a stack of one expert that every token chose.
    one = jnp.zeros((x.shape[0], 1), jnp.int32)
    y_shared = gathered_expert_outputs_reference(x, one, *(w[None] for w in shared))
    return jnp.concatenate([y, y_shared.astype(jnp.float32)[:, 0]], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _outputs(x, experts, gate_proj, up_proj, down_proj, shared, blocks, interpret):
    N, k = experts.shape
    d, inner = gate_proj.shape[1:]
    nk = N * k
    rows = nk + N * bool(shared)  # the routed (token, slot) rows, then the shared rows
    ids = experts.reshape(-1).astype(jnp.int32)
    bi, bd, br = blocks.block_i, blocks.block_d, blocks.block_r
    splits, down_splits = blocks.splits, blocks.down_splits
    params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=2)
    part = jax.ShapeDtypeStruct((splits, rows, inner), jnp.float32)
    g_part, u_part = pl.pallas_call(
        functools.partial(_gate_up_kernel, k=k, nk=nk, block_r=br, steps=d // splits // br),
        grid=(rows, inner // bi, splits),
        in_specs=[_whole(ids.shape), _whole(x.shape), _whole(gate_proj.shape),
                  _whole(up_proj.shape)] + [_whole(w.shape) for w in shared[:2]],
        out_specs=[pl.BlockSpec((1, 1, bi), lambda r, c, s: (s, r, c))] * 2,
        out_shape=[part, part],
        compiler_params=params, interpret=interpret, name="moe_gathered_gate_up",
    )(ids, x, gate_proj, up_proj, *shared[:2])
    y = pl.pallas_call(
        functools.partial(_down_kernel, nk=nk, block_r=br,
                          steps=inner // down_splits // br, dtype=x.dtype),
        grid=(rows, d // bd, down_splits),
        in_specs=[_whole(ids.shape), _whole(g_part.shape), _whole(u_part.shape),
                  _whole(down_proj.shape)] + [_whole(w.shape) for w in shared[2:]],
        out_specs=pl.BlockSpec((1, 1, bd), lambda r, c, s: (s, r, c)),
        out_shape=jax.ShapeDtypeStruct((down_splits, rows, d), jnp.float32),
        compiler_params=params, interpret=interpret, name="moe_gathered_down",
    )(ids, g_part, u_part, down_proj, *shared[2:])
    return y.sum(0)  # [rows, d]


def _outputs_fwd(x, experts, gate_proj, up_proj, down_proj, shared, blocks, interpret):
    y = _outputs(x, experts, gate_proj, up_proj, down_proj, shared, blocks, interpret)
    return y, (x, experts, gate_proj, up_proj, down_proj, shared)


def _outputs_bwd(blocks, interpret, res, dy):
    x, experts, gate_proj, up_proj, down_proj, shared = res
    _, vjp = jax.vjp(lambda x, g, u, dn, sh: _outputs_reference(x, experts, g, u, dn, sh),
                     x, gate_proj, up_proj, down_proj, shared)
    dx, dg, du, ddn, dsh = vjp(dy)
    return dx, np.zeros(experts.shape, jax.dtypes.float0), dg, du, ddn, dsh


_outputs.defvjp(_outputs_fwd, _outputs_bwd)


def gathered_expert_outputs(x, experts, gate_proj, up_proj, down_proj, *,
                            blocks: BlockSizes = BlockSizes(), interpret: bool = False):
    """Each token's k expert outputs ``expert_{experts[n, j]}(x[n])``, unweighted, by the two
    Pallas kernels, reading the chosen experts' weights in place.

    Args:
      x: [N, d] tokens (bf16 or float32). experts: [N, k] int expert ids in [0, E) (not
        checked: an id out of range reads out of bounds).
      gate_proj, up_proj: [E, d, I]; down_proj: [E, I, d], in x's dtype.
      blocks: the kernels' :class:`BlockSizes`. interpret: run in Pallas interpret mode (CPU
        tests).
    Returns:
      [N, k, d] float32. The gradient is that of :func:`gathered_expert_outputs_reference`.
    Raises:
      ValueError: shapes that do not match, or blocks that do not divide I and d.
    """
    _check(x, experts, gate_proj, up_proj, down_proj, (), blocks)
    y = _outputs(x, experts, gate_proj, up_proj, down_proj, (), blocks, interpret)
    return y.reshape(*experts.shape, x.shape[1])


def gathered_experts(x, weights, experts, gate_proj, up_proj, down_proj, *, shared=None,
                     blocks: BlockSizes = BlockSizes(), interpret: bool = False):
    """sum_j weights[n, j] * expert_{experts[n, j]}(x[n]) with the SwiGLU experts
    ``down(silu(x gate) * (x up))``, reading the chosen experts' weights in place; with
    ``shared``, plus ``shared_weights[n] * shared_expert(x[n])`` computed as one more row of
    the same two kernels (no kernels of its own).

    Args:
      x, experts, gate_proj, up_proj, down_proj, blocks, interpret: as for
        :func:`gathered_expert_outputs`.
      weights: [N, k] router weights.
      shared: None, or (shared_weights [N], gate [d, I], up [d, I], down [I, d]): a shared
        expert of the routed experts' sizes (as Qwen3-Next's) and its per-token weight (the
        sigmoid gate).
    Returns:
      [N, d] in x's dtype; float32 sums inside, the weights applied in float32. The gradient is
      that of the jnp reference (recomputed).
    Raises:
      ValueError: shapes that do not match, or blocks that do not divide I and d.
    """
    if weights.shape != experts.shape:
        raise ValueError(f"gathered_experts: weights {weights.shape} and experts "
                         f"{experts.shape} must both be [N = {x.shape[0]}, k]")
    shared_w, *shared_proj = shared if shared is not None else (None,)
    if shared is not None and shared_w.shape != (x.shape[0],):
        raise ValueError(f"gathered_experts: shared_weights {shared_w.shape} must be "
                         f"[N = {x.shape[0]}]")
    _check(x, experts, gate_proj, up_proj, down_proj, tuple(shared_proj), blocks)
    y = _outputs(x, experts, gate_proj, up_proj, down_proj, tuple(shared_proj), blocks,
                 interpret)
    nk = experts.size
    out = jnp.sum(weights.astype(jnp.float32)[..., None] * y[:nk].reshape(*experts.shape, -1),
                  axis=1)
    if shared is not None:
        out = out + shared_w.astype(jnp.float32)[:, None] * y[nk:]
    return out.astype(x.dtype)
