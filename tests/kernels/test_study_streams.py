"""``tools/study_streams.py`` off the GPU: the two-kernel mixed batch (prefill chunks through
the ragged kernel, decodes through the decode kernel, merged in place) matches the reference
in the interpreter, and the stream-annotated variant lowers for ``cuda`` with XLA's stream
annotation on the decode kernel's call."""

from __future__ import annotations

import os
import sys

import jax
import jax.export as je

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import bench_kernels as bk  # noqa: E402
import study_streams as ss  # noqa: E402


def test_halves_match_the_reference_in_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.setattr(bk, "INTERPRET", True)
    rows = ss.main(["--interpret", "--pages", "16", "--out", str(tmp_path)])
    row = rows[0]
    for label in ("halves_serial_triton", "part_prefill_triton", "part_decodes"):
        assert row[label]["rel_err"] < 2e-2, (label, row[label])
        assert row[label]["time_us"] > 0
    assert (tmp_path / "streams.json").exists()


def test_stream_variant_lowers_for_cuda_with_the_annotation(monkeypatch):
    monkeypatch.setattr(bk, "INTERPRET", False)
    md, q, pools, _ = bk.mixed_batch(16, seed=21, scale=1 / 16)
    call = ss.halves(md, "triton", streams=(None, 1), grouped=True)[0]
    exp = je.export(jax.jit(call), platforms=["cuda"], disabled_checks=[
        je.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, pools[0])
    text = exp.mlir_module()
    assert '_xla_stream_annotation = "1"' in text
    assert "_scheduling_group_id" in text
