"""The Mosaic GPU backend (impl="pallas_mosaic_gpu"): its state/output kernel in interpret mode
(WGMMA emulated by jnp.dot, the CPU has none) against a float64 numpy recurrence, which inputs it
hands to the Triton kernels, and its lowering for ("cuda",). Compiled on an H200 by the gpu test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gated_delta_rule import make_inputs, numpy_gdn, rel_err
from test_gated_delta_rule_kernels import (
    FWD_CASES,
    _abstract_args,
    _chunk,
    _export_cuda,
    _model_like,
)

from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from pallas_kernels.gated_delta_rule.gpu_mosaic import fwd as mosaic_fwd

TOL16 = 2e-2  # bf16 / f16 inputs, max-abs error relative to the largest reference value


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the traces of the Mosaic GPU state/output kernel."""
    calls = []
    real = mosaic_fwd.chunk_fwd_state_output

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mosaic_fwd, "chunk_fwd_state_output", spy)
    return calls


def _run(q, k, v, g, beta, s0, **static):
    """The op in interpret mode, L2 norm in the kernel, the final state returned."""
    return _chunk(
        "pallas_mosaic_gpu",
        q,
        k,
        v,
        g,
        beta,
        s0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        **static,
    )


# The Triton / TPU kernels' cases (every T of the spec, both head ratios) in the 16-bit dtypes
# WGMMA takes: float32 cases as bfloat16, the bfloat16 ones as float16.
CASES = [
    (T, Hk, Hv, s, jnp.bfloat16 if dt == jnp.float32 else jnp.float16)
    for T, Hk, Hv, s, dt in FWD_CASES
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"T{c[0]}-{c[1]}:{c[2]}-s{int(c[3])}-{jnp.dtype(c[4]).name}"
)
def test_mosaic_kernel_vs_numpy(case, kernel_calls):
    T, Hk, Hv, with_state, dtype = case
    q, k, v, g, beta, s0 = make_inputs(T + 5 * Hv, 2, T, Hk, Hv, 64, 64, dtype, with_state)
    q, k = q * 2.0, k * 0.5  # exercise the L2 norm
    o, st = _run(q, k, v, g, beta, s0)
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0, l2norm=True)
    assert kernel_calls, "the Mosaic GPU kernel did not run"
    assert o.shape == o_ref.shape and o.dtype == dtype and st.dtype == jnp.float32
    assert rel_err(o, o_ref) < TOL16
    assert rel_err(st, st_ref) < TOL16


def test_mosaic_kernel_value_blocks_and_scale(kernel_calls):
    """dv = 128 (two programs of 64 value columns), dk = 128, no L2 norm, an explicit scale."""
    q, k, v, g, beta, s0 = make_inputs(7, 1, 70, 1, 1, 128, 128, jnp.bfloat16)
    o, st = _chunk("pallas_mosaic_gpu", q, k, v, g, beta, s0, scale=0.3, output_final_state=True)
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, scale=0.3, initial_state=s0)
    assert kernel_calls
    assert rel_err(o, o_ref) < TOL16
    assert rel_err(st, st_ref) < TOL16


@pytest.mark.parametrize("what", ["float32", "small_heads", "cu_seqlens", "grad"])
def test_mosaic_backend_hands_the_rest_to_triton(what, kernel_calls):
    """Float32 inputs, head dims under 64, packed sequences and the forward kept for jax.grad run
    the Triton kernels (in interpret mode here), with the same results."""
    dtype = jnp.float32 if what == "float32" else jnp.bfloat16
    d = 16 if what == "small_heads" else 64
    T = 40
    q, k, v, g, beta, s0 = make_inputs(3, 1, T, 1, 2, d, d, dtype)
    if what == "cu_seqlens":
        cu = np.array([0, 15, T], np.int32)
        s0 = jnp.concatenate([s0, s0 * 0.5])
        o, st = _run(q, k, v, g, beta, s0, cu_seqlens=jnp.asarray(cu))
        o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu, l2norm=True)
    elif what == "grad":

        def loss(impl, q):
            o, _ = chunk_gated_delta_rule(
                q, k, v, g, beta, initial_state=s0, impl=impl, interpret=True
            )
            return jnp.sum(o.astype(jnp.float32) ** 2)

        dq = jax.jit(jax.grad(lambda q: loss("pallas_mosaic_gpu", q)))(q)
        dq_ref = jax.grad(lambda q: loss("reference", q))(q.astype(jnp.float32))
        assert not kernel_calls
        assert rel_err(dq, np.asarray(dq_ref, np.float64)) < TOL16
        return
    else:
        o, st = _run(q, k, v, g, beta, s0)
        o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0, l2norm=True)
    assert not kernel_calls
    tol = 2e-5 if dtype == jnp.float32 else TOL16
    assert rel_err(o, o_ref) < tol
    assert rel_err(st, st_ref) < tol


def test_mosaic_kernel_checks_its_sizes():
    from pallas_kernels.gated_delta_rule.gpu_mosaic.state_output import chunk_fwd_state_output

    x = jnp.zeros((1, 96, 1, 64), jnp.bfloat16)  # 96 tokens: not whole chunks of 64
    with pytest.raises(ValueError, match="Tp 96, chunk_size 64"):
        chunk_fwd_state_output(
            x, x, x, x, jnp.zeros((1, 1, 96)), jnp.zeros((1, 1, 64, 64)), scale=1.0
        )


def test_mosaic_backend_names_a_device_it_cannot_run_on():
    from types import SimpleNamespace as Device

    mosaic_fwd.check_device(Device(platform="gpu", compute_capability="9.0", device_kind="H200"))
    a100 = Device(platform="gpu", compute_capability="8.0", device_kind="NVIDIA A100")
    with pytest.raises(ValueError, match="needs a Hopper GPU .* got 'NVIDIA A100'"):
        mosaic_fwd.check_device(a100)
    mosaic_fwd.check_device(Device(platform="cpu", device_kind="cpu"))  # export from a CPU


def test_export_cuda_mosaic_gpu():
    """The model-like function (prefill, one decode step, a gradient) lowers for CUDA: prefill
    through the Mosaic GPU kernel, decode and the gradient through the Triton kernels."""
    exp = _export_cuda(_model_like("pallas_mosaic_gpu"), _abstract_args())
    text = exp.mlir_module()
    assert "mosaic_gpu" in text
    for name in ("gdn_chunk_kkt_solve_wy", "gdn_decode", "gdn_chunk_bwd_dh"):
        assert name in text, name


@pytest.mark.gpu
@pytest.mark.parametrize("T,B", [(1, 1), (65, 2), (1000, 1)])
def test_mosaic_kernel_compiled_vs_numpy(T, B):
    """Compiled on a Hopper GPU at the model's head sizes (dk = dv = 128, Hv = 2 Hk)."""
    q, k, v, g, beta, s0 = make_inputs(T, B, T, 2, 4, 128, 128, jnp.bfloat16)
    o, st = jax.jit(
        lambda *a: chunk_gated_delta_rule(
            *a[:5],
            initial_state=a[5],
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            impl="pallas_mosaic_gpu",
        )
    )(q, k, v, g, beta, s0)
    o_ref, st_ref = numpy_gdn(q, k, v, g, beta, initial_state=s0, l2norm=True)
    assert rel_err(o, o_ref) < TOL16
    assert rel_err(st, st_ref) < TOL16


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_mosaic_gpu"])
def test_gpu_backends_outside_interpret_mode_name_the_fix(impl):
    """On the CPU (no abstract GPU device traced under), the GPU backends outside interpret mode
    raise a message naming impl and what to use: Pallas's own says only that it interprets."""
    q, k, v, g, beta, s0 = make_inputs(5, 1, 8, 1, 1, 64, 64, jnp.bfloat16)
    match = f"impl='{impl}' runs compiled on a GPU, and this JAX's backend is cpu: use impl="
    with pytest.raises(ValueError, match=match):
        chunk_gated_delta_rule(q, k, v, g, beta, impl=impl)
    for cu in (None, jnp.array([0, 3, 8], jnp.int32)):  # decode with cu_seqlens: jnp, still named
        with pytest.raises(ValueError, match=match):
            fused_recurrent_gated_delta_rule(
                q,
                k,
                v,
                g,
                beta,
                initial_state=s0 if cu is None else s0.repeat(2, 0),
                impl=impl,
                cu_seqlens=cu,
            )


def test_cu_seqlens_given_as_a_list_is_named():
    q, k, v, g, beta, _ = make_inputs(5, 1, 8, 1, 1, 16, 16, jnp.float32)
    with pytest.raises(
        ValueError,
        match=r"`cu_seqlens` must be a 1-D integer array .* got a "
        r"list: pass jnp.asarray",
    ):
        chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=[0, 3, 8])
