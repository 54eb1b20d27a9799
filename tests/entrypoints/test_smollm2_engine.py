"""The real model (SmolLM2-135M-Instruct, GGUF) through the whole engine: greedy tokens do not
depend on batching, KV pressure, prefix caching or chunk size; stop strings cut the text."""

import pytest

from jaxpage import LLM, SamplingParams
from tests.entrypoints.engine_util import assert_close

pytestmark = pytest.mark.slow

TOPICS = ["the ocean", "a red bicycle", "quantum computers", "bread baking", "Paris in spring",
          "the history of chess", "volcanoes", "a lighthouse keeper"]


def _prompts(tokenizer):
    """32 prompts of mixed lengths, half chat-templated, several sharing a long system prompt."""
    system = ("You are a concise assistant. Answer in one or two sentences, use plain words, and "
              "never repeat the question back to the user. ")
    out = []
    for i in range(32):
        topic = TOPICS[i % len(TOPICS)]
        if i % 2:
            msgs = [{"role": "system", "content": system * (1 + i % 3)},
                    {"role": "user", "content": f"Tell me something about {topic}."}]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            out.append(tokenizer(f"Here is a short story about {topic}:" + " Once" * (i % 5))["input_ids"])
    return out


@pytest.fixture(scope="module")
def smol(default_gguf):
    kw = dict(model=str(default_gguf), dtype="float32", max_model_len=512, seed=0)
    return kw


@pytest.fixture(scope="module")
def prompts_and_reference(smol):
    llm = LLM(max_num_seqs=1, max_num_batched_tokens=512, **smol)
    prompts = _prompts(llm.tokenizer)
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5)
    ref = [llm.generate([p], sp, use_tqdm=False)[0] for p in prompts]
    return prompts, sp, ref


@pytest.mark.parametrize("name,kwargs,check", [
    ("batch of 32", dict(max_num_seqs=32, max_num_batched_tokens=512), None),
    ("KV pressure", dict(max_num_seqs=32, max_num_batched_tokens=256, num_pages=48), "preempt"),
    ("prefix caching off", dict(max_num_seqs=16, enable_prefix_caching=False), "nohits"),
    ("chunked prefill 32", dict(max_num_seqs=16, max_num_batched_tokens=32), "hits"),
    ("async scheduling under KV pressure", dict(max_num_seqs=32, max_num_batched_tokens=256,
                                                num_pages=48, async_scheduling=True), "preempt"),
])
def test_equivalence(smol, prompts_and_reference, name, kwargs, check):
    prompts, sp, ref = prompts_and_reference
    llm = LLM(**smol, **kwargs)
    free = llm.engine.num_free_pages
    outs = llm.generate(prompts, sp, use_tqdm=False)
    stats = llm.engine.get_stats()
    if check == "preempt":
        assert stats["num_preemptions"] > 0
    elif check == "nohits":
        assert stats["prefix_cache_hits"] == 0
    elif check == "hits":
        assert stats["prefix_cache_hits"] > 0
    assert llm.engine.num_free_pages == free
    n = assert_close(ref, outs)
    print(f"SmolLM2 {name}: {n}/32 bit-identical; stats {stats}")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stop_string_cuts_text(smol, async_scheduling):
    llm = LLM(max_num_seqs=4, async_scheduling=async_scheduling, **smol)
    msgs = [{"role": "user", "content": "Describe a sunny day at the beach."}]
    full = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)[0].outputs[0].text
    words = full.split()
    assert len(words) > 6, full
    stop = " " + words[5]  # a stop string that spans a token boundary (leading space + word)
    at = full.index(stop)
    cut = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]),
                   use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full[:at]
    kept = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=40, stop=[stop],
                                         include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full[:at + len(stop)]
