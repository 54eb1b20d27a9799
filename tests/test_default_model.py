"""The embedded default model: checksum verified, atomic extraction, clear offline error."""

import zipfile

import pytest

from jaxpage import default_model


def test_resolve_passes_paths_through():
    assert default_model.resolve_model("/some/dir") == "/some/dir"


def test_wrong_checksum_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / default_model.WHEEL_NAME
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(default_model.GGUF_MEMBER, b"not a model")
    monkeypatch.setenv("JAXPAGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXPAGE_SMOLLM2_WHEEL", str(fake))
    with pytest.raises(RuntimeError, match="SHA-256"):
        default_model.default_model_path(quiet=True)
    assert not list((tmp_path / "cache").glob("*.gguf"))  # nothing half-written is left


def test_no_network_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPAGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JAXPAGE_SMOLLM2_WHEEL", raising=False)
    # An index that does not exist stands in for a machine without network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(RuntimeError, match="JAXPAGE_SMOLLM2_WHEEL"):
        default_model.default_model_path(quiet=True)


def test_fetch_verify_extract_and_reuse(default_gguf):
    assert default_gguf.is_file() and default_gguf.stat().st_size > 90_000_000
    with open(default_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"
