"""Async scheduling (step N + 1 launched before step N is read back) gives the tokens of
stepping synchronously: greedy and seeded sampling, penalties (whose history needs the token
in flight), logprobs, prompt logprobs, stop tokens with min_tokens, n > 1, preemption under
KV pressure, and aborts; every page comes back, and no request gets a token past its end."""

import pytest

from jaxpage import SamplingParams
from tests.entrypoints.engine_util import assert_close, greedy, random_prompts, tiny_llm

NUM = 24
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(NUM, 512, 1, 40, seed=5, shared_prefix=12)


def _params(i: int) -> SamplingParams:
    """A different mix per request: what the sampler and the stop checks do differs by row."""
    kinds = [
        dict(temperature=0.0, logprobs=3),
        dict(temperature=0.8, top_p=0.9, seed=100 + i),
        dict(temperature=0.7, top_k=20, seed=i, presence_penalty=0.5, frequency_penalty=0.3),
        dict(temperature=0.0, repetition_penalty=1.3, prompt_logprobs=2),
        dict(temperature=0.9, seed=7 * i, n=2),
        dict(temperature=0.0, stop_token_ids=[i % 50 + 3], min_tokens=2),
    ]
    kw = kinds[i % len(kinds)]
    return SamplingParams(max_tokens=MAX_TOKENS - (i % 3), ignore_eos=i % 4 != 0, **kw)


def _run(prompts, params, **kwargs):
    llm = tiny_llm(**kwargs)
    baseline = llm.engine.num_free_pages
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.num_free_pages == baseline, "pages leaked"
    assert not llm.engine.has_unfinished_requests()
    return llm, outs


def _flat(outs):
    """One pseudo-request per completion, for assert_close."""
    class Flat:
        def __init__(self, completion):
            self.outputs = [completion]
    return [Flat(c) for o in outs for c in o.outputs]


def test_async_matches_sync_across_sampling_kinds(prompts):
    params = [_params(i) for i in range(NUM)]
    kw = dict(max_num_seqs=8, max_num_batched_tokens=96)
    _, sync = _run(prompts, params, **kw)
    llm, outs = _run(prompts, params, async_scheduling=True, **kw)
    assert llm.engine.async_scheduling
    n = assert_close(_flat(sync), _flat(outs), min_identical=0.9)
    print(f"async vs sync: {n}/{len(_flat(sync))} completions identical")
    for a, b, sp in zip(sync, outs, params):
        assert len(b.outputs) == sp.n
        for ca, cb in zip(a.outputs, b.outputs):
            assert len(cb.token_ids) <= sp.max_tokens  # never a token past the end
            assert cb.finish_reason == ca.finish_reason or ca.token_ids != cb.token_ids
            if sp.logprobs is not None:
                assert len(cb.logprobs) == len(cb.token_ids)
        if sp.prompt_logprobs is not None:
            assert len(b.prompt_logprobs) == len(b.prompt_token_ids)
            assert [lp.token_ids[0] if lp else None for lp in b.prompt_logprobs] == \
                [lp.token_ids[0] if lp else None for lp in a.prompt_logprobs]
        if sp.stop_token_ids and b.outputs[0].finish_reason == "stop":
            assert b.outputs[0].token_ids[-1] in sp.stop_token_ids
            assert len(b.outputs[0].token_ids) >= sp.min_tokens


def test_async_greedy_under_preemption(prompts):
    _, alone = _run(prompts[:12], greedy(MAX_TOKENS), max_num_seqs=1)
    llm, outs = _run(prompts[:12], greedy(MAX_TOKENS), async_scheduling=True, max_num_seqs=12,
                     max_num_batched_tokens=64, num_pages=30, max_model_len=96)
    assert llm.engine.get_stats()["num_preemptions"] > 0
    n = assert_close(alone, outs)
    print(f"async under preemption: {n}/12 identical")
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)


def test_async_abort_frees_pages(prompts):
    llm = tiny_llm(async_scheduling=True, max_num_seqs=4)
    engine = llm.engine
    baseline = engine.num_free_pages
    for i, p in enumerate(prompts[:4]):
        engine.add_request(str(i), p, SamplingParams(max_tokens=50, ignore_eos=True,
                                                     temperature=0.0))
    for _ in range(6):
        engine.step()
    assert engine._in_flight is not None  # a step is in flight while we abort
    outs = engine.abort_request(["0", "2"])
    assert {o.request_id for o in outs} == {"0", "2"}
    assert all(o.outputs[0].finish_reason == "abort" for o in outs)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.request_id in ("1", "3"), "output for an aborted request"
            if o.finished:
                done[o.request_id] = o
    assert sorted(done) == ["1", "3"]
    assert all(len(o.outputs[0].token_ids) == 50 for o in done.values())
    assert engine.num_free_pages == baseline and engine._in_flight is None


def test_async_needs_a_runner_that_dispatches():
    from jaxpage.config import CacheConfig, SchedulerConfig
    from jaxpage.engine.llm_engine import LLMEngine

    class SyncOnly:  # execute_model alone
        def execute_model(self, so):
            raise AssertionError("not called")

    sc = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                         async_scheduling=True)
    runner = SyncOnly()
    with pytest.raises(ValueError, match="dispatch"):
        LLMEngine(runner, None, scheduler_config=sc, cache_config=CacheConfig(page_size=4),
                  num_pages=40, vocab_size=97, eos_token_ids=0, max_model_len=64)


def _launch_threads():
    import threading
    return [t for t in threading.enumerate() if t.name.startswith("jaxpage-launch")]


def test_async_launches_on_the_launch_thread_and_shuts_it_down(prompts):
    import threading

    llm = tiny_llm(async_scheduling=True, max_num_seqs=4)
    runner = llm.engine.model_runner
    where, launch = [], runner.sampler.launch

    def recording(*args):
        where.append(threading.current_thread().name)
        return launch(*args)

    runner.sampler.launch = recording
    outs = llm.generate(prompts[:4], greedy(8), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    # every async step's device calls ran on the launch thread; the sync step the engine
    # takes when it goes idle (the runner forgets its requests) launches nothing
    assert where and all(name.startswith("jaxpage-launch") for name in where), set(where)
    assert len(_launch_threads()) >= 1
    runner.shutdown()
    assert runner._launcher is None and runner._launch is None


def test_a_failed_background_launch_fails_only_its_step(prompts):
    llm = tiny_llm(async_scheduling=True, max_num_seqs=4)
    engine, runner = llm.engine, llm.engine.model_runner
    baseline = engine.num_free_pages
    launch, calls = runner.sampler.launch, [0]

    def failing_once(*args):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("simulated launch failure")
        return launch(*args)

    runner.sampler.launch = failing_once
    outs = llm.generate(prompts[:4], greedy(10), use_tqdm=False)
    # the third step's requests (all four: one batch) end with an error, not a hang
    assert all(o.outputs[0].finish_reason == "error" for o in outs), \
        [o.outputs[0].finish_reason for o in outs]
    assert engine.num_free_pages == baseline and not engine.has_unfinished_requests()
    # the engine keeps serving, and gives the tokens of a fresh engine
    again = llm.generate(prompts[:4], greedy(10), use_tqdm=False)
    fresh = tiny_llm(async_scheduling=True, max_num_seqs=4).generate(prompts[:4], greedy(10),
                                                                      use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in fresh]
