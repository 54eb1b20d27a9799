"""``tools/kernel_report.py``'s Markdown of a hand-made ``bench_kernels`` result (no GPU)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import kernel_report  # noqa: E402


def _timed(us, pct, **config):
    r = dict(time_us=us, pct_read_bw=pct)
    return dict(r, config=config) if config else r


def _result():
    rows = []
    for b, page in ((16, 16), (64, 128)):
        rows.append(dict(B=b, ctx=2048, page=page, floor_us=10.0,
                         ours=_timed(20.0, 50.0), jax=_timed(40.0, 25.0),
                         b32=_timed(12.5, 80.0, block_kv=32), b64=_timed(25.0, 40.0, block_kv=64),
                         ragged_m64=_timed(30.0, 33.3, block_m=64)))
    return dict(device="H200", jax_version="0.11.2", date="2026-11-27", command="bench",
                head_dim=256, decode=rows,
                ceilings=dict(read_bw=4e12, copy_bw=3e12, matmul_flops=7e14))


def test_decode_settings_get_their_own_table():
    md = kernel_report.markdown(_result())
    assert kernel_report.decode_cfg_labels(_result()) == ["b32", "b64"]
    table = md[md.index("Decode kernel, by setting"):]
    assert "| B | ctx | page | b32 | b64 |" in table
    assert "| 16 | 2048 | 16 | 12.5 (80%) | 25.0 (40%) |" in table
    assert "b32 = {'block_kv': 32}" in table
    ragged = md[md.index("Ragged kernel on the decode shapes"):md.index("Decode kernel, by")]
    assert "| B | ctx | page | ours (decode) | ragged_m64 |" in ragged
    assert "| 64 | 2048 | 128 | 20.0 (50%) | 30.0 (33%) |" in ragged
    assert "H = 256" in md and "2.00x" in md  # ours vs jax in the main table


def test_no_settings_no_extra_tables():
    result = _result()
    for row in result["decode"]:
        for k in ("b32", "b64", "ragged_m64"):
            del row[k]
    md = kernel_report.markdown(result)
    assert "by setting" not in md and kernel_report.decode_cfg_labels(result) == []


def test_one_mixed_table_per_page():
    def mixed(page, us):
        return dict(shape="4 chunks + 60 decodes", page=page, num_tokens=2108, floor_us=160.0,
                    floor_bytes_us=160.0, floor_flops_us=50.0,
                    ours=dict(time_us=us, x_floor=us / 160.0, spread=0.01))

    result = dict(_result(), mixed=mixed(16, 216.0), mixed_more=[mixed(64, 208.0)])
    md = kernel_report.markdown(result)
    at16, at64 = md.index("page 16, T = 2108"), md.index("page 64, T = 2108")
    assert at16 < md.index("| ours | 216 | 1.35 |") < at64 < md.index("| ours | 208 | 1.30 |")
    del result["mixed_more"]  # results written before --mixed-pages: one table
    assert "page 64, T" not in kernel_report.markdown(result)
