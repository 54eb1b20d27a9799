"""The Mosaic GPU (Hopper) ragged kernel beside the Triton-lowered one: one GPU call, one card.

Times, side by side in one run:
  * ceilings (HBM read, bf16 matmul);
  * the prefill half of ``bench_kernels``' mixed batch (4 chunks x 512, ctx 512..2048);
  * the full mixed batch (+ 60 decodes at ctx 2048): Triton default vs Mosaic configs;
  * decode-only batches (B x ctx): the Triton decode kernel vs the Mosaic kernel;
  * with ``--blocks``: uniform items (prefill: 32 new tokens, decode: 1) of b KV blocks each,
    four waves of them, and the straight line through T / waves = fixed + b * per block;
every candidate checked against the reference first (max error relative to max |ref|).

    python tools/study_mosaic.py --out /tmp/mosaic                # on a Hopper GPU
    python tools/study_mosaic.py --cfgs '{"d4": {"depth": 4}}'    # Mosaic candidates (JSON)
    python tools/study_mosaic.py --report docs/benchmarks/kernels_mosaic_runs.md runs/*.json

Writes ``mosaic.json`` and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402  (tools/ is not a package)
import study_prefill as sp  # noqa: E402

from jaxpage.kernels_pallas.gpu import ragged_mosaic  # noqa: E402

# The tuned default alone; candidates come with --cfgs (NOTES.md's passes name each one's).
DEFAULT_CFGS = {"default": {}}


def mosaic_call(md, **cfg):
    return lambda q, pool: ragged_mosaic.ragged_paged_attention(
        q, pool, md["kv_lens"], md["block_tables"], md["query_start_loc"], md["num_seqs"],
        sm_scale=bk.SM_SCALE, **cfg)


def timed(label, call, q, qs, pools, want, extra):
    """Check against ``want``, then time; one log line."""
    try:
        err = bk.rel_err(call(q, pools[0]), want) if want is not None else None
    except Exception as e:  # keep going; the record shows the failure
        bk.log(f"  {label} failed: {type(e).__name__}: {str(e)[:400]}")
        return dict(error=f"{type(e).__name__}: {str(e)[:400]}")
    r = sp.time_call(call, qs, pools)
    r["rel_err"] = err
    if "time_us" in r:
        r.update({k: f(r["time_us"]) for k, f in extra.items()})
    bk.log(f"  {label:22s} " + (f"{r['time_us']:8.1f} us err {err} "
                                + " ".join(f"{k}={r[k]:.3g}" for k in extra)
                                if "time_us" in r else r.get("error", "")))
    return r


def batch_rows(md, q, pools, cfgs, triton, extra):
    qs = (q,) + bk.make_qs(q.shape[0], 3, 77)
    want = bk.ref_call(md)(q, pools[0])
    rows = {"triton": timed("triton", triton, q, qs, pools, want, extra)}
    for label, cfg in cfgs.items():
        rows[label] = timed(label, mosaic_call(md, **cfg), q, qs, pools, want, extra)
        rows[label]["config"] = cfg
    return rows


def uniform_batch(batch, q_len, kv_len, page, seed=0, shared=False):
    """``bench_kernels.decode_batch`` with ``q_len`` new tokens per request; (metadata, pages
    in the pool). ``shared``: every request on the same pages, their K/V read from L2 after the
    first (the compute side alone)."""
    num_pages, md = bk.decode_batch(batch, -(-kv_len // page) * page, page, seed, q_len, shared)
    return dict(md, kv_lens=jnp.full((batch,), kv_len, jnp.int32)), num_pages


def item_costs(cfgs, blocks, page, waves=4, sms=132, shared=False):
    """Fixed and per-block cost of one item, by kind: ``waves`` x ``sms`` uniform items of b
    128-key blocks for each b, one CTA per item; least squares of T / waves on b
    (``shared``: every request on the same pages, see ``uniform_batch``)."""
    batch = waves * sms // bk.K
    out = {}
    for kind, q_len in (("prefill", 32), ("decode", 1)):
        rows = {}
        for b in blocks:
            md, num_pages = uniform_batch(batch, q_len, 128 * b, page, shared=shared)
            pools = bk.make_pools(num_pages, page, 1, 300 + b)
            q = bk.make_qs(batch * q_len, 1, 7)[0]
            bk.log(f"{kind} items, {b} blocks each: {batch * bk.K} items")
            rows[b] = batch_rows(md, q, pools, cfgs, bk.ours_ragged(md), {})
        fit = {}
        for label in ["triton", *cfgs]:
            pts = [(b, rows[b][label]["time_us"] / waves) for b in blocks
                   if "time_us" in rows[b][label]]
            if len(pts) >= 2:
                slope, fixed = np.polyfit(*zip(*pts), 1)
                fit[label] = dict(fixed_us=float(fixed), per_block_us=float(slope))
                bk.log(f"  {kind} {label}: fixed {fixed:.2f} us + {slope:.3f} us per block")
        out[kind] = dict(batch=batch, waves=waves, shared=shared, rows=rows, fit=fit)
    return out


def _rows(val):
    """(rows, floor µs or None) of one batch of a run: ``study_mosaic`` JSON ({"rows": ...,
    "floor_us": ...}, or the rows themselves) or an A/B run's (label -> list of repeated
    timings, one row each: "label #k")."""
    rows = val["rows"] if "rows" in val else val
    out = {}
    for label, row in rows.items():
        named = ([(f"{label} #{k + 1}", r) for k, r in enumerate(row)]
                 if isinstance(row, list) else [(label, row)])
        out.update({n: r for n, r in named
                    if isinstance(r, dict) and ("time_us" in r or "error" in r)})
    return out, val.get("floor_us")


def report(md_path, json_paths):
    """One Markdown table (+ a PNG of the mixed batch) over several ``mosaic.json`` runs."""
    runs = []
    for path in json_paths:
        with open(path) as f:
            runs.append((os.path.basename(path), json.load(f)))
    lines = ["| run | card | H | batch | floor µs | candidate | config | µs | clock | metric |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs:
        for key, val in r.items():
            if not key.startswith(("prefill_", "mixed_", "decode")) or not isinstance(val, dict):
                continue
            rows, floor = _rows(val)
            for label, row in rows.items():
                t = row.get("time_us", float("nan"))
                metric = next((f"{k} {row[k]:.3g}" for k in ("x_floor", "tflops", "pct_read_bw")
                               if k in row), row.get("error", "")[:60])
                if not metric and floor and "time_us" in row:
                    metric = f"x_floor {t / floor:.3g}"
                cfg = json.dumps(row.get("config", {}))
                lines.append(f"| {name} | {r['device']} | {r.get('head_dim', 128)} | {key} | "
                             f"{'' if floor is None else f'{floor:.1f}'} | {label} | `{cfg}` | "
                             f"{t:.1f} | {row.get('clock', 'wall')} | {metric} |")
    header = ""
    if os.path.exists(md_path):  # keep the hand-written header above the table
        with open(md_path) as f:
            header = f.read().split("| run | card |")[0]
    with open(md_path, "w") as f:
        f.write(header + "\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 8))
    xs, names = 0, []
    for name, r in runs:
        for key in [k for k in r if k.startswith(("mixed_", "prefill_"))]:
            rows = _rows(r[key])[0]
            labels = [k for k in rows if isinstance(rows[k], dict) and "time_us" in rows[k]]
            for j, label in enumerate(labels):
                if label not in names:
                    names.append(label)
                color = "tab:gray" if label == "triton" else plt.cm.tab20(names.index(label) % 20)
                ax.bar(xs + j * 0.8 / len(labels), rows[label]["time_us"], 0.8 / len(labels),
                       color=color, label=label if names.count(label) == 1 and
                       label not in ax.get_legend_handles_labels()[1] else None)
            ax.text(xs + 0.35, 5, f"{name[:-5]}\nH={r.get('head_dim', 128)} {key[:-4]}",
                    ha="center", fontsize=6, rotation=90, color="white")
            xs += 1
    ax.set_ylabel("µs (lower is better)")
    ax.set_xticks([])
    ax.legend(fontsize=6, ncol=8, bbox_to_anchor=(0.5, -0.02), loc="upper center")
    cards = " / ".join(sorted({r["device"] for _, r in runs}))
    ax.set_title("Ragged kernel: Triton lowering (gray) vs Mosaic GPU candidates, "
                 f"{cards} (compare within a run), JAX {runs[0][1]['jax_version']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.splitext(md_path)[0] + ".png", dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="study_mosaic_out")
    p.add_argument("--cfgs", default=None, help="JSON {label: kwargs} Mosaic candidates")
    p.add_argument("--pages", default="16", help="comma list of page sizes for the batches")
    p.add_argument("--time-budget", type=float, default=480.0)
    p.add_argument("--skip", default="", help="comma list of: prefill,mixed,decode")
    p.add_argument("--head-dim", type=int, default=128, help="H (N/K stay 32/8)")
    p.add_argument("--decode", default="16x2048,64x2048,256x2048",
                   help="comma list of BxCTX decode-only batches")
    p.add_argument("--blocks", default=None,
                   help="comma list of KV blocks per item: uniform-item fit instead of batches")
    p.add_argument("--shared", action="store_true",
                   help="with --blocks: every request on the same pages (K/V from L2)")
    p.add_argument("--once", default=None, metavar="JSON",
                   help="no timing: one call of the mixed batch (page 16) through the Mosaic "
                        "kernel with these kwargs, for a profiler (ncu) to catch")
    p.add_argument("--report", nargs="+", default=None, metavar=("OUT_MD", "JSON"),
                   help="no GPU work: tabulate mosaic.json runs into OUT_MD (+ .png)")
    args = p.parse_args(argv)
    if args.report:
        report(args.report[0], args.report[1:])
        return
    bk.H, bk.SM_SCALE = args.head_dim, args.head_dim ** -0.5
    if args.once is not None:
        md, q, pools, _ = bk.mixed_batch(16, seed=21)
        jax.block_until_ready(mosaic_call(md, **json.loads(args.once))(q, pools[0]))
        return
    bk.DEADLINE = bk.T0 + args.time_budget
    cfgs = json.loads(args.cfgs) if args.cfgs else DEFAULT_CFGS
    skip = set(args.skip.split(","))
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    res = dict(device=getattr(dev, "device_kind", str(dev)), jax_version=jax.__version__,
               head_dim=bk.H,
               command="python tools/study_mosaic.py " + " ".join(sys.argv[1:]))
    bk.log(f"device {res['device']}, jax {jax.__version__}")
    res["ceilings"] = ceil = bk.ceilings(4.0)
    bk.log("ceilings: read {:.2f} TB/s, matmul {:.0f} TFLOP/s".format(
        ceil["read_bw"] / 1e12, ceil["matmul_flops"] / 1e12))
    save = lambda: bk.dump(args.out, "mosaic.json", res)  # noqa: E731
    if args.blocks:
        res["items"] = item_costs(cfgs, list(map(int, args.blocks.split(","))), 16,
                                  shared=args.shared)
        save()
        return
    for page in map(int, args.pages.split(",")):
        md, q, pools, info = bk.mixed_batch(page, seed=21)
        if "prefill" not in skip:
            pre = dict(md, num_seqs=jnp.asarray([4], jnp.int32))
            flops = sp.causal_flops(info["q_lens"][:4], info["kv_lens"][:4], bk.N, bk.H)
            bk.log(f"prefill half, page {page}: {flops / 1e9:.1f} GFLOP")
            res[f"prefill_p{page}"] = batch_rows(
                pre, q, pools, cfgs, bk.ours_ragged(pre), dict(
                    tflops=lambda t, f=flops: f / (t * 1e-6) / 1e12))
            save()
        if "mixed" not in skip:
            floor = max(info["kv_bytes"] / ceil["read_bw"], info["flops"] / ceil["matmul_flops"])
            bk.log(f"mixed batch, page {page}: floor {floor * 1e6:.1f} us")
            res[f"mixed_p{page}"] = dict(floor_us=floor * 1e6, rows=batch_rows(
                md, q, pools, cfgs, bk.ours_ragged(md), dict(
                    x_floor=lambda t, f=floor: t * 1e-6 / f)))
            save()
    if "decode" not in skip:
        shapes = [tuple(map(int, s.split("x"))) for s in args.decode.split(",")]
        for (batch, ctx), page in ((bc, p) for p in map(int, args.pages.split(","))
                                   for bc in shapes):
            num_pages, md = bk.decode_batch(batch, ctx, page)
            pools = bk.make_pools(num_pages, page, 2, 100)
            q = bk.make_qs(batch, 1, 5)[0]
            floor = batch * ctx * bk.K * bk.H * 4 / ceil["read_bw"]
            bk.log(f"decode B={batch} ctx={ctx} page={page}: floor {floor * 1e6:.1f} us")
            key = f"decode_b{batch}_c{ctx}" + (f"_p{page}" if page != 16 else "")
            res[key] = dict(floor_us=floor * 1e6, rows=batch_rows(
                md, q, pools, cfgs, bk.ours_decode(md), dict(
                    pct_read_bw=lambda t, f=floor: 100 * f / (t * 1e-6))))
            save()
    save()


if __name__ == "__main__":
    main()
