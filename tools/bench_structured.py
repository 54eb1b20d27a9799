"""What structured outputs cost: one engine, the same requests three ways, taking turns.

    plain, async     no constraint, async scheduling on (the default)
    plain, sync      no constraint, async scheduling off (what a live grammar forces)
    regex            every request constrained to ``[a-z ]+`` (so it runs the full
                     ``--output-len`` tokens like the plain ones): sync stepping, plus each
                     step's masks computed on the host, sent, and applied by the sampler
    json             a bounded JSON schema (lengths vary: reported per output token)

Random weights of a preset's shape with a real tokenizer (``--tokenizer``: a directory, e.g.
SmolLM2's as ``jaxpage convert`` writes it, matching the smollm2-135m preset's vocabulary).
Prints a Markdown table; raw numbers to ``--out``/structured.json.

    python tools/bench_structured.py --preset smollm2-135m --tokenizer /tmp/smol_tok --out /tmp/bs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import chart_option  # noqa: E402  (tools/ is not a package)

from jaxpage import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from jaxpage.entrypoints.bench import PRESETS  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "name", "tags"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                         "name": {"type": "string", "maxLength": 40},
                         "tags": {"type": "array", "maxItems": 4,
                                  "items": {"type": "string", "maxLength": 16}}}}


def workloads(output_len: int) -> dict[str, tuple[bool, SamplingParams]]:
    """name -> (async scheduling, params)."""
    base = dict(temperature=0.0, max_tokens=output_len)
    return {
        "plain, async": (True, SamplingParams(ignore_eos=True, **base)),
        "plain, sync": (False, SamplingParams(ignore_eos=True, **base)),
        "regex": (True, SamplingParams(ignore_eos=True, structured_outputs=StructuredOutputsParams(
            regex="[a-z ]+"), **base)),
        "json": (True, SamplingParams(structured_outputs=StructuredOutputsParams(
            json=SCHEMA, disable_any_whitespace=True), **base)),
    }


def run_once(llm: LLM, prompts, params: SamplingParams, async_scheduling: bool) -> dict:
    llm.engine.async_scheduling = async_scheduling
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    if any(o.error for o in outs):
        raise RuntimeError(f"a request failed: {next(o.error for o in outs if o.error)}")
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print(f"  {len(prompts)} requests, async={async_scheduling}, "
          f"{'grammar' if params.structured_outputs else 'plain'}: {tokens} tokens in "
          f"{seconds:.2f} s", file=sys.stderr, flush=True)
    return dict(seconds=seconds, output_tokens=tokens, tok_s=tokens / seconds)


def plot(result: dict, png: str) -> None:
    """Bar chart of each workload's best output tok/s (from structured.json)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["runs"])
    best = [max(r["tok_s"] for r in result["runs"][n]) for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(names, best, color=["#4878a8", "#7aa6cf", "#d08a3c", "#c0504d"][:len(names)])
    for b, v in zip(bars, best):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom")
    ax.set_ylabel("output tok/s (best run)")
    ax.set_title(result["head"], fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    p.add_argument("--tokenizer", help="a tokenizer directory (required unless --plot)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--out", default=None)
    ns = chart_option.parse(p, argv, plot, "structured", required="tokenizer")
    if ns is None:
        return 0

    cfg = PRESETS[ns.preset]
    t_start = time.perf_counter()
    # Buckets compile on first use, in the untimed warm-up round over the same requests.
    llm = LLM(model=None, load_format="dummy", hf_config=cfg, tokenizer=ns.tokenizer, seed=0,
              max_num_seqs=ns.max_num_seqs, max_model_len=ns.input_len + ns.output_len + 16,
              compile_all_buckets=False)
    print(f"engine ready in {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    rng = np.random.default_rng(0)
    vocab = min(cfg["vocab_size"], len(llm.tokenizer))
    prompts = [rng.integers(100, vocab, ns.input_len).tolist() for _ in range(ns.num_prompts)]
    loads = workloads(ns.output_len)
    for name, (async_, sp) in loads.items():  # warm-up: every bucket and sampler variant
        run_once(llm, prompts, sp, async_)
    results: dict[str, list[dict]] = {name: [] for name in loads}
    for _ in range(ns.repeats):
        for name, (async_, sp) in loads.items():
            results[name].append(run_once(llm, prompts, sp, async_))
    base = max(r["tok_s"] for r in results["plain, async"])
    head = (f"{ns.preset} (random weights), {ns.num_prompts} prompts x {ns.input_len} in / "
            f"<= {ns.output_len} out, greedy; {jax.devices()[0].device_kind}, JAX "
            f"{jax.__version__}")
    print(head + "\n")
    print("| workload | output tokens | best s | output tok/s | vs plain, async |\n"
          "|---|---|---|---|---|")
    for name, runs in results.items():
        best = max(runs, key=lambda r: r["tok_s"])
        print(f"| {name} | {best['output_tokens']} | {best['seconds']:.2f} | "
              f"{best['tok_s']:,.0f} | {best['tok_s'] / base:.2f}x |")
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "structured.json").write_text(json.dumps(dict(
            head=head, device=jax.devices()[0].device_kind, jax=jax.__version__,
            args=vars(ns), runs=results), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
