"""scripts/profile_summary.py on a synthetic perfetto trace and on a real CPU profile."""

import gzip
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import profile_summary  # noqa: E402


def _write(tmp_path, events):
    run = tmp_path / "plugins" / "profile" / "run1"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_busy_span_idle_and_top_kernels(tmp_path, capsys):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    kern = lambda name, ts, dur, pid=1: {"ph": "X", "name": name, "pid": pid, "tid": 7, "ts": ts,
                                         "dur": dur}
    # Device: a [0, 10), b [5, 20) overlapping (union 20 us), a [40, 50); span 50 us.
    events = meta + [kern("a", 0, 10), kern("b", 5, 15), kern("a", 40, 10),
                     kern("host_only", 0, 1000, pid=2)]
    _write(tmp_path, events)
    out = tmp_path / "s.json"
    assert profile_summary.main([str(tmp_path), "--steps", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["kernels"], res["distinct"]) == (3, 2)
    assert res["busy_us"] == pytest.approx(30.0) and res["span_us"] == pytest.approx(50.0)
    assert res["idle_share"] == pytest.approx(0.4)
    assert [(k["name"], k["calls"], k["total_us"]) for k in res["top"]] == [("a", 2, 20.0),
                                                                           ("b", 1, 15.0)]
    assert "2 a step" in capsys.readouterr().out


def test_cpu_profile_and_missing_trace(tmp_path):
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        f(x).block_until_ready()
    path = profile_summary.newest_trace(str(tmp_path))
    with gzip.open(path) as fh:
        events = profile_summary.device_events(json.load(fh), "/host:")
    assert events and all(dur >= 0 for _, _, dur in events)
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace=True"):
        profile_summary.newest_trace(str(tmp_path / "empty"))
