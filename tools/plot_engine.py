"""Plots docs/benchmarks/engine/*.json (written by bench_step.py and bench_throughput.py)."""

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


if __name__ == "__main__":
    main(*sys.argv[1:])
