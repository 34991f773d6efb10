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

With a shared expert of the same sizes (Qwen3-Next's), each token's rows are followed by one
that reads its weights instead (``shared``): rows r = n (k + 1) + j, the shared expert in slot
j = k. It costs no kernel of its own.

:func:`routed_experts` is a whole decode MoE block (transformers' Qwen3NextSparseMoeBlock: the
router's matmul, softmax over the E experts in float32, top-k, optionally renormalised, and
the shared expert gated by a sigmoid) in three kernels and one XLA fusion of sums:

  "router", split over d like gate_up: one program per (token n, block of BE experts, one of S
  slices of d), the partial sums of the router's logits l_part[s, n, block] = x[n, slice]
  router[slice, block] (and, with the shared expert, of its gate's logit);
  "gate_up" takes those instead of the ids: each routed row's program sums its token's logits
  (rounded to x's dtype, as the router's matmul gives them), computes p = softmax(logits)
  (float32) and picks its expert by k rounds of ``m = max(p_left); e = min(ids where
  p_left == m); p_left[e] = -inf`` (the round-j winner is slot j's expert, ties to the lower
  id as ``lax.top_k``), its weight p[e] (over the k winners' sum with norm_topk_prob); one
  program per row writes both out;
  "down" reads the ids from there and scales its partial sums by the row's weight (the shared
  row's sigmoid(shared gate logit), float32), leaving sum_s' sum_j y[s', n (k + 1) + j].
At one token of the 80B block on an H200 (profiles, in a jitted loop of 64 calls) this took
the block from 12 kernels (0.043 ms busy, 0.050-0.051 ms a call in the loop) to 4 (0.032 ms
busy, 0.037-0.038 in the loop; 6 kernels and 0.037 ms busy with the router's matmuls in XLA).

:func:`gathered_expert_outputs` is the two kernels alone: y, each slot's expert output before the
weighting. Expert parallelism gives the slots of other devices' experts as negative ids: their
programs write zeros and read no weights.

Both kernels are matrix-vector products (one token row), summed with elementwise multiplies in
float32: at decode the cost is the weight bytes, not FLOPs, so the blocks are wide (BI, BD =
128 columns: 256 contiguous bytes of each bf16 weight row per load, read in steps of BR rows)
and the grid is large (d split S ways) for the HBM bandwidth. At the 80B's sizes (d 2048, I 512,
k 10 + the shared expert, one token) :meth:`BlockSizes.for_shape` gives gate_up a grid of
(11, 4, 8) = 352 programs of 256 rows of gate_e and up_e each, down one of (11, 16, 2) = 352
programs of 256 rows, each read as one block; 69 MB of weights in all.
The gradient (``jax.custom_vjp``) is that of the jnp reference, recomputed; training batches
take the grouped-matmul paths anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.platform import GPU_PLATFORMS, traced_platform


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and launch parameters of the two kernels (powers of 2 for Triton).

    block_i: intermediate columns per "gate_up" program (dividing I); block_d: output columns
    per "down" program (dividing d); block_r: weight rows per step of either kernel's reduction
    (dividing I / down_splits and d / splits); splits: the slices of d that "gate_up" splits
    its reduction into (partial sums added in "down"); down_splits: the slices of I that
    "down" splits its reduction into (partial sums added in jnp); num_warps: Triton warps.
    router_block_e, router_splits: the experts' columns per "router" program and the slices of
    d its reduction is split into (:func:`routed_experts`; partial sums added in "gate_up").
    The router's defaults, from the 80B block at one token on an H200 (profiles, 2 MB of the
    router's weight): 32 x 16 (a grid of 16 x 16 programs) 3.06 us, 64 x 16 3.28, 128 x 8 (the
    first choice) 5.33; the whole block 32.3 / 32.5 / 34.5 us busy.
    The defaults suit the 80B's d 2048, I 512 on an H200: grids of N k x 4 x 8 ("gate_up") and
    N k x 16 x 2 ("down") programs, each reading 128 KB and 64 KB of weights in 2 steps of 128
    rows. Measured there (the routed experts alone, one token, 80B sizes, in a jitted loop,
    with down_splits 1 and h made in jnp): 0.042 ms; block_r 64: 0.048, 32: 0.058; splits 4:
    0.056, 16: 0.043 (block_r 64); the jnp gather 0.067 ms. :meth:`for_shape` widens block_r
    to 256 where d and I take it (the 80B's do).
    """

    router_block_e: int = 32
    router_splits: int = 16
    block_i: int = 128
    block_d: int = 128
    block_r: int = 128
    splits: int = 8
    down_splits: int = 2
    num_warps: int = 4

    @classmethod
    def for_shape(cls, d: int, inner: int, num_experts: int | None = None) -> BlockSizes:
        """The blocks the kernels take by default for d, I (and, routing in the kernels, E):
        the defaults with block_r 256 and router_splits 8 (each program's slice of d or I one
        block of 256 weight rows) where those fit, else the defaults where they fit, else
        (small models) the defaults' tiles cut to the largest powers of 2 that fit: E must
        still be a power of 2 when routing. At the 80B block on an H200 (one token,
        ``routed_experts`` in a jitted loop of 32 calls queued back to back, two rounds each;
        results/h200-2026-12-02c): 30.6-31.0 us a call against 33.4-33.5 with block_r 128; 8
        tokens 157.7 against 166.1, 32 tokens 514 against 556. Around it no other block did
        better: router_block_e 64 30.9-31.0, router_splits 4 32.3-33.0, block_d 64
        33.4-33.8, block_i 64 35.3-35.6, down_splits 1 32.7-33.1, splits 4 33.6-33.7, 8 warps
        42.2, 2 warps 60.7; block_r 512 (splits 4) 59.0-59.5."""
        for blocks in (cls(block_r=256, router_splits=8), cls()):
            if blocks.mismatch(d, inner, num_experts) is None:
                return blocks

        def fit(n, cap):  # the largest power of 2 dividing n, at most cap
            return max(1, min(cap, n & -n))

        base = cls()
        block_r = fit(math.gcd(d, inner), base.block_r)
        return dataclasses.replace(
            base, router_splits=fit(d // block_r, base.router_splits),
            block_i=fit(inner, base.block_i), block_d=fit(d, base.block_d), block_r=block_r,
            splits=fit(d // block_r, base.splits),
            down_splits=fit(inner // block_r, base.down_splits))

    def mismatch(self, d: int, inner: int, num_experts: int | None = None) -> str | None:
        """Why these blocks do not fit d and I (a message), or None when they do; with
        ``num_experts``, E too, for routing in the kernels (:func:`routed_experts`, whose
        programs load a token's E router logits as one block: a power of 2)."""
        for of in ("router_block_e", "block_i", "block_d", "block_r", "num_warps"):
            size = getattr(self, of)
            if size < 1 or size & (size - 1):
                return f"{of} = {size} must be a power of 2 (a Triton block size)"
        for of in ("router_splits", "splits", "down_splits"):
            if getattr(self, of) < 1:
                return f"{of} = {getattr(self, of)} must be at least 1"
        for name, size, multiple, of in (
                ("I", inner, self.block_i, "block_i"),
                ("I", inner, self.down_splits * self.block_r, "down_splits * block_r"),
                ("d", d, self.block_d, "block_d"),
                ("d", d, self.splits * self.block_r, "splits * block_r"),
                *([("d", d, self.router_splits * self.block_r, "router_splits * block_r")]
                  if num_experts is not None else [])):
            if size % multiple:
                return f"{name} = {size} must be a multiple of {of} = {multiple}"
        if num_experts is not None and (num_experts < 1 or num_experts & (num_experts - 1)):
            return (f"E = {num_experts} must be a power of 2 (a token's router logits are one "
                    f"Triton block)")
        return None


def gathered_expert_outputs_reference(x, experts, gate_proj, up_proj, down_proj,
                                      precision=None):
    """Each token's k expert outputs, jnp: x [N, d], experts [N, k] -> [N, k, d] in x's dtype,
    ``expert_{experts[n, j]}(x[n])``, by gathering the chosen experts' weights ([N, k, d, I]
    per projection) into batched matmuls; a negative id gives a zero row."""
    valid = experts >= 0
    experts = jnp.where(valid, experts, 0)
    h = jax.nn.silu(jnp.einsum("nd,nkdi->nki", x, gate_proj[experts], precision=precision)) * \
        jnp.einsum("nd,nkdi->nki", x, up_proj[experts], precision=precision)
    y = jnp.einsum("nki,nkid->nkd", h, down_proj[experts], precision=precision)
    return jnp.where(valid[..., None], y, jnp.zeros((), y.dtype))


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


def _token_slot(r, k, shared):
    """Row r's (token n, slot j): r = n * slots + j, with slots = k, or k + 1 with a shared
    expert (in slot k)."""
    slots = k + bool(shared)
    return r // slots, r % slots


def _by_slot(j, k, routed, shared):
    """Row work by slot j: ``routed()`` for the routed slots j < k; without a shared expert
    (``shared`` None) every slot is routed, else slot k runs ``shared()``."""
    if shared is None:
        routed()
        return
    pl.when(j < k)(routed)
    pl.when(j == k)(shared)


def _route_slot(logits, j, k, norm_topk_prob):
    """Slot j of a token's top-k routing from its router logits [E] (float32), as qnext_jax's
    ``moe.route`` (transformers' router): (expert id int32, weight float32). The probabilities
    p = softmax(logits) are ranked by k rounds of the max, the lowest id holding it (lax.top_k's
    order: ties to the lower id) and the masking of that id; the weight is p[e], over the k
    winners' sum with norm_topk_prob. Max and min reductions only (what Pallas Triton lowers
    without an argmax)."""
    E = logits.shape[0]
    ids = lax.iota(jnp.int32, E)
    unnormalized = jnp.exp(logits - jnp.max(logits))
    probs = unnormalized / jnp.sum(unnormalized)  # as jax.nn.softmax

    def rank(i, carry):  # round i: the i-th largest probability and its id
        left, total, e_j, p_j = carry
        p = jnp.max(left)
        e = jnp.min(jnp.where(left == p, ids, E - 1))  # E - 1 if none: NaN logits read in bounds
        mine = i == j
        return (jnp.where(ids == e, -jnp.inf, left), total + p, jnp.where(mine, e, e_j),
                jnp.where(mine, p, p_j))

    zero = jnp.zeros((), jnp.float32)
    _, total, e, p = lax.fori_loop(0, k, rank, (probs, zero, jnp.zeros((), jnp.int32), zero))
    return e, p / total if norm_topk_prob else p


def _router_kernel(x_ref, router_ref, *refs, block_r, steps):
    # x_ref [N, d]; router_ref [d, E]; refs: (the shared expert's gate [d, 1],) the logits'
    # partial sums block [1, 1, BE] (, the shared gate logit's [1, 1]).
    n, c, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    shared_gate = refs[0] if len(refs) == 3 else None
    logit_ref, *shared_logit_ref = refs[1:] if shared_gate is not None else refs
    BE = logit_ref.shape[-1]
    cols = pl.ds(c * BE, BE)

    def body(t, acc):
        rows = _row_block(s * steps + t, block_r)
        xs = x_ref[n, rows].astype(jnp.float32)
        acc_l = acc[0] + jnp.sum(xs[:, None] * router_ref[rows, cols].astype(jnp.float32), 0)
        if shared_gate is None:
            return acc_l, acc[1]
        return acc_l, acc[1] + jnp.sum(xs * shared_gate[rows, 0].astype(jnp.float32))

    zero = jnp.zeros((), jnp.float32)
    logits, shared_logit = lax.fori_loop(0, steps, body, (jnp.zeros((BE,), jnp.float32), zero))
    logit_ref[0, 0, :] = logits
    if shared_gate is not None:
        @pl.when(c == 0)  # one column block of the token writes the shared gate's sum
        def _():
            shared_logit_ref[0][0, 0] = shared_logit


def _gate_up_kernel(layer_ref, choice_ref, x_ref, gate_ref, up_ref, *refs, k, shared,
                    norm_topk_prob, block_r, steps):
    # layer_ref: [1] int32, the layer of the stacked experts' weights [L, E, ...]; choice_ref:
    # the expert ids [N k] int32, or (routing: norm_topk_prob not None) the router logits'
    # partial sums [S, N, E] float32; refs: (shared gate [d, I], shared up [d, I],) g_part,
    # u_part blocks [1, 1, BI] (, routing: the expert ids [N k] int32 and weights [N k]
    # float32 it writes).
    shared_refs, (g_ref, u_ref, *routing_refs) = refs[:2 * shared], refs[2 * shared:]
    r, c, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n, j = _token_slot(r, k, shared)
    BI = g_ref.shape[-1]
    cols = pl.ds(c * BI, BI)

    def run(gate_at, up_at):  # token n's row of partial sums, weights read through *_at
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
        if norm_topk_prob is None:
            e = choice_ref[n * k + j]  # negative: another device's expert, a zero row

            @pl.when(e < 0)
            def _():
                g_ref[0, 0, :] = jnp.zeros((BI,), jnp.float32)
                u_ref[0, 0, :] = jnp.zeros((BI,), jnp.float32)
        else:
            # the logits as the router's matmul gives them: in the model dtype (x's)
            logits = jnp.sum(choice_ref[:, n, :], axis=0).astype(x_ref.dtype)
            e, weight = _route_slot(logits.astype(jnp.float32), j, k, norm_topk_prob)

            @pl.when((c == 0) & (s == 0))  # one program of the row writes its routing out
            def _():
                ids_ref, weights_ref = routing_refs
                ids_ref[n * k + j] = e
                weights_ref[n * k + j] = weight

        layer = layer_ref[0]
        pl.when(e >= 0)(lambda: run(lambda rows: gate_ref[layer, e, rows, cols],
                                    lambda rows: up_ref[layer, e, rows, cols]))

    _by_slot(j, k, routed, (lambda: run(lambda rows: shared_refs[0][rows, cols],
                                        lambda rows: shared_refs[1][rows, cols]))
             if shared else None)


def _down_kernel(layer_ref, ids_ref, g_ref, u_ref, down_ref, *refs, k, shared, block_r, steps,
                 dtype):
    # layer_ref: [1] int32, the layer of the stacked weights; ids_ref: the expert ids [N k];
    # g_ref, u_ref: the [S, R, I] float32 partial sums; refs: (shared down [I, d],) (weighting:
    # the weights [N k] float32 (, the partial sums [S, N] float32 of the shared expert's gate
    # logits),) y block [1, 1, BD].
    *ins, y_ref = refs
    shared_refs, weight_refs = ins[:int(shared)], ins[int(shared):]
    r, c, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n, j = _token_slot(r, k, shared)
    BD = y_ref.shape[-1]
    cols = pl.ds(c * BD, BD)

    def run(down_at, weight):  # weight(): the row's weight, read when weighting
        def body(t, acc):
            rows = _row_block(s * steps + t, block_r)
            g = jnp.sum(g_ref[:, r, rows], axis=0)  # [BR]: the sums over the d splits
            u = jnp.sum(u_ref[:, r, rows], axis=0)
            h = (g / (1.0 + jnp.exp(-g)) * u).astype(dtype).astype(jnp.float32)  # silu(g) u
            return acc + jnp.sum(h[:, None] * down_at(rows).astype(jnp.float32), axis=0)

        y = lax.fori_loop(0, steps, body, jnp.zeros((BD,), jnp.float32))
        y_ref[0, 0, :] = y * weight() if weight_refs else y

    def routed():
        e = ids_ref[n * k + j]  # negative (given ids only): a zero row, no weights read
        layer = layer_ref[0]
        pl.when(e >= 0)(lambda: run(lambda rows: down_ref[layer, e, rows, cols],
                                    lambda: weight_refs[0][n * k + j]))

        @pl.when(e < 0)
        def _():
            y_ref[0, 0, :] = jnp.zeros((BD,), jnp.float32)

    def shared_row():
        def weight():  # sigmoid of the gate's logit, rounded to the model dtype as a matmul's
            logit = jnp.sum(weight_refs[1][:, n]).astype(dtype).astype(jnp.float32)
            return jax.nn.sigmoid(logit)

        run(lambda rows: shared_refs[0][rows, cols], weight)

    _by_slot(j, k, routed, shared_row if shared else None)


def _router_partials(x, router_weight, shared_gate, blocks, interpret):
    """The router's matmul as the "router" kernel: one program per (token n, block of BE
    experts, one of S slices of d): (logits' partial sums [S, N, E] float32, and with
    ``shared_gate`` [d, 1] its logit's [S, N] float32, else None)."""
    N, d = x.shape
    E = router_weight.shape[1]
    be, br, splits = min(blocks.router_block_e, E), blocks.block_r, blocks.router_splits
    outs = [jax.ShapeDtypeStruct((splits, N, E), jnp.float32)]
    specs = [pl.BlockSpec((1, 1, be), lambda n, c, s: (s, n, c))]
    if shared_gate is not None:
        outs.append(jax.ShapeDtypeStruct((splits, N), jnp.float32))
        specs.append(pl.BlockSpec((1, 1), lambda n, c, s: (s, n)))
    extra = [] if shared_gate is None else [shared_gate]
    parts = pl.pallas_call(
        functools.partial(_router_kernel, block_r=br, steps=d // splits // br),
        grid=(N, E // be, splits),
        in_specs=[_whole(x.shape), _whole(router_weight.shape)] + [_whole(w.shape) for w in extra],
        out_specs=specs, out_shape=outs,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=2),
        interpret=interpret, name="moe_router",
    )(x, router_weight, *extra)
    return parts[0], (parts[1] if shared_gate is not None else None)


def _kernels(x, choice, gate_proj, up_proj, down_proj, layer, shared, k, blocks, interpret,
             norm_topk_prob=None, shared_gate=None):
    """The pallas_calls over N tokens' rows: k routed slots each, then the shared expert
    (``shared``: its (gate, up, down), or ()), with the experts of layer ``layer`` ([1] int32)
    of the stacked gate_proj, up_proj [L, E, d, I] and down_proj [L, E, I, d].

    choice: the expert ids [N k] int32, or (norm_topk_prob a bool) the router's weight [d, E],
    whose matmul the "router" kernel makes first (with the shared expert's gate [d, 1],
    ``shared_gate``) and from which "gate_up" routes, writing out the ids and weights that
    "down" reads and scales its rows by (the shared rows by the sigmoid of the shared gate's
    logit). Returns y [S', rows, d] float32 and the routing: (ids [N k] int32, weights [N k]
    float32), or () given the ids."""
    N, d = x.shape
    inner = gate_proj.shape[3]
    rows = N * (k + bool(shared))
    bi, bd, br = blocks.block_i, blocks.block_d, blocks.block_r
    splits, down_splits = blocks.splits, blocks.down_splits
    params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=2)
    if norm_topk_prob is not None:
        choice, shared_logits = _router_partials(x, choice, shared_gate if shared else None,
                                                 blocks, interpret)
    part = jax.ShapeDtypeStruct((splits, rows, inner), jnp.float32)
    routing = [] if norm_topk_prob is None else [jax.ShapeDtypeStruct((N * k,), jnp.int32),
                                                 jax.ShapeDtypeStruct((N * k,), jnp.float32)]
    g_part, u_part, *routing = pl.pallas_call(
        functools.partial(_gate_up_kernel, k=k, shared=bool(shared),
                          norm_topk_prob=norm_topk_prob, block_r=br, steps=d // splits // br),
        grid=(rows, inner // bi, splits),
        in_specs=[_whole(layer.shape), _whole(choice.shape), _whole(x.shape),
                  _whole(gate_proj.shape), _whole(up_proj.shape)]
        + [_whole(w.shape) for w in shared[:2]],
        out_specs=[pl.BlockSpec((1, 1, bi), lambda r, c, s: (s, r, c))] * 2
        + [_whole(o.shape) for o in routing],
        out_shape=[part, part, *routing],
        compiler_params=params, interpret=interpret, name="moe_gathered_gate_up",
    )(layer, choice, x, gate_proj, up_proj, *shared[:2])
    ids = routing[0] if routing else choice
    weighting = (routing[1], *([shared_logits] if shared else [])) if routing else ()
    y = pl.pallas_call(
        functools.partial(_down_kernel, k=k, shared=bool(shared), block_r=br,
                          steps=inner // down_splits // br, dtype=x.dtype),
        grid=(rows, d // bd, down_splits),
        in_specs=[_whole(layer.shape), _whole(ids.shape), _whole(g_part.shape),
                  _whole(u_part.shape), _whole(down_proj.shape)]
        + [_whole(w.shape) for w in (*shared[2:], *weighting)],
        out_specs=pl.BlockSpec((1, 1, bd), lambda r, c, s: (s, r, c)),
        out_shape=jax.ShapeDtypeStruct((down_splits, rows, d), jnp.float32),
        compiler_params=params, interpret=interpret, name="moe_gathered_down",
    )(layer, ids, g_part, u_part, down_proj, *shared[2:], *weighting)
    return y, tuple(routing)


def _stacked(fn, layer, gate_proj, up_proj, down_proj):
    """The experts' projections as stacks of layers [L, E, ...] and the layer to read as a [1]
    int32 array: given ``layer``, the projections as they are ([L, E, d, I], [L, E, d, I],
    [L, E, I, d]); without it, [E, d, I], [E, d, I], [E, I, d] as a stack of one layer (a
    reshape, no copy) and layer 0. Raises ValueError (naming ``fn``) for projections of another
    rank, a layer that is not an integer scalar, or a concrete layer outside [0, L)."""
    ndim = 3 if layer is None else 4
    if any(w.ndim != ndim for w in (gate_proj, up_proj, down_proj)):
        lead = "" if layer is None else "L, "
        raise ValueError(
            f"{fn}: expected gate_proj, up_proj [{lead}E, d, I] and down_proj [{lead}E, I, d] "
            f"({'with' if layer is not None else 'without'} layer); got {gate_proj.shape}, "
            f"{up_proj.shape}, {down_proj.shape}")
    if layer is None:
        return gate_proj[None], up_proj[None], down_proj[None], jnp.zeros((1,), jnp.int32)
    dtype = np.dtype(type(layer)) if isinstance(layer, (int, np.integer)) else getattr(
        layer, "dtype", None)
    if (isinstance(layer, bool) or dtype is None or not jnp.issubdtype(dtype, jnp.integer)
            or np.ndim(layer) != 0):
        raise ValueError(f"{fn}: layer must be an integer scalar, got {layer!r}")
    L = gate_proj.shape[0]
    if not isinstance(layer, jax.core.Tracer) and not 0 <= int(layer) < L:
        raise ValueError(f"{fn}: layer = {int(layer)} must be in [0, L = {L})")
    return gate_proj, up_proj, down_proj, jnp.asarray(layer, jnp.int32).reshape(1)


def _at_layer(w, layer):
    """Layer ``layer`` ([1] int32) of a stack w [L, ...]."""
    return lax.dynamic_index_in_dim(w, layer[0], keepdims=False)


def _check(fn, x, gate_proj, up_proj, down_proj, shared, blocks, interpret, routing=False):
    """The blocks the kernels run with: ``blocks``, or (None) :meth:`BlockSizes.for_shape` of
    d, I (and E with ``routing``). ValueError (naming ``fn``) unless x is [N, d], the experts'
    projections (stacks of :func:`_stacked`) [L, E, d, I], [L, E, d, I], [L, E, I, d], the
    shared expert's (gate, up, down) [d, I], [d, I], [I, d], the blocks fit (with
    ``routing``, E too), and (compiled, not ``interpret``) a GPU is traced for."""
    if x.ndim != 2:
        raise ValueError(f"{fn}: x {x.shape} must be [N, d]")
    d = x.shape[1]
    L, E, d_w, inner = gate_proj.shape
    if d_w != d or up_proj.shape != gate_proj.shape or down_proj.shape != (L, E, inner, d):
        projections = (gate_proj, up_proj, down_proj)
        layers = {w.shape[0] for w in projections}
        raise ValueError(
            f"{fn}: expected gate_proj, up_proj [E, d = {d}, I] and down_proj [E, I, d] (a "
            f"layer's, d of x {x.shape}); got {', '.join(str(w.shape[1:]) for w in projections)}"
            + (f" in stacks of {[w.shape[0] for w in projections]} layers (one L for all)"
               if len(layers) > 1 else ""))
    if shared and tuple(w.shape for w in shared) != ((d, inner), (d, inner), (inner, d)):
        raise ValueError(f"{fn}: the shared expert's gate_proj, up_proj, down_proj must be "
                         f"[d, I], [d, I], [I, d] with the routed experts' d = {d}, I = {inner}; "
                         f"got {tuple(tuple(w.shape) for w in shared)}")
    if blocks is None:
        blocks = BlockSizes.for_shape(d, inner, E if routing else None)
    if (why := blocks.mismatch(d, inner, E if routing else None)) is not None:
        raise ValueError(f"{fn}: {why}: pass blocks (BlockSizes) that fit, or leave them to "
                         f"BlockSizes.for_shape")
    # on a CPU Pallas would only say that it supports interpret mode
    if not interpret and (platform := traced_platform()) not in GPU_PLATFORMS:
        raise ValueError(f"{fn}: the Pallas Triton kernels run compiled on a GPU, and this "
                         f"JAX's backend is {platform}: interpret=True runs them in interpret "
                         "mode (slow, for tests), gathered_experts_reference is their jnp form; "
                         "to lower for a GPU from here (jax.export), trace under "
                         "jax.sharding.use_abstract_mesh with its AbstractDevice")
    return blocks


def _check_experts(fn, x, experts):
    if experts.ndim != 2 or experts.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: experts {experts.shape} must be [N = {x.shape[0]}, k]")


def _split_shared(fn, shared, n, name):
    """``shared`` (None, or (a per-token ``name`` [N], gate, up, down)) as (that [N] or None,
    the projections (gate, up, down) or ())."""
    if shared is None:
        return None, ()
    per_token, *projections = shared
    if per_token.shape != (n,):
        raise ValueError(f"{fn}: {name} {per_token.shape} must be [N = {n}]")
    return per_token, tuple(projections)


def _outputs_reference(x, experts, gate_proj, up_proj, down_proj, shared):
    """[N slots, d] float32: each token's k slots' expert outputs, then (with ``shared``, the
    shared expert's (gate, up, down)) its shared expert's output."""
    y = gathered_expert_outputs_reference(x, experts, gate_proj, up_proj, down_proj)
    if shared:  # the shared expert as a stack of one expert that every token chose
        one = jnp.zeros((x.shape[0], 1), jnp.int32)
        y = jnp.concatenate(
            [y, gathered_expert_outputs_reference(x, one, *(w[None] for w in shared))], axis=1)
    return y.astype(jnp.float32).reshape(-1, x.shape[1])


def _weighted_rows(y, row_weights):
    """sum_j row_weights[n, j] y[n slots + j] in float32: y [N slots, d], row_weights
    [N, slots] -> [N, d]."""
    rows = y.reshape(*row_weights.shape, -1)
    return jnp.sum(row_weights.astype(jnp.float32)[..., None] * rows, axis=1)


def _no_grad(a):
    """The (float0) cotangent of an integer input."""
    return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _outputs(x, experts, gate_proj, up_proj, down_proj, layer, shared, blocks, interpret):
    ids = experts.reshape(-1).astype(jnp.int32)
    y, _ = _kernels(x, ids, gate_proj, up_proj, down_proj, layer, shared, experts.shape[1],
                    blocks, interpret)
    return y.sum(0)  # [N slots, d]


def _outputs_fwd(x, experts, gate_proj, up_proj, down_proj, layer, shared, blocks, interpret):
    y = _outputs(x, experts, gate_proj, up_proj, down_proj, layer, shared, blocks, interpret)
    return y, (x, experts, gate_proj, up_proj, down_proj, layer, shared)


def _outputs_bwd(blocks, interpret, res, dy):
    x, experts, gate_proj, up_proj, down_proj, layer, shared = res
    _, vjp = jax.vjp(lambda x, g, u, dn, sh: _outputs_reference(
        x, experts, *(_at_layer(w, layer) for w in (g, u, dn)), sh),
        x, gate_proj, up_proj, down_proj, shared)
    dx, dg, du, ddn, dsh = vjp(dy)
    return dx, _no_grad(experts), dg, du, ddn, _no_grad(layer), dsh


_outputs.defvjp(_outputs_fwd, _outputs_bwd)


def gathered_expert_outputs(x, experts, gate_proj, up_proj, down_proj, *, layer=None,
                            blocks: BlockSizes | None = None, interpret: bool = False):
    """Each token's k expert outputs ``expert_{experts[n, j]}(x[n])``, unweighted, by the two
    Pallas kernels, reading the chosen experts' weights in place.

    Args:
      x: [N, d] tokens (bf16 or float32). experts: [N, k] int expert ids in [0, E), or
        negative: that slot's output is zero and no weights are read for it (expert
        parallelism: another device's expert). Not checked: an id of E or more reads out of
        bounds.
      gate_proj, up_proj: [E, d, I]; down_proj: [E, I, d], in x's dtype.
      layer: None, or an integer scalar (a traced one too): the projections are then stacks
        over layers ([L, E, d, I], [L, E, d, I], [L, E, I, d]) and layer ``layer``'s experts
        are read in place. A scanned model hands its layer scan's whole stack and index, where
        a slice of the stack would be copied whole to reach a kernel. Not checked when traced:
        a layer outside [0, L) reads out of bounds.
      blocks: the kernels' :class:`BlockSizes` (None: ``BlockSizes.for_shape`` of d and I,
        and E when routing). interpret: run in Pallas interpret mode (CPU
        tests).
    Returns:
      [N, k, d] float32. The gradient is that of :func:`gathered_expert_outputs_reference`.
    Raises:
      ValueError: shapes that do not match (or a layer given to unstacked projections),
        blocks that do not divide I and d, or compiled kernels where no GPU is traced for.
    """
    fn = "gathered_expert_outputs"
    gate_proj, up_proj, down_proj, layer = _stacked(fn, layer, gate_proj, up_proj, down_proj)
    blocks = _check(fn, x, gate_proj, up_proj, down_proj, (), blocks, interpret)
    _check_experts(fn, x, experts)
    y = _outputs(x, experts, gate_proj, up_proj, down_proj, layer, (), blocks, interpret)
    return y.reshape(*experts.shape, x.shape[1])


def gathered_experts(x, weights, experts, gate_proj, up_proj, down_proj, *, shared=None,
                     layer=None, blocks: BlockSizes | None = None, interpret: bool = False):
    """sum_j weights[n, j] * expert_{experts[n, j]}(x[n]) with the SwiGLU experts
    ``down(silu(x gate) * (x up))``, reading the chosen experts' weights in place; with
    ``shared``, plus ``shared_weights[n] * shared_expert(x[n])`` computed as one more row of
    the same two kernels (no kernels of its own).

    Args:
      x, experts, gate_proj, up_proj, down_proj, layer, blocks, interpret: as for
        :func:`gathered_expert_outputs`.
      weights: [N, k] router weights.
      shared: None, or (shared_weights [N], gate [d, I], up [d, I], down [I, d]): a shared
        expert of the routed experts' sizes (as Qwen3-Next's) and its per-token weight (the
        sigmoid gate).
    Returns:
      [N, d] in x's dtype; float32 sums inside, the weights applied in float32. The gradient is
      that of the jnp reference (recomputed).
    Raises:
      ValueError: shapes that do not match, blocks that do not divide I and d, or compiled
        kernels where no GPU is traced for.
    """
    fn = "gathered_experts"
    shared_w, shared_proj = _split_shared(fn, shared, x.shape[0], "shared_weights")
    gate_proj, up_proj, down_proj, layer = _stacked(fn, layer, gate_proj, up_proj, down_proj)
    blocks = _check(fn, x, gate_proj, up_proj, down_proj, shared_proj, blocks, interpret)
    _check_experts(fn, x, experts)
    if weights.shape != experts.shape:
        raise ValueError(f"{fn}: weights {weights.shape} and experts {experts.shape} must both "
                         f"be [N = {x.shape[0]}, k]")
    y = _outputs(x, experts, gate_proj, up_proj, down_proj, layer, shared_proj, blocks,
                 interpret)
    row_weights = weights.astype(jnp.float32)
    if shared is not None:
        row_weights = jnp.concatenate([row_weights, shared_w.astype(jnp.float32)[:, None]], 1)
    return _weighted_rows(y, row_weights).astype(x.dtype)


def _router_logits(x, router_weight):
    """The router's matmul as qnext_jax's model makes it (a ``Dense`` in x's dtype): x [N, d]
    @ router_weight [d, E] -> [N, E] in x's dtype."""
    return jnp.dot(x, router_weight.astype(x.dtype))


def _routed_reference(x, router_weight, gate_proj, up_proj, down_proj, shared, experts,
                      norm_topk_prob):
    """jnp form of :func:`routed_experts` given the experts [N, k] it chose (the backward's
    recomputation): (out [N, d] in x's dtype, weights [N, k] float32)."""
    logits = _router_logits(x, router_weight)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights = jnp.take_along_axis(probs, experts, axis=-1)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    row_weights = weights
    if shared:
        gate = jax.nn.sigmoid(_router_logits(x, shared[0])[:, 0].astype(jnp.float32))
        row_weights = jnp.concatenate([weights, gate[:, None]], axis=1)
    y = _outputs_reference(x, experts, gate_proj, up_proj, down_proj, shared[1:])
    return _weighted_rows(y, row_weights).astype(x.dtype), weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _routed(x, router_weight, gate_proj, up_proj, down_proj, layer, shared, top_k,
            norm_topk_prob, blocks, interpret):
    N, d = x.shape
    y, (ids, weights) = _kernels(x, router_weight, gate_proj, up_proj, down_proj, layer,
                                 shared[1:], top_k, blocks, interpret, norm_topk_prob,
                                 shared[0] if shared else None)
    # The weighted rows' sums over the down splits and each token's slots: one XLA fusion.
    out = y.reshape(-1, N, top_k + bool(shared), d).sum((0, 2)).astype(x.dtype)
    return out, weights.reshape(N, top_k), ids.reshape(N, top_k)


def _routed_fwd(x, router_weight, gate_proj, up_proj, down_proj, layer, shared, top_k,
                norm_topk_prob, blocks, interpret):
    out = _routed(x, router_weight, gate_proj, up_proj, down_proj, layer, shared, top_k,
                  norm_topk_prob, blocks, interpret)
    return out, (x, router_weight, gate_proj, up_proj, down_proj, layer, shared, out[2])


def _routed_bwd(top_k, norm_topk_prob, blocks, interpret, res, cotangents):
    x, router_weight, gate_proj, up_proj, down_proj, layer, shared, experts = res
    d_out, d_weights, _ = cotangents
    _, vjp = jax.vjp(lambda x, r, g, u, dn, sh: _routed_reference(
        x, r, *(_at_layer(w, layer) for w in (g, u, dn)), sh, experts, norm_topk_prob),
        x, router_weight, gate_proj, up_proj, down_proj, shared)
    dx, dr, dg, du, ddn, dsh = vjp((d_out, d_weights))
    return dx, dr, dg, du, ddn, _no_grad(layer), dsh


_routed.defvjp(_routed_fwd, _routed_bwd)


def routed_experts(x, router_weight, gate_proj, up_proj, down_proj, *, top_k: int,
                   norm_topk_prob: bool, shared=None, layer=None,
                   blocks: BlockSizes | None = None, interpret: bool = False):
    """A decode MoE block (transformers' Qwen3NextSparseMoeBlock) in three Pallas kernels: the
    router's matmul, each token's top-k routing, its k experts weighted and, with ``shared``,
    the sigmoid-gated shared expert (see the module docstring):

        logits = x[n] @ router_weight                         (in x's dtype, as a Dense gives)
        weights, experts = top_k(softmax(logits))             (float32; / their sum with
                                                                norm_topk_prob)
        out[n] = sum_j weights[n, j] expert_{experts[n, j]}(x[n])
                 + sigmoid(x[n] @ shared_expert_gate) shared_expert(x[n])

    Args:
      x: [N, d] tokens (bf16 or float32).
      router_weight: [d, E], the router's kernel (qnext_jax's ``gate``; transformers'
        ``gate.weight`` transposed); E a power of 2.
      gate_proj, up_proj: [E, d, I]; down_proj: [E, I, d], in x's dtype.
      top_k: experts per token, in [1, E]. norm_topk_prob: renormalise the k weights to sum
        to 1.
      shared: None, or (shared_expert_gate [d, 1], gate [d, I], up [d, I], down [I, d]): a
        shared expert of the routed experts' sizes (as Qwen3-Next's) and its gate's kernel.
      layer: None, or an integer scalar (a traced one too): the projections are then stacks
        over layers ([L, E, d, I], [L, E, d, I], [L, E, I, d]) and layer ``layer``'s experts
        are read in place. A scanned model hands its layer scan's whole stack and index, where
        a slice of the stack would be copied whole to reach a kernel. Not checked when traced:
        a layer outside [0, L) reads out of bounds.
      blocks: the kernels' :class:`BlockSizes` (None: ``BlockSizes.for_shape`` of d and I,
        and E when routing). interpret: run in Pallas interpret mode (CPU
        tests).
    Returns:
      (out [N, d] in x's dtype (float32 sums inside, the weights applied in float32),
      weights [N, k] float32, experts [N, k] int32): the weights and experts of
      ``moe.route(x @ router_weight, top_k, norm_topk_prob)`` (the same experts in the same
      order, ties to the lower id, given the same logits: the kernel sums the matmul in
      float32 in its own order before rounding to x's dtype; the weights to float32
      rounding). The gradient (w.r.t. x, the router's and the shared gate's weights, the
      projections and ``shared``, through out and weights) is that of the jnp reference with
      these experts, recomputed.
    Raises:
      ValueError: shapes that do not match (or a layer given to unstacked projections), top_k
        out of [1, E], E not a power of 2, blocks that do not divide I and d, or compiled
        kernels where no GPU is traced for.
    """
    fn = "routed_experts"
    shared_gate, shared_proj = (None, ()) if shared is None else (shared[0], tuple(shared[1:]))
    gate_proj, up_proj, down_proj, layer = _stacked(fn, layer, gate_proj, up_proj, down_proj)
    blocks = _check(fn, x, gate_proj, up_proj, down_proj, shared_proj, blocks, interpret,
                    routing=True)
    d, E = x.shape[1], gate_proj.shape[1]
    if router_weight.shape != (d, E):
        raise ValueError(f"{fn}: router_weight {router_weight.shape} must be [d = {d}, "
                         f"E = {E}]")
    if shared_gate is not None and shared_gate.shape != (d, 1):
        raise ValueError(f"{fn}: shared_expert_gate {shared_gate.shape} must be [d = {d}, 1]")
    if not 1 <= top_k <= E:
        raise ValueError(f"{fn}: top_k = {top_k} must be in [1, E = {E}]")
    shared = () if shared is None else (shared_gate, *shared_proj)
    return _routed(x, router_weight, gate_proj, up_proj, down_proj, layer, shared, int(top_k),
                   bool(norm_topk_prob), blocks, interpret)
