"""Plots docs/benchmarks/engine/*.json (written by bench_step.py and bench_throughput.py):
``engine.png``; and async vs sync scheduling (offline runs taking turns, and
``tools/bench_serving.py``): ``engine_async.png``."""

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(folder: str = "docs/benchmarks/engine") -> None:
    d = pathlib.Path(folder)
    step = json.loads((d / "step.json").read_text())
    tps = [json.loads(p.read_text()) for p in sorted(d.glob("llama*.json"))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for backend, marker in (("pallas_gpu", "o"), ("reference", "s")):
        for kind, ls in (("decode", "-"), ("prefill", "--")):
            rows = [r for r in step["rows"] if r["backend"] == backend and r["kind"] == kind]
            x = [r["R"] if kind == "decode" else r["T"] for r in rows]
            ax1.plot(x, [r["step_ms"] for r in rows], ls, marker=marker, label=f"{backend} {kind}")
    dec = [r for r in step["rows"] if r["backend"] == "pallas_gpu" and r["kind"] == "decode"]
    ax1.plot([r["R"] for r in dec], [r["floor_ms"] for r in dec], "k:", label="decode floor (HBM)")
    ax1.set(xscale="log", yscale="log", xlabel="requests (decode) / tokens (prefill)",
            ylabel="step ms", title=f"{step['meta']['model']} step, ctx {step['meta']['ctx']}")
    ax1.legend(fontsize=7)
    for t in tps:
        names = [r["engine"] for r in t["results"] if "error" not in r]
        vals = [r["output_tokens_per_s"] for r in t["results"] if "error" not in r]
        ax2.bar(names, vals, color=["tab:blue", "tab:gray"][:len(vals)])
        for i, v in enumerate(vals):
            ax2.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
        m = t["meta"]
        ax2.set(ylabel="output tokens/s", title=f"{m['preset']} {m['input_len']} in / "
                f"{m['output_len']} out, {m['num_prompts']} prompts")
    fig.suptitle(f"{step['meta']['device']}, JAX {step['meta']['jax']}, {step['meta']['date']}")
    fig.tight_layout()
    fig.savefig(d.parent / "engine.png", dpi=110)


def _runs_side_by_side(ax, groups: dict, modes: dict, fontsize=None) -> None:
    """One dot per run (output tok/s), a column per mode within each group, means written
    above. ``groups``: label -> {mode: {"reps": [{"out_tok_s": ...}, ...]}}; ``modes``: mode ->
    colour."""
    for i, by_mode in enumerate(groups.values()):
        for j, (mode, colour) in enumerate(modes.items()):
            vals = [r["out_tok_s"] for r in by_mode[mode]["reps"]]
            x = 3 * i + j
            ax.scatter([x] * len(vals), vals, color=colour, label=mode if i == 0 else None)
            ax.text(x, max(vals), f"{sum(vals) / len(vals):,.0f}", ha="center", va="bottom")
    ax.set_xticks([3 * i + 0.5 for i in range(len(groups))], list(groups), fontsize=fontsize)
    ax.set(ylabel="output tokens/s (each run)", xlim=(-1, 3 * len(groups) - 1))
    ax.legend()


def plot_async(folder: str = "docs/benchmarks/engine") -> None:
    d = pathlib.Path(folder)
    runs = json.loads((d / "async_h200.json").read_text())
    serving = json.loads((d / "serving_h200.json").read_text())["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    _runs_side_by_side(ax1, {"greedy": runs["greedy"], "sampled (T = 1)":
                             runs["sampled_temperature_1"]}, {"sync": "tab:gray", "async": "tab:blue"})
    ax1.set(title="offline, llama3.2-1b 1024 in / 128 out, 600 prompts")
    ax1.legend()
    metrics = ("median_ttft_ms", "median_tpot_ms", "median_itl_ms", "p99_tpot_ms")
    for j, mode in enumerate(("sync", "async")):
        vals = [serving[mode]["summary"][m] for m in metrics]
        xs = [k + 0.35 * j for k in range(len(metrics))]
        ax2.bar(xs, vals, width=0.35, color=["tab:gray", "tab:blue"][j], label=mode)
        for x, v in zip(xs, vals):
            ax2.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks([k + 0.175 for k in range(len(metrics))], [m[:-3] for m in metrics])
    ax2.set(ylabel="ms", title="serving: 400 requests at 16/s (tools/bench_serving.py)")
    ax2.legend()
    fig.suptitle(f"async vs sync scheduling, {runs['card']}, JAX {runs['jax']}, {runs['date']}")
    fig.tight_layout()
    fig.savefig(d.parent / "engine_async.png", dpi=110)


def plot_fp8(folder: str = "docs/benchmarks/engine") -> None:
    """bf16 vs fp8 KV pool, output tok/s of each run, per workload (``engine/fp8_h200.json``)."""
    d = pathlib.Path(folder)
    data = json.loads((d / "fp8_h200.json").read_text())
    titles = {"1024_in_128_out_600_prompts_pool_by_memory": "1024 / 128, 600 prompts\n(pool sized by memory)",
              "1024_in_512_out_256_prompts_pool_by_memory": "1024 / 512, 256 prompts\n(pool sized by memory)",
              "1024_in_512_out_256_prompts_same_pool_bytes": "1024 / 512, 256 prompts\n(3 GiB pool each)"}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    _runs_side_by_side(ax, {title: data["runs"][key] for key, title in titles.items()},
                       {"bfloat16": "tab:gray", "fp8": "tab:orange"}, fontsize=8)
    ax.set_title(f"fp8 vs bf16 KV pool, llama3.2-1b shape, {data['card']}, JAX {data['jax']}, "
                 f"{data['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(d.parent / "engine_fp8.png", dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])
    plot_async(*sys.argv[1:])
    plot_fp8(*sys.argv[1:])
