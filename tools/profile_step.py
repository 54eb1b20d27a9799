"""Where a decode step's time goes on the device: kernels, their sum, and the idle gaps.

Builds the engine's runner for a preset shape (random weights), fills R decode requests of
``--ctx`` tokens, warms the decode executable, then records ``--steps`` steps with
``jax.profiler`` and reads the trace back in-process (``jax.profiler.ProfileData``; nothing
else to install). Prints, per step: host wall time, the span from the first kernel's start
to the last kernel's end, the summed kernel time (busy), the kernel count, and the kernels
that take the most time, grouped by kind (attention, matmul, fusion, copy, other).

    python tools/profile_step.py --model preset:llama3.2-1b --reqs 8 --ctx 1024 --out /tmp/prof

On CPU it still runs (the trace has no device plane; only host wall time is printed).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import decode_step_fn  # noqa: E402  (tools/ is not a package)

KINDS = (("attention", ("jaxpage_",)), ("collective", ("nccl", "all_reduce", "allreduce",
                                                       "all-reduce", "all_gather", "one_shot")),
         ("matmul", ("gemm", "cutlass", "cublas", "nvjet", "sm90")),
         ("copy", ("memcpy", "memset", "copy")), ("fusion", ("fusion", "loop_", "input_")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def device_kernels(trace_dir: str):
    """(name, start_ns, duration_ns) of every kernel on the first GPU's streams of the newest
    trace (with tensor parallelism every device runs the same program)."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        return []
    data = jax.profiler.ProfileData.from_file(files[-1])
    gpus = sorted(p.name for p in data.planes if p.name.startswith("/device:GPU"))
    lines = [line for plane in data.planes if gpus and plane.name == gpus[0]
             for line in plane.lines]
    # Kernels sit on the "Stream #N" lines; the other lines (XLA Modules / Ops) are summaries.
    streams = [line for line in lines if line.name.startswith("Stream")] or lines
    events = [(ev.name, ev.start_ns, ev.duration_ns) for line in streams for ev in line.events]
    print("device trace lines:", sorted({line.name for line in lines}), flush=True)
    return sorted(events, key=lambda e: e[1])


def summarize(events, steps: int, host_ms: float) -> dict:
    out = dict(host_ms_per_step=host_ms, kernels=len(events))
    if not events:
        return out
    span = (events[-1][1] + events[-1][2] - events[0][1]) / 1e6
    busy = sum(e[2] for e in events) / 1e6
    by_name = collections.Counter()
    by_kind = collections.Counter()
    for name, _, dur in events:
        by_name[name] += dur
        by_kind[kind_of(name)] += dur
    out.update(span_ms_per_step=span / steps, busy_ms_per_step=busy / steps,
               kernels_per_step=len(events) / steps,
               by_kind_ms_per_step={k: v / 1e6 / steps for k, v in by_kind.most_common()},
               top=[(n[:90], round(v / 1e6 / steps, 4)) for n, v in by_name.most_common(15)])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="preset:llama3.2-1b")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backend", default="pallas")
    p.add_argument("--reqs", type=int, default=8)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    p.add_argument("--out", default="profile_step_out")
    ns = p.parse_args(argv)
    os.makedirs(ns.out, exist_ok=True)
    step = decode_step_fn(ns.model, ns.dtype, ns.backend, ns.reqs, ns.ctx, ns.tp)
    for _ in range(3):
        step()
    trace_dir = os.path.join(ns.out, "trace")
    jax.profiler.start_trace(trace_dir)
    walls = []
    for _ in range(ns.steps):
        t = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t)
    jax.profiler.stop_trace()
    res = summarize(device_kernels(trace_dir), ns.steps, statistics.median(walls) * 1e3)
    res.update(model=ns.model, backend=ns.backend, reqs=ns.reqs, ctx=ns.ctx, tp=ns.tp,
               xla_flags=os.environ.get("XLA_FLAGS", ""),
               device=jax.devices()[0].device_kind, jax_version=jax.__version__)
    print(json.dumps(res, indent=1))
    with open(os.path.join(ns.out, "profile_step.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
