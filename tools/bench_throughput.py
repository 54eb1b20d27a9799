"""Offline throughput, jaxpage vs HF transformers on the same GPU and the same random weights.

A random-weight HF model of a standard shape is saved once as safetensors; each engine then runs
in its own subprocess (so JAX and torch never share the card's memory) on the same token-id
prompts: jaxpage through ``jaxpage bench throughput``-style code, HF through ``generate_batch``
(its continuous batching). Prints vLLM's line for each and writes JSON + Markdown.

    python tools/bench_throughput.py --preset llama3.2-1b --input-len 1024 --output-len 128 \\
        --num-prompts 200 --out docs/benchmarks/throughput
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def save_random_hf_model(preset: str, path: str, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxpage.entrypoints.bench import PRESETS

    cfg = AutoConfig.for_model(**{k: v for k, v in PRESETS[preset].items() if k != "architectures"})
    cfg.architectures = PRESETS[preset]["architectures"]
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)


def make_requests(ns, vocab: int):
    from jaxpage.entrypoints.bench import random_requests

    return random_requests(ns.num_prompts, ns.input_len, ns.output_len, vocab, ns.random_range_ratio, 0)


# jaxpage's variants: engine name -> LLM arguments beside the shared ones.
JAXPAGE_ENGINES = {"jaxpage": {}, "jaxpage-sync": dict(async_scheduling=False),
                   "jaxpage-fp8": dict(kv_cache_dtype="fp8")}


def run_jaxpage(ns, path: str, engine: str = "jaxpage") -> dict:
    from jaxpage import LLM, SamplingParams
    from jaxpage.entrypoints.bench import completed

    llm = LLM(model=path, dtype=ns.dtype, max_model_len=ns.max_model_len,
              max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
              tensor_parallel_size=ns.tensor_parallel_size, **JAXPAGE_ENGINES[engine])
    reqs = make_requests(ns, llm.loaded.config.vocab_size)
    completed(llm.generate([r[0] for r in reqs[:8]], SamplingParams(max_tokens=4, ignore_eos=True),
                           use_tqdm=False))
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=o) for _, o in reqs]
    start = time.perf_counter()
    outs = llm.generate([r[0] for r in reqs], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    completed(outs)
    return _result(engine, reqs, sum(len(o.outputs[0].token_ids) for o in outs), elapsed)


def run_hf(ns, path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=getattr(torch, ns.dtype),
                                                 device_map="cuda", attn_implementation="paged|sdpa")
    reqs = make_requests(ns, model.config.vocab_size)
    gen = GenerationConfig(max_new_tokens=max(o for _, o in reqs), do_sample=False,
                           eos_token_id=-1, pad_token_id=0, use_cuda_graph=False)
    model.generate_batch(inputs=[r[0] for r in reqs[:8]],
                         generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1,
                                                            pad_token_id=0))
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = model.generate_batch(inputs=[r[0] for r in reqs], generation_config=gen)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.generated_tokens) for o in outs.values())
    return _result("hf-generate_batch", reqs, num_out, elapsed)


def _result(engine: str, reqs, num_out: int, elapsed: float) -> dict:
    num_in = sum(len(r[0]) for r in reqs)
    res = dict(engine=engine, elapsed_s=elapsed, num_requests=len(reqs), output_tokens=num_out,
               requests_per_s=len(reqs) / elapsed, total_tokens_per_s=(num_in + num_out) / elapsed,
               output_tokens_per_s=num_out / elapsed)
    print(f"[{engine}] Throughput: {res['requests_per_s']:.2f} requests/s, "
          f"{res['total_tokens_per_s']:.2f} total tokens/s, {res['output_tokens_per_s']:.2f} output tokens/s",
          flush=True)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="jaxpage only: devices the model splits over")
    p.add_argument("--engines", default="jaxpage,hf",
                   help="comma list of jaxpage, jaxpage-sync (async scheduling off), "
                        "jaxpage-fp8 (fp8 KV pool), hf")
    p.add_argument("--out", default=None)
    p.add_argument("--_engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_path", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns._engine:  # child process: one engine
        if ns._engine != "hf" and ns._engine not in JAXPAGE_ENGINES:
            raise SystemExit(f"unknown engine {ns._engine!r}")
        res = run_hf(ns, ns._path) if ns._engine == "hf" else run_jaxpage(ns, ns._path, ns._engine)
        print("RESULT " + json.dumps(res))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        save_random_hf_model(ns.preset, tmp, ns.dtype)
        for engine in ns.engines.split(","):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--_engine", engine, "--_path", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"[{engine}] failed:\n{proc.stderr[-3000:]}", flush=True)
                results.append(dict(engine=engine, error=proc.stderr[-1500:]))
                continue
            results.append(json.loads(lines[-1][7:]))
            print(proc.stdout.splitlines()[-2] if len(proc.stdout.splitlines()) > 1 else lines[-1])
    import jax
    meta = dict(preset=ns.preset, dtype=ns.dtype, input_len=ns.input_len, output_len=ns.output_len,
                num_prompts=ns.num_prompts, jax=jax.__version__, command=" ".join(sys.argv),
                date=time.strftime("%Y-%m-%d"))
    try:
        import torch
        meta["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - torch is optional for the report
        pass
    if ns.out:
        os.makedirs(ns.out, exist_ok=True)
        name = f"{ns.preset}_{ns.input_len}_{ns.output_len}"
        with open(os.path.join(ns.out, f"{name}.json"), "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
