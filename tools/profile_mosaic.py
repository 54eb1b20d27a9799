"""Where a Mosaic GPU ragged-kernel launch spends its time, per warpgroup role (Hopper GPU).

Mosaic GPU's profiler records the kernel's named regions (``ragged_mosaic.region``: Q in,
QKᵀ, wait for V, PV, output on the compute warpgroups; page ids, wait for a free slot, TMA
issue on the memory warpgroup) with the SM's global timer, per warpgroup. This runs one batch
of ``bench_kernels`` through the kernel with profiling on, then sums every region per role:

    python tools/profile_mosaic.py --batch decode:16:2048 --out /tmp/prof
    python tools/profile_mosaic.py --batch mixed --cfg '{"order": "lpt"}' --out /tmp/prof
    python tools/profile_mosaic.py --batch mixed --regions q_in,out --out /tmp/tl   # timeline
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


def timeline(path: str, num_wgs: int) -> dict:
    """Items per SM from the "q_in" / "out" ranges of a ``--regions q_in,out`` trace (every
    other range off, so the profiler barely slows the kernel): a CTA's item runs from compute
    warpgroup 0's first Q load to its last output; it is a prefill item when warpgroup 1 loads
    a Q tile too (a decode leaves the second tile empty). Per SM: the idle time between one
    item's output and the next item's Q load (CTA exit, launch, set-up, scalar loads), then the
    launch's tail (from the first SM with no further item to the end)."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    ctas: dict[int, dict] = {}
    for e in events:
        block, wg = divmod(e["tid"] - 1, num_wgs)
        c = ctas.setdefault(block, dict(sm=e["pid"] - 1, start=None, end=None, tiles=set()))
        if e["name"] == "q_in" and e["ph"] == "B":
            c["tiles"].add(wg)
            if wg == 0:
                c["start"] = e["ts"] if c["start"] is None else min(c["start"], e["ts"])
        if e["name"] == "out" and e["ph"] == "E" and wg == 0:
            c["end"] = e["ts"] if c["end"] is None else max(c["end"], e["ts"])
    items = [dict(c, kind="prefill" if 1 in c["tiles"] else "decode") for c in ctas.values()
             if c["start"] is not None and c["end"] is not None]
    if not items:
        return {}
    t0 = min(i["start"] for i in items)
    t1 = max(i["end"] for i in items)
    by_sm = collections.defaultdict(list)
    for i in items:
        by_sm[i["sm"]].append(i)
    gaps, busy, last_end = [], [], []
    for seq in by_sm.values():
        seq.sort(key=lambda i: i["start"])
        gaps += [b["start"] - a["end"] for a, b in zip(seq, seq[1:])]
        busy.append(sum(i["end"] - i["start"] for i in seq))
        last_end.append(seq[-1]["end"])
    kinds = {}
    for kind in ("prefill", "decode"):
        d = [i["end"] - i["start"] for i in items if i["kind"] == kind]
        if d:
            kinds[kind] = dict(count=len(d), mean_us=sum(d) / len(d), total_us=sum(d))
    return dict(span_us=t1 - t0, sms=len(by_sm), items=len(items), kinds=kinds,
                mean_gap_us=sum(gaps) / max(len(gaps), 1), gaps_total_us=sum(gaps),
                busy_share=sum(busy) / (len(by_sm) * (t1 - t0)),
                tail_us=t1 - min(last_end))


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
    p.add_argument("--regions", default=None,
                   help="comma list: record only these ranges (q_in,out: the item timeline)")
    p.add_argument("--summarize", nargs="+", default=None, metavar="TRACE_JSON")
    args = p.parse_args(argv)
    if args.summarize:
        for path in args.summarize:
            show(summarize(path, args.wgs), os.path.basename(path))
            print("  timeline:", json.dumps(timeline(path, args.wgs)))
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
    if args.regions:
        cfg["profile_regions"] = tuple(args.regions.split(","))
    for _ in range(2):  # the second run's trace: compiled and warm
        jax.block_until_ready(study_mosaic.mosaic_call(md, profile_dir=out, **cfg)(q, pool))
    jax.effects_barrier()
    newest = max(glob.glob(os.path.join(out, "*-trace.json")), key=os.path.getmtime)
    summary = summarize(newest, args.wgs)
    summary.update(batch=args.batch, page=args.page, cfg=cfg, device=jax.devices()[0].device_kind,
                   jax_version=jax.__version__, trace=os.path.basename(newest))
    summary["timeline"] = timeline(newest, args.wgs)
    show(summary, f"{args.batch} {args.cfg}")
    print("  timeline:", json.dumps(summary["timeline"]))
    name = f"summary_{args.batch.replace(':', '_')}_p{args.page}.json"
    with open(os.path.join(out, name), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
