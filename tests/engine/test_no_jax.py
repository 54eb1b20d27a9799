"""The host side imports no jax (ARCHITECTURE: engine/ is stdlib + numpy only)."""

import pathlib
import subprocess
import sys

import jaxpage.engine

ENGINE_DIR = pathlib.Path(jaxpage.engine.__file__).parent


def test_engine_modules_do_not_import_jax():
    modules = sorted(f"jaxpage.engine.{p.stem}" for p in ENGINE_DIR.glob("*.py")
                     if p.stem != "__init__")
    assert {"jaxpage.engine.llm_engine", "jaxpage.engine.scheduler",
            "jaxpage.engine.kv_cache_manager", "jaxpage.engine.block_pool",
            "jaxpage.engine.request", "jaxpage.engine.detokenizer"} <= set(modules)
    code = "\n".join(
        ["import importlib, sys"]
        + [f"importlib.import_module({m!r})" for m in modules]
        + ["bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib', 'flax')))",
           "print(','.join(bad))"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"jaxpage.engine pulled in: {result.stdout.strip()}"
