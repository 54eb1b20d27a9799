"""tools/bench_structured.py on the CPU: four workloads on one engine, a table, JSON, a plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_structured  # noqa: E402

from tests.engine.test_detokenizer import build_tokenizer  # noqa: E402


def test_bench_structured_reports_every_workload(tmp_path, capsys):
    build_tokenizer().save_pretrained(tmp_path / "tok")
    assert bench_structured.main(["--tokenizer", str(tmp_path / "tok"), "--num-prompts", "2",
                                  "--input-len", "12", "--output-len", "4", "--repeats", "1",
                                  "--max-num-seqs", "4", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for name in ("plain, async", "plain, sync", "regex", "json"):
        assert f"| {name} |" in table
    result = json.loads((tmp_path / "structured.json").read_text())
    assert all(r[0]["output_tokens"] > 0 for r in result["runs"].values())
    pytest.importorskip("matplotlib")  # the chart: a plotting dependency, not a test one
    assert bench_structured.main(["--plot", str(tmp_path / "structured.json"),
                                  "--out", str(tmp_path)]) == 0
    assert (tmp_path / "structured.png").stat().st_size > 1000
