"""Beam search over the engine, with vLLM's names (``LLM.beam_search``, ``BeamSearchParams``).

Each round asks the engine for one token of every live beam of every prompt, with the top
2 x beam_width raw logprobs (one ``generate`` call: the beams of all prompts batch together,
and prefix caching reuses each beam's pages from the round before). Every beam grows by each
candidate token; a candidate that is an end-of-sequence token (unless ``ignore_eos``)
completes its beam. Each prompt keeps its ``beam_width`` best live beams, ranked by
``cum_logprob / len ** length_penalty`` (``len``: prompt + output tokens, a final EOS not
counted: vLLM's score). After ``max_tokens`` rounds, or once no prompt has a live beam, the
completed and live beams of each prompt are ranked by the same score and the best
``beam_width`` returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxpage.engine.scheduler_output import Logprobs
from jaxpage.sampling_params import BeamSearchParams, SamplingParams

@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` include the prompt (as vLLM's); ``logprobs`` has one entry per
    output token, {token id: logprob} of the candidates its round saw; ``text`` is the whole
    sequence decoded (None without a tokenizer)."""

    tokens: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (an EOS token) or "length"
    stop_reason: int | None = None  # the EOS token id that ended it


@dataclass
class BeamSearchOutput:
    """The best ``beam_width`` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_score(beam: BeamSearchSequence, eos_token_ids: frozenset[int],
               length_penalty: float) -> float:
    """vLLM's rank: cumulative logprob over the length (prompt included, a final EOS not)
    to the power ``length_penalty``."""
    length = len(beam.tokens) - (beam.tokens[-1] in eos_token_ids)
    return beam.cum_logprob / (max(length, 1) ** length_penalty)


def _candidates(lp: Logprobs) -> dict[int, float]:
    """{token id: logprob} of a round's step: the sampled token and the top ones."""
    return dict(zip(lp.token_ids, lp.logprobs))


class BeamSearch:
    """Beam search driven round by round by whoever runs the engine: ``round()`` gives the
    token lists to extend by one token each (every live beam of every prompt), ``advance``
    takes each one's candidates back, ``results()`` ranks. ``run_beam_search`` drives it
    through ``LLM.generate``; the server through its async engine."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams,
                 eos_token_ids: frozenset[int]):
        self.params = params
        self.eos_token_ids = eos_token_ids
        self._eos = frozenset() if params.ignore_eos else eos_token_ids
        # each round: one token, the top 2 x beam_width raw logprobs as its candidates
        self.step_params = SamplingParams(temperature=params.temperature, max_tokens=1,
                                          ignore_eos=True, logprobs=2 * params.beam_width,
                                          seed=0)
        self.live = [[BeamSearchSequence(list(p))] for p in prompts]
        self.done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self.rounds = 0
        self._flat: list[tuple[int, BeamSearchSequence]] = []

    def _key(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam, self.eos_token_ids, self.params.length_penalty)

    def round(self) -> list[list[int]] | None:
        """This round's sequences to extend, or None once the search is over."""
        self._flat = [(i, beam) for i, beams in enumerate(self.live) for beam in beams]
        if self.rounds >= self.params.max_tokens or not self._flat:
            return None
        return [beam.tokens for _, beam in self._flat]

    def advance(self, steps: list[Logprobs]) -> None:
        """The one-token step of each sequence ``round()`` gave, in its order."""
        if len(steps) != len(self._flat):
            raise ValueError(f"{len(steps)} steps for {len(self._flat)} beams.")
        grown: list[list[BeamSearchSequence]] = [[] for _ in self.live]
        for (i, beam), lp in zip(self._flat, steps):
            cands = _candidates(lp)
            for tok, logprob in cands.items():
                child = BeamSearchSequence(beam.tokens + [tok], beam.logprobs + [cands],
                                           beam.cum_logprob + logprob)
                if tok in self._eos:
                    child.finish_reason, child.stop_reason = "stop", tok
                    self.done[i].append(child)
                else:
                    grown[i].append(child)
        self.live = [sorted(g, key=self._key, reverse=True)[:self.params.beam_width]
                     for g in grown]
        self.rounds += 1

    def results(self, tokenizer=None) -> list[BeamSearchOutput]:
        """Each prompt's best ``beam_width`` sequences, completed and live, best first."""
        out = []
        for done, live in zip(self.done, self.live):
            for beam in live:
                beam.finish_reason = "length"
            best = sorted(done + live, key=self._key, reverse=True)[:self.params.beam_width]
            if tokenizer is not None:
                for beam in best:
                    beam.text = tokenizer.decode(beam.tokens)
            out.append(BeamSearchOutput(best))
        return out


def run_beam_search(llm, prompts: list[list[int]], params: BeamSearchParams,
                    eos_token_ids: frozenset[int], use_tqdm: bool = False
                    ) -> list[BeamSearchOutput]:
    """Beam search for each prompt (token ids) through ``llm.generate``; see the module doc."""
    for p in prompts:  # the last round's beams hold prompt + max_tokens - 1 tokens, then one more
        llm.engine.validate_request(p, SamplingParams(max_tokens=params.max_tokens))
    search = BeamSearch(prompts, params, eos_token_ids)
    while (seqs := search.round()) is not None:
        outs = llm.generate([{"prompt_token_ids": t} for t in seqs], search.step_params,
                            use_tqdm=use_tqdm)
        search.advance([o.outputs[0].logprobs[0] for o in outs])
    return search.results(llm.tokenizer)
