"""tools/bench_spec_decode.py on the CPU: every variant timed on a tiny random model, the same
greedy tokens, a table, JSON and a chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_spec_decode  # noqa: E402

from tests.entrypoints.engine_util import TINY_LLAMA  # noqa: E402


def test_bench_spec_decode_times_every_variant(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "run.json"
    assert bench_spec_decode.main([
        "--hf-config", str(tmp_path / "config.json"), "--workload", "random", "--input-len", "12",
        "--batch-sizes", "1,2", "--k", "2", "--max-tokens", "10", "--rounds", "1",
        "--dtype", "float32", "--max-model-len", "64", "--out", str(out),
        "--profile", str(tmp_path / "prof")]) == 0
    run = json.loads(out.read_text())
    table = capsys.readouterr().out
    for name in ("plain (async)", "plain (sync)", "ngram k=2"):
        assert f"| {name} | 1 |" in table and f"| {name} | 2 |" in table
    rows = run["rows"]
    assert len(rows) == 6 and all(0 < r["output_tokens"] <= 10 * r["batch"] for r in rows)
    spec = [r for r in rows if r["variant"] == "ngram k=2"]
    assert all(r["kept"] <= r["drafted"] for r in spec)
    # --profile: each (variant, batch)'s last round traced; no GPU plane here, so no kernels
    assert all(r["profile"]["host_ms_per_step"] == r["ms_per_step"] for r in rows)
    assert len(list((tmp_path / "prof").iterdir())) == 6
    # float32: the same greedy tokens whatever the variant
    for b in (1, 2):
        assert len({r["texts_hash"] for r in rows if r["batch"] == b}) == 1


def test_bench_spec_decode_draws_its_chart(tmp_path):
    pytest.importorskip("matplotlib")  # a plotting dependency, not a test one
    rows = [dict(variant=v, batch=b, tok_s=t) for v, t in (("plain (async)", 10.0),
                                                            ("ngram k=4", 25.0)) for b in (1, 8)]
    raw = {"header": dict(device="cpu", model="m", workload="copy"), "rows": rows}
    (tmp_path / "s.json").write_text(json.dumps(raw))
    png = tmp_path / "spec.png"
    assert bench_spec_decode.main(["--plot", str(tmp_path / "s.json"), str(tmp_path / "s.json"),
                                   "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
