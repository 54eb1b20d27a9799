"""tools/bench_serving.py against a live server over the fake runner: counts, latencies that
hang together, failures counted rather than fatal."""

import asyncio
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import bench_serving  # noqa: E402


def test_bench_serving_measures_a_live_server(live_server, tok):
    url, _, engine = live_server
    prompts = [[5 + i, 6, 7, 8, 9, 10] for i in range(5)] + [[5, 6, len(tok) + 10]]
    results, duration = asyncio.run(bench_serving.run(url, "tiny", prompts, 6, float("inf"),
                                                      2, seed=0))
    s = bench_serving.summarize(results, duration)
    assert s["completed"] == 5 and s["failed"] == 1 and "HTTP 400" in s["errors"][0]
    assert s["total_output_tokens"] == 30 and s["total_input_tokens"] == 30
    ok = [r for r in results if r.ok]
    assert all(0 < r.ttft <= r.latency and len(r.itl) == 5 for r in ok)
    # 20 ms per engine step (the fixture's runner): each later token takes at least that.
    assert s["median_itl_ms"] >= 15 and s["mean_tpot_ms"] >= 15
    assert s["request_throughput"] > 0 and s["median_e2el_ms"] >= s["median_ttft_ms"]
    bench_serving.print_summary(s)
