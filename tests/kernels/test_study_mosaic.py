"""``tools/study_mosaic.py``'s uniform-item batches and its fixed + per-block fit (no GPU: the
timing is replaced by a known cost model)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import bench_kernels as bk  # noqa: E402
import study_mosaic as sm  # noqa: E402


@pytest.mark.parametrize("shared", [False, True])
def test_uniform_batch_layout(shared):
    md, num_pages = sm.uniform_batch(5, 32, 300, 16, shared=shared)
    tables = np.asarray(md["block_tables"])
    assert tables.shape == (5, 19)  # ceil(300 / 16) pages per request
    assert np.asarray(md["query_start_loc"]).tolist() == [0, 32, 64, 96, 128, 160]
    assert np.asarray(md["kv_lens"]).tolist() == [300] * 5
    assert tables.min() >= 1 and tables.max() == num_pages - 1  # page 0 never read
    if shared:  # every request on one set of pages
        assert (tables == tables[0]).all() and len(set(tables[0])) == 19
    else:  # every page read once
        assert len(set(tables.ravel())) == tables.size


def test_item_costs_recovers_a_linear_cost(monkeypatch):
    """Times that follow T / waves = 3 + 0.5 b (Mosaic) and 2 + 1.5 b (Triton) come back as
    those lines, per kind of item."""
    def fake_rows(md, q, pools, cfgs, triton, extra):
        blocks = int(np.asarray(md["kv_lens"])[0]) // 128
        waves = 2
        rows = {"triton": dict(time_us=waves * (2 + 1.5 * blocks))}
        rows.update({label: dict(time_us=waves * (3 + 0.5 * blocks)) for label in cfgs})
        return rows

    monkeypatch.setattr(sm, "batch_rows", fake_rows)
    monkeypatch.setattr(bk, "make_pools", lambda *a: (None,))
    monkeypatch.setattr(bk, "make_qs", lambda *a: (None,))
    out = sm.item_costs({"default": {}}, [1, 2, 4], 16, waves=2, sms=8)
    for kind in ("prefill", "decode"):
        assert out[kind]["batch"] == 2  # 2 waves x 8 SMs / 8 kv heads
        fit = out[kind]["fit"]
        assert fit["default"]["fixed_us"] == pytest.approx(3.0)
        assert fit["default"]["per_block_us"] == pytest.approx(0.5)
        assert fit["triton"]["fixed_us"] == pytest.approx(2.0)
        assert fit["triton"]["per_block_us"] == pytest.approx(1.5)
