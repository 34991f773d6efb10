"""The TPU (Mosaic) backward kernels of the chunked gated delta rule on CPU, in interpret mode:
gradients of impl="pallas_tpu" against jax.grad of impl="reference", and a jax.export of the
gradient for ("tpu",) (lowers the kernels to Mosaic)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from test_gated_delta_rule import make_inputs, rel_err

from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule

ARGNUMS = (0, 1, 2, 3, 4, 5)
NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def _loss(q, k, v, g, beta, s0, cu, impl, l2norm, chunk_size, interpret=True):
    """A loss with cotangents on both o and the final state (o * cos(o): not linear in o)."""
    o, st = chunk_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        initial_state=s0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=l2norm,
        cu_seqlens=cu,
        impl=impl,
        chunk_size=chunk_size,
        interpret=interpret,
    )
    o = o.astype(jnp.float32)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(st * st)


_GRAD = jax.jit(jax.grad(_loss, argnums=ARGNUMS), static_argnums=(7, 8, 9))


def _check(args, cu, tol, l2norm=True, chunk_size=16):
    got = _GRAD(*args, cu, "pallas_tpu", l2norm, chunk_size)
    # The reference in float32 for every case (its bf16 rounding differs from the kernels').
    args32 = [None if a is None else a.astype(jnp.float32) for a in args]
    want = _GRAD(*args32, cu, "reference", l2norm, chunk_size)
    for name, a, b, x in zip(NAMES, got, want, args, strict=True):
        if x is None:
            assert a is None and b is None, name
            continue
        assert a.shape == x.shape and a.dtype == x.dtype, name
        assert rel_err(a, np.asarray(b, np.float64)) < tol, name


# (T, Hk, Hv, with_state, chunk size): T = 1, 63 (two chunks of 32, the last partial), 200 (four
# chunks of 64, the last partial); with and without an initial state. Hv / Hk = 1 here and in
# test_grad_bfloat16 (Hk = 2), 2 in the others.
CASES = [
    (1, 1, 1, True, 16),
    (63, 1, 2, False, 32),
    (200, 1, 2, True, 64),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-{c[1]}:{c[2]}-s{int(c[3])}-C{c[4]}")
def test_grad_vs_reference_float32(case):
    T, Hk, Hv, with_state, C = case
    args = make_inputs(T + 5 * Hv, 2, T, Hk, Hv, 16, 32, jnp.float32, with_state)
    _check(args, None, 1e-5, chunk_size=C)


def test_grad_no_l2norm_gqa_float32():
    q, k, v, g, beta, s0 = make_inputs(4, 1, 70, 2, 4, 16, 16, jnp.float32)
    _check((q * 0.3, k, v, g, beta, s0), None, 1e-5, l2norm=False)


def test_grad_bfloat16():
    args = make_inputs(6, 2, 65, 2, 2, 16, 32, jnp.bfloat16)
    _check(args, None, 2e-2, chunk_size=32)


def test_grad_varlen_float32():
    """Packed sequences (an empty one, a one-token one): d(state) restarts at each sequence end,
    d(initial state) of the empty sequence is its d(final state)."""
    cu = jnp.asarray([0, 5, 5, 40, 41, 90], jnp.int32)
    args = make_inputs(12, 1, 90, 1, 2, 16, 16, jnp.float32, N=5)
    _check(args, cu, 1e-5)


def test_export_grad_tpu():
    """The gradient lowers to Mosaic for TPU from the CPU (TPU-tileable dims; bf16; packed)."""
    S = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    T, Hk, Hv, D = 200, 1, 2, 128
    args = (
        S((1, T, Hk, D), bf),
        S((1, T, Hk, D), bf),
        S((1, T, Hv, D), bf),
        S((1, T, Hv), f32),
        S((1, T, Hv), f32),
        S((3, Hv, D, D), f32),
        S((4,), jnp.int32),
    )
    grad = jax.jit(
        jax.grad(lambda *a: _loss(*a, "pallas_tpu", True, 64, interpret=False), argnums=ARGNUMS)
    )
    text = export.export(grad, platforms=("tpu",))(*args).mlir_module()
    assert "tpu_custom_call" in text
    for name in ("gdn_chunk_fwd_tpu", "gdn_chunk_bwd_tpu"):
        assert name in text, name
