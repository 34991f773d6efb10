"""Backward stage "dh": the reverse pass over chunks, d(state) held in registers.

The forward state pass (h.py) maps the state S at a chunk start to the one at its end,
  v_new = u - w S,   S' = exp(G_last) S + kd^T v_new,   kd = k exp(G_last - G),
and the chunk's outputs read S through O = scale (q exp(G)) S + ... (stage "o"). One program per
(value block, batch, value head) walks the chunks from the last to the first holding dS = d(S'),
the gradient w.r.t. the state at the chunk end (d(final state) to begin with):
  dh[c]     = dS                                           (stored for stage "dqkwg")
  dv_new[c] = dv_local[c] + kd dS                          [C, BV]  (total gradient of v_new)
  dS        = exp(G_last) dS + scale (q exp(G))^T dO - w^T dv_new     (now d(state at chunk start))
and d(initial state) is the dS left at the start of the first chunk. Varlen: the pass restarts at
the last chunk of each sequence from that sequence's d(final state), and d(initial state) of a
sequence is written at its first chunk. dv_local (dv_local.py) is read from memory, or computed
here from the q, k and dO the pass loads anyway (``dv_local=None``: no dv_local kernel and no round
trip of its [C, BV] blocks, but a q k^T per chunk and value block on the pass).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule import kernel_math as km
from pallas_kernels.gated_delta_rule.gpu_triton.h import state_pass_outputs, state_spec


def _kernel(q_ref, k_ref, w_ref, g_ref, do_ref, *refs, chunk_size, scale, varlen, fused):
    # q_ref, k_ref, w_ref [Tp, dk]; g_ref [Tp]; do_ref [Tp, BV]; unless fused, dvl_ref [Tp, BV];
    # dht_ref [dk, BV] float32 ([N, dk, BV] if varlen); varlen: reset_ref, last_ref [NC] int32;
    # dh_ref [NC, dk, BV]; dv_ref [Tp, BV]; dh0_ref [dk, BV] float32 ([N, dk, BV] if varlen).
    refs = list(refs)
    dvl_ref = None if fused else refs.pop(0)
    dht_ref = refs.pop(0)
    reset_ref = last_ref = None
    if varlen:
        reset_ref, last_ref = refs.pop(0), refs.pop(0)
    dh_ref, dv_ref, dh0_ref = refs
    C = chunk_size
    NC = dh_ref.shape[0]
    dk, BV = dh_ref.shape[1], dh_ref.shape[2]
    dS = jnp.zeros((dk, BV), jnp.float32) if varlen else dht_ref[...].astype(jnp.float32)

    def body(i, dS):
        c = NC - 1 - i
        sl = pl.ds(pl.multiple_of(c * C, C), C)
        if varlen:  # the last chunk of sequence r starts from d(final state of r)
            r = last_ref[c]
            end = (r >= 0).astype(jnp.float32)
            dS = end * dht_ref[jnp.maximum(r, 0)].astype(jnp.float32) + (1.0 - end) * dS
        dh_ref[c] = dS.astype(dh_ref.dtype)
        G = g_ref[sl].astype(jnp.float32)
        q, k, do = q_ref[sl, :], k_ref[sl, :], do_ref[sl, :]
        if fused:
            dvl = km.dv_local(q, k, G[:, None], G[None, :], do, scale=scale)
        else:
            dvl = dvl_ref[sl, :]
        dv_new, dS = km.dstate_step(
            q, k, w_ref[sl, :], G[:, None], km.pick_last(G), do, dvl, dS, scale=scale
        )
        dv_ref[sl, :] = dv_new.astype(dv_ref.dtype)
        if varlen:  # the first chunk of sequence r hands its dS to d(initial state of r)
            r = reset_ref[c]

            @pl.when(r >= 0)
            def _():
                dh0_ref[jnp.maximum(r, 0)] = dS.astype(dh0_ref.dtype)

        return dS

    dS = lax.fori_loop(0, NC, body, dS)
    if not varlen:
        dh0_ref[...] = dS.astype(dh0_ref.dtype)


def loop_stages(num_stages: int, dtype) -> int:
    """Triton's pipelining depth for the loads of a reverse pass's loop over chunks: num_stages,
    but 1 for float32 tiles. q, k, w [C, dk] and dO, dv_local [C, BV] in float32 at 3 stages
    asked for 296 KB of shared memory at C 64, dk 128, BV 32 (an H200 has 227 KB)."""
    return num_stages if jnp.dtype(dtype).itemsize < 4 else 1


def chunk_bwd_dh(
    q: jax.Array,
    k: jax.Array,
    w: jax.Array,
    G: jax.Array,
    do: jax.Array,
    dv_local: jax.Array | None,
    dht: jax.Array,
    *,
    scale: float,
    chunk_reset: jax.Array | None = None,
    chunk_last: jax.Array | None = None,
    chunk_size: int = 64,
    block_v: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """The reverse state pass.

    Args:
      q, k: [B, Tp, Hk, dk] (compute dtype, L2-normalised already if asked; q unscaled).
      w: [B, Tp, Hv, dk] (compute dtype, from stage "wy"); G: [B, Tp, Hv] float32.
      do: [B, Tp, Hv, dv] (compute dtype); dv_local: [B, Tp, Hv, dv] (dv_local.py), or None to
        compute it in the pass.
      dht: d(final state), [B, Hv, dk, dv] float32; varlen: [N, Hv, dk, dv] (N a power of two).
      chunk_reset, chunk_last: varlen only (B == 1): [NC] int32, the sequence a chunk starts / ends
        (-1 if none), as for the forward state pass (h.py).
    Returns:
      dh [B, NC, Hv, dk, dv] (compute dtype): d(state at the end of each chunk);
      dv_new [B, Tp, Hv, dv] (compute dtype): the total gradient of v_new;
      dh0 [B or N, Hv, dk, dv] float32: d(initial state) (varlen: rows of sequences with no
        token are left unwritten).
    """
    B, Tp, Hk, dk = q.shape
    Hv, dv = do.shape[2], do.shape[3]
    C = chunk_size
    NC = Tp // C
    n = Hv // Hk
    BV = min(block_v, dv)
    if dv % BV:
        raise ValueError(f"chunk_bwd_dh: block_v = {BV} must divide dv = {dv}")
    varlen = chunk_reset is not None
    if varlen and B != 1:
        raise ValueError("chunk_bwd_dh: varlen needs B == 1")
    fused = dv_local is None
    kernel = functools.partial(_kernel, chunk_size=C, scale=scale, varlen=varlen, fused=fused)
    N = dht.shape[0] if varlen else None
    in_specs = [
        pl.BlockSpec((None, Tp, None, dk), lambda j, b, h: (b, 0, lax.div(h, n), 0)),
        pl.BlockSpec((None, Tp, None, dk), lambda j, b, h: (b, 0, lax.div(h, n), 0)),
        pl.BlockSpec((None, Tp, None, dk), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, Tp, None), lambda j, b, h: (b, 0, h)),
        pl.BlockSpec((None, Tp, None, BV), lambda j, b, h: (b, 0, h, j)),
    ] + [pl.BlockSpec((None, Tp, None, BV), lambda j, b, h: (b, 0, h, j))] * (not fused)
    in_specs.append(state_spec(dk, BV, N))
    args = [q, k, w, G, do] + [dv_local] * (not fused) + [dht]
    if varlen:
        in_specs += [pl.BlockSpec((NC,), lambda j, b, h: (0,))] * 2
        args += [chunk_reset.astype(jnp.int32), chunk_last.astype(jnp.int32)]
    out_specs, out_shape = state_pass_outputs(B, Tp, NC, Hv, dk, dv, BV, w.dtype, N)
    return pl.pallas_call(
        kernel,
        grid=(dv // BV, B, Hv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps, num_stages=loop_stages(num_stages, w.dtype)
        ),
        interpret=interpret,
        name="gdn_chunk_bwd_dh",
    )(*args)
