"""The grouped-matmul MoE implementations on one device (``ragged_dot``; for GPUs ``tiles`` and
``capacity``, whose overflow branch runs when one expert gets all rows) against a float64
per-expert loop on random routings; the expert-parallel path is checked on 8 virtual
devices in tests/test_sharding.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnext_jax.modeling.moe import _tile_rows, grouped_experts

HIGHEST = jax.lax.Precision.HIGHEST
E, D, INNER = 6, 8, 5
_fns = {(impl, tm): jax.jit(lambda *a, impl=impl, tm=tm: grouped_experts(
    *a, precision=HIGHEST, impl=impl, tile_rows=tm))
    for impl, tm in (("ragged_dot", None), ("tiles", None), ("tiles", 4), ("capacity", None))}


def _reference(x, weights, experts, gate, up, down):
    f = np.float64
    out = np.zeros((x.shape[0], x.shape[1]))
    for n in range(x.shape[0]):
        for w, e in zip(weights[n], experts[n]):
            h = f(x[n]) @ f(gate[e])
            out[n] += w * ((h / (1 + np.exp(-h)) * (f(x[n]) @ f(up[e]))) @ f(down[e]))
    return out


@settings(max_examples=20, deadline=None, database=None)
@given(n=st.sampled_from([1, 7, 24]), k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       mode=st.sampled_from(["random", "one_expert", "duplicates"]))
def test_tiles_and_ragged_dot_equal_dense_loop(n, k, seed, mode):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    gate, up = (rng.standard_normal((E, D, INNER)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((E, INNER, D)).astype(np.float32)
    if mode == "one_expert":  # everything on one expert, the others empty
        experts = np.full((n, k), rng.integers(E), np.int32)
    elif mode == "duplicates":  # any ids, repeats allowed
        experts = rng.integers(0, E, (n, k)).astype(np.int32)
    else:
        experts = np.stack([rng.choice(E, k, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rng.random((n, k)).astype(np.float32)
    ref = _reference(x, weights, experts, gate, up, down)
    for (impl, tm), fn in _fns.items():
        got = np.asarray(fn(x, weights, experts, gate, up, down))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{impl} {tm}")


def test_tile_rows_and_bad_impl():
    assert _tile_rows(10, 512) == 1  # decode: one row per tile (a gather of its expert)
    assert _tile_rows(640, 512) == 2
    assert _tile_rows(10240, 512) == 32
    assert _tile_rows(163840, 512) == 128  # capped
    z = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        grouped_experts(z, z[:, :1], np.zeros((2, 1), np.int32), np.zeros((3, 4, 2)),
                        np.zeros((3, 4, 2)), np.zeros((3, 2, 4)), impl="megablox")
