"""``jaxpage bench throughput | latency``: vLLM's offline benchmarks, with its flags and printout.

Models: any ``--model`` jaxpage loads, or a standard shape from shared/BENCHMARKS.md with random
weights (``--model preset:llama3.2-1b`` implies ``--load-format dummy``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

PRESETS: dict[str, dict] = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                      hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "llama3.2-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152,
                         hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}


def engine_kwargs(ns: argparse.Namespace) -> dict:
    from jaxpage.entrypoints.cli import _engine_args

    kw = vars(_engine_args(ns))
    if ns.model.startswith("preset:"):
        name = ns.model.split(":", 1)[1]
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        kw.update(model=None, load_format="dummy", hf_config=PRESETS[name])
    return kw


def random_requests(num_prompts: int, input_len: int, output_len: int, vocab: int,
                    range_ratio: float, seed: int) -> list[tuple[list[int], int]]:
    """vLLM's random dataset: lengths uniform in [len * (1 - r), len * (1 + r)]."""
    rng = np.random.default_rng(seed)

    def lengths(mean):
        lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.integers(lo, hi + 1, num_prompts)

    ins, outs = lengths(input_len), lengths(output_len)
    return [(rng.integers(100, vocab - 100, int(i)).tolist(), int(o)) for i, o in zip(ins, outs)]


def completed(outs):
    """``outs``, or a RuntimeError if a request failed in the engine: a benchmark must not time
    requests that the engine failed (they finish at once, with no tokens)."""
    failed = [o for o in outs if o.outputs and o.outputs[0].finish_reason == "error"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(outs)} requests failed in the engine: "
                           f"{failed[0].error}")
    return outs


def run_throughput(ns: argparse.Namespace) -> dict:
    from jaxpage import LLM, SamplingParams

    llm = LLM(**engine_kwargs(ns))
    vocab = llm.loaded.config.vocab_size
    reqs = random_requests(ns.num_prompts, ns.input_len, ns.output_len, vocab, ns.random_range_ratio, ns.seed)
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=o, seed=i)
              for i, (_, o) in enumerate(reqs)]
    completed(llm.generate([r[0] for r in reqs[:min(8, len(reqs))]],
                           [SamplingParams(max_tokens=4, ignore_eos=True)] * min(8, len(reqs)),
                           use_tqdm=False))
    start = time.perf_counter()
    outs = llm.generate([r[0] for r in reqs], params, use_tqdm=not ns.no_tqdm)
    elapsed = time.perf_counter() - start
    completed(outs)
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    num_in = sum(len(r[0]) for r in reqs)
    result = dict(elapsed_time=elapsed, num_requests=len(reqs), total_num_tokens=num_in + num_out,
                  num_output_tokens=num_out, requests_per_second=len(reqs) / elapsed,
                  tokens_per_second=(num_in + num_out) / elapsed,
                  output_tokens_per_second=num_out / elapsed)
    print(f"Throughput: {result['requests_per_second']:.2f} requests/s, "
          f"{result['tokens_per_second']:.2f} total tokens/s, "
          f"{result['output_tokens_per_second']:.2f} output tokens/s")
    return result


def run_latency(ns: argparse.Namespace) -> dict:
    from jaxpage import LLM, SamplingParams

    llm = LLM(**engine_kwargs(ns))
    vocab = llm.loaded.config.vocab_size
    rng = np.random.default_rng(ns.seed)
    prompts = [rng.integers(100, vocab - 100, ns.input_len).tolist() for _ in range(ns.batch_size)]
    sp = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=ns.output_len)

    def once() -> float:
        start = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        elapsed = time.perf_counter() - start
        completed(outs)
        return elapsed

    for _ in range(ns.num_iters_warmup):
        once()
    lat = np.array([once() for _ in range(ns.num_iters)])
    print(f"Avg latency: {lat.mean():.4f} seconds")
    pct = {p: float(np.percentile(lat, p)) for p in (10, 25, 50, 75, 90, 99)}
    for p, v in pct.items():
        print(f"{p}% percentile latency: {v:.4f} seconds")
    return dict(avg_latency=float(lat.mean()), latencies=lat.tolist(), percentiles=pct)


def add_parser(sub) -> None:
    from jaxpage.entrypoints.cli import _add_engine_args

    bench = sub.add_parser("bench", help="offline benchmarks (vLLM's flags and printout)")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    tp = kinds.add_parser("throughput", help="offline throughput on a random dataset")
    tp.add_argument("--dataset", default="random", choices=["random"])
    tp.add_argument("--input-len", type=int, default=1024)
    tp.add_argument("--output-len", type=int, default=128)
    tp.add_argument("--num-prompts", type=int, default=200)
    tp.add_argument("--random-range-ratio", type=float, default=0.0)
    tp.add_argument("--no-tqdm", action="store_true")
    lat = kinds.add_parser("latency", help="whole-batch latency percentiles")
    lat.add_argument("--input-len", type=int, default=32)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--batch-size", type=int, default=8)
    lat.add_argument("--num-iters-warmup", type=int, default=10)
    lat.add_argument("--num-iters", type=int, default=30)
    for p in (tp, lat):
        _add_engine_args(p)
        p.add_argument("--output-json", default=None)


def main(ns: argparse.Namespace) -> int:
    result = run_throughput(ns) if ns.bench_kind == "throughput" else run_latency(ns)
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(dict(args={k: v for k, v in vars(ns).items() if k != "func"}, **result), f, indent=2)
    return 0
