"""Where does the ragged kernel's prefill tile lose time? One GPU call, side by side.

The mixed batch of ``bench_kernels.py`` (4 prefill chunks x 512 + 60 decodes) misses its floor
because its prefill half runs at ~150 TFLOP/s. This study times, in one run on one card:

  * ceilings (HBM read, bf16 matmul);
  * dense causal attention of about the same work through jax's own kernels: the Triton-lowered
    Pallas ``mha`` (what this lowering reaches without paging), cuDNN, and the Mosaic GPU
    ``attention_mgpu`` (fp16) — what a Hopper path could reach;
  * the prefill half of the mixed batch through our ragged kernel, one knob at a time: software
    pipelining depth (``num_stages`` 1..4: if it changes nothing, the loads are not pipelined),
    loads issued ahead (``prefetch="index"``: page ids one block ahead so Triton can pipeline
    the K/V copies), program order (``order="lpt"``), tile shapes;
  * decode shapes through the decode kernel and the ragged kernel's decode tile, same knobs;
  * the full mixed batch for the default and the best prefill candidates.

``tools/triton_report.py`` gives the compile side (registers, shared memory, instruction mix).

    python tools/study_prefill.py --out /tmp/study        # on a GPU
    python tools/study_prefill.py --interpret --out /tmp/s # CPU smoke test (tiny shapes)

Writes ``study.json`` and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402  (tools/ is not a package)

# Prefill-tile candidates (ragged kernel kwargs), timed on the prefill half of the mixed batch.
PREFILL_VARIANTS = {
    "default": {},
    "natural": dict(order="natural"),
    "reverse": dict(order="reverse"),
    "s2": dict(num_stages=2),
    "index": dict(prefetch="index"),
    "bm128_w8": dict(block_m=128, num_warps=8),
    "bkv32_s4": dict(block_kv=32, num_stages=4),
}
# Decode shapes: the decode kernel and the ragged kernel's decode tile, loads issued ahead or not.
DECODE_SHAPES = ((16, 2048), (64, 2048), (16, 8192))
DECODE_VARIANTS = {"none": {}}
RAGGED_DECODE_VARIANTS = {"ragged_none": {}, "ragged_lpt": dict(order="lpt"),
                          "ragged_index": dict(decode_prefetch="index"),
                          "ragged_lpt_index": dict(order="lpt", decode_prefetch="index")}


def causal_flops(q_lens, kv_lens, n_heads, head_dim):
    return sum(4 * n_heads * head_dim * sum(b - a + j + 1 for j in range(a))
               for a, b in zip(q_lens, kv_lens))


def time_call(call, qs, pools, n_runs=20):
    if time.time() > bk.DEADLINE:
        return dict(error="skipped: time budget")
    try:
        return bk.bench_calls(call, qs, pools, n_runs=n_runs)
    except Exception as e:  # keep going; the record shows the failure
        bk.log(f"  failed: {type(e).__name__}: {str(e)[:300]}")
        return dict(error=f"{type(e).__name__}: {str(e)[:300]}")


def prefill_half(page, variants, ceil, check=True, shuffle=True):
    """The 4 prefill chunks of the mixed batch alone (num_seqs = 4: the decodes are padding);
    ``shuffle=False``: each request's pages consecutive in the pool (locality check)."""
    md, q, pools, info = bk.mixed_batch(page, seed=21, scale=1 / 16 if bk.INTERPRET else 1.0,
                                        shuffle=shuffle)
    pre = dict(md, num_seqs=jnp.asarray([4], jnp.int32))
    flops = causal_flops(info["q_lens"][:4], info["kv_lens"][:4], bk.N, bk.H)
    qs = (q,) + bk.make_qs(q.shape[0], 3, 77)
    want = bk.ref_call(pre)(q, pools[0]) if check else None
    rows = {}
    for label, cfg in variants.items():
        call = bk.ours_ragged(pre, **cfg)
        err = None
        if want is not None:
            try:
                err = bk.rel_err(call(q, pools[0]), want)
            except Exception as e:
                rows[label] = dict(error=f"{type(e).__name__}: {str(e)[:300]}", config=cfg)
                bk.log(f"page {page} {label}: failed {rows[label]['error']}")
                continue
        r = time_call(call, qs, pools)
        r.update(config=cfg, rel_err=err)
        if "time_us" in r:
            r["tflops"] = flops / (r["time_us"] * 1e-6) / 1e12
            r["pct_matmul"] = 100 * r["tflops"] * 1e12 / ceil["matmul_flops"]
        rows[label] = r
        bk.log(f"prefill half page {page}{'' if shuffle else ' unshuffled'} {label:18s} "
               + (f"{r['time_us']:7.1f} us {r['tflops']:5.0f} TFLOP/s err {err}"
                  if "time_us" in r else r.get("error", "")))
    return dict(page=page, shuffle=shuffle, flops=flops, variants=rows)


def dense_baselines(ceil):
    """Causal self-attention, 4 x 1024 tokens, 32 q heads, H=128 (~ the prefill half's FLOPs)."""
    batch, seq = (4, 1024) if not bk.INTERPRET else (1, 128)
    out = dict(batch=batch, seq=seq, flops=4 * batch * bk.N * bk.H * seq * (seq + 1) // 2)
    key = jax.random.key(3)
    q = jax.random.normal(key, (batch, seq, bk.N, bk.H), jnp.bfloat16)
    kg = jax.random.normal(jax.random.key(4), (batch, seq, bk.K, bk.H), jnp.bfloat16)
    vg = jax.random.normal(jax.random.key(5), (batch, seq, bk.K, bk.H), jnp.bfloat16)
    rep = bk.N // bk.K
    kf, vf = jnp.repeat(kg, rep, axis=2), jnp.repeat(vg, rep, axis=2)

    def rec(label, fn, args):
        if time.time() > bk.DEADLINE:
            out[label] = dict(error="skipped: time budget")
            return
        try:
            t = statistics.median(bk.time_runs(jax.jit(fn), args, 20))  # warms up itself
            r = dict(time_us=t * 1e6, tflops=out["flops"] / t / 1e12)
            r["pct_matmul"] = 100 * r["tflops"] * 1e12 / ceil["matmul_flops"]
        except Exception as e:
            r = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        out[label] = r
        bk.log(f"dense {label:28s} " + (f"{r['time_us']:7.1f} us {r['tflops']:5.0f} TFLOP/s"
                                         if "tflops" in r else r["error"]))

    from jax.experimental.pallas.ops.gpu import attention as pmha
    for bq, bkv, w, s in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2)):
        bs = pmha.BlockSizes(block_q=bq, block_k=bkv, block_q_dkv=32, block_kv_dkv=32,
                             block_q_dq=32, block_kv_dq=32)
        rec(f"pallas_triton_mha_q{bq}_k{bkv}_w{w}_s{s}",
            lambda q, k, v, bs=bs, w=w, s=s: pmha.mha(
                q, k, v, None, sm_scale=bk.SM_SCALE, causal=True, block_sizes=bs,
                num_warps=w, num_stages=s, interpret=bk.INTERPRET), (q, kf, vf))
    if bk.INTERPRET:
        return out
    rec("cudnn", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=bk.SM_SCALE, is_causal=True, implementation="cudnn"), (q, kg, vg))
    rec("xla", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=bk.SM_SCALE, is_causal=True, implementation="xla"), (q, kg, vg))
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as am
        for bq, bkv, steps in ((64, 128, 2), (128, 128, 2), (64, 64, 4)):
            cfg = am.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps,
                                  causal=True)
            f16 = lambda x: x.astype(jnp.float16)  # noqa: E731  (its bf16 path errs: GPU.md)
            rec(f"mosaic_gpu_fp16_q{bq}_k{bkv}_c{steps}",
                lambda q, k, v, cfg=cfg: am.attention(q, k, v, cfg), (f16(q), f16(kg), f16(vg)))
    except Exception as e:
        out["mosaic_gpu"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    return out


def decode_shapes(ceil):
    rows = []
    for batch, ctx in ((4, 256),) if bk.INTERPRET else DECODE_SHAPES:
        if time.time() > bk.DEADLINE:
            break
        row = bk.bench_decode_shape(batch, ctx, 16, ceil, ("ours", "ours_ragged"),
                                    ours_cfgs=DECODE_VARIANTS, ragged_cfgs=RAGGED_DECODE_VARIANTS)
        rows.append(row)
        bk.log(f"decode B={batch} ctx={ctx}: " + " ".join(
            f"{k}={row[k]['pct_read_bw']:.0f}%" for k in (*DECODE_VARIANTS,
                                                          *RAGGED_DECODE_VARIANTS)
            if "pct_read_bw" in row.get(k, {})))
    return rows


def mixed(variants, ceil, page=16):
    row = bk.bench_mixed(ceil, page, ragged_cfgs=variants, with_ref=False, breakdown="halves")
    for k, v in row.items():
        if isinstance(v, dict) and "time_us" in v:
            bk.log(f"mixed page {page} {k:28s} {v['time_us']:7.1f} us  x{v['x_floor']:.2f} floor"
                   f"  err {v.get('rel_err')}")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="study_prefill_out")
    p.add_argument("--interpret", action="store_true")
    p.add_argument("--time-budget", type=float, default=480.0)
    p.add_argument("--mixed-cfgs", default=None, help="JSON {label: kwargs} for the full batch")
    p.add_argument("--once", default=None, help="JSON kwargs: run the prefill half once and exit "
                   "(for a profiler)")
    p.add_argument("--skip", default="", help="comma list of: dense,decode,mixed")
    args = p.parse_args(argv)
    bk.INTERPRET = args.interpret
    bk.DEADLINE = bk.T0 + args.time_budget
    skip = set(args.skip.split(","))
    if args.once is not None:
        md, q, pools, _ = bk.mixed_batch(16, seed=21)
        pre = dict(md, num_seqs=jnp.asarray([4], jnp.int32))
        call = jax.jit(bk.ours_ragged(pre, **json.loads(args.once)))
        for _ in range(3):
            jax.block_until_ready(call(q, pools[0]))
        return
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    res = dict(device=getattr(dev, "device_kind", str(dev)), jax_version=jax.__version__,
               command="python tools/study_prefill.py " + " ".join(sys.argv[1:]))
    bk.log(f"device {res['device']}, jax {jax.__version__}")
    res["ceilings"] = ceil = bk.ceilings(0.25 if args.interpret else 4.0)
    bk.log("ceilings: read {:.2f} TB/s, matmul {:.0f} TFLOP/s".format(
        ceil["read_bw"] / 1e12, ceil["matmul_flops"] / 1e12))
    save = lambda: bk.dump(args.out, "study.json", res)  # noqa: E731
    res["prefill_p16"] = prefill_half(16, PREFILL_VARIANTS, ceil)
    save()
    res["prefill_p16_unshuffled"] = prefill_half(16, {k: PREFILL_VARIANTS[k] for k in
                                                      ("default", "natural")}, ceil,
                                                 shuffle=False)
    save()
    if "dense" not in skip:
        res["dense"] = dense_baselines(ceil)
        save()
    if "decode" not in skip:
        res["decode"] = decode_shapes(ceil)
        save()
    if "mixed" not in skip:
        cfgs = json.loads(args.mixed_cfgs) if args.mixed_cfgs else {
            "default": {}, "natural": dict(order="natural"), "reverse": dict(order="reverse"),
            "lpt": dict(order="lpt"),
            "lpt_s2": dict(order="lpt", num_stages=2),
            "lpt_index": dict(order="lpt", prefetch="index"),
            "lpt_dec64": dict(order="lpt", decode_block_kv=64),
            "lpt_bm128_w8": dict(order="lpt", block_m=128, num_warps=8)}
        res["mixed_p16"] = mixed(cfgs, ceil, 16)
        save()
    save()


if __name__ == "__main__":
    main()
