#!/usr/bin/env python3
"""Time the router's three top-k forms (qnext_jax.modeling.moe: ``rank_top_k``,
``argmax_top_k`` and ``jax.lax.top_k``) on [rows, E] float32 probabilities, for the row counts
at which ``_top_k`` switches between them (RANK_TOP_K_MAX_ROWS, ARGMAX_TOP_K_MIN_ROWS).

    python scripts/bench_topk.py --out $OUT            # E 512, k 10 (the 80B router)

Each form runs inside one jitted, unrolled loop of --loop calls, each call's input nudged by
the last call's first weight (a one-element update, so no call can be skipped), loops queued
back to back: us per call, the loop's cost included; "loop only" is the same loop around a
form that does nothing but slice k columns, the floor under every form. Checks that the three
give the same experts and weights on ties-free random rows. Prints a table and writes
``bench_topk_<forms>.json`` under --out.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import queued_seconds

from qnext_jax.modeling.moe import argmax_top_k, rank_top_k

FORMS = {"rank": rank_top_k, "argmax": argmax_top_k, "top_k": jax.lax.top_k,
         "loop only": lambda p, k: (p[..., :k], jnp.zeros(p.shape[:-1] + (k,), jnp.int32))}


def per_call_seconds(form, probs, k: int, loop: int, rounds: int) -> float:
    """Seconds per call of ``form(probs, k)`` inside a jitted, unrolled loop of ``loop`` calls."""
    def body(_, p):
        weights, _ = form(p, k)
        return p.at[0, 0].add(1e-9 * weights[0, 0])

    fn = jax.jit(lambda p: jax.lax.fori_loop(0, loop, body, p, unroll=True))
    return queued_seconds(fn, probs, calls=rounds, best=True) / loop


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,1024,4096,16384")
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--forms", default=",".join(FORMS), help=f"some of {list(FORMS)}")
    p.add_argument("--loop", type=int, default=32, help="calls in one jitted loop")
    p.add_argument("--rounds", type=int, default=10, help="loops queued a round (5 rounds)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    k = args.top_k
    forms = {name: FORMS[name] for name in args.forms.split(",")}
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "experts": args.experts, "top_k": k, "loop": args.loop, "us_per_call": {}}
    print(f"{res['device']}, jax {res['jax']}: top-{k} of {args.experts}, us a call in a loop "
          f"of {args.loop}")
    print("| rows | " + " | ".join(forms) + " |")
    print("|---|" + "---|" * len(forms))
    for rows in [int(r) for r in args.rows.split(",") if r]:
        logits = jax.random.normal(jax.random.key(rows), (rows, args.experts), jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        want_w, want_e = jax.lax.top_k(probs, k)
        cells = {}
        for name, form in forms.items():
            if name != "loop only":
                w, e = jax.jit(form, static_argnums=1)(probs, k)
                if not (np.array_equal(e, want_e) and np.array_equal(w, want_w)):
                    raise SystemExit(f"{name} disagrees with lax.top_k at {rows} rows")
            cells[name] = per_call_seconds(form, probs, k, args.loop, args.rounds) * 1e6
        res["us_per_call"][str(rows)] = cells
        print(f"| {rows} | " + " | ".join(f"{v:.1f}" for v in cells.values()) + " |")
        with open(os.path.join(args.out, f"bench_topk_{'_'.join(forms)}.json".replace(" ", "_")),
                  "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
