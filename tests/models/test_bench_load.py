"""tools/bench_load.py on a tiny HF directory: it converts once, times both forms, reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_load  # noqa: E402

from tests.models.test_hf_parity import build_hf_model, save_hf_model  # noqa: E402


def test_bench_load_reports_both_forms(tmp_path, capsys):
    save_hf_model(build_hf_model("smollm2"), tmp_path / "hf")
    assert bench_load.main(["--hf-dir", str(tmp_path / "hf"), "--work", str(tmp_path),
                            "--out", str(tmp_path / "out"), "--repeats", "2"]) == 0
    table = capsys.readouterr().out
    assert "| safetensors |" in table and "| checkpoint |" in table
    result = json.loads((tmp_path / "out" / "load.json").read_text())
    assert result["convert_s"] > 0 and all(len(v) == 2 and min(v) > 0
                                           for v in result["times_s"].values())
    assert (tmp_path / "jaxpage_llama3.2-1b_bfloat16" / "jaxpage_checkpoint.json").is_file()


def test_bench_load_draws_its_chart(tmp_path):
    pytest.importorskip("matplotlib")  # a plotting dependency, not a test one
    raw = dict(preset="p", dtype="bfloat16", device="d", jax="j",
               times_s={"safetensors": [2.0, 1.5], "checkpoint": [0.5, 0.4]})
    (tmp_path / "l.json").write_text(json.dumps(raw))
    assert bench_load.main(["--plot", str(tmp_path / "l.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "load.png").stat().st_size > 1000
