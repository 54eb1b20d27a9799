"""Tuning sweeps of the Triton-lowered decode and ragged kernels (``bench_kernels --sweep``):
the grids whose results feed the tables beside the kernels in ``kernels_pallas/gpu/``."""

from __future__ import annotations


def sweep(bk, ceil, out):
    """Tuning grid for the decode and ragged kernels (results feed the tables in gpu/).
    ``bk`` is the running ``bench_kernels`` module (its settings as the command line set them:
    run as a script it is ``__main__``, so importing it here would load a fresh copy)."""
    res = dict(decode_blocks=[], decode_splits=[], ragged=[])
    blocks = {f"bkv{b}_w{w}_s{s}": dict(block_kv=b, num_warps=w, num_stages=s)
              for b in (32, 64, 128) for (w, s) in ((4, 2), (4, 3), (4, 4), (8, 3))}
    for batch, ctx, page in ((16, 2048, 16), (64, 2048, 16), (256, 8192, 16), (64, 2048, 128)):
        row = bk.bench_decode_shape(batch, ctx, page, ceil, ("ours",), ours_cfgs=blocks)
        res["decode_blocks"].append(row)
        ok = [k for k in blocks if "time_us" in row.get(k, {})]
        best = min(ok, key=lambda k: row[k]["time_us"]) if ok else None
        bk.log(f"sweep blocks B={batch} ctx={ctx} p={page}: best {best} "
               + " ".join(f"{k}={row[k]['pct_read_bw']:.0f}%" for k in ok))
        bk.dump(out, "sweep.json", res)
    splits = {f"splits{s}": dict(num_splits=s) for s in (1, 2, 4, 8, 16)}
    for batch, ctx in ((16, 512), (16, 2048), (16, 8192), (64, 2048), (64, 512)):
        row = bk.bench_decode_shape(batch, ctx, 16, ceil, ("ours",), ours_cfgs=splits)
        res["decode_splits"].append(row)
        bk.log(f"sweep splits B={batch} ctx={ctx}: "
               + " ".join(f"{k}={row[k]['pct_read_bw']:.0f}%" for k in splits
                          if "time_us" in row.get(k, {})))
        bk.dump(out, "sweep.json", res)
    rcfg = {f"bm{m}_bkv{b}_w{w}_s{s}": dict(block_m=m, block_kv=b, num_warps=w, num_stages=s)
            for m in (32, 64, 128) for b in (32, 64, 128) for (w, s) in ((4, 2), (4, 3), (8, 3))}
    rcfg.update({f"default_dec{d}": dict(decode_block_kv=d) for d in (32, 64, 128, 256)})
    row = bk.bench_mixed(ceil, 16, ragged_cfgs=rcfg, with_ref=False, breakdown=False)
    res["ragged"].append(row)
    bk.log("sweep ragged mixed: " + " ".join(
        f"{k}={row[k]['time_us']:.0f}us" for k in rcfg if "time_us" in row.get(k, {})))
    bk.dump(out, "sweep.json", res)
    return res
