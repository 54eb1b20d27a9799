"""LLM.generate on the tiny random model: sampling fields, n > 1, aborts, leaks, bad input."""

import jax
import numpy as np
import pytest

from jaxpage import SamplingParams
from tests.entrypoints.engine_util import random_prompts, tiny_llm


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(max_num_seqs=16, max_num_batched_tokens=128)


def test_seeded_sampling_is_independent_of_batch(llm):
    prompts = random_prompts(12, 512, 2, 30, seed=3)
    target = prompts[5]
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([target], sp, use_tqdm=False)[0].outputs[0].token_ids
    # Same request at another batch row, beside requests with other settings.
    others = [SamplingParams(temperature=0.7, max_tokens=5 + i, seed=i) for i in range(len(prompts))]
    params = others[:2] + [sp] + others[3:]
    mixed = llm.generate(prompts[:2] + [target] + prompts[3:], params, use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    # And a different seed gives a different sequence (the seed is actually used).
    other_seed = llm.generate([target], SamplingParams(temperature=1.0, seed=99, max_tokens=16,
                                                       ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_completions_share_prompt_pages(llm):
    prompt = random_prompts(1, 512, 33, 33, seed=4)[0]  # 8 full pages of 4 tokens
    baseline = llm.engine.num_free_pages
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8,
                                                ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # children sample independently
    assert out.num_cached_tokens == 0
    assert llm.engine.get_stats()["prefix_cache_hits"] > 0  # children reused the prompt's pages
    assert llm.engine.num_free_pages == baseline


def test_stop_token_ids_min_tokens_and_max_tokens(llm):
    prompt = random_prompts(1, 512, 10, 10, seed=5)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == free.token_ids[:first + 1]
    # min_tokens suppresses the stop id: the sequence continues past where it stopped.
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                stop_token_ids=[stop_at], min_tokens=first + 2),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) > first + 1 and stop_at not in out.token_ids[:first + 2]


def test_logprobs_and_prompt_logprobs_match_a_full_forward(llm):
    prompt = random_prompts(1, 512, 9, 9, seed=6)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 4 and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    for tok, lp in zip(comp.token_ids, comp.logprobs):
        assert lp.token_ids[0] == tok and lp.ranks[0] == 1  # greedy: the argmax, rank 1
        assert lp.token_ids[1] == tok and len(lp.token_ids) == 4
        assert np.all(np.diff(lp.logprobs[1:]) <= 0)
    assert comp.cumulative_logprob == pytest.approx(sum(lp.logprobs[0] for lp in comp.logprobs), rel=1e-5)
    for i, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp.token_ids[0] == prompt[i] and len(lp.token_ids) == 3 and lp.logprobs[0] <= 0
    # The prompt logprob of token i equals the sampled-token logprob of a run on prompt[:i].
    short = llm.generate([prompt[:5]], SamplingParams(temperature=0.0, max_tokens=1, logprobs=20,
                                                      ignore_eos=True), use_tqdm=False)[0]
    lp5 = short.outputs[0].logprobs[0]
    want = dict(zip(lp5.token_ids[1:], lp5.logprobs[1:]))
    if prompt[5] in want:
        assert out.prompt_logprobs[5].logprobs[0] == pytest.approx(want[prompt[5]], abs=1e-4)


def test_abort_mid_generation_frees_every_page(llm):
    engine = llm.engine
    baseline = engine.num_free_pages
    prompts = random_prompts(10, 512, 5, 30, seed=8)
    for i, p in enumerate(prompts):
        engine.add_request(f"abort-{i}", p, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.num_free_pages < baseline
    engine.abort_request([f"abort-{i}" for i in range(0, 10, 2)])
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.num_free_pages == baseline
    assert not llm.engine.model_runner.input_batch.requests  # the runner forgot them too


@pytest.mark.parametrize("bad,match", [
    ([[]], "at least one token"),
    ([[1, 2, 512]], "outside the vocabulary"),
    ([[-1]], "outside the vocabulary"),
    ([""], "non-empty"),
])
def test_bad_prompts_raise_before_anything_is_queued(llm, bad, match):
    free = llm.engine.num_free_pages
    with pytest.raises(ValueError, match=match):
        llm.generate([[5, 6, 7]] + bad, SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and llm.engine.num_free_pages == free
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=2.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(n=0), "n"), (dict(n=100_000), "n"),
    (dict(max_tokens=0), "max_tokens"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(logprobs=21), "logprobs"), (dict(stop=["x"] * 100), "stop"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(truncate_prompt_tokens=2.5), "truncate_prompt_tokens"),
])
def test_bad_sampling_params(kwargs, param):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_context_length_exceeded(llm):
    with pytest.raises(ValueError, match="maximum context length is 256") as e:
        llm.generate([[5] * 200], SamplingParams(max_tokens=100), use_tqdm=False)
    assert e.value.code == "context_length_exceeded"


def test_unknown_llm_argument():
    with pytest.raises(TypeError, match="unknown arguments"):
        tiny_llm(not_a_flag=1)


def test_runner_uses_reference_backend_on_cpu(llm):
    assert jax.default_backend() != "cpu" or llm.engine.model_runner.backend == "reference"


def test_penalties_and_logit_bias_reach_the_sampler(llm):
    prompt = random_prompts(1, 512, 6, 6, seed=9)[0]
    base = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(base)) < len(base)  # a random tiny model loops under greedy decoding
    pen = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                                frequency_penalty=2.0, presence_penalty=2.0),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(pen)) > len(set(base))
    rep = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                                repetition_penalty=2.0),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert rep != base
    biased = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                   logit_bias={77: 100.0}),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert biased == [77] * 8


def test_bad_engine_args_fail_before_the_weights_load(tmp_path):
    # A tiny Llama's config.json beside a checkpoint that lacks its tensors: a bad engine
    # argument is what gets reported, so a flag never waits for a long load to fail.
    import json

    from safetensors.numpy import save_file

    from jaxpage import LLM
    from tests.entrypoints.engine_util import TINY_LLAMA

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    save_file({"unrelated": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        LLM(model=str(tmp_path), block_size=3)
    with pytest.raises(ValueError, match="max_model_len 512 exceeds the model's limit 256"):
        LLM(model=str(tmp_path), max_model_len=512)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(model=str(tmp_path), kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="calculate_kv_scales needs an fp8 kv_cache_dtype"):
        LLM(model=str(tmp_path), calculate_kv_scales=True)
    with pytest.raises(ValueError, match="checkpoint tensor"):  # good arguments: the weights fail
        LLM(model=str(tmp_path))


def test_chat_continue_final_message(llm):
    """vLLM's ``continue_final_message``: the prompt is the template cut inside the
    assistant's last message (no generation prompt), so the output continues that text."""
    from tests.engine.test_detokenizer import build_tokenizer
    from tests.entrypoints.server_util import TEMPLATE

    tok = build_tokenizer()  # 320 tokens: inside the tiny model's 512
    saved, llm.tokenizer = llm.tokenizer, tok
    try:
        msgs = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello wor"}]
        sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        out = llm.chat(msgs, sp, use_tqdm=False, chat_template=TEMPLATE,
                       continue_final_message=True)[0]
        assert out.prompt == "<|sep|>user: hi\n<|sep|>assistant: Hello wor"
        ids = tok(out.prompt, add_special_tokens=False)["input_ids"]
        assert out.prompt_token_ids == ids
        want = llm.generate([ids], sp, use_tqdm=False)[0].outputs[0].token_ids
        assert out.outputs[0].token_ids == want
        with pytest.raises(ValueError, match="continue_final_message"):
            llm.chat(msgs[:1], sp, use_tqdm=False, chat_template=TEMPLATE,
                     continue_final_message=True)
    finally:
        llm.tokenizer = saved


def test_truncate_prompt_tokens_keeps_the_prompts_end(llm):
    """vLLM's ``truncate_prompt_tokens``: the request runs on the prompt's last k tokens (its
    output and ``prompt_token_ids`` are those of that shorter prompt), and a prompt past the
    context limit that fits once cut is accepted."""
    prompt = random_prompts(1, 512, 40, 40, seed=9)[0]
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    cut = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                         truncate_prompt_tokens=12)
    got = llm.generate([prompt], cut, use_tqdm=False)[0]
    want = llm.generate([prompt[-12:]], sp, use_tqdm=False)[0]
    assert got.prompt_token_ids == prompt[-12:]
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    too_long = random_prompts(1, 512, 300, 300, seed=10)[0]  # max_model_len is 256
    with pytest.raises(ValueError):
        llm.generate([too_long], sp, use_tqdm=False)
    out = llm.generate([too_long], cut, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == 12 and len(out.outputs[0].token_ids) == 6
