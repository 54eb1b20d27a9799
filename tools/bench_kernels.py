"""Paged-attention kernel benchmark (method: shared/BENCHMARKS.md).

One run on one GPU measures, side by side:
  * ceilings: HBM read (jnp.sum over 4 GiB bf16; a 4 GiB read+write copy) and bf16 matmul;
  * decode attention at B x ctx x page size, N/K = 32/8, H = 128, bf16: ours (split-KV decode
    kernel, and the general ragged kernel), the jnp reference, and jax's deprecated
    ``jax.experimental.pallas.ops.gpu.paged_attention`` (best of a few block settings it accepts);
  * one mixed prefill + decode batch at pages 16 and 64 (``--mixed-pages``): ours (ragged) and
    the reference;
and checks ours against the reference before timing. Prints a table; writes JSON, Markdown and
a PNG to ``--out``.

Timing: each measured call is one jitted function running ``n_inner`` kernel calls back to back
over distinct q arrays (no CSE) and, when one KV pool fits in L2, rotating over several pools
(>= 192 MB touched), so that no call hits L2 from the one before. Two clocks, both recorded:
the wall clock (median of >= 20 groups of such runs after warm-up, ``block_until_ready`` before
reading it; ``wall_us``) and the GPU's own, the kernels' durations as the profiler (CUPTI)
records them (median over runs; ``gpu_us``). ``time_us``, every ratio and the ceilings use
the GPU clock where the profiler records GPU activity: the wall clock also counts the host's
dispatch of each group's first run, during which the GPU idles (+3 to +15% measured on an
H100, most for calls of a few 100 µs; NOTES.md, "Two clocks").

    python tools/bench_kernels.py --out /tmp/kbench              # full
    python tools/bench_kernels.py --pages 16 --sweep --out ...   # page 16 + tuning sweeps
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpage.kernels_pallas import gpu, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_sweep  # noqa: E402  (tools/ is not a package)
from bench_timing import bench_calls, ceilings  # noqa: E402
from kernel_report import fmt, markdown, plot  # noqa: E402

N, K, H = 32, 8, 128
DTYPE = jnp.bfloat16
KV_DTYPE = jnp.dtype(jnp.bfloat16)  # --kv-dtype: the pool's (fp8: one byte per value)
SM_SCALE = H ** -0.5
L2_ROTATE_BYTES = 192 * 2**20
INTERPRET = False  # --interpret: CPU smoke test of this script (tiny shapes)
DEADLINE = float("inf")  # --time-budget: later measurements are skipped, the reports still written
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------------- timing
# ------------------------------------------------------------------------------------ inputs
def make_pools(num_pages, page_size, n_pools, seed):
    shape = reference.kv_cache_shape(num_pages, page_size, K, H)  # (P, 2, K, S, H)
    return tuple(reference.quantize_kv(jax.random.normal(jax.random.key(seed + i), shape, DTYPE),
                                       KV_DTYPE) for i in range(n_pools))


def make_qs(num_tokens, n, seed):
    return tuple(jax.random.normal(jax.random.key(seed + 1000 + i), (num_tokens, N, H), DTYPE)
                 for i in range(n))


def decode_batch(batch, ctx, page_size, seed=0, q_len=1, shared=False):
    """Uniform batch: every request has kv_len ctx (its last ``q_len`` tokens new), pages
    shuffled over the pool — or with ``shared`` every request on the same pages."""
    pps = ctx // page_size
    rng = np.random.default_rng(seed)
    perm = rng.permutation(pps if shared else batch * pps) + 1
    tables = (np.tile(perm, (batch, 1)) if shared else perm.reshape(batch, pps)).astype(np.int32)
    md = dict(kv_lens=jnp.full((batch,), ctx, jnp.int32), block_tables=jnp.asarray(tables),
              query_start_loc=jnp.arange(batch + 1, dtype=jnp.int32) * q_len,
              num_seqs=jnp.asarray([batch], jnp.int32))
    return len(perm) + 1, md  # + the null page 0


def n_inner_for(est_s):
    return int(min(8, max(2, math.ceil(1e-3 / max(est_s, 1e-7)))))


def n_pools_for(kv_bytes, n_inner):
    return int(min(n_inner, max(1, math.ceil(L2_ROTATE_BYTES / kv_bytes))))


# ---------------------------------------------------------------------------------- variants
def ours_decode(md, **cfg):
    return lambda q, pool: gpu.decode_paged_attention(
        q, pool, md["kv_lens"], md["block_tables"], md["num_seqs"], sm_scale=SM_SCALE,
        interpret=INTERPRET, **cfg)


def ours_ragged(md, **cfg):
    return lambda q, pool: gpu.ragged_kernel(
        q, pool, md["kv_lens"], md["block_tables"], md["query_start_loc"], md["num_seqs"],
        sm_scale=SM_SCALE, interpret=INTERPRET, **cfg)


def ours_mosaic(md):
    return lambda q, pool: gpu.ragged_paged_attention(
        q, pool, md["kv_lens"], md["block_tables"], md["query_start_loc"], md["num_seqs"],
        sm_scale=SM_SCALE, ragged_impl="mosaic")


def ours_two_launch(md):
    return lambda q, pool: gpu.mixed_paged_attention(
        q, pool, md["kv_lens"], md["block_tables"], md["query_start_loc"], md["num_seqs"],
        sm_scale=SM_SCALE, interpret=INTERPRET)


def decode_half(md, num_prefills):
    """The requests after the first ``num_prefills`` (the mixed batch's decodes) as a batch of
    their own, and the query rows it takes (through the end: the padding rows follow them)."""
    qsl = md["query_start_loc"]
    start = int(qsl[num_prefills])
    half = dict(kv_lens=md["kv_lens"][num_prefills:],
                block_tables=md["block_tables"][num_prefills:],
                query_start_loc=qsl[num_prefills:] - start,
                num_seqs=md["num_seqs"] - num_prefills)
    return half, start, int(qsl[-1]) - start


def on_rows(call, start):
    """``call`` on the query rows from ``start`` on."""
    return lambda q, pool: call(q[start:], pool)


def ref_call(md):
    return lambda q, pool: reference.ragged_paged_attention(
        q, pool, md["kv_lens"], md["block_tables"], md["query_start_loc"], md["num_seqs"],
        sm_scale=SM_SCALE)


def jax_settings(pps, page_size):
    """(pages_per_compute_block, k_splits) the deprecated kernel accepts: 128-token blocks."""
    ppcb = max(1, 128 // page_size)
    out = []
    for ks in (16, 4, 1):
        if pps % ks == 0 and (pps // ks) % min(ppcb, pps // ks) == 0:
            out.append((ppcb, ks))
    return out


def jax_call(md, ppcb, k_splits):
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa

    def call(q, kv):
        k_pages, v_pages = kv  # (K, P, S, H) each
        return jpa.paged_attention(q * jnp.asarray(SM_SCALE, q.dtype), k_pages, v_pages,
                                   md["block_tables"], md["kv_lens"], block_h=16,
                                   pages_per_compute_block=ppcb, k_splits=k_splits,
                                   interpret=INTERPRET)
    return call


def to_jax_layout(pool):
    return (jnp.transpose(pool[:, 0], (1, 0, 2, 3)), jnp.transpose(pool[:, 1], (1, 0, 2, 3)))


# ------------------------------------------------------------------------------- correctness
def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def check_correctness(small=False):
    res = {}
    for batch, ctx, page in ((2, 100, 16), (2, 300, 128)) if small else ((8, 1000, 16),
                                                                        (3, 4096, 128)):
        num_pages, md = decode_batch(batch, (ctx // page + 1) * page, page, seed=7)
        md["kv_lens"] = jnp.asarray(np.random.default_rng(1).integers(1, ctx, batch), jnp.int32)
        pool = make_pools(num_pages, page, 1, 11)[0]
        q = make_qs(batch, 1, 3)[0]
        want = ref_call(md)(q, pool)
        res[f"decode_B{batch}_ctx{ctx}_p{page}"] = rel_err(ours_decode(md)(q, pool), want)
        res[f"ragged_on_decode_B{batch}_ctx{ctx}_p{page}"] = rel_err(ours_ragged(md)(q, pool), want)
    md, q, pool, _ = mixed_batch(16, seed=5, scale=1 / 16 if small else 0.25)
    want = ref_call(md)(q, pool[0])
    res["mixed_small"] = rel_err(ours_ragged(md)(q, pool[0]), want)
    res["mixed_small_old"] = rel_err(ours_ragged(md, decode_tile=False, order="natural")(
        q, pool[0]), want)
    res["mixed_small_reverse"] = rel_err(ours_ragged(md, order="reverse")(q, pool[0]), want)
    res["mixed_small_natural"] = rel_err(ours_ragged(md, order="natural")(q, pool[0]), want)
    if KV_DTYPE != jnp.dtype(DTYPE):  # jax's kernel takes K/V in q's dtype only
        return res
    batch, ctx = (2, 256) if small else (4, 2048)
    num_pages, md = decode_batch(batch, ctx, 16, seed=3)
    pool = make_pools(num_pages, 16, 1, 12)[0]
    q = make_qs(batch, 1, 4)[0]
    res[f"jax_baseline_B{batch}_ctx{ctx}_p16"] = rel_err(jax_call(md, 8, 4)(q, to_jax_layout(pool)),
                                                 ref_call(md)(q, pool))
    return res


# ----------------------------------------------------------------------------------- mixed
def mixed_batch(page_size, seed=0, scale=1.0, shuffle=True):
    """4 prefill chunks of 512 tokens (with 0..1536 tokens of earlier context) + 60 decodes at
    ctx 2048, as one ragged batch, its rows padded to a multiple of 8 as every engine bucket
    is (2108 tokens in 2112 rows). ``scale`` shrinks it for the correctness check; without
    ``shuffle`` each request's pages are consecutive in the pool."""
    pre = [(int(512 * scale), int(512 * scale) * (i + 1)) for i in range(4)]  # (q_len, kv_len)
    dec = [(1, int(2048 * scale))] * (60 if scale >= 0.25 else 6)
    reqs = pre + dec
    q_lens = [a for a, _ in reqs]
    kv_lens = [b for _, b in reqs]
    pps = max(-(-b // page_size) for b in kv_lens)
    rng = np.random.default_rng(seed)
    need = [-(-b // page_size) for b in kv_lens]
    perm = (rng.permutation(sum(need)) if shuffle else np.arange(sum(need))) + 1
    tables = np.zeros((len(reqs), pps), np.int32)
    off = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[off:off + n]
        off += n
    num_tokens = sum(q_lens)
    md = dict(kv_lens=jnp.asarray(kv_lens, jnp.int32), block_tables=jnp.asarray(tables),
              query_start_loc=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
              num_seqs=jnp.asarray([len(reqs)], jnp.int32))
    kv_bytes = sum(kv_lens) * K * H * 2 * KV_DTYPE.itemsize
    flops = 0
    for a, b in reqs:  # QK^T and PV over the causally visible keys
        flops += 4 * N * H * sum(b - a + j + 1 for j in range(a))
    pools = make_pools(sum(need) + 1, page_size, 1, seed + 50)
    q = make_qs(-(-num_tokens // 8) * 8, 1, seed + 60)[0]
    return md, q, pools, dict(kv_bytes=kv_bytes, flops=flops, num_tokens=num_tokens,
                              q_lens=q_lens, kv_lens=kv_lens)


# ------------------------------------------------------------------------------------ bench
def bench_decode_shape(batch, ctx, page, ceil, variants, seed=0, ours_cfgs=None,
                       ragged_cfgs=None):
    kv_bytes = batch * ctx * K * H * 2 * KV_DTYPE.itemsize
    floor_s = kv_bytes / ceil["read_bw"]
    num_pages, md = decode_batch(batch, ctx, page, seed)
    row = dict(B=batch, ctx=ctx, page=page, kv_bytes=kv_bytes, floor_us=floor_s * 1e6)
    n_inner = n_inner_for(floor_s)
    n_pools = n_pools_for(kv_bytes, n_inner)
    pools = make_pools(num_pages, page, n_pools, seed + 100)
    qs = make_qs(batch, n_inner, seed)

    def record(name, fn_qs_pools):
        if time.time() > DEADLINE:
            return dict(error="skipped: time budget")
        try:
            r = bench_calls(*fn_qs_pools)
            r["pct_read_bw"] = 100 * floor_s / (r["time_us"] * 1e-6)
            r["kv_TBps"] = kv_bytes / (r["time_us"] * 1e-6) / 1e12
            return r
        except Exception as e:  # keep the run going; the table shows the failure
            log(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}")
            return dict(error=f"{type(e).__name__}: {str(e)[:300]}")

    if "ours" in variants:
        for label, cfg in (ours_cfgs or {"ours": {}}).items():
            row[label] = record(label, (ours_decode(md, **cfg), qs, pools))
            row[label]["config"] = cfg
    if "ours_ragged" in variants:
        for label, cfg in (ragged_cfgs or {"ours_ragged": {}}).items():
            row[label] = record(label, (ours_ragged(md, **cfg), qs, pools))
            row[label]["config"] = cfg
    if "ours_two_launch" in variants:
        row["ours_two_launch"] = record("ours_two_launch", (ours_two_launch(md), qs, pools))
    if "reference" in variants and kv_bytes <= 2**31:
        # The oracle is ~10x off the floor; a few short runs are enough to place it.
        ref_qs = qs[:2]
        r = record("reference", (ref_call(md), ref_qs, pools[:1]))
        row["reference"] = r
    if "jax" in variants and KV_DTYPE != jnp.dtype(DTYPE):
        row["jax"] = dict(error=f"takes no {KV_DTYPE.name} pool")
    elif "jax" in variants:
        best = None
        jpools = tuple(to_jax_layout(p) for p in pools)
        for ppcb, ks in jax_settings(ctx // page, page):
            r = record(f"jax ppcb={ppcb} k_splits={ks}", (jax_call(md, ppcb, ks), qs, jpools))
            r["setting"] = dict(pages_per_compute_block=ppcb, k_splits=ks)
            row.setdefault("jax_all", []).append(r)
            if "time_us" in r and (best is None or r["time_us"] < best["time_us"]):
                best = r
        row["jax"] = best or dict(error="no accepted setting ran")
        del jpools
    del pools, qs
    gc.collect()
    return row


def bench_mixed(ceil, page=16, ragged_cfgs=None, with_ref=True, breakdown=True):
    md, q, pools, info = mixed_batch(page, seed=21, scale=1 / 16 if INTERPRET else 1.0)
    floor_bytes = info["kv_bytes"] / ceil["read_bw"]
    floor_flops = info["flops"] / ceil["matmul_flops"]
    row = dict(page=page, **{k: v for k, v in info.items() if k not in ("q_lens", "kv_lens")},
               floor_us=max(floor_bytes, floor_flops) * 1e6, floor_bytes_us=floor_bytes * 1e6,
               floor_flops_us=floor_flops * 1e6,
               shape="4 prefill chunks x 512 (ctx 512..2048) + 60 decodes at ctx 2048")
    qs = (q,) + make_qs(q.shape[0], 3, 77)
    calls = {label: ours_ragged(md, **cfg) for label, cfg in
             (ragged_cfgs or {"ours": {}}).items()}
    if breakdown:
        calls["ours_two_launch"] = lambda q, pool: gpu.mixed_paged_attention(
            q, pool, md["kv_lens"], md["block_tables"], md["query_start_loc"], md["num_seqs"],
            sm_scale=SM_SCALE, interpret=INTERPRET)
        # The two halves alone: decode kernel on the 60 single-token requests; ragged kernel on
        # the 4 prefill chunks (num_seqs = 4 turns the decodes into padding requests).
        calls["part_decodes_decode_kernel"] = lambda q, pool: gpu.decode_paged_attention(
            q, pool, md["kv_lens"], md["block_tables"], md["num_seqs"],
            query_start_loc=md["query_start_loc"], out_init=jnp.zeros_like(q),
            sm_scale=SM_SCALE, interpret=INTERPRET)
        pre = dict(md, num_seqs=jnp.asarray([4], jnp.int32))
        calls["part_prefills_ragged"] = ours_ragged(pre)
        # The decodes as a batch of their own, through the ragged kernels: beside the prefill
        # half alone, what the one-launch batch overlaps (NOTES, session 12).
        dec, dec_start, num_dec = decode_half(md, 4)
        calls["part_decodes_ragged"] = on_rows(ours_ragged(dec), dec_start)
        cc = str(getattr(jax.devices()[0], "compute_capability", ""))
        if not INTERPRET and cc.startswith("9"):
            # Hopper: the Mosaic GPU ragged kernel beside the Triton one (``auto`` takes it
            # at the head dims in ragged_mosaic.AUTO_HEAD_DIMS).
            calls["ours_mosaic"] = ours_mosaic(md)
            calls["part_prefills_mosaic"] = ours_mosaic(pre)
            calls["part_decodes_mosaic"] = on_rows(ours_mosaic(dec), dec_start)
        if breakdown == "full":
            calls["part_prefills_ragged_natural_order"] = ours_ragged(pre, order="natural")
            calls["part_prefills_ragged_index"] = ours_ragged(pre, prefetch="index")
    want = ref_call(md)(q, pools[0]) if ragged_cfgs else None
    whole = set(ragged_cfgs or ()) | {"ours_two_launch", "ours_mosaic"}  # full-batch outputs
    for label, call in calls.items():
        if time.time() > DEADLINE:
            row[label] = dict(error="skipped: time budget")
            continue
        try:
            err = None
            if want is not None and label in whole:  # each full-batch candidate checked first
                err = rel_err(call(q, pools[0]), want)
            elif want is not None and label.startswith("part_decodes_") and label != \
                    "part_decodes_decode_kernel":  # the decode half's rows of the reference
                err = rel_err(call(q, pools[0])[:num_dec], want[dec_start:dec_start + num_dec])
            row[label] = bench_calls(call, qs, pools)
            row[label]["rel_err"] = err
            row[label]["x_floor"] = row[label]["time_us"] / row["floor_us"]
            row[label]["config"] = (ragged_cfgs or {}).get(label, {})
        except Exception as e:
            log(f"  mixed {label} failed: {e!r}"[:400])
            row[label] = dict(error=repr(e)[:300])
    if with_ref and time.time() < DEADLINE:
        try:
            row["reference"] = bench_calls(ref_call(md), qs[:2], pools, n_runs=5)
            row["reference"]["x_floor"] = row["reference"]["time_us"] / row["floor_us"]
        except Exception as e:
            row["reference"] = dict(error=repr(e)[:300])
    return row


# ---------------------------------------------------------------------------------- reports
def dump(out, name, obj):
    with open(os.path.join(out, name), "w") as f:
        json.dump(obj, f, indent=1, default=str)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_kernels_out")
    p.add_argument("--batches", default="16,64,256")
    p.add_argument("--ctxs", default="512,2048,8192")
    p.add_argument("--pages", default="16,64,128")
    p.add_argument("--variants", default="ours,ours_ragged,ours_two_launch,reference,jax")
    p.add_argument("--sweep", action="store_true", help="run the tuning sweeps first")
    p.add_argument("--no-mixed", action="store_true")
    p.add_argument("--mixed-first", action="store_true", help="time the mixed batch first")
    p.add_argument("--mixed-pages", default="16,64",
                   help="page sizes of the mixed batch: 16 (vLLM's default) and 64 (the "
                        "engine's on GPUs); the first is ``mixed``, the rest ``mixed_more``")
    p.add_argument("--mixed-cfgs", default=None,
                   help="JSON {label: ragged kwargs} for the mixed batch (default: the tuning "
                        "comparison below)")
    p.add_argument("--decode-cfgs", default=None,
                   help="JSON {label: decode kwargs} for the decode kernel (default: its table)")
    p.add_argument("--ragged-cfgs", default=None,
                   help="JSON {label: ragged kwargs} for the ragged kernel on decode shapes")
    p.add_argument("--breakdown", default="full", choices=("full", "halves", "none"),
                   help="mixed batch: time the halves alone (and the old prefill sweep)")
    p.add_argument("--head-dim", type=int, default=128, help="H (N/K stay 32/8)")
    p.add_argument("--kv-dtype", default="bfloat16",
                   help="the pool's dtype: bfloat16, or float8_e4m3fn / float8_e5m2 (queries "
                        "stay bf16; floors count the pool's bytes)")
    p.add_argument("--ceiling-gib", type=float, default=4.0)
    p.add_argument("--interpret", action="store_true", help="CPU smoke test (tiny shapes only)")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds; remaining shapes are skipped past it")
    args = p.parse_args(argv)
    global INTERPRET, DEADLINE, H, SM_SCALE, KV_DTYPE
    INTERPRET = args.interpret
    KV_DTYPE = jnp.dtype(args.kv_dtype)
    H, SM_SCALE = args.head_dim, args.head_dim ** -0.5
    DEADLINE = T0 + args.time_budget
    os.makedirs(args.out, exist_ok=True)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    dev = jax.devices()[0]
    result = dict(device=getattr(dev, "device_kind", str(dev)), jax_version=jax.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                  command="python tools/bench_kernels.py " + " ".join(sys.argv[1:]),
                  decode=[], skipped=[], head_dim=H, kv_dtype=KV_DTYPE.name)
    log(f"device {result['device']}, jax {jax.__version__}")
    result["ceilings"] = ceil = ceilings(args.ceiling_gib)
    log("ceilings: read {:.2f} TB/s, copy {:.2f} TB/s, matmul {:.0f} TFLOP/s".format(
        ceil["read_bw"] / 1e12, ceil["copy_bw"] / 1e12, ceil["matmul_flops"] / 1e12))
    result["correctness"] = check_correctness(small=args.interpret)
    log("correctness (rel. max error vs reference):", result["correctness"])
    dump(args.out, "kernels.json", result)
    if args.sweep:
        result["sweep"] = kernel_sweep.sweep(sys.modules[__name__], ceil, args.out)

    def run_mixed():
        if not args.no_mixed and time.time() - T0 < args.time_budget:
            mixed_cfgs = json.loads(args.mixed_cfgs) if args.mixed_cfgs else {
                "ours": {}, "ours_natural_order": dict(order="natural"),
                "ours_lpt": dict(order="lpt"),
                "ours_old": dict(decode_tile=False, order="natural"),
                "ours_s2": dict(num_stages=2), "ours_index": dict(prefetch="index")}
            rows = [bench_mixed(ceil, page, ragged_cfgs=mixed_cfgs,
                                breakdown=None if args.breakdown == "none" else args.breakdown)
                    for page in ints(args.mixed_pages)]
            result["mixed"], result["mixed_more"] = rows[0], rows[1:]
            for row in rows:
                log(f"mixed, page {row['page']}:",
                    {k: (round(v["time_us"], 1), v.get("rel_err")) if "time_us" in v else v
                     for k, v in row.items() if isinstance(v, dict)},
                    f"floor {row['floor_us']:.0f}us")

    if args.mixed_first:
        run_mixed()
    variants = tuple(args.variants.split(","))
    ragged_cfgs = json.loads(args.ragged_cfgs) if args.ragged_cfgs else None
    decode_cfgs = json.loads(args.decode_cfgs) if args.decode_cfgs else None
    for page in ints(args.pages):
        for batch in ints(args.batches):
            for ctx in ints(args.ctxs):
                if time.time() - T0 > args.time_budget:
                    result["skipped"].append((batch, ctx, page))
                    continue
                row = bench_decode_shape(batch, ctx, page, ceil, variants,
                                         ours_cfgs=decode_cfgs, ragged_cfgs=ragged_cfgs)
                result["decode"].append(row)
                for label in decode_cfgs or ():
                    log(f"  {label:24s} {fmt(row.get(label))}")
                log(f"B={batch:4d} ctx={ctx:5d} page={page:3d} floor {row['floor_us']:7.1f}us | "
                    f"ours {fmt(row.get('ours'))} | ragged {fmt(row.get('ours_ragged'))} | "
                    f"two-launch {fmt(row.get('ours_two_launch'))} | "
                    f"jax {fmt(row.get('jax'))} | ref {fmt(row.get('reference'))}")
                dump(args.out, "kernels.json", result)
    if not args.mixed_first:
        run_mixed()
    dump(args.out, "kernels.json", result)
    md = markdown(result)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(md)
    try:
        plot(result, os.path.join(args.out, "kernels.png"))
    except Exception as e:  # the numbers matter more than the picture
        log("plot failed:", repr(e))
    print(md)


if __name__ == "__main__":
    main()
