"""Speculative decoding (n-gram drafts) against plain decoding, side by side in one process.

Each variant is an engine of its own, built, warmed up and timed in turn: plain decoding with
async scheduling (the default), plain without it (what speculative decoding steps as), and
``ngram`` with each draft count. Greedy decoding, so every variant makes the same tokens; the
table gives output tok/s, engine steps, tokens per step, ms per step and the share of drafts
kept, for each batch size.

Workloads: ``copy`` (chat prompts asking the model to repeat a passage: where drafts from the
prompt pay most), ``chat`` (open questions: drafts come from the model's own repeats) — both
need a tokenizer with a chat template, e.g. the default SmolLM2; ``random`` (random token
prompts, for random-weight presets, whose acceptance says nothing about a trained model's).

    python tools/bench_spec_decode.py --model default --workload copy --batch-sizes 1,8
    python tools/bench_spec_decode.py --model preset:llama3.2-1b --workload random
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_step import device_kernels, summarize  # noqa: E402  (tools/ is not a package)

PASSAGES = [
    "The lighthouse keeper climbed the spiral stairs every evening, lit the great lamp, and "
    "wrote the weather in a worn leather book before the ships came past the rocks.",
    "To bake bread, mix flour, water, salt and yeast, knead the dough until it is smooth, let it "
    "rise for two hours, shape it, and bake it in a hot oven until the crust is brown.",
    "Chess began in India as chaturanga, travelled to Persia and then to Europe, where the queen "
    "became the strongest piece on the board in the fifteenth century.",
    "Volcanoes form where magma from the mantle reaches the surface, building mountains of ash "
    "and lava over thousands of years, and some of them still erupt today.",
]
QUESTIONS = ["the ocean", "a red bicycle", "quantum computers", "bread baking", "Paris in spring",
             "the history of chess", "volcanoes", "a lighthouse keeper"]


def make_prompts(kind: str, n: int, tokenizer, vocab: int, input_len: int, seed: int):
    if kind == "random":
        rng = np.random.default_rng(seed)
        return [rng.integers(100, vocab - 100, input_len).tolist() for _ in range(n)]
    if tokenizer is None:
        raise SystemExit(f"--workload {kind} needs a model with a tokenizer (e.g. default).")
    out = []
    for i in range(n):
        if kind == "copy":
            text = f"Repeat this text exactly, word for word: {PASSAGES[i % len(PASSAGES)]}"
        else:
            text = f"Tell me about {QUESTIONS[i % len(QUESTIONS)]} in a few sentences."
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True))
    return out


def time_variant(kw: dict, prompts_by_batch: dict, max_tokens: int, rounds: int,
                 profile_dir: str | None = None) -> list[dict]:
    """Rows of output tok/s, steps and drafts kept; with ``profile_dir`` the last round of
    each batch runs under ``jax.profiler`` and its row gets ``profile``: device time per step
    by kind of kernel beside the host's ms per step (``profile_step.summarize``)."""
    from jaxpage import LLM, SamplingParams

    llm = LLM(**kw)
    engine = llm.engine
    steps = [0]
    step = engine.step

    def counted():
        steps[0] += 1
        return step()

    engine.step = counted
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    rows = []
    for batch, prompts in prompts_by_batch.items():
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
        for r in range(rounds):
            s0 = dict(engine.get_stats())
            steps[0] = 0
            trace = (os.path.join(profile_dir, f"{len(os.listdir(profile_dir))}_b{batch}")
                     if profile_dir and r == rounds - 1 else None)
            if trace:
                jax.profiler.start_trace(trace)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            if trace:
                jax.profiler.stop_trace()
            s1 = engine.get_stats()
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            drafted = s1["spec_decode_num_draft_tokens"] - s0["spec_decode_num_draft_tokens"]
            kept = s1["spec_decode_num_accepted_tokens"] - s0["spec_decode_num_accepted_tokens"]
            rows.append(dict(batch=batch, round=r, seconds=elapsed, output_tokens=tokens,
                             tok_s=tokens / elapsed, steps=steps[0],
                             ms_per_step=1e3 * elapsed / max(steps[0], 1),
                             tokens_per_step=tokens / max(steps[0], 1), drafted=drafted,
                             kept=kept, texts_hash=hash(tuple(tuple(o.outputs[0].token_ids)
                                                              for o in outs))))
            if trace:
                rows[-1]["profile"] = summarize(device_kernels(trace), max(steps[0], 1),
                                                rows[-1]["ms_per_step"])
    del llm, engine
    gc.collect()
    return rows


def table(run: dict) -> list[str]:
    """A run's Markdown table (one row per variant, batch and round)."""
    h = run["header"]
    lines = [f"{h['device']}, JAX {h['jax']}, `{h['model']}`, workload `{h['workload']}`, "
             f"greedy, up to {h['max_tokens']} tokens", "",
             "| variant | batch | output tok/s | steps | tokens / step | ms / step | drafts kept |",
             "|---|---|---|---|---|---|---|"]
    for r in run["rows"]:
        kept = (f"{r['kept']}/{r['drafted']} ({r['kept'] / r['drafted']:.0%})" if r["drafted"]
                else "-")
        lines.append(f"| {r['variant']} | {r['batch']} | {r['tok_s']:.1f} | {r['steps']} | "
                     f"{r['tokens_per_step']:.2f} | {r['ms_per_step']:.2f} | {kept} |")
    return lines


def plot(runs: list[dict], png: str) -> None:
    """One panel per run: best output tok/s of each variant, per batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), squeeze=False)
    names = list(dict.fromkeys(r["variant"] for run in runs for r in run["rows"]))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, run in zip(axes[0], runs):
        rows = run["rows"]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        batches = sorted({r["batch"] for r in rows})
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            best = [max(r["tok_s"] for r in rows if r["variant"] == v and r["batch"] == b)
                    for b in batches]
            base = [max(r["tok_s"] for r in rows if r["variant"] == variants[0]
                        and r["batch"] == b) for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], [x / y for x, y in
                                                                 zip(best, base)],
                   width, label=v, color=colors[v])
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))],
                      [f"batch {b}" for b in batches])
        h = run["header"]
        ax.set_title(f"{h['device']}: {h['model']}, {h['workload']}", fontsize=8)
        ax.set_ylabel(f"output tok/s / {variants[0]}", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    from jaxpage.entrypoints.bench import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default",
                    help="what jaxpage loads, or preset:NAME (random weights of a standard shape)")
    ap.add_argument("--hf-config", default=None,
                    help="a config.json to build with random weights instead of --model")
    ap.add_argument("--workload", default="copy", choices=["copy", "chat", "random"])
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--k", default="2,4", help="draft counts to time (num_speculative_tokens)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--input-len", type=int, default=128, help="random workload only")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--out", default=None, help="write the run's rows as JSON here")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="trace each variant's last round here; rows get device ms per step "
                         "by kind of kernel")
    ap.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                    help="only draw these runs' chart (one panel each) to --out (a .png)")
    ns = ap.parse_args(argv)
    if ns.plot:
        plot([json.loads(open(f).read()) for f in ns.plot], ns.out or "spec_decode.png")
        return 0

    base = dict(dtype=ns.dtype, max_model_len=ns.max_model_len, seed=0,
                max_num_batched_tokens=ns.max_num_batched_tokens,
                max_num_seqs=max(8, max(int(b) for b in ns.batch_sizes.split(","))))
    if ns.num_pages:
        base["num_pages"] = ns.num_pages
    if ns.hf_config or ns.model.startswith("preset:"):
        cfg = (json.loads(open(ns.hf_config).read()) if ns.hf_config
               else PRESETS[ns.model.split(":")[1]])
        base.update(model=None, load_format="dummy", hf_config=cfg)
        tokenizer, vocab = None, cfg["vocab_size"]
    else:
        from jaxpage import LLM

        base["model"] = ns.model
        probe = LLM(**base, compile_all_buckets=False)
        tokenizer, vocab = probe.tokenizer, probe.loaded.config.vocab_size
        del probe
        gc.collect()
    prompts_by_batch = {int(b): make_prompts(ns.workload, int(b), tokenizer, vocab,
                                             ns.input_len, seed=1)
                        for b in ns.batch_sizes.split(",")}
    variants = {"plain (async)": {}, "plain (sync)": dict(async_scheduling=False)}
    for k in ns.k.split(","):
        variants[f"ngram k={k}"] = dict(speculative_config={
            "method": "ngram", "num_speculative_tokens": int(k), "prompt_lookup_max": 4})
    results = []
    for name, extra in variants.items():
        if ns.profile:
            os.makedirs(ns.profile, exist_ok=True)
        for row in time_variant({**base, **extra}, prompts_by_batch, ns.max_tokens, ns.rounds,
                                ns.profile):
            results.append(dict(variant=name, **row))
    device = jax.devices()[0]
    header = dict(device=getattr(device, "device_kind", str(device)), jax=jax.__version__,
                  host=platform.node(), model=ns.model, workload=ns.workload,
                  max_tokens=ns.max_tokens, date=time.strftime("%Y-%m-%dT%H:%M%z"))
    run = dict(header=header, rows=results)
    print("\n".join(table(run)))
    for r in results:
        if "profile" in r:
            pr = r["profile"]
            print(f"{r['variant']:14s} batch {r['batch']:3d}: host {r['ms_per_step']:.2f} ms/step,"
                  f" device span {pr.get('span_ms_per_step', 0):.2f} busy "
                  f"{pr.get('busy_ms_per_step', 0):.2f}, by kind "
                  + json.dumps({k: round(v, 3) for k, v in
                                pr.get("by_kind_ms_per_step", {}).items()}))
    same = {(r["batch"], r["round"]): set() for r in results}
    for r in results:
        same[(r["batch"], r["round"])].add(r["texts_hash"])
    # Greedy: the variants make the same tokens, but for a near-tie that the verify steps'
    # attention kernel (ragged, not decode) rounds the other way in bf16.
    print("distinct token sets per (batch, round) across variants:",
          {str(k): len(v) for k, v in same.items()})
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(run, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
