"""Offline throughput of engine variants side by side: one process per variant on the same
card, each built and warmed once, then runs taking turns (A, B, A, B, ...), so that the
card's state and the host's load drift alike for every variant.

A variant is an engine configuration (LLM arguments) and, optionally, another copy of the
sources (its ``PYTHONPATH``): the engine before a change against the one after it. Each
process gets an equal share of the card's memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``): left
to its default, the first process's XLA client takes 75% of the card and the other runs out
(NOTES.md, "Host time per step").

    python tools/ab_throughput.py --preset llama3.2-1b --num-prompts 600 \\
        --variant 'before={}@/tmp/base' --variant 'after={}' --out /tmp/ab.json
    python tools/ab_throughput.py --variant 'sync={"async_scheduling": false}' \\
        --variant 'async={}'

Random prompts (vLLM's random dataset, a fresh seed per rep, the same for every variant),
``ignore_eos``, greedy unless ``--temperature``. Prints a table of output tok/s per rep.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def parse_variant(text: str) -> tuple[str, dict, str | None]:
    """``NAME=JSON[@PYTHONPATH]`` -> (name, LLM arguments, sources path or None)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a variant is NAME=JSON[@PYTHONPATH], got {text!r}")
    kwargs, _, path = rest.partition("@")
    try:
        kw = json.loads(kwargs or "{}")
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"variant {name!r}: {e}") from None
    if not isinstance(kw, dict):
        raise argparse.ArgumentTypeError(f"variant {name!r}: the arguments must be an object")
    return name, kw, path or None


def child(spec: dict) -> None:
    """One variant's process: build, warm, then each rep when its turn comes."""
    import jaxpage
    from jaxpage import LLM, SamplingParams
    from jaxpage.entrypoints.bench import PRESETS, completed, random_requests

    t0 = time.time()
    cfg = (json.loads(open(spec["hf_config"]).read()) if spec["hf_config"]
           else PRESETS[spec["preset"]])
    llm = LLM(model=None, load_format="dummy", hf_config=cfg, **spec["engine"])
    vocab = llm.loaded.config.vocab_size
    sp = SamplingParams(temperature=spec["temperature"], ignore_eos=True, seed=0,
                        max_tokens=spec["output_len"])
    warm = random_requests(8, spec["input_len"], 4, vocab, 0.0, seed=1)
    completed(llm.generate([r[0] for r in warm], sp, use_tqdm=False))
    out = dict(name=spec["name"], jaxpage=os.path.dirname(jaxpage.__file__),
               startup_s=time.time() - t0, reps=[])
    turn, count, sync = spec["turn"], spec["count"], spec["sync_dir"]
    for rep in range(spec["reps"]):
        slot = rep * count + turn  # whose turn: every earlier slot has written its file
        while slot and not os.path.exists(os.path.join(sync, f"done_{slot - 1}")):
            time.sleep(0.05)
        reqs = random_requests(spec["num_prompts"], spec["input_len"], spec["output_len"],
                               vocab, 0.0, seed=100 + rep)
        start = time.perf_counter()
        outs = completed(llm.generate([r[0] for r in reqs], sp, use_tqdm=False))
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        out["reps"].append(dict(rep=rep, start=time.time() - elapsed, seconds=elapsed,
                                output_tokens=tokens, out_tok_s=tokens / elapsed))
        print(f"{spec['name']} rep {rep}: {tokens / elapsed:,.0f} output tok/s", flush=True)
        open(os.path.join(sync, f"done_{slot}"), "w").close()
    with open(spec["result"], "w") as f:
        json.dump(out, f)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", type=parse_variant, required=True,
                   help="NAME=JSON[@PYTHONPATH]: LLM arguments, another copy of the sources")
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--hf-config", default=None, help="a config.json instead of --preset")
    p.add_argument("--num-prompts", type=int, default=600)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--engine-kwargs", default='{"max_num_seqs": 128, '
                   '"max_num_batched_tokens": 2048}', help="LLM arguments of every variant")
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="each process's share of the card (default 0.9 / variants)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns._child:
        child(json.loads(ns._child))
        return {}
    names = [n for n, _, _ in ns.variant]
    if len(set(names)) != len(names):
        raise SystemExit(f"variant names must differ: {names}")
    shared = json.loads(ns.engine_kwargs)
    frac = ns.mem_fraction or 0.9 / len(ns.variant)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for turn, (name, kw, path) in enumerate(ns.variant):
            spec = dict(name=name, engine={**shared, **kw}, preset=ns.preset,
                        hf_config=ns.hf_config and os.path.abspath(ns.hf_config),
                        num_prompts=ns.num_prompts,
                        input_len=ns.input_len, output_len=ns.output_len, reps=ns.reps,
                        temperature=ns.temperature, turn=turn, count=len(ns.variant),
                        sync_dir=tmp, result=os.path.join(tmp, f"result_{turn}.json"))
            env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{frac:.3f}")
            if path:
                env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--variant", "x={}",
                 "--_child", json.dumps(spec)], env=env, cwd=tmp))
        deadline = time.time() + ns.timeout
        while any(proc.poll() is None for proc in procs):
            # a variant that died leaves the others waiting for its turn: all are stopped
            bad = [f"{name}: rc {proc.returncode}" for (name, _, _), proc in
                   zip(ns.variant, procs) if proc.returncode not in (None, 0)]
            if bad or time.time() > deadline:
                for proc in procs:
                    proc.kill()
                raise SystemExit(f"variants failed: {bad or 'timeout'}")
            time.sleep(0.2)
        bad = [name for (name, _, _), proc in zip(ns.variant, procs) if proc.returncode]
        if bad:
            raise SystemExit(f"variants failed: {bad}")
        results = [json.loads(open(os.path.join(tmp, f"result_{t}.json")).read())
                   for t in range(len(procs))]
    run = dict(preset=ns.hf_config or ns.preset, num_prompts=ns.num_prompts,
               input_len=ns.input_len, output_len=ns.output_len, temperature=ns.temperature,
               engine_kwargs=shared, variants=results)
    print("| variant | output tok/s per rep | mean | sources |\n|---|---|---|---|")
    for r in results:
        toks = [x["out_tok_s"] for x in r["reps"]]
        print(f"| {r['name']} | {' / '.join(f'{t:,.0f}' for t in toks)} | "
              f"{statistics.mean(toks):,.0f} | {r['jaxpage']} |")
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(run, f, indent=1)
    return run


if __name__ == "__main__":
    main()
