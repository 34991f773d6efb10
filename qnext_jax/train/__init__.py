"""Fine-tuning Qwen3-Next: loss, optimizer, train step, data, checkpoints.

    from qnext_jax.train import loss, optimizer, step, data, checkpoint
"""
