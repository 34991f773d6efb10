"""The decode MoE kernel (pallas_kernels.moe.gathered_experts) in Pallas interpret mode against a
float64 numpy loop, its gradients against the jnp reference's, and its CUDA lowering."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe import (
    BlockSizes,
    gathered_expert_outputs,
    gathered_expert_outputs_reference,
    gathered_experts,
    gathered_experts_reference,
)

E, D, INNER = 8, 64, 64
# 4 column blocks in either kernel, 2 splits of d in gate_up; 2 (gate_up) and 4 (down) steps.
SMALL = BlockSizes(block_i=16, block_d=16, block_r=16, splits=2)
BLOCKS = {"blocks": SMALL, "interpret": True}


def _case(seed, n, k, dtype, duplicate=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D))
    gate, up = (rng.standard_normal((E, D, INNER)) / D ** 0.5 for _ in range(2))
    down = rng.standard_normal((E, INNER, D)) / INNER ** 0.5
    experts = np.stack([rng.choice(E, k, replace=False) for _ in range(n)]).astype(np.int32)
    if duplicate:
        experts[0, :] = experts[0, 0]  # one expert in every slot of token 0
    weights = rng.random((n, k))
    cast = lambda a: jnp.asarray(a, dtype)
    return cast(x), cast(weights), jnp.asarray(experts), cast(gate), cast(up), cast(down)


def _numpy_loop(x, weights, experts, gate, up, down):
    x, weights, gate, up, down = (np.asarray(a, np.float64) for a in (x, weights, gate, up, down))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j, e in enumerate(np.asarray(experts)[n]):
            g, u = x[n] @ gate[e], x[n] @ up[e]
            out[n] += weights[n, j] * ((g / (1 + np.exp(-g)) * u) @ down[e])
    return out


@pytest.mark.parametrize("n,k,dtype,duplicate", [
    (1, 1, jnp.float32, False), (1, 3, jnp.float32, True), (3, 2, jnp.float32, False),
    (2, 3, jnp.bfloat16, False)])
def test_values_vs_numpy(n, k, dtype, duplicate):
    args = _case(n * 10 + k, n, k, dtype, duplicate)
    got = jax.jit(lambda *a: gathered_experts(*a, **BLOCKS))(*args)
    assert got.shape == (n, D) and got.dtype == dtype
    ref = _numpy_loop(*args)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=tol,
                               atol=tol * np.abs(ref).max())


def _shared_case(seed, n, dtype):
    rng = np.random.default_rng(seed)
    gate, up = (rng.standard_normal((D, INNER)) / D ** 0.5 for _ in range(2))
    down = rng.standard_normal((INNER, D)) / INNER ** 0.5
    return tuple(jnp.asarray(a, dtype) for a in (rng.random(n), gate, up, down))


@pytest.mark.parametrize("n,k,dtype,down_splits", [
    (1, 3, jnp.float32, 1), (3, 2, jnp.float32, 2), (2, 3, jnp.bfloat16, 4)])
def test_shared_expert_rows_vs_numpy(n, k, dtype, down_splits):
    """The shared expert as one more row of the kernels (weighted per token), with "down"
    split 1, 2 or 4 ways over I: equal to a float64 loop that adds it to the routed sum."""
    args = _case(n + 20 * k, n, k, dtype, duplicate=True)
    shared = _shared_case(n, n, dtype)
    blocks = replace(SMALL, down_splits=down_splits)
    got = jax.jit(lambda *a: gathered_experts(*a[:6], shared=a[6:], blocks=blocks,
                                              interpret=True))(*args, *shared)
    w, g, u, dn = (np.asarray(a, np.float64) for a in shared)
    ref = _numpy_loop(*args) + _numpy_loop(args[0], w[:, None], np.zeros((n, 1), np.int32),
                                           g[None], u[None], dn[None])
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=tol,
                               atol=tol * np.abs(ref).max())


def test_shared_expert_gradients_equal_the_reference():
    args = _case(8, 2, 3, jnp.float32)
    shared = _shared_case(4, 2, jnp.float32)
    probe = jnp.asarray(np.random.default_rng(5).standard_normal((2, D)), jnp.float32)
    hi = jax.lax.Precision.HIGHEST

    def reference(x, w, e, g, u, dn, sw, sg, su, sd):
        h = jax.nn.silu(jnp.dot(x, sg, precision=hi)) * jnp.dot(x, su, precision=hi)
        return gathered_experts_reference(x, w, e, g, u, dn, precision=hi) + \
            sw[:, None] * jnp.dot(h, sd, precision=hi)

    def grads(fn):
        loss = lambda *a: jnp.sum(fn(*a[:2], args[2], *a[2:]) * probe)
        return jax.grad(loss, argnums=tuple(range(9)))(*args[:2], *args[3:], *shared)

    got = grads(lambda *a: gathered_experts(*a[:6], shared=a[6:], **BLOCKS))
    ref = grads(reference)
    for i, (g, r) in enumerate(zip(got, ref)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6,
                                   err_msg=str(i))


def test_expert_outputs_float32_unweighted():
    """gathered_expert_outputs (what expert parallelism masks and weights itself): each slot's
    expert output in float32, against the jnp reference on the same bf16 values."""
    x, _, experts, gate, up, down = _case(5, 2, 3, jnp.bfloat16, duplicate=True)
    got = gathered_expert_outputs(x, experts, gate, up, down, **BLOCKS)
    assert got.shape == (2, 3, D) and got.dtype == jnp.float32
    x, gate, up, down = (a.astype(jnp.float32) for a in (x, gate, up, down))
    ref = np.asarray(gathered_expert_outputs_reference(
        x, experts, gate, up, down, precision=jax.lax.Precision.HIGHEST))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=3e-2, atol=3e-2 * np.abs(ref).max())


def test_gradients_equal_the_reference():
    args = _case(7, 2, 3, jnp.float32, duplicate=True)
    probe = jnp.asarray(np.random.default_rng(3).standard_normal((2, D)), jnp.float32)

    def grads(fn):
        loss = lambda x, w, g, u, dn: jnp.sum(fn(x, w, args[2], g, u, dn) * probe)
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args[:2], *args[3:])

    got = grads(lambda *a: gathered_experts(*a, **BLOCKS))
    ref = grads(lambda *a: gathered_experts_reference(*a, precision=jax.lax.Precision.HIGHEST))
    for name, g, r in zip(("x", "weights", "gate", "up", "down"), got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_bad_shapes():
    x, w, e, g, u, dn = _case(0, 1, 2, jnp.float32)
    with pytest.raises(ValueError, match="block_i = 48 must be a power of 2"):
        gathered_experts(x, w, e, g, u, dn, blocks=replace(SMALL, block_i=48), interpret=True)
    with pytest.raises(ValueError, match="I = 64 must be a multiple of block_i = 128"):
        gathered_experts(x, w, e, g, u, dn, blocks=replace(SMALL, block_i=128), interpret=True)
    with pytest.raises(ValueError, match=r"I = 64 must be a multiple of down_splits \* block_r "
                                         r"= 128"):
        gathered_experts(x, w, e, g, u, dn, blocks=replace(SMALL, block_r=128, splits=1,
                                                           down_splits=1), interpret=True)
    with pytest.raises(ValueError, match="down_splits = 0 must be at least 1"):
        gathered_experts(x, w, e, g, u, dn, blocks=replace(SMALL, down_splits=0), interpret=True)
    shared = (jnp.ones((1,)), g[0], u[0], dn[0])
    with pytest.raises(ValueError, match=r"shared expert's .* \[d, I\], \[d, I\], \[I, d\]"):
        gathered_experts(x, w, e, g, u, dn, shared=shared[:3] + (dn[0, :32],), **BLOCKS)
    with pytest.raises(ValueError, match=r"shared_weights \(2,\) must be \[N = 1\]"):
        gathered_experts(x, w, e, g, u, dn, shared=(jnp.ones((2,)),) + shared[1:], **BLOCKS)
    with pytest.raises(ValueError, match="d = 64 must be a multiple of block_d = 128"):
        gathered_experts(x, w, e, g, u, dn, blocks=replace(SMALL, block_d=128), interpret=True)
    with pytest.raises(ValueError, match=r"d = 64 must be a multiple of splits \* block_r = 48"):
        gathered_experts(x, w, e, g, u, dn, blocks=replace(SMALL, splits=3), interpret=True)
    with pytest.raises(ValueError, match=r"must both be \[N = 1, k\]"):
        gathered_experts(x, w[:, :1], e, g, u, dn, **BLOCKS)
    with pytest.raises(ValueError, match="down_proj"):
        gathered_experts(x, w, e, g, u, dn[:, :, :32], **BLOCKS)


def test_export_cuda():
    """Lowers to Triton for CUDA from the CPU (an abstract H200): the expert id indexes the
    weights inside the kernel."""
    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh

    S = jax.ShapeDtypeStruct
    args = (S((1, 2048), jnp.bfloat16), S((1, 10), jnp.bfloat16), S((1, 10), jnp.int32),
            S((512, 2048, 512), jnp.bfloat16), S((512, 2048, 512), jnp.bfloat16),
            S((512, 512, 2048), jnp.bfloat16))
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA H200", 132, "cuda"))
    with jax.sharding.use_abstract_mesh(mesh):
        exp = export.export(
            jax.jit(gathered_experts), platforms=("cuda",),
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*args)
    text = exp.mlir_module()
    assert "moe_gathered_gate_up" in text and "moe_gathered_down" in text
    shared = (S((1,), jnp.bfloat16), S((2048, 512), jnp.bfloat16), S((2048, 512), jnp.bfloat16),
              S((512, 2048), jnp.bfloat16))
    with jax.sharding.use_abstract_mesh(mesh):  # the shared expert's rows: a branch per row
        exp = export.export(
            jax.jit(lambda *a: gathered_experts(*a[:6], shared=a[6:])), platforms=("cuda",),
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*args, *shared)
    assert exp.mlir_module().count("moe_gathered_") >= 2
