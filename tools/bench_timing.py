"""Timing for the kernel benchmarks (split out of ``bench_kernels.py``): the wall clock over
groups of back-to-back runs, and the GPU clock — the kernels' durations as the profiler
(CUPTI) records them — and the ceilings the kernels are divided by (``ceilings``). Method: shared/BENCHMARKS.md; why two clocks: docs/benchmarks/NOTES.md,
tenth pass."""

from __future__ import annotations

import gc
import glob
import gzip
import json
import math
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

GAP_US = 100.0  # idle time on the GPU that separates two profiled runs (``gpu_runs``)


def time_runs(fn, args, n_runs: int, warmup: int = 2, target_s: float = 3e-3) -> list[float]:
    """Seconds per ``fn(*args)``, one figure per group of back-to-back calls.

    Calls inside a group are dispatched asynchronously (the host stays ahead of the GPU), and
    only the group is bracketed by ``block_until_ready``: host dispatch and sync latency (tens
    of µs) are paid once per group, not once per call.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    group = int(min(10, max(1, math.ceil(target_s / (time.perf_counter() - t)))))
    times = []
    for _ in range(n_runs):
        t = time.perf_counter()
        outs = [fn(*args) for _ in range(group)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t) / group)
    return times


def bench_calls(call, qs, pools, n_runs: int = 20):
    """Median seconds per ``call(q, pool)``; ``len(qs)`` calls per jitted run, pools rotated."""
    n_inner = len(qs)

    @jax.jit
    def many(qs, pools):
        return [call(qs[i], pools[i % len(pools)]) for i in range(n_inner)]

    t_compile = time.perf_counter()
    jax.block_until_ready(many(qs, pools))
    t_compile = time.perf_counter() - t_compile
    times = time_runs(many, (qs, pools), n_runs)
    r = dict(n_inner=n_inner, n_runs=n_runs, compile_s=t_compile,
             **clock_summary("wall", [t / n_inner for t in times]))
    gpu = gpu_runs(many, (qs, pools), n_runs)
    if gpu:
        r.update(clock_summary("gpu", [t / n_inner for t in gpu]))
    return headline(r)


def clock_summary(clock, per_call):
    """``{clock}_us`` (median), ``{clock}_min_us`` and ``{clock}_spread`` of per-call seconds."""
    per_call = sorted(per_call)
    med = statistics.median(per_call)
    return {f"{clock}_us": med * 1e6, f"{clock}_min_us": per_call[0] * 1e6,
            f"{clock}_spread": (per_call[int(0.8 * len(per_call))] - per_call[0]) / med}


def headline(r):
    """``time_us`` / ``spread`` from the GPU clock where there is one, else the wall clock."""
    clock = "gpu" if "gpu_us" in r else "wall"
    r.update(time_us=r[f"{clock}_us"], min_us=r[f"{clock}_min_us"],
             spread=r[f"{clock}_spread"], clock=clock)
    return r


def gpu_runs(fn, args, n_runs: int = 20, gap_us: float = GAP_US,
             span: bool = False) -> list[float] | None:
    """Seconds of GPU time of each of ``n_runs`` runs of ``fn(*args)`` (already warm): the
    durations of the kernels (and copies) the profiler records on the GPU, summed per run. Runs
    are told apart by the idle time between them (each waits for the one before, so > ``gap_us``
    apart; within a run the kernels follow each other within a few µs). None where the profiler
    records nothing on a GPU (CPU, or no CUPTI) or the runs cannot be told apart (without the
    sleep between runs, calls of ~1 ms or more did not split, likely because the host's next
    dispatch followed the sync by less than the gap). ``span``: each run's first start to its
    last end instead of the sum, for runs whose kernels overlap (several streams)."""
    with tempfile.TemporaryDirectory() as logdir:
        try:
            with jax.profiler.trace(logdir, create_perfetto_trace=True):
                for _ in range(n_runs):
                    jax.block_until_ready(fn(*args))
                    time.sleep(4 * gap_us * 1e-6)  # the GPU idles between runs, always
        except Exception as e:  # no profiler here: the wall clock stands alone
            print(f"  profiler unavailable: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return None
        return split_runs(gpu_events(logdir), n_runs, gap_us, span)


def split_runs(events, n_runs: int, gap_us: float = GAP_US,
               span: bool = False) -> list[float] | None:
    """Seconds of GPU activity per run from (start, duration) events in µs, a new run starting
    after more than ``gap_us`` of idle time; None unless that makes exactly ``n_runs`` runs.
    The sum of the events' durations, or with ``span`` the run's first start to last end."""
    runs, starts, end = [], [], -math.inf
    for ts, dur in sorted(events):
        if ts - end > gap_us:
            if runs and span:
                runs[-1] = (end - starts[-1]) * 1e-6
            runs.append(0.0)
            starts.append(ts)
        runs[-1] += dur * 1e-6
        end = max(end, ts + dur)
    if runs and span:
        runs[-1] = (end - starts[-1]) * 1e-6
    return runs if len(runs) == n_runs else None


def gpu_events(logdir) -> list[tuple[float, float]]:
    """(start, duration) in µs of every event on a GPU in the profiler's Perfetto trace."""
    paths = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json*"), recursive=True)
    if not paths:
        return []
    with (gzip.open if paths[0].endswith(".gz") else open)(paths[0], "rb") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") ==
                "process_name" and "GPU" in str(e.get("args", {}).get("name", ""))}
    return [(e["ts"], e["dur"]) for e in events
            if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]


def ceilings(gib: float = 4.0):
    """HBM read (jnp.sum), copy (read + write) and bf16 matmul rates, on the GPU clock where
    there is one (as the kernels' times; ``*_wall``: the same on the wall clock)."""
    clocks = set()

    def seconds(fn, args):
        wall, gpu = time_runs(fn, args, 20), gpu_runs(fn, args)
        r = headline(dict(clock_summary("wall", wall),
                          **(clock_summary("gpu", gpu) if gpu else {})))
        clocks.add(r["clock"])
        return r["time_us"] * 1e-6, r["wall_us"] * 1e-6

    n = int(gib * 2**29)  # 4 GiB of bf16 by default
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    t, tw = seconds(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), (x,))
    out = dict(read_bw=n * 2 / t, read_bw_wall=n * 2 / tw)
    t, tw = seconds(jax.jit(lambda x: x + jnp.bfloat16(1)), (x,))
    out.update(copy_bw=2 * n * 2 / t, copy_bw_wall=2 * n * 2 / tw)
    del x
    gc.collect()
    m = 8192 if gib >= 1 else 512
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    t, tw = seconds(jax.jit(lambda a, b: a @ b), (a, b))
    out.update(matmul_flops=2 * m**3 / t, matmul_flops_wall=2 * m**3 / tw)
    return dict(out, clock="gpu" if clocks == {"gpu"} else "wall")
