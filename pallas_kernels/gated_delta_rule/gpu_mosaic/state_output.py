"""Stages "h" and "o" fused, Pallas on the Mosaic GPU lowering (Hopper: TMA and WGMMA).

One program per (value head, batch row, block of value columns) walks its chunks in order with
the state block S [dk, block_v] float32 held in registers, and per chunk of C tokens (cumulative
log decay G, the chunk-local cumsum of g; w, u from stage "wy"):
  v_new = u - w S                                               [C, block_v]
  o     = scale (exp(G) * (q S) + tril(q k^T * exp(G_i - G_j)) v_new)
  S     = exp(G_C) S + k^T (exp(G_C - G) * v_new)
so neither the chunk states nor v_new go through HBM (the Triton backend writes both in "h" and
reads them back in "o"). The matmul operands are in the compute dtype (bf16 or f16: WGMMA's
16-bit kinds); the state, the accumulators and the decays are float32. The chunk inputs stream
through shared memory by TMA, max_concurrent_steps chunks ahead of the one in use.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def _tiled(dtype) -> tuple:
    """The shared-memory transforms of a WGMMA operand tile of `dtype` whose rows are at least
    128 bytes (every tile here: 64 or more 16-bit values a row): 128-byte swizzle, the widest."""
    return (
        plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(128),
    )


def _products(*terms, emulate: bool):
    """[a_i @ b_i + c_i] in float32 for terms (a_i, b_i, c_i): a_i a smem ref or (for WGMMA, 16-bit)
    register array, b_i a smem ref (either may be a transposed view), c_i a float32 array or
    the result's shape (no addend). Compiled: all WGMMAs are issued before the first is awaited.
    emulate (interpret mode: the CPU has no WGMMA): jnp.dot of the loaded operands."""
    if emulate:

        def value(x):
            return x if isinstance(x, jax.Array) else x[...]

        return [
            jnp.dot(value(a), value(b), preferred_element_type=jnp.float32)
            + (0.0 if isinstance(c, tuple) else c)
            for a, b, c in terms
        ]

    def run(accs):
        for acc, (a, b, _) in zip(accs, terms):
            plgpu.wgmma(acc, a, b)

    def zeros(shape):
        return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

    inits = [zeros(c) if isinstance(c, tuple) else c for _, _, c in terms]
    return pl.run_state(run)([plgpu.ACC.init(c) for c in inits])


def _chunk_step(q_s, k_s, w_s, u_s, G_s, Gc_s, s_smem, v_smem, vd_smem, s, *, block_v, products):
    """One chunk of stages "h" and "o" (module docstring) on its smem tiles: q_s, k_s, w_s
    [C, dk]; u_s [C, block_v]; G_s and Gc_s the chunk's G twice (one smem buffer is read in one
    layout only: rows, columns); s [dk, block_v] float32 (WGMMA layout); s_smem, v_smem, vd_smem
    scratch. Returns (o / scale, the next s), float32. The named scopes label the phases in
    Mosaic GPU profiles (CompilerParams.profile_dir)."""
    C = q_s.shape[0]
    cdt = q_s.dtype
    wgmma = plgpu.Layout.WGMMA
    k_t = k_s.transpose((1, 0))
    # Ordered to keep few tiles live at once (registers): p (bf16) before w S and q S.
    with jax.named_scope("store_state"):
        s_smem[...] = s.astype(cdt)
        plgpu.commit_smem()
    with jax.named_scope("qk"):
        (qk,) = products((q_s, k_t, (C, C)))
    with jax.named_scope("p"):
        G_row = plgpu.load(G_s, layout=wgmma.reduce(1))
        G_col = plgpu.load(Gc_s, layout=wgmma.reduce(0))
        i = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=wgmma)
        j = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=wgmma)
        gap = lax.broadcast_in_dim(G_row, (C, C), [0]) - lax.broadcast_in_dim(G_col, (C, C), [1])
        # G is non-increasing (g <= 0): gap <= 0 on and below the diagonal, where it is used.
        p = jnp.where(i >= j, qk * jnp.exp(jnp.minimum(gap, 0.0)), 0.0).astype(cdt)
    with jax.named_scope("ws_qs"):
        ws, qs = products((w_s, s_smem, (C, block_v)), (q_s, s_smem, (C, block_v)))
    with jax.named_scope("v_new"):
        G_last = G_s[C - 1]
        v_new = plgpu.load(u_s, layout=wgmma).astype(jnp.float32) - ws
        v_smem[...] = v_new.astype(cdt)
        to_end = lax.broadcast_in_dim(jnp.exp(G_last - G_row), v_new.shape, [0])
        vd_smem[...] = (v_new * to_end).astype(cdt)
        plgpu.commit_smem()
        o_first = qs * lax.broadcast_in_dim(jnp.exp(G_row), qs.shape, [0])
    with jax.named_scope("o_state"):
        return products((p, v_smem, o_first), (k_t, vd_smem, s * jnp.exp(G_last)))


def _kernel(
    q_ref,
    k_ref,
    w_ref,
    u_ref,
    G_ref,
    s0_ref,
    o_ref,
    sT_ref,
    *scratch,
    scale,
    group,
    chunk,
    block_v,
    emulate,
):
    # q_ref, k_ref [B, Tp, Hk, dk]; w_ref [B, Tp, Hv, dk]; u_ref, o_ref [B, Tp, Hv, dv];
    # G_ref [B, Hv, Tp] float32; s0_ref, sT_ref [B, Hv, dk, dv] float32.
    # scratch: the chunk buffers (q, k, w, u, G twice, o), each [slots, ...], the loads' barriers
    # [slots], then s_smem [dk, block_v], v_smem, vd_smem [C, block_v] (compute dtype).
    *buffers, o_buf, loaded, s_smem, v_smem, vd_smem = scratch
    slots = o_buf.shape[0]
    hv = lax.axis_index("heads")
    b = lax.axis_index("batch")
    cols = pl.ds(lax.axis_index("vblocks") * block_v, block_v)
    hk = lax.div(hv, jnp.array(group, hv.dtype))
    C = chunk
    n_chunks = G_ref.shape[-1] // C
    wgmma = plgpu.Layout.WGMMA
    products = functools.partial(_products, emulate=emulate)

    def fetch(c, slot):
        rows = pl.ds(c * C, C)
        sources = (
            q_ref.at[b, rows, hk],
            k_ref.at[b, rows, hk],
            w_ref.at[b, rows, hv],
            u_ref.at[b, rows, hv, cols],
            G_ref.at[b, hv, rows],
            G_ref.at[b, hv, rows],
        )
        for src, buf in zip(sources, buffers):
            plgpu.copy_gmem_to_smem(src, buf.at[slot], loaded.at[slot])

    for c in range(min(slots, n_chunks)):
        fetch(c, c)

    def step(c, s):
        slot = lax.rem(c, slots)
        with jax.named_scope("wait_inputs"):
            plgpu.barrier_wait(loaded.at[slot])
        o, s = _chunk_step(
            *(buf.at[slot] for buf in buffers),
            s_smem,
            v_smem,
            vd_smem,
            s,
            block_v=block_v,
            products=products,
        )
        with jax.named_scope("store_o"):
            # The store of chunk c - slots (this slot's last) must have read o_s before reuse.
            o_s = o_buf.at[slot]
            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
            o_s[...] = (o * scale).astype(o_s.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, pl.ds(c * C, C), hv, cols])

        @pl.when(c + slots < n_chunks)
        def _():
            with jax.named_scope("fetch"):
                fetch(c + slots, slot)  # every read of this slot's inputs has completed above

        return s

    s = lax.fori_loop(
        0, n_chunks, step, plgpu.load(s0_ref.at[b, hv, :, cols], layout=wgmma, optimized=False)
    )
    sT_ref.at[b, hv, :, cols][...] = s
    plgpu.wait_smem_to_gmem(0)


def chunk_fwd_state_output(
    q,
    k,
    w,
    u,
    G,
    initial_state,
    *,
    scale: float,
    chunk_size: int = 64,
    block_v: int = 64,
    max_concurrent_steps: int = 2,
    interpret: bool = False,
):
    """Stages "h" and "o" in one Mosaic GPU kernel (dense, chunk-aligned inputs).

    Args:
      q, k: [B, Tp, Hk, dk] compute dtype (bf16 / f16), already L2-normalised if asked for;
        Tp a multiple of chunk_size (zero padding: g = 0, k = w = u = 0 there).
      w: [B, Tp, Hv, dk], u: [B, Tp, Hv, dv], compute dtype (stage "wy").
      G: [B, Hv, Tp] float32, the chunk-local cumsum of g (note: heads before tokens).
      initial_state: [B, Hv, dk, dv] float32.
      scale: multiplies q k^T and q S.
      block_v: value columns per program (a multiple of 64 dividing dv).
    Returns:
      o [B, Tp, Hv, dv] (compute dtype) and the final state [B, Hv, dk, dv] float32.
    """
    B, Tp, Hk, dk = q.shape
    Hv, dv = u.shape[2], u.shape[3]
    if Tp % chunk_size or dv % block_v or block_v % 64 or chunk_size % 64 or dk % 64:
        raise ValueError(
            "chunk_fwd_state_output: needs Tp % chunk_size == 0, chunk_size, dk and block_v "
            f"multiples of 64, block_v dividing dv; got Tp {Tp}, chunk_size {chunk_size}, "
            f"dk {dk}, dv {dv}, block_v {block_v}"
        )
    cdt = q.dtype
    slots = max(1, min(max_concurrent_steps, Tp // chunk_size))
    kernel = functools.partial(
        _kernel,
        scale=float(scale),
        group=Hv // Hk,
        chunk=chunk_size,
        block_v=block_v,
        emulate=bool(interpret),
    )
    return plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((B, Tp, Hv, dv), cdt),
            jax.ShapeDtypeStruct((B, Hv, dk, dv), jnp.float32),
        ),
        scratch_types=(
            *(
                plgpu.SMEM((slots, chunk_size, d), cdt, transforms=_tiled(cdt))
                for d in (dk, dk, dk, block_v)
            ),
            plgpu.SMEM((slots, chunk_size), jnp.float32),
            plgpu.SMEM((slots, chunk_size), jnp.float32),
            plgpu.SMEM((slots, chunk_size, block_v), cdt, transforms=_tiled(cdt)),
            plgpu.Barrier(num_arrivals=6, num_barriers=slots),
            plgpu.SMEM((dk, block_v), cdt, transforms=_tiled(cdt)),
            plgpu.SMEM((chunk_size, block_v), cdt, transforms=_tiled(cdt)),
            plgpu.SMEM((chunk_size, block_v), cdt, transforms=_tiled(cdt)),
        ),
        grid=(Hv, B, dv // block_v),
        grid_names=("heads", "batch", "vblocks"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(q, k, w, u, G, initial_state)
