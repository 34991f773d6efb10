"""Jitted generation: one prefill, then a decode step reused for every new token.

Sampling follows the usual processors (transformers' order): temperature, then top-k, then
top-p (nucleus), then a categorical draw; temperature 0 is greedy (argmax).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from qnext_jax.cache import init_cache
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling import Qwen3NextForCausalLM


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
                  top_p: float | None) -> jax.Array:
    """Draw one token per row of ``logits`` [B, V] (any float dtype) -> int32 [B].

    ``temperature`` <= 0 means greedy. ``top_k`` keeps the k most likely tokens, ``top_p`` the
    smallest set whose probability reaches p (the most likely token is always kept).
    """
    logits = logits.astype(jnp.float32)
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_idx = jnp.sum(mass_before < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class GenerationResult:
    """Generated ids [B, n] (eos included; after eos, rows hold ``pad_id``) and timings."""

    tokens: np.ndarray
    prompt_tokens: int
    compile_s: float
    prefill_s: float
    decode_s: float
    decode_steps: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.tokens.shape[0] * self.decode_steps / max(self.decode_s, 1e-9)


class Generator:
    """Holds the model and its jitted prefill/decode functions for one config.

    Each distinct (batch, prompt length, cache length) compiles the prefill once; the decode
    step compiles once per (batch, cache length) and is reused for every token.
    """

    def __init__(self, config: Qwen3NextConfig, dtype=jnp.float32, precision=None,
                 gdn_impl: str = "auto"):
        self.config = config
        self.dtype = dtype
        self.model = Qwen3NextForCausalLM(config, dtype=dtype, precision=precision,
                                          gdn_impl=gdn_impl)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("sampling",))
        self._decode = jax.jit(self._decode_fn, static_argnames=("sampling",), donate_argnums=2)

    def _prefill_fn(self, params, input_ids, cache, attention_mask, key, sampling):
        logits, cache = self.model.apply({"params": params}, input_ids, cache=cache,
                                         attention_mask=attention_mask)
        return sample_logits(logits[:, -1], key, *sampling), cache

    def _decode_fn(self, params, token, cache, key, sampling):
        logits, cache = self.model.apply({"params": params}, token[:, None], cache=cache)
        return sample_logits(logits[:, -1], key, *sampling), cache

    def stream(self, params, input_ids, *, max_new_tokens: int = 32, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               attention_mask=None, eos_token_id: int | tuple[int, ...] | None = None,
               timings: dict | None = None) -> Iterator[np.ndarray]:
        """Yield the next token of every sequence ([B] int32 numpy) until all stopped.

        A sequence stops after emitting an eos token; afterwards it yields eos again.
        ``timings`` (a dict), when given, receives compile_s, prefill_s, decode_s, decode_steps.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        B, T = input_ids.shape
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        eos = self.config.eos_token_ids if eos_token_id is None else (
            (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
        sampling = (float(temperature), top_k, top_p)
        timings = {} if timings is None else timings
        cache = init_cache(self.config, B, T + max_new_tokens, self.dtype)
        key = jax.random.key(seed)

        t0 = time.perf_counter()
        key, sub = jax.random.split(key)
        prefill = self._prefill.lower(params, input_ids, cache, attention_mask, sub,
                                      sampling=sampling).compile()
        t1 = time.perf_counter()
        token, cache = prefill(params, input_ids, cache, attention_mask, sub)
        token = np.asarray(token)
        t2 = time.perf_counter()
        timings.update(compile_s=t1 - t0, prefill_s=t2 - t1, decode_s=0.0, decode_steps=0)

        done = np.isin(token, eos) if eos else np.zeros(B, bool)
        yield token
        for step in range(1, max_new_tokens):
            if done.all():
                break
            key, sub = jax.random.split(key)
            ts = time.perf_counter()
            new, cache = self._decode(params, jnp.asarray(token), cache, sub, sampling=sampling)
            new = np.asarray(new)
            if step == 1:  # the first call compiles the decode step
                timings["compile_s"] += time.perf_counter() - ts
            else:
                timings["decode_s"] += time.perf_counter() - ts
                timings["decode_steps"] += 1
            token = np.where(done, token, new)
            if eos:
                done = done | np.isin(token, eos)
            yield token

    def generate(self, params, input_ids, **kwargs) -> GenerationResult:
        """Run :meth:`stream` to the end; returns a :class:`GenerationResult`."""
        timings: dict = {}
        steps = list(self.stream(params, input_ids, timings=timings, **kwargs))
        tokens = np.stack(steps, axis=1)
        mask = kwargs.get("attention_mask")
        prompt = int(np.sum(mask)) if mask is not None else int(np.size(input_ids))
        return GenerationResult(tokens=tokens, prompt_tokens=prompt, **timings)


@functools.lru_cache(maxsize=8)
def _generator(config: Qwen3NextConfig, dtype_name: str, gdn_impl: str) -> Generator:
    return Generator(config, dtype=jnp.dtype(dtype_name), gdn_impl=gdn_impl)


def generate(config: Qwen3NextConfig, params, input_ids, *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, attention_mask=None, eos_token_id=None, dtype=None,
             gdn_impl: str = "auto") -> np.ndarray:
    """Generate ``max_new_tokens`` tokens after ``input_ids`` [B, T] (left-padded with
    ``attention_mask`` 0 where needed). Returns int32 [B, n] numpy, n <= max_new_tokens (shorter
    when every sequence hit eos; finished rows repeat their eos).

    ``dtype`` is the compute dtype (default: the dtype of the embedding params).
    """
    if dtype is None:
        dtype = params["embed_tokens"]["embedding"].dtype
    gen = _generator(config, jnp.dtype(dtype).name, gdn_impl)
    return gen.generate(params, input_ids, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        attention_mask=attention_mask, eos_token_id=eos_token_id).tokens

