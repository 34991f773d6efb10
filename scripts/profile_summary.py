#!/usr/bin/env python3
"""Where a profiled stretch of device time goes: the kernels of a ``jax.profiler`` trace.

    python scripts/profile_summary.py PROFILE_DIR [--steps N] [--top 25] [--out summary.json]

PROFILE_DIR is the ``log_dir`` given to ``jax.profiler.trace(log_dir, create_perfetto_trace=True)``
(scripts/bench_model.py ``--profile`` writes one per decode batch); the newest
``perfetto_trace.json.gz`` under it is read. Only events on device processes count (process
names starting with ``/device:``): per kernel name, the calls, total and mean time and the share
of busy time; then the device's busy time (the union of its kernels' intervals), its span (first
kernel start to last kernel end) and the idle share of that span. A large idle share with many
short kernels means the step is bound by kernel launches and their gaps, not by bytes or FLOPs.
``--steps``: the number of steps the trace holds, to print per-step figures as well.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path


def newest_trace(log_dir: str) -> Path:
    """The newest ``perfetto_trace.json.gz`` under ``log_dir``. Raises FileNotFoundError."""
    traces = sorted(Path(log_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir!r}: profile with "
                                "jax.profiler.trace(log_dir, create_perfetto_trace=True)")
    return traces[-1]


def device_events(trace: dict, prefix: str = "/device:") -> list[tuple[str, float, float]]:
    """(name, start µs, duration µs) of the complete events of the processes whose name starts
    with ``prefix`` (the devices' by default)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device_pids = {e["pid"] for e in events if e.get("ph") == "M"
                   and e.get("name") == "process_name"
                   and str(e["args"].get("name", "")).startswith(prefix)}
    return [(e["name"], float(e["ts"]), float(e.get("dur", 0.0))) for e in events
            if e.get("ph") == "X" and e.get("pid") in device_pids]


def busy_time(events) -> float:
    """Length (µs) of the union of the events' [start, start + dur) intervals."""
    total, end = 0.0, float("-inf")
    for _, ts, dur in sorted(events, key=lambda e: e[1]):
        if ts >= end:
            total += dur
            end = ts + dur
        elif ts + dur > end:
            total += ts + dur - end
            end = ts + dur
    return total


def summarize(events, top: int) -> dict:
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for name, _, dur in events:
        by_name[name][0] += 1
        by_name[name][1] += dur
    busy = busy_time(events)
    span = (max(ts + dur for _, ts, dur in events) - min(ts for _, ts, _ in events)
            if events else 0.0)
    kernels = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {"kernels": len(events), "distinct": len(by_name), "busy_us": busy, "span_us": span,
            "idle_share": 1 - busy / span if span else 0.0,
            "top": [{"name": n, "calls": c, "total_us": t, "mean_us": t / c,
                     "share_of_busy": t / busy if busy else 0.0}
                    for n, (c, t) in kernels[:top]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log_dir")
    p.add_argument("--steps", type=int, default=1, help="steps in the trace (per-step figures)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--process", default="/device:",
                   help="count the processes whose name starts with this (/host:CPU on a CPU)")
    p.add_argument("--out", default=None, help="write the summary as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    path = newest_trace(args.log_dir)
    with gzip.open(path) as f:
        events = device_events(json.load(f), args.process)
    res = {"trace": str(path), "steps": args.steps, **summarize(events, args.top)}
    n = args.steps
    print(f"{path}\n{res['kernels']} kernels ({res['kernels'] / n:.0f} a step, "
          f"{res['distinct']} distinct); busy {res['busy_us'] / n / 1e3:.3f} ms a step of a "
          f"{res['span_us'] / n / 1e3:.3f} ms span: {100 * res['idle_share']:.0f}% idle")
    print(f"{'calls':>7} {'total ms':>9} {'mean us':>8} {'busy':>6}  kernel")
    for k in res["top"]:
        print(f"{k['calls']:7d} {k['total_us'] / 1e3:9.3f} {k['mean_us']:8.1f} "
              f"{100 * k['share_of_busy']:5.1f}%  {k['name'][:100]}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
