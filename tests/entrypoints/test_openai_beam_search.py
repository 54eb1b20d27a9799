"""``use_beam_search`` on the OpenAI routes (vLLM's extra field): the n best beams of width n
as the choices, the same as ``LLM.beam_search`` offline (a real tiny model on CPU); what beam
search cannot honour is a 400 naming the field, and the engine keeps serving (the fake
runner's server)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from jaxpage import BeamSearchParams
from jaxpage.entrypoints.openai.server import app_for_llm
from tests.entrypoints.engine_util import TINY_LLAMA, random_prompts, tiny_llm
from tests.entrypoints.test_openai_server import assert_error


@pytest.mark.parametrize("ignore_eos,length_penalty", [(True, 1.0), (False, 0.5)])
def test_server_beam_search_equals_the_offline_one(tok, ignore_eos, length_penalty):
    llm = tiny_llm(hf_config=dict(TINY_LLAMA, vocab_size=len(tok), eos_token_id=5))
    llm.tokenizer = tok  # texts to compare; the model's own vocabulary is the tokenizer's
    prompts = random_prompts(2, len(tok), 4, 12, seed=11)
    width, max_tokens = 3, 6
    want = llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(
        beam_width=width, max_tokens=max_tokens, ignore_eos=ignore_eos,
        length_penalty=length_penalty))
    with TestClient(app_for_llm(llm, model_name="tiny")) as client:
        r = client.post("/v1/completions", json=dict(
            prompt=prompts, n=width, use_beam_search=True, max_tokens=max_tokens,
            ignore_eos=ignore_eos, length_penalty=length_penalty))
        assert r.status_code == 200, r.text
        body = r.json()
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(2 * width))
    completion_tokens = 0
    for i, (prompt, out) in enumerate(zip(prompts, want)):
        for k, beam in enumerate(out.sequences):
            got = choices[i * width + k]
            tokens = beam.tokens[len(prompt):]
            completion_tokens += len(tokens)
            assert got["text"] == tok.decode(tokens, skip_special_tokens=True), (i, k)
            assert got["finish_reason"] == beam.finish_reason
            assert got["logprobs"] is None
    assert body["usage"]["completion_tokens"] == completion_tokens


def test_chat_beam_search_answers_n_choices(served):
    client, _ = served
    r = client.post("/v1/chat/completions", json=dict(
        messages=[{"role": "user", "content": "hello there"}], n=2, use_beam_search=True,
        max_tokens=5))
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
               for c in choices)


@pytest.mark.parametrize("extra,param", [
    (dict(stream=True), "stream"),
    (dict(logprobs=2), "logprobs"),
    (dict(n=11), "n"),
    (dict(top_p=0.5), "top_p"),
    (dict(stop=["x"]), "stop"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(length_penalty="high"), "length_penalty"),
    (dict(temperature=-1.0), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_what_beam_search_cannot_honour_is_a_400(served, extra, param):
    client, _ = served
    body = {**dict(prompt="hello world", n=2, use_beam_search=True, max_tokens=4), **extra}
    assert_error(client.post("/v1/completions", json=body), 400, param)
    ok = client.post("/v1/completions", json=dict(prompt="hello", max_tokens=3))
    assert ok.status_code == 200, ok.text  # the engine keeps serving
