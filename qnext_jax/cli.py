"""The ``qnext`` command: convert | export | generate | crosscheck."""

from __future__ import annotations

import argparse
import json
import sys


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit(f"--token-ids: expected integers separated by commas or spaces, "
                         f"got {text!r}") from None
    if not ids:
        raise SystemExit("--token-ids: no token ids given")
    return ids


def _cmd_convert(args) -> int:
    from qnext_jax.convert import hf_to_orbax

    hf_to_orbax(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.out_dir}")
    return 0


def _cmd_export(args) -> int:
    from qnext_jax.convert import orbax_to_hf

    orbax_to_hf(args.orbax_dir, args.hf_dir)
    print(f"wrote {args.hf_dir}")
    return 0


def _cmd_generate(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    from qnext_jax.generate import Generator
    from qnext_jax.tokenizer import ByteTokenizer, load_tokenizer

    if args.checkpoint is None:
        from qnext_jax.demo import demo_model

        config, params = demo_model()
        tokenizer = ByteTokenizer()
        print("[qnext] no --checkpoint: using the built-in tiny demo model (random weights, "
              "byte vocabulary; its text is noise)", file=sys.stderr)
    else:
        from qnext_jax.convert import load

        config, params = load(args.checkpoint, dtype=args.dtype)
        tokenizer = load_tokenizer(args.checkpoint)
    if args.token_ids is not None:
        ids = _token_ids(args.token_ids)
    elif args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"{args.checkpoint} has no tokenizer.json: pass --token-ids instead "
                             "of --prompt")
        ids = tokenizer.encode(args.prompt)
    else:
        raise SystemExit("give --prompt TEXT or --token-ids IDS")
    if max(ids) >= config.vocab_size or min(ids) < 0:
        raise SystemExit(f"token ids must be in [0, vocab_size = {config.vocab_size}), got "
                         f"{min(ids)}..{max(ids)}")
    dtype = params["embed_tokens"]["embedding"].dtype
    gen = Generator(config, dtype=dtype, gdn_impl=args.gdn_impl)
    result = gen.generate(params, np.asarray([ids], np.int32), max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed)
    new_ids = result.tokens[0].tolist()
    eos = set(config.eos_token_ids)
    if eos and any(t in eos for t in new_ids):
        new_ids = new_ids[:next(i for i, t in enumerate(new_ids) if t in eos) + 1]
    text = tokenizer.decode(new_ids) if tokenizer is not None else None
    if args.json:
        print(json.dumps({"prompt_ids": ids, "token_ids": new_ids, "text": text,
                          "compile_s": result.compile_s, "prefill_s": result.prefill_s,
                          "decode_s": result.decode_s,
                          "prefill_tokens_per_s": result.prefill_tokens_per_s,
                          "decode_tokens_per_s": result.decode_tokens_per_s}))
        return 0
    print(text if text is not None else " ".join(map(str, new_ids)))
    print(f"[qnext] prompt {len(ids)} tokens, generated {len(new_ids)}; "
          f"prefill {result.prefill_tokens_per_s:.1f} tok/s, decode "
          f"{result.decode_tokens_per_s:.1f} tok/s, compile {result.compile_s:.1f} s "
          f"(dtype {jnp.dtype(dtype).name})", file=sys.stderr)
    return 0


def _cmd_crosscheck(args) -> int:
    from qnext_jax.crosscheck import crosscheck

    ids = _token_ids(args.token_ids) if args.token_ids else None
    report = crosscheck(args.hf_dir, token_ids=ids)
    print(report.table())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qnext", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="HF safetensors checkpoint -> Orbax checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out_dir")
    c.add_argument("--dtype", default=None, help="cast weights (e.g. bfloat16); default: keep")
    c.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    c.set_defaults(fn=_cmd_convert)

    e = sub.add_parser("export", help="Orbax checkpoint -> HF safetensors checkpoint")
    e.add_argument("orbax_dir")
    e.add_argument("hf_dir")
    e.set_defaults(fn=_cmd_export)

    g = sub.add_parser("generate", help="generate text (no --checkpoint: the tiny demo model)")
    g.add_argument("--checkpoint", help="Orbax checkpoint dir from `qnext convert` (or HF dir)")
    g.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer.json)")
    g.add_argument("--token-ids", help="prompt as token ids, e.g. '1,2,3'")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default=None, help="compute/param dtype (default: checkpoint's)")
    g.add_argument("--gdn-impl", default="auto", help="Gated DeltaNet backend")
    g.add_argument("--json", action="store_true", help="print a JSON result")
    g.set_defaults(fn=_cmd_generate)

    x = sub.add_parser("crosscheck", help="compare layer by layer with transformers")
    x.add_argument("hf_dir")
    x.add_argument("--token-ids", help="input token ids (default: random)")
    x.set_defaults(fn=_cmd_crosscheck)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
