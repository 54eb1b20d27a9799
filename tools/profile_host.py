"""Where an engine step's host time goes: per variant (async scheduling on or off, n-gram
speculative decoding), the ms per step of a timed run, then a second run under cProfile
(the functions with the most own time and the most cumulative time per step). Calls that
wait for the device (``_value``, ``device_get``, ``block_until_ready``) show where the host
blocks; the rest is the host's own work per step, which async scheduling can hide only up to
the device's time per step.

    python tools/profile_host.py --model preset:llama3.2-1b --batch 32 --out /tmp/host.json
    python tools/profile_host.py --hf-config tiny.json --batch 8 --max-tokens 16   # CPU smoke

Random prompts, greedy, ``ignore_eos``: every variant makes the same number of steps' work.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import time

import numpy as np

VARIANTS = {"sync": dict(async_scheduling=False), "async": {},
            "ngram": dict(speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                              "prompt_lookup_max": 4})}


def top_functions(prof: cProfile.Profile, steps: int, key: str, n: int) -> list[dict]:
    """The ``n`` functions with the most ``key`` time ("tottime" or "cumtime"), ms per step."""
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    rows = [dict(function=f"{fn.rsplit('site-packages/', 1)[-1]}:{line}({name})", calls=nc,
                 tottime_ms=1e3 * tt / steps, cumtime_ms=1e3 * ct / steps)
            for (fn, line, name), (_, nc, tt, ct, _) in stats.items()]
    rows.sort(key=lambda r: -r[f"{key}_ms"])
    return rows[:n]


def run_variant(kw: dict, prompt_sets: list[list[list[int]]], max_tokens: int,
                top: int) -> dict:
    """Three runs of a batch, each on prompts of its own (a repeated prompt would hit the
    prefix cache and take other buckets): warm-up, timed, profiled."""
    from jaxpage import LLM, SamplingParams

    llm = LLM(**kw)
    engine = llm.engine
    warm, timed, profiled = ([{"prompt_token_ids": p} for p in ps] for ps in prompt_sets)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(warm, sp, use_tqdm=False)  # compiles what the timed runs take
    steps, step = [0], engine.step

    def counted():
        steps[0] += 1
        return step()

    engine.step = counted
    t = time.perf_counter()
    llm.generate(timed, sp, use_tqdm=False)
    ms_per_step = 1e3 * (time.perf_counter() - t) / steps[0]
    timed_steps, steps[0] = steps[0], 0
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    llm.generate(profiled, sp, use_tqdm=False)
    prof.disable()
    profiled_ms = 1e3 * (time.perf_counter() - t) / steps[0]
    out = dict(ms_per_step=ms_per_step, steps=timed_steps, profiled_ms_per_step=profiled_ms,
               by_tottime=top_functions(prof, steps[0], "tottime", top),
               by_cumtime=top_functions(prof, steps[0], "cumtime", top))
    del llm, engine
    gc.collect()
    return out


def main(argv=None) -> dict:
    from jaxpage.entrypoints.bench import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="preset:llama3.2-1b")
    p.add_argument("--hf-config", default=None, help="a config.json with random weights")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--variants", default="sync,async,ngram")
    p.add_argument("--num-pages", type=int, default=2048,
                   help="KV pool pages (each variant builds an engine of its own)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    ns = p.parse_args(argv)
    cfg = (json.loads(open(ns.hf_config).read()) if ns.hf_config
           else PRESETS[ns.model.split(":", 1)[1]])
    base = dict(model=None, load_format="dummy", hf_config=cfg, dtype=ns.dtype, seed=0,
                max_num_seqs=max(8, ns.batch), compile_all_buckets=False,
                max_model_len=ns.input_len + ns.max_tokens + 8,
                max_num_batched_tokens=max(256, ns.batch * ns.input_len),
                num_pages=ns.num_pages)
    rng = np.random.default_rng(1)
    prompt_sets = [[rng.integers(100, cfg["vocab_size"] - 100, ns.input_len).tolist()
                    for _ in range(ns.batch)] for _ in range(3)]
    import jax

    import jaxpage
    res = dict(model=ns.hf_config or ns.model, jaxpage=os.path.dirname(jaxpage.__file__), batch=ns.batch, max_tokens=ns.max_tokens,
               device=jax.devices()[0].device_kind, jax=jax.__version__, variants={})
    for name in ns.variants.split(","):
        r = run_variant({**base, **VARIANTS[name]}, prompt_sets, ns.max_tokens, ns.top)
        res["variants"][name] = r
        print(f"== {name}: {r['ms_per_step']:.2f} ms/step ({r['steps']} steps); under cProfile "
              f"{r['profiled_ms_per_step']:.2f}", flush=True)
        for key in ("tottime", "cumtime"):
            print(f"   by {key} (ms per step):")
            for f in r[f"by_{key}"][:ns.top]:
                print(f"   {f[key + '_ms']:7.3f}  {f['calls']:7d}  {f['function'][:110]}")
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
