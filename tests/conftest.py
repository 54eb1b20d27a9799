import pathlib

import pytest


@pytest.fixture(scope="session")
def default_gguf() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF, fetched once per machine into ~/.cache/jaxpage."""
    from jaxpage.default_model import default_model_path

    return default_model_path(quiet=True)
