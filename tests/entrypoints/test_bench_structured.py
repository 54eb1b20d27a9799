"""tools/bench_structured.py on the CPU: four workloads on one engine, a table, JSON, a plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_structured  # noqa: E402

from tests.engine.test_detokenizer import build_tokenizer  # noqa: E402


def _run(tmp_path) -> str:
    build_tokenizer().save_pretrained(tmp_path / "tok")
    assert bench_structured.main(["--tokenizer", str(tmp_path / "tok"), "--num-prompts", "2",
                                  "--input-len", "12", "--output-len", "4", "--repeats", "1",
                                  "--max-num-seqs", "4", "--out", str(tmp_path)]) == 0
    return str(tmp_path / "structured.json")


def test_bench_structured_reports_every_workload(tmp_path, capsys):
    result = json.loads(Path(_run(tmp_path)).read_text())
    table = capsys.readouterr().out
    for name in ("plain, async", "plain, sync", "regex", "json"):
        assert f"| {name} |" in table
    assert all(r[0]["output_tokens"] > 0 for r in result["runs"].values())


def test_bench_structured_draws_its_chart(tmp_path):
    pytest.importorskip("matplotlib")  # a plotting dependency, not a test one
    raw = {"head": "h", "runs": {"plain, async": [{"tok_s": 10.0}], "json": [{"tok_s": 4.0}]}}
    (tmp_path / "s.json").write_text(json.dumps(raw))
    assert bench_structured.main(["--plot", str(tmp_path / "s.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "structured.png").stat().st_size > 1000
