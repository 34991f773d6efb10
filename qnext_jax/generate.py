"""Jitted generation: a (chunked) prefill, then decode steps run on the device in a loop of up
to ``decode_steps_per_call`` tokens per call, or speculative decoding with the MTP head.

Sampling follows the usual processors (transformers' order): temperature, then top-k, then
top-p (nucleus), then a categorical draw; temperature 0 is greedy (argmax).

Prompts of unequal length are left-padded (:func:`pad_prompts`); padding never enters the
attention, the conv state or the recurrent state. A long prompt goes through in chunks of
``prefill_chunk_size`` tokens carrying the cache (one compiled chunk shape: the last chunk is
padded with a masked tail), so activation memory does not grow with the prompt.

Speculative decoding (``speculative_tokens = N``, greedy only; the scheme of vLLM's MTP
proposer): the MTP head drafts N tokens one after another (its input: the previous hidden state
and token; it keeps its own KV cache), the main model scores [last token, draft_1..draft_N] in
one forward, the longest prefix of drafts that equals the main model's argmax is accepted plus
the main model's own next token. The main cache rolls back to the last accepted token: K/V
slots past it are invalidated, and each Gated DeltaNet layer returns its conv and recurrent
state after every verified token (see ``Qwen3NextGatedDeltaNet``), of which the accepted one is
kept. The MTP cache is then rewritten for the accepted tokens with the main model's hidden
states. The output is the plain greedy output, token for token.

With ``scan_layers`` the model runs its layers as a scan over the repeating block of the layer
pattern, with params and cache stacked per block (``qnext_jax.cache``); prefill, decode and the
speculative round are the same functions, and their compile time stays flat in depth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qnext_jax import sharding
from qnext_jax.cache import init_cache, keep_token_state, track_token_states
from qnext_jax.config import Qwen3NextConfig
from qnext_jax.modeling import Qwen3NextForCausalLM
from qnext_jax.modeling.attention import check_attn_impl
from qnext_jax.modeling.decoder import BLOCKS, scan_period, stack_layers, unstack_layers
from qnext_jax.modeling.rope import rope_cos_sin


# Prompt lengths and cache lengths are rounded up to these (fewer distinct compiled shapes).
PROMPT_BUCKET = 64
CACHE_BUCKET = 256
# Decode steps per device call (Generator's decode_steps_per_call). One H200, 8 of the 80B's 48
# layers, batch 1 (.devrun-style experiment, 2026-12-01): one step per call took 1.92 ms a token
# (blocked) and 1.67 ms queued without a block; 16 steps in one on-device loop took 1.09 ms a
# token, the GPU busy 89% of the loop (1.01 ms of kernels a step): the rest was the host's
# dispatch and synchronisation of each call.
DECODE_STEPS_PER_CALL = 16
# XLA options of the decode loop of a scanned model on a GPU. Each layer's weights are a slice
# of the stacked params at the scan's index; a Triton GEMM fusion cannot read such a slice in
# place, so XLA copied every dense weight of every layer on every step. cuBLAS GEMMs with
# XLA's dynamic-slice fusion read most slices where they lie. One H200, 8 of the 80B's layers,
# batch 1 (results/h200-2026-12-01c): 2.07-2.19 -> 1.77-1.86 ms a token, 72 -> 20 copies a
# step; cuBLAS without the fusion 2.09 ms. (Pallas kernels are not fused: the MoE's decode
# kernels are handed the whole stacks of expert weights and the scan's index instead.)
SCANNED_DECODE_GPU_OPTIONS = {"xla_gpu_enable_triton_gemm": False,
                              "xla_gpu_enable_dynamic_slice_fusion": True}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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


def _integer_ids(ids: np.ndarray) -> np.ndarray:
    """``ids``, or ValueError when they are not integers (a cast would truncate floats)."""
    if ids.size and not np.issubdtype(ids.dtype, np.integer):  # ([] reads as float64)
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    return ids


def check_token_ids(input_ids, vocab_size: int, attention_mask=None) -> None:
    """Raise ValueError naming the (first five) ids of real tokens outside [0, vocab_size):
    input_ids [B, T] (or [T]) host ints, attention_mask 0 on padding. The model would embed
    such an id as NaN (an out-of-range gather) and generate without an error; also raise when
    the ids are not integers (floats would be truncated silently)."""
    ids = _integer_ids(np.atleast_2d(np.asarray(input_ids)))
    real = np.ones(ids.shape, bool) if attention_mask is None else \
        np.atleast_2d(np.asarray(attention_mask)).astype(bool)
    rows, cols = np.nonzero(real & ((ids < 0) | (ids >= vocab_size)))
    if rows.size:
        where = [f"{ids[r, c]} at position {c}" + (f" of prompt {r}" if ids.shape[0] > 1 else "")
                 for r, c in zip(rows[:5], cols[:5])]
        raise ValueError(f"token ids must be in [0, vocab_size = {vocab_size}): got "
                         + ", ".join(where)
                         + (f" and {rows.size - 5} more" if rows.size > 5 else ""))


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """Left-pad token-id lists of unequal length.

    Returns (input_ids int32 [B, T], attention_mask int32 [B, T]) with T the longest prompt;
    padded slots hold ``pad_id`` and mask 0. Raises ValueError on an empty batch or prompt, or
    ids that are not integers.
    """
    prompts = [_integer_ids(np.asarray(p)).tolist() for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("pad_prompts: every prompt needs at least one token (and the batch "
                         "at least one prompt)")
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, np.int32)
    mask = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask


@dataclasses.dataclass
class GenerationResult:
    """Generated ids [B, n] (eos included; after eos, rows repeat their eos) and timings.

    With speculative decoding, ``spec_rounds`` verify forwards were run, ``spec_accepted`` of
    the ``spec_proposed`` drafted tokens were accepted (``acceptance_rate``).
    """

    tokens: np.ndarray
    prompt_tokens: int
    compile_s: float
    prefill_s: float
    decode_s: float
    decode_steps: int
    decode_tokens: int = 0
    spec_rounds: int = 0
    spec_proposed: int = 0
    spec_accepted: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the timed decode steps (all rows counted)."""
        n = self.decode_tokens or self.decode_steps
        return self.tokens.shape[0] * n / max(self.decode_s, 1e-9)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens (None without speculative decoding)."""
        return None if not self.spec_proposed else self.spec_accepted / self.spec_proposed


def _mtp_hidden(model, hidden, next_ids, positions, token_mask, cache, cache_index, kv_valid):
    """The MTP head's normed hidden state (no LM head): ``Qwen3NextForCausalLM.mtp_logits``
    without the logits, so that callers project only the rows they need."""
    cos, sin = rope_cos_sin(model.config, positions, model.dtype)
    return model.mtp(model.embed_tokens(next_ids), hidden, cos, sin, token_mask, cache,
                     cache_index, kv_valid)


def _take(x, index, axis=1):
    """x[:, index] for a traced scalar ``index`` (the axis is dropped)."""
    return jax.lax.dynamic_index_in_dim(x, index, axis=axis, keepdims=False)


class Generator:
    """Holds the model and its jitted prefill/decode functions for one config.

    Args:
      config, dtype, precision, gdn_impl, moe_impl, attn_impl: the model (see
        ``Qwen3NextForCausalLM``).
      mesh: a ``jax.sharding.Mesh`` from :func:`qnext_jax.sharding.make_mesh`, or None: run
        sharded: params are placed with :attr:`param_shardings` (restore them straight into
        these with ``load(..., shardings=gen.param_shardings)``), the cache is created sharded
        (batch over data, heads over tensor), the MoE runs expert-parallel, and the jitted
        prefill/decode keep the cache in its shardings.
      rules: the logical-axis rules (default ``qnext_jax.sharding.DEFAULT_RULES``).
      prefill_chunk_size: feed the prompt in chunks of this many tokens (None: in one piece).
      speculative_tokens: N > 0 drafts N tokens per step with the MTP head (greedy only; the
        config needs ``mtp_num_hidden_layers > 0``).
      decode_steps_per_call: decode steps run on the device in one call (a ``while_loop`` that
        samples, tracks eos and feeds each token back), so the host dispatches and waits once
        per that many tokens, not per token (DECODE_STEPS_PER_CALL). :meth:`stream` then
        yields tokens in bursts of up to this many; 1 is a call per token. The loop stops early
        when every row has emitted eos or max_new_tokens is reached. Not used by speculative
        decoding (one verify round per call).
      scan_layers: run the decoder layers as a scan over the blocks of the periodic layer
        pattern (``Qwen3NextForCausalLM(scan_layers=True)``), with the stacked cache
        (``init_cache(..., scan_layers=True)``): compile time of prefill, decode and the
        speculative round stays flat in depth. On a GPU the decode loop compiles with
        ``SCANNED_DECODE_GPU_OPTIONS`` (kept in ``decode_compiler_options``). Params may come
        in either layout; :meth:`prepare_params` converts them (per-layer params are stacked
        on every call otherwise: convert once when generating repeatedly). A non-periodic
        layer pattern raises ValueError.

    Each distinct (batch, chunk length, cache length) compiles the prefill once; the decode
    loop (or the speculative round) compiles once per (batch, cache length). Prompts are padded
    (masked tail) to a multiple of ``PROMPT_BUCKET`` tokens and caches to a multiple of
    ``CACHE_BUCKET`` slots, so calls with nearby prompt lengths and max_new_tokens reuse the
    compiled functions.
    """

    def __init__(self, config: Qwen3NextConfig, dtype=jnp.float32, precision=None,
                 gdn_impl: str = "auto", moe_impl: str = "auto", mesh=None, rules=None,
                 prefill_chunk_size: int | None = None, speculative_tokens: int = 0,
                 scan_layers: bool = False, attn_impl: str = "auto",
                 decode_steps_per_call: int = DECODE_STEPS_PER_CALL):
        if prefill_chunk_size is not None and prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
        if decode_steps_per_call < 1:
            raise ValueError(f"decode_steps_per_call must be >= 1, got {decode_steps_per_call}")
        if speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {speculative_tokens}")
        if speculative_tokens and config.mtp_num_hidden_layers < 1:
            raise ValueError("speculative_tokens > 0 needs an MTP head, but the config has "
                             "mtp_num_hidden_layers = 0 (was the checkpoint converted with its "
                             "mtp.* tensors?)")
        check_attn_impl(attn_impl)
        if scan_layers:
            scan_period(config)  # a non-periodic layer pattern fails here
        self.config = config
        self.dtype = dtype
        self.mesh = mesh
        self.rules = sharding.DEFAULT_RULES if rules is None else rules
        self.scan_layers = scan_layers
        self.param_shardings = None if mesh is None else sharding.param_shardings(
            config, mesh, self.rules, scan_layers=scan_layers)
        self.prefill_chunk_size = prefill_chunk_size
        self.speculative_tokens = speculative_tokens
        self.decode_steps_per_call = decode_steps_per_call
        self.model = Qwen3NextForCausalLM(config, dtype=dtype, precision=precision,
                                          gdn_impl=gdn_impl, moe_impl=moe_impl,
                                          attn_impl=attn_impl, scan_layers=scan_layers)
        convert = stack_layers if scan_layers else unstack_layers
        self._convert = jax.jit(lambda p: convert(p, config),
                                **({} if mesh is None else {"out_shardings": self.param_shardings}))
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("sampling", "with_mtp"),
                                donate_argnames=("cache", "mtp_state"))
        self.decode_compiler_options = (SCANNED_DECODE_GPU_OPTIONS if scan_layers and
                                        jax.default_backend() == "gpu" else None)
        self._decode = jax.jit(self._decode_fn, static_argnames=("sampling", "block"),
                               donate_argnums=2, compiler_options=self.decode_compiler_options)
        self._spec = jax.jit(self._spec_fn, donate_argnames=("cache", "mtp_state"))
        self._compiled: dict = {}

    # ------------------------------------------------------------------ jitted functions
    def _logits(self, params, hidden):
        return self.model.apply({"params": params}, hidden,
                                method=Qwen3NextForCausalLM.logits)

    def _mtp(self, params, *args):
        return self.model.apply({"params": params}, *args, method=_mtp_hidden)

    def _prefill_fn(self, params, input_ids, cache, attention_mask, last, key, sampling,
                    with_mtp=False, next_ids=None, mtp_state=None):
        """One prompt chunk [B, C] into ``cache``; samples the token after slot ``last``.

        With the MTP head (speculative decoding), also writes the MTP entries of the chunk
        (hidden of slot j, token of slot j + 1 = ``next_ids[:, j]``; at ``last``, the sampled
        token) and drafts the token after that.
        """
        with sharding.activate(self.mesh, self.rules):
            start_index, start_pos = cache["index"], cache["positions"]
            _, cache, hidden = self.model.apply({"params": params}, input_ids, cache=cache,
                                                attention_mask=attention_mask,
                                                output_hidden_states=True)
            cache = sharding.constrain_cache(cache)
            h = hidden[-1]  # [B, C, d] final-normed
            logits = self._logits(params, _take(h, last)[:, None])[:, 0]  # [B, V]
            token = sharding.constrain(sample_logits(logits, key, *sampling), (None,))
            if not with_mtp:
                return token, cache
            _B, C = input_ids.shape
            mask = attention_mask.astype(bool)
            positions = jnp.maximum(start_pos[:, None] + jnp.cumsum(mask, 1, dtype=jnp.int32)
                                    - 1, 0)
            next_ids = jnp.where(jnp.arange(C)[None] == last, token[:, None], next_ids)
            valid = jax.lax.dynamic_update_slice_in_dim(mtp_state["valid"], mask, start_index,
                                                        axis=1)
            mh, mcache = self._mtp(params, h, next_ids, positions, mask, mtp_state["cache"],
                                   start_index, valid)
            mh_last = _take(mh, last)  # [B, d]
            draft = jnp.argmax(self._logits(params, mh_last[:, None])[:, 0], -1).astype(
                jnp.int32)
            return token, cache, {"cache": mcache, "valid": valid}, draft, mh_last

    def _decode_fn(self, params, token, cache, key, done, eos_ids, steps, sampling, block):
        """Up to ``steps`` (<= ``block``, the loop's static buffer of tokens) decode steps in a
        ``while_loop``, stopping early once every row is done.

        Args:
          token: [B] int32, the last emitted token of each row (not yet in the cache).
          key: the sampling key; each step draws with ``key, sub = split(key)``.
          done: [B] bool, rows that have emitted eos (they repeat their token from then on).
          eos_ids: [n_eos] int32 (may be empty). steps: int32 scalar.
        Returns:
          (tokens [B, block] int32, of which the first ``n`` are new, n (int32 scalar), the
          last token, cache, key, done).
        """
        B = token.shape[0]

        def cond(carry):
            i, done = carry[0], carry[4]
            return (i < steps) & ~jnp.all(done)

        def body(carry):
            i, token, cache, key, done, out = carry
            key, sub = jax.random.split(key)
            logits, cache = self.model.apply({"params": params}, token[:, None], cache=cache)
            cache = sharding.constrain_cache(cache)
            new = sharding.constrain(sample_logits(logits[:, -1], sub, *sampling), (None,))
            token = jnp.where(done, token, new)
            done = done | jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
            out = jax.lax.dynamic_update_index_in_dim(out, token, i, axis=1)
            return i + 1, token, cache, key, done, out

        out = jnp.zeros((B, block), jnp.int32)
        with sharding.activate(self.mesh, self.rules):
            n, token, cache, key, done, out = jax.lax.while_loop(
                cond, body, (jnp.zeros((), jnp.int32), token, cache, key, done, out))
        return out, n, token, cache, key, done

    def _spec_fn(self, params, cache, mtp_state, token, draft, mtp_hidden, live):
        """One speculative round (greedy). See the module docstring.

        Args:
          cache: main cache, filled up to slot q - 1 (``index`` = q); ``token`` [B] (slot q)
            is the last emitted token, not yet run through the main model.
          mtp_state: {"cache": MTP K/V, "valid": [B, S]}, filled up to slot q - 1.
          draft: [B] the MTP's draft of the token after ``token``; mtp_hidden [B, d] its hidden.
          live: [B] bool, rows still generating (finished rows do not limit the acceptance).
        Returns:
          (y [B, N+1] main-model tokens, a (accepted drafts, int32 scalar; y[:, :a+1] are the
          new tokens), per-row accepted [B], cache, mtp_state, next token, next draft, hidden).
        """
        N = self.speculative_tokens
        B = token.shape[0]
        with sharding.activate(self.mesh, self.rules):
            q, pos = cache["index"], cache["positions"]
            mcache, mvalid = mtp_state["cache"], mtp_state["valid"]
            S = mvalid.shape[1]
            drafts, h = [draft], mtp_hidden
            ones = jnp.ones((B, 1), bool)
            for k in range(2, N + 1):  # draft k from (hidden, draft k-1) at slot q + k - 2
                slot = q + k - 2
                mvalid = jax.lax.dynamic_update_slice_in_dim(mvalid, ones, slot, axis=1)
                mh, mcache = self._mtp(params, h[:, None], drafts[-1][:, None],
                                       (pos + k - 2)[:, None], ones, mcache, slot, mvalid)
                h = mh[:, 0]
                drafts.append(jnp.argmax(self._logits(params, mh)[:, 0], -1).astype(jnp.int32))
            drafts = jnp.stack(drafts, axis=1)  # [B, N]

            # Verify [token, drafts] in one forward, keeping the GDN state after every token.
            vcache = track_token_states(cache)
            ids = jnp.concatenate([token[:, None], drafts], axis=1)  # [B, N+1]
            _, vcache, hidden = self.model.apply({"params": params}, ids, cache=vcache,
                                                 output_hidden_states=True)
            hv = hidden[-1]  # [B, N+1, d]
            y = jnp.argmax(self._logits(params, hv), -1).astype(jnp.int32)  # [B, N+1]
            per_row = jnp.sum(jnp.cumprod(drafts == y[:, :N], axis=1), axis=1).astype(jnp.int32)
            a = jnp.min(jnp.where(live, per_row, N))

            # Roll the main cache back to slot q + a.
            new = keep_token_state(vcache, a)
            new["index"] = q + a + 1
            new["positions"] = pos + a + 1
            new["valid"] = jnp.logical_and(vcache["valid"], jnp.arange(S)[None] < q + a + 1)
            new = sharding.constrain_cache(new)

            # Rewrite the MTP entries of slots q .. q + a with the main model's hidden states:
            # slot q + j holds (h_{q+j}, token of slot q + j + 1 = y_j).
            m = jnp.broadcast_to(jnp.arange(N + 1)[None] <= a, (B, N + 1))
            mvalid = jax.lax.dynamic_update_slice_in_dim(mvalid, m, q, axis=1)
            mh, mcache = self._mtp(params, hv, y, pos[:, None] + jnp.arange(N + 1)[None], m,
                                   mcache, q, mvalid)
            mh_a = _take(mh, a)
            next_draft = jnp.argmax(self._logits(params, mh_a[:, None])[:, 0], -1).astype(
                jnp.int32)
            return (y, a, per_row, new, {"cache": mcache, "valid": mvalid}, _take(y, a),
                    next_draft, mh_a)

    # ------------------------------------------------------------------------- helpers
    def prepare_params(self, params):
        """``params`` in the layout this Generator runs: stacked (``stack_layers``) with
        ``scan_layers``, per layer without; params already in that layout are kept. With a
        mesh, placed on :attr:`param_shardings` (no copy when already there). Converting
        copies the layers' params (the input stays alive while the caller holds it)."""
        if (BLOCKS in params) != self.scan_layers:
            return self._convert(params)
        if self.mesh is not None:
            return jax.device_put(params, self.param_shardings)
        return params

    def _place(self, params, input_ids, attention_mask, cache_len: int):
        """Params in the model's layout (:meth:`prepare_params`) and, in sharded mode, ids and
        mask batch-sharded and a cache created straight into its shardings."""
        B, T = input_ids.shape
        params = self.prepare_params(params)
        make_cache = lambda: init_cache(self.config, B, cache_len, self.dtype,
                                        scan_layers=self.scan_layers)
        if self.mesh is None:
            return params, input_ids, attention_mask, make_cache()
        ids_sh = sharding.named(self.mesh, ("batch", "length"), (B, T), self.rules)
        cache_sh = sharding.cache_shardings(self.config, self.mesh, B, cache_len, self.dtype,
                                            self.rules, scan_layers=self.scan_layers)
        cache = jax.jit(make_cache, out_shardings=cache_sh)()
        return (params, jax.device_put(input_ids, ids_sh),
                jax.device_put(attention_mask, ids_sh), cache)

    def _compile(self, fn, name, args, kwargs, static):
        """AOT-compile ``fn`` for these arguments once per Generator (keyed by their avals)."""
        avals = jax.tree.map(lambda x: (x.shape, str(x.dtype)), (args, kwargs))
        key = (name, str(jax.tree.structure((args, kwargs))), str(jax.tree.leaves(avals)),
               tuple(sorted(static.items())))
        if key not in self._compiled:
            self._compiled[key] = fn.lower(*args, **kwargs, **static).compile()
        return self._compiled[key]

    @staticmethod
    def _as_batch(input_ids, attention_mask):
        """input_ids: [B, T] array, or a list of token-id lists (left-padded here)."""
        if isinstance(input_ids, (list, tuple)) and input_ids and \
                isinstance(input_ids[0], (list, tuple, np.ndarray)) and \
                len({len(p) for p in input_ids}) > 1:
            if attention_mask is not None:
                raise ValueError("give attention_mask only with an already padded [B, T] "
                                 "input_ids, not with a list of prompts")
            return pad_prompts(input_ids)
        input_ids = _integer_ids(np.asarray(input_ids)).astype(np.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length] (or a list of token-id "
                             f"lists), got shape {input_ids.shape}")
        if not input_ids.size:
            raise ValueError(f"input_ids must hold at least one prompt of at least one token, "
                             f"got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = np.ones(input_ids.shape, np.int32)
        attention_mask = np.asarray(attention_mask, np.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected "
                             f"input_ids' shape {input_ids.shape}")
        ends_in_pad = np.nonzero(attention_mask[:, -1] == 0)[0] if input_ids.size else []
        if len(ends_in_pad):  # generation continues after each row's last slot
            raise ValueError(
                f"attention_mask row {ends_in_pad[0]} ends in padding: every row must end with "
                "a token (pad on the left; padding inside a prompt is skipped)")
        return input_ids, attention_mask

    # ---------------------------------------------------------------------------- stream
    def stream(self, params, input_ids, *, max_new_tokens: int = 32, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               attention_mask=None, eos_token_id: int | tuple[int, ...] | None = None,
               timings: dict | None = None) -> Iterator[np.ndarray]:
        """Yield the next token of every sequence ([B] int32 numpy) until all stopped. The
        decode loop runs ``decode_steps_per_call`` steps per device call, so after the first
        token the tokens come in bursts of up to that many.

        Args:
          input_ids: [B, T] ids (left-padded, with ``attention_mask`` 0 on padding), or a list
            of token-id lists of any lengths (left-padded here).
          eos_token_id: stop tokens (default: the config's eos ids); a sequence stops after
            emitting one and afterwards repeats it.
          timings: a dict that receives compile_s, prefill_s, decode_s, decode_steps,
            decode_tokens and, with speculative decoding, spec_rounds, spec_proposed,
            spec_accepted.
        Raises:
          ValueError: bad shapes, token ids outside the vocabulary, max_new_tokens < 1,
            sampling with speculative decoding.
        """
        input_ids, attention_mask = self._as_batch(input_ids, attention_mask)
        check_token_ids(input_ids, self.config.vocab_size, attention_mask)
        B, T = input_ids.shape
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None: off), got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None: off), got {top_p}")
        N = self.speculative_tokens
        if N and temperature > 0:
            raise ValueError("speculative decoding is greedy only: use temperature 0 (or "
                             "speculative_tokens = 0 to sample)")
        eos = self.config.eos_token_ids if eos_token_id is None else (
            (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
        sampling = (float(temperature), top_k, top_p)
        timings = {} if timings is None else timings

        T_bucket = _round_up(T, PROMPT_BUCKET)
        C = T_bucket if self.prefill_chunk_size is None else min(self.prefill_chunk_size,
                                                                 T_bucket)
        n_chunks = math.ceil(T / C)
        T_pad = n_chunks * C  # the last chunk gets a masked tail
        ids = np.zeros((B, T_pad), np.int32)
        mask = np.zeros((B, T_pad), np.int32)
        ids[:, :T], mask[:, :T] = input_ids, attention_mask
        # The token is sampled after slot `last` of the last chunk; earlier chunks get C (out of
        # range: their sample is ignored, and no MTP entry of theirs is overwritten).
        last = jnp.asarray(T - 1 - (n_chunks - 1) * C, jnp.int32)
        not_last = jnp.asarray(C, jnp.int32)
        cache_len = _round_up(T_pad + max_new_tokens + (N + 1 if N else 0), CACHE_BUCKET)
        params, ids_dev, mask_dev, cache = self._place(params, jnp.asarray(ids),
                                                       jnp.asarray(mask), cache_len)
        key = jax.random.key(seed)
        key, sub = jax.random.split(key)

        with_mtp = N > 0
        extra = {}
        if with_mtp:
            mtp_state = {"cache": cache.pop("mtp"),
                         "valid": jnp.zeros((B, cache_len), bool)}
            next_all = np.zeros((B, T_pad), np.int32)
            next_all[:, :T_pad - 1] = ids[:, 1:]
            next_dev = jnp.asarray(next_all)
        t0 = time.perf_counter()
        chunk = lambda a, i: a[:, i * C:(i + 1) * C]
        if with_mtp:
            extra = {"next_ids": chunk(next_dev, 0), "mtp_state": mtp_state}
        prefill = self._compile(self._prefill, "prefill",
                                (params, chunk(ids_dev, 0), cache, chunk(mask_dev, 0), last, sub),
                                extra, {"sampling": sampling, "with_mtp": with_mtp})
        t1 = time.perf_counter()
        for i in range(n_chunks):
            at = last if i == n_chunks - 1 else not_last
            if with_mtp:
                out = prefill(params, chunk(ids_dev, i), cache, chunk(mask_dev, i), at, sub,
                              next_ids=chunk(next_dev, i), mtp_state=mtp_state)
                token, cache, mtp_state, draft, mtp_hidden = out
            else:
                token, cache = prefill(params, chunk(ids_dev, i), cache, chunk(mask_dev, i),
                                       at, sub)
        token = np.asarray(token)
        t2 = time.perf_counter()
        timings.update(compile_s=t1 - t0, prefill_s=t2 - t1, decode_s=0.0, decode_steps=0,
                       decode_tokens=0)

        done = np.isin(token, eos) if eos else np.zeros(B, bool)
        yield token
        emitted = 1
        if with_mtp:
            timings.update(spec_rounds=0, spec_proposed=0, spec_accepted=0)
            tok_dev = jnp.asarray(token)
            while emitted < max_new_tokens and not done.all():
                ts = time.perf_counter()
                y, a, _, cache, mtp_state, tok_dev, draft, mtp_hidden = self._spec(
                    params, cache, mtp_state, tok_dev, draft, mtp_hidden, jnp.asarray(~done))
                y, a = np.asarray(y), int(a)
                dt = time.perf_counter() - ts
                if timings["spec_rounds"] == 0:  # the first call compiles the round
                    timings["compile_s"] += dt
                else:
                    timings["decode_s"] += dt
                    timings["decode_steps"] += 1
                    timings["decode_tokens"] += a + 1
                timings["spec_rounds"] += 1
                timings["spec_proposed"] += N
                timings["spec_accepted"] += a
                for j in range(a + 1):
                    token = np.where(done, token, y[:, j])
                    if eos:
                        done = done | np.isin(token, eos)
                    yield token
                    emitted += 1
                    if emitted >= max_new_tokens or done.all():
                        break
            return
        state = (jnp.asarray(token), cache, key, jnp.asarray(done))
        eos_ids = jnp.asarray(eos, jnp.int32).reshape(-1)
        # The loop's token buffer: decode_steps_per_call, but no more than this call can use
        # (the decode steps left, rounded up to a power of two, at least the default): one
        # compiled loop for most calls, and a memory bound for a huge decode_steps_per_call.
        block = min(self.decode_steps_per_call,
                    max(DECODE_STEPS_PER_CALL, 1 << (max_new_tokens - 2).bit_length()))
        while emitted < max_new_tokens and not done.all():
            steps = jnp.asarray(min(block, max_new_tokens - emitted), jnp.int32)
            args = (params, state[0], state[1], state[2], state[3], eos_ids, steps)
            ts = time.perf_counter()
            decode = self._compile(self._decode, "decode", args, {},
                                   {"sampling": sampling, "block": block})
            t_run = time.perf_counter()
            timings["compile_s"] += t_run - ts
            out, n, *state = decode(*args)
            out, n, done = np.asarray(out), int(n), np.asarray(state[3])
            timings["decode_s"] += time.perf_counter() - t_run
            timings["decode_steps"] += n
            timings["decode_tokens"] += n
            for j in range(n):
                yield out[:, j]
            emitted += n

    def generate(self, params, input_ids, **kwargs) -> GenerationResult:
        """Run :meth:`stream` to the end; returns a :class:`GenerationResult`."""
        timings: dict = {}
        steps = list(self.stream(params, input_ids, timings=timings, **kwargs))
        tokens = np.stack(steps, axis=1)
        _, mask = self._as_batch(input_ids, kwargs.get("attention_mask"))
        return GenerationResult(tokens=tokens, prompt_tokens=int(np.sum(mask)), **timings)


@functools.lru_cache(maxsize=8)
def _generator(config: Qwen3NextConfig, dtype_name: str, gdn_impl: str, moe_impl: str,
               attn_impl: str, prefill_chunk_size: int | None, speculative_tokens: int,
               scan_layers: bool, decode_steps_per_call: int) -> Generator:
    return Generator(config, dtype=jnp.dtype(dtype_name), gdn_impl=gdn_impl, moe_impl=moe_impl,
                     attn_impl=attn_impl, prefill_chunk_size=prefill_chunk_size,
                     speculative_tokens=speculative_tokens, scan_layers=scan_layers,
                     decode_steps_per_call=decode_steps_per_call)


def generate(config: Qwen3NextConfig, params, input_ids, *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, attention_mask=None, eos_token_id=None, dtype=None,
             gdn_impl: str = "auto", moe_impl: str = "auto", attn_impl: str = "auto",
             prefill_chunk_size: int | None = None, speculative_tokens: int = 0,
             scan_layers: bool = False,
             decode_steps_per_call: int = DECODE_STEPS_PER_CALL) -> np.ndarray:
    """Generate ``max_new_tokens`` tokens after ``input_ids``: [B, T] (left-padded with
    ``attention_mask`` 0 where needed) or a list of token-id lists of any lengths (padded
    here). Returns int32 [B, n] numpy, n <= max_new_tokens (shorter when every sequence hit
    eos; finished rows repeat their eos).

    ``dtype`` is the compute dtype (default: the dtype of the embedding params); ``gdn_impl``,
    ``moe_impl``, ``attn_impl``: see ``Qwen3NextForCausalLM``;
    ``prefill_chunk_size``, ``speculative_tokens``, ``scan_layers`` (params in either layout)
    and ``decode_steps_per_call``: see :class:`Generator`.
    """
    if dtype is None:
        dtype = params["embed_tokens"]["embedding"].dtype
    gen = _generator(config, jnp.dtype(dtype).name, gdn_impl, moe_impl, attn_impl,
                     prefill_chunk_size, speculative_tokens, scan_layers,
                     decode_steps_per_call)
    return gen.generate(params, input_ids, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        attention_mask=attention_mask, eos_token_id=eos_token_id).tokens
