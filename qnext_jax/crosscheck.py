"""Layer-by-layer comparison of our model against transformers' ``Qwen3NextForCausalLM``.

Both run in float32 on the same safetensors weights (ours through the in-memory converter) and
the same token ids; matmuls run at HIGHEST precision on our side. Needs the ``crosscheck``
extra (torch, transformers).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Acceptance bound of DESIGN.md section 7: max |delta logit| <= 1e-4 * max |logit|.
LOGIT_RTOL = 1e-4


@dataclasses.dataclass
class CrosscheckReport:
    """Max abs differences per hidden state (embeddings, each layer, final norm) and logits."""

    hidden_max_abs: list[float]
    hidden_scale: list[float]
    logits_max_abs: float
    logits_scale: float
    greedy_equal: bool

    @property
    def logits_rel(self) -> float:
        return self.logits_max_abs / max(self.logits_scale, 1e-30)

    @property
    def ok(self) -> bool:
        return self.logits_rel <= LOGIT_RTOL and self.greedy_equal

    def table(self) -> str:
        rows = ["| stage | max abs delta | max abs value |", "|---|---|---|"]
        for i, (d, s) in enumerate(zip(self.hidden_max_abs, self.hidden_scale)):
            name = "embeddings" if i == 0 else (  # transformers' last state is normed
                f"layer {i - 1} + final norm" if i == len(self.hidden_max_abs) - 1
                else f"layer {i - 1}")
            rows.append(f"| {name} | {d:.3e} | {s:.3e} |")
        rows.append(f"| logits | {self.logits_max_abs:.3e} | {self.logits_scale:.3e} |")
        rows.append(f"\nlogits: max|delta| / max|logit| = {self.logits_rel:.3e} "
                    f"(bound {LOGIT_RTOL:g}); argmax equal: {self.greedy_equal}; "
                    f"{'OK' if self.ok else 'MISMATCH'}")
        return "\n".join(rows)


def hf_forward(hf_dir: str | Path, token_ids: np.ndarray):
    """transformers' float32 eager forward: (hidden states [L + 2] of [B, T, d], logits)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(token_ids), dtype=torch.long),
                    output_hidden_states=True)
    hidden = [h.numpy() for h in out.hidden_states]
    return hidden, out.logits.numpy()


def jax_forward(config, params, token_ids: np.ndarray):
    """Our float32 forward at HIGHEST precision: (hidden states, logits) as numpy."""
    from qnext_jax.modeling import Qwen3NextForCausalLM

    model = Qwen3NextForCausalLM(config, precision=jax.lax.Precision.HIGHEST)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))
    logits, _, hidden = fn(params, jnp.asarray(token_ids, jnp.int32))
    return [np.asarray(h) for h in hidden], np.asarray(logits)


def compare(hf_hidden, hf_logits, our_hidden, our_logits) -> CrosscheckReport:
    """Align the two hidden-state lists and measure the differences.

    transformers returns L + 1 states (embeddings, the outputs of layers 0..L-2, then the
    final-normed output); ours are L + 2 (embeddings, every layer, final norm).
    """
    ours = our_hidden[:-2] + our_hidden[-1:]
    if len(ours) != len(hf_hidden):
        raise ValueError(f"hidden state counts differ: transformers {len(hf_hidden)}, "
                         f"ours {len(ours)}")
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(hf_hidden, ours)]
    scales = [float(np.max(np.abs(a))) for a in hf_hidden]
    return CrosscheckReport(
        hidden_max_abs=diffs, hidden_scale=scales,
        logits_max_abs=float(np.max(np.abs(hf_logits - our_logits))),
        logits_scale=float(np.max(np.abs(hf_logits))),
        greedy_equal=bool(np.array_equal(hf_logits.argmax(-1), our_logits.argmax(-1))))


def crosscheck(hf_dir: str | Path, token_ids=None, batch: int = 2, length: int = 24,
               seed: int = 0) -> CrosscheckReport:
    """Run both models on ``token_ids`` ([T] or [B, T]; random when None) and compare."""
    from qnext_jax.convert import load
    from qnext_jax.convert.orbax_store import is_orbax_dir
    from qnext_jax.generate import check_token_ids

    if is_orbax_dir(hf_dir):
        raise ValueError(f"{hf_dir}: a converted checkpoint; crosscheck runs transformers on an "
                         f"HF checkpoint: export it first (qnext export {hf_dir} HF_DIR)")
    config, params = load(hf_dir, dtype=jnp.float32)
    if token_ids is None:
        token_ids = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))
    check_token_ids(token_ids, config.vocab_size)
    token_ids = np.atleast_2d(np.asarray(token_ids, np.int64))
    hf_hidden, hf_logits = hf_forward(hf_dir, token_ids)
    our_hidden, our_logits = jax_forward(config, params, token_ids)
    return compare(hf_hidden, hf_logits, our_hidden, our_logits)
