"""``tools/ab_throughput.py`` on the CPU: variants in processes of their own take turns, a
variant may run another copy of the sources, and one that dies stops the run (no hang)."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import ab_throughput  # noqa: E402

from tests.entrypoints.engine_util import TINY_LLAMA  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SMALL = ["--num-prompts", "6", "--input-len", "12", "--output-len", "6", "--engine-kwargs",
         json.dumps(dict(max_num_seqs=8, max_num_batched_tokens=128, dtype="float32",
                         max_model_len=64))]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)


def test_variants_take_turns(config, tmp_path):
    run = ab_throughput.main(["--hf-config", config, "--reps", "2", *SMALL,
                              "--variant", 'sync={"async_scheduling": false}',
                              "--variant", f"async={{}}@{ROOT}",
                              "--out", str(tmp_path / "ab.json")])
    sync, async_ = run["variants"]
    assert [sync["name"], async_["name"]] == ["sync", "async"]
    for v in run["variants"]:
        assert [r["output_tokens"] for r in v["reps"]] == [36, 36]  # 6 prompts x 6 tokens
        assert v["jaxpage"].endswith("jaxpage")
    # turns: sync 0, async 0, sync 1, async 1 (each starts after the one before ended)
    order = sorted((r["start"], v["name"], r["rep"]) for v in run["variants"] for r in v["reps"])
    assert [(n, r) for _, n, r in order] == [("sync", 0), ("async", 0), ("sync", 1),
                                             ("async", 1)]
    assert json.loads((tmp_path / "ab.json").read_text())["num_prompts"] == 6


def test_a_variant_that_dies_stops_the_run(config):
    with pytest.raises(SystemExit, match="variants failed"):
        ab_throughput.main(["--hf-config", config, "--reps", "1", *SMALL, "--timeout", "120",
                            "--variant", 'bad={"max_num_seqs": -1}', "--variant", "ok={}"])


@pytest.mark.parametrize("text", ["noequals", "=x", 'a=[1]', "a={bad"])
def test_bad_variants_are_refused(text):
    with pytest.raises(Exception):
        ab_throughput.parse_variant(text)
