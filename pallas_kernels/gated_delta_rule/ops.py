"""Public gated-delta-rule ops: backend dispatch and the custom_vjp around the kernels.

Backends (``impl``):
  "reference"          pure jnp (reference.py); differentiable by plain autodiff.
  "pallas_triton"      Pallas, Triton lowering (NVIDIA GPU): gpu_triton/.
  "pallas_tpu"         Pallas, Mosaic TPU lowering: tpu/.
  "pallas_mosaic_gpu"  Pallas, Mosaic GPU lowering (Hopper): gpu_mosaic/. Its kernel fuses the
                       state pass and the outputs of the forward for bf16 / f16 dense inputs;
                       the rest (w and u, float32 or cu_seqlens inputs, the forward kept for
                       the backward, the backward and decode) runs the "pallas_triton" kernels.
  "auto"               "pallas_triton" on GPU, "pallas_tpu" on TPU, "reference" elsewhere
                       (and "reference" for shapes the kernels do not take, see _kernel_ok);
                       the environment variable PALLAS_GDN_IMPL, when set, overrides "auto".

Gradients of the Pallas paths: a ``jax.custom_vjp`` whose forward runs the kernels and saves only
its inputs; its backward runs the Pallas backward kernels of the backend, packed sequences
(cu_seqlens) included. "pallas_triton" (gpu_triton/bwd.py): recompute w, u and the chunk states
with the forward kernels, then the reverse state pass and the per-chunk gradient stages.
"pallas_tpu" (tpu/chunk_bwd.py): recompute the chunk states with the forward kernel, then one
kernel walks the chunks backwards with d(state) in VMEM and computes every chunk's gradients
(w, u, (I + A)^-1 recomputed in it). The decode op's backward is ``jax.vjp`` of the jnp
recurrence on both backends.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule.reference import (
    chunk_gated_delta_rule_ref,
    recurrent_gated_delta_rule,
)
from pallas_kernels.platform import GPU_PLATFORMS, traced_platform

IMPLS = ("auto", "pallas_triton", "pallas_mosaic_gpu", "pallas_tpu", "reference")
#: The backends whose kernels are Pallas on an NVIDIA GPU (compiled, they need one).
GPU_IMPLS = ("pallas_triton", "pallas_mosaic_gpu")
#: The environment variable that overrides impl="auto".
IMPL_ENV = "PALLAS_GDN_IMPL"


def env_impl(*, op: str) -> str | None:
    """The backend the environment variable PALLAS_GDN_IMPL names in place of "auto" (an escape
    hatch for deployments: PALLAS_GDN_IMPL=reference turns the kernels off), or None when it is
    unset or empty. Raises ValueError when it names no backend."""
    impl = os.environ.get(IMPL_ENV)
    if not impl:
        return None
    if impl not in IMPLS or impl == "auto":
        raise ValueError(
            f"pallas_kernels.gated_delta_rule.{op}: environment variable {IMPL_ENV} must be one "
            f"of {IMPLS[1:]}, got {impl!r}"
        )
    return impl


def _platform() -> str:
    return jax.default_backend()


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def _kernel_ok(dims: common.Dims) -> bool:
    """Shapes the Pallas kernels take: power-of-two head dims >= 16 (Triton tiles)."""
    return all(_is_pow2(d) and d >= 16 for d in (dims.head_k_dim, dims.head_v_dim))


def resolve_impl(impl: str, dims: common.Dims | None = None, *, op: str) -> str:
    """Maps impl (possibly "auto") to a concrete backend; raises on unknown names."""
    if impl not in IMPLS:
        raise ValueError(
            f"pallas_kernels.gated_delta_rule.{op}: `impl` must be one of {IMPLS}, got {impl!r}"
        )
    if impl == "auto":
        impl = env_impl(op=op) or impl
    if impl == "auto":
        plat = _platform()
        if plat == "gpu":
            impl = "pallas_triton"
        elif plat == "tpu":
            impl = "pallas_tpu"
        else:
            impl = "reference"
        if dims is not None and impl != "reference" and not _kernel_ok(dims):
            impl = "reference"
    if impl != "reference" and dims is not None and not _kernel_ok(dims):
        raise ValueError(
            f"pallas_kernels.gated_delta_rule.{op}: impl={impl!r} needs power-of-two head dims >= 16, "
            f"got dk = {dims.head_k_dim}, dv = {dims.head_v_dim}; use impl='reference'"
        )
    return impl


def check_compiled_platform(impl: str, interpret: Any, *, op: str) -> None:
    """The GPU kernels ("pallas_triton", "pallas_mosaic_gpu") outside interpret mode need a GPU:
    JAX's default backend, or the abstract device of the abstract mesh traced under (how
    ``jax.export`` lowers them for CUDA from another machine). Raises ValueError naming what to
    do otherwise (on a CPU Pallas would only say that it supports interpret mode)."""
    if impl not in GPU_IMPLS or interpret:
        return
    platform = traced_platform()
    if platform not in GPU_PLATFORMS:
        raise ValueError(
            f"pallas_kernels.gated_delta_rule.{op}: impl={impl!r} runs compiled on a GPU, and "
            f"this JAX's backend is {platform}: use impl='reference' (or 'auto'), or "
            "interpret=True for interpret mode (slow, for tests); to lower for a GPU from here "
            "(jax.export), trace under jax.sharding.use_abstract_mesh with its AbstractDevice"
        )


@dataclasses.dataclass(frozen=True)
class _Config:
    impl: str
    scale: float
    use_qk_l2norm: bool
    chunk_size: int
    interpret: Any
    block_sizes: Any


def _triton_block_sizes(cfg: _Config):
    from pallas_kernels.gated_delta_rule.gpu_triton import fwd as triton_fwd

    return cfg.block_sizes or triton_fwd.BlockSizes(chunk=cfg.chunk_size)


def _kernel_fwd(cfg: _Config, q, k, v, g, beta, s0, cu_seqlens, keep_states=False):
    """Runs the forward kernels. Returns (o, final_state, states): states are what the Triton
    forward keeps for the backward when keep_states and BlockSizes.save_states, else None."""
    # One compute dtype for the matmul operands: the dtype of q/k/v (promoted if they differ).
    cdt = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q, k = q.astype(cdt), k.astype(cdt)
    if cfg.impl == "pallas_mosaic_gpu":
        from pallas_kernels.gated_delta_rule.gpu_mosaic import fwd as mosaic_fwd

        if keep_states or not mosaic_fwd.supports(
            cdt, cu_seqlens, q.shape[3], v.shape[3], cfg.chunk_size
        ):
            cfg = dataclasses.replace(cfg, impl="pallas_triton")  # the kernels it shares
        else:
            o, final = mosaic_fwd.chunk_gated_delta_rule_fwd(
                q,
                k,
                v.astype(cdt),
                g,
                beta,
                scale=cfg.scale,
                initial_state=s0,
                use_qk_l2norm=cfg.use_qk_l2norm,
                block_sizes=_triton_block_sizes(cfg),
                interpret=bool(cfg.interpret),
            )
            return o.astype(v.dtype), final, None
    if cfg.impl == "pallas_triton":
        from pallas_kernels.gated_delta_rule.gpu_triton import fwd as triton_fwd

        bs = _triton_block_sizes(cfg)
        o, final, *kept = triton_fwd.chunk_gated_delta_rule_fwd(
            q,
            k,
            v.astype(cdt),
            g,
            beta,
            scale=cfg.scale,
            initial_state=s0,
            use_qk_l2norm=cfg.use_qk_l2norm,
            cu_seqlens=cu_seqlens,
            block_sizes=bs,
            interpret=bool(cfg.interpret),
            return_states=keep_states and bs.save_states,
        )
        states = kept[0] if kept else None
    elif cfg.impl == "pallas_tpu":
        from pallas_kernels.gated_delta_rule.tpu.chunk_fwd import chunk_gated_delta_rule_fwd_tpu

        o, final = chunk_gated_delta_rule_fwd_tpu(
            q,
            k,
            v.astype(cdt),
            g,
            beta,
            scale=cfg.scale,
            initial_state=s0,
            use_qk_l2norm=cfg.use_qk_l2norm,
            cu_seqlens=cu_seqlens,
            chunk_size=cfg.chunk_size,
            interpret=cfg.interpret,
        )
        states = None
    else:
        raise AssertionError(cfg.impl)
    return o.astype(v.dtype), final, states


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_kernel_op(cfg: _Config, q, k, v, g, beta, s0, cu_seqlens):
    return _kernel_fwd(cfg, q, k, v, g, beta, s0, cu_seqlens)[:2]


def _chunk_kernel_op_fwd(cfg, q, k, v, g, beta, s0, cu_seqlens):
    o, final, states = _kernel_fwd(cfg, q, k, v, g, beta, s0, cu_seqlens, keep_states=True)
    return (o, final), (q, k, v, g, beta, s0, cu_seqlens, states)


def _chunk_kernel_op_bwd(cfg, res, cts):
    """The backward kernels of cfg.impl; cotangents cast to the dtypes of the inputs."""
    q, k, v, g, beta, s0, cu_seqlens, states = res
    do, dht = cts
    cdt = jnp.result_type(q.dtype, k.dtype, v.dtype)
    args = (q.astype(cdt), k.astype(cdt), v.astype(cdt), g, beta, do, dht)
    kw = {
        "scale": cfg.scale,
        "initial_state": s0,
        "use_qk_l2norm": cfg.use_qk_l2norm,
        "cu_seqlens": cu_seqlens,
    }
    if cfg.impl in GPU_IMPLS:
        from pallas_kernels.gated_delta_rule.gpu_triton import bwd as triton_bwd

        grads = triton_bwd.chunk_gated_delta_rule_bwd(
            *args,
            **kw,
            block_sizes=_triton_block_sizes(cfg),
            interpret=bool(cfg.interpret),
            states=states,
        )
    else:
        from pallas_kernels.gated_delta_rule.tpu.chunk_bwd import chunk_gated_delta_rule_bwd_tpu

        grads = chunk_gated_delta_rule_bwd_tpu(
            *args, **kw, chunk_size=cfg.chunk_size, interpret=cfg.interpret
        )
    primals = (q, k, v, g, beta, s0)
    return (*(None if d is None else d.astype(x.dtype) for d, x in zip(grads, primals)), None)


_chunk_kernel_op.defvjp(_chunk_kernel_op_fwd, _chunk_kernel_op_bwd)


def chunk_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: jax.Array | None = None,
    impl: str = "auto",
    *,
    chunk_size: int = 64,
    interpret: Any = False,
    block_sizes: Any = None,
):
    """Chunked gated delta rule (prefill / training), any T; FLA's chunk_gated_delta_rule contract.

    Math (Yang et al. 2024, "Gated Delta Networks", arXiv:2412.06464), per value head, state S
    [dk, dv] float32: S <- exp(g_t) S; S <- S + k_t (beta_t (v_t - S^T k_t))^T; o_t = S^T (scale q_t).
    Computed in the chunked WY/UT form (reference.py documents the stages).

    Args:
      q, k: [B, T, Hk, dk], bfloat16 or float32.
      v: [B, T, Hv, dv], Hv a multiple of Hk (value head h reads key head h // (Hv // Hk)).
      g: [B, T, Hv] log decay (<= 0), float32 (another float dtype is cast to float32, as
        FLA does; its rounding is then already in the input).
      beta: [B, T, Hv] in (0, 1); used in float32 (never rounded to bf16).
      scale: multiplies q; default dk ** -0.5.
      initial_state: [N, Hv, dk, dv] float32 or None (zeros); another float dtype is cast to
        float32. N = B, or len(cu_seqlens) - 1.
      output_final_state: also return the state after the last token (of each sequence).
      use_qk_l2norm_in_kernel: L2-normalise q and k (x * rsqrt(sum x^2 + 1e-6), float32) first.
      cu_seqlens: optional [N + 1] int32 offsets of sequences packed along T (then B must be 1);
        the state restarts from initial_state[n] at each sequence start (all backends). Its
        values (0 first, non-decreasing, T last) are checked when they are concrete; under
        jit (traced) only its shape and dtype are.
      impl: "auto" | "pallas_triton" | "pallas_mosaic_gpu" | "pallas_tpu" | "reference".
      chunk_size: tokens per chunk (power of two, >= 16 for the kernels).
      interpret: run the Pallas kernels in interpret mode (CPU tests): True, or for "pallas_tpu"
        a ``pltpu.InterpretParams``.
      block_sizes: "pallas_triton" only: a ``gpu_triton.fwd.BlockSizes``.

    Returns:
      o [B, T, Hv, dv] in v.dtype; final_state [N, Hv, dk, dv] float32, or None when
      output_final_state is False.

    Raises:
      ValueError: a shape or argument is inconsistent (the message names it); a GPU kernel
        backend without a GPU (check_compiled_platform).
    """
    dims = common.validate_inputs(
        q, k, v, g, beta, initial_state, cu_seqlens, op="chunk_gated_delta_rule", scale=scale
    )
    impl = resolve_impl(impl, dims, op="chunk_gated_delta_rule")
    check_compiled_platform(impl, interpret, op="chunk_gated_delta_rule")
    if impl == "reference":
        return chunk_gated_delta_rule_ref(
            q,
            k,
            v,
            g,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            cu_seqlens=cu_seqlens,
            chunk_size=chunk_size,
        )
    if not _is_pow2(chunk_size) or chunk_size < 16:
        raise ValueError(
            f"chunk_gated_delta_rule: `chunk_size` must be a power of two >= 16, got {chunk_size}"
        )
    cfg = _Config(
        impl,
        float(common.default_scale(dims.head_k_dim, scale)),
        bool(use_qk_l2norm_in_kernel),
        int(chunk_size),
        interpret,
        block_sizes,
    )
    o, final = _chunk_kernel_op(cfg, q, k, v, g, beta, initial_state, cu_seqlens)
    return o, (final if output_final_state else None)


def fused_recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: jax.Array | None = None,
    impl: str = "auto",
    *,
    live: jax.Array | None = None,
    interpret: Any = False,
):
    """Token-by-token gated delta rule for decode (T small, typically 1); same contract as
    ``chunk_gated_delta_rule``.

    Extra args:
      live: optional [B] bool; rows with False keep their state unchanged and get zero outputs
        (padded / free slots of a serving batch).
    Kernel paths (decode kernels) are forward-only; use the chunked op for training. On the kernel
    paths the returned state can reuse the input state's buffer when the caller donates it.
    With cu_seqlens every backend runs the jnp recurrence (reference.py); the decode kernels
    take one sequence per batch row.
    """
    dims = common.validate_inputs(
        q, k, v, g, beta, initial_state, cu_seqlens, op="fused_recurrent_gated_delta_rule",
        scale=scale,
    )
    if live is not None and tuple(live.shape) != (dims.batch,):
        raise ValueError(
            f"fused_recurrent_gated_delta_rule: `live` must have shape [B] = [{dims.batch}], got "
            f"{list(live.shape)}"
        )
    impl = resolve_impl(impl, dims, op="fused_recurrent_gated_delta_rule")
    check_compiled_platform(impl, interpret, op="fused_recurrent_gated_delta_rule")
    s = common.default_scale(dims.head_k_dim, scale)
    if impl == "reference" or cu_seqlens is not None:
        o, final = recurrent_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=True,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            cu_seqlens=cu_seqlens,
        )
        if live is not None:
            if initial_state is None:
                initial_state = jnp.zeros_like(final)
            m = live.astype(bool)
            final = jnp.where(m[:, None, None, None], final, initial_state.astype(jnp.float32))
            o = jnp.where(m[:, None, None, None], o, jnp.zeros((), o.dtype))
        return o, (final if output_final_state else None)
    if initial_state is None:
        initial_state = jnp.zeros(
            (dims.batch, dims.num_v_heads, dims.head_k_dim, dims.head_v_dim), jnp.float32
        )
    if live is None:
        live = jnp.ones((dims.batch,), jnp.bool_)
    cfg = _Config(impl, float(s), bool(use_qk_l2norm_in_kernel), 0, interpret, None)
    o, final = _decode_kernel_op(cfg, q, k, v, g, beta, initial_state, live)
    return o, (final if output_final_state else None)


def _decode_fwd(cfg: _Config, q, k, v, g, beta, s0, live):
    cdt = jnp.result_type(q.dtype, k.dtype)
    if cfg.impl in GPU_IMPLS:
        from pallas_kernels.gated_delta_rule.gpu_triton.decode import gated_delta_rule_decode

        return gated_delta_rule_decode(
            q.astype(cdt),
            k.astype(cdt),
            v,
            g,
            beta,
            s0,
            live,
            scale=cfg.scale,
            use_qk_l2norm=cfg.use_qk_l2norm,
            interpret=bool(cfg.interpret),
        )
    from pallas_kernels.gated_delta_rule.tpu.decode import gated_delta_rule_decode_tpu

    return gated_delta_rule_decode_tpu(
        q.astype(cdt),
        k.astype(cdt),
        v,
        g,
        beta,
        s0,
        live,
        scale=cfg.scale,
        use_qk_l2norm=cfg.use_qk_l2norm,
        interpret=cfg.interpret,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode_kernel_op(cfg: _Config, q, k, v, g, beta, s0, live):
    return _decode_fwd(cfg, q, k, v, g, beta, s0, live)


def _decode_kernel_op_fwd(cfg, q, k, v, g, beta, s0, live):
    return _decode_fwd(cfg, q, k, v, g, beta, s0, live), (q, k, v, g, beta, s0, live)


def _decode_kernel_op_bwd(cfg, res, cts):
    # Backward through the jnp recurrence (the decode kernel is forward-only).
    *res, live = res
    m = live.astype(bool)[:, None, None, None]

    def f(q, k, v, g, beta, s0):
        o, st = recurrent_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            scale=cfg.scale,
            initial_state=s0,
            output_final_state=True,
            use_qk_l2norm_in_kernel=cfg.use_qk_l2norm,
        )
        return jnp.where(m, o, jnp.zeros((), o.dtype)), jnp.where(m, st, s0.astype(st.dtype))

    _, vjp = jax.vjp(f, *res)
    return (*vjp(cts), None)


_decode_kernel_op.defvjp(_decode_kernel_op_fwd, _decode_kernel_op_bwd)
