"""The train step sharded over a mesh of 8 virtual CPU devices (FSDP over ``fsdp``, experts over
``expert``, tensor parallel over ``tensor``) equals the single-device step.

Runs ``tests/train_sharding_worker.py`` in a subprocess (the device count is fixed when jax is
imported). The checkpoint: TINY_HF with 2 layers (one Gated DeltaNet, one full attention, both
sparse MoE with 16 experts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hf_fixtures import build_hf_checkpoint

WORKER = Path(__file__).with_name("train_sharding_worker.py")
ROOT = Path(__file__).resolve().parents[1]
MESH = "fsdp=2,expert=2,tensor=2"


def test_sharded_train_step_equals_single_device(tmp_path):
    build_hf_checkpoint(tmp_path / "hf", {"num_hidden_layers": 2, "full_attention_interval": 2},
                        seed=3)
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR="/tmp/qnext-jax-test-xla-cache",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "hf"), MESH, str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    r = json.loads(out.read_text())[MESH]
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=1e-5)
    assert r["ref_losses"][1] != r["ref_losses"][0]
    np.testing.assert_allclose(r["grad_norms"], r["ref_grad_norms"], rtol=1e-5)
    # Adam normalises each update to ~lr, so summation-order noise on near-zero gradients shows
    # as a small fraction of lr: bound the params' difference after 2 steps by 5% of one step.
    assert r["max_param_abs_err"] < 0.05 * r["lr"], r
    # the plan was applied: the 16 experts split over `expert` x `tensor` (their mlp dim then
    # whole), their hidden dim over `fsdp`; Adam moments sharded like their params
    assert r["expert_shard_shape"] == [4, 32, 32], r
    assert r["opt_state_sharded"], r
