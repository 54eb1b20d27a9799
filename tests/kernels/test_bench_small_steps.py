"""``tools/bench_small_steps.py`` (the Mosaic and Triton ragged kernels on small steps): its
steps, buckets and correctness gate, and one smoke run through both kernels' interpreters (no
GPU, no timing)."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import bench_small_steps as bss  # noqa: E402


def test_buckets_are_the_engine_s():
    from jaxpage.runner.buckets import Buckets

    engine = Buckets.create(4096, 256)
    for rows in (1, 10, 16, 17, 40, 64, 65, 240, 320, 2108):
        assert bss.bucket(rows) == engine.pick(rows, 1)[0]


def test_step_pages_are_distinct_and_cover_each_context():
    md, num_pages, rows = bss.make_step([5, 1, 40], [1024, 70, 40], seed=2, page=64)
    tables = np.asarray(md["block_tables"])
    used = [tables[i, :-(-k // 64)] for i, k in enumerate([1024, 70, 40])]
    flat = np.concatenate(used)
    assert len(set(flat.tolist())) == len(flat) == num_pages - 1 and flat.min() == 1
    assert np.asarray(md["query_start_loc"]).tolist() == [0, 5, 6, 46] and rows == 64


def test_smoke_run_checks_and_writes(tmp_path):
    rows = bss.main(["--smoke", "--out", str(tmp_path)])
    assert rows and all(r["triton_err"] < bss.TOLERANCE and r["mosaic_err"] < bss.TOLERANCE
                        for r in rows)
    saved = json.loads((tmp_path / "small_steps.json").read_text())
    assert saved["rows"] == rows
    assert "| chunk | 3 | 15 | 16 |" in (tmp_path / "small_steps.md").read_text()


def test_a_wrong_kernel_fails_the_gate(monkeypatch, tmp_path):
    real = bss.kernels
    monkeypatch.setattr(bss, "kernels", lambda md, interpret: {
        **real(md, interpret), "mosaic": lambda q, pool: q * 0})
    with pytest.raises(AssertionError, match="mosaic"):
        bss.main(["--smoke", "--out", str(tmp_path)])
