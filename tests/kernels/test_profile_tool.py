"""``tools/profile_mosaic.py``'s trace summary on a hand-made trace (the GPU part runs on the
GPU machine only)."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import profile_mosaic  # noqa: E402


def _ev(name, ph, ts, tid):
    return {"name": name, "ph": ph, "ts": ts, "pid": 1, "tid": tid}


def test_summarize_sums_regions_per_role(tmp_path):
    # two CTAs x 2 warpgroups (tid 1, 2 = CTA 0; 3, 4 = CTA 1); role = (tid - 1) % 2
    events = [_ev("qk", "B", 0.0, 1), _ev("qk", "E", 2.0, 1),
              _ev("qk", "B", 3.0, 1), _ev("qk", "E", 4.0, 1),
              _ev("issue", "B", 0.0, 2), _ev("wait_free", "B", 0.5, 2),
              _ev("wait_free", "E", 1.5, 2), _ev("issue", "E", 5.0, 2),
              _ev("qk", "B", 10.0, 3), _ev("qk", "E", 13.0, 3),
              _ev("issue", "B", 10.0, 4), _ev("issue", "E", 12.0, 4)]
    path = tmp_path / "1-trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    s = profile_mosaic.summarize(str(path), num_wgs=2)
    assert s["span_us"] == pytest.approx(13.0)
    qk = s["roles"][0]["regions"]["qk"]
    assert (qk["count"], qk["total_us"]) == (3, pytest.approx(6.0))
    assert s["roles"][0]["mean_life_us"] == pytest.approx((4.0 + 3.0) / 2)
    mem = s["roles"][1]["regions"]
    assert mem["issue"]["total_us"] == pytest.approx(7.0)  # nested regions count in full
    assert mem["wait_free"]["share"] == pytest.approx(1.0 / 7.0)
    assert list(mem) == ["issue", "wait_free"]  # longest first
