"""Timing and ceilings shared by the benchmarks under scripts/ (imported as ``bench_common``:
each script's own folder is on sys.path when it runs)."""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, *args, iters: int = 10, warmup: int = 2) -> float:
    """Median wall seconds of ``fn(*args)`` over ``iters`` calls, each blocked on, after
    ``warmup`` untimed calls (the first of which may compile)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def queued_seconds(fn, *args, calls: int = 20, repeats: int = 5, warmup: int = 2,
                   best: bool = False) -> float:
    """Median (``best``: minimum) over ``repeats`` of the wall seconds per call of ``calls``
    calls of ``fn(*args)`` queued back to back and blocked on once, after ``warmup`` blocked
    calls.

    The device time of a call, without the host's dispatch and synchronisation between calls:
    the quantity that ``triton.testing.do_bench`` (CUDA events around calls launched back to
    back) measures for PyTorch/Triton kernels, so the two can be compared. median_seconds
    (each call blocked on) adds the dispatch latency to every call instead.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t) / calls)
    return min(per_call) if best else statistics.median(per_call)


def error_text(e: Exception) -> str:
    """One line for a failed call's record: the exception's type and the first line of its
    message, cut to 300 characters."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def trace_calls(fn, *args, log_dir: str, calls: int = 5) -> None:
    """Trace ``calls`` blocked calls of ``fn(*args)`` (already compiled: call it once before)
    with ``jax.profiler`` into ``log_dir``, with a perfetto trace that
    scripts/profile_summary.py reads (``--steps calls`` for per-call figures)."""
    os.makedirs(log_dir, exist_ok=True)
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(fn(*args))


def measure_ceilings(iters: int = 10) -> dict:
    """This device's rates, measured now: a bf16 [n, n] @ [n, n] matmul on random data
    (TFLOP/s) and an elementwise pass over a float32 array (GB/s, bytes read + written).
    n = 8192 and 1 GiB on an accelerator; small sizes on the CPU (smoke runs). Each is the
    best of 5 rounds of ``iters`` calls queued back to back (a ceiling: what the device reached;
    the median of blocked calls read 2.2 to 3.4 TB/s for the copy across runs on one H200)."""
    on_cpu = jax.default_backend() == "cpu"
    n = 512 if on_cpu else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    t_mm = queued_seconds(jax.jit(lambda x, y: x @ y), a, b, calls=iters, best=True)
    x = jnp.ones((1 << (20 if on_cpu else 28),), jnp.float32)
    t_cp = queued_seconds(jax.jit(lambda v: v * 2.0), x, calls=iters, best=True)
    return {"bf16_matmul_tflops": 2 * n**3 / t_mm / 1e12,
            "copy_gb_per_s": 2 * x.size * x.dtype.itemsize / t_cp / 1e9}
