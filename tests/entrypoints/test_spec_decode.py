"""Speculative decoding (n-gram drafts) through the real runner: every request's tokens are
what plain decoding gives — greedy and seeded sampling with every sampling option — under
batching, preemption and prefix caching; the real model keeps most drafts on a copying task."""

import numpy as np
import pytest

from jaxpage import LLM, SamplingParams
from tests.entrypoints.engine_util import assert_close, tiny_llm

SPEC = {"method": "ngram", "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def prompts():
    """Random prompts, and prompts that repeat a phrase (drafts from the first step)."""
    rng = np.random.default_rng(7)
    out = [rng.integers(3, 512, int(rng.integers(4, 30))).tolist() for _ in range(10)]
    out += [(rng.integers(3, 512, int(rng.integers(2, 6))).tolist()) * int(rng.integers(3, 8))
            for _ in range(10)]
    return out


SAMPLING = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3),
    "random": SamplingParams(temperature=0.7, seed=11, max_tokens=24, ignore_eos=True,
                             logprobs=1),
    "filters": SamplingParams(temperature=0.9, top_k=20, top_p=0.8, min_p=0.02, seed=5,
                              max_tokens=24, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                repetition_penalty=1.3, presence_penalty=0.4,
                                frequency_penalty=0.2),
    "bias_min_tokens": SamplingParams(temperature=0.0, max_tokens=24, min_tokens=10,
                                      logit_bias={7: 3.0, 2: 2.0}),
    "n2": SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=16, ignore_eos=True),
    "prompt_logprobs": SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                      prompt_logprobs=2),
}


@pytest.fixture(scope="module")
def engines():
    return tiny_llm(max_num_seqs=16), tiny_llm(max_num_seqs=16, speculative_config=SPEC)


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("kind", list(SAMPLING))
def test_same_tokens_as_plain_decoding(engines, prompts, kind):
    plain, spec = engines
    sp = SAMPLING[kind]
    before = spec.engine.get_stats()
    a = plain.generate(prompts, sp, use_tqdm=False)
    b = spec.generate(prompts, sp, use_tqdm=False)
    after = spec.engine.get_stats()
    if kind in ("greedy", "penalties", "bias_min_tokens", "prompt_logprobs"):
        assert_close(a, b, min_identical=0.9)  # a float near-tie may flip one (vLLM's rule)
    else:  # seeded sampling: every position draws its own noise, drafts or not
        assert _tokens(a) == _tokens(b)
    if sp.logprobs is not None:
        for x, y in zip(a, b):
            if x.outputs[0].token_ids == y.outputs[0].token_ids:
                lx = [lp.logprobs[0] for lp in x.outputs[0].logprobs]
                ly = [lp.logprobs[0] for lp in y.outputs[0].logprobs]
                np.testing.assert_allclose(lx, ly, atol=1e-4)
                assert [lp.token_ids for lp in x.outputs[0].logprobs] == \
                    [lp.token_ids for lp in y.outputs[0].logprobs]
    if sp.prompt_logprobs is not None:
        for x, y in zip(a, b):
            assert x.prompt_logprobs[0] is None and y.prompt_logprobs[0] is None
            np.testing.assert_allclose([lp.logprobs[0] for lp in x.prompt_logprobs[1:]],
                                       [lp.logprobs[0] for lp in y.prompt_logprobs[1:]],
                                       atol=1e-4)
    drafted = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    assert drafted > 0
    if kind == "greedy":  # the random model repeats itself: many drafts are right
        accepted = (after["spec_decode_num_accepted_tokens"]
                    - before["spec_decode_num_accepted_tokens"])
        assert accepted > 0.2 * drafted, (accepted, drafted)
    assert spec.engine.num_free_pages == plain.engine.num_free_pages


def test_under_preemption_and_prefix_caching(prompts):
    sp = SAMPLING["greedy"]
    ref = [tiny_llm(max_num_seqs=1).generate([p], sp, use_tqdm=False)[0] for p in prompts[:6]]
    ref += tiny_llm(max_num_seqs=1).generate(prompts[6:], sp, use_tqdm=False)
    llm = tiny_llm(max_num_seqs=16, max_num_batched_tokens=64, num_pages=30, max_model_len=96,
                   speculative_config=SPEC)
    free = llm.engine.num_free_pages
    outs = llm.generate(prompts, sp, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert_close(ref, outs, min_identical=0.9)
    assert llm.engine.num_free_pages == free


def test_bad_speculative_config_is_a_clear_error():
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        tiny_llm(speculative_config={"method": "ngram", "num_speculative_tokens": -1})


def _run_counting_steps(kw: dict, k: int, prompts, sp):
    """An engine with k n-gram drafts: (the LLM, its outputs, its steps)."""
    spec = LLM(**kw, speculative_config={"method": "ngram", "num_speculative_tokens": k})
    steps = []
    engine_step = spec.engine.step
    spec.engine.step = lambda: (steps.append(1), engine_step())[1]
    return spec, spec.generate(prompts, sp, use_tqdm=False), steps


@pytest.mark.slow
def test_smollm2_keeps_drafts_when_copying(default_gguf):
    """The real model asked to repeat a passage: the same text as plain decoding, most drafts
    kept, and fewer steps than tokens."""
    kw = dict(model=str(default_gguf), dtype="float32", max_model_len=512, seed=0,
              max_num_seqs=4)
    passage = ("The lighthouse keeper climbed the spiral stairs every evening, lit the great "
               "lamp, and wrote the weather in a worn leather book.")
    plain = LLM(**kw)
    tok = plain.tokenizer
    prompts = [tok.apply_chat_template(
        [{"role": "user", "content": f"Repeat this sentence exactly{s}: {passage}"}],
        tokenize=False, add_generation_prompt=True) for s in ("", " once", ", word for word")]
    sp = SamplingParams(temperature=0.0, max_tokens=40, logprobs=1)
    a = plain.generate(prompts, sp, use_tqdm=False)
    del plain
    spec, b, steps = _run_counting_steps(kw, 4, prompts, sp)
    assert [o.outputs[0].text for o in a] == [o.outputs[0].text for o in b]
    assert passage[:40] in b[0].outputs[0].text  # it did copy
    stats = spec.engine.get_stats()
    drafted, kept = (stats["spec_decode_num_draft_tokens"],
                     stats["spec_decode_num_accepted_tokens"])
    assert kept > 0.5 * drafted, (kept, drafted)
    tokens = sum(len(o.outputs[0].token_ids) for o in b)
    assert len(steps) < 0.6 * tokens / len(prompts) + 4, (len(steps), tokens)
    print(f"SmolLM2 copying: {kept}/{drafted} drafts kept, {len(steps)} steps for "
          f"{tokens} tokens of {len(prompts)} requests")


@pytest.mark.slow
def test_smollm2_json_schema_drafts_are_the_forced_tokens(default_gguf):
    """A structured-output request's drafts are the tokens its grammar forces (keys,
    punctuation): the same JSON as plain decoding, in fewer steps."""
    import json

    from jaxpage import StructuredOutputsParams

    schema = {"type": "object", "properties": {
        "city": {"type": "string"}, "country": {"type": "string"},
        "population_millions": {"type": "number"}, "is_capital": {"type": "boolean"}},
        "required": ["city", "country", "population_millions", "is_capital"],
        "additionalProperties": False}
    kw = dict(model=str(default_gguf), dtype="float32", max_model_len=512, seed=0,
              max_num_seqs=4)
    plain = LLM(**kw)
    tok = plain.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Describe {c} as JSON."}],
                                       tokenize=False, add_generation_prompt=True)
               for c in ("Paris", "Tokyo", "Lima")]
    sp = SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=StructuredOutputsParams(
        json=schema, disable_any_whitespace=True))
    a = plain.generate(prompts, sp, use_tqdm=False)
    del plain
    spec, b, steps = _run_counting_steps(kw, 6, prompts, sp)
    # tokens too: a step whose kept drafts complete the grammar must not add the bonus token
    # after them (plain decoding stops at the grammar's end without sampling one)
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in a] == \
        [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in b]
    for o in b:
        assert set(json.loads(o.outputs[0].text)) == set(schema["properties"])
    stats = spec.engine.get_stats()
    drafted, kept = (stats["spec_decode_num_draft_tokens"],
                     stats["spec_decode_num_accepted_tokens"])
    tokens = sum(len(o.outputs[0].token_ids) for o in b)
    assert kept > 0.5 * drafted and len(steps) < 0.85 * tokens / len(prompts) + 2, (
        kept, drafted, len(steps), tokens)
    print(f"SmolLM2 JSON: {kept}/{drafted} forced drafts kept, {len(steps)} steps for "
          f"{tokens} tokens of {len(prompts)} requests")
