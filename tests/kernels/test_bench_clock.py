"""``tools/bench_timing.py``'s GPU clock: runs told apart in a profiler trace (no GPU)."""

from __future__ import annotations

import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import bench_timing  # noqa: E402


def test_split_runs_sums_each_runs_kernels():
    # Two runs of three back-to-back kernels (µs), 400 µs of host turnaround between them.
    run = [(0.0, 10.0), (11.0, 200.0), (212.0, 5.0)]
    events = run + [(617.0 + t, d) for t, d in run]
    got = bench_timing.split_runs(events[::-1], 2)  # any order in the trace
    assert got == pytest.approx([215e-6, 215e-6])
    assert bench_timing.split_runs(events, 3) is None  # the runs must match what was run
    # A gap inside a run longer than the threshold splits it: then the count is wrong.
    assert bench_timing.split_runs(events, 2, gap_us=0.5) is None


def test_split_runs_span_counts_overlapping_kernels_once():
    # Two runs of two kernels on two streams: 100 µs and 80 µs overlapping by 60 µs.
    run = [(0.0, 100.0), (40.0, 80.0)]
    events = run + [(600.0 + t, d) for t, d in run]
    assert bench_timing.split_runs(events, 2) == pytest.approx([180e-6, 180e-6])
    assert bench_timing.split_runs(events, 2, span=True) == pytest.approx([120e-6, 120e-6])


def test_gpu_events_reads_only_gpu_processes(tmp_path):
    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "kernel", "ts": 5.0, "dur": 3.0},
        {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction", "ts": 0.0, "dur": 50.0},
        {"ph": "i", "pid": 1, "name": "marker", "ts": 6.0},
    ]}
    run_dir = tmp_path / "plugins" / "profile" / "run"
    run_dir.mkdir(parents=True)
    with gzip.open(run_dir / "perfetto_trace.json.gz", "wt") as f:
        json.dump(trace, f)
    assert bench_timing.gpu_events(str(tmp_path)) == [(5.0, 3.0)]
    assert bench_timing.gpu_events(str(tmp_path / "nothing")) == []


def test_gpu_runs_on_cpu_falls_back_to_none():
    import jax
    import jax.numpy as jnp

    fn = jax.jit(lambda x: x * 2)
    x = jnp.ones(8)
    fn(x)
    assert bench_timing.gpu_runs(fn, (x,), n_runs=2) is None  # no GPU in the trace
