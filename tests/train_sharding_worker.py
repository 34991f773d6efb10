"""Subprocess body of tests/test_train_sharded.py (needs 8 virtual CPU devices, set before jax
is imported):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_sharding_worker.py \
        HF_DIR "fsdp=2,expert=2,tensor=2" OUT.json

Runs two train steps (packed batch, 2 micro-batches, aux loss on) on one device and on each
mesh, from the same params, and writes the losses and the largest parameter differences.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(hf_dir: str, meshes: str, out: str) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from qnext_jax.convert import load
    from qnext_jax.sharding import make_mesh
    from qnext_jax.train.data import pack_documents
    from qnext_jax.train.optimizer import OptimizerConfig
    from qnext_jax.train.step import TrainConfig, Trainer

    config, params = load(hf_dir)
    rng = np.random.default_rng(0)
    docs = [(rng.integers(1, config.vocab_size, n).astype(np.int32), rng.random(n) > 0.2)
            for n in rng.integers(4, 20, 24)]
    rows = pack_documents(docs, seq_len=24, max_segments=4)
    batch = {k: v[:8] for k, v in rows.items()}
    assert batch["input_ids"].shape == (8, 24)
    opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, weight_decay=0.1)
    tc = TrainConfig(compute_dtype="float32", gdn_impl="reference", grad_accum=2,
                     max_segments=4, aux_coef=0.1)
    results, ref = {}, None
    for spec in [None] + meshes.split(";"):
        mesh = None if spec is None else make_mesh(spec)
        tr = Trainer(config, opt, tc, mesh)
        state = tr.init_state(params)
        losses, gnorms = [], []
        for _ in range(2):
            state, m = tr.step(state, batch)
            losses.append(float(m["loss"]))
            gnorms.append(float(m["grad_norm"]))
        p = jax.tree_util.tree_map(np.asarray, jax.device_get(state["params"]))
        if spec is None:
            ref = (losses, p, gnorms)
            continue
        errs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), p, ref[1])
        experts = state["params"]["layers_0"]["mlp"]["experts"]["gate_proj"]
        mu = jax.tree_util.tree_leaves(state["opt_state"])
        results[spec] = {
            "losses": losses, "ref_losses": ref[0],
            "grad_norms": gnorms, "ref_grad_norms": ref[2], "lr": opt.learning_rate,
            "max_param_abs_err": max(jax.tree_util.tree_leaves(errs)),
            "expert_spec": str(experts.sharding.spec),
            "expert_shard_shape": list(experts.addressable_shards[0].data.shape),
            "opt_state_sharded": any(len(x.sharding.device_set) > 1 and
                                     not x.sharding.is_fully_replicated for x in mu),
        }
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
