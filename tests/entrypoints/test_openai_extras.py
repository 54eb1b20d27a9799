"""vLLM's extra request fields and routes on the server, over the fake runner (no jax):
``/version``, ``return_tokens_as_token_ids``, chat's ``continue_final_message``,
``truncate_prompt_tokens``, and the async engine's final-only outputs for non-streamed
requests."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.entrypoints.server_util import make_server
from tests.entrypoints.test_openai_server import assert_error, sse_events


def test_version_route(served):
    import jaxpage

    client, _ = served
    r = client.get("/version")
    assert r.status_code == 200 and r.json() == {"version": jaxpage.__version__}


def test_return_tokens_as_token_ids(served, tok):
    """vLLM's ``return_tokens_as_token_ids``: logprobs name tokens "token_id:N", the same
    tokens the text form names, on both routes, streamed or not."""
    client, _ = served
    body = dict(prompt="Hello world", max_tokens=6, ignore_eos=True, temperature=0.0,
                logprobs=2)
    text = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    ids = client.post("/v1/completions", json=dict(body, return_tokens_as_token_ids=True)
                      ).json()["choices"][0]["logprobs"]
    assert all(t.startswith("token_id:") for t in ids["tokens"])
    assert [tok.decode([int(t.split(":")[1])]) for t in ids["tokens"]] == text["tokens"]
    assert all(k.startswith("token_id:") for top in ids["top_logprobs"] for k in top)
    events = sse_events(client.post("/v1/completions", json=dict(
        body, return_tokens_as_token_ids=True, stream=True)).text)
    streamed = [t for e in events for t in (e["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert streamed == ids["tokens"]
    chat = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=4, ignore_eos=True,
                temperature=0.0, logprobs=True, top_logprobs=1, return_tokens_as_token_ids=True)
    content = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]
    assert all(e["token"].startswith("token_id:") for e in content["content"])


def test_continue_final_message(served, tok):
    """vLLM's ``continue_final_message``: the prompt ends inside the assistant's last message
    (no generation prompt after it), and the reply continues it."""
    client, _ = served
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello wor"}]
    body = dict(messages=msgs, continue_final_message=True, max_tokens=3, ignore_eos=True,
                temperature=0.0)
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    want = tok(TEMPLATE_CONTINUED, add_special_tokens=False)["input_ids"]
    assert resp.json()["usage"]["prompt_tokens"] == len(want)
    assert_error(client.post("/v1/chat/completions", json=dict(
        body, add_generation_prompt=True)), 400, "continue_final_message")
    assert_error(client.post("/v1/chat/completions", json=dict(
        body, messages=msgs[:1])), 400, "continue_final_message")


TEMPLATE_CONTINUED = "<|sep|>user: hi\n<|sep|>assistant: Hello wor"


def test_async_engine_final_only_yields_the_last_output_once(tok):
    """Non-streamed requests ask the engine for the final output alone (no per-step copies);
    a streamed one gets every step's."""
    import asyncio

    from jaxpage import SamplingParams

    app, engine = make_server(tok)
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0)

    async def collect(final_only):
        return [o async for o in engine.generate(f"r{final_only}", ids, params,
                                                 final_only=final_only)]

    with TestClient(app):  # runs the engine's loop
        every = asyncio.run(collect(False))
        final = asyncio.run(collect(True))
    assert len(every) > 1 and len(final) == 1 and final[0].finished
    assert final[0].outputs[0].token_ids == every[-1].outputs[0].token_ids


def test_truncate_prompt_tokens_on_the_server(served):
    client, _ = served
    body = dict(prompt=list(range(5, 125)), max_tokens=4, ignore_eos=True)  # 120 > MAX_LEN 96
    assert_error(client.post("/v1/completions", json=body), 400, "prompt",
                 "context_length_exceeded")
    r = client.post("/v1/completions", json=dict(body, truncate_prompt_tokens=20))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 20
    assert_error(client.post("/v1/completions", json=dict(body, truncate_prompt_tokens=0)),
                 400, "truncate_prompt_tokens")
