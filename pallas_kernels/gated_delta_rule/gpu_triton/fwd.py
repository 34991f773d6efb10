"""The chunked forward on GPU (Pallas, Triton lowering): cumsum -> kkt/solve/wy -> h -> o.

Also the token-axis layout shared with the backward (bwd.py): every sequence is laid out on whole
chunks, padded at its end with zeros (g = 0, k = 0, beta = 0: the state passes through unchanged).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule import kernel_math as km
from pallas_kernels.gated_delta_rule.gpu_triton.h import chunk_fwd_h
from pallas_kernels.gated_delta_rule.gpu_triton.h_split import chunk_fwd_h_split
from pallas_kernels.gated_delta_rule.gpu_triton.kkt_solve_wy import chunk_kkt_solve_wy
from pallas_kernels.gated_delta_rule.gpu_triton.o import chunk_fwd_o


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters of the forward and backward kernels (tune per GPU).

    chunk: tokens per chunk (the C of the WY form; a power of two >= 16).
    block_v_h / block_v_o: columns of the value dimension per program in stages "h" / "o".
    block_v_h / block_v_dh None (default): 64 when a grid of 64-column programs
    (B x Hv x dv / 64) holds at least two per SM of the GPU, else 32 (state_block_v). On an
    H200 (132 SMs) at 8x4096 (512 programs) stage "h" took 0.51 ms with 64 against 0.64 with
    32, "dh" 0.63 against 0.89 (profiles); at 1x32768 and 1x8192 (64 programs) tune_gdn.py's
    forward took 2.58 / 0.79 ms with 64 against 2.42 / 0.74 with 32.
    Defaults: the fastest of scripts/tune_gdn.py's variants on an H200 (Hv 32, dk = dv = 128;
    block_v_h 32 (now the narrow choice above) and block_v_dqkwg 128 from the forward +
    backward times at 1x8192 and 1x32768,
    block_k_dqkwg 64 from those at 1x32768: 9.44 against 10.49 ms unsplit (and, with d(w)
    moved to "wy_bwd", the stage alone 1.29 against 2.04 ms unsplit at 8x4096); num_warps_wy 2 from
    the forward at 1x32768 and 8x4096, 2.43 / 2.29-2.36 ms against 2.78 / 2.47 with 4 warps
    and 4.53 / 4.25 with 1; 2 warps elsewhere were slower, by up to 5x in "dqkwg" and "wy_bwd").
    Stage "o" computed inside stage "h" (no h / v_new round trip) was slower there: forward
    3.26 against 2.41 ms at 1x32768 and 2.80 against 2.20 at 8x4096 (each value-block program
    recomputes q k^T on the serial pass), so the two stay separate.
    Backward (bwd.py): block_v_dv / block_v_dh: value columns per program in stages "dv" / "dh";
    block_v_dqkwg: value columns per step of the loop inside a stage "dqkwg" program;
    block_k_dqkwg: key columns per "dqkwg" program (less than dk splits the key dimension over
    programs, each with narrower accumulators; see dqkwg.py).
    fuse_dv_local: the reverse pass "dh" computes stage "dv" itself from the q, k and dO it
    loads (dh.py; not with seq_splits > 1), rather than reading it from the dv_local kernel.
    Default on: on an H200 (bf16) the backward's busy time fell from 5.99 to 5.77 ms at 8x4096
    and from 6.56 to 6.43 at 1x32768 ("dh" grew by 0.30 ms, the dv_local kernel's 0.42 went);
    blocked forward + backward 6.56 / 6.58 -> 6.22 / 6.30 ms at 8x4096, 7.19 / 7.14 -> 7.00 / 7.08
    at 1x32768, 1.98 / 2.00 -> 1.91 / 2.02 at 1x8192 (two runs each).
    seq_splits: dense inputs only (ignored with cu_seqlens): cut each sequence into up to this
    many segments whose state passes run in parallel and are combined exactly (h_split.py, and
    dh_split.py for the backward's reverse pass), for when B x Hv programs of stage "h" leave the
    GPU idle (one long sequence); used by the forward and by the backward. Default 1 (off):
    on an H200 at B = 1 (T 8192 and 32768) 4 and 8 segments were slower, forward and backward
    (the segment maps cost a second pass over the sequence's keys); measure again with
    scripts/tune_gdn.py (variants split4 / split8) on other GPUs.
    save_states: under jax.grad, the forward keeps w, h, v_new and each chunk's (I + A)^-1 for
    the backward, which then skips their recompute (stages kkt/solve/wy and h); costs memory
    until the backward runs: per token and value head dk + dv + C values (compute dtype),
    plus one [dk, dv] state per chunk (1.2 GB at 1 x 32768 tokens, 32 heads of 128,
    bf16); with the L2 norm in the kernel, also q and k normalised (2 dk values per token and
    key head, written by stage "o"), which spares the backward normalising them again (H200
    profiles: forward + backward busy 5.77 -> 5.67 ms at 8x4096, 6.43 -> 6.35 at 1x32768).
    Default on: scripts/bench_gdn.py on an H200 (bf16, Hk 16 / Hv 32, loss sum(o^2)) measured
    forward + backward at 1 x 32768 in 9.74 ms with it and 11.99 ms without.
    """

    chunk: int = 64
    block_v_h: int | None = None
    block_v_o: int = 128
    num_warps_wy: int = 2
    num_warps_h: int = 4
    num_warps_o: int = 4
    num_stages: int = 3
    block_v_dv: int = 64
    block_v_dh: int | None = None
    block_v_dqkwg: int = 128
    block_k_dqkwg: int = 64
    num_warps_dv: int = 4
    num_warps_dh: int = 4
    num_warps_dqkwg: int = 4
    num_warps_wy_bwd: int = 4
    fuse_dv_local: bool = True
    seq_splits: int = 1
    save_states: bool = True


def compiled_f32_dots(fn):
    """Decorator of the GPU entry points: compiled (interpret False), the float32 matmuls of the
    kernels they trace take three TF32 products (km.TF32X3; the float32 forward GPU tests hold
    2e-5 against float64 numpy) rather than exact float32 (km.HIGHEST, which interpret mode
    keeps: the CPU has no TF32). With exact float32 (FMA loops) the stages alone took, on an
    H200 at dk = dv = 128, over 240 s to compile (wy_bwd), 53 s (dqkwg) and 27 s (kkt/solve/wy);
    with TF32X3 12.5, 3.2 and 15.4 s."""

    @functools.wraps(fn)
    def wrapped(*args, interpret=False, **kwargs):
        with km.f32_dots(km.HIGHEST if interpret else km.TF32X3):
            return fn(*args, interpret=interpret, **kwargs)

    return wrapped


def state_block_v(block_v: int | None, v_shape) -> int:
    """Value columns per program of a state pass (stage "h", or the backward's "dh") for values
    v [B, Tp, Hv, dv]: block_v, or when None 64 if B x Hv x dv / 64 programs are at least two
    per SM of the default device (132, an H100/H200's, where the device does not say), else 32."""
    if block_v is not None:
        return block_v
    B, _, Hv, dv = v_shape
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    return 64 if B * Hv * -(-dv // 64) >= 2 * sms else 32


def chunk_local_cumsum(g: jax.Array, chunk: int, *, reverse: bool = False) -> jax.Array:
    """Stage "cumsum": [B, Tp, H] float32 -> inclusive cumsum of g inside each chunk.

    reverse=True sums from the chunk end (x_t + ... + x_{C-1}): the transpose of the forward
    cumsum, which turns d(G) into d(g) in the backward.
    """
    B, Tp, H = g.shape
    return lax.cumsum(g.reshape(B, Tp // chunk, chunk, H), axis=2, reverse=reverse).reshape(
        B, Tp, H
    )


class ChunkLayout(NamedTuple):
    """Where the tokens of a [B, T] call lie on the chunk-aligned [B, Tp] axis of the kernels.

    Dense (cu_seqlens None): Tp = T rounded up to a chunk multiple, zero padding at the end.
    Varlen (B == 1): ``varlen`` (common.VarlenLayout) lays each sequence out from a chunk start;
    chunk_reset / chunk_last [NC] int32: the sequence a chunk starts / ends (-1 if none), the
    arguments of the state passes; n_pad: N rounded up to a power of two (Triton block sizes),
    the leading size of the per-sequence state arrays handed to the kernels.
    """

    T: int
    Tp: int
    varlen: common.VarlenLayout | None = None
    chunk_reset: jax.Array | None = None
    chunk_last: jax.Array | None = None
    n_pad: int = 0

    def to_chunks(self, x: jax.Array) -> jax.Array:
        """[B, T, ...] -> [B, Tp, ...], zeros at padding positions."""
        if self.varlen is None:
            return common.pad_to_chunks(x, self.Tp)
        return common.gather_aligned(x, self.varlen)

    def from_chunks(self, x: jax.Array) -> jax.Array:
        """[B, Tp, ...] -> [B, T, ...] (the inverse of to_chunks, and its transpose)."""
        if self.varlen is None:
            return x[:, : self.T]
        return common.scatter_packed(x, self.varlen)

    def pad_states(self, s: jax.Array) -> jax.Array:
        """Varlen: [N, ...] per-sequence states -> [n_pad, ...], zero rows appended."""
        return jnp.pad(s, [(0, self.n_pad - s.shape[0])] + [(0, 0)] * (s.ndim - 1))

    def kernel_initial_state(self, initial_state, shape) -> jax.Array | None:
        """The initial-state argument of the state passes: dense, initial_state as is (or None);
        varlen, [n_pad, Hv, dk, dv] float32 (zeros when None). shape: [N, Hv, dk, dv]."""
        if self.varlen is None:
            return initial_state
        if initial_state is None:
            return jnp.zeros((self.n_pad,) + tuple(shape[1:]), jnp.float32)
        return self.pad_states(initial_state.astype(jnp.float32))

    def seq_has_tokens(self) -> jax.Array:
        """Varlen: [N, 1, 1, 1] bool, the sequence is not empty (its final state is computed)."""
        return (self.varlen.last_chunk >= 0)[:, None, None, None]


def chunk_layout(T: int, chunk: int, cu_seqlens: jax.Array | None = None) -> ChunkLayout:
    """The ChunkLayout of T tokens (cu_seqlens [N + 1] int32 or None); jit-compatible."""
    if cu_seqlens is None:
        return ChunkLayout(T, -(-T // chunk) * chunk)
    lay = common.varlen_layout(cu_seqlens, T, chunk)
    N = cu_seqlens.shape[0] - 1
    NC = lay.src.shape[0] // chunk
    chunk_reset = jnp.where(lay.chunk_start, lay.chunk_seq, -1).astype(jnp.int32)
    chunk_last = (
        jnp.full((NC,), -1, jnp.int32)
        .at[jnp.where(lay.last_chunk >= 0, lay.last_chunk, NC)]
        .set(jnp.arange(N, dtype=jnp.int32), mode="drop")
    )
    return ChunkLayout(
        T, lay.src.shape[0], lay, chunk_reset, chunk_last, 1 << max(0, (N - 1).bit_length())
    )


def chunk_states(
    k,
    v,
    G,
    beta,
    initial_state,
    lay: ChunkLayout,
    *,
    block_sizes: BlockSizes,
    use_qk_l2norm: bool,
    solve_precision,
    interpret: bool,
    return_inverse: bool = False,
):
    """Stages "kkt/solve/wy" and "h" on chunk-aligned inputs (run by the forward, and again by
    the backward, which recomputes them rather than storing them; the backward also takes each
    chunk's (I + A)^-1, ``return_inverse``). Stage "h" is split along the sequence
    (h_split.chunk_fwd_h_split) when block_sizes.seq_splits > 1 and the inputs are dense.

    Args: k [B, Tp, Hk, dk], v [B, Tp, Hv, dv] (compute dtype); G, beta [B, Tp, Hv] float32;
      initial_state: ``lay.kernel_initial_state(...)``.
    Returns: w [B, Tp, Hv, dk], h [B, NC, Hv, dk, dv], v_new [B, Tp, Hv, dv] (compute dtype) and
      the final state [B or n_pad, Hv, dk, dv] float32 (see gpu_triton.h.chunk_fwd_h); with
      return_inverse, then T [B, Tp, Hv, C] (compute dtype; see kkt_solve_wy.chunk_kkt_solve_wy).
    """
    C = block_sizes.chunk
    w, u, *inverse = chunk_kkt_solve_wy(
        k,
        v,
        G,
        beta,
        chunk_size=C,
        use_qk_l2norm=use_qk_l2norm,
        solve_precision=solve_precision,
        num_warps=block_sizes.num_warps_wy,
        num_stages=block_sizes.num_stages,
        return_inverse=return_inverse,
        interpret=interpret,
    )
    h_args = {
        "chunk_size": C,
        "block_v": state_block_v(block_sizes.block_v_h, v.shape),
        "use_qk_l2norm": use_qk_l2norm,
        "num_warps": block_sizes.num_warps_h,
        "num_stages": block_sizes.num_stages,
        "interpret": interpret,
    }
    if lay.varlen is None and block_sizes.seq_splits > 1:
        h, v_new, final = chunk_fwd_h_split(
            k, w, u, G, initial_state, segments=block_sizes.seq_splits, **h_args
        )
    else:
        h, v_new, final = chunk_fwd_h(
            k,
            w,
            u,
            G,
            initial_state,
            chunk_reset=lay.chunk_reset,
            chunk_last=lay.chunk_last,
            **h_args,
        )
    return (w, h, v_new, final, *inverse)


@compiled_f32_dots
def chunk_gated_delta_rule_fwd(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale: float,
    initial_state=None,
    use_qk_l2norm: bool = False,
    cu_seqlens=None,
    block_sizes: BlockSizes = BlockSizes(),
    solve_precision=None,
    interpret: bool = False,
    return_states: bool = False,
):
    """Forward of the chunked gated delta rule (validated inputs).

    Args: q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g, beta [B, T, Hv]; initial_state [N, Hv, dk, dv]
      float32 or None; cu_seqlens [N + 1] int32 or None (then B == 1; sequences are re-laid out
      chunk-aligned and the state pass restarts at each one). q/k/v share one dtype, the compute
      dtype of the matmuls. solve_precision: precision of the (I + A)^-1 matmuls (float32
      operands); default km.mm_precision of the compute dtype (float32 inputs: see
      compiled_f32_dots) and TF32 for bf16 inputs.
    Returns: o [B, T, Hv, dv] in v.dtype, final_state [N, Hv, dk, dv] float32; with
      return_states also (w, h, v_new, inverse) on the chunk-aligned axis (chunk_states with
      return_inverse), then with use_qk_l2norm q and k L2-normalised ([B, Tp, Hk, dk], compute
      dtype; o.chunk_fwd_o's return_normalized), for bwd.chunk_gated_delta_rule_bwd(states=...).
    """
    C = block_sizes.chunk
    cdt = k.dtype
    if solve_precision is None:
        solve_precision = km.mm_precision(cdt)
    lay = chunk_layout(q.shape[1], C, cu_seqlens)
    q, k, v = (lay.to_chunks(x.astype(cdt)) for x in (q, k, v))
    g, beta = (lay.to_chunks(x.astype(jnp.float32)) for x in (g, beta))
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    state_shape = (N, v.shape[2], k.shape[3], v.shape[3])
    G = chunk_local_cumsum(g, C)
    w, h, v_new, final, *inverse = chunk_states(
        k,
        v,
        G,
        beta,
        lay.kernel_initial_state(initial_state, state_shape),
        lay,
        block_sizes=block_sizes,
        use_qk_l2norm=use_qk_l2norm,
        solve_precision=solve_precision,
        interpret=interpret,
        return_inverse=return_states,
    )
    keep_qk = return_states and use_qk_l2norm
    o, qn, kn = chunk_fwd_o(
        q,
        k,
        G,
        h,
        v_new,
        scale=scale,
        out_dtype=v.dtype,
        chunk_size=C,
        block_v=block_sizes.block_v_o,
        use_qk_l2norm=use_qk_l2norm,
        return_normalized=keep_qk,
        num_warps=block_sizes.num_warps_o,
        num_stages=block_sizes.num_stages,
        interpret=interpret,
    )
    normalized = (qn, kn) if keep_qk else ()
    if lay.varlen is not None:
        s0 = jnp.zeros(state_shape, jnp.float32) if initial_state is None else initial_state
        final = jnp.where(lay.seq_has_tokens(), final[:N], s0.astype(jnp.float32))
    if return_states:
        return lay.from_chunks(o), final, (w, h, v_new, *inverse, *normalized)
    return lay.from_chunks(o), final
