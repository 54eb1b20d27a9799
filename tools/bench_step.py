"""JIT step times per bucket: compile time and median step time of the jitted forward, for
decode-only and prefill batches, per attention backend, beside the decode floor.

Runs unchanged on CPU, GPU and Cloud TPU (only jax + jaxpage):

    python tools/bench_step.py --model preset:llama3.2-1b --backends reference,pallas \\
        --ctx 1024 --max-num-seqs 64 --max-num-batched-tokens 1024 --out docs/benchmarks/step
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpage import LLM, SamplingParams
from jaxpage.engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from jaxpage.entrypoints.bench import PRESETS
from jaxpage.models.loader import _dummy_draw
from jaxpage.runner.input_batch import PackedLayout


def hbm_read_bandwidth() -> float | None:
    """Bytes/s of a jnp.sum over a 4 GiB bf16 array (None on CPU)."""
    if jax.default_backend() == "cpu":
        return None
    x = jax.random.normal(jax.random.key(0), (1 << 31,), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    f(x).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    del x
    return (1 << 32) / min(times)


def _time(fn, iters: int) -> float:
    fn()  # warm
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def make_llm(model: str, dtype: str, backend: str, max_num_seqs: int,
             max_num_batched_tokens: int, ctx: int, block_size: int = 16,
             tensor_parallel_size: int = 1):
    """An engine for ``model`` (``preset:NAME`` = random weights of a standard shape) whose pool
    holds ``max_num_seqs`` requests of ``ctx`` tokens, filled with fresh random KV (split over
    ``tensor_parallel_size`` devices as the engine splits it)."""
    kw = dict(model=None, load_format="dummy", hf_config=PRESETS[model.split(":", 1)[1]]) \
        if model.startswith("preset:") else dict(model=model)
    # A pool just big enough for the largest decode batch: the card's memory stays free for
    # the next backend, and filling the pool with random values stays cheap.
    num_pages = max_num_seqs * math.ceil((ctx + 16) / block_size) + 1
    llm = LLM(**kw, dtype=dtype, attention_backend=backend, max_model_len=ctx + 16,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
              block_size=block_size, num_pages=num_pages, compile_all_buckets=False,
              tensor_parallel_size=tensor_parallel_size)
    runner = llm.engine.model_runner
    # Fresh random KV (never zeros): timings on zeros can flatter the hardware.
    # Drawn straight into each layer's (possibly split) sharding by the loader's cached draw:
    # one compile for all layers.
    for i, x in enumerate(runner.kv_pages):
        draw = _dummy_draw(("normal", 1.0), tuple(x.shape), x.dtype, x.sharding)
        runner.kv_pages[i] = draw(jax.random.key(i))
    return llm


def stage_batch(runner, kind: str, num_reqs: int, q_len: int, ctx: int, rng):
    """Puts ``num_reqs`` requests (``q_len`` new tokens after ``ctx - q_len`` cached ones, pages
    shuffled over the pool) into the runner's batch. Returns (step, bucket, release): ``step``
    runs the jitted forward once and waits for it; ``release`` empties the batch again."""
    pages_per_seq = math.ceil((ctx + 1) / runner.spec.page_size)
    pages = rng.permutation(np.arange(1, runner.num_pages))[:num_reqs * pages_per_seq]
    new = [NewRequestData(f"b{i}", rng.integers(0, runner.vocab_size, ctx).tolist(), ctx,
                          SamplingParams(temperature=0.0), 0,
                          pages[i * pages_per_seq:(i + 1) * pages_per_seq].tolist(), ctx - q_len)
           for i in range(num_reqs)]
    so = SchedulerOutput(new, CachedRequestData(), {n.req_id: q_len for n in new},
                         num_reqs * q_len, set())
    runner.input_batch.update(so)
    bucket = runner.buckets.pick(num_reqs * q_len, num_reqs)
    packed = jax.device_put(runner.input_batch.prepare(
        so, [n.req_id for n in new], PackedLayout(*bucket, runner.pages_per_req)),
        runner._inputs)  # replicated over a tensor-parallel mesh, else the default device
    exe = runner._executable(bucket, decode_only=kind == "decode")

    def step():
        logits, runner.kv_pages, _ = exe(runner.params, runner.kv_pages, packed,
                                         runner.sampler.last_sampled)
        logits.block_until_ready()

    def release():
        runner.input_batch.update(SchedulerOutput([], CachedRequestData(), {}, 0,
                                                  {n.req_id for n in new}))
    return step, bucket, release


def decode_step_fn(model: str, dtype: str, backend: str, reqs: int, ctx: int,
                   tensor_parallel_size: int = 1):
    """One decode step of ``reqs`` requests at ``ctx`` tokens, as a blocking callable."""
    llm = make_llm(model, dtype, backend, reqs, max(reqs, 256), ctx,
                   tensor_parallel_size=tensor_parallel_size)
    step, _, _ = stage_batch(llm.engine.model_runner, "decode", reqs, 1, ctx,
                             np.random.default_rng(0))
    step.llm = llm  # keep the engine (and its pool) alive with the callable
    return step


def bench_backend(ns, backend: str, bw: float | None) -> list[dict]:
    llm = make_llm(ns.model, ns.dtype, backend, ns.max_num_seqs, ns.max_num_batched_tokens,
                   ns.ctx, ns.block_size)
    runner = llm.engine.model_runner
    cfg = runner.spec
    weight_bytes = sum(x.size * x.dtype.itemsize for x in runner.params)
    rng = np.random.default_rng(0)
    rows = []
    pages_per_seq = math.ceil((ns.ctx + 1) / cfg.page_size)
    for kind in ("decode", "prefill"):
        for t_bucket, r_bucket in runner.buckets.pairs():
            if kind == "decode" and t_bucket != runner.buckets.pick(r_bucket, r_bucket)[0]:
                continue
            if kind == "prefill" and r_bucket != runner.buckets.req_buckets[0]:
                continue
            num_reqs = r_bucket if kind == "decode" else 1
            q_len = 1 if kind == "decode" else t_bucket
            ctx = ns.ctx if kind == "decode" else t_bucket
            if num_reqs * pages_per_seq >= runner.num_pages or ctx > ns.ctx:
                continue
            step, bucket, release = stage_batch(runner, kind, num_reqs, q_len, ctx, rng)
            sec = _time(step, ns.iters)
            release()
            kv_read = num_reqs * ctx * cfg.page_bytes / cfg.page_size
            floor = (weight_bytes + kv_read) / bw if bw else None
            rows.append(dict(backend=runner.backend, kind=kind, T=bucket[0], R=bucket[1],
                             reqs=num_reqs, ctx=ctx,
                             compile_s=runner.compile_seconds[(*bucket, False, kind == "decode",
                                                               False)],
                             step_ms=sec * 1e3, floor_ms=floor * 1e3 if floor else None,
                             pct_of_floor=100 * floor / sec if floor else None))
            r = rows[-1]
            print(f"{backend:9s} {kind:7s} T={r['T']:5d} R={r['R']:4d} compile {r['compile_s']:6.1f}s "
                  f"step {r['step_ms']:8.3f} ms" + (f"  floor {r['floor_ms']:.3f} ms "
                                                   f"({r['pct_of_floor']:.0f}%)" if floor else ""),
                  flush=True)
    del llm, runner
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="preset:smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backends", default="reference,pallas")
    p.add_argument("--ctx", type=int, default=1024, help="context length of decode requests")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="directory for step.json / step.md")
    ns = p.parse_args()
    bw = hbm_read_bandwidth()
    device = jax.devices()[0].device_kind
    rows = []
    for backend in ns.backends.split(","):
        try:
            rows += bench_backend(ns, backend, bw)
        except NotImplementedError as e:
            print(f"{backend}: skipped ({e})", file=sys.stderr)
    meta = dict(device=device, jax=jax.__version__, platform=jax.default_backend(),
                hbm_read_bytes_per_s=bw, command=" ".join(sys.argv),
                date=time.strftime("%Y-%m-%d"), model=ns.model, ctx=ns.ctx)
    if ns.out:
        os.makedirs(ns.out, exist_ok=True)
        with open(os.path.join(ns.out, "step.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(os.path.join(ns.out, "step.md"), "w") as f:
            f.write(f"# JIT step times: {ns.model} on {device}\n\n")
            f.write("".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n")
            f.write("| backend | kind | T | R | ctx | compile s | step ms | floor ms | % of floor |\n")
            f.write("|---|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                fl = f"{r['floor_ms']:.3f} | {r['pct_of_floor']:.0f}%" if r["floor_ms"] else "– | –"
                f.write(f"| {r['backend']} | {r['kind']} | {r['T']} | {r['R']} | {r['ctx']} | "
                        f"{r['compile_s']:.1f} | {r['step_ms']:.3f} | {fl} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
