"""Weight-loading time: an HF safetensors directory against its ``jaxpage convert`` checkpoint.

Writes a random HF checkpoint of a preset's shape (transformers, bfloat16) unless ``--hf-dir``
names one, converts it once (timed), then loads each form ``--repeats`` times, taking turns,
to the default device (``load_model``, every array ready), and prints a Markdown table; raw
numbers to ``--out``/load.json. Both forms are read through the OS page cache after their
first load: the table reports the first (cold as this process sees it) and the best load.

    python tools/bench_load.py --preset llama3.2-1b --work /tmp/bl --out /tmp/bl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import chart_option  # noqa: E402  (tools/ is not a package)

from jaxpage.entrypoints.bench import PRESETS  # noqa: E402
from jaxpage.models.checkpoint import convert  # noqa: E402
from jaxpage.models.loader import load_model  # noqa: E402


def write_hf_checkpoint(preset: str, path: Path) -> None:
    """Random weights of the preset's shape, saved by transformers in bfloat16."""
    import torch
    import transformers

    hf = dict(PRESETS[preset])
    hf.pop("architectures", None)
    config = transformers.LlamaConfig(**hf)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)


def timed_load(path: Path, dtype: str) -> float:
    t0 = time.perf_counter()
    loaded = load_model(path, dtype=dtype)
    jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda v: v, loaded.model)))
    return time.perf_counter() - t0


def plot(result: dict, png: str) -> None:
    """Each form's load times (from load.json) as bars, first load and best."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forms = list(result["times_s"])
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for k, (label, pick) in enumerate((("first load", lambda t: t[0]), ("best load", min))):
        vals = [pick(result["times_s"][f]) for f in forms]
        bars = ax.bar([i + 0.38 * k for i in range(len(forms))], vals, 0.36, label=label)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f} s", ha="center", va="bottom")
    ax.set_xticks([i + 0.19 for i in range(len(forms))], forms)
    ax.set_ylabel("seconds to load")
    ax.set_title(f"{result['preset']} {result['dtype']}, {result['device']}, JAX {result['jax']}",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama3.2-1b", choices=sorted(PRESETS))
    p.add_argument("--hf-dir", default=None, help="an existing HF directory (else one is written)")
    p.add_argument("--work", help="where the HF directory and checkpoint go (required unless --plot)")
    p.add_argument("--out", default=None, help="directory for load.json")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    ns = chart_option.parse(p, argv, plot, "load", required="work")
    if ns is None:
        return 0

    work = Path(ns.work)
    hf_dir = Path(ns.hf_dir) if ns.hf_dir else work / f"hf_{ns.preset}"
    if not hf_dir.exists():
        t0 = time.perf_counter()
        write_hf_checkpoint(ns.preset, hf_dir)
        print(f"wrote {hf_dir} in {time.perf_counter() - t0:.1f} s", flush=True)
    ckpt = work / f"jaxpage_{ns.preset}_{ns.dtype}"
    convert_s = None
    if not ckpt.exists():
        t0 = time.perf_counter()
        convert(hf_dir, ckpt, dtype=ns.dtype)
        convert_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"safetensors": [], "checkpoint": []}
    for _ in range(ns.repeats):
        times["safetensors"].append(timed_load(hf_dir, ns.dtype))
        times["checkpoint"].append(timed_load(ckpt, ns.dtype))
    size = {k: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**30
            for k, d in (("safetensors", hf_dir), ("checkpoint", ckpt))}
    result = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                  jax=jax.__version__, preset=ns.preset, dtype=ns.dtype, convert_s=convert_s,
                  gib=size, times_s=times)
    print(f"{ns.preset}, {ns.dtype}, {result['device']} (JAX {jax.__version__}); convert "
          f"{'-' if convert_s is None else f'{convert_s:.1f} s'}\n")
    print("| form | GiB on disk | first load s | best load s |\n|---|---|---|---|")
    for k, ts in times.items():
        print(f"| {k} | {size[k]:.2f} | {ts[0]:.2f} | {min(ts):.2f} |")
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "load.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
