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


def run_beam_search(llm, prompts: list[list[int]], params: BeamSearchParams,
                    eos_token_ids: frozenset[int], use_tqdm: bool = False
                    ) -> list[BeamSearchOutput]:
    """Beam search for each prompt (token ids) through ``llm.generate``; see the module doc."""
    for p in prompts:  # the last round's beams hold prompt + max_tokens - 1 tokens, then one more
        llm.engine.validate_request(p, SamplingParams(max_tokens=params.max_tokens))
    eos = frozenset() if params.ignore_eos else eos_token_ids
    step = SamplingParams(temperature=params.temperature, max_tokens=1, ignore_eos=True,
                          logprobs=2 * params.beam_width, seed=0)
    live = [[BeamSearchSequence(list(p))] for p in prompts]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]

    def key(beam):
        return beam_score(beam, eos_token_ids, params.length_penalty)

    for _ in range(params.max_tokens):
        flat = [(i, beam) for i, beams in enumerate(live) for beam in beams]
        if not flat:
            break
        outs = llm.generate([{"prompt_token_ids": b.tokens} for _, b in flat], step,
                            use_tqdm=use_tqdm)
        grown: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(flat, outs):
            cands = _candidates(out.outputs[0].logprobs[0])
            for tok, lp in cands.items():
                child = BeamSearchSequence(beam.tokens + [tok], beam.logprobs + [cands],
                                           beam.cum_logprob + lp)
                if tok in eos:
                    child.finish_reason, child.stop_reason = "stop", tok
                    done[i].append(child)
                else:
                    grown[i].append(child)
        live = [sorted(g, key=key, reverse=True)[:params.beam_width] for g in grown]
    results = []
    for i in range(len(prompts)):
        for beam in live[i]:
            beam.finish_reason = "length"
        best = sorted(done[i] + live[i], key=key, reverse=True)[:params.beam_width]
        if llm.tokenizer is not None:
            for beam in best:
                beam.text = llm.tokenizer.decode(beam.tokens)
        results.append(BeamSearchOutput(best))
    return results
