"""Markdown table and PNG plot of a ``tools/bench_kernels.py`` result (split out of it)."""

from __future__ import annotations

import numpy as np

def fmt(r, key="pct_read_bw"):
    if not r:
        return "-"
    if "error" in r:
        return "error"
    return f"{r['time_us']:.1f} ({r[key]:.0f}%)"


STANDARD = (("ours", "ours (decode)"), ("ours_ragged", "ours (ragged)"),
            ("ours_two_launch", "ours (two-launch)"), ("jax", "jax paged_attention"),
            ("reference", "reference"))


def decode_cfg_labels(result):
    """Labels of ``--decode-cfgs`` settings in the decode rows (each row's entry has a config)."""
    first = result["decode"][0] if result["decode"] else {}
    return [k for k, v in first.items() if isinstance(v, dict) and "config" in v
            and k not in dict(STANDARD) and not k.startswith("ragged_")]


def _by_setting(result, title, labels, lead=()):
    """A table of the decode shapes with one column per setting (after the ``lead`` ones)."""
    keys = [k for k, _ in lead] + list(labels)
    lines = ["", f"{title} (µs, % of read BW):", "",
             "| B | ctx | page | " + " | ".join([h for _, h in lead] + list(labels)) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for r in result["decode"]:
        lines.append(f"| {r['B']} | {r['ctx']} | {r['page']} | "
                     + " | ".join(fmt(r.get(k)) for k in keys) + " |")
    return lines


def _clock_line(result):
    """Which clock the times (and the ceilings) are on."""
    c = result["ceilings"]
    if c.get("clock") != "gpu":  # no profiler records (CPU), or a result from before them
        return "Times: wall clock per call (median over groups of back-to-back runs)."
    return ("Times: **GPU time per call** — the kernels' durations as the profiler (CUPTI) "
            "records them, median over 20 runs — and the ceilings on the same clock (on the "
            f"wall clock: read {c['read_bw_wall'] / 1e12:.2f} TB/s, copy "
            f"{c['copy_bw_wall'] / 1e12:.2f} TB/s); the wall clock also counts the host's "
            "dispatch of each group's first run (JSON: `wall_us`).")


def _pool(result) -> str:
    """", KV pool float8_e4m3fn" when the run's pool was not bf16 (``--kv-dtype``), else ""."""
    kv = result.get("kv_dtype", "bfloat16")
    return "" if kv == "bfloat16" else f", KV pool {kv}"


def markdown(result):
    c = result["ceilings"]
    lines = [
        f"Card: **{result['device']}**, JAX {result['jax_version']}, {result['date']}",
        f"Command: `{result['command']}`",
        "",
        f"Ceilings: HBM read (jnp.sum, 4 GiB bf16) **{c['read_bw'] / 1e12:.2f} TB/s**; copy "
        f"(read + write) {c['copy_bw'] / 1e12:.2f} TB/s; bf16 matmul 8192^3 "
        f"{c['matmul_flops'] / 1e12:.0f} TFLOP/s. % = floor / time with floor = KV bytes / "
        "jnp.sum read bandwidth.",
        "",
        _clock_line(result),
        "",
        f"Decode, bf16{_pool(result)}, N/K = 32/8, H = {result.get('head_dim', 128)}; "
        f"time in µs per call "
        "(% of read BW):",
        "",
        "| B | ctx | page | floor µs | ours (decode) | ours (ragged) | ours (two-launch) | "
        "jax paged_attention (best setting) | reference | ours vs jax |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["decode"]:
        jx = r.get("jax") or {}
        speed = "-"
        if "time_us" in (r.get("ours") or {}) and "time_us" in jx:
            speed = f"{jx['time_us'] / r['ours']['time_us']:.2f}x"
        setting = jx.get("setting")
        jtxt = fmt(jx) + (f" ppcb={setting['pages_per_compute_block']} ks={setting['k_splits']}"
                          if setting else "")
        lines.append(f"| {r['B']} | {r['ctx']} | {r['page']} | {r['floor_us']:.1f} | "
                     f"{fmt(r.get('ours'))} | {fmt(r.get('ours_ragged'))} | "
                     f"{fmt(r.get('ours_two_launch'))} | {jtxt} | "
                     f"{fmt(r.get('reference'))} | {speed} |")
    mixed = [result["mixed"]] + result.get("mixed_more", []) if result.get("mixed") else []
    for m in mixed:  # one table per page size of the mixed batch (``--mixed-pages``)
        lines += ["", f"Mixed batch ({m['shape']}, page {m['page']}, T = {m['num_tokens']}): "
                  f"floor {m['floor_us']:.0f} µs (bytes {m['floor_bytes_us']:.0f} µs, FLOPs "
                  f"{m['floor_flops_us']:.0f} µs; bytes + FLOPs "
                  f"{m['floor_bytes_us'] + m['floor_flops_us']:.0f} µs).", "",
                  "| variant | µs | × floor | spread | wall-clock µs | rel. err | config |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in m.items():
            if isinstance(v, dict) and "time_us" in v:
                err = "-" if v.get("rel_err") is None else f"{v['rel_err']:.4f}"
                wall = f"{v['wall_us']:.0f}" if "wall_us" in v else "-"
                lines.append(f"| {k} | {v['time_us']:.0f} | {v['x_floor']:.2f} | "
                             f"{v['spread']:.1%} | {wall} | {err} | {v.get('config') or ''} |")
    extra = sorted({k for r in result["decode"] for k in r if k.startswith("ragged_")})
    if extra:  # --ragged-cfgs: the ragged kernel under several settings on the decode shapes
        lines += _by_setting(result, "Ragged kernel on the decode shapes, by setting", extra,
                             lead=(("ours", "ours (decode)"),))
    cfgs = decode_cfg_labels(result)
    if cfgs:  # --decode-cfgs: the decode kernel under several settings
        lines += _by_setting(result, "Decode kernel, by setting", cfgs)
        lines += ["", "Settings: " + "; ".join(
            f"{k} = {result['decode'][0][k]['config']}" for k in cfgs)]
    lines += ["", f"Correctness (max |ours - ref| / max |ref|, bf16): {result.get('correctness')}"]
    return "\n".join(lines) + "\n"


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pages = sorted({r["page"] for r in result["decode"]})
    fig, axes = plt.subplots(1, len(pages), figsize=(6 * len(pages), 4.8), squeeze=False)
    names = [(k, label) for k, label in STANDARD
             if any("time_us" in (r.get(k) or {}) for r in result["decode"])]
    names += [(k, f"decode {k}") for k in decode_cfg_labels(result)]
    for ax, page in zip(axes[0], pages):
        rows = [r for r in result["decode"] if r["page"] == page]
        x = np.arange(len(rows))
        w = 0.8 / len(names)
        for j, (key, label) in enumerate(names):
            vals = [(r.get(key) or {}).get("pct_read_bw", 0) for r in rows]
            ax.bar(x + (j - (len(names) - 1) / 2) * w, vals, w, label=label)
        ax.axhline(85, color="k", ls="--", lw=0.8)
        ax.axhline(70, color="k", ls=":", lw=0.8)
        ax.set_xticks(x, [f"B{r['B']}\nctx{r['ctx']}" for r in rows], fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(f"decode, page {page}")
        ax.set_ylabel("% of HBM read bandwidth")
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = min(len(names), 5)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9)
    head_dim = result.get("head_dim", 128)
    fig.suptitle(f"{result['device']} · JAX {result['jax_version']} · bf16{_pool(result)} N/K=32/8 "
                 f"H={head_dim} · dashed 85%, dotted 70%")
    fig.tight_layout(rect=(0, 0.07 * -(-len(names) // ncol), 1, 1))
    fig.savefig(path, dpi=110)
