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
  then, in jnp, h[r] = silu(sum_s g_part[s, r]) * sum_s u_part[s, r]   (in x's dtype)
  kernel "down": one program per (row r, block of BD output columns), all I rows:
    y[r, block] = h[r] down_e[:, block]                                   (float32)
  then, in jnp, out[n] = sum_j weights[n, j] y[n k + j]                   (float32, to x's dtype)

:func:`gathered_expert_outputs` is the two kernels alone: y, each slot's expert output before the
weighting (expert parallelism drops the slots of other devices' experts from it first).

Both kernels are matrix-vector products (one token row), summed with elementwise multiplies in
float32: at decode the cost is the weight bytes, not FLOPs, so the blocks are wide (BI, BD =
128 columns: 256 contiguous bytes of each bf16 weight row per load, read in steps of BR rows)
and the grid is large (d split S ways) for the HBM bandwidth. At the 80B's sizes (d 2048, I 512,
k 10, one token) the defaults give gate_up a grid of (10, 4, 8) = 320 programs of 256 rows of
gate_e and up_e each, down one of (10, 16) = 160 programs of 512 rows; 63 MB of weights in all.
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
    (dividing I and d / splits); splits: the slices of d that "gate_up" splits its reduction
    into (partial sums added in jnp); num_warps: Triton warps.
    The defaults suit the 80B's d 2048, I 512 on an H200: grids of N k x 4 x 8 ("gate_up") and
    N k x 16 ("down") programs, each reading 128 KB of weights in 2 and 4 steps of 128 rows.
    Measured there (the routed experts alone, one token, 80B sizes, in a jitted loop): 0.042 ms;
    block_r 64: 0.048, 32: 0.058; splits 4: 0.056, 16: 0.043 (block_r 64); the jnp gather
    0.067 ms.
    """

    block_i: int = 128
    block_d: int = 128
    block_r: int = 128
    splits: int = 8
    num_warps: int = 4

    def mismatch(self, d: int, inner: int) -> str | None:
        """Why these blocks do not fit d and I (a message), or None when they do."""
        for of in ("block_i", "block_d", "block_r", "num_warps"):
            size = getattr(self, of)
            if size < 1 or size & (size - 1):
                return f"{of} = {size} must be a power of 2 (a Triton block size)"
        for name, size, multiple, of in (
                ("I", inner, self.block_i, "block_i"), ("I", inner, self.block_r, "block_r"),
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


def _gate_up_kernel(ids_ref, x_ref, gate_ref, up_ref, g_ref, u_ref, *, k, block_r, steps):
    r, c, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e, n = ids_ref[r], r // k
    BI = g_ref.shape[-1]
    cols = pl.ds(c * BI, BI)

    def body(t, acc):
        rows = _row_block(s * steps + t, block_r)  # steps of block_r rows per split
        xs = x_ref[n, rows].astype(jnp.float32)[:, None]  # [BR, 1]
        g = acc[0] + jnp.sum(xs * gate_ref[e, rows, cols].astype(jnp.float32), axis=0)
        u = acc[1] + jnp.sum(xs * up_ref[e, rows, cols].astype(jnp.float32), axis=0)
        return g, u

    zero = jnp.zeros((BI,), jnp.float32)
    g, u = lax.fori_loop(0, steps, body, (zero, zero))
    g_ref[0, 0, :] = g
    u_ref[0, 0, :] = u


def _down_kernel(ids_ref, h_ref, down_ref, y_ref, *, block_r):
    r, c = pl.program_id(0), pl.program_id(1)
    e = ids_ref[r]
    BD = y_ref.shape[-1]
    cols = pl.ds(c * BD, BD)

    def body(t, acc):
        rows = _row_block(t, block_r)
        hs = h_ref[r, rows].astype(jnp.float32)[:, None]  # [BR, 1]
        return acc + jnp.sum(hs * down_ref[e, rows, cols].astype(jnp.float32), axis=0)

    y_ref[0, :] = lax.fori_loop(0, h_ref.shape[1] // block_r, body,
                                jnp.zeros((BD,), jnp.float32))


def _check(x, experts, gate_proj, up_proj, down_proj, blocks):
    N, d = x.shape
    E, d_w, inner = gate_proj.shape
    if experts.ndim != 2 or experts.shape[0] != N:
        raise ValueError(f"gathered_experts: experts {experts.shape} must be [N = {N}, k]")
    if d_w != d or up_proj.shape != gate_proj.shape or down_proj.shape != (E, inner, d):
        raise ValueError(f"gathered_experts: expected gate_proj, up_proj [E, d = {d}, I] and "
                         f"down_proj [E, I, d]; got {gate_proj.shape}, {up_proj.shape}, "
                         f"{down_proj.shape}")
    if (why := blocks.mismatch(d, inner)) is not None:
        raise ValueError(f"gathered_experts: {why}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _outputs(x, experts, gate_proj, up_proj, down_proj, blocks, interpret):
    N, k = experts.shape
    d, inner = gate_proj.shape[1:]
    ids = experts.reshape(-1).astype(jnp.int32)
    bi, bd, br, splits = blocks.block_i, blocks.block_d, blocks.block_r, blocks.splits
    params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=2)
    part = jax.ShapeDtypeStruct((splits, N * k, inner), jnp.float32)
    g_part, u_part = pl.pallas_call(
        functools.partial(_gate_up_kernel, k=k, block_r=br, steps=d // splits // br),
        grid=(N * k, inner // bi, splits),
        in_specs=[_whole(ids.shape), _whole(x.shape), _whole(gate_proj.shape),
                  _whole(up_proj.shape)],
        out_specs=[pl.BlockSpec((1, 1, bi), lambda r, c, s: (s, r, c))] * 2,
        out_shape=[part, part],
        compiler_params=params, interpret=interpret, name="moe_gathered_gate_up",
    )(ids, x, gate_proj, up_proj)
    h = (jax.nn.silu(g_part.sum(0)) * u_part.sum(0)).astype(x.dtype)  # [N*k, I]
    y = pl.pallas_call(
        functools.partial(_down_kernel, block_r=br),
        grid=(N * k, d // bd),
        in_specs=[_whole(ids.shape), _whole(h.shape), _whole(down_proj.shape)],
        out_specs=pl.BlockSpec((1, bd), lambda r, c: (r, c)),
        out_shape=jax.ShapeDtypeStruct((N * k, d), jnp.float32),
        compiler_params=params, interpret=interpret, name="moe_gathered_down",
    )(ids, h, down_proj)
    return y.reshape(N, k, d)


def _outputs_fwd(x, experts, gate_proj, up_proj, down_proj, blocks, interpret):
    y = _outputs(x, experts, gate_proj, up_proj, down_proj, blocks, interpret)
    return y, (x, experts, gate_proj, up_proj, down_proj)


def _outputs_bwd(blocks, interpret, res, dy):
    x, experts, gate_proj, up_proj, down_proj = res
    _, vjp = jax.vjp(lambda x, g, u, dn: gathered_expert_outputs_reference(
        x, experts, g, u, dn).astype(jnp.float32), x, gate_proj, up_proj, down_proj)
    dx, dg, du, ddn = vjp(dy)
    return dx, np.zeros(experts.shape, jax.dtypes.float0), dg, du, ddn


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
    _check(x, experts, gate_proj, up_proj, down_proj, blocks)
    return _outputs(x, experts, gate_proj, up_proj, down_proj, blocks, interpret)


def gathered_experts(x, weights, experts, gate_proj, up_proj, down_proj, **options):
    """sum_j weights[n, j] * expert_{experts[n, j]}(x[n]) with the SwiGLU experts
    ``down(silu(x gate) * (x up))``, reading the chosen experts' weights in place.

    Args:
      x, experts, gate_proj, up_proj, down_proj, and the keyword ``options`` (blocks,
        interpret): as for :func:`gathered_expert_outputs`.
      weights: [N, k] router weights.
    Returns:
      [N, d] in x's dtype; float32 sums inside, the router weights applied in float32.
    Raises:
      ValueError: shapes that do not match, or blocks that do not divide I and d.
    """
    if weights.shape != experts.shape:
        raise ValueError(f"gathered_experts: weights {weights.shape} and experts "
                         f"{experts.shape} must both be [N = {x.shape[0]}, k]")
    y = gathered_expert_outputs(x, experts, gate_proj, up_proj, down_proj, **options)
    return jnp.sum(weights.astype(jnp.float32)[..., None] * y, axis=1).astype(x.dtype)
