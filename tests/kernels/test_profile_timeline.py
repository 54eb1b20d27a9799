"""``tools/profile_mosaic.py``'s item timeline from a hand-made Mosaic GPU profiler trace."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import profile_mosaic  # noqa: E402

WGS = 3  # two compute warpgroups + the memory warpgroup


def _item(block, sm, start, end, prefill):
    """B/E events of one CTA's item: compute warpgroup 0 (and 1 for a prefill item) loads Q
    at ``start`` and its output ends at ``end``; Mosaic's tid = 1 + wg + WGS * block."""
    ev = []
    for wg in ((0, 1) if prefill else (0,)):
        tid, pid = 1 + wg + WGS * block, 1 + sm
        ev += [dict(name="q_in", ph="B", ts=start, pid=pid, tid=tid),
               dict(name="q_in", ph="E", ts=start + 1, pid=pid, tid=tid),
               dict(name="out", ph="B", ts=end - 1, pid=pid, tid=tid),
               dict(name="out", ph="E", ts=end, pid=pid, tid=tid)]
    return ev


def test_timeline_items_gaps_and_tail(tmp_path):
    # SM 0: a prefill item 0-20, then a decode item 23-50 (a 3 µs gap between them);
    # SM 1: a decode item 2-40 and nothing after it: the tail is 50 - 40 = 10 µs.
    events = (_item(0, 0, 0.0, 20.0, True) + _item(2, 0, 23.0, 50.0, False)
              + _item(1, 1, 2.0, 40.0, False))
    path = tmp_path / "k-trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    tl = profile_mosaic.timeline(str(path), WGS)
    assert tl["items"] == 3 and tl["sms"] == 2
    assert tl["span_us"] == pytest.approx(50.0)
    assert tl["kinds"]["prefill"] == dict(count=1, mean_us=20.0, total_us=20.0)
    assert tl["kinds"]["decode"]["count"] == 2
    assert tl["kinds"]["decode"]["mean_us"] == pytest.approx((27.0 + 38.0) / 2)
    assert tl["mean_gap_us"] == pytest.approx(3.0) and tl["gaps_total_us"] == pytest.approx(3.0)
    assert tl["tail_us"] == pytest.approx(10.0)
    assert tl["busy_share"] == pytest.approx((20 + 27 + 38) / (2 * 50.0))


def test_timeline_without_item_ranges_is_empty(tmp_path):
    path = tmp_path / "k-trace.json"
    path.write_text(json.dumps({"traceEvents": [
        dict(name="qk", ph="B", ts=0.0, pid=1, tid=1), dict(name="qk", ph="E", ts=1.0, pid=1,
                                                            tid=1)]}))
    assert profile_mosaic.timeline(str(path), WGS) == {}
