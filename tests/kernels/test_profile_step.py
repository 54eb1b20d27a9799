"""``tools/profile_step.py``'s kernel kinds and per-step summary on hand-made events (the trace
itself is the GPU machine's)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import profile_step  # noqa: E402


def test_kinds_and_summary():
    kinds = {name: profile_step.kind_of(name) for name in (
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "all_reduce_one_shot_kernel",
        "nvjet_hsh_128x64_64x4_1x2_h_bz_coopA_NTN", "jaxpage_ragged_decode",
        "loop_add_fusion_2", "memcpy32_post", "some_triton_thing")}
    assert kinds == {"ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "collective",
                     "all_reduce_one_shot_kernel": "collective",
                     "nvjet_hsh_128x64_64x4_1x2_h_bz_coopA_NTN": "matmul",
                     "jaxpage_ragged_decode": "attention", "loop_add_fusion_2": "fusion",
                     "memcpy32_post": "copy", "some_triton_thing": "other"}
    events = [("nvjet_a", 0, 1_000_000), ("ncclDevKernel_AllReduce", 1_500_000, 500_000),
              ("nvjet_a", 2_000_000, 1_000_000), ("ncclDevKernel_AllReduce", 3_000_000, 500_000)]
    s = profile_step.summarize(events, steps=2, host_ms=4.0)
    assert s["span_ms_per_step"] == 1.75 and s["busy_ms_per_step"] == 1.5
    assert s["by_kind_ms_per_step"] == {"matmul": 1.0, "collective": 0.5}
