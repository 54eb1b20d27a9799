"""``tools/compare_kv_dtype.py``: a bf16 and an fp8 ``bench_kernels`` result side by side
(hand-made results, no GPU)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import compare_kv_dtype as ckd  # noqa: E402


def _result(kv_dtype, rows, mixed=None):
    return dict(device="Fake GPU", jax_version="0.0", date="today", kv_dtype=kv_dtype,
                head_dim=128, mixed=mixed,
                decode=[dict(B=b, ctx=c, page=p, floor_us=f, ours=dict(time_us=t),
                             ours_ragged=dict(time_us=r)) for b, c, p, f, t, r in rows])


def test_rows_match_shapes_and_take_the_faster_fp8_kernel():
    bf16 = _result("bfloat16", [(64, 2048, 64, 100.0, 120.0, 130.0)])
    fp8 = _result("float8_e4m3fn", [(64, 2048, 64, 50.0, 80.0, 75.0),
                                    (64, 2048, 16, 50.0, 90.0, 95.0)],
                  mixed=dict(page=64, floor_us=30.0, ours=dict(time_us=300.0)))
    rows = ckd.rows(bf16, fp8)
    assert rows[0]["fp8_best"] == 75.0 and rows[0]["speedup"] == pytest.approx(1.6)
    assert rows[0]["fp8_pct_floor"] == pytest.approx(100 * 50 / 75)
    assert rows[1]["bf16_ours"] is None and rows[1]["speedup"] is None  # page 16: no bf16 run
    md = ckd.markdown(bf16, fp8)
    assert "| 64 | 2048 | 64 | 120.0 | 130.0 | 80.0 | 75.0 | 1.60x | 67% |" in md
    assert "| 64 | 2048 | 16 | - | - | 90.0 | 95.0 | - | 56% |" in md
    assert "300.0 µs" in md


def test_main_writes_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")  # a plotting dependency, not a test one
    bf16 = _result("bfloat16", [(16, 512, 64, 10.0, 14.0, 18.0)])
    fp8 = _result("float8_e4m3fn", [(16, 512, 64, 5.0, 12.0, 17.0)])
    ckd.main([_dump(tmp_path, "a", bf16), _dump(tmp_path, "b", fp8),
              "--out", str(tmp_path / "cmp")])
    assert (tmp_path / "cmp.png").stat().st_size > 0
    assert "1.17x" in (tmp_path / "cmp.md").read_text()


def _dump(tmp_path, name, obj):
    import json

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(obj))
    return str(path)
