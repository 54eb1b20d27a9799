"""The OpenAI-compatible server over the simulated-KV fake runner (no jax): response shapes,
streaming against non-streaming, every bad input of shared/RELIABILITY.md answered with an
OpenAI-shaped 4xx while the engine keeps serving, API keys, draining, failures inside a step,
and aborts (pages freed) when a client goes away."""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from tests.engine.fake_runner import reference_generate
from tests.entrypoints.server_util import MAX_LEN, POISON, TEMPLATE, make_server

def wait_idle(engine, baseline_pages: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (engine.num_in_flight == 0 and not engine.engine.has_unfinished_requests()
                and engine.engine.num_free_pages == baseline_pages):
            return
        time.sleep(0.02)
    raise AssertionError(f"not idle: {engine.num_in_flight} in flight, "
                         f"{engine.engine.num_free_pages} free pages (baseline {baseline_pages})")


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def assert_error(resp, status: int, param: str | None = None, code: str | None = None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"] and "Traceback" not in err["message"] and ".py" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# -- happy paths ---------------------------------------------------------------------------------
def test_completion_tokens_are_the_models(served, tok):
    client, _ = served
    prompt = "Hello world, the quick brown fox"
    resp = client.post("/v1/completions", json=dict(model="tiny", prompt=prompt, max_tokens=12,
                                                    ignore_eos=True, logprobs=2))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    ids = tok(prompt)["input_ids"]
    want = reference_generate(ids, 12, len(tok))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12,
                             "total_tokens": len(ids) + 12}
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in want]
    assert len(lp["top_logprobs"]) == 12 and all(len(t) <= 2 for t in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0 and all(v <= 0 for v in lp["token_logprobs"])
    assert choice["text"] == tok.decode(want, skip_special_tokens=True)


def test_streaming_matches_non_streaming(served):
    client, _ = served
    body = dict(prompt=["Hello world", "The quick brown fox"], max_tokens=10, ignore_eos=True, n=2,
                temperature=0.0, seed=3)
    full = client.post("/v1/completions", json=body).json()
    resp = client.post("/v1/completions", json=dict(body, stream=True,
                                                    stream_options={"include_usage": True}))
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    texts, reasons = {}, {}
    for e in events[:-1]:
        (c,) = e["choices"]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    assert sorted(texts) == [0, 1, 2, 3]
    assert texts == {c["index"]: c["text"] for c in full["choices"]}
    assert set(reasons.values()) == {"length"}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]


def test_chat_completion_and_its_stream(served, tok):
    client, _ = served
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello world"}]}]
    body = dict(model="tiny", messages=messages, max_completion_tokens=8, ignore_eos=True,
                logprobs=True, top_logprobs=3)
    full = client.post("/v1/chat/completions", json=body)
    assert full.status_code == 200, full.text
    full = full.json()
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hello world"}], tokenize=False,
                                   add_generation_prompt=True, chat_template=TEMPLATE)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want = reference_generate(ids, 8, len(tok))
    (choice,) = full["choices"]
    assert full["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert [e["token"] for e in choice["logprobs"]["content"]] == [tok.decode([t]) for t in want]
    assert all(len(e["top_logprobs"]) <= 3 for e in choice["logprobs"]["content"])
    assert full["usage"]["prompt_tokens"] == len(ids)
    events = sse_events(client.post("/v1/chat/completions", json=dict(body, stream=True)).text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert streamed == choice["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_echo_and_chat_n(served):
    client, _ = served
    body = dict(prompt="Hello world", max_tokens=5, ignore_eos=True, echo=True)
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert full.startswith("Hello world") and len(full) > len("Hello world")
    events = sse_events(client.post("/v1/completions", json=dict(body, stream=True)).text)
    assert "".join(e["choices"][0]["text"] for e in events) == full
    chat = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=6, ignore_eos=True,
                n=2, temperature=0.8, seed=1)
    full = client.post("/v1/chat/completions", json=chat).json()["choices"]
    events = sse_events(client.post("/v1/chat/completions", json=dict(chat, stream=True)).text)
    texts = {0: "", 1: ""}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
    assert texts == {c["index"]: c["message"]["content"] for c in full}


def test_omitted_max_tokens_means_up_to_the_context_limit(served):
    client, _ = served
    for route, body in (("/v1/completions", dict(prompt=[5, 6, 7])),
                        ("/v1/chat/completions", dict(messages=[{"role": "user",
                                                                 "content": "hi"}]))):
        usage = client.post(route, json=dict(body, ignore_eos=True)).json()["usage"]
        assert usage["total_tokens"] == MAX_LEN, (route, usage)


def test_a_dead_engine_loop_answers_503_and_fails_requests_in_flight(tok):
    app, engine = make_server(tok, delay=0.01)
    with TestClient(app) as client:
        real_step = engine.engine.step
        calls = []

        def step():
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("a bug in the step loop")
            return real_step()

        engine.engine.step = step
        resp = client.post("/v1/completions", json=dict(prompt="Hello", max_tokens=40,
                                                        ignore_eos=True))
        assert_error(resp, 500, code="engine_dead")
        assert_error(client.get("/health"), 503)
        assert_error(client.post("/v1/completions", json=dict(prompt="Hello")), 503,
                     code="engine_unavailable")


def test_models_tokenize_detokenize_metrics_health(served, tok):
    client, _ = served
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    t = client.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert t["tokens"] == tok("Hello world")["input_ids"] and t["max_model_len"] == MAX_LEN
    assert client.post("/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == \
        tok.decode(t["tokens"])
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] == len(chat["tokens"]) > 0
    metrics = client.get("/metrics").text
    for name in ("jaxpage:num_requests_running", "jaxpage:kv_cache_usage_perc",
                 "jaxpage:num_free_pages", 'jaxpage:http_requests_total{route="/health"',
                 'jaxpage:time_to_first_token_seconds_bucket{le="+Inf"}',
                 "jaxpage:spec_decode_num_draft_tokens_total 0",
                 "jaxpage:spec_decode_num_accepted_tokens_total 0"):
        assert name in metrics
    count = lambda text, name: float(next(  # noqa: E731
        line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))
    before = count(metrics, "jaxpage:request_generation_tokens_sum")
    n_before = count(metrics, "jaxpage:e2e_request_latency_seconds_count")
    client.post("/v1/completions", json=dict(prompt=[5, 6], max_tokens=7, ignore_eos=True))
    after = client.get("/metrics").text
    assert count(after, "jaxpage:request_generation_tokens_sum") == before + 7
    assert count(after, "jaxpage:e2e_request_latency_seconds_count") == n_before + 1


# -- bad input: OpenAI-shaped 4xx, and the engine keeps serving ----------------------------------
BAD_COMPLETIONS = [
    (dict(temperature=-0.5), "temperature", None),
    (dict(temperature=2.5), "temperature", None),
    (dict(temperature="hot"), "temperature", None),
    (dict(top_p=0.0), "top_p", None),
    (dict(top_k=-2), "top_k", None),
    (dict(min_p=1.5), "min_p", None),
    (dict(presence_penalty=2.5), "presence_penalty", None),
    (dict(frequency_penalty=-3), "frequency_penalty", None),
    (dict(repetition_penalty=0.0), "repetition_penalty", None),
    (dict(n=0), "n", None),
    (dict(n=100000), "n", None),
    (dict(max_tokens=0), "max_tokens", None),
    (dict(max_tokens=MAX_LEN), "max_tokens", "context_length_exceeded"),
    (dict(min_tokens=9, max_tokens=4), "min_tokens", None),
    (dict(logprobs=6), "logprobs", None),
    (dict(prompt=""), "prompt", None),
    (dict(prompt=[]), "prompt", None),
    (dict(prompt=[1, 2, 100000]), "prompt", None),
    (dict(prompt=[1, -1]), "prompt", None),
    (dict(prompt=[[1, 2], []]), "prompt", None),
    (dict(prompt=[1.5, 2]), "prompt", None),
    (dict(prompt=[True, 2]), "prompt", None),
    (dict(prompt=["x"] * 200), "prompt", None),
    (dict(prompt=[7] * MAX_LEN), "prompt", "context_length_exceeded"),
    (dict(stop=["s"] * 40), "stop", None),
    (dict(stop=[""]), "stop", None),
    (dict(logit_bias={"abc": 1.0}), "logit_bias", None),
    (dict(logit_bias={"5": 500.0}), "logit_bias", None),
    (dict(logit_bias={"100000": 1.0}), "logit_bias", None),
    (dict(stop_token_ids=[100000]), "stop_token_ids", None),
    (dict(seed="x"), "seed", None),
    (dict(suffix="tail"), "suffix", None),
    (dict(best_of=3), "best_of", None),
    (dict(stream="yes"), "stream", None),
    (dict(cache_salt=""), "cache_salt", None),
    # structured outputs: malformed, two at once, and a regex / schema / grammar that does
    # not compile (the engine's check, before anything is queued)
    (dict(response_format={"type": "xml"}), "response_format", None),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format", None),
    (dict(response_format={"type": "json_object"}, guided_regex="a+"), "guided_regex", None),
    (dict(guided_choice=[]), "guided_choice", None),
    (dict(guided_regex="a(b"), "structured_outputs", None),
    (dict(guided_json={"type": "no-such-type"}), "structured_outputs", None),
    (dict(guided_grammar="start: undefined_rule"), "structured_outputs", None),
    (dict(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs", None),
    (dict(structured_outputs={"json": {}, "structural_tag": "x"}), "structured_outputs", None),
]


@pytest.mark.parametrize("change,param,code", BAD_COMPLETIONS,
                         ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD_COMPLETIONS)])
def test_bad_completion_requests_get_400(served, change, param, code):
    client, engine = served
    baseline = engine.engine.num_free_pages
    body = dict(dict(prompt="Hello world", max_tokens=4), **change)
    for stream in (False, True):
        assert_error(client.post("/v1/completions", json=dict(body, stream=stream)
                                 if "stream" not in change else body), 400, param, code)
    ok = client.post("/v1/completions", json=dict(prompt="Hello", max_tokens=2))
    assert ok.status_code == 200, ok.text
    wait_idle(engine, baseline)


BAD_CHATS = [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages"),
    (dict(messages="hello"), "messages"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_completion_tokens=MAX_LEN), "max_tokens"),
    (dict(logprobs=True, top_logprobs=21), "logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tool_choice"),  # auto
    (dict(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto"),
     "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),  # no tools
    (dict(tools=[{"type": "function"}], tool_choice="required"), "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": 3}}],
          tool_choice="required"), "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required",
          response_format={"type": "json_object"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": "not an object"}}),
     "response_format"),
    (dict(guided_json="{not json"), "structured_outputs"),
    (dict(temperature=float("nan")), "temperature"),
]


@pytest.mark.parametrize("change,param", BAD_CHATS,
                         ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_CHATS)])
def test_bad_chat_requests_get_400(served, change, param):
    client, engine = served
    body = dict(dict(messages=[{"role": "user", "content": "hi"}], max_tokens=4), **change)
    data = json.dumps(body, allow_nan=True)  # NaN goes over the wire as JSON's NaN literal
    resp = client.post("/v1/chat/completions", content=data,
                       headers={"content-type": "application/json"})
    assert_error(resp, 400, param)
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2, 3]", b'"a string"', b"", b"null"])
def test_malformed_bodies_get_400(served, raw):
    client, _ = served
    for route in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        assert_error(client.post(route, content=raw,
                                 headers={"content-type": "application/json"}), 400)


def test_unknown_model_route_method_and_large_body(served, tok):
    client, _ = served
    assert_error(client.post("/v1/completions", json=dict(model="gpt-9", prompt="hi")), 404,
                 "model", "model_not_found")
    assert_error(client.post("/v1/chat/completions", json=dict(
        model="gpt-9", messages=[{"role": "user", "content": "hi"}])), 404, "model")
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)
    big = json.dumps({"prompt": "x" * (2 << 20)})
    assert_error(client.post("/v1/completions", content=big,
                             headers={"content-type": "application/json"}), 413,
                 code="request_too_large")
    # Without a Content-Length (chunked upload), the body is counted as it arrives.
    resp = client.post("/v1/completions", content=iter([big[:1 << 19].encode()] * 4),
                       headers={"content-type": "application/json"})
    assert_error(resp, 413)
    assert_error(client.post("/detokenize", json={"tokens": [1, len(tok) + 5]}), 400, "tokens")
    assert client.post("/v1/completions", json=dict(prompt="hi", max_tokens=1)).status_code == 200


def test_api_key(tok):
    app, _ = make_server(tok, api_key="s3cret")
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200  # no key needed
        body = dict(prompt="hi", max_tokens=1)
        assert_error(client.post("/v1/completions", json=body), 401, code="invalid_api_key")
        assert_error(client.post("/v1/completions", json=body,
                                 headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(client.get("/v1/nowhere"), 401)  # unknown routes are guarded too
        assert_error(client.get("/metrics"), 401)
        ok = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_queue_full_and_draining_get_503(tok):
    app, engine = make_server(tok, max_waiting=1)
    with TestClient(app) as client:
        resp = client.post("/v1/completions", json=dict(prompt="hi", max_tokens=2, n=2))
        assert_error(resp, 503, code="queue_full")
        assert resp.headers["retry-after"] == "1"
        assert client.post("/v1/completions", json=dict(prompt="hi", max_tokens=2)).status_code \
            == 200
        engine.draining = True
        resp = client.post("/v1/completions", json=dict(prompt="hi", max_tokens=2))
        assert_error(resp, 503, code="engine_unavailable")
        assert "retry-after" in resp.headers
        assert_error(client.get("/health"), 503)
        engine.draining = False


def test_a_failing_step_fails_only_its_request(tok):
    app, engine = make_server(tok)
    with TestClient(app) as client:
        baseline = engine.engine.num_free_pages
        bad = client.post("/v1/completions", json=dict(prompt=[5, POISON, 6], max_tokens=4))
        assert_error(bad, 500, code="generation_failed")
        events = sse_events(client.post("/v1/completions", json=dict(
            prompt=[5, POISON, 7], max_tokens=4, stream=True)).text)
        assert events[-1]["error"]["code"] == "generation_failed"
        ok = client.post("/v1/completions", json=dict(prompt=[5, 6, 7], max_tokens=4,
                                                      ignore_eos=True))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        assert client.get("/health").status_code == 200
        wait_idle(engine, baseline)


def test_drain_lets_requests_in_flight_finish(tok):
    app, engine = make_server(tok, delay=0.01)
    results = []
    with TestClient(app) as client:
        def long_request():
            results.append(client.post("/v1/completions", json=dict(
                prompt="Hello", max_tokens=40, ignore_eos=True)))

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 5
        while engine.num_in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
    # Leaving the client ran the lifespan's shutdown: it drained before stopping.
    t.join(10)
    assert results and results[0].status_code == 200
    assert results[0].json()["usage"]["completion_tokens"] == 40
    assert not engine.is_running


# -- clients that go away ------------------------------------------------------------------------
def _raw_post(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
              b"application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n"
              + data)
    return s


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_and_frees_pages(live_server, stream):
    import httpx

    url, port, engine = live_server
    baseline = engine.engine.num_free_pages
    body = dict(prompt="Hello world", max_tokens=80, ignore_eos=True, stream=stream)
    if stream:
        with httpx.Client(timeout=10) as client:
            with client.stream("POST", url + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                got = [next(lines) for _ in range(3)]  # a few chunks, then hang up
                assert any(g.startswith("data: ") for g in got)
    else:
        s = _raw_post(port, "/v1/completions", body)
        deadline = time.monotonic() + 5
        while engine.num_in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_in_flight == 1
        s.close()
    steps_at_hangup = engine.num_steps
    wait_idle(engine, baseline, timeout=5)
    # 80 tokens take 80+ steps of 20 ms; the abort came long before.
    assert engine.num_steps - steps_at_hangup < 40
    with httpx.Client(timeout=10) as client:  # and it keeps serving
        ok = client.post(url + "/v1/completions", json=dict(prompt="hi", max_tokens=2))
        assert ok.status_code == 200


def test_nan_is_refused_by_sampling_params():
    from jaxpage.sampling_params import SamplingParams

    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=math.nan)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_many_concurrent_requests_lose_and_leak_nothing(tok, async_scheduling):
    import asyncio
    import random

    import httpx

    app, engine = make_server(tok, max_num_seqs=6, budget=48, num_pages=60,
                              async_scheduling=async_scheduling)
    assert engine.engine.async_scheduling == async_scheduling
    baseline = engine.engine.num_free_pages
    rng = random.Random(0)
    bodies = [dict(prompt=[rng.randrange(3, len(tok)) for _ in range(rng.randrange(2, 30))],
                   max_tokens=rng.randrange(1, 30), ignore_eos=True, logprobs=0,
                   stream=bool(i % 2)) for i in range(40)]

    async def main():
        engine.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            resps = await asyncio.gather(*[c.post("/v1/completions", json=b) for b in bodies])
        await engine.shutdown(5)
        return resps

    for body, resp in zip(bodies, asyncio.run(main())):
        assert resp.status_code == 200, resp.text
        want = [tok.decode([t]) for t in reference_generate(body["prompt"], body["max_tokens"],
                                                           len(tok))]
        if body["stream"]:
            events = sse_events(resp.text)
            tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
        else:
            tokens = resp.json()["choices"][0]["logprobs"]["tokens"]
        assert tokens == want
    assert engine.engine.num_free_pages == baseline and engine.num_in_flight == 0
