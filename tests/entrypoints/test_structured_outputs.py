"""Structured outputs on the real model (SmolLM2-135M-Instruct, float32, CPU): the text is in
the language asked for; each greedy token is the model's best among those the grammar allows
(checked against the unconstrained model's logprobs and a fresh matcher); outputs do not depend
on batching, preemption or async scheduling; bad constraints are clear errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jaxpage import LLM, SamplingParams, StructuredOutputsParams as SO
from tests.entrypoints.engine_util import tiny_llm

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "maxItems": 3}}}
CHOICES = ['yes "really"', "no\\maybe", "ünïcödé", "two\nlines"]


def _check_person(text: str) -> None:
    obj = json.loads(text)
    assert set(obj) == {"name", "age", "tags"}, obj
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 20
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 12 for t in obj["tags"])


@pytest.fixture(scope="module")
def smol(default_gguf):
    return dict(model=str(default_gguf), dtype="float32", max_model_len=512, seed=0)


@pytest.fixture(scope="module")
def llm(smol):
    return LLM(max_num_seqs=8, max_num_batched_tokens=256, **smol)


def _chat(llm, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    s = llm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return llm.tokenizer(s, add_special_tokens=False)["input_ids"]


def _requests(llm):
    """(prompt ids, params, check) covering every kind of constraint, greedy and sampled."""
    person = _chat(llm, "Describe a fictional person as JSON with name, age and tags.")
    return [
        (person, SamplingParams(temperature=0.0, max_tokens=96,
                                structured_outputs=SO(json=PERSON)), _check_person),
        (person, SamplingParams(temperature=0.9, seed=5, max_tokens=96, n=2,
                                structured_outputs=SO(json=json.dumps(PERSON),
                                                      disable_any_whitespace=True)),
         lambda t: (_check_person(t), " " not in t.replace('" ', "").replace(' "', ""))),
        (_chat(llm, "Is the sky blue?"), SamplingParams(
            temperature=0.0, max_tokens=16, structured_outputs=SO(choice=CHOICES)),
         lambda t: t in CHOICES or pytest.fail(t)),
        (_chat(llm, "Give a US phone number."), SamplingParams(
            temperature=0.7, seed=1, max_tokens=24,
            structured_outputs=SO(regex=r"\(\d{3}\) \d{3}-\d{4}")),
         lambda t: re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", t) or pytest.fail(t)),
        (_chat(llm, "Add two small numbers."), SamplingParams(
            temperature=0.0, max_tokens=24, structured_outputs=SO(
                grammar='start: NUM " + " NUM " = " NUM\nNUM: /[0-9]{1,3}/')),
         lambda t: re.fullmatch(r"\d{1,3} \+ \d{1,3} = \d{1,3}", t) or pytest.fail(t)),
        (_chat(llm, "Answer yes or no: is water wet?"), SamplingParams(
            temperature=0.0, max_tokens=8,
            structured_outputs=SO(grammar='root ::= "yes" | "no"')),  # GBNF
         lambda t: t in ("yes", "no") or pytest.fail(t)),
        (_chat(llm, "Return a JSON object with the key \"city\" set to the capital of "
                    "France."), SamplingParams(
            temperature=0.0, max_tokens=64, structured_outputs=SO(json_object=True)),
         lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
    ]


def _texts(outs):
    return [[(c.text, c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def alone(llm):
    """Each request alone: the reference the batched, preempted and async runs must equal."""
    reqs = _requests(llm)
    return reqs, [llm.generate([p], sp, use_tqdm=False)[0] for p, sp, _ in reqs]


def test_outputs_are_in_the_language(alone):
    reqs, outs = alone
    for (_, _, check), out in zip(reqs, outs):
        for c in out.outputs:
            assert c.finish_reason == "stop", (c.text, c.finish_reason)
            check(c.text)


def test_greedy_tokens_are_the_best_the_grammar_allows(llm, alone):
    """Oracle: the unconstrained model re-scores prompt + output (prompt_logprobs, top 20) and
    a fresh matcher walks the output: every token is allowed, and every token the model ranks
    above it is one the grammar forbade at that point."""
    reqs, outs = alone
    compiler = llm.engine._grammars
    words = -(-llm.engine.vocab_size // 32)
    checked = 0
    for (prompt, sp, _), out in zip(reqs, outs):
        if sp.temperature:
            continue
        tokens = out.outputs[0].token_ids
        rescored = llm.generate([prompt + tokens], SamplingParams(
            max_tokens=1, prompt_logprobs=20, temperature=0.0), use_tqdm=False)[0]
        grammar = compiler.compile(sp.structured_outputs)
        mask = np.zeros((1, words), np.int32)
        for i, tok in enumerate(tokens):
            grammar.fill_bitmask(mask, 0)
            allowed = np.unpackbits(mask.view(np.uint8), bitorder="little").astype(bool)
            lp = rescored.prompt_logprobs[len(prompt) + i]
            assert lp.token_ids[0] == tok and allowed[tok]
            chosen = lp.logprobs[0]
            for t, v in zip(lp.token_ids[1:], lp.logprobs[1:]):
                if v > chosen + 1e-4:
                    assert not allowed[t], (i, t, v, chosen)
            assert grammar.accept([tok])
            checked += 1
    assert checked > 40


def test_batched_preempted_and_async_runs_equal_each_alone(smol, alone):
    """All constraints in one batch beside unconstrained requests, under a tight pool
    (preemption) and with async scheduling on (each step's sampler then waits for the
    grammars to take the step before's tokens, its model step does not): every structured
    output is its request's output alone, and the unconstrained ones are what they are
    without structured neighbours."""
    reqs, ref = alone
    plain = [(p, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
             for p, _, _ in reqs[:6]]
    for kwargs in (dict(async_scheduling=False), dict(async_scheduling=True, num_pages=34)):
        llm = LLM(max_num_seqs=16, max_num_batched_tokens=128, **smol, **kwargs)
        runner, deferred = llm.engine.model_runner, [0]
        launch_sampling = runner.launch_sampling

        def counting(handle):
            deferred[0] += 1
            return launch_sampling(handle)

        runner.launch_sampling = counting
        want_plain = llm.generate([p for p, _ in plain], plain[0][1], use_tqdm=False)
        free = llm.engine.num_free_pages
        prompts = [p for p, _, _ in reqs] + [p for p, _ in plain]
        params = [sp for _, sp, _ in reqs] + [sp for _, sp in plain]
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert _texts(outs) == _texts(ref) + _texts(want_plain), kwargs
        if "num_pages" in kwargs:
            assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.num_free_pages == free and llm.engine._num_structured == 0
        # async: the structured steps took the deferred sampler (never without grammars)
        assert (deferred[0] > 0) == kwargs["async_scheduling"], deferred
        if kwargs["async_scheduling"]:  # async again once no grammar is live
            llm.generate(prompts[:2], plain[0][1], use_tqdm=False)
            assert llm.engine._in_flight is None and llm.engine.async_scheduling


def test_logprobs_under_a_grammar_describe_the_allowed_tokens(llm):
    """vLLM's order: the mask applies before the logprobs, so the top 20 hold the few tokens
    the grammar allows first, then forbidden ones at -inf."""
    so = SO(choice=["yes", "no"])
    out = llm.generate([_chat(llm, "Is the sky blue?")], SamplingParams(
        temperature=0.0, max_tokens=4, logprobs=20, structured_outputs=so),
        use_tqdm=False)[0].outputs[0]
    first = out.logprobs[0]
    mask = np.zeros((1, -(-llm.engine.vocab_size // 32)), np.int32)
    llm.engine._grammars.compile(so).fill_bitmask(mask, 0)
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little").astype(bool)
    finite = [t for t, v in zip(first.token_ids[1:], first.logprobs[1:]) if np.isfinite(v)]
    assert first.ranks[0] == 1 and 0 < len(finite) == allowed.sum() < 20
    assert all(allowed[t] for t in finite) and np.isneginf(first.logprobs[-1])


def test_abort_frees_everything(llm):
    engine = llm.engine
    free = engine.num_free_pages
    engine.add_request("a", _chat(llm, "Describe a person."), SamplingParams(
        temperature=0.0, max_tokens=200, structured_outputs=SO(json=PERSON)))
    engine.step()
    engine.step()
    assert engine._num_structured == 1
    engine.abort_request("a")
    while engine.has_unfinished_requests() or engine.scheduler.has_unfinished_requests():
        engine.step()
    engine.step()
    assert engine._num_structured == 0 and engine.num_free_pages == free


@pytest.mark.parametrize("so,match", [
    (dict(regex="a(b"), "regex does not compile"),
    (dict(json={"type": "no-such-type"}), "json does not compile"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(grammar="start: missing_rule"), "grammar does not compile"),
    (dict(grammar="root ::= ("), "grammar"),
])
def test_bad_constraints_are_clear_errors(llm, so, match):
    with pytest.raises(ValueError, match=match) as e:
        llm.generate(["hi"], SamplingParams(max_tokens=4, structured_outputs=SO(**so)),
                     use_tqdm=False)
    assert e.value.param == "structured_outputs"
    assert llm.generate(["hi"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_params_need_one_constraint_and_a_tokenizer():
    with pytest.raises(ValueError, match="exactly one of"):
        SO(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="exactly one of"):
        SO()
    with pytest.raises(ValueError, match="choice must be a list"):
        SO(choice=["a", ""])
    with pytest.raises(ValueError, match="must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"regex": "a"})
    with pytest.raises(ValueError, match="need a tokenizer"):
        tiny_llm().generate([[5, 6]], SamplingParams(structured_outputs=SO(regex="a")),
                            use_tqdm=False)


def test_server_routes_take_every_way_of_asking(llm, alone):
    """OpenAI's response_format, vLLM's structured_outputs and guided_* fields, streamed or
    not; the chat answer is the offline engine's; forbidden tokens' logprobs are JSON numbers."""
    from fastapi.testclient import TestClient

    from jaxpage.entrypoints.openai.server import app_for_llm

    reqs, ref = alone
    with TestClient(app_for_llm(llm, model_name="smol")) as client:
        msgs = [{"role": "user",
                 "content": "Describe a fictional person as JSON with name, age and tags."}]
        r = client.post("/v1/chat/completions", json=dict(
            messages=msgs, max_tokens=96, temperature=0.0, response_format={
                "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}))
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["message"]["content"]
        _check_person(content)
        assert content == ref[0].outputs[0].text  # the same request offline
        r = client.post("/v1/completions", json=dict(
            prompt="The answer is", max_tokens=8, temperature=0.0, stream=True,
            guided_choice=CHOICES))
        assert r.status_code == 200
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.text.splitlines()
                       if line.startswith("data: {"))
        assert text in CHOICES
        r = client.post("/v1/completions", json=dict(
            prompt="Call me at", max_tokens=24, temperature=0.0, logprobs=5,
            structured_outputs={"regex": r"\(\d{3}\) \d{3}-\d{4}"}))
        body = r.json()  # strict JSON: no -Infinity anywhere
        assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", body["choices"][0]["text"])
        tops = [v for top in body["choices"][0]["logprobs"]["top_logprobs"] for v in top.values()]
        assert min(tops) == -9999.0 and all(np.isfinite(tops))
        r = client.post("/v1/chat/completions", json=dict(
            messages=msgs, max_tokens=8, guided_regex="a(b"))
        assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False,
                                       "required": ["zone"],
                                       "properties": {"zone": {"type": "string",
                                                               "maxLength": 20}}}}}


def _weather_args(args: str) -> dict:
    obj = json.loads(args)
    assert set(obj) == {"city", "unit"} and obj["unit"] in ("celsius", "fahrenheit")
    assert isinstance(obj["city"], str) and len(obj["city"]) <= 30
    return obj


def test_forced_tool_calls(llm):
    """tool_choice naming a function, and "required" (one call, or several): the calls parse,
    name known tools and follow their parameters; streamed like not; a follow-up turn with the
    tool's answer renders through the chat template."""
    from fastapi.testclient import TestClient

    from jaxpage.entrypoints.openai.server import app_for_llm

    msgs = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    named = dict(messages=msgs, max_tokens=64, temperature=0.0, tools=[WEATHER, TIME],
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    with TestClient(app_for_llm(llm, model_name="smol")) as client:
        r = client.post("/v1/chat/completions", json=named)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "get_weather"
        _weather_args(call["function"]["arguments"])

        r = client.post("/v1/chat/completions", json=dict(named, stream=True))
        deltas = [json.loads(line[6:])["choices"] for line in r.text.splitlines()
                  if line.startswith("data: {")]
        streamed = [c["delta"]["tool_calls"] for cs in deltas for c in cs
                    if c["delta"].get("tool_calls")]
        assert len(streamed) == 1 and streamed[0][0]["index"] == 0
        assert streamed[0][0]["function"] == call["function"]
        assert deltas[-1][0]["finish_reason"] == "tool_calls"

        for parallel in (False, True):
            r = client.post("/v1/chat/completions", json=dict(
                named, tool_choice="required", parallel_tool_calls=parallel, max_tokens=160))
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls", choice
            calls = choice["message"]["tool_calls"]
            assert calls and (parallel or len(calls) == 1)
            for c in calls:
                assert c["function"]["name"] in ("get_weather", "get_time")
                args = json.loads(c["function"]["arguments"])
                if c["function"]["name"] == "get_weather":
                    _weather_args(c["function"]["arguments"])
                else:
                    assert set(args) == {"zone"}

        r = client.post("/v1/chat/completions", json=dict(named, stop=[","]))  # cut short
        choice = r.json()["choices"][0]
        assert r.status_code == 200 and "tool_calls" not in choice["message"]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"].startswith("{")

        follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": call["id"], "content": "18 C, sunny"}]
        r = client.post("/v1/chat/completions", json=dict(messages=follow, max_tokens=16,
                                                          tools=[WEATHER], tool_choice="none"))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_auto_tool_choice_reads_the_models_own_calls(llm):
    """tool_choice "auto" with the hermes parser: the model's <tool_call> block (steered here
    by a regex, since SmolLM2 was not trained on the format) comes back as tool_calls, the text
    before it as content, streamed the same; without a call the answer is plain text."""
    from fastapi.testclient import TestClient

    from jaxpage.entrypoints.openai.server import app_for_llm

    steer = (r'Let me check\.\n<tool_call>\n\{"name": "get_weather", "arguments": '
             r'\{"city": "(Paris|Lyon|Nice)", "unit": "celsius"\}\}\n</tool_call>')
    body = dict(messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=80,
                temperature=0.0, tools=[WEATHER, TIME], structured_outputs={"regex": steer})
    with TestClient(app_for_llm(llm, model_name="smol")) as client:  # no parser: refused
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    with TestClient(app_for_llm(llm, model_name="smol", tool_call_parser="hermes")) as client:
        r = client.post("/v1/chat/completions", json=body)
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        assert choice["message"]["content"] == "Let me check."
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        _weather_args(call["function"]["arguments"])

        r = client.post("/v1/chat/completions", json=dict(body, stream=True))
        chunks = [json.loads(line[6:])["choices"] for line in r.text.splitlines()
                  if line.startswith("data: {")]
        deltas = [c["delta"] for cs in chunks for c in cs]
        streamed = "".join(d.get("content") or "" for d in deltas)
        assert streamed.strip() == "Let me check." and "<tool" not in streamed
        (calls,) = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
        assert calls[0]["function"] == call["function"]
        assert chunks[-1][0]["finish_reason"] == "tool_calls"

        plain = dict(body, structured_outputs={"regex": "Hello there, no tools <needed>"})
        r = client.post("/v1/chat/completions", json=plain)
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
        assert choice["message"]["content"] == "Hello there, no tools <needed>"
        r = client.post("/v1/chat/completions", json=dict(plain, stream=True))
        text = "".join(c["delta"].get("content") or "" for line in r.text.splitlines()
                       if line.startswith("data: {")
                       for c in json.loads(line[6:])["choices"])
        assert text == "Hello there, no tools <needed>"


def test_offline_chat_passes_tools_to_the_template(llm):
    """LLM.chat(tools=..., chat_template_kwargs=...) as vLLM's: both reach the template."""
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{{ flavour }}"
                "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}\n{% endfor %}")
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]
    out = llm.chat(msgs, SamplingParams(max_tokens=2), use_tqdm=False, chat_template=template,
                   tools=[WEATHER, TIME], chat_template_kwargs={"flavour": "<x>"})[0]
    assert out.prompt.startswith("[get_weather][get_time]<x>user: Weather?\nassistant: ")
