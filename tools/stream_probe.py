"""How fast can one CTA per SM stream HBM into a Hopper SM, by TMA and by plain loads?

The Mosaic ragged kernel's decode items move ~27 GB/s per SM through TMA whatever the copy
size or ring depth (docs/benchmarks/NOTES.md, sixth pass). This isolates that: P CTAs (default:
one per SM) each stream their own contiguous share of a 1 GiB bf16 array, with nothing else
to do, and report the rate.

  * ``tma``: ``issuers`` memory warpgroups issue TMA copies of ``box`` x 128 bf16 rows into
    a ``depth``-deep ring (issuer j takes the steps j, j + issuers, ...); one more warpgroup
    waits for each slot and frees it.
  * ``lsu``: one warpgroup loads ``box`` x 128 rows straight into registers (plain vector
    loads), ``unroll`` boxes per step before summing them (loads in flight per thread).

    python tools/stream_probe.py --out /tmp/probe      # on a Hopper GPU

Writes ``stream_probe.json``; prints GB/s in total and per CTA next to the jnp.sum ceiling.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402
import study_prefill as sp  # noqa: E402

COLS = 128


@functools.partial(jax.jit, static_argnames=("programs", "box", "depth", "issuers"))
def tma_stream(x, *, programs: int, box: int, depth: int, issuers: int = 1):
    rows_per = x.shape[0] // programs
    steps = rows_per // box

    def kernel(x_ref, o_ref, ring, full, free):
        p = lax.axis_index("p")
        wg = lax.axis_index("wg")
        row0 = p * rows_per

        @pl.when(wg >= 1)
        def _producer():
            @pl.loop(wg - 1, steps, step=issuers)
            def _(s):
                slot = lax.rem(s, depth)

                @pl.when(s >= depth)
                def _():
                    plgpu.barrier_wait(free.at[slot])

                plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(row0 + s * box, box)], ring.at[slot],
                                        full.at[slot])

            @pl.loop(jnp.maximum(steps - depth, 0), steps)
            def _(s):
                @pl.when(lax.rem(s, issuers) == wg - 1)
                def _():
                    plgpu.barrier_wait(free.at[lax.rem(s, depth)])

        @pl.when(wg == 0)
        def _consumer():
            @pl.loop(0, steps)
            def _(s):
                slot = lax.rem(s, depth)
                plgpu.barrier_wait(full.at[slot])
                plgpu.barrier_arrive(free.at[slot])

            plgpu.copy_smem_to_gmem(ring.at[0, pl.ds(0, 8)], o_ref.at[p])
            plgpu.wait_smem_to_gmem(0)

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((programs, 8, COLS), x.dtype),
        scratch_types=[plgpu.SMEM((depth, box, COLS), x.dtype, transforms=tiled),
                       plgpu.Barrier(num_arrivals=1, num_barriers=depth),
                       plgpu.Barrier(num_arrivals=1, num_barriers=depth)],
        grid=(programs,), grid_names=("p",), num_threads=1 + issuers, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )(x)


@functools.partial(jax.jit, static_argnames=("programs", "box", "unroll"))
def lsu_stream(x, *, programs: int, box: int, unroll: int):
    rows_per = x.shape[0] // programs
    steps = rows_per // (box * unroll)

    def kernel(x_ref, o_ref, acc_smem):
        p = lax.axis_index("p")
        row0 = p * rows_per

        def step(s, acc):
            base = row0 + s * box * unroll
            parts = [x_ref[pl.ds(base + u * box, box)] for u in range(unroll)]
            for v in parts:
                acc = acc + v.astype(jnp.float32)
            return acc

        # (the first box starts the sum: a loaded array's layout, which the loop carries)
        acc = lax.fori_loop(0, steps, step, x_ref[pl.ds(row0, box)].astype(jnp.float32))
        acc_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(acc_smem.at[pl.ds(0, 8)], o_ref.at[p])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((programs, 8, COLS), jnp.float32),
        scratch_types=[plgpu.SMEM((box, COLS), jnp.float32)],
        grid=(programs,), grid_names=("p",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="stream_probe_out")
    p.add_argument("--gib", type=float, default=1.0)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    sms = getattr(dev, "core_count", 132)
    rows = int(args.gib * 2 ** 30) // (COLS * 2)
    rows -= rows % (sms * 2 * 1024)
    x = jax.random.normal(jax.random.key(0), (rows, COLS), jnp.bfloat16)
    nbytes = x.size * 2
    res = dict(device=dev.device_kind, jax_version=jax.__version__, bytes=nbytes, sms=sms,
               rows={})
    res["ceiling_read_bw"] = bk.ceilings(args.gib)["read_bw"]
    bk.log(f"{dev.device_kind}: jnp.sum read ceiling {res['ceiling_read_bw'] / 1e12:.2f} TB/s")
    cands = []
    for progs in (sms, sms // 2):
        # (16-row boxes = one 4 KB page row of the ragged kernel at page 16, 4 to 32 deep:
        # does the TMA unit bound copies or bytes in flight?)
        # (and from two issuing warpgroups: is the bound the issuing thread or the SM's TMA
        # unit?)
        for box, depth, issuers in ((16, 4, 1), (16, 16, 1), (16, 32, 1), (16, 16, 2),
                                    (16, 32, 2), (64, 4, 1), (64, 4, 2), (128, 2, 1)):
            cands.append((f"tma_p{progs}_box{box}_d{depth}" + (f"_i{issuers}" if issuers > 1
                                                               else ""),
                          functools.partial(tma_stream, programs=progs, box=box, depth=depth,
                                            issuers=issuers), progs))
        for box, unroll in ((64, 1), (64, 4), (32, 8)):
            cands.append((f"lsu_p{progs}_box{box}_u{unroll}",
                          functools.partial(lsu_stream, programs=progs, box=box,
                                            unroll=unroll), progs))
    for label, fn, progs in cands:
        try:
            r = sp.time_call(lambda a, _b: fn(a), (x,), (None,))
        except Exception as e:  # keep going; the record shows the failure
            res["rows"][label] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            bk.log(f"  {label} failed: {str(e)[:200]}")
            continue
        t = r["time_us"] * 1e-6
        r.update(gbps=nbytes / t / 1e9, gbps_per_cta=nbytes / t / 1e9 / progs,
                 pct_ceiling=100 * nbytes / t / res["ceiling_read_bw"])
        res["rows"][label] = r
        bk.log(f"  {label:24s} {r['time_us']:8.1f} us {r['gbps']:7.0f} GB/s "
               f"({r['pct_ceiling']:4.1f}%) {r['gbps_per_cta']:5.1f} GB/s per CTA")
        bk.dump(args.out, "stream_probe.json", res)


if __name__ == "__main__":
    main()
