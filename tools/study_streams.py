"""The mixed batch's two halves on two CUDA streams: does running them concurrently beat one
launch? (NOTES.md, "Mixed batch, thirteenth pass".)

One GPU call, one card. Builds ``bench_kernels``' mixed batch (4 prefill chunks x 512 + 60
decodes at ctx 2048) and times, each checked against the reference first:
  * ``one_launch``: the Mosaic ragged kernel on the whole batch (what ``auto`` runs today);
  * ``halves_serial``: the prefill chunks through a ragged kernel (the decodes as padding), the
    60 decodes through the split-KV decode kernel, their rows written into the first's output;
  * ``halves_streams``: the same with the decode kernel on a second stream (``compute_on
    ('gpu_stream:1')``), so the two kernels may run at once; ``..._pre_on_1``: the prefill
    kernel on the second stream instead; ``..._grouped``: both in one scheduling group;
  * each half alone.
Times are the GPU's span of each run (first kernel's start to last kernel's end: kernels on
two streams overlap, so their durations must not be summed), one call per run, medians.

On the H200 with JAX 0.11.2 (session 18) every stream variant failed to compile, and
``halves_serial_mosaic`` too (two XLA limits, NOTES.md's thirteenth pass); the failures are
recorded in the JSON, the run goes on.

    python tools/study_streams.py --out /tmp/streams --pages 16,64
    python tools/study_streams.py --interpret        # CPU smoke test (no streams, tiny batch)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402  (tools/ is not a package)
from bench_timing import clock_summary, gpu_runs, time_runs  # noqa: E402

from jaxpage.kernels_pallas import gpu  # noqa: E402

NUM_PREFILLS = 4


def on_stream(fn, stream):
    """``fn`` as a call XLA runs on CUDA stream ``stream`` (its own async call-start/done)."""
    try:  # JAX 0.10: compute_on2; 0.11 renamed it compute_on (the old context manager gone)
        from jax.experimental.compute_on import compute_on2 as compute_on
    except ImportError:
        from jax.experimental.compute_on import compute_on
    try:
        from jax._src.core import MemorySpace
    except ImportError:
        from jax.memory import Space as MemorySpace
    return compute_on(fn, compute_type=f"gpu_stream:{stream}",
                      out_memory_spaces=MemorySpace.Device)


def halves(md, impl, streams=None, grouped=False):
    """The two-kernel mixed batch; ``streams``: (prefill's, decode's) stream, None = default."""
    dec, dec_start, _ = bk.decode_half(md, NUM_PREFILLS)
    num_dec = int(dec["num_seqs"][0])
    pre = dict(md, num_seqs=jnp.asarray([NUM_PREFILLS], jnp.int32))

    def prefill(q, pool):
        return gpu.ragged_paged_attention(
            q, pool, pre["kv_lens"], pre["block_tables"], pre["query_start_loc"],
            pre["num_seqs"], sm_scale=bk.SM_SCALE, ragged_impl=impl, interpret=bk.INTERPRET)

    def decode(q_dec, pool):  # row b for request b
        return gpu.decode_paged_attention(q_dec, pool, dec["kv_lens"], dec["block_tables"],
                                          dec["num_seqs"], sm_scale=bk.SM_SCALE,
                                          interpret=bk.INTERPRET)

    s_pre, s_dec = streams or (None, None)
    prefill_fn = on_stream(prefill, s_pre) if s_pre else prefill
    decode_fn = on_stream(decode, s_dec) if s_dec else decode

    def call(q, pool):
        if grouped:
            from jax.experimental.xla_metadata import set_xla_metadata
            with set_xla_metadata(_scheduling_group_id="1"):
                a = prefill_fn(q, pool)
                b = decode_fn(q[dec_start:dec_start + num_dec], pool)
        else:
            a = prefill_fn(q, pool)
            b = decode_fn(q[dec_start:dec_start + num_dec], pool)
        return a.at[dec_start:dec_start + num_dec].set(b)  # in place: XLA's dynamic-update-slice
    return call, prefill, decode, dec_start, num_dec


def span_us(call, q, pool, n_runs=30):
    """Median GPU span per run (µs) and the wall clock's, of ``call`` jitted alone."""
    fn = jax.jit(call)
    jax.block_until_ready(fn(q, pool))
    wall = clock_summary("wall", time_runs(fn, (q, pool), n_runs))
    spans = gpu_runs(fn, (q, pool), n_runs, span=True)
    out = dict(wall)
    if spans:
        out.update(clock_summary("gpu", spans))
    out["time_us"] = out.get("gpu_us", out["wall_us"])
    return out


def study(page, ceil, out):
    md, q, pools, info = bk.mixed_batch(page, seed=21, scale=1 / 16 if bk.INTERPRET else 1.0)
    pool = pools[0]
    floor = max(info["kv_bytes"] / ceil["read_bw"], info["flops"] / ceil["matmul_flops"]) * 1e6
    want = bk.ref_call(md)(q, pool)
    impls = ["triton"] if bk.INTERPRET else ["mosaic", "triton"]
    variants = {}
    if not bk.INTERPRET:
        variants["one_launch"] = bk.ours_mosaic(md)
    for impl in impls:
        variants[f"halves_serial_{impl}"], pre_fn, dec_fn, dec_start, num_dec = halves(md, impl)
        variants[f"part_prefill_{impl}"] = pre_fn
        if bk.INTERPRET:
            continue  # no streams off the GPU
        variants[f"halves_streams_{impl}"] = halves(md, impl, (None, 1))[0]
        variants[f"halves_streams_{impl}_pre_on_1"] = halves(md, impl, (1, None))[0]
        variants[f"halves_streams_{impl}_grouped"] = halves(md, impl, (None, 1), True)[0]
        variants[f"halves_streams_{impl}_both"] = halves(md, impl, (1, 2), True)[0]
    variants["part_decodes"] = lambda q, pool: dec_fn(q[dec_start:dec_start + num_dec], pool)
    row = dict(page=page, floor_us=floor, **{k: v for k, v in info.items()
                                              if k not in ("q_lens", "kv_lens")})
    for label, call in variants.items():
        try:
            got = jax.jit(call)(q, pool)
            if label.startswith("part_decodes"):
                err = bk.rel_err(got, want[dec_start:dec_start + num_dec])
            elif label.startswith("part_prefill"):
                rows = int(md["query_start_loc"][NUM_PREFILLS])
                err = bk.rel_err(got[:rows], want[:rows])
            else:
                err = bk.rel_err(got, want)
            r = span_us(call, q, pool, n_runs=3 if bk.INTERPRET else 30)
            r.update(rel_err=err, x_floor=r["time_us"] / floor)
            if not bk.INTERPRET:  # where XLA put the second stream's call
                txt = jax.jit(call).lower(q, pool).compile().as_text()
                r["call_start"] = txt.count("call-start")
        except Exception as e:  # keep going; the record shows the failure
            r = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
        row[label] = r
        bk.log(f"page {page} {label:34s} " + (
            f"{r['time_us']:8.1f} us ({r['x_floor']:.2f}x floor) err {r['rel_err']:.2g}"
            f" call-starts {r.get('call_start')}" if "time_us" in r else r["error"]))
        with open(os.path.join(out, "streams.json"), "w") as f:
            json.dump(dict(ceilings=ceil, rows=ROWS + [row], jax=jax.__version__,
                           device=jax.devices()[0].device_kind), f, indent=1)
    return row


ROWS: list = []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="study_streams_out")
    p.add_argument("--pages", default="16,64")
    p.add_argument("--interpret", action="store_true", help="CPU smoke test: tiny batch")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    bk.INTERPRET = a.interpret
    ceil = (dict(read_bw=1e12, matmul_flops=1e14) if a.interpret else bk.ceilings())
    bk.log(f"ceilings {ceil}")
    for page in (int(x) for x in a.pages.split(",")):
        ROWS.append(study(page, ceil, a.out))
    return ROWS


if __name__ == "__main__":
    main()
