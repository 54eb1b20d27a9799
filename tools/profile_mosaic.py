"""Where a Mosaic GPU ragged-kernel launch spends its time, per warpgroup role (Hopper GPU).

Mosaic GPU's profiler records the kernel's named regions (``ragged_mosaic.region``: Q in,
QKᵀ, wait for V, PV, output on the compute warpgroups; page ids, wait for a free slot, TMA
issue on the memory warpgroup) with the SM's global timer, per warpgroup. This runs one batch
of ``bench_kernels`` through the kernel with profiling on, then sums every region per role:

    python tools/profile_mosaic.py --batch decode:16:2048 --out /tmp/prof
    python tools/profile_mosaic.py --batch mixed --cfg '{"order": "lpt"}' --out /tmp/prof
    python tools/profile_mosaic.py --summarize /tmp/prof/*-trace.json   # no GPU work

Prints, per role (compute warpgroup 0, 1, memory warpgroup): region count, mean and total
µs, and the share of the warpgroups' lifetime; plus the CTAs' mean lifetime and the
launch's span. Timing with profiling on is a little slower than without (a few global-timer
reads per region); ``study_mosaic.py`` gives the clean times.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def summarize(path: str, num_wgs: int) -> dict:
    """Per-role region totals of one ``*-trace.json`` (Chrome trace: B/E events in µs)."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    stacks: dict[int, list] = collections.defaultdict(list)
    life: dict[int, list] = {}
    per_role: dict[int, dict] = collections.defaultdict(
        lambda: collections.defaultdict(lambda: [0, 0.0]))
    for e in events:
        tid, ts = e["tid"], e["ts"]
        span = life.setdefault(tid, [ts, ts])
        span[0], span[1] = min(span[0], ts), max(span[1], ts)
        if e["ph"] == "B":
            stacks[tid].append((e["name"], ts))
            continue
        name, t0 = stacks[tid].pop()
        assert name == e["name"], (name, e["name"])
        acc = per_role[(tid - 1) % num_wgs][name]
        acc[0] += 1
        acc[1] += ts - t0
    lifetimes = collections.defaultdict(list)
    for tid, (a, b) in life.items():
        lifetimes[(tid - 1) % num_wgs].append(b - a)
    starts = [a for a, _ in life.values()]
    ends = [b for _, b in life.values()]
    out = dict(span_us=max(ends) - min(starts), roles={})
    for role, regions in sorted(per_role.items()):
        total_life = sum(lifetimes[role])
        out["roles"][role] = dict(
            traces=len(lifetimes[role]), mean_life_us=total_life / len(lifetimes[role]),
            regions={name: dict(count=c, total_us=t, mean_us=t / c, share=t / total_life)
                     for name, (c, t) in sorted(regions.items(), key=lambda kv: -kv[1][1])})
    return out


def show(summary: dict, label: str) -> None:
    print(f"== {label}: launch span {summary['span_us']:.1f} us")
    for role, r in summary["roles"].items():
        print(f"  warpgroup {role}: {r['traces']} traces, mean life {r['mean_life_us']:.1f} us")
        for name, g in r["regions"].items():
            print(f"    {name:10s} n={g['count']:7d} mean {g['mean_us']:7.3f} us "
                  f"total {g['total_us']:10.1f} us  {100 * g['share']:5.1f}% of life")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="mixed",
                   help="mixed | prefill | decode:B:CTX (bench_kernels' batches)")
    p.add_argument("--cfg", default="{}", help="JSON kwargs of the Mosaic kernel")
    p.add_argument("--page", type=int, default=16, help="page size of the batch")
    p.add_argument("--out", default="profile_mosaic_out")
    p.add_argument("--wgs", type=int, default=3, help="warpgroups per CTA (q_tiles + 1)")
    p.add_argument("--summarize", nargs="+", default=None, metavar="TRACE_JSON")
    args = p.parse_args(argv)
    if args.summarize:
        for path in args.summarize:
            show(summarize(path, args.wgs), os.path.basename(path))
        return

    import jax
    import jax.numpy as jnp

    import bench_kernels as bk
    import study_mosaic

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.batch.startswith("decode"):
        _, batch, ctx = args.batch.split(":")
        num_pages, md = bk.decode_batch(int(batch), int(ctx), args.page)
        pool = bk.make_pools(num_pages, args.page, 1, 100)[0]
        q = bk.make_qs(int(batch), 1, 5)[0]
    else:
        md, q, pools, _ = bk.mixed_batch(args.page, seed=21)
        pool = pools[0]
        if args.batch == "prefill":
            md = dict(md, num_seqs=jnp.asarray([4], jnp.int32))
    cfg = json.loads(args.cfg)
    for _ in range(2):  # the second run's trace: compiled and warm
        jax.block_until_ready(study_mosaic.mosaic_call(md, profile_dir=out, **cfg)(q, pool))
    jax.effects_barrier()
    newest = max(glob.glob(os.path.join(out, "*-trace.json")), key=os.path.getmtime)
    summary = summarize(newest, args.wgs)
    summary.update(batch=args.batch, page=args.page, cfg=cfg, device=jax.devices()[0].device_kind,
                   jax_version=jax.__version__, trace=os.path.basename(newest))
    show(summary, f"{args.batch} {args.cfg}")
    name = f"summary_{args.batch.replace(':', '_')}_p{args.page}.json"
    with open(os.path.join(out, name), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
