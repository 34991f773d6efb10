"""The ``qnext`` command: convert | export | generate | finetune | crosscheck."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import sys
import time


def _bounded(kind, check, expected: str):
    """An argparse type: ``kind(text)``, rejected with ``expected`` when ``check`` fails."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_POSITIVE_INT = _bounded(int, lambda n: n >= 1, "an integer >= 1")
_NONNEGATIVE_INT = _bounded(int, lambda n: n >= 0, "an integer >= 0")
_POSITIVE_FLOAT = _bounded(float, lambda x: x > 0, "a number > 0")
_NONNEGATIVE_FLOAT = _bounded(float, lambda x: x >= 0, "a number >= 0")
_DTYPES = ("float32", "bfloat16", "float16")
# --mesh "" would put every device on data: leaving out --mesh is how to ask for no mesh.
_MESH_SPEC = _bounded(str, lambda spec: spec.replace(",", "").strip() != "",
                      "AXIS=SIZE pairs such as 'data=1,expert=8' (axes data, fsdp, expert, "
                      "tensor; leave out --mesh for no mesh)")


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends " (default: X)" to an option's help, unless the default is None or False (the
    help says what leaving the option out does) or the help already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _token_ids(text: str) -> list[int]:
    entries = [e for part in text.split(",") for e in (part.split() or [""])]
    try:
        ids = [int(t) for t in entries] if text.strip() else []
    except ValueError:
        raise SystemExit(f"--token-ids: expected integers separated by commas or spaces, "
                         f"got {text!r}") from None
    if not ids:
        raise SystemExit("--token-ids: no token ids given")
    return ids


def _read_prompts_file(path: str, chat: bool) -> list[tuple[int, dict]]:
    """--prompts-file: JSON Lines, one object a prompt, {"prompt": TEXT} or {"token_ids": [IDS]}
    (with ``chat``, "prompt" is the user message and an optional "system" its system message);
    blank lines are skipped, a UTF-8 byte-order mark too. Returns [(line number, object)]."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"--prompts-file: cannot read {path}: {e}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--prompts-file {path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or ("prompt" not in obj and "token_ids" not in obj):
            raise SystemExit(f'{where}: expected an object with "prompt" (text) or "token_ids" '
                             f"(a list of ints), got {line[:80]!r}")
        if "prompt" in obj and "token_ids" in obj:
            raise SystemExit(f'{where}: give "prompt" or "token_ids", not both')
        if chat and "token_ids" in obj:
            raise SystemExit(f'{where}: --chat renders "prompt" texts, not token ids')
        known = ("prompt", "system") if chat else ("prompt", "token_ids")
        if unknown := sorted(set(obj) - set(known)):
            raise SystemExit(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a line "
                             f"holds {' or '.join(map(repr, known))}"
                             + ("" if chat else ' ("system" with --chat)'))
        ids = obj.get("token_ids")
        if ids is not None and (not isinstance(ids, list) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids)):
            raise SystemExit(f'{where}: "token_ids" must be a non-empty list of ints, got '
                             f"{ids!r:.80}")
        for key in ("prompt", "system"):
            if key in obj and not isinstance(obj[key], str):
                raise SystemExit(f'{where}: "{key}" must be text, got {obj[key]!r:.80}')
        prompts.append((n, obj))
    if not prompts:
        raise SystemExit(f"--prompts-file {path}: no prompts (one JSON object a line)")
    return prompts


def _check_impls(gdn_impl: str, moe_impl: str = "auto", attn_impl: str = "auto") -> None:
    """--gdn-impl / --moe-impl / --attn-impl name a kernel for another platform than JAX's, or
    --moe-impl tokamax without tokamax installed: stop before building."""
    import jax

    from pallas_kernels.gated_delta_rule.ops import GPU_IMPLS, IMPL_ENV, env_impl
    from qnext_jax.modeling.attention import ATTN_IMPLS

    tokamax_attn = {i: "gpu" for i in ATTN_IMPLS if i.startswith("tokamax")}
    gdn_flag, gdn_fallback = "--gdn-impl", "use auto or reference"
    if gdn_impl == "auto":  # the op's override of auto
        try:
            from_env = env_impl(op="qnext")
        except ValueError as e:
            raise SystemExit(str(e)) from None
        if from_env is not None:
            gdn_flag, gdn_impl = IMPL_ENV, from_env
            gdn_fallback = "unset it, or set it to reference"
    for flag, impl, fallback, needs_of in (
            (gdn_flag, gdn_impl, gdn_fallback,
             {**dict.fromkeys(GPU_IMPLS, "gpu"), "pallas_tpu": "tpu"}),
            ("--moe-impl", moe_impl, "use auto",
             {"gather_pallas": "gpu", "tokamax:mosaic": "gpu", "tokamax:triton": "gpu"}),
            ("--attn-impl", attn_impl, "use auto or xla", tokamax_attn)):
        needs = needs_of.get(impl)
        if needs is not None and jax.default_backend() != needs:
            raise SystemExit(f"{flag}{'=' if flag.isupper() else ' '}{impl} runs on a "
                             f"{needs.upper()}; this JAX's backend is {jax.default_backend()}: "
                             f"{fallback}")
    if moe_impl.partition(":")[0] == "tokamax":
        from qnext_jax.modeling.layers import import_tokamax

        if import_tokamax()[0] is None:
            raise SystemExit(f"--moe-impl {moe_impl} needs the optional tokamax package: "
                             "pip install 'qnext-jax[gpu]' (or pip install tokamax)")


@contextlib.contextmanager
def _one_line_errors():
    """A missing or unfit file or directory, a bad config or checkpoint, a bad pattern (OSError,
    ValueError, re.error) as one line instead of a traceback (:func:`main` prefixes the
    command)."""
    try:
        yield
    except (OSError, ValueError, re.error) as e:
        raise SystemExit(str(e)) from None


@contextlib.contextmanager
def _exit_on_interrupt():
    """Ctrl-C as exit status 130, SIGTERM during a fine-tuning run (``Terminated``) as 143
    (128 + the signal's number), without a traceback (what was saved is said on stderr)."""
    from qnext_jax.train.run import Terminated

    try:
        yield
    except KeyboardInterrupt as e:
        raise SystemExit(143 if isinstance(e, Terminated) else 130) from None


def _cmd_convert(args) -> int:
    from qnext_jax.convert import hf_to_orbax

    with _one_line_errors():
        hf_to_orbax(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.out_dir}")
    return 0


def _cmd_export(args) -> int:
    from qnext_jax.convert import orbax_to_hf

    with _one_line_errors():
        orbax_to_hf(args.orbax_dir, args.hf_dir, overwrite=args.overwrite)
    print(f"wrote {args.hf_dir}")
    return 0


def parse_rope_scaling(text: str) -> dict | None:
    """``--rope-scaling``: JSON (``'{"rope_type": "yarn", "factor": 4, ...}'``), the short form
    ``'yarn:factor=4,original_max_position_embeddings=262144'`` or ``'none'``."""
    text = text.strip()
    if text.lower() in ("none", "null", ""):
        return None
    if text.startswith("{"):
        try:
            out = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--rope-scaling: not valid JSON ({e}): {text!r}") from None
        if not isinstance(out, dict):
            raise SystemExit(f"--rope-scaling: expected a JSON object, got {text!r}")
        return out
    kind, _, rest = text.partition(":")
    out: dict = {"rope_type": kind.strip()}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"--rope-scaling: expected KEY=VALUE, got {item!r} in {text!r}")
        value = value.strip()
        if value.lower() in ("true", "false"):
            out[key.strip()] = value.lower() == "true"
            continue
        try:
            out[key.strip()] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise SystemExit(f"--rope-scaling: {key.strip()}={value!r} is not a number") from None
    return out


def _mesh_from_args(args):
    """The mesh of ``--mesh`` (None without it), after ``jax.distributed`` when asked for."""
    from qnext_jax import distributed

    if distributed.requested(args.coordinator, args.num_processes, args.process_id):
        try:
            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if args.mesh is None:
        return None
    from qnext_jax.sharding import make_mesh

    try:
        return make_mesh(args.mesh)
    except ValueError as e:
        raise SystemExit(f"--mesh: {e}") from None


def _stream_one(gen, params, ids, kwargs, timings, tokenizer, stop, quiet) -> list[int]:
    """Generate after one prompt, printing the text as the tokens come (the ids without a
    tokenizer) unless ``quiet``; returns the new ids up to and with the first ``stop`` id."""
    from qnext_jax.chat import StreamDecoder

    new_ids: list[int] = []
    decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
    for step in gen.stream(params, [ids], timings=timings, **kwargs):
        t = int(step[0])
        new_ids.append(t)
        if not quiet:
            if decoder is None:
                print(t, end=" ", flush=True)
            elif t not in stop:
                sys.stdout.write(decoder.push(t))
                sys.stdout.flush()
        if t in stop:
            break
    if decoder is not None and not quiet:
        sys.stdout.write(decoder.flush())
    return new_ids


def _cmd_generate(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    from qnext_jax.config import ConfigError
    from qnext_jax.generate import DECODE_STEPS_PER_CALL, Generator, check_token_ids
    from qnext_jax.tokenizer import ByteTokenizer, load_tokenizer

    if args.prompts_file is not None and (args.prompt is not None or args.token_ids is not None):
        raise SystemExit("give --prompts-file FILE or --prompt / --token-ids, not both")
    if args.prompt is not None and args.token_ids is not None and not args.chat:
        raise SystemExit("give --prompt TEXT or --token-ids IDS, not both")
    if args.system is not None and not args.chat:
        raise SystemExit("--system TEXT is the system message of --chat: add --chat (and "
                         "--prompt TEXT as the user message), or drop --system")
    _check_impls(args.gdn_impl, args.moe_impl, args.attn_impl)
    if args.speculative_tokens and args.decode_steps_per_call is not None:
        print("[qnext] --decode-steps-per-call does not apply to --speculative-tokens (one "
              "verify round a call): ignored", file=sys.stderr)
    if args.checkpoint is None and args.chat:  # before anything is loaded or built
        raise SystemExit("--chat needs a --checkpoint with tokenizer.json and a chat template: "
                         "the demo model has none")
    if args.checkpoint is None and args.speculative_tokens:
        raise SystemExit("--speculative-tokens needs a --checkpoint with an MTP head: the demo "
                         "model has none")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        print("[qnext] --top-k / --top-p shape sampling only; --temperature 0 decodes greedily",
              file=sys.stderr)
    mesh = _mesh_from_args(args)
    if args.checkpoint is None:  # its weights are built once the prompt has been checked
        from qnext_jax.demo import DEMO_CONFIG

        print("[qnext] no --checkpoint: using the built-in tiny demo model (random weights, "
              "byte vocabulary; its text is noise)", file=sys.stderr)
        config, params, tokenizer = DEMO_CONFIG, None, ByteTokenizer()
    else:
        from qnext_jax.convert import load

        try:
            if mesh is None:
                config, params = load(args.checkpoint, dtype=args.dtype)
            else:  # every leaf read straight into its shard of the mesh
                from qnext_jax.sharding import tree_shardings

                config, params = load(args.checkpoint, mesh=mesh, dtype=args.dtype,
                                      shardings=tree_shardings(mesh))
        except (OSError, ValueError) as e:  # missing or unfit files, config, tensors
            raise SystemExit(f"--checkpoint: {e}") from None
        tokenizer = load_tokenizer(args.checkpoint)
    rope_scaling = None
    if args.rope_scaling is not None:
        rope_scaling = parse_rope_scaling(args.rope_scaling)
        try:
            config = config.replace(rope_scaling=rope_scaling)
        except ConfigError as e:
            raise SystemExit(f"--rope-scaling: {e}") from None
    stop_ids = tuple(config.eos_token_ids)
    if args.prompts_file is not None:
        entries = _read_prompts_file(args.prompts_file, args.chat)
    elif args.chat:
        if args.prompt is None:
            raise SystemExit("--chat needs --prompt TEXT (the user message)")
        entries = [(None, {"prompt": args.prompt, "system": args.system})]
    elif args.token_ids is not None:
        entries = [(None, {"token_ids": _token_ids(args.token_ids)})]
    elif args.prompt is not None:
        entries = [(None, {"prompt": args.prompt})]
    else:
        raise SystemExit("give --prompt TEXT, --token-ids IDS or --prompts-file FILE")
    if args.chat:
        from qnext_jax.chat import (
            ChatTemplateError,
            load_chat_template,
            render_chat,
            special_tokens,
            stop_token_ids,
        )

        if tokenizer is None:
            raise SystemExit("--chat needs a --checkpoint with tokenizer.json and a chat template")
        try:
            template = load_chat_template(args.checkpoint)
            specials = special_tokens(args.checkpoint)
        except ChatTemplateError as e:
            raise SystemExit(str(e)) from None
        stop_ids = stop_token_ids(args.checkpoint, template, tokenizer, stop_ids)

    def encode(line, entry) -> list[int]:
        """One prompt's token ids (``line``: its --prompts-file line, or None)."""
        where = "the prompt" if line is None else f"--prompts-file {args.prompts_file} line {line}"
        if "token_ids" in entry:  # not with --chat (_read_prompts_file)
            ids = entry["token_ids"]
        elif args.chat:
            system = entry.get("system", args.system)
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": entry["prompt"]}]
            try:
                ids = tokenizer.encode(render_chat(template, messages, specials,
                                                   add_generation_prompt=True))
            except ChatTemplateError as e:
                raise SystemExit(str(e)) from None
        elif tokenizer is None:
            raise SystemExit(f"{args.checkpoint} has no tokenizer.json: pass token ids "
                             f"(--token-ids, or \"token_ids\" in --prompts-file) instead of "
                             f"text")
        else:
            ids = tokenizer.encode(entry["prompt"])
        if not ids:
            raise SystemExit(f"{where} has no tokens")
        try:
            check_token_ids(ids, config.vocab_size)
        except ValueError as e:
            raise SystemExit(f"{where}'s {e}") from None
        return list(ids)

    prompts = [encode(line, entry) for line, entry in entries]
    longest = max(len(ids) for ids in prompts)
    if longest + args.max_new_tokens > config.max_position_embeddings:
        print(f"[qnext] warning: {longest} prompt + {args.max_new_tokens} new tokens go past the "
              f"model's max_position_embeddings ({config.max_position_embeddings}); the cache "
              "is sized for all of them", file=sys.stderr)
    # The demo's weights are float32 unless --dtype casts them.
    dtype = jnp.dtype(args.dtype or jnp.float32) if params is None else \
        params["embed_tokens"]["embedding"].dtype
    try:
        gen = Generator(config, dtype=dtype, gdn_impl=args.gdn_impl, moe_impl=args.moe_impl,
                        attn_impl=args.attn_impl, mesh=mesh,
                        prefill_chunk_size=args.prefill_chunk_size,
                        speculative_tokens=args.speculative_tokens,
                        scan_layers=args.scan_layers,
                        decode_steps_per_call=args.decode_steps_per_call
                        or DECODE_STEPS_PER_CALL)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if params is None:
        from qnext_jax.demo import demo_model

        start = time.perf_counter()
        params = demo_model(dtype=args.dtype)[1]
        print(f"[qnext] demo model built in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    params = gen.prepare_params(params)  # once (the scanned layout with --scan-layers)
    kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
              "eos_token_id": stop_ids}
    if args.speculative_tokens and args.temperature > 0:
        raise SystemExit("--speculative-tokens is greedy only: use --temperature 0")

    timings: dict = {}
    stop = set(stop_ids)
    if args.prompts_file is None:
        rows = [_stream_one(gen, params, prompts[0], kwargs, timings, tokenizer, stop,
                            args.json)]
    else:  # one left-padded batch; each row ends at its first stop token
        steps = np.stack(list(gen.stream(params, prompts, timings=timings, **kwargs)), axis=1)
        rows = []
        for row in steps.tolist():
            ends = [i for i, t in enumerate(row) if t in stop]
            rows.append(row[:ends[0] + 1] if ends else row)
    texts = [tokenizer.decode(row) if tokenizer is not None else None for row in rows]
    n_timed = timings.get("decode_tokens", 0)
    # None when no decode step ran: 1 new token.
    decode_tps = len(prompts) * n_timed / max(timings["decode_s"], 1e-9) if n_timed else None
    prefill_tps = sum(map(len, prompts)) / max(timings["prefill_s"], 1e-9)
    spec = None
    if args.speculative_tokens:
        proposed = timings.get("spec_proposed", 0)
        spec = {"speculative_tokens": args.speculative_tokens,
                "rounds": timings.get("spec_rounds", 0), "proposed": proposed,
                "accepted": timings.get("spec_accepted", 0),
                "acceptance_rate": timings.get("spec_accepted", 0) / proposed if proposed else None}
    if args.json:
        results = [{"prompt_ids": ids, "token_ids": row, "text": text}
                   for ids, row, text in zip(prompts, rows, texts)]
        print(json.dumps({**(results[0] if args.prompts_file is None else {"results": results}),
                          "compile_s": timings["compile_s"], "prefill_s": timings["prefill_s"],
                          "decode_s": timings["decode_s"],
                          "prefill_tokens_per_s": prefill_tps,
                          "decode_tokens_per_s": decode_tps, "rope_scaling": rope_scaling,
                          "prefill_chunk_size": args.prefill_chunk_size,
                          "decode_steps_per_call": None if args.speculative_tokens else
                          gen.decode_steps_per_call, "scan_layers": args.scan_layers,
                          "stop_token_ids": list(stop_ids), "speculative": spec}))
        return 0
    if args.prompts_file is not None:
        for i, (row, text) in enumerate(zip(rows, texts)):
            body = text if text is not None else " ".join(map(str, row))
            print(f"[{i}] {body}")
    print()
    extra = "" if spec is None else (
        f"; speculative {args.speculative_tokens}: acceptance "
        f"{spec['acceptance_rate'] if spec['acceptance_rate'] is not None else float('nan'):.2f}")
    print(f"[qnext] {len(prompts)} prompt(s), {sum(map(len, prompts))} tokens in all, generated "
          f"{sum(map(len, rows))}; "
          f"prefill {prefill_tps:.1f} tok/s, decode "
          f"{'n/a (no timed step)' if decode_tps is None else f'{decode_tps:.1f} tok/s'}, compile "
          f"{timings['compile_s']:.1f} s (dtype {jnp.dtype(dtype).name}){extra}", file=sys.stderr)
    return 0


def _cmd_crosscheck(args) -> int:
    from qnext_jax.crosscheck import crosscheck

    ids = _token_ids(args.token_ids) if args.token_ids else None
    with _one_line_errors():
        try:
            report = crosscheck(args.hf_dir, token_ids=ids)
        except ModuleNotFoundError as e:
            raise SystemExit(f"needs torch and transformers ({e}): pip install "
                             "-e '.[crosscheck]'") from None
    print(report.table())
    return 0 if report.ok else 1


def _cmd_finetune(args) -> int:
    from qnext_jax.train.optimizer import OptimizerConfig
    from qnext_jax.train.run import finetune
    from qnext_jax.train.step import TrainConfig

    _check_impls(args.gdn_impl)
    mesh = _mesh_from_args(args)
    with _one_line_errors(), _exit_on_interrupt():
        opt = OptimizerConfig(
            learning_rate=args.lr, warmup_steps=args.warmup_steps,
            total_steps=args.total_steps or args.steps, min_lr_ratio=args.min_lr_ratio,
            weight_decay=args.weight_decay,
            clip_norm=args.clip_norm if args.clip_norm > 0 else None, train=args.train)
        train = TrainConfig(
            compute_dtype=args.dtype, remat=args.remat, grad_accum=args.grad_accum,
            aux_coef=args.aux_coef, mtp_coef=args.mtp_coef, gdn_impl=args.gdn_impl,
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, scan_layers=args.scan_layers,
            **({"lora_targets": args.lora_targets} if args.lora_targets else {}))
        result = finetune(args.checkpoint, args.data, args.out, steps=args.steps,
                          batch_size=args.batch_size, seq_len=args.seq_len,
                          max_segments=args.max_segments, opt=opt, train=train, seed=args.seed,
                          save_every=args.save_every, keep=args.keep, mesh=mesh,
                          export_hf=args.export_hf, tensorboard=args.tensorboard,
                          save_dtype=args.save_dtype)
    print(json.dumps({"steps": result["steps"], "final": str(result["final"]),
                      "hf": None if result["hf"] is None else str(result["hf"]),
                      "resumed_from": result["resumed_from"], **{
                          k: v for k, v in result["metrics"].items() if k != "step"}}))
    return 0


GDN_IMPL_HELP = (
    "Gated DeltaNet backend: auto (the Triton kernels on a GPU, the Mosaic TPU ones on a TPU, "
    "the jnp reference elsewhere and for head dims the kernels do not take; the environment "
    "variable PALLAS_GDN_IMPL overrides it), reference, pallas_triton, pallas_tpu, or "
    "pallas_mosaic_gpu (Hopper: the forward's state pass in one Mosaic GPU kernel for bf16 / "
    "f16, everything else the Triton kernels, the backward included; slower than pallas_triton "
    "on an H200)")


def build_parser() -> argparse.ArgumentParser:
    from pallas_kernels.gated_delta_rule import IMPLS
    from qnext_jax.generate import DECODE_STEPS_PER_CALL
    from qnext_jax.modeling.attention import ATTN_IMPLS
    from qnext_jax.modeling.moe import MOE_IMPLS

    p = argparse.ArgumentParser(prog="qnext", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    add_parser = functools.partial(sub.add_parser, formatter_class=_DefaultsHelpFormatter)

    c = add_parser("convert", help="HF safetensors checkpoint -> Orbax checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out_dir")
    c.add_argument("--dtype", default=None, choices=_DTYPES,
                   help="cast the weights to this dtype (default: keep the checkpoint's)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an earlier `qnext convert` output in out_dir (refused when it "
                        "holds other files)")
    c.set_defaults(fn=_cmd_convert)

    e = add_parser("export", help="Orbax checkpoint -> HF safetensors checkpoint")
    e.add_argument("orbax_dir")
    e.add_argument("hf_dir")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an earlier `qnext export` output in hf_dir (refused when it "
                        "holds other files)")
    e.set_defaults(fn=_cmd_export)

    g = add_parser("generate", help="generate text (no --checkpoint: the tiny demo model)")
    g.add_argument("--checkpoint", help="Orbax checkpoint dir from `qnext convert` (or HF dir)")
    g.add_argument("--prompt", help="prompt text (tokenized with the checkpoint's "
                   "tokenizer.json; bytes for the demo model)")
    g.add_argument("--token-ids", help="prompt as token ids, e.g. '1,2,3'")
    g.add_argument("--prompts-file", default=None,
                   help='a batch of prompts, JSON Lines: one object a line, {"prompt": TEXT} '
                        'or {"token_ids": [IDS]} (with --chat "prompt" is the user message, '
                        'an optional "system" its system message); generated as one '
                        "left-padded batch, printed per prompt when done (--json: a \"results\" "
                        "list); --system is the system message of lines without one")
    g.add_argument("--max-new-tokens", type=_POSITIVE_INT, default=32,
                   help="tokens to generate")
    g.add_argument("--temperature", default=0.0, help="sampling temperature; 0 = greedy",
                   type=_bounded(float, lambda t: t >= 0, "a number >= 0"))
    g.add_argument("--top-k", type=_POSITIVE_INT, default=None,
                   help="sample from the k most likely tokens (default: off)")
    g.add_argument("--top-p", default=None, help="nucleus sampling mass (default: off)",
                   type=_bounded(float, lambda p: 0 < p <= 1, "a number in (0, 1]"))
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--dtype", default=None, choices=_DTYPES,
                   help="compute/param dtype (default: the checkpoint's)")
    g.add_argument("--gdn-impl", default="auto", choices=IMPLS, help=GDN_IMPL_HELP)
    g.add_argument("--moe-impl", default="auto",
                   choices=(*MOE_IMPLS, "tokamax:mosaic", "tokamax:triton", "tokamax:xla"),
                   help="routed experts' implementation (default auto: by platform and token "
                        "count; gather_pallas: the GPU decode kernels; gather "
                        "and gather_pallas serve decode steps, prefills run auto's choice; "
                        "tokamax[:mosaic|:triton|:xla]: tokamax's grouped matmul (the gpu "
                        "extra), its own choice or one of its kernels, mosaic and triton on a "
                        "GPU)")
    g.add_argument("--attn-impl", default="auto", choices=ATTN_IMPLS,
                   help="the prompt's softmax attention over the cache: xla (einsum softmax), "
                        "tokamax (tokamax's flash attention on a GPU: Mosaic GPU on Hopper, "
                        "else Triton), tokamax:mosaic or tokamax:triton (that kernel); default "
                        "auto: tokamax for bf16/fp16 on a GPU when installed, else xla")
    g.add_argument("--json", action="store_true",
                   help="print one JSON result (token_ids, text, timings) instead of streaming")
    g.add_argument("--chat", action="store_true",
                   help="render --prompt as a user message with the checkpoint's chat template "
                        "(generation prompt added) and stop at the template's end tokens")
    g.add_argument("--system", default=None, help="system message for --chat")
    g.add_argument("--rope-scaling", default=None,
                   help="override rope_scaling, e.g. 'yarn:factor=4,"
                        "original_max_position_embeddings=262144' or a JSON object")
    g.add_argument("--prefill-chunk-size", default=None,
                   type=_bounded(int, lambda n: n >= 1, "a positive integer"),
                   help="feed the prompt in chunks of this many tokens (bounded memory)")
    g.add_argument("--speculative-tokens", type=_NONNEGATIVE_INT, default=0,
                   help="draft N tokens per step with the MTP head (greedy only)")
    g.add_argument("--decode-steps-per-call", type=_POSITIVE_INT, default=None,
                   help="decode steps run on the device per call (an on-device loop: the host "
                        "dispatches and waits once per that many tokens; text streams in "
                        f"bursts of up to that many; default {DECODE_STEPS_PER_CALL}); not "
                        "with --speculative-tokens, which runs one verify round a call")
    g.add_argument("--scan-layers", action="store_true",
                   help="run the layers as a scan over the repeating block of the layer pattern "
                        "(params and cache stacked per block): compile time of prefill and "
                        "decode flat in depth")
    g.add_argument("--mesh", default=None, type=_MESH_SPEC,
                   help="shard over a device mesh, e.g. 'data=2,expert=4' (axes data, fsdp, "
                        "expert, tensor; the sizes multiply to the device count)")
    g.add_argument("--coordinator", default=None,
                   help="multi-host: host:port of process 0 (or env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None,
                   help="multi-host: number of processes (or env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None,
                   help="multi-host: this process's index (or env JAX_PROCESS_ID)")
    _add_compilation_cache(g)
    g.set_defaults(fn=_cmd_generate)

    f = add_parser("finetune", help="fine-tune a checkpoint on JSONL / text data",
                   description="Fine-tune (AdamW, warmup + cosine) on packed documents; "
                               "rerun with the same --out to resume. Writes OUT/checkpoints, "
                               "OUT/metrics.jsonl and OUT/final (qnext export OUT/final HF).")
    f.add_argument("--checkpoint", required=True,
                   help="converted (qnext convert) or HF checkpoint dir, with tokenizer.json")
    f.add_argument("--data", required=True,
                   help="JSONL ('text' or chat 'messages' per line), a text file, or a dir")
    f.add_argument("--out", required=True, help="output dir (resumed when it has checkpoints)")
    f.add_argument("--steps", type=_POSITIVE_INT, required=True,
                   help="optimizer steps of the whole run")
    f.add_argument("--batch-size", type=_POSITIVE_INT, default=8, help="packed rows per step")
    f.add_argument("--seq-len", type=_POSITIVE_INT, default=2048, help="tokens per packed row")
    f.add_argument("--max-segments", type=_bounded(int, lambda n: n >= 2, "an integer >= 2"),
                   default=16, help="at most this many - 1 documents per packed row")
    f.add_argument("--lr", type=_POSITIVE_FLOAT, default=1e-5, help="peak learning rate")
    f.add_argument("--warmup-steps", type=_NONNEGATIVE_INT, default=0,
                   help="steps of linear warmup from 0 to --lr")
    f.add_argument("--total-steps", type=_POSITIVE_INT, default=None,
                   help="length of the cosine schedule (default: --steps)")
    f.add_argument("--min-lr-ratio", default=0.1,
                   type=_bounded(float, lambda x: 0 <= x <= 1, "a number in [0, 1]"),
                   help="the cosine ends at --lr times this")
    f.add_argument("--weight-decay", type=_NONNEGATIVE_FLOAT, default=0.0,
                   help="decoupled weight decay, on matrices only")
    f.add_argument("--clip-norm", type=_NONNEGATIVE_FLOAT, default=1.0,
                   help="global-norm clip; 0: off")
    f.add_argument("--grad-accum", type=_POSITIVE_INT, default=1, help="micro-batches per step")
    f.add_argument("--train", default="all",
                   help="params to train: all | attention | experts | mlp | router | norms | "
                        "lm_head | mtp (join with '+'), or 're:REGEX'")
    f.add_argument("--dtype", default="bfloat16", choices=_DTYPES,
                   help="compute dtype (params stay float32)")
    f.add_argument("--save-dtype", default=None, choices=_DTYPES,
                   help="dtype of OUT/final's params (default: float32)")
    f.add_argument("--remat", default="none", choices=("none", "full", "dots"),
                   help="per-layer rematerialisation")
    f.add_argument("--scan-layers", action="store_true",
                   help="run the layers as a scan over the repeating block of the layer pattern "
                        "(compile time flat in depth); OUT/final keeps the per-layer layout, "
                        "resume with the same setting")
    f.add_argument("--aux-coef", type=float, default=None,
                   help="router load-balancing coefficient (default: config's)")
    f.add_argument("--mtp-coef", type=float, default=0.0, help="MTP loss weight; 0: off")
    f.add_argument("--gdn-impl", default="auto", choices=IMPLS, help=GDN_IMPL_HELP)
    f.add_argument("--lora-rank", type=_NONNEGATIVE_INT, default=0,
                   help="train LoRA adapters of this rank on the projections (0: full "
                        "fine-tuning); merged into OUT/final")
    f.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale = alpha / rank")
    f.add_argument("--lora-targets", default=None,
                   help="regex over param paths of the adapted kernels (default: every "
                        "attention, GDN, MLP and expert projection)")
    f.add_argument("--seed", type=int, default=0, help="data order and RNG seed")
    f.add_argument("--save-every", type=_POSITIVE_INT, default=100,
                   help="checkpoint every N steps")
    f.add_argument("--keep", type=_POSITIVE_INT, default=3,
                   help="checkpoints kept (the newest is what a rerun resumes from)")
    f.add_argument("--export-hf", action="store_true",
                   help="also write OUT/hf (HF safetensors, loadable by transformers)")
    f.add_argument("--tensorboard", action="store_true",
                   help="also log to OUT/tensorboard (needs tensorboardX or torch's)")
    f.add_argument("--mesh", default=None, type=_MESH_SPEC,
                   help="shard over a device mesh, e.g. 'fsdp=4,expert=2'")
    f.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0")
    f.add_argument("--num-processes", type=int, default=None,
                   help="multi-host: number of processes")
    f.add_argument("--process-id", type=int, default=None,
                   help="multi-host: this process's index")
    _add_compilation_cache(f)
    f.set_defaults(fn=_cmd_finetune)

    x = add_parser("crosscheck", help="compare layer by layer with transformers")
    x.add_argument("hf_dir")
    x.add_argument("--token-ids", help="input token ids (default: random)")
    x.set_defaults(fn=_cmd_crosscheck)
    return p


def _attach_token_ids(argv: list[str]) -> list[str]:
    """``--token-ids -1,2`` as ``--token-ids=-1,2``: argparse reads a value that starts with "-"
    and is not a plain negative number as an option, and would fail with "expected one
    argument" instead of naming the bad id."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--token-ids" and i + 1 < len(argv) and argv[i + 1].startswith("-") \
                and re.fullmatch(r"[-\d,\s]+", argv[i + 1]):
            out.append(f"--token-ids={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _add_compilation_cache(parser) -> None:
    parser.add_argument("--compilation-cache", default="auto", metavar="DIR",
                        help="keep compiled programs here, so that a rerun skips XLA's compile "
                             "(minutes for the 80B): auto = JAX_COMPILATION_CACHE_DIR when set, "
                             "else $XDG_CACHE_HOME/qnext-jax/xla (~/.cache without it); "
                             "none = off")


def _use_compilation_cache(where: str) -> None:
    """``--compilation-cache``: JAX's persistent compilation cache in ``where`` ("none": off;
    "auto": a cache directory already configured (JAX_COMPILATION_CACHE_DIR, or set by the
    calling program) else ``$XDG_CACHE_HOME/qnext-jax/xla``, ``~/.cache`` without XDG). Programs
    that compile in under a second are not stored (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
    sets another bound)."""
    import os

    import jax

    if where == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if where == "auto":
        if jax.config.jax_compilation_cache_dir:
            return
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        where = os.path.join(base, "qnext-jax", "xla")
    where = os.path.expanduser(where)
    if os.path.exists(where) and not os.path.isdir(where):
        raise SystemExit(f"--compilation-cache: {where} is not a directory (a directory to "
                         "keep compiled programs in, or none)")
    jax.config.update("jax_compilation_cache_dir", where)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# What to lower when a command runs out of device memory.
_MEMORY_HINTS = {
    "finetune": "lower --batch-size or --seq-len, or use --remat full, --grad-accum, --lora-rank "
                "or a --mesh over more devices",
    "generate": "lower the batch (--prompts-file), --max-new-tokens or --prefill-chunk-size, or "
                "use --dtype bfloat16 or a --mesh over more devices",
}


def _out_of_memory(e: Exception, command: str) -> bool:
    """Whether ``e`` is XLA's out-of-memory error (RESOURCE_EXHAUSTED) in a command that
    names what to lower."""
    return command in _MEMORY_HINTS and "RESOURCE_EXHAUSTED" in str(e)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_attach_token_ids(argv))
    try:
        if hasattr(args, "compilation_cache"):
            _use_compilation_cache(args.compilation_cache)
        return args.fn(args)
    except RuntimeError as e:  # jax.errors.JaxRuntimeError among them
        if not _out_of_memory(e, args.command):
            raise
        first = str(e).strip().splitlines()[0][:300]
        raise SystemExit(f"qnext {args.command}: out of device memory ({first}): "
                         f"{_MEMORY_HINTS[args.command]}") from None
    except SystemExit as e:  # every command's one-line errors start "qnext <command>: "
        if isinstance(e.code, str) and not e.code.startswith("qnext "):
            raise SystemExit(f"qnext {args.command}: {e.code}") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
