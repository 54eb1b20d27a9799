"""Embeddings (``LLM.embed``, ``/v1/embeddings``): the last prompt token's final-normed hidden
state, as HF transformers computes it from the same checkpoint, pooled (``dimensions``) and
normalized; the same whatever else is batched, chunked or prefix-cached; and on the server,
floats or base64, with bad input a 400 naming the field while the engine keeps serving."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from jaxpage import LLM, PoolingParams
from jaxpage.entrypoints.openai.server import app_for_llm
from tests.entrypoints.engine_util import random_prompts
from tests.entrypoints.test_openai_server import assert_error
from tests.models.test_hf_parity import VOCAB, build_hf_model, save_hf_model

PROMPTS = random_prompts(6, VOCAB, 2, 30, seed=8, shared_prefix=9)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build_hf_model("llama3")
    path = tmp_path_factory.mktemp("embed") / "hf"
    save_hf_model(model, path)
    with torch.no_grad():
        want = [model.model(torch.tensor([p])).last_hidden_state[0, -1].float().numpy()
                for p in PROMPTS]
    return path, want


def _llm(path, **kw):
    return LLM(model=str(path), dtype="float32", seed=0, max_model_len=64, **kw)


def _unit(v):
    return v / np.linalg.norm(v)


def test_embed_is_hf_last_hidden_state_pooled(checkpoint):
    path, want = checkpoint
    llm = _llm(path)
    reqs = [{"prompt_token_ids": p} for p in PROMPTS]
    raw = llm.embed(reqs, PoolingParams(normalize=False))
    for got, w, p in zip(raw, want, PROMPTS):
        assert got.prompt_token_ids == p and got.finished
        np.testing.assert_allclose(got.outputs.embedding, w, rtol=1e-4, atol=1e-4)
    for got, w in zip(llm.embed(reqs), want):  # default: unit norm
        np.testing.assert_allclose(got.outputs.embedding, _unit(w), rtol=1e-4, atol=1e-5)
    for got, w in zip(llm.embed(reqs, PoolingParams(dimensions=8)), want):  # Matryoshka cut
        np.testing.assert_allclose(got.outputs.embedding, _unit(w[:8]), rtol=1e-4, atol=1e-5)
    # truncate_prompt_tokens: the embedding of the prompt's last 5 tokens
    cut = llm.embed(reqs, truncate_prompt_tokens=5)
    last5 = llm.embed([{"prompt_token_ids": p[-5:]} for p in PROMPTS])
    for a, b, p in zip(cut, last5, PROMPTS):
        assert a.prompt_token_ids == p[-5:]
        np.testing.assert_allclose(a.outputs.embedding, b.outputs.embedding, atol=1e-6)
    with pytest.raises(ValueError, match="dimensions"):
        llm.embed(reqs, PoolingParams(dimensions=65))  # the model's hidden size is 64
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=0)
    # an embedding request beside generation ones: each gets what it asked for
    outs = llm.generate(reqs[:2], None, use_tqdm=False)
    assert all(o.hidden is None for o in outs)


def test_embed_is_the_same_batched_chunked_and_prefix_cached(checkpoint):
    path, want = checkpoint
    reqs = [{"prompt_token_ids": p} for p in PROMPTS]
    alone = [_llm(path, max_num_seqs=1).embed([r])[0].outputs.embedding for r in reqs]
    # 16-token steps: prompts chunked; the shared prefix's pages cached after the first
    small = _llm(path, max_num_seqs=4, max_num_batched_tokens=16, block_size=4)
    small.embed(reqs[:1])
    batched = small.embed(reqs)
    assert small.engine.get_stats()["prefix_cache_hits"] > 0
    for a, b, w in zip(alone, batched, want):
        np.testing.assert_allclose(b.outputs.embedding, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a, _unit(w), rtol=1e-4, atol=1e-5)


def test_embeddings_route(checkpoint):
    path, want = checkpoint
    llm = _llm(path)
    with TestClient(app_for_llm(llm, model_name="tiny")) as client:
        r = client.post("/v1/embeddings", json=dict(input=PROMPTS[:3], model="tiny"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "tiny"
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        for d, w in zip(body["data"], want):
            assert d["object"] == "embedding"
            np.testing.assert_allclose(d["embedding"], _unit(w), rtol=1e-4, atol=1e-5)
        assert body["usage"]["prompt_tokens"] == sum(len(p) for p in PROMPTS[:3])
        r = client.post("/v1/embeddings", json=dict(input=PROMPTS[0], encoding_format="base64",
                                                     dimensions=16))
        assert r.status_code == 200, r.text
        emb = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
        np.testing.assert_allclose(emb, _unit(want[0][:16]), rtol=1e-4, atol=1e-5)
        for bad, param in ((dict(input=[]), "input"), (dict(input=[[]]), "input"),
                           (dict(input=PROMPTS[0], dimensions=65), "dimensions"),
                           (dict(input=PROMPTS[0], dimensions=0), "dimensions"),
                           (dict(input=PROMPTS[0], encoding_format="hex"), "encoding_format"),
                           (dict(input=[VOCAB + 5]), None),
                           (dict(input="text, but no tokenizer"), "prompt")):
            err = assert_error(client.post("/v1/embeddings", json=bad), 400)
            if param is not None:
                assert param in (err["param"] or "") or param in err["message"], (bad, err)
        ok = client.post("/v1/embeddings", json=dict(input=PROMPTS[1]))
        assert ok.status_code == 200  # the engine keeps serving
