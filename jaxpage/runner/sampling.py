"""Runs the on-device sampler for one step and turns its arrays into a ModelRunnerOutput.

A step's sampling is dispatched (device arrays, nothing waited for) and collected apart, so
that under async scheduling the next step can be dispatched in between. Each sampled token is
also recorded per slot on the device (``last_sampled``): the next step's input for a request
whose previous token the host has not read yet.

Speculative decoding: a request with drafts d_1..d_k has k + 1 logits rows, and row j is
sampled exactly as plain decoding would sample output position n + j (its seed and position,
its penalties counting d_1..d_j as outputs). Row j's token t_j is what the model says after
the context and d_1..d_j, so the drafts are kept while t_j == d_{j+1}, and the first t_j that
differs (or t_k, if all agree) is the model's own next token. The kept tokens are the ones
plain decoding would have produced, one step each. For a draft that is one fixed token this is
the rejection sampling of speculative decoding: t_j equals the draft with exactly the target's
probability of it, and when it does not, t_j is a draw from the target with the draft's token
left out (the residual distribution).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxpage.engine.scheduler_output import Logprobs, ModelRunnerOutput
from jaxpage.engine.structured_output import fill_bitmasks
from jaxpage.runner.input_batch import CachedRequestState, InputBatch
from jaxpage.runner.sampler import (LogprobsTensors, SamplerOutput,
                                    compute_logprobs_for_tokens, sample)
from jaxpage.runner.sampling_metadata import (PAD_ID, SamplingMetadata, SamplingRow,
                                              build_sampling_metadata, logprobs_bucket,
                                              make_logprobs)
from jaxpage.sampling_params import SamplingParams

# Rows that do not sample this step (partial prefill chunks) ride along as neutral greedy rows.
_IDLE = SamplingParams(temperature=0.0)
# Sampler variants compiled at start-up for every request bucket: greedy, temperature,
# temperature + top-k/top-p/min-p. Penalties, logit_bias and logprobs compile on first use.
_PRECOMPILE = (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
               SamplingParams(temperature=1.0, top_p=0.9, top_k=50))


def in_flight_marker(slot: int) -> int:
    """The penalty-history entry standing for slot ``slot``'s token in flight (async
    scheduling): the sampler reads it from ``last_sampled`` on the device, so the host need not
    wait for it. Below PAD_ID, so it never collides with a token id or the pad."""
    return PAD_ID - 1 - slot


def _sample_and_record(logits, md, last_sampled, slots):
    """Samples, and records each row's token at its slot (rows that do not sample carry an
    out-of-range slot and are dropped). Penalty histories' in-flight markers become the
    tokens ``last_sampled`` holds for their slots."""
    if md.has_penalties:
        ids = md.penalty_token_ids
        slot = PAD_ID - 1 - ids
        ids = jnp.where(ids < PAD_ID, last_sampled[jnp.clip(slot, 0, last_sampled.shape[0] - 1)],
                        ids)
        md = dataclasses.replace(md, penalty_token_ids=ids)
    out = sample(logits, md)
    return out, last_sampled.at[slots].set(out.sampled_token_ids, mode="drop")


@dataclass
class PendingSample:
    """A dispatched sampling: device outputs, and the rows they belong to."""

    out: SamplerOutput
    states: list[CachedRequestState]
    samples: list[bool]
    drafts: list[list[int]]  # per request, the drafts its rows after the first verify


@dataclass
class SamplePlan:
    """A step's sampling as the host prepared it (``StepSampler.plan``), to launch."""

    md: SamplingMetadata
    slots: np.ndarray  # per logits row, the input-batch slot its token is recorded at
    states: list[CachedRequestState]
    samples: list[bool]
    drafts: list[list[int]]


@dataclass
class PromptLogprobsPlan:
    """A step's prompt logprobs as the host prepared them: targets per logits row, the
    (req_id, row, count, first, k) spans they cover, the top-k width."""

    targets: np.ndarray
    spans: list[tuple[str, int, int, bool, int]]
    k: int


@dataclass
class PendingPromptLogprobs:
    """Dispatched prompt logprobs: device outputs, and the (req_id, row, count, first, k)
    spans they cover."""

    out: LogprobsTensors
    targets: np.ndarray
    spans: list[tuple[str, int, int, bool, int]]


class StepSampler:
    def __init__(self, vocab_size: int, input_batch: InputBatch, sharding=None):
        """``sharding``: where the step's logits live (replicated over a tensor-parallel
        mesh); None on one device."""
        self.vocab_size = vocab_size
        self.input_batch = input_batch
        self.sharding = sharding
        self._sample = jax.jit(_sample_and_record)
        self._prompt_logprobs = jax.jit(compute_logprobs_for_tokens, static_argnums=2)
        # The last step's (row key, metadata), for ``_steady_metadata``; the key of this one.
        self._steady: tuple[tuple, SamplingMetadata] | None = None
        self._steady_key: tuple | None = None
        # (max_num_seqs,) the last token sampled in each input-batch slot, on the device.
        self.last_sampled = jnp.zeros((input_batch.max_num_reqs,), jnp.int32, device=sharding)

    def precompile(self, row_counts, logits_dtype=np.float32) -> None:
        """Compiles the common variants for each count of logits rows a step can return."""
        for r in row_counts:
            logits = np.zeros((r, self.vocab_size), logits_dtype)
            if self.sharding is not None:  # as the step hands them over
                logits = jax.device_put(logits, self.sharding)
            slots = np.full(r, self.input_batch.max_num_reqs, np.int32)
            for sp in _PRECOMPILE:  # running once fills jit's cache (AOT lowering would not)
                md = build_sampling_metadata([SamplingRow(sp, 0)] * r, r, self.vocab_size)
                jax.block_until_ready(self._sample(logits, md, self.last_sampled, slots))

    def _row(self, state: CachedRequestState, samples: bool,
             drafted: list[int] = (), grammars_current: bool = False) -> SamplingRow:
        """The row sampling ``state``'s next output position, or the one after ``drafted``
        (drafts taken as its outputs: speculative decoding). ``grammars_current``: the
        grammars have taken the token in flight (sampling planned after it was read back)."""
        if not samples:
            return SamplingRow(_IDLE, 0)
        sp = state.sampling_params
        if state.grammar is not None and state.num_pending and not grammars_current:
            raise RuntimeError(f"request {state.req_id!r} has a grammar and a token in "
                               "flight: its mask would miss that token.")
        if sp.has_penalties:
            ids = self.input_batch.token_ids[state.slot]
            outputs = ids[state.num_prompt_tokens:state.num_tokens]
            if state.num_pending:  # the token in flight counts too: the device fills it in
                outputs = np.append(outputs, in_flight_marker(state.slot))
            if drafted:
                outputs = np.append(outputs, drafted)
            return SamplingRow(sp, state.seed, ids[:state.num_prompt_tokens], outputs,
                               grammar=state.grammar, drafted=list(drafted))
        return SamplingRow(sp, state.seed, num_output_tokens=(
            state.num_output_tokens + state.num_pending + len(drafted)), grammar=state.grammar,
            drafted=list(drafted))

    def plan(self, states: list[CachedRequestState], samples: list[bool], padded_rows: int,
             drafts: list[list[int]] | None = None,
             grammars_current: bool = False) -> SamplePlan:
        """The host half of a step's sampling: its metadata and recording slots (``logits``
        rows: per request one, or 1 + its drafts, in batch order as ``InputBatch.prepare``
        laid them out); every sampling request's token becomes pending. Nothing is read back from the device
        (a penalty history's token in flight is a marker: ``in_flight_marker``). With
        ``grammars_current`` the grammars have taken the tokens in flight (``_row``)."""
        drafts = drafts or [[] for _ in states]
        md = self._steady_metadata(states, samples, drafts, padded_rows)
        if md is None:
            rows = [self._row(s, do, d[:j], grammars_current)
                    for s, do, d in zip(states, samples, drafts) for j in range(len(d) + 1)]
            md = build_sampling_metadata(rows, padded_rows, self.vocab_size, fill_bitmasks)
            self._steady = (self._steady_key, md)
        slots = np.full(padded_rows, self.input_batch.max_num_reqs, np.int32)
        row = 0
        for state, do, d in zip(states, samples, drafts):
            if do:
                # With drafts the token to record is known only once verified; the engine
                # steps synchronously then, and the next step reads its input from the host.
                if not d:
                    slots[row] = state.slot
                state.num_pending += 1
            row += 1 + len(d)
        return SamplePlan(md, slots, list(states), list(samples), drafts)

    def _steady_metadata(self, states: list[CachedRequestState], samples: list[bool],
                         drafts: list[list[int]], padded_rows: int) -> SamplingMetadata | None:
        """The step before's metadata with this step's ``output_pos``, when the rows are the
        same requests, in the same order, each one whose row is a function of its params and
        seed alone (no penalties, logit bias, grammar or min_tokens, whose arrays follow the
        outputs): the steady state of decoding, where building the metadata anew cost ~0.14 ms
        a step at batch 32 (H200 host). None otherwise (and ``_steady_key`` set for the
        metadata the caller builds)."""
        key, pos = [padded_rows], []
        for state, do, d in zip(states, samples, drafts):
            sp = state.sampling_params
            if not do:
                key.append(None)
                pos.extend([0] * (len(d) + 1))
                continue
            if (state.grammar is not None or sp.has_penalties or sp.logit_bias
                    or (sp.min_tokens and sp.all_stop_token_ids)):
                self._steady_key = None
                return None
            key.append((sp, state.seed, len(d)))  # sp itself: equal by identity or content
            n = state.num_output_tokens + state.num_pending
            pos.extend(range(n, n + len(d) + 1))
        key = tuple(key)
        self._steady_key = key
        if self._steady is None or self._steady[0] != key:
            return None
        output_pos = np.zeros(padded_rows, np.int32)
        output_pos[:len(pos)] = pos
        return dataclasses.replace(self._steady[1], output_pos=output_pos)

    def launch(self, logits: jax.Array, plan: SamplePlan) -> PendingSample:
        """The device half: samples ``logits`` by ``plan`` and records each row's token
        (``last_sampled``). Safe on the runner's launch thread: it touches no host state."""
        out, self.last_sampled = self._sample(logits, plan.md, self.last_sampled, plan.slots)
        return PendingSample(out, plan.states, plan.samples, plan.drafts)

    def collect(self, pending: PendingSample, hidden: jax.Array | None = None
                ) -> ModelRunnerOutput:
        """Reads a dispatched sampling back (waits for the device); with ``hidden`` (the
        step's (rows, D) final hidden states) each ``return_hidden`` request's first row."""
        out = jax.device_get(pending.out)
        hidden = None if hidden is None else np.asarray(jax.device_get(hidden))
        token_ids = out.sampled_token_ids.tolist()  # Python ints at once, not per element
        result = ModelRunnerOutput(sampled_token_ids={})
        row = 0
        for state, do, drafts in zip(pending.states, pending.samples, pending.drafts):
            first, row = row, row + 1 + len(drafts)
            if not do:
                continue
            kept = 0  # drafts the model agrees with, up to the first it does not
            while kept < len(drafts) and token_ids[first + kept] == drafts[kept]:
                kept += 1
            toks = token_ids[first:first + kept + 1]
            result.sampled_token_ids[state.req_id] = toks
            if hidden is not None and state.sampling_params.return_hidden:
                result.hidden[state.req_id] = hidden[first].copy()
            k = state.sampling_params.logprobs
            if k is not None and out.logprobs is not None:
                lp = out.logprobs
                result.logprobs[state.req_id] = [make_logprobs(
                    lp.token_logprobs[i], lp.token_ranks[i], lp.topk_token_ids[i],
                    lp.topk_logprobs[i], k, tok) for i, tok in enumerate(toks, first)]
        return result

    def plan_prompt_logprobs(self, num_rows: int, states: list[CachedRequestState],
                             counts: list[int]) -> PromptLogprobsPlan | None:
        """The host half of the prompt logprobs of the positions computed this step (the step
        has ``num_rows`` logits rows, one per token of its bucket); None if nobody wants any.

        Row t of the step's logits (the logits of the t-th scheduled token, at position p)
        scores the prompt token at p + 1; position 0 has no logprob (None), as in vLLM.
        """
        targets = np.zeros(num_rows, np.int32)
        spans, row, k = [], 0, 0
        for state, count in zip(states, counts):
            start = state.num_computed_tokens
            want = state.sampling_params.prompt_logprobs
            end = min(start + count, state.num_prompt_tokens - 1)  # last position with a target
            if want is not None and end > start:
                ids = self.input_batch.token_ids[state.slot]
                targets[row:row + end - start] = ids[start + 1:end + 1]
                spans.append((state.req_id, row, end - start, start == 0, want))
                k = max(k, want)
            elif want is not None and start == 0:
                spans.append((state.req_id, row, 0, True, want))
            row += count
        if not spans:
            return None
        return PromptLogprobsPlan(targets, spans, logprobs_bucket(k))

    def launch_prompt_logprobs(self, all_logits: jax.Array,
                               plan: PromptLogprobsPlan | None) -> PendingPromptLogprobs | None:
        """The device half: the logprobs of ``plan``'s targets in ``all_logits``."""
        if plan is None:
            return None
        out = self._prompt_logprobs(all_logits, plan.targets, plan.k)
        return PendingPromptLogprobs(out, plan.targets, plan.spans)

    def collect_prompt_logprobs(self, pending: PendingPromptLogprobs | None,
                                result: ModelRunnerOutput) -> None:
        """Adds the prompt logprobs of a dispatched step to ``result``."""
        if pending is None:
            return
        lp = jax.device_get(pending.out)
        targets = pending.targets
        for req_id, row, n, first, want in pending.spans:
            entries: list[Logprobs | None] = [None] if first else []
            entries += [make_logprobs(lp.token_logprobs[row + j], lp.token_ranks[row + j],
                                      lp.topk_token_ids[row + j], lp.topk_logprobs[row + j], want,
                                      int(targets[row + j])) for j in range(n)]
            result.prompt_logprobs[req_id] = entries
