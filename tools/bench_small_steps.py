"""Small ragged steps: the Mosaic GPU kernel against the Triton one, by the step's rows.

``backend="auto"`` gives a ragged (mixed or prefill) step at H = 128 to the Mosaic kernel on
Hopper. Its speed was measured on large mixed batches; this measures the small steps that
chunked prefill under a small budget and speculative decoding's verify steps make, in three
families, each padded to the engine's token bucket (a power of two from 16), N/K = 32/8,
H = 128, bf16, page 64 (the engine's GPU default):

  * ``verify``: B decodes of 1 + 4 drafts each (speculative decoding) at ctx 1024;
  * ``chunk``: one prefill chunk of c tokens behind 256 of context, beside 16 decodes at 1024;
  * ``prefill``: one request's first T tokens.

Verify steps are also timed as the plain decode step they replace (the decode kernel, one row
per request). Each kernel is checked against the jnp reference on the step's live rows before
it is timed (``bench_timing.bench_calls``: the GPU clock where the profiler records one, else
the wall clock). Writes ``small_steps.json`` and ``small_steps.md`` to ``--out``.

    python tools/bench_small_steps.py --out /tmp/small
    python tools/bench_small_steps.py --smoke --out /tmp/small   # CPU: interpreters, 1 shape
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxpage.kernels_pallas import gpu, reference
from jaxpage.runner.buckets import Buckets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import n_pools_for, rel_err  # noqa: E402  (tools/ is not a package)
from bench_timing import bench_calls  # noqa: E402

N, K, H = 32, 8, 128
DTYPE = jnp.bfloat16
SM_SCALE = H ** -0.5
PAGE = 64
N_INNER = 4
TOLERANCE = 2e-2  # max |ours - ref| / max |ref| on live rows, bf16

FAMILIES = {
    "verify": [dict(q_lens=[5] * b, kv_lens=[1024] * b) for b in (2, 4, 8, 16, 24, 32, 48, 64)],
    "chunk": [dict(q_lens=[c] + [1] * 16, kv_lens=[256 + c] + [1024] * 16)
              for c in (16, 48, 112, 240, 496)],
    "prefill": [dict(q_lens=[t], kv_lens=[t]) for t in (16, 32, 64, 128, 256, 512)],
}
SMOKE = {"chunk": [dict(q_lens=[9, 5, 1], kv_lens=[30, 70, 64])]}  # with N/K = 4/1


def bucket(rows: int) -> int:
    """The engine's token bucket for a step of ``rows`` tokens (powers of two from 16)."""
    return Buckets.create(1 << 16, 8).pick(rows, 1)[0]


def make_step(q_lens, kv_lens, seed: int, page: int = PAGE):
    """Metadata of one step (block tables over shuffled pages; page 0 is the null page), its
    pool and the number of query rows (the bucket: live rows, then padding)."""
    rng = np.random.default_rng(seed)
    pages = [-(-k // page) for k in kv_lens]
    perm = rng.permutation(sum(pages)) + 1
    tables = np.zeros((len(q_lens), max(pages)), np.int32)
    for i, (n, off) in enumerate(zip(pages, np.cumsum([0] + pages[:-1]))):
        tables[i, :n] = perm[off:off + n]
    md = dict(kv_lens=jnp.asarray(kv_lens, jnp.int32), block_tables=jnp.asarray(tables),
              query_start_loc=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
              num_seqs=jnp.asarray([len(q_lens)], jnp.int32))
    return md, len(perm) + 1, bucket(sum(q_lens))


def make_pool(num_pages: int, page: int, seed: int):
    shape = reference.kv_cache_shape(num_pages, page, K, H)
    return jax.random.normal(jax.random.key(seed), shape, DTYPE)


def kernels(md, interpret: bool):
    """The two ragged kernels on one step's metadata: name -> call(q, pool)."""
    args = lambda q, pool: (q, pool, md["kv_lens"], md["block_tables"],  # noqa: E731
                            md["query_start_loc"], md["num_seqs"])
    return {
        "triton": lambda q, pool: gpu.ragged_kernel(*args(q, pool), sm_scale=SM_SCALE,
                                                    interpret=interpret),
        "mosaic": lambda q, pool: gpu.ragged_paged_attention(
            *args(q, pool), sm_scale=SM_SCALE, ragged_impl="mosaic", interpret=interpret),
    }


def measure(family: str, shape: dict, seed: int, interpret: bool) -> dict:
    md, num_pages, rows = make_step(shape["q_lens"], shape["kv_lens"], seed)
    live = sum(shape["q_lens"])
    kv_bytes = 2 * sum(shape["kv_lens"]) * K * H * jnp.dtype(DTYPE).itemsize
    n_pools = 1 if interpret else n_pools_for(kv_bytes, N_INNER)
    pools = tuple(make_pool(num_pages, PAGE, seed + i) for i in range(n_pools))
    qs = tuple(jax.random.normal(jax.random.key(seed + 100 + i), (rows, N, H), DTYPE)
               for i in range(1 if interpret else N_INNER))
    ref = reference.ragged_paged_attention(qs[0], pools[0], md["kv_lens"], md["block_tables"],
                                           md["query_start_loc"], md["num_seqs"],
                                           sm_scale=SM_SCALE)
    r = dict(family=family, requests=len(shape["q_lens"]), live_rows=live, rows=rows,
             kv_tokens=sum(shape["kv_lens"]))
    for name, call in kernels(md, interpret).items():
        err = rel_err(call(qs[0], pools[0])[:live], ref[:live])
        if not err <= TOLERANCE:
            raise AssertionError(f"{name} on {family} {shape}: rel. error {err:.4f}")
        r[f"{name}_err"] = err
        if not interpret:
            r[f"{name}_us"] = bench_calls(call, qs, pools)["time_us"]
    if family == "verify" and not interpret:  # the plain decode step it replaces
        dec = lambda q, pool: gpu.decode_paged_attention(  # noqa: E731
            q[:len(shape["q_lens"])], pool, md["kv_lens"], md["block_tables"], md["num_seqs"],
            sm_scale=SM_SCALE)
        r["decode_us"] = bench_calls(dec, qs, pools)["time_us"]
    if "triton_us" in r:
        r["mosaic_over_triton"] = r["mosaic_us"] / r["triton_us"]
    print(json.dumps(r), flush=True)
    return r


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Card: **{meta['device']}**, JAX {meta['jax']}, {meta['date']}",
             f"Command: `{meta['command']}`", "",
             "| step | requests | live rows | rows (bucket) | Triton µs | Mosaic µs "
             "| Mosaic / Triton | decode kernel, 1 row each µs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, m, d = r.get("triton_us"), r.get("mosaic_us"), r.get("decode_us")
        cells = (f"{t:.1f}", f"{m:.1f}", f"{m / t:.2f}") if t else ("-", "-", "-")
        cells += (f"{d:.1f}" if d else "-",)
        lines.append(f"| {r['family']} | {r['requests']} | {r['live_rows']} | {r['rows']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, png: str) -> None:
    """One panel per family: each kernel's µs against the step's live rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.4), squeeze=False)
    for ax, fam in zip(axes[0], families):
        mine = [r for r in rows if r["family"] == fam]
        for key, label in (("triton_us", "Triton ragged"), ("mosaic_us", "Mosaic ragged"),
                           ("decode_us", "decode kernel (1 row each)")):
            pts = [(r["live_rows"], r[key]) for r in mine if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("live rows of the step", fontsize=8)
        ax.set_ylabel("µs per call (GPU clock)", fontsize=8)
        ax.set_title(f"{fam}: {meta['device']}", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true",
                    help="one tiny step through both kernels' interpreters (CPU), no timing")
    ap.add_argument("--replot", metavar="JSON",
                    help="only redraw small_steps.png in --out from a saved small_steps.json")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        plot(saved["rows"], saved["meta"], os.path.join(args.out, "small_steps.png"))
        return saved["rows"]
    families = SMOKE if args.smoke else FAMILIES
    if args.smoke:  # the interpreters run one CTA at a time: one KV head
        global N, K
        N, K = 4, 1
    rows = [measure(fam, shape, seed=7 * i, interpret=args.smoke)
            for fam, shapes in families.items() for i, shape in enumerate(shapes)]
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                command="python tools/bench_small_steps.py " + " ".join(argv or sys.argv[1:]))
    with open(os.path.join(args.out, "small_steps.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "small_steps.md"), "w") as f:
        f.write(markdown(rows, meta))
    try:
        plot(rows, meta, os.path.join(args.out, "small_steps.png"))
    except ImportError:
        print("matplotlib not installed: no plot (--replot draws it later)")
    return rows


if __name__ == "__main__":
    main()
