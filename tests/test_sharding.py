"""The sharding plan: mesh specs, logical axes, sharded == one device, expert parallelism,
multi-process restore.

Multi-device checks run ``tests/sharding_worker.py`` in a subprocess with 8 virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax is imported; this
process already has 1 device). The checkpoint is written by transformers (TINY_HF: 16 experts,
8 query heads / 1 kv head) with 2 layers (one Gated DeltaNet, one full-attention, both sparse
MoE) to keep the compiles few: every layer kind is still covered.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hf_fixtures import build_hf_checkpoint

from qnext_jax import sharding
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.convert import abstract_params, hf_to_orbax

WORKER = Path(__file__).with_name("sharding_worker.py")
MESHES = ("expert=8", "data=2,expert=4", "tensor=2,expert=4")
ROOT = Path(__file__).resolve().parents[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR="/tmp/qnext-jax-test-xla-cache",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _run_worker(args: list[str], out: Path, devices: int = 8, timeout: int = 600) -> dict:
    proc = subprocess.run([sys.executable, str(WORKER), *args], env=_env(devices), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"worker {args[0]} failed:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharding")
    build_hf_checkpoint(root / "hf", {"num_hidden_layers": 2, "full_attention_interval": 2},
                        seed=3)
    hf_to_orbax(root / "hf", root / "orbax")
    return root / "orbax"


@pytest.fixture(scope="module")
def model_result(checkpoint) -> dict:
    out = checkpoint.parent / "model.json"
    return _run_worker(["model", str(checkpoint), ";".join(MESHES), str(out)], out)


# --------------------------------------------------------------------------- in-process checks
def test_mesh_spec_errors():
    import jax

    assert len(jax.devices()) == 1
    with pytest.raises(ValueError, match=r"needs 8 devices, but 1 is available"):
        sharding.make_mesh("data=1,expert=8")
    with pytest.raises(ValueError, match=r"needs 8 devices, but 2 are available"):
        sharding.make_mesh("data=1,expert=8", devices=jax.devices() * 2)
    with pytest.raises(ValueError, match=r"unknown axis 'experts'"):
        sharding.make_mesh("experts=1")
    with pytest.raises(ValueError, match=r"positive integer"):
        sharding.parse_mesh_spec("data=0")
    with pytest.raises(ValueError, match=r"positive integer"):
        sharding.parse_mesh_spec("data=two")
    with pytest.raises(ValueError, match=r"got '2;expert=4' \(axes are separated by commas"):
        sharding.parse_mesh_spec("tensor=2;expert=4")
    with pytest.raises(ValueError, match=r"not AXIS=SIZE"):
        sharding.parse_mesh_spec("data")
    with pytest.raises(ValueError, match=r"given twice"):
        sharding.parse_mesh_spec("data=1,data=1")
    assert sharding.parse_mesh_spec("expert=4, tensor=2") == {
        "data": 1, "fsdp": 1, "expert": 4, "tensor": 2}
    mesh = sharding.make_mesh("")  # empty: every device on data
    assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.shape == (1, 1, 1, 1)


def _fake_mesh(**sizes):
    return types.SimpleNamespace(shape={**dict.fromkeys(sharding.MESH_AXES, 1), **sizes})


def test_80b_partition_specs_cover_every_leaf():
    from jax.sharding import PartitionSpec as P

    config = Qwen3NextConfig.from_preset("qwen3-next-80b-a3b")
    mesh = _fake_mesh(data=2, fsdp=4, expert=8, tensor=4)
    specs = sharding.param_partition_specs(config, mesh)
    shapes = abstract_params(config)
    flat_specs = dict(_flat(specs))
    assert set(flat_specs) == set(dict(_flat(shapes)))
    moe = specs["layers_0"]["mlp"]
    # Experts over expert x tensor (32 of 512): the intermediate dim keeps whole.
    assert moe["experts"]["gate_proj"] == P(("expert", "tensor"), "fsdp")
    assert moe["experts"]["down_proj"] == P(("expert", "tensor"), None, "fsdp")
    assert moe["shared_expert"]["gate_proj"]["kernel"] == P("fsdp", "tensor")
    assert moe["gate"]["kernel"] == P("fsdp")  # router: experts replicated
    attn = specs["layers_3"]["self_attn"]
    assert attn["q_proj"]["kernel"] == P("fsdp", "tensor")
    assert attn["k_proj"]["kernel"] == P("fsdp", "tensor")  # 2 kv heads * 256: divisible
    assert specs["layers_0"]["linear_attn"]["in_proj_qkvz"]["kernel"] == P("fsdp", "tensor")
    assert specs["layers_0"]["linear_attn"]["A_log"] == P("tensor")
    assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
    assert specs["norm"]["weight"] == P()


def test_80b_scanned_layout_specs_have_a_replicated_layer_axis():
    """param_shardings(..., scan_layers=True) matches the scanned model's params tree; each
    stacked leaf keeps its layer's spec behind a replicated block axis."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from qnext_jax.modeling import Qwen3NextForCausalLM

    config = Qwen3NextConfig.from_preset("qwen3-next-80b-a3b")
    mesh = _fake_mesh(data=2, fsdp=4, expert=8, tensor=4)
    specs = sharding.param_partition_specs(config, mesh, scan_layers=True)
    model = Qwen3NextForCausalLM(config, scan_layers=True)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    assert set(dict(_flat(specs))) == set(dict(_flat(shapes["params"])))
    per_layer = sharding.param_partition_specs(config, mesh)
    for j in range(4):
        for path, spec in _flat(specs["blocks"][f"layers_{j}"]):
            layer_spec = dict(_flat(per_layer[f"layers_{j}"]))[path]
            assert spec == (P(None, *layer_spec) if layer_spec else P()), path
    assert specs["blocks"]["layers_0"]["mlp"]["experts"]["gate_proj"] == \
        P(None, ("expert", "tensor"), "fsdp")
    assert specs["blocks"]["layers_3"]["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["embed_tokens"] == per_layer["embed_tokens"]


def test_80b_stacked_cache_specs_have_a_replicated_layer_axis():
    """cache_partition_specs(..., scan_layers=True) matches init_cache(..., scan_layers=True);
    each stacked leaf keeps its layer's spec behind a replicated block axis."""
    import jax
    from jax.sharding import PartitionSpec as P

    from qnext_jax.cache import init_cache

    config = Qwen3NextConfig.from_preset("qwen3-next-80b-a3b").replace(mtp_num_hidden_layers=1)
    mesh = _fake_mesh(data=2, fsdp=4, expert=8, tensor=4)
    specs = sharding.cache_partition_specs(config, mesh, 16, 64, scan_layers=True)
    shapes = jax.eval_shape(lambda: init_cache(config, 16, 64, scan_layers=True))
    assert set(dict(_flat(specs))) == set(dict(_flat(shapes)))
    per_layer = sharding.cache_partition_specs(config, mesh, 16, 64)
    for j in range(4):
        for path, spec in _flat(specs["blocks"][f"layers_{j}"]):
            layer_spec = dict(_flat(per_layer[f"layers_{j}"]))[path]
            assert spec == P(None, *layer_spec), (j, path)
    # Batch 16 over data x fsdp (x expert = 64 does not divide), 32 value heads over tensor;
    # 2 kv heads do not divide tensor = 4: replicated.
    assert specs["blocks"]["layers_0"]["recurrent_state"] == P(None, ("data", "fsdp"), "tensor")
    assert specs["blocks"]["layers_3"]["key"] == P(None, ("data", "fsdp"))
    assert specs["mtp"] == per_layer["mtp"] and specs["valid"] == per_layer["valid"]
    # The per-token states of speculative verification, stacked.
    assert sharding.cache_logical_axes(("blocks", "layers_0", "recurrent_states"), ()) == (
        "layers", "batch", "length", "heads", None, None)


def test_scan_layers_generation_sharded(tmp_path):
    """8 virtual devices: the scanned Generator with stacked params and cache (and speculative
    decoding) gives the one-device unrolled tokens; params and the decode step's new cache sit
    in their stacked shardings."""
    out = tmp_path / "scan.json"
    result = _run_worker(["scan", str(out)], out)
    assert result["devices"] == 8
    for mesh, r in result["meshes"].items():
        assert r["tokens_equal"] and r["placed"] and r["cache_placed"], (mesh, r)
        split = ["expert", "tensor"] if "tensor" in mesh else "expert"
        assert r["experts_spec"][:2] == [None, split], (mesh, r)
    # [blocks, batch 2, value heads 4, dk, dv]: batch over data, heads over tensor.
    assert result["meshes"]["data=2,expert=4"]["recurrent_spec"] == [None, "data"]
    assert result["meshes"]["tensor=2,expert=4"]["recurrent_spec"] == [None, None, "tensor"]


def test_kernels_run_per_shard(tmp_path):
    """8 virtual devices: map_shards hands each call its batch and head shard (Hk and Hv split
    alike; nothing split when the heads do not divide), and the model's per-shard kernels (the
    flash path through a stand-in for tokamax's op, the Gated DeltaNet op) give the one-device
    logits and greedy tokens on tensor meshes."""
    out = tmp_path / "shards.json"
    result = _run_worker(["shards", str(out)], out)
    split = result["map_shards"]["data=2,tensor=4 Hk=8"]
    assert split["equal"] and split["local"] == [[[1, 5, 2, 3], [1, 5, 4, 3]]], split
    whole = result["map_shards"]["data=2,tensor=4 Hk=6"]  # 6 heads: not over tensor = 4
    assert whole["equal"] and whole["local"] == [[[1, 5, 6, 3], [1, 5, 12, 3]]], whole
    heads = {"tensor=2,expert=4": [2, 9, 1, 8], "data=2,tensor=4": [1, 9, 2, 8]}
    for mesh, r in result["meshes"].items():
        assert r["logits_rel"] <= 1e-5 and r["tokens_equal"], (mesh, r)
        assert r["flash_calls"] > 0 and r["gdn_local_q"] == [heads[mesh]] * 3, (mesh, r)  # 3 GDN layers

def test_map_shards_names_a_bad_layout():
    import jax.numpy as jnp

    x = jnp.zeros((2, 3))
    assert sharding.map_shards(lambda a: (a + 1,), (x,), (("batch",),), (("batch",),))[0][0, 0] \
        == 1  # no active mesh: called as it is, whatever the layout says
    with sharding.activate(sharding.make_mesh("")):
        with pytest.raises(ValueError, match=r"logical axes \('batch',\) do not match an "
                                             r"argument of shape \(2, 3\)"):
            sharding.map_shards(lambda a: (a,), (x,), (("batch",),), (("batch",),))

def test_indivisible_dims_fall_back_to_replicated():
    from jax.sharding import PartitionSpec as P

    mesh = _fake_mesh(data=2, expert=4, tensor=2)
    # TINY_HF's single kv head of 16: 16 % 2 == 0 -> sharded; a batch of 3: replicated.
    assert sharding.logical_to_spec(("batch", "length"), (3, 8), mesh) == P()
    assert sharding.logical_to_spec(("batch",), (2,), mesh) == P("data")
    assert sharding.logical_to_spec(("batch",), (16,), mesh) == P(("data", "expert"))
    assert sharding.logical_to_spec(("experts", "embed", "mlp"), (6, 4, 3), mesh) == P()
    # A mesh axis is used once per array: the second "heads" dim stays replicated.
    assert sharding.logical_to_spec(("heads", "heads"), (4, 4), mesh) == P("tensor")
    # The cache: batch over data, kv heads over tensor (here 1 kv head: replicated).
    cfg = Qwen3NextConfig(num_key_value_heads=1, num_attention_heads=8, head_dim=16,
                          hidden_size=64, num_hidden_layers=4, linear_num_key_heads=2,
                          linear_num_value_heads=4, linear_key_head_dim=16,
                          linear_value_head_dim=16, num_experts=16, vocab_size=256)
    assert sharding.logical_to_spec(sharding.cache_logical_axes(("layers_3", "key"), ()),
                                    (2, 1, 16, 16), mesh) == P("data")
    assert sharding.logical_to_spec(
        sharding.cache_logical_axes(("layers_0", "recurrent_state"), ()),
        (2, cfg.linear_num_value_heads, 16, 16), mesh) == P("data", "tensor")


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


# ----------------------------------------------------------------- 8 virtual devices (subprocess)
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_model_matches_one_device(model_result, mesh):
    assert model_result["devices"] == 8
    r = model_result["meshes"][mesh]
    assert r["placed"], "params were not restored into the requested shardings"
    assert r["expert_spec"].startswith("P('expert'" if "tensor" not in mesh else
                                       "P(('expert', 'tensor')"), r
    sizes = sharding.parse_mesh_spec(mesh)
    # 16 experts split over expert x tensor
    assert r["expert_shard_shape"][:1] == [16 // sizes["expert"] // sizes["tensor"]], r
    assert r["logits_rel"] <= 1e-5, r
    assert r["tokens_equal"], r


def test_cli_generate_with_mesh(model_result):
    cli = model_result["cli"]
    assert cli["rc"] == 0 and cli["tokens"] and cli["tokens"] == cli["ref"], cli


def test_expert_parallel_moe_equals_dense_loop(tmp_path):
    out = tmp_path / "moe.json"
    result = _run_worker(["moe", str(out)], out)
    for mesh, err in result["worst_rel"].items():
        assert err <= 1e-5, (mesh, err)
    assert result["grad_rel"] <= 1e-5, result["grad_rel"]
    assert result["capacity_runs_tiles"]
    assert len(result["stacked_rel"]) == 8
    for case, err in result["stacked_rel"].items():
        assert err <= 1e-5, (case, err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_restore_sharded_and_match_one_process(checkpoint, model_result, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed, gloo collectives) restore the checkpoint
    into a (data=2, expert=4) mesh spanning both and compute the logits of one process."""
    coordinator = f"localhost:{_free_port()}"
    procs, outs = [], []
    for pid in range(2):
        out = tmp_path / f"mh{pid}.json"
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "multihost", str(checkpoint), "data=2,expert=4",
             str(out), coordinator, "2", str(pid)], env=_env(4), cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    ref = np.asarray(model_result["ref_logits"])
    for pid, out in enumerate(outs):
        r = json.loads(out.read_text())
        assert (r["process_index"], r["process_count"], r["devices"], r["local_devices"]) == (
            pid, 2, 8, 4)
        got = np.asarray(r["logits"])
        assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_distributed_without_a_coordinator_says_how_to_give_one(monkeypatch):
    """A process count without a coordinator, outside a cluster JAX detects: the error names
    --coordinator (JAX alone says "coordinator_address should be defined.")."""
    import jax

    from qnext_jax import distributed

    def jax_initialize(coordinator_address=None, **_):
        assert coordinator_address is None
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.delenv(distributed.ENV_COORDINATOR, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", jax_initialize)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # keep this process's collectives
    with pytest.raises(ValueError, match="--coordinator HOST:PORT"):
        distributed.initialize(num_processes=2, process_id=0)


@pytest.mark.parametrize("coordinator", ["localhost", "localhost:", "host:port"])
def test_distributed_coordinator_must_be_host_and_port(coordinator, monkeypatch):
    """A coordinator without a numeric port is named before JAX's own parsing (an IndexError
    from inside jax.distributed for "localhost")."""
    import jax

    from qnext_jax import distributed

    monkeypatch.setattr(jax.distributed, "initialize", lambda **_: pytest.fail("reached JAX"))
    with pytest.raises(ValueError, match=f"coordinator '{coordinator}': expected HOST:PORT"):
        distributed.initialize(coordinator=coordinator, num_processes=2, process_id=0)
