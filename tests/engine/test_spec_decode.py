"""Speculative decoding on the host: the n-gram proposer, and the scheduler's drafts through
the engine over the simulated-KV fake runner (``markov`` model: drafts are often right)."""

import numpy as np
import pytest

from jaxpage.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from jaxpage.engine.llm_engine import LLMEngine
from jaxpage.engine.spec_decode import NgramProposer
from jaxpage.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeRunner, reference_generate
from tests.engine.test_llm_engine import CONFIGS, run, workload

V = 97


def propose(tokens, k=4, lo=1, hi=4, cap=None):
    p = NgramProposer(SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=lo,
                                        prompt_lookup_max=hi))
    return p.propose(np.array(tokens, np.int32), cap)


def test_proposer_takes_the_longest_then_latest_match():
    # last 3 tokens (1 2 3) occur at 0..2 (followed by 7 8) and the last 2 (2 3) later at
    # 10..11 (followed by 9): the longer match wins.
    assert propose([1, 2, 3, 7, 8, 5, 5, 5, 5, 5, 2, 3, 9, 4, 1, 2, 3], k=2) == [7, 8]
    # two matches of the same length: the latest wins
    assert propose([1, 2, 6, 1, 2, 8, 3, 1, 2], k=1) == [8]
    # the continuation is cut at the end of the context
    assert propose([4, 1, 2, 3, 1, 2], k=4) == [3, 1, 2]


def test_proposer_limits():
    assert propose([1, 2, 3, 4]) == []                            # no earlier occurrence
    assert propose([5]) == []                                     # nothing before
    assert propose([1, 2, 9, 1, 2], lo=3, hi=4) == []             # match shorter than min
    assert propose([1, 2, 9, 9, 9, 1, 2], lo=2, hi=2) == [9, 9, 9, 1]
    assert propose([1, 2, 9, 9, 9, 1, 2], cap=2) == [9, 9]         # what the caps leave
    assert propose([1, 2, 9, 9, 9, 1, 2], cap=0) == []
    # the match may overlap the suffix (a run): drafts continue the run
    assert propose([7, 7, 7, 7], k=3) == [7]


def test_proposer_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    for _ in range(300):
        toks = rng.integers(0, 4, int(rng.integers(1, 40))).tolist()
        lo, hi = sorted(rng.integers(1, 5, 2).tolist())
        k = int(rng.integers(1, 6))
        want = []
        for n in range(hi, lo - 1, -1):
            if n >= len(toks):
                continue
            ends = [e for e in range(n - 1, len(toks) - 1) if toks[e - n + 1:e + 1] == toks[-n:]]
            if ends:
                want = toks[ends[-1] + 1:ends[-1] + 1 + k]
                break
        assert propose(toks, k=k, lo=lo, hi=hi) == want, (toks, lo, hi, k)


@pytest.mark.parametrize("bad,match", [
    (dict(method="eagle"), "method"), (dict(num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(num_speculative_tokens=99), "num_speculative_tokens"),
    (dict(prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup_min"),
    (dict(prompt_lookup_max=1.5), "prompt_lookup_max"), (dict(model="x"), "unknown keys"),
])
def test_bad_speculative_config(bad, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.from_user(bad)
    with pytest.raises(ValueError, match="must be a dict"):
        SpeculativeConfig.from_user("ngram")


def make_spec_engine(*, k=3, num_pages=200, page_size=4, max_num_seqs=32, budget=256,
                     max_model_len=96, caching=True, chunked=True, tokenizer=None, vocab_size=V,
                     async_scheduling=False, spec=True):
    sc = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                         max_model_len=max_model_len, enable_chunked_prefill=chunked,
                         async_scheduling=async_scheduling)
    cc = CacheConfig(page_size=page_size, enable_prefix_caching=caching)
    runner = FakeRunner(num_pages, page_size, vocab_size, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=budget, markov=True)
    engine = LLMEngine(runner, tokenizer, scheduler_config=sc, cache_config=cc,
                       num_pages=num_pages, vocab_size=vocab_size, eos_token_ids=[0],
                       max_model_len=max_model_len, seed=0,
                       speculative_config=SpeculativeConfig(num_speculative_tokens=k)
                       if spec else None)
    runner.scheduler = engine.scheduler
    return engine, runner


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "no_chunked_prefill"] + ["k1"])
def test_drafts_change_no_token_in_any_configuration(name, async_scheduling):
    """Each request's tokens are plain decoding's; the KV of rejected drafts is overwritten
    before anything reads it (the fake runner checks every position it attends to), pages and
    prefix-cache entries stay right under preemption, chunking and page size 1."""
    kw = dict(CONFIGS.get(name, {}))
    k = 1 if name == "k1" else 3
    engine, runner = make_spec_engine(k=k, **kw, async_scheduling=async_scheduling)
    baseline = engine.num_free_pages
    items = workload(seed=3)
    for req_id, prompt, sp in items:
        engine.add_request(req_id, prompt, sp)
    final = run(engine)
    for req_id, prompt, sp in items:
        out = final[req_id].outputs[0]
        stop = set() if sp.ignore_eos else {0}
        assert out.token_ids == reference_generate(prompt, sp.max_tokens, V, stop,
                                                   markov=True), req_id
        if sp.logprobs is not None:
            assert [lp.token_ids[0] for lp in out.logprobs] == out.token_ids
    stats = engine.get_stats()
    drafted, accepted = (stats["spec_decode_num_draft_tokens"],
                         stats["spec_decode_num_accepted_tokens"])
    assert 0 < accepted < drafted  # both branches ran
    assert engine.num_free_pages == baseline and runner.reqs == {}
    if name == "kv_pressure":
        assert stats["num_preemptions"] > 0
    # decode steps carried drafts: fewer steps than tokens
    assert runner.num_steps < sum(len(f.outputs[0].token_ids) for f in final.values())


def test_drafts_respect_the_budget_of_the_requests_behind():
    """A step's first requests may not take the budget of the running ones behind them."""
    engine, runner = make_spec_engine(k=4, budget=12, max_num_seqs=4)
    for i in range(4):
        engine.add_request(f"r{i}", [3 + i, 4, 5] * 2, SamplingParams(
            temperature=0, max_tokens=20, ignore_eos=True))
    with_drafts = 0
    while engine.has_unfinished_requests():
        ready = {r.req_id for r in engine.scheduler.running if not r.is_finished}
        engine.step()
        step = runner.scheduled_log[-1]
        assert ready <= set(step), "a running request was left out for drafts"
        with_drafts += any(n > 1 for r, n in step.items() if r in ready)
    assert with_drafts > 3


@pytest.mark.parametrize("max_tokens,max_model_len", [(1, 96), (2, 96), (7, 96), (None, 40)])
def test_length_caps_are_exact(max_tokens, max_model_len):
    engine, _ = make_spec_engine(k=4, max_model_len=max_model_len)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                   ignore_eos=True))
    out = run(engine)["a"].outputs[0]
    n = max_tokens or max_model_len - len(prompt)
    assert out.token_ids == reference_generate(prompt, n, V, markov=True)
    assert out.finish_reason == "length"


def test_eos_and_min_tokens_inside_drafts():
    # markov_token(3) = 5, (5) = 2 ... cycles through 0 (EOS) at some point: the request must
    # stop at its first EOS past min_tokens, even where the EOS arrives as a kept draft.
    for min_tokens in (0, 3, 9):
        engine, _ = make_spec_engine(k=4)
        sp = SamplingParams(temperature=0, max_tokens=40, min_tokens=min_tokens)
        prompt = [1, 2, 1, 2, 1, 2]
        engine.add_request("a", prompt, sp)
        out = run(engine)["a"].outputs[0]
        assert out.token_ids == reference_generate(prompt, 40, V, {0}, min_tokens, markov=True)
        assert out.finish_reason == "stop"


def test_stop_strings_cut_inside_a_step_of_several_tokens(monkeypatch):
    """A stop string completed by a kept draft ends the output there: the tokens after it in
    the same step are dropped, as plain decoding would never have made them."""
    from jaxpage.engine.request import Request
    from tests.engine.test_detokenizer import build_tokenizer

    cuts = []
    truncate = Request.truncate_output
    monkeypatch.setattr(Request, "truncate_output",
                        lambda self, n: (cuts.append(n), truncate(self, n)))

    tok = build_tokenizer()
    # The prompt already holds the fake model's cycle, so drafts are right from the first step.
    start = tok.encode("Hello world, the quick")
    prompt = start + reference_generate(start, 30, len(tok), markov=True)
    plain, _ = make_spec_engine(tokenizer=tok, vocab_size=len(tok), spec=False)
    plain.add_request("full", prompt, SamplingParams(temperature=0, max_tokens=40,
                                                     ignore_eos=True))
    text = run(plain)["full"].outputs[0].text
    checked = 0
    for start in range(4, len(text) - 2):
        stop = text[start:start + 2]
        if "\ufffd" in stop:
            continue
        outs = []
        for spec in (False, True):
            engine, _ = make_spec_engine(tokenizer=tok, vocab_size=len(tok), spec=spec, k=4)
            engine.add_request("s", prompt, SamplingParams(
                temperature=0, max_tokens=40, ignore_eos=True, stop=[stop], logprobs=1))
            outs.append(run(engine)["s"].outputs[0])
            assert engine.num_free_pages == 199
        a, b = outs
        assert (a.text, a.token_ids, a.finish_reason, a.stop_reason) == (
            b.text, b.token_ids, b.finish_reason, b.stop_reason)
        assert len(b.logprobs) == len(b.token_ids)
        checked += 1
    assert checked >= 5 and len(cuts) >= 5  # cut inside a step, not only at its end
