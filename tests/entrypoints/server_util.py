"""Shared pieces of the server tests: a server over the fake runner (with a trained tokenizer
and a chat template), optionally slow or failing on a poisoned prompt."""

from __future__ import annotations

import socket
import time

from jaxpage.engine.async_engine import AsyncLLMEngine
from jaxpage.entrypoints.openai.server import ServerConfig, build_app
from tests.engine.test_llm_engine import make_engine

TEMPLATE = ("{% for m in messages %}<|sep|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|sep|>assistant: {% endif %}")
MAX_LEN = 96
POISON = 0  # "<eos>": a prompt holding it makes the runner raise (a device failure)


class SlowRunner:
    """Wraps a runner: sleeps per step, and raises for a batch with a poisoned prompt."""

    def __init__(self, runner, delay: float):
        self.runner, self.delay = runner, delay

    def execute_model(self, so):
        if self.delay:
            time.sleep(self.delay)
        if any(POISON in r.all_token_ids for r in so.scheduled_new_reqs):
            raise RuntimeError("simulated device failure")
        return self.runner.execute_model(so)

    def dispatch(self, so, background=False, defer_sampling=False):  # finished at launch
        return self.execute_model(so)

    def shutdown(self):
        self.runner.shutdown()

    def collect(self, handle):
        return handle


def make_server(tok, *, delay=0.0, api_key=None, max_body_bytes=1 << 20, **engine_kw):
    engine, runner = make_engine(tokenizer=tok, vocab_size=len(tok), eos=(tok.eos_token_id,),
                                 max_model_len=MAX_LEN, **engine_kw)
    engine.model_runner = SlowRunner(runner, delay)
    async_engine = AsyncLLMEngine(engine)
    config = ServerConfig(model_name="tiny", max_model_len=MAX_LEN, tokenizer=tok,
                          chat_template=TEMPLATE, api_key=api_key,
                          max_body_bytes=max_body_bytes, drain_timeout_s=5.0)
    return build_app(async_engine, config), async_engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
