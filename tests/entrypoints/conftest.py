"""Fixtures of the server tests: the trained test tokenizer, the fake runner's server in a test
client (one per module) and a live uvicorn server."""

import threading
import time

import pytest

from tests.engine.test_detokenizer import build_tokenizer
from tests.entrypoints.server_util import free_port, make_server


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def served(tok):
    from fastapi.testclient import TestClient

    app, engine = make_server(tok)
    with TestClient(app) as client:
        yield client, engine


@pytest.fixture
def live_server(tok):
    import uvicorn

    app, engine = make_server(tok, delay=0.02)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", port, engine
    server.should_exit = True
    thread.join(10)
