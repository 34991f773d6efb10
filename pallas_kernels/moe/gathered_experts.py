"""Decode MoE: each token's k routed experts, reading only their weights, without copies.

    out[n] = sum_j weights[n, j] * down_e (silu(x[n] gate_e) * (x[n] up_e)),   e = experts[n, j]

with gate_proj, up_proj [E, d, I] and down_proj [E, I, d] the stacked expert weights (the
layout of qnext_jax's Qwen3NextExperts). :func:`gathered_experts_reference` is the jnp form: it
gathers the chosen experts' weights ([N, k, d, I] per projection, a copy XLA materializes) and
runs batched matmuls. :func:`gathered_experts` is two Pallas Triton kernels that index the
expert weights in place by the expert id (a scalar loaded in the kernel), so each chosen
expert's weights are read once from HBM and never copied:

  kernel "gate_up": one program per (row r = n * k + j, block of BI intermediate columns):
    h[r, block] = silu(x[n] gate_e[:, block]) * (x[n] up_e[:, block])     (float32 sums)
  kernel "down": one program per (token n, block of BD output columns):
    out[n, block] = sum_j weights[n, j] h[n k + j] down_e[:, block]

Both are matrix-vector products (one token row), summed with elementwise multiplies in float32:
at decode the cost is the weight bytes, not FLOPs. The gradient (``jax.custom_vjp``) is that of
the jnp reference, recomputed; training batches take the grouped-matmul paths anyway.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def gathered_expert_outputs(x, experts, gate_proj, up_proj, down_proj, precision=None):
    """Each token's k expert outputs, jnp: x [N, d], experts [N, k] -> [N, k, d] in x's dtype,
    ``expert_{experts[n, j]}(x[n])``, by gathering the chosen experts' weights ([N, k, d, I]
    per projection) into batched matmuls."""
    h = jax.nn.silu(jnp.einsum("nd,nkdi->nki", x, gate_proj[experts], precision=precision)) * \
        jnp.einsum("nd,nkdi->nki", x, up_proj[experts], precision=precision)
    return jnp.einsum("nki,nkid->nkd", h, down_proj[experts], precision=precision)


def gathered_experts_reference(x, weights, experts, gate_proj, up_proj, down_proj,
                               precision=None):
    """jnp form of :func:`gathered_experts` (:func:`gathered_expert_outputs` combined with the
    router weights, in x's dtype). Same arguments and result."""
    y = gathered_expert_outputs(x, experts, gate_proj, up_proj, down_proj, precision)
    return jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype), precision=precision)


def _whole(shape):
    """BlockSpec of a whole array (indexed inside the kernel)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _gate_up_kernel(ids_ref, x_ref, gate_ref, up_ref, h_ref, *, k, block_r):
    r, j = pl.program_id(0), pl.program_id(1)
    e, n = ids_ref[r], r // k
    BI = h_ref.shape[-1]
    cols = pl.ds(j * BI, BI)

    def body(t, acc):
        rows = pl.ds(pl.multiple_of(t * block_r, block_r), block_r)
        xs = x_ref[n, rows].astype(jnp.float32)[:, None]  # [BD, 1]
        g = acc[0] + jnp.sum(xs * gate_ref[e, rows, cols].astype(jnp.float32), axis=0)
        u = acc[1] + jnp.sum(xs * up_ref[e, rows, cols].astype(jnp.float32), axis=0)
        return g, u

    zero = jnp.zeros((BI,), jnp.float32)
    g, u = lax.fori_loop(0, x_ref.shape[1] // block_r, body, (zero, zero))
    h_ref[0, :] = (jax.nn.silu(g) * u).astype(h_ref.dtype)


def _down_kernel(ids_ref, w_ref, h_ref, down_ref, o_ref, *, k, block_r):
    n, c = pl.program_id(0), pl.program_id(1)
    BD = o_ref.shape[-1]
    cols = pl.ds(c * BD, BD)

    def expert(j, acc):
        r = n * k + j
        e = ids_ref[r]

        def body(t, acc_e):
            rows = pl.ds(pl.multiple_of(t * block_r, block_r), block_r)
            hs = h_ref[r, rows].astype(jnp.float32)[:, None]  # [BI, 1]
            return acc_e + jnp.sum(hs * down_ref[e, rows, cols].astype(jnp.float32), axis=0)

        y = lax.fori_loop(0, h_ref.shape[1] // block_r, body, jnp.zeros((BD,), jnp.float32))
        return acc + w_ref[n, j].astype(jnp.float32) * y

    out = lax.fori_loop(0, k, expert, jnp.zeros((BD,), jnp.float32))
    o_ref[0, :] = out.astype(o_ref.dtype)


def _check(x, weights, experts, gate_proj, up_proj, down_proj, block_i, block_d, block_r):
    N, d = x.shape
    E, d_w, inner = gate_proj.shape
    if weights.shape != experts.shape or experts.shape[0] != N:
        raise ValueError(f"gathered_experts: weights {weights.shape} and experts "
                         f"{experts.shape} must both be [N = {N}, k]")
    if d_w != d or up_proj.shape != gate_proj.shape or down_proj.shape != (E, inner, d):
        raise ValueError(f"gathered_experts: expected gate_proj, up_proj [E, d = {d}, I] and "
                         f"down_proj [E, I, d]; got {gate_proj.shape}, {up_proj.shape}, "
                         f"{down_proj.shape}")
    for name, size, block in (("I", inner, block_i), ("d", d, block_d), ("I", inner, block_r),
                              ("d", d, block_r)):
        if size % block:
            raise ValueError(f"gathered_experts: {name} = {size} must be a multiple of its "
                             f"blocks (block_i {block_i}, block_d {block_d}, block_r {block_r})")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _gathered(x, weights, experts, gate_proj, up_proj, down_proj, blocks, interpret):
    N, d = x.shape
    k = experts.shape[1]
    inner = gate_proj.shape[2]
    ids = experts.reshape(-1).astype(jnp.int32)
    block_i, block_d, block_r, num_warps = blocks
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=2)
    h = pl.pallas_call(
        functools.partial(_gate_up_kernel, k=k, block_r=block_r),
        grid=(N * k, inner // block_i),
        in_specs=[_whole(ids.shape), _whole(x.shape), _whole(gate_proj.shape),
                  _whole(up_proj.shape)],
        out_specs=pl.BlockSpec((1, block_i), lambda r, j: (r, j)),
        out_shape=jax.ShapeDtypeStruct((N * k, inner), x.dtype),
        compiler_params=params, interpret=interpret, name="moe_gathered_gate_up",
    )(ids, x, gate_proj, up_proj)
    return pl.pallas_call(
        functools.partial(_down_kernel, k=k, block_r=block_r),
        grid=(N, d // block_d),
        in_specs=[_whole(ids.shape), _whole(weights.shape), _whole(h.shape),
                  _whole(down_proj.shape)],
        out_specs=pl.BlockSpec((1, block_d), lambda n, c: (n, c)),
        out_shape=jax.ShapeDtypeStruct((N, d), x.dtype),
        compiler_params=params, interpret=interpret, name="moe_gathered_down",
    )(ids, weights, h, down_proj)


def _gathered_fwd(x, weights, experts, gate_proj, up_proj, down_proj, blocks, interpret):
    out = _gathered(x, weights, experts, gate_proj, up_proj, down_proj, blocks, interpret)
    return out, (x, weights, experts, gate_proj, up_proj, down_proj)


def _gathered_bwd(blocks, interpret, res, dout):
    x, weights, experts, gate_proj, up_proj, down_proj = res
    _, vjp = jax.vjp(lambda x, w, g, u, dn: gathered_experts_reference(x, w, experts, g, u, dn),
                     x, weights, gate_proj, up_proj, down_proj)
    dx, dw, dg, du, ddn = vjp(dout)
    d_experts = np.zeros(experts.shape, jax.dtypes.float0)
    return dx, dw, d_experts, dg, du, ddn


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def gathered_experts(x, weights, experts, gate_proj, up_proj, down_proj, *, block_i: int = 32,
                     block_d: int = 16, block_r: int = 128, num_warps: int = 4,
                     interpret: bool = False):
    """sum_j weights[n, j] * expert_{experts[n, j]}(x[n]) with the SwiGLU experts
    ``down(silu(x gate) * (x up))``, reading the chosen experts' weights in place.

    Args:
      x: [N, d] tokens (bf16 or float32). weights: [N, k] router weights. experts: [N, k] int
        expert ids in [0, E) (not checked: an id out of range reads out of bounds).
      gate_proj, up_proj: [E, d, I]; down_proj: [E, I, d], in x's dtype.
      block_i, block_d: intermediate columns per "gate_up" program and output columns per "down"
        program (dividing I and d; the defaults give 16 programs per row and 128 per token at the
        80B's I 512, d 2048); block_r: rows of weights per step of either kernel's reduction
        (dividing I and d); num_warps: Triton warps; interpret: run in Pallas interpret mode
        (CPU tests).
    Returns:
      [N, d] in x's dtype; float32 sums inside.
    Raises:
      ValueError: shapes that do not match, or blocks that do not divide I and d.
    """
    _check(x, weights, experts, gate_proj, up_proj, down_proj, block_i, block_d, block_r)
    return _gathered(x, weights, experts, gate_proj, up_proj, down_proj,
                     (block_i, block_d, block_r, num_warps), interpret)
