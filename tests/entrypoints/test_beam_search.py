"""``LLM.beam_search`` (vLLM's API): the search against brute force on a toy model small enough
that no beam is ever pruned, and on the engine against greedy decoding and the model's own
teacher-forced logprobs."""

import itertools
import math

import numpy as np
import pytest

from jaxpage import BeamSearchParams, SamplingParams
from jaxpage.engine.scheduler_output import Logprobs
from jaxpage.entrypoints.beam_search import beam_score, run_beam_search
from tests.entrypoints.engine_util import random_prompts, tiny_llm

V, EOS = 3, 0


def _toy_logprobs(tokens):
    """A fixed next-token distribution over V tokens from the sequence so far."""
    h = (sum((i + 1) * t for i, t in enumerate(tokens)) * 7 + len(tokens)) % 11
    logits = np.array([math.sin(h + 3 * v) * 2.0 for v in range(V)])
    return logits - np.log(np.exp(logits).sum())


class _Out:
    def __init__(self, lp):
        self.outputs = [type("C", (), {"logprobs": [lp]})()]


class _ToyLLM:
    """What ``run_beam_search`` needs of an LLM, over ``_toy_logprobs``: every token's logprob
    comes back (2 x beam_width >= V), the chosen (greedy) one first."""
    tokenizer = None

    class engine:
        @staticmethod
        def validate_request(prompt, sp):
            return prompt

    def generate(self, prompts, sp, use_tqdm=False):
        assert sp.max_tokens == 1 and sp.logprobs >= V
        outs = []
        for p in prompts:
            lp = _toy_logprobs(p["prompt_token_ids"])
            order = list(np.argsort(-lp))
            outs.append(_Out(Logprobs([int(order[0])] + [int(t) for t in order],
                                      [float(lp[order[0]])] + [float(lp[t]) for t in order],
                                      [1] + list(range(1, V + 1)))))
        return outs


def _brute_force(prompt, max_tokens, length_penalty, ignore_eos):
    """Every sequence of up to max_tokens outputs (ending at the first EOS unless ignored),
    scored as vLLM scores beams."""
    from jaxpage.entrypoints.beam_search import BeamSearchSequence

    seqs = []
    for n in range(1, max_tokens + 1):
        for out in itertools.product(range(V), repeat=n):
            if not ignore_eos and EOS in out[:-1]:
                continue
            if n < max_tokens and (ignore_eos or out[-1] != EOS):
                continue  # a live beam only ends at max_tokens
            toks, cum = list(prompt), 0.0
            for t in out:
                cum += _toy_logprobs(toks)[t]
                toks.append(t)
            seqs.append(BeamSearchSequence(toks, cum_logprob=cum))
    eos = frozenset([EOS])
    return sorted(seqs, key=lambda b: beam_score(b, eos, length_penalty), reverse=True)


@pytest.mark.parametrize("length_penalty,ignore_eos", [(1.0, False), (0.0, False), (2.0, False),
                                                        (1.0, True)])
def test_unpruned_search_is_the_brute_force_ranking(length_penalty, ignore_eos):
    # V = 3, 3 rounds: at most 9 live beams, so a width of 10 never prunes one
    prompts = [[1, 2], [2], [1, 1, 2, 0]]
    params = BeamSearchParams(beam_width=10, max_tokens=3, length_penalty=length_penalty,
                              ignore_eos=ignore_eos)
    outs = run_beam_search(_ToyLLM(), prompts, params, frozenset([EOS]))
    for prompt, out in zip(prompts, outs):
        want = _brute_force(prompt, 3, length_penalty, ignore_eos)[:10]
        assert [b.tokens for b in out.sequences] == [b.tokens for b in want]
        np.testing.assert_allclose([b.cum_logprob for b in out.sequences],
                                   [b.cum_logprob for b in want], rtol=1e-9)
        for b in out.sequences:
            ended = not ignore_eos and b.tokens[-1] == EOS
            assert (b.finish_reason, b.stop_reason) == (("stop", EOS) if ended else ("length", None))
            assert len(b.logprobs) == len(b.tokens) - len(prompt)


def test_narrow_beams_prune_to_the_best_scores():
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    out = run_beam_search(_ToyLLM(), [[2, 1]], params, frozenset([EOS]))[0].sequences
    assert len(out) == 2
    scores = [beam_score(b, frozenset([EOS]), 1.0) for b in out]
    assert scores == sorted(scores, reverse=True)


def test_bad_params_are_clear_errors():
    for kw, msg in [(dict(beam_width=0), "beam_width"), (dict(beam_width=11), "beam_width"),
                    (dict(beam_width=True), "beam_width"), (dict(max_tokens=0), "max_tokens"),
                    (dict(length_penalty=float("nan")), "length_penalty"),
                    (dict(temperature=-1.0), "temperature")]:
        with pytest.raises(ValueError, match=msg):
            BeamSearchParams(**{**dict(beam_width=2, max_tokens=4), **kw})


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(max_num_seqs=16, max_num_batched_tokens=128)


def test_width_one_is_greedy_decoding(llm):
    prompts = random_prompts(4, 512, 3, 20, seed=3)
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                  logprobs=0), use_tqdm=False)
    beams = llm.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))
    for p, g, b in zip(prompts, greedy, beams):
        (seq,) = b.sequences
        assert seq.tokens == p + g.outputs[0].token_ids
        assert seq.cum_logprob == pytest.approx(g.outputs[0].cumulative_logprob, abs=1e-4)


def test_cumulative_logprobs_are_the_model_s_teacher_forced_ones(llm):
    prompts = random_prompts(3, 512, 3, 20, seed=4)
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=5,
                                                     length_penalty=0.5))
    forced = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    for p, out in zip(prompts, outs):
        assert len(out.sequences) == 3
        assert len({tuple(b.tokens) for b in out.sequences}) == 3
        for b in out.sequences:
            ref = llm.generate([b.tokens], forced, use_tqdm=False)[0]
            want = sum(lp.logprobs[0] for lp in ref.prompt_logprobs[len(p):])
            assert b.cum_logprob == pytest.approx(want, abs=1e-3)
        scores = [beam_score(b, llm.engine.eos_token_ids, 0.5) for b in out.sequences]
        assert scores == sorted(scores, reverse=True)


def test_a_prompt_too_long_for_the_context_fails_before_any_step(llm):
    with pytest.raises(ValueError, match="max_model_len|context"):
        llm.beam_search([[5] * 250], BeamSearchParams(beam_width=2, max_tokens=10))
    with pytest.raises(ValueError, match="BeamSearchParams"):
        llm.beam_search([[5, 6]], SamplingParams(max_tokens=3))
