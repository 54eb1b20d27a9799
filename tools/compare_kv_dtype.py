"""Side by side: two ``bench_kernels.py`` runs of one call, a bf16 pool and an fp8 pool
(``--kv-dtype``), as a Markdown table and a PNG (decode time per shape, both kernels).

    python tools/compare_kv_dtype.py BF16.json FP8.json --out docs/benchmarks/kernels_fp8

writes ``<out>.md`` and ``<out>.png``. Shapes are matched on (B, ctx, page); a page size the
bf16 run did not time gets no bf16 column.
"""

from __future__ import annotations

import argparse
import json


def _us(row, key):
    cell = (row or {}).get(key) or {}
    return cell.get("time_us")


def rows(bf16: dict, fp8: dict) -> list[dict]:
    """One dict per fp8 decode shape: its times, the bf16 times of the same shape, speed-ups."""
    base = {(r["B"], r["ctx"], r["page"]): r for r in bf16["decode"]}
    out = []
    for r in fp8["decode"]:
        b = base.get((r["B"], r["ctx"], r["page"]))
        row = dict(B=r["B"], ctx=r["ctx"], page=r["page"], fp8_floor_us=r["floor_us"],
                   bf16_floor_us=b["floor_us"] if b else None)
        for kernel in ("ours", "ours_ragged"):
            row[f"fp8_{kernel}"] = _us(r, kernel)
            row[f"bf16_{kernel}"] = _us(b, kernel)
        best_fp8 = min(t for t in (row["fp8_ours"], row["fp8_ours_ragged"]) if t)
        row["fp8_best"] = best_fp8
        row["speedup"] = row["bf16_ours"] / best_fp8 if row["bf16_ours"] else None
        row["fp8_pct_floor"] = 100 * r["floor_us"] / best_fp8
        out.append(row)
    return out


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def markdown(bf16: dict, fp8: dict) -> str:
    lines = [
        f"Card: **{fp8['device']}**, JAX {fp8['jax_version']}, {fp8['date']}; pool "
        f"{fp8.get('kv_dtype')} against bfloat16, queries bf16, N/K = 32/8, "
        f"H = {fp8.get('head_dim', 128)}; GPU clock, µs per call. Speed-up: the bf16 decode "
        "kernel (what the engine runs on a decode step) over the faster fp8 kernel; % floor: "
        "the fp8 pool's bytes at the read ceiling over that time.",
        "",
        "| B | ctx | page | bf16 decode | bf16 ragged | fp8 decode | fp8 ragged | speed-up | "
        "% of fp8 floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(bf16, fp8):
        lines.append(
            f"| {r['B']} | {r['ctx']} | {r['page']} | {_f(r['bf16_ours'])} | "
            f"{_f(r['bf16_ours_ragged'])} | {_f(r['fp8_ours'])} | {_f(r['fp8_ours_ragged'])} | "
            f"{_f(r['speedup'], '{:.2f}x')} | {r['fp8_pct_floor']:.0f}% |")
    mixed = fp8.get("mixed") or {}
    if _us(mixed, "ours"):
        lines += ["", f"Mixed batch (4 × 512-token chunks + 60 decodes at 2048, page "
                  f"{mixed['page']}), fp8 pool through the Triton ragged kernel: "
                  f"{_us(mixed, 'ours'):.1f} µs (its bytes floor {mixed['floor_us']:.1f} µs)."]
    return "\n".join(lines) + "\n"


def plot(bf16: dict, fp8: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows(bf16, fp8) if r["bf16_ours"]]
    labels = [f"B={r['B']}\nctx={r['ctx']}" for r in data]
    x = range(len(data))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(data)), 4))
    width = 0.27
    series = (("bf16 pool, decode kernel", "bf16_ours"), ("fp8 pool, decode kernel", "fp8_ours"),
              ("fp8 pool, ragged kernel", "fp8_ours_ragged"))
    for i, (name, key) in enumerate(series):
        ax.bar([j + (i - 1) * width for j in x],
               [r[key] / r["bf16_ours"] for r in data], width, label=name)
    ax.axhline(0.5, color="k", lw=0.8, ls="--", label="half the bf16 time (bytes halve)")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("time / bf16 decode kernel's time")
    ax.set_title(f"{fp8['device']} · JAX {fp8['jax_version']} · decode, page "
                 f"{data[0]['page'] if data else '-'}: fp8 ({fp8.get('kv_dtype')}) vs bf16 KV pool",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bf16")
    p.add_argument("fp8")
    p.add_argument("--out", required=True, help="path without extension")
    args = p.parse_args(argv)
    bf16, fp8 = (json.load(open(f)) for f in (args.bf16, args.fp8))
    with open(args.out + ".md", "w") as f:
        f.write(markdown(bf16, fp8))
    plot(bf16, fp8, args.out + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
