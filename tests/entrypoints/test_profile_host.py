"""``tools/profile_host.py`` on the CPU: each variant timed and profiled on a tiny random
model, its top functions per step the engine's own."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import profile_host  # noqa: E402

from tests.entrypoints.engine_util import TINY_LLAMA  # noqa: E402


def test_profile_host_times_and_profiles_each_variant(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY_LLAMA,
                                                          max_position_embeddings=512)))
    res = profile_host.main([
        "--hf-config", str(tmp_path / "config.json"), "--batch", "4", "--input-len", "12",
        "--max-tokens", "6", "--dtype", "float32", "--variants", "sync,async",
        "--num-pages", "64", "--top", "5", "--out", str(tmp_path / "host.json")])
    assert set(res["variants"]) == {"sync", "async"}
    for name, r in res["variants"].items():
        assert r["ms_per_step"] > 0 and r["steps"] >= 6, (name, r)
        assert len(r["by_tottime"]) == len(r["by_cumtime"]) == 5
        # the engine's step is among the most cumulative time: the profile saw it run
        assert any("llm_engine.py" in f["function"] for f in r["by_cumtime"])
    assert json.loads((tmp_path / "host.json").read_text())["batch"] == 4
    assert "== async:" in capsys.readouterr().out
