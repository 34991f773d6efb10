"""The decode MoE kernels (pallas_kernels.moe.gathered_experts, and routed_experts, which also
routes in them) in Pallas interpret mode against a float64 numpy loop and qnext_jax's route, their
gradients against the jnp reference's, and their CUDA lowering."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import sigmoid, softmax

from pallas_kernels.moe import (
    BlockSizes,
    gathered_expert_outputs,
    gathered_expert_outputs_reference,
    gathered_experts,
    gathered_experts_reference,
    routed_experts,
)
from qnext_jax.modeling.moe import route

E, D, INNER = 8, 64, 64
# 4 column blocks in either kernel, 2 splits of d in gate_up; 2 (gate_up) and 4 (down) steps;
# routing (16 experts): 2 column blocks and 2 splits of d in the router.
SMALL = BlockSizes(block_i=16, block_d=16, block_r=16, splits=2, router_block_e=8,
                   router_splits=2)
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


def test_negative_ids_give_zero_rows_and_gradients():
    """A negative id (another device's expert under expert parallelism): a zero row in the
    kernels and in the jnp reference, and no gradient through it; the other slots as before."""
    x, _, experts, gate, up, down = _case(9, 3, 3, jnp.float32)
    skip = np.array([[True, False, False], [False, False, False], [False, True, True]])
    ids = jnp.where(jnp.asarray(skip), -1, experts)
    got = np.asarray(gathered_expert_outputs(x, ids, gate, up, down, **BLOCKS))
    full = np.asarray(gathered_expert_outputs(x, experts, gate, up, down, **BLOCKS))
    ref = np.asarray(gathered_expert_outputs_reference(x, ids, gate, up, down,
                                                       precision=jax.lax.Precision.HIGHEST))
    assert np.all(got[skip] == 0) and np.all(ref[skip] == 0)
    np.testing.assert_array_equal(got[~skip], full[~skip])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    probe = jnp.asarray(np.random.default_rng(2).standard_normal(got.shape), jnp.float32)
    grads = jax.grad(lambda x, g, u, dn: jnp.sum(gathered_expert_outputs(
        x, ids, g, u, dn, **BLOCKS) * probe), argnums=(0, 1, 2, 3))(x, gate, up, down)
    kept = jax.grad(lambda x, g, u, dn: jnp.sum(gathered_expert_outputs(
        x, experts, g, u, dn, **BLOCKS) * probe * ~skip[..., None]), argnums=(0, 1, 2, 3))(
        x, gate, up, down)
    for name, g, r in zip(("x", "gate", "up", "down"), grads, kept):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


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


def _stack(seed, layers, dtype):
    """Expert projections stacked over ``layers`` layers: [L, E, D, INNER] x 2, [L, E, INNER,
    D]."""
    cases = [_case(seed + i, 1, 1, dtype)[3:] for i in range(layers)]
    return tuple(jnp.stack(ws) for ws in zip(*cases))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_of_stacked_experts(dtype):
    """Stacked projections [L, ...] and a layer, concrete or traced (a lax.scan's index, as a
    scanned model hands them): the same values as that layer's projections given alone, for
    gathered_experts, gathered_expert_outputs and routed_experts; gradients w.r.t. the stack
    are the layer's, zero elsewhere."""
    x, w, e = _case(5, 3, 2, dtype)[:3]
    stack = _stack(20, 3, dtype)
    # jitted and eager interpret-mode kernels may round differently; another layer's weights
    # would differ by O(1)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == jnp.float32 else {"rtol": 2e-2, "atol": 2e-2}
    close = lambda got, want, **kw: np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), **tol, **kw)
    for layer in range(3):
        alone = tuple(s[layer] for s in stack)
        close(gathered_experts(x, w, e, *stack, layer=layer, **BLOCKS),
              gathered_experts(x, w, e, *alone, **BLOCKS))

    def scanned(fn):  # fn(layer) at every layer of a scan over the stack's layers
        return jax.jit(lambda: jax.lax.scan(lambda c, i: (c, fn(i)), 0, jnp.arange(3))[1])()

    for name, fn in (
            ("gathered_experts", lambda i, *s: gathered_experts(x, w, e, *s, layer=i, **BLOCKS)),
            ("gathered_expert_outputs",
             lambda i, *s: gathered_expert_outputs(x, e, *s, layer=i, **BLOCKS))):
        got = scanned(lambda i, fn=fn: fn(i, *stack))
        want = jnp.stack([fn(None, *(s[i] for s in stack)) for i in range(3)])
        close(got, want, err_msg=name)
    xr, router, _, _, _, sh = _routed_case(7, 2, 3, dtype, shared=True)
    rstack = tuple(jnp.concatenate([s, s], axis=1) for s in stack)  # 16 experts a layer
    routed = lambda i, *s: routed_experts(xr, router, *s, top_k=3, norm_topk_prob=True,
                                          shared=sh, layer=i, **BLOCKS)
    got = scanned(lambda i: routed(i, *rstack))
    for i in range(3):
        out, weights, experts = routed(None, *(s[i] for s in rstack))
        close(got[0][i], out)
        np.testing.assert_allclose(np.asarray(got[1][i]), np.asarray(weights), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(got[2][i]), np.asarray(experts))
    if dtype == jnp.float32:
        loss = lambda s, layer: jnp.sum(gathered_experts(x, w, e, *s, layer=layer, **BLOCKS))
        grads = jax.grad(loss)(stack, jnp.int32(1))
        alone = jax.grad(lambda s: loss(s, None))(tuple(s[1] for s in stack))
        for g, a in zip(grads, alone):
            np.testing.assert_allclose(np.asarray(g[1]), np.asarray(a), rtol=1e-6, atol=1e-7)
            assert not np.asarray(g[0]).any() and not np.asarray(g[2]).any()
        rloss = lambda s, layer: jnp.sum(routed(layer, *s)[0])
        grads = jax.grad(rloss)(rstack, jnp.int32(2))
        alone = jax.grad(lambda s: rloss(s, None))(tuple(s[2] for s in rstack))
        for g, a in zip(grads, alone):
            np.testing.assert_allclose(np.asarray(g[2]), np.asarray(a), rtol=1e-6, atol=1e-7)
            assert not np.asarray(g[:2]).any()


def test_layer_bad_arguments():
    x, w, e, g, u, dn = _case(0, 1, 2, jnp.float32)
    stack = _stack(1, 2, jnp.float32)
    with pytest.raises(ValueError, match=r"expected gate_proj, up_proj \[L, E, d, I\] .* "
                                         r"\(with layer\)"):
        gathered_experts(x, w, e, g, u, dn, layer=0, **BLOCKS)
    with pytest.raises(ValueError, match=r"expected gate_proj, up_proj \[E, d, I\] .* "
                                         r"\(without layer\)"):
        gathered_expert_outputs(x, e, *stack, **BLOCKS)
    for layer in (2, -1, jnp.asarray(5), np.int64(-2)):  # concrete: checked, arrays too
        with pytest.raises(ValueError, match=r"layer = -?\d must be in \[0, L = 2\)"):
            gathered_experts(x, w, e, *stack, layer=layer, **BLOCKS)
    with pytest.raises(ValueError, match="layer must be an integer scalar"):
        gathered_experts(x, w, e, *stack, layer=jnp.zeros((1,), jnp.int32), **BLOCKS)
    for layer in (0.0, "1", True, jnp.float32(0)):
        with pytest.raises(ValueError, match="layer must be an integer scalar"):
            gathered_experts(x, w, e, *stack, layer=layer, **BLOCKS)
    with pytest.raises(ValueError, match=r"in stacks of \[2, 2, 1\] layers \(one L for all\)"):
        gathered_experts(x, w, e, *stack[:2], stack[2][:1], layer=0, **BLOCKS)


def test_blocks_for_shape():
    """The default blocks: block_r 256 and router_splits 8 where d and I (and E) take them, as
    at the 80B's d 2048, I 512, E 512; else the dataclass defaults (block_r 128), which a
    tensor-split I of 256 or a d of 1024 still fit; else (small models) tiles cut to fit."""
    wide = BlockSizes.for_shape(2048, 512, 512)
    assert (wide.block_r, wide.router_splits) == (256, 8) and wide.mismatch(2048, 512, 512) is None
    assert BlockSizes.for_shape(2048, 512) == wide
    for d, inner in ((2048, 256), (1024, 512), (4096, 768)):
        assert BlockSizes.for_shape(d, inner) == BlockSizes(), (d, inner)
    for d, inner, e in ((256, 128, 16), (1024, 256, 16), (64, 64, 8), (96, 48, 4), (40, 24, 2)):
        blocks = BlockSizes.for_shape(d, inner, e)
        assert blocks.mismatch(d, inner, e) is None, (d, inner, e, blocks)
    assert "E = 384 must be a power of 2" in BlockSizes.for_shape(2048, 512, 384).mismatch(
        2048, 512, 384)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_blocks_at_small_sizes(dtype):
    """blocks=None (BlockSizes.for_shape) at a small model's d 64, I 64, E 16, top-3 with the
    shared expert: the kernels' output against the float64 loop, their routing against
    qnext_jax's route."""
    n, k = 2, 3
    x, router, gate, up, down, sh = _routed_case(5, n, k, dtype, shared=True)
    out, weights, experts = routed_experts(x, router, gate, up, down, top_k=k,
                                           norm_topk_prob=True, shared=sh, interpret=True)
    ref, ref_w, ref_e = _numpy_routed(x, router, gate, up, down, sh, k, True)
    want_w, want_e = route(x @ router, k, True)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
    np.testing.assert_array_equal(np.asarray(experts), ref_e)
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-6)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=tol,
                               atol=tol * np.abs(ref).max())


def test_compiled_kernels_on_a_cpu_name_what_to_do():
    x, weights, experts, gate, up, down = _case(3, 1, 2, jnp.float32)
    router = jnp.zeros((D, E), jnp.float32)
    for call in (lambda: gathered_experts(x, weights, experts, gate, up, down),
                 lambda: gathered_expert_outputs(x, experts, gate, up, down),
                 lambda: routed_experts(x, router, gate, up, down, top_k=2,
                                        norm_topk_prob=True)):
        with pytest.raises(ValueError, match=r"run compiled on a GPU, and this JAX's backend "
                                              r"is cpu: interpret=True"):
            call()


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


# routed_experts: 16 experts; x in {-1, 0, 1} and the router's weight on a grid of halves, so
# that every logit is exact in bf16 and float32 whatever the order of its sums (many ties).
E_ROUTED = 16


def _routed_case(seed, n, k, dtype, shared):
    """(x, router_weight, gate, up, down, shared or None) of E_ROUTED experts, as ``dtype``;
    shared: (shared_expert_gate [D, 1], gate, up, down)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, (n, D)).astype(np.float64)
    router = rng.integers(-1, 2, (D, E_ROUTED)) / 2
    # token 0: k + 1 experts tied above the rest (a tie across its k-th and k+1-th choice)
    router[:, rng.choice(E_ROUTED, k + 1, replace=False)] = x[0, :, None]
    gate, up = (rng.standard_normal((E_ROUTED, D, INNER)) / D ** 0.5 for _ in range(2))
    down = rng.standard_normal((E_ROUTED, INNER, D)) / INNER ** 0.5
    cast = lambda a: jnp.asarray(a, dtype)
    sh = _shared_case(seed + 1, n, dtype) if shared else None
    if shared:
        sh = (cast(rng.standard_normal((D, 1)) / 4),) + sh[1:]
    return (cast(x), cast(router), cast(gate), cast(up), cast(down), sh)


def _numpy_routed(x, router, gate, up, down, shared, k, norm):
    """float64 (out, weights, experts): the router's logits, softmax, the k largest (stable:
    ties to the lower id), renormalised with norm, the experts loop, plus the sigmoid-gated
    shared expert."""
    x = np.asarray(x, np.float64)
    probs = softmax(x @ np.asarray(router, np.float64))
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, experts, axis=-1)
    if norm:
        weights = weights / weights.sum(-1, keepdims=True)
    out = _numpy_loop(x, weights, experts, gate, up, down)
    if shared is not None:
        sg, g, u, dn = (np.asarray(a, np.float64) for a in shared)
        one = np.zeros((x.shape[0], 1), np.int32)
        out = out + _numpy_loop(x, sigmoid(x @ sg), one, g[None], u[None], dn[None])
    return out, weights, experts


@pytest.mark.parametrize("n,k,dtype,shared,norm", [
    (1, 1, jnp.float32, False, False), (1, 3, jnp.bfloat16, True, True),
    (3, 3, jnp.float32, True, False), (3, 1, jnp.bfloat16, False, True),
    (3, 3, jnp.bfloat16, False, False), (1, 3, jnp.float32, False, True)])
def test_routed_experts_vs_numpy_and_route(n, k, dtype, shared, norm):
    """The router's matmul and the routing inside the kernels: the experts of qnext_jax's route
    on the same logits exactly (tied logits included), its weights to float32 rounding, and the
    output against a float64 loop and against route + the jnp reference."""
    x, router, gate, up, down, sh = _routed_case(n * 10 + k, n, k, dtype, shared)
    out, weights, experts = jax.jit(lambda *a: routed_experts(
        *a[:5], top_k=k, norm_topk_prob=norm, shared=a[5], **BLOCKS))(
        x, router, gate, up, down, sh)
    assert out.shape == (n, D) and out.dtype == dtype
    assert weights.dtype == jnp.float32 and experts.dtype == jnp.int32
    want_w, want_e = route(x @ router, k, norm)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-6)
    ref, ref_w, ref_e = _numpy_routed(x, router, gate, up, down, sh, k, norm)
    np.testing.assert_array_equal(np.asarray(experts), ref_e)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-6)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=tol,
                               atol=tol * np.abs(ref).max())
    jnp_ref = gathered_experts_reference(x, want_w, want_e, gate, up, down,
                                         precision=jax.lax.Precision.HIGHEST)
    if shared:
        shared_w = jax.nn.sigmoid((x @ sh[0]).astype(jnp.float32))
        jnp_ref = jnp_ref + gathered_experts_reference(
            x, shared_w, jnp.zeros((n, 1), jnp.int32), *(w[None] for w in sh[1:]),
            precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(jnp_ref, np.float64),
                               rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("norm", [False, True])
def test_routed_experts_gradients_equal_the_reference(norm):
    """Through out and the weights, w.r.t. x, the router's weight, the experts and the shared
    expert's gate and projections: those of the router's matmul, route and the jnp
    reference."""
    rng = np.random.default_rng(11)
    _, _, gate, up, down, sh = _routed_case(9, 2, 3, jnp.float32, shared=True)
    x = jnp.asarray(rng.standard_normal((2, D)), jnp.float32)  # logits without ties
    router = jnp.asarray(rng.standard_normal((D, E_ROUTED)) / D ** 0.5, jnp.float32)
    probe = jnp.asarray(rng.standard_normal((2, D)), jnp.float32)
    probe_w = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
    hi = jax.lax.Precision.HIGHEST

    def reference(x, router, g, u, dn, sh):
        w, e = route(jnp.dot(x, router, precision=hi), 3, norm)
        sg, s_gate, s_up, s_down = sh
        h = jax.nn.silu(jnp.dot(x, s_gate, precision=hi)) * jnp.dot(x, s_up, precision=hi)
        out = gathered_experts_reference(x, w, e, g, u, dn, precision=hi) + \
            jax.nn.sigmoid(jnp.dot(x, sg, precision=hi)) * jnp.dot(h, s_down, precision=hi)
        return out, w

    def kernels(x, router, g, u, dn, sh):
        out, w, _ = routed_experts(x, router, g, u, dn, top_k=3, norm_topk_prob=norm,
                                   shared=sh, **BLOCKS)
        return out, w

    def grads(fn):
        def loss(*a):
            out, w = fn(*a)
            return jnp.sum(out * probe) + jnp.sum(w * probe_w)
        return jax.tree.leaves(jax.grad(loss, argnums=tuple(range(6)))(
            x, router, gate, up, down, sh))

    names = ("x", "router_weight", "gate", "up", "down", "shared_expert_gate", "shared_gate",
             "shared_up", "shared_down")
    for name, g, r in zip(names, grads(kernels), grads(reference), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_routed_experts_bad_shapes():
    x, router, gate, up, down, sh = _routed_case(0, 1, 2, jnp.float32, shared=True)
    call = lambda *a, top_k=2, shared=None: routed_experts(
        *a, top_k=top_k, norm_topk_prob=True, shared=shared, **BLOCKS)
    with pytest.raises(ValueError, match=r"router_weight \(64, 8\) must be \[d = 64, E = 16\]"):
        call(x, router[:, :8], gate, up, down)
    with pytest.raises(ValueError, match=r"top_k = 0 must be in \[1, E = 16\]"):
        call(x, router, gate, up, down, top_k=0)
    with pytest.raises(ValueError, match=r"top_k = 17 must be in \[1, E = 16\]"):
        call(x, router, gate, up, down, top_k=17)
    with pytest.raises(ValueError, match="E = 12 must be a power of 2"):
        call(x, router[:, :12], gate[:12], up[:12], down[:12])
    with pytest.raises(ValueError, match=r"shared_expert_gate \(64,\) must be \[d = 64, 1\]"):
        call(x, router, gate, up, down, shared=(jnp.ones((64,)),) + sh[1:])
    with pytest.raises(ValueError, match=r"shared expert's .* \[d, I\], \[d, I\], \[I, d\]"):
        call(x, router, gate, up, down, shared=sh[:3] + (sh[3][:32],))
    with pytest.raises(ValueError, match=r"x \(64,\) must be \[N, d\]"):
        call(x[0], router, gate, up, down)
    with pytest.raises(ValueError, match="d = 64 must be a multiple of block_d = 128"):
        routed_experts(x, router, gate, up, down, top_k=2, norm_topk_prob=True,
                       blocks=replace(SMALL, block_d=128), interpret=True)


def test_routed_experts_export_cuda():
    """Lowers to Triton for CUDA at the 80B's sizes (E 512 logits a block per program, top-10,
    the shared expert), and outside the three kernels XLA has no matmul, softmax, top-k or
    sigmoid left: only the sums over the down splits and the slots."""
    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh

    S = jax.ShapeDtypeStruct
    args = (S((1, 2048), jnp.bfloat16), S((2048, 512), jnp.bfloat16),
            S((512, 2048, 512), jnp.bfloat16), S((512, 2048, 512), jnp.bfloat16),
            S((512, 512, 2048), jnp.bfloat16), S((2048, 1), jnp.bfloat16),
            S((2048, 512), jnp.bfloat16), S((2048, 512), jnp.bfloat16),
            S((512, 2048), jnp.bfloat16))
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA H200", 132, "cuda"))
    with jax.sharding.use_abstract_mesh(mesh):
        exp = export.export(
            jax.jit(lambda *a: routed_experts(*a[:5], top_k=10, norm_topk_prob=True,
                                              shared=a[5:])),
            platforms=("cuda",),
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*args)
    text = exp.mlir_module()
    for kernel in ("moe_router", "moe_gathered_gate_up", "moe_gathered_down"):
        assert kernel in text, kernel
    for op in ("stablehlo.dot_general", "stablehlo.exponential", "stablehlo.logistic",
               "stablehlo.sort", "top_k", "stablehlo.divide"):
        assert op not in text, op
    assert exp.out_avals[0].shape == (1, 2048) and exp.out_avals[2].dtype == jnp.int32


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [False, True])
def test_gpu_routed_experts_80b_sizes(norm):
    """Compiled on the GPU at the 80B block's sizes (bf16, E 512, top-10, d 2048, I 512, the
    shared expert), default blocks: the experts of route() on XLA's router matmul exactly (x in
    {-1, 0, 1} and the router's weight in halves: float32 sums exact in any order, so both
    round to the same bf16 logits, with many ties), its weights to 1e-5, and the output
    against route + the jnp reference to bf16 rounding."""
    keys = jax.random.split(jax.random.key(0), 9)
    n, k, e, d, inner = 3, 10, 512, 2048, 512
    bf = jnp.bfloat16
    x = jax.random.randint(keys[0], (n, d), -1, 2).astype(bf)
    router = (jax.random.randint(keys[1], (d, e), -1, 2) / 2).astype(bf)
    w = lambda key, shape, fan: (jax.random.normal(key, shape, jnp.float32) / fan ** 0.5).astype(bf)
    gate, up = w(keys[2], (e, d, inner), d), w(keys[3], (e, d, inner), d)
    down = w(keys[4], (e, inner, d), inner)
    sh = (w(keys[5], (d, 1), d), w(keys[6], (d, inner), d), w(keys[7], (d, inner), d),
          w(keys[8], (inner, d), inner))
    out, weights, experts = jax.jit(lambda *a: routed_experts(
        *a[:5], top_k=k, norm_topk_prob=norm, shared=a[5]))(x, router, gate, up, down, sh)
    want_w, want_e = jax.jit(lambda x, r: route(x @ r, k, norm))(x, router)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want_w), rtol=1e-5)
    f32 = lambda a: a.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    ref = gathered_experts_reference(f32(x), want_w, want_e, f32(gate), f32(up), f32(down),
                                     precision=hi)
    h = jax.nn.silu(jnp.dot(f32(x), f32(sh[1]), precision=hi)) * jnp.dot(f32(x), f32(sh[2]),
                                                                        precision=hi)
    shared_w = jax.nn.sigmoid(f32((x @ sh[0])[:, 0]))
    ref = ref + shared_w[:, None] * jnp.dot(h, f32(sh[3]), precision=hi)
    rel = np.linalg.norm(np.asarray(out, np.float64) - np.asarray(ref, np.float64)) / \
        np.linalg.norm(np.asarray(ref, np.float64))
    assert rel < 1e-2, rel


def test_readme_moe_example_runs():
    """The README's MoE example runs as written (on the CPU in interpret mode), and its values
    hold: the kernels' output equals the jnp reference's, routed_experts' weights sum to 1."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (code,) = [b for b in blocks if "routed_experts(" in b]
    scope: dict = {}
    exec(compile(code, "README.md (MoE example)", "exec"), scope)  # noqa: S102 (the README)
    out = np.asarray(scope["out"].astype(jnp.float32))
    assert out.shape == (scope["N"], scope["d"]) and np.isfinite(out).all() and np.abs(out).max() > 0
    got = scope["gathered_experts"](scope["x"], scope["weights"], scope["experts"],
                                    scope["gate_proj"], scope["up_proj"], scope["down_proj"],
                                    interpret=True)
    ref = scope["gathered_experts_reference"](scope["x"], scope["weights"], scope["experts"],
                                              scope["gate_proj"], scope["up_proj"],
                                              scope["down_proj"])
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(scope["weights"]).sum(-1), 1, rtol=1e-5)
    np.testing.assert_allclose(out, np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)
