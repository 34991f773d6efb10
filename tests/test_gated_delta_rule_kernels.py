"""Pallas gated-delta-rule kernels on CPU: interpret mode vs a float64 numpy recurrence,
gradients vs jax.grad of the reference, and jax.export lowering for ("cuda",) and ("tpu",)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from test_gated_delta_rule import TOL, make_inputs, numpy_gdn, rel_err

from pallas_kernels.gated_delta_rule import (
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_ref,
    fused_recurrent_gated_delta_rule,
    resolve_impl,
)

KERNELS = ["pallas_triton", "pallas_tpu"]


def _chunk(impl, *arrays, **static):
    f = jax.jit(
        lambda q, k, v, g, b, s0: chunk_gated_delta_rule(
            q, k, v, g, b, initial_state=s0, impl=impl, interpret=True, **static
        )
    )
    return f(*arrays)


# (T, Hk, Hv, with_state, dtype): every T of the spec, both head ratios, both dtypes.
FWD_CASES = [
    (1, 1, 1, False, jnp.float32),
    (63, 1, 2, True, jnp.float32),
    (64, 1, 1, True, jnp.bfloat16),
    (65, 2, 2, False, jnp.float32),
    (200, 1, 2, True, jnp.bfloat16),
]


@pytest.mark.parametrize(
    "case", FWD_CASES, ids=lambda c: f"T{c[0]}-{c[1]}:{c[2]}-s{int(c[3])}-{jnp.dtype(c[4]).name}"
)
@pytest.mark.parametrize("impl", KERNELS)
def test_chunk_kernel_vs_numpy(impl, case):
    T, Hk, Hv, with_state, dtype = case
    q, k, v, g, beta, s0 = make_inputs(T + 17 * Hv, 2, T, Hk, Hv, 16, 32, dtype, with_state)
    q, k = q * 2.0, k * 0.5  # exercise the in-kernel L2 norm
    o, st = _chunk(
        impl, q, k, v, g, beta, s0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0, l2norm=True)
    assert o.shape == o_ref.shape and o.dtype == dtype and st.dtype == jnp.float32
    assert rel_err(o, o_ref) < TOL[dtype]
    assert rel_err(st, st_ref) < TOL[dtype]


@pytest.mark.parametrize("impl", KERNELS)
def test_chunk_kernel_scale_no_l2norm(impl):
    q, k, v, g, beta, s0 = make_inputs(3, 1, 40, 2, 4, 16, 16, jnp.float32)
    o, st = _chunk(impl, q, k, v, g, beta, s0, scale=0.7, output_final_state=True, chunk_size=16)
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, scale=0.7, initial_state=s0)
    assert rel_err(o, o_ref) < TOL[jnp.float32]
    assert rel_err(st, st_ref) < TOL[jnp.float32]


@pytest.mark.parametrize("dtype,T", [(jnp.float32, 1), (jnp.bfloat16, 2)])
@pytest.mark.parametrize("impl", KERNELS)
def test_decode_kernel_vs_numpy(impl, dtype, T):
    q, k, v, g, beta, s0 = make_inputs(T, 3, T, 1, 2, 16, 32, dtype)
    live = jnp.array([True, False, True])
    f = jax.jit(
        lambda *a: fused_recurrent_gated_delta_rule(
            *a[:5],
            initial_state=a[5],
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            live=a[6],
            impl=impl,
            interpret=True,
        )
    )
    o, st = f(q, k, v, g, beta, s0, live)
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0, l2norm=True)
    assert rel_err(o[::2], o_ref[::2]) < TOL[dtype]
    assert rel_err(st[::2], st_ref[::2]) < TOL[jnp.float32]  # state math is float32
    np.testing.assert_array_equal(np.asarray(st[1]), np.asarray(s0[1]))  # dead row untouched
    assert float(jnp.abs(o[1].astype(jnp.float32)).max()) == 0.0


@pytest.mark.parametrize(
    "impl,dtype",
    [("pallas_triton", jnp.float32), ("pallas_triton", jnp.bfloat16), ("pallas_tpu", jnp.float32)],
)
def test_chunk_kernel_varlen(impl, dtype):
    """Packed sequences (with an empty and a one-token one): the state restarts at each start."""
    cu = np.array([0, 5, 5, 70, 71, 150], np.int32)
    T, N = int(cu[-1]), len(cu) - 1
    q, k, v, g, beta, s0 = make_inputs(11, 1, T, 1, 2, 16, 16, dtype, N=N)
    f = jax.jit(
        lambda *a: chunk_gated_delta_rule(
            *a[:5],
            initial_state=a[5],
            output_final_state=True,
            cu_seqlens=a[6],
            impl=impl,
            interpret=True,
            chunk_size=16,
        )
    )
    o, st = f(q, k, v, g, beta, s0, jnp.asarray(cu))
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu)
    assert st.shape == (N, 2, 16, 16)
    assert rel_err(o, o_ref) < TOL[dtype]
    assert rel_err(st, st_ref) < TOL[dtype]


@pytest.mark.parametrize("impl", ["reference", "pallas_triton"])
def test_chunk_then_decode_loop(impl):
    """Chunked prefill then the decode op token by token == one recurrence."""
    q, k, v, g, beta, s0 = make_inputs(4, 2, 20, 1, 2, 16, 16, jnp.float32)
    o1, s = _chunk(
        impl,
        q[:, :13],
        k[:, :13],
        v[:, :13],
        g[:, :13],
        beta[:, :13],
        s0,
        output_final_state=True,
    )
    step = jax.jit(
        lambda *a: fused_recurrent_gated_delta_rule(
            *a[:5],
            initial_state=a[5],
            output_final_state=True,
            impl=impl,
            interpret=True,
        )
    )
    outs = [o1]
    for t in range(13, 20):
        sl = slice(t, t + 1)
        o_t, s = step(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], s)
        outs.append(o_t)
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0)
    assert rel_err(jnp.concatenate(outs, axis=1), o_ref) < TOL[jnp.float32]
    assert rel_err(s, st_ref) < TOL[jnp.float32]


def _loss(q, k, v, g, beta, s0, impl):
    o, st = chunk_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        initial_state=s0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        impl=impl,
        # Interpret on CPU (and for the TPU kernel anywhere but a TPU); compiled on the GPU.
        interpret=jax.default_backend() == "cpu" or impl == "pallas_tpu",
    )
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(st * st)


_GRAD = jax.jit(jax.grad(_loss, argnums=(0, 1, 2, 3, 4, 5)), static_argnums=6)


@pytest.fixture(scope="module")
def grad_case():
    args = make_inputs(8, 2, 70, 1, 2, 16, 16, jnp.float32)
    return args, _GRAD(*args, "reference")


@pytest.mark.parametrize("impl", KERNELS)
def test_grad_vs_reference(impl, grad_case):
    args, want = grad_case
    got = _GRAD(*args, impl)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "s0"], got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, np.asarray(b, np.float64)) < 1e-4, name


@pytest.mark.parametrize("impl", KERNELS)
def test_decode_kernel_grad_vs_reference(impl):
    q, k, v, g, beta, s0 = make_inputs(5, 2, 2, 1, 2, 16, 16, jnp.float32)

    def loss(q, k, v, g, beta, s0, impl):
        o, st = fused_recurrent_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=s0,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            impl=impl,
            interpret=True,
        )
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(st * st)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)), static_argnums=6)
    got, want = grad(q, k, v, g, beta, s0, impl), grad(q, k, v, g, beta, s0, "reference")
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, np.asarray(b, np.float64)) < 1e-4


def test_reference_finite_differences_float64():
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        B, T, H, D = 1, 5, 1, 4
        q, k = rng.standard_normal((2, B, T, H, D))
        v = rng.standard_normal((B, T, H, D))
        g = -np.abs(rng.standard_normal((B, T, H))) * 0.3
        beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H))))
        s0 = rng.standard_normal((B, H, D, D))

        def f(q, k, v, g, beta, s0):
            o, st = chunk_gated_delta_rule_ref(
                q,
                k,
                v,
                g,
                beta,
                initial_state=s0,
                output_final_state=True,
                use_qk_l2norm_in_kernel=True,
                chunk_size=2,
            )
            assert o.dtype == jnp.float64
            return jnp.sum(jnp.sin(o)) + jnp.sum(st * st)

        check_grads(
            jax.jit(f),
            tuple(jnp.asarray(x) for x in (q, k, v, g, beta, s0)),
            order=1,
            modes=("rev",),
            atol=1e-6,
            rtol=1e-6,
        )


def test_impl_resolution():
    expected = {"gpu": "pallas_triton", "tpu": "pallas_tpu"}.get(jax.default_backend(), "reference")
    assert resolve_impl("auto", op="t") == expected
    with pytest.raises(ValueError, match="`impl`"):
        resolve_impl("triton", op="t")
    assert resolve_impl("pallas_mosaic_gpu", op="t") == "pallas_mosaic_gpu"
    q, k, v, g, beta, _ = make_inputs(0, 1, 8, 1, 1, 12, 16, jnp.float32)
    with pytest.raises(ValueError, match="power-of-two"):
        chunk_gated_delta_rule(q, k, v, g, beta, impl="pallas_triton", interpret=True)


def test_state_block_v_follows_the_grid_size(monkeypatch):
    """The state passes take 64 value columns per program only when B x Hv x dv / 64 programs
    fill the SMs at least twice (132 where the device does not say, as on the CPU)."""
    from pallas_kernels.gated_delta_rule.gpu_triton.fwd import state_block_v

    class FakeGpu:
        core_count = 16

    assert state_block_v(16, (8, 64, 32, 128)) == 16  # an explicit size is kept
    monkeypatch.setattr(jax, "devices", lambda: [object()])
    assert state_block_v(None, (8, 64, 32, 128)) == 64  # 512 programs >= 2 x 132
    assert state_block_v(None, (4, 64, 32, 128)) == 32  # 256 < 264
    assert state_block_v(None, (1, 64, 32, 128)) == 32
    monkeypatch.setattr(jax, "devices", lambda: [FakeGpu()])
    assert state_block_v(None, (1, 64, 16, 128)) == 64  # 32 programs >= 2 x 16
    assert state_block_v(None, (1, 64, 15, 128)) == 32


# ------------------------------------------------------------------------------------------
# Lowering for hardware we do not have: jax.export for ("cuda",) and ("tpu",).
# ------------------------------------------------------------------------------------------

B, T, HK, HV, DK, DV = 2, 200, 2, 4, 128, 128


def _abstract_args(dtype=jnp.bfloat16):
    S = jax.ShapeDtypeStruct
    f32 = jnp.float32
    return (
        S((B, T, HK, DK), dtype),
        S((B, T, HK, DK), dtype),
        S((B, T, HV, DV), dtype),
        S((B, T, HV), f32),
        S((B, T, HV), f32),
        S((B, HV, DK, DV), f32),
        S((B,), jnp.bool_),
    )


def _model_like(impl):
    """Prefill through the chunk op, decode one token through the decode op, and a gradient."""

    def fn(q, k, v, g, beta, s0, live):
        o, st = chunk_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=s0,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            impl=impl,
        )
        o1, st1 = fused_recurrent_gated_delta_rule(
            q[:, :1],
            k[:, :1],
            v[:, :1],
            g[:, :1],
            beta[:, :1],
            initial_state=st,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            impl=impl,
            live=live,
        )
        dq = jax.grad(
            lambda q_: jnp.sum(
                chunk_gated_delta_rule(
                    q_, k, v, g, beta, initial_state=s0, use_qk_l2norm_in_kernel=True, impl=impl
                )[0].astype(jnp.float32)
            )
        )(q)
        return o, o1, st1, dq

    return jax.jit(fn)


def _export_cuda(fn, args):
    """``jax.export`` of ``fn`` for CUDA from any machine (an abstract H200 mesh)."""
    from jax.sharding import AbstractDevice, AbstractMesh

    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA H200", 132, "cuda"))
    with jax.sharding.use_abstract_mesh(mesh):
        return export.export(
            fn,
            platforms=("cuda",),
            disabled_checks=[
                export.DisabledSafetyCheck.custom_call(target)
                for target in ("__gpu$xla.gpu.triton", "mosaic_gpu_v2")
            ],
        )(*args)


def test_export_cuda_triton():
    exp = _export_cuda(_model_like("pallas_triton"), _abstract_args())
    text = exp.mlir_module()
    for name in ("gdn_chunk_kkt_solve_wy", "gdn_chunk_fwd_h", "gdn_chunk_fwd_o", "gdn_decode"):
        assert name in text, name
    assert exp.platforms == ("cuda",)


def test_export_cuda_triton_float32():
    """Float32 inputs lower for CUDA with their matmuls as three TF32 products (km.TF32X3), the
    backward's stages included."""
    exp = _export_cuda(_model_like("pallas_triton"), _abstract_args(jnp.float32))
    text = exp.mlir_module()
    for name in ("gdn_chunk_bwd_dh", "gdn_chunk_bwd_dqkwg"):  # its gradient is d(q) only
        assert name in text, name


def test_compiled_f32_dots_and_loop_stages():
    """Compiled GPU entry points trace float32 matmuls as TF32X3, interpret mode (the CPU has no
    TF32) and everything outside them as exact float32; bf16 keeps the native MMA. The reverse
    passes keep one pipelining stage for float32 tiles."""
    from pallas_kernels.gated_delta_rule import kernel_math as km
    from pallas_kernels.gated_delta_rule.gpu_triton.dh import loop_stages
    from pallas_kernels.gated_delta_rule.gpu_triton.fwd import compiled_f32_dots

    @compiled_f32_dots
    def precisions(dtype, *, interpret):
        return km.mm_precision(dtype)

    assert precisions(jnp.float32, interpret=False) == km.TF32X3
    assert precisions(jnp.float32, interpret=True) == km.HIGHEST
    assert precisions(jnp.bfloat16, interpret=False) == km.DEFAULT
    assert km.mm_precision(jnp.float32) == km.HIGHEST  # the context ended
    assert (loop_stages(3, jnp.bfloat16), loop_stages(3, jnp.float32)) == (3, 1)


def test_export_tpu():
    exp = export.export(_model_like("pallas_tpu"), platforms=("tpu",))(*_abstract_args())
    text = exp.mlir_module()
    assert "tpu_custom_call" in text
    for name in ("gdn_chunk_fwd_tpu", "gdn_decode_tpu"):
        assert name in text, name


def _varlen_case(impl):
    """(jitted packed-sequence chunk op for ``impl``, its abstract args) for the export tests."""
    S = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    args = (
        S((1, T, HK, DK), bf),
        S((1, T, HK, DK), bf),
        S((1, T, HV, DV), bf),
        S((1, T, HV), f32),
        S((1, T, HV), f32),
        S((3, HV, DK, DV), f32),
        S((4,), jnp.int32),
    )
    fn = jax.jit(
        lambda q, k, v, g, b, s0, cu: chunk_gated_delta_rule(
            q,
            k,
            v,
            g,
            b,
            initial_state=s0,
            output_final_state=True,
            cu_seqlens=cu,
            use_qk_l2norm_in_kernel=True,
            impl=impl,
        )
    )
    return fn, args


def test_export_cuda_triton_varlen():
    exp = _export_cuda(*_varlen_case("pallas_triton"))
    assert "gdn_chunk_fwd_h" in exp.mlir_module()


# ------------------------------------------------------------------------------------------
# On the GPU itself (compiled Triton, not interpret): run with `pytest -m gpu` on the device.
# ------------------------------------------------------------------------------------------

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("T", [1, 65, 1000])
def test_gpu_chunk_kernel_vs_numpy(dtype, T):
    q, k, v, g, beta, s0 = make_inputs(T, 2, T, 2, 4, 128, 128, dtype)
    f = jax.jit(
        lambda q, k, v, g, beta, s0: chunk_gated_delta_rule(
            q, k, v, g, beta,
            initial_state=s0,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            impl="pallas_triton",
        )
    )
    o, st = f(q, k, v, g, beta, s0)
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0, l2norm=True)
    assert rel_err(o, o_ref) < TOL[dtype]  # float32 must not silently run in TF32
    assert rel_err(st, st_ref) < TOL[dtype]


@pytest.mark.gpu
@on_gpu
def test_gpu_varlen_decode_and_grad():
    cu = np.array([0, 100, 100, 300], np.int32)
    q, k, v, g, beta, s0 = make_inputs(1, 1, 300, 2, 4, 128, 128, jnp.bfloat16, N=3)
    o, st = jax.jit(
        lambda *a: chunk_gated_delta_rule(
            *a[:5],
            initial_state=a[5],
            output_final_state=True,
            cu_seqlens=a[6],
            use_qk_l2norm_in_kernel=True,
            impl="pallas_triton",
        )
    )(q, k, v, g, beta, s0, jnp.asarray(cu))
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0, l2norm=True, cu_seqlens=cu)
    assert rel_err(o, o_ref) < TOL[jnp.bfloat16] and rel_err(st, st_ref) < TOL[jnp.bfloat16]

    q, k, v, g, beta, s0 = make_inputs(2, 8, 1, 2, 4, 128, 128, jnp.bfloat16)
    live = jnp.array([True, False] * 4)
    o, st = jax.jit(
        lambda *a: fused_recurrent_gated_delta_rule(
            *a[:5],
            initial_state=a[5],
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            live=a[6],
            impl="pallas_triton",
        )
    )(q, k, v, g, beta, s0, live)
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0, l2norm=True)
    assert rel_err(o[::2], o_ref[::2]) < TOL[jnp.bfloat16]
    assert rel_err(st[::2], st_ref[::2]) < TOL[jnp.float32]
    np.testing.assert_array_equal(np.asarray(st[1::2]), np.asarray(s0[1::2]))

    args = make_inputs(3, 2, 130, 2, 4, 128, 128, jnp.float32)
    got, want = _GRAD(*args, "pallas_triton"), _GRAD(*args, "reference")
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, np.asarray(b, np.float64)) < 1e-4


def test_export_tpu_varlen():
    fn, args = _varlen_case("pallas_tpu")
    exp = export.export(fn, platforms=("tpu",))(*args)
    assert "gdn_chunk_fwd_tpu" in exp.mlir_module()
