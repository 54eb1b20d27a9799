"""The server over real models (jax on CPU): its tokens are the offline engine's, and
``jaxpage serve`` starts, answers, drains on SIGTERM and exits cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from fastapi.testclient import TestClient

from jaxpage import SamplingParams
from jaxpage.entrypoints.openai.server import app_for_llm
from tests.entrypoints.engine_util import random_prompts, tiny_llm


def _ids_of(logprobs: dict) -> list[int]:
    """A tokenizer-less model's tokens come back as "token_id:N"."""
    return [int(t.split(":", 1)[1]) for t in logprobs["tokens"]]


def test_server_tokens_equal_the_offline_engines():
    llm = tiny_llm()
    prompts = random_prompts(6, 512, 3, 40, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    seeded = SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_tokens=12, ignore_eos=True)
    want_seeded = llm.generate(prompts[0], seeded, use_tqdm=False)[0].outputs[0].token_ids
    got: dict[int, list[int]] = {}
    with TestClient(app_for_llm(llm, model_name="tiny")) as client:
        def ask(i):  # concurrent requests: the server batches them
            r = client.post("/v1/completions", json=dict(prompt=prompts[i], max_tokens=12,
                                                         temperature=0.0, ignore_eos=True,
                                                         logprobs=1))
            assert r.status_code == 200, r.text
            got[i] = _ids_of(r.json()["choices"][0]["logprobs"])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        r = client.post("/v1/completions", json=dict(prompt=prompts[0], max_tokens=12,
                                                     temperature=0.9, top_p=0.8, seed=7,
                                                     ignore_eos=True, logprobs=0))
        assert _ids_of(r.json()["choices"][0]["logprobs"]) == want_seeded
    assert [got[i] for i in range(len(prompts))] == want


def test_server_with_speculative_decoding():
    """Several tokens a step reach the client as plain decoding's tokens, streamed or not, and
    /metrics counts the drafts."""
    import numpy as np

    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 512, 5).tolist() * 5 for _ in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in tiny_llm().generate(prompts, params, use_tqdm=False)]
    llm = tiny_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    with TestClient(app_for_llm(llm, model_name="tiny")) as client:
        for i, prompt in enumerate(prompts):
            body = dict(prompt=prompt, max_tokens=16, temperature=0.0, ignore_eos=True,
                        logprobs=0)
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert _ids_of(r.json()["choices"][0]["logprobs"]) == want[i]
            streamed = []
            with client.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        lp = json.loads(line[6:])["choices"][0].get("logprobs")
                        streamed += _ids_of(lp) if lp else []
            assert streamed == want[i]
        metrics = client.get("/metrics").text
    kept = next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("jaxpage:spec_decode_num_accepted_tokens_total "))
    assert kept > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_and_drains_on_sigterm(default_gguf, tmp_path):
    import httpx

    from jaxpage import LLM

    port = _free_port()
    exe = shutil.which("jaxpage")
    cmd = ([exe] if exe else [sys.executable, "-m", "jaxpage.entrypoints.cli"]) + [
        "serve", "--model", str(default_gguf), "--served-model-name", "smol", "--port",
        str(port), "--max-model-len", "512", "--dtype", "float32", "--max-num-seqs", "4",
        "--max-num-batched-tokens", "256"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, JAXPAGE_API_KEY=""))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json=dict(
            model="smol", messages=messages, temperature=0.0, max_tokens=16))
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        assert "Paris" in answer
        # SIGTERM while a streamed request is in flight: it still completes, then the
        # process exits 0.
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json=dict(
                model="smol", messages=messages, temperature=0.0, max_tokens=24,
                stream=True)) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [first] + list(lines)
        events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert rest[-1] == "data: [DONE]" or rest[-2] == "data: [DONE]"
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    # The offline engine gives the same greedy answer.
    llm = LLM(model=str(default_gguf), dtype="float32", max_model_len=512, max_num_seqs=4,
              max_num_batched_tokens=256)
    offline = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert offline[0].outputs[0].text == answer


def test_echo_with_logprobs_scores_the_prompt():
    """``echo`` + ``logprobs`` (lm-evaluation-harness' loglikelihood): the prompt's tokens come
    back scored as the offline engine's prompt_logprobs score them, the first unscored; with
    ``max_tokens=0`` the prompt alone."""
    llm = tiny_llm()
    prompt = random_prompts(1, 512, 12, 12, seed=6)[0]
    want = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                               logprobs=2, prompt_logprobs=2),
                        use_tqdm=False)[0]
    with TestClient(app_for_llm(llm, model_name="tiny")) as client:
        r = client.post("/v1/completions", json=dict(prompt=prompt, max_tokens=3, echo=True,
                                                     logprobs=2, temperature=0.0,
                                                     ignore_eos=True))
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert _ids_of(lp) == prompt + want.outputs[0].token_ids
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for got, w in zip(lp["token_logprobs"][1:len(prompt)], want.prompt_logprobs[1:]):
            assert got == pytest.approx(w.logprobs[0], abs=1e-4)
        for got, w in zip(lp["token_logprobs"][len(prompt):], want.outputs[0].logprobs):
            assert got == pytest.approx(w.logprobs[0], abs=1e-4)
        assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
        assert lp["text_offset"] == sorted(lp["text_offset"])
        # max_tokens=0: the prompt alone, scored; no completion tokens
        r = client.post("/v1/completions", json=dict(prompt=prompt, max_tokens=0, echo=True,
                                                     logprobs=1))
        assert r.status_code == 200, r.text
        body = r.json()
        assert _ids_of(body["choices"][0]["logprobs"]) == prompt
        assert body["usage"]["completion_tokens"] == 0
        assert body["choices"][0]["finish_reason"] == "length"
        for bad, param in ((dict(max_tokens=0), "max_tokens"),
                           (dict(max_tokens=0, echo=True, stream=True), "max_tokens"),
                           (dict(echo=True, logprobs=1, stream=True), "echo")):
            r = client.post("/v1/completions", json=dict(prompt=prompt, **bad))
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
