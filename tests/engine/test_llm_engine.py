"""LLMEngine end to end over the simulated-KV fake runner (tests/engine/fake_runner.py)."""

import random

import pytest

from jaxpage.config import CacheConfig, SchedulerConfig
from jaxpage.engine.llm_engine import LLMEngine
from jaxpage.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeRunner, fake_logprob, reference_generate  # noqa: F401

V = 97
EOS = 0


def make_engine(*, num_pages=200, page_size=4, max_num_seqs=32, budget=256, max_model_len=96,
                caching=True, chunked=True, tokenizer=None, vocab_size=V, eos=(EOS,),
                max_waiting=1000, async_scheduling=False, **runner_kw):
    sc = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                         max_model_len=max_model_len, enable_chunked_prefill=chunked,
                         max_waiting_requests=max_waiting, async_scheduling=async_scheduling)
    cc = CacheConfig(page_size=page_size, enable_prefix_caching=caching)
    runner = FakeRunner(num_pages, page_size, vocab_size, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=budget, **runner_kw)
    engine = LLMEngine(runner, tokenizer, scheduler_config=sc, cache_config=cc,
                       num_pages=num_pages, vocab_size=vocab_size, eos_token_ids=list(eos),
                       max_model_len=max_model_len, seed=0)
    runner.scheduler = engine.scheduler
    return engine, runner


def run(engine, max_steps=5000):
    """Steps until idle; returns {request_id: final RequestOutput} and checks streaming."""
    final, seen = {}, {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return final
        for out in engine.step():
            assert out.request_id not in final, "output after finishing"
            for c in out.outputs:  # cumulative outputs only grow
                prev = seen.get((out.request_id, c.index), [])
                assert c.token_ids[:len(prev)] == prev
                seen[(out.request_id, c.index)] = c.token_ids
            if out.finished:
                final[out.request_id] = out
    raise AssertionError("engine did not drain")


def workload(seed=0, num=32):
    """Mixed lengths; half the prompts share a 12-token system prefix (cache hits)."""
    rng = random.Random(seed)
    system = [rng.randrange(1, V) for _ in range(12)]
    items = []
    for i in range(num):
        body = [rng.randrange(1, V) for _ in range(rng.randrange(1, 40))]
        prompt = system + body if i % 2 else body
        sp = SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 25),
                            ignore_eos=bool(i % 3), logprobs=2 if i % 5 == 0 else None)
        items.append((f"r{i}", prompt, sp))
    return items


def expected(prompt, sp, eos=(EOS,)):
    stop = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(eos))
    return reference_generate(prompt, sp.max_tokens, V, stop, sp.min_tokens)


CONFIGS = {
    "batched": dict(),
    "alone": dict(max_num_seqs=1),
    "kv_pressure": dict(num_pages=26, max_num_seqs=16),  # 25 usable pages = one max-length request
    "no_prefix_cache": dict(caching=False),
    "small_chunks": dict(budget=5, max_num_seqs=4),
    "page_size_1": dict(page_size=1, num_pages=400),
    "no_chunked_prefill": dict(chunked=False, budget=96, max_num_seqs=4),
}


# Async scheduling: the engine launches step N + 1 before it reads step N back (the fake
# runner samples from the tokens it holds, the host learns them a step late).
ASYNC = pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])


@ASYNC
@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_are_identical_in_every_configuration(name, async_scheduling):
    engine, runner = make_engine(**CONFIGS[name], async_scheduling=async_scheduling)
    baseline = engine.num_free_pages
    items = workload()
    for req_id, prompt, sp in items:
        engine.add_request(req_id, prompt, sp)
    final = run(engine)
    for req_id, prompt, sp in items:
        out = final[req_id].outputs[0]
        assert out.token_ids == expected(prompt, sp), req_id
        assert out.finish_reason in ("stop", "length")
        if sp.logprobs is not None:
            assert [lp.token_ids[0] for lp in out.logprobs] == out.token_ids
            assert out.cumulative_logprob == pytest.approx(sum(lp.logprobs[0] for lp in out.logprobs))
        else:
            assert out.logprobs is None and out.cumulative_logprob is None
    stats = engine.get_stats()
    assert engine.num_free_pages == baseline == engine.kv_cache_manager.block_pool.num_blocks - 1
    assert runner.reqs == {}  # the runner was told to forget every finished request
    if name == "kv_pressure":
        assert stats["num_preemptions"] > 0
    if name == "no_prefix_cache":
        assert stats["prefix_cache_hits"] == 0
    elif name in ("alone", "small_chunks", "kv_pressure"):
        assert stats["prefix_cache_hits"] > 0
        assert any(final[r].num_cached_tokens > 0 for r, _, _ in items)
    if name == "alone" and not async_scheduling:  # async: a finished request's last step
        assert max(runner.batch_sizes) == 1      # may overlap the next one's first


def test_prefix_cache_hit_after_a_request_finishes():
    engine, runner = make_engine()
    prompt = list(range(1, 30))
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=3))
    first = run(engine)["a"]
    engine.add_request("b", prompt, SamplingParams(temperature=0, max_tokens=3))
    second = run(engine)["b"]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 28
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    engine.add_request("salted", prompt, SamplingParams(temperature=0, max_tokens=3),
                       cache_salt="tenant-2")
    assert run(engine)["salted"].num_cached_tokens == 0


def test_abort_mid_generation_frees_pages_and_spares_the_rest():
    engine, runner = make_engine(num_pages=40, max_num_seqs=4)
    baseline = engine.num_free_pages
    items = [(f"r{i}", [i + 1] * (5 + i), SamplingParams(temperature=0, max_tokens=30,
                                                         ignore_eos=True)) for i in range(10)]
    for item in items:
        engine.add_request(*item)
    for _ in range(6):
        engine.step()
    aborted = ["r1", "r2", "r8"]  # running and waiting ones
    assert {engine.scheduler.requests[r].status.name for r in aborted} == {"RUNNING", "WAITING"}
    outs = engine.abort_request(aborted + ["nope"])
    assert sorted(o.request_id for o in outs) == aborted
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert engine.abort_request("r1") == []  # already gone
    final = run(engine)
    assert set(final) == {r for r, _, _ in items} - set(aborted)
    for req_id, prompt, sp in items:
        if req_id in final:
            assert final[req_id].outputs[0].token_ids == expected(prompt, sp)
    assert engine.num_free_pages == baseline
    assert "r1" in runner.scheduled_log[5] and all("r1" not in s for s in runner.scheduled_log[6:])


@ASYNC
def test_abort_of_a_preempted_request(async_scheduling):
    engine, _ = make_engine(num_pages=26, max_num_seqs=8, async_scheduling=async_scheduling)
    for i in range(8):
        engine.add_request(f"r{i}", [i + 1] * 20, SamplingParams(temperature=0, max_tokens=40,
                                                                 ignore_eos=True))
    for _ in range(100):
        if any(r.status.name == "PREEMPTED" for r in engine.scheduler.waiting):
            break
        engine.step()
    victim = next(r.req_id for r in engine.scheduler.waiting if r.status.name == "PREEMPTED")
    assert engine.abort_request(victim)[0].outputs[0].finish_reason == "abort"
    run(engine)
    assert engine.num_free_pages == 25


@ASYNC
def test_parallel_sampling_children_share_the_prompt_pages(async_scheduling):
    engine, runner = make_engine(async_scheduling=async_scheduling)
    prompt = list(range(1, 14))  # 13 tokens: three full pages
    sp = SamplingParams(n=4, temperature=0, max_tokens=6, ignore_eos=True, seed=7)
    engine.add_request("p", prompt, sp)
    assert engine.get_num_unfinished_requests() == 1
    with pytest.raises(ValueError, match="in use"):
        engine.add_request("p", prompt, SamplingParams())
    outs = []
    for _ in range(100):
        outs += engine.step()
    assert not engine.has_unfinished_requests()
    assert all(o.request_id == "p" for o in outs) and [o.finished for o in outs][-1]
    assert sum(o.finished for o in outs) == 1
    final = outs[-1]
    assert [c.index for c in final.outputs] == [0, 1, 2, 3]
    ref = expected(prompt, sp)
    assert all(c.token_ids == ref and c.finish_reason == "length" for c in final.outputs)
    assert engine.get_stats()["prefix_cache_hits"] == 3 * 12  # children 1..3 reuse 3 pages
    assert runner.seeds == {"0_p": 7, "1_p": 8, "2_p": 9, "3_p": 10}
    assert final.metrics.finished_time >= final.metrics.first_token_time >= final.metrics.arrival_time
    assert engine.num_free_pages == 199


def test_abort_of_a_parallel_request_with_pending_children():
    engine, runner = make_engine()
    engine.add_request("p", list(range(1, 30)), SamplingParams(n=3, max_tokens=5))
    engine.step()
    assert list(runner.reqs) == ["0_p"]  # the others wait for the prompt's pages
    [out] = engine.abort_request("p")
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 3 and out.finished
    assert not engine.has_unfinished_requests() and engine.num_free_pages == 199
    assert engine.step() == [] and runner.reqs == {}  # an empty batch told the runner
    calls = runner.num_steps
    assert engine.step() == [] and runner.num_steps == calls  # idle: the runner is left alone


def test_drawn_seeds_differ_and_given_seeds_pass_through():
    engine, runner = make_engine()
    for i in range(4):
        engine.add_request(f"r{i}", [1, 2], SamplingParams(max_tokens=1))
    engine.add_request("s", [1, 2], SamplingParams(max_tokens=1, seed=123))
    run(engine)
    assert len({runner.seeds[f"r{i}"] for i in range(4)}) == 4 and runner.seeds["s"] == 123


@ASYNC
def test_min_tokens_and_eos(async_scheduling):
    eos = tuple(range(30))  # a third of the vocabulary ends the request
    engine, _ = make_engine(eos=eos, async_scheduling=async_scheduling)
    rng = random.Random(1)
    items = []
    for i in range(12):
        sp = SamplingParams(temperature=0, max_tokens=12, min_tokens=i % 6, ignore_eos=i == 11)
        items.append((f"r{i}", [rng.randrange(1, V) for _ in range(5)], sp))
        engine.add_request(*items[-1])
    final = run(engine)
    for req_id, prompt, sp in items:
        out = final[req_id].outputs[0]
        assert out.token_ids == expected(prompt, sp, eos)
        assert len(out.token_ids) >= sp.min_tokens
        if out.finish_reason == "stop":
            assert out.token_ids[-1] in eos and out.stop_reason is None
    assert len(final["r11"].outputs[0].token_ids) == 12


@ASYNC
def test_prompt_logprobs_survive_chunking_and_preemption(async_scheduling):
    engine, _ = make_engine(num_pages=26, budget=7, max_num_seqs=8,
                            async_scheduling=async_scheduling)
    for i in range(6):
        engine.add_request(f"r{i}", [i + 1] * 30, SamplingParams(
            temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1))
    final = run(engine)
    assert engine.get_stats()["num_preemptions"] > 0
    for out in final.values():
        plp = out.prompt_logprobs
        assert len(plp) == 30 and plp[0] is None
        assert [lp.token_ids[0] for lp in plp[1:]] == out.prompt_token_ids[1:]


@ASYNC
def test_runner_errors_fail_only_their_requests(async_scheduling):
    engine, _ = make_engine(fail_req_ids={"bad"}, async_scheduling=async_scheduling)
    engine.add_request("bad", [1, 2, 3], SamplingParams(max_tokens=5))
    engine.add_request("good", [1, 2, 3], SamplingParams(temperature=0, max_tokens=5))
    final = run(engine)
    assert final["bad"].outputs[0].finish_reason == "error"
    assert final["bad"].error == "simulated failure"
    assert final["good"].outputs[0].token_ids == expected([1, 2, 3], SamplingParams(max_tokens=5))
    assert engine.num_free_pages == 199
    # The benchmarks refuse to time such a run (its failed requests finish at once).
    from jaxpage.entrypoints.bench import completed

    assert completed([final["good"]]) == [final["good"]]
    with pytest.raises(RuntimeError, match="1 of 2 requests failed in the engine: simulated"):
        completed([final["good"], final["bad"]])


def test_a_runner_exception_fails_that_step_and_the_engine_keeps_serving(caplog):
    engine, runner = make_engine(raise_on_steps={2})
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.add_request("b", [4, 5], SamplingParams(max_tokens=5))
    outs = engine.step()
    assert {o.request_id for o in outs} == {"a", "b"}
    assert all(o.outputs[0].finish_reason == "error" for o in outs)
    assert "RuntimeError" in outs[0].error and "/" not in outs[0].error
    engine.add_request("c", [4, 5], SamplingParams(temperature=0, max_tokens=5))
    assert run(engine)["c"].outputs[0].token_ids == expected([4, 5], SamplingParams(max_tokens=5))
    assert engine.num_free_pages == 199


BAD_INPUTS = [
    (dict(prompt_token_ids=[]), "at least one token", None),
    (dict(prompt_token_ids=[1, V]), "outside the vocabulary", None),
    (dict(prompt_token_ids=[-1]), "outside the vocabulary", None),
    (dict(prompt_token_ids=[1.5]), "integers", None),
    (dict(prompt_token_ids=[True]), "integers", None),
    (dict(prompt_token_ids=[[1, 2]]), "flat", None),
    (dict(prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(max_tokens=95)),
     "maximum context length is 96", "context_length_exceeded"),
    (dict(prompt_token_ids=list(range(1, 97)) * 1), "context length", "context_length_exceeded"),
    (dict(sampling_params=SamplingParams(stop=["x"])), "tokenizer", None),
    (dict(sampling_params=SamplingParams(stop_token_ids=[V])), "vocabulary", None),
    (dict(sampling_params={"max_tokens": 3}), "SamplingParams", None),
    (dict(cache_salt=""), "cache_salt", None),
    (dict(req_id="dup"), "in use", None),
    (dict(req_id=""), "non-empty", None),
]


@pytest.mark.parametrize("kwargs, match, code", BAD_INPUTS)
def test_bad_input_fails_before_allocating_and_the_engine_still_serves(kwargs, match, code):
    engine, _ = make_engine()
    engine.add_request("dup", [1, 2], SamplingParams(temperature=0, max_tokens=2))
    baseline_pages, baseline_reqs = engine.num_free_pages, engine.get_num_unfinished_requests()
    args = dict(req_id="x", prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams())
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as info:
        engine.add_request(args.pop("req_id"), args.pop("prompt_token_ids"),
                           args.pop("sampling_params"), **args)
    assert getattr(info.value, "code", None) == code
    assert engine.num_free_pages == baseline_pages
    assert engine.get_num_unfinished_requests() == baseline_reqs
    engine.add_request("ok", [3, 4], SamplingParams(temperature=0, max_tokens=2))
    final = run(engine)
    assert final["ok"].outputs[0].token_ids == expected([3, 4], SamplingParams(max_tokens=2))


def test_queue_full_and_child_id_collisions():
    engine, _ = make_engine(max_waiting=4)
    engine.add_request("a", [1], SamplingParams())
    with pytest.raises(ValueError, match="queue is full") as info:
        engine.add_request("b", [1], SamplingParams(n=4))
    assert info.value.code == "queue_full"
    engine.add_request("0_c", [1], SamplingParams())
    with pytest.raises(ValueError, match="collides"):
        engine.add_request("c", [1], SamplingParams(n=2))
    assert engine.get_num_unfinished_requests() == 2


def test_engine_rejects_a_pool_smaller_than_one_max_length_request():
    with pytest.raises(ValueError, match="max_model_len 96 needs 24 pages"):
        make_engine(num_pages=24)


def test_metrics_and_num_cached_tokens():
    engine, _ = make_engine()
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True),
                       arrival_time=100.0, prompt="abc")
    out = run(engine)["a"]
    m = out.metrics
    assert m.arrival_time == 100.0 and out.prompt == "abc"
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_stop_strings_and_text_through_the_engine():
    from tests.engine.test_detokenizer import build_tokenizer

    tok = build_tokenizer()
    engine, _ = make_engine(tokenizer=tok, vocab_size=len(tok), eos=(0,))
    prompt = tok.encode("Hello world, the quick")
    engine.add_request("full", prompt, SamplingParams(temperature=0, max_tokens=40,
                                                      ignore_eos=True))
    full = run(engine)["full"].outputs[0]
    text = full.text
    start = next(i for i in range(len(text) // 3, len(text) - 3)
                 if "\ufffd" not in text[i:i + 3] and text.find(text[i:i + 3]) == i)
    stop = text[start:start + 3]
    for include in (False, True):
        engine.add_request("s", prompt, SamplingParams(
            temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
            include_stop_str_in_output=include))
        streamed = []
        for _ in range(100):
            for out in engine.step():
                streamed.append(out.outputs[0].text)
            if not engine.has_unfinished_requests():
                break
        final = out.outputs[0]
        assert final.text == text[:start + (len(stop) if include else 0)]
        assert (final.finish_reason, final.stop_reason) == ("stop", stop)
        assert full.token_ids[:len(final.token_ids)] == final.token_ids
        assert len(final.token_ids) < len(full.token_ids)
        assert all(final.text.startswith(t) for t in streamed)  # never retracted
    assert engine.num_free_pages == 199


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_final_only_requests_report_once_when_finished(async_scheduling):
    """``add_request(final_only=True)`` (what ``LLM.generate`` uses): no per-step copies of a
    request's output, one output when it ends, the same as the last cumulative one; ``n > 1``
    reports its children together, once."""
    def run(final_only):
        engine, _ = make_engine(async_scheduling=async_scheduling)
        engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=9, ignore_eos=True,
                                                         temperature=0.0), final_only=final_only)
        engine.add_request("b", [8, 9], SamplingParams(max_tokens=5, ignore_eos=True, n=3,
                                                      temperature=0.7, seed=3),
                           final_only=final_only)
        seen = []
        while engine.has_unfinished_requests():
            seen += engine.step()
        return seen

    cumulative, final = run(False), run(True)
    assert len(cumulative) > len(final) == 2
    assert all(o.finished for o in final)
    last = {o.request_id: o for o in cumulative}
    for o in final:
        assert [(c.index, c.token_ids, c.text, c.finish_reason) for c in o.outputs] == \
            [(c.index, c.token_ids, c.text, c.finish_reason) for c in last[o.request_id].outputs]
