"""Runs the on-device sampler for one step and turns its arrays into a ModelRunnerOutput."""

from __future__ import annotations

import jax
import numpy as np

from jaxpage.engine.scheduler_output import Logprobs, ModelRunnerOutput
from jaxpage.runner.input_batch import CachedRequestState, InputBatch
from jaxpage.runner.sampler import compute_logprobs_for_tokens, sample
from jaxpage.runner.sampling_metadata import (SamplingRow, build_sampling_metadata, logprobs_bucket,
                                              make_logprobs)
from jaxpage.sampling_params import SamplingParams

# Rows that do not sample this step (partial prefill chunks) ride along as neutral greedy rows.
_IDLE = SamplingParams(temperature=0.0)
# Sampler variants compiled at start-up for every request bucket: greedy, temperature,
# temperature + top-k/top-p/min-p. Penalties, logit_bias and logprobs compile on first use.
_PRECOMPILE = (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
               SamplingParams(temperature=1.0, top_p=0.9, top_k=50))


class StepSampler:
    def __init__(self, vocab_size: int, input_batch: InputBatch):
        self.vocab_size = vocab_size
        self.input_batch = input_batch
        self._sample = jax.jit(sample)
        self._prompt_logprobs = jax.jit(compute_logprobs_for_tokens, static_argnums=2)

    def precompile(self, req_buckets, logits_dtype=np.float32) -> None:
        for r in req_buckets:
            logits = np.zeros((r, self.vocab_size), logits_dtype)
            for sp in _PRECOMPILE:  # running once fills jit's cache (AOT lowering would not)
                md = build_sampling_metadata([SamplingRow(sp, 0)] * r, r, self.vocab_size)
                jax.block_until_ready(self._sample(logits, md))

    def _row(self, state: CachedRequestState, samples: bool) -> SamplingRow:
        if not samples:
            return SamplingRow(_IDLE, 0)
        sp = state.sampling_params
        if sp.has_penalties:
            ids = self.input_batch.token_ids[state.slot]
            return SamplingRow(sp, state.seed, ids[:state.num_prompt_tokens],
                               ids[state.num_prompt_tokens:state.num_tokens])
        return SamplingRow(sp, state.seed, num_output_tokens=state.num_output_tokens)

    def sample(self, logits: jax.Array, states: list[CachedRequestState], samples: list[bool],
               padded_num_reqs: int) -> ModelRunnerOutput:
        rows = [self._row(s, do) for s, do in zip(states, samples)]
        md = build_sampling_metadata(rows, padded_num_reqs, self.vocab_size)
        out = jax.device_get(self._sample(logits, md))
        token_ids = out.sampled_token_ids
        result = ModelRunnerOutput(sampled_token_ids={})
        for i, (state, do) in enumerate(zip(states, samples)):
            if not do:
                continue
            tok = int(token_ids[i])
            result.sampled_token_ids[state.req_id] = [tok]
            k = state.sampling_params.logprobs
            if k is not None and out.logprobs is not None:
                lp = out.logprobs
                result.logprobs[state.req_id] = [make_logprobs(
                    lp.token_logprobs[i], lp.token_ranks[i], lp.topk_token_ids[i],
                    lp.topk_logprobs[i], k, tok)]
        return result

    def prompt_logprobs(self, all_logits: jax.Array, states: list[CachedRequestState],
                        counts: list[int], result: ModelRunnerOutput) -> None:
        """Adds prompt logprobs of the positions computed this step to ``result``.

        Row t of ``all_logits`` (the logits of the t-th scheduled token, at position p) scores
        the prompt token at p + 1; position 0 has no logprob (None), as in vLLM.
        """
        num_rows = all_logits.shape[0]
        targets = np.zeros(num_rows, np.int32)
        spans, row, k = [], 0, 0
        for state, count in zip(states, counts):
            start = state.num_computed_tokens
            want = state.sampling_params.prompt_logprobs
            end = min(start + count, state.num_prompt_tokens - 1)  # last position with a target
            if want is not None and end > start:
                ids = self.input_batch.token_ids[state.slot]
                targets[row:row + end - start] = ids[start + 1:end + 1]
                spans.append((state, row, end - start, start == 0, want))
                k = max(k, want)
            elif want is not None and start == 0:
                spans.append((state, row, 0, True, want))
            row += count
        if not spans:
            return
        lp = jax.device_get(self._prompt_logprobs(all_logits, targets, logprobs_bucket(k)))
        for state, row, n, first, want in spans:
            entries: list[Logprobs | None] = [None] if first else []
            entries += [make_logprobs(lp.token_logprobs[row + j], lp.token_ranks[row + j],
                                      lp.topk_token_ids[row + j], lp.topk_logprobs[row + j], want,
                                      int(targets[row + j])) for j in range(n)]
            result.prompt_logprobs[state.req_id] = entries
