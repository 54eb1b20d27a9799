"""A numpy stand-in for the model runner that simulates the paged KV pool and checks the contract.

The "model": the KV of position p is a rolling hash of tokens[0..p]; the next token is a hash of
the KV at the last position. The runner writes KV into a real page pool through the block
tables it is given and reads every position back before "sampling", so a wrong block table, a
page shared while written, a bad prefix-cache hit or a page reused too early changes the tokens
(and trips an assertion), exactly as it would corrupt a real model's output.
"""

from __future__ import annotations

import numpy as np

from jaxpage.engine.scheduler_output import Logprobs, ModelRunnerOutput, SchedulerOutput

MOD = (1 << 61) - 1
MASK64 = (1 << 64) - 1


def kv_of(prev_kv: int, token: int, pos: int) -> int:
    return (prev_kv * 1_000_003 + token * 7_919 + pos + 1) % MOD


def next_token(kv: int, vocab_size: int) -> int:
    x = (kv * 0x9E3779B97F4A7C15) & MASK64
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 29
    return x % vocab_size


def markov_token(last: int, vocab_size: int) -> int:
    """The ``markov`` fake model's next token: a function of the last token alone, so outputs
    soon cycle and n-gram drafts (speculative decoding) are often right."""
    return (last * 5 + 3) % min(vocab_size, 13)


def fake_logprob(kv: int) -> float:
    return -((kv >> 7) % 1000) / 100.0 - 0.01


def reference_generate(prompt: list[int], max_tokens: int, vocab_size: int,
                       stop_ids: set[int] = frozenset(), min_tokens: int = 0,
                       markov: bool = False) -> list[int]:
    """What the fake model generates for a prompt, computed without the engine."""
    kv = 0
    for pos, t in enumerate(prompt):
        kv = kv_of(kv, t, pos)
    out: list[int] = []
    for _ in range(max_tokens):
        last = out[-1] if out else prompt[-1]
        tok = markov_token(last, vocab_size) if markov else next_token(kv, vocab_size)
        out.append(tok)
        if len(out) >= max_tokens or (len(out) >= min_tokens and tok in stop_ids):
            return out
        kv = kv_of(kv, tok, len(prompt) + len(out) - 1)
    return out


class _State:
    def __init__(self, new):
        self.tokens = list(new.all_token_ids)
        self.block_ids = list(new.block_ids)
        self.num_computed = new.num_computed_tokens
        self.num_prompt = new.num_prompt_tokens
        self.params = new.sampling_params
        self.seed = new.seed
        # Tokens this runner sampled that the scheduler has not sent back yet: under async
        # scheduling the next step runs on them before the host knows them.
        self.pending: list[int] = []
        self.drafts: list[int] = []  # this step's drafts (speculative decoding)

    @property
    def seq(self) -> list[int]:
        return self.tokens + self.pending + self.drafts


class FakeRunner:
    """Executes SchedulerOutputs on a simulated page pool, asserting the scheduler's contract.

    Args:
        scheduler: if given, token ids the runner holds are checked against the scheduler's.
        fail_req_ids: requests reported in ``errors`` whenever scheduled.
        raise_on_steps: step numbers (1-based) on which execute_model raises.
        markov: the next token depends on the last token alone (``markov_token``), so that
            n-gram drafts are often right; the KV is simulated and checked as always.
    """

    def __init__(self, num_pages: int, page_size: int, vocab_size: int, *, max_num_seqs: int,
                 max_num_batched_tokens: int, scheduler=None, fail_req_ids=(), raise_on_steps=(),
                 markov: bool = False):
        self.markov = markov
        self.page_size = page_size
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.scheduler = scheduler
        self.fail_req_ids = set(fail_req_ids)
        self.raise_on_steps = set(raise_on_steps)
        self.pool = np.full((num_pages, page_size), -1, np.int64)  # the "KV" of each slot
        self.reqs: dict[str, _State] = {}
        self.num_steps = 0
        self.seeds: dict[str, int] = {}
        self.batch_sizes: list[int] = []
        self.scheduled_log: list[dict[str, int]] = []

    def dispatch(self, so: SchedulerOutput, background: bool = False,
                 defer_sampling: bool = False) -> ModelRunnerOutput:
        """Async scheduling's launch: this fake device finishes at once, but the engine reads
        the result back only after it has launched the next step."""
        return self.execute_model(so)

    def shutdown(self) -> None:
        pass

    def collect(self, handle: ModelRunnerOutput) -> ModelRunnerOutput:
        return handle

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.num_steps += 1
        if self.num_steps in self.raise_on_steps:
            raise RuntimeError("simulated device failure")
        self._apply_diffs(so)
        if so.is_empty:  # only tells the runner which requests to forget
            return ModelRunnerOutput(sampled_token_ids={})
        batch = list(so.num_scheduled_tokens.items())
        self.batch_sizes.append(len(batch))
        self.scheduled_log.append(dict(so.num_scheduled_tokens))
        self._check_ownership(batch)
        out = ModelRunnerOutput(sampled_token_ids={})
        for req_id, n in batch:  # write every request's KV first (as one layer does) ...
            self._write_kv(self.reqs[req_id], n)
        for req_id, n in batch:  # ... then read it back ("attention") and sample
            self._read_and_sample(req_id, self.reqs[req_id], n, out)
        return out

    # -- contract checks ------------------------------------------------------------------
    def _apply_diffs(self, so: SchedulerOutput) -> None:
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        assert so.total_num_scheduled_tokens or so.finished_req_ids, "pointless empty call"
        assert so.total_num_scheduled_tokens <= self.max_num_batched_tokens
        assert len(so.num_scheduled_tokens) <= self.max_num_seqs
        for req_id in so.finished_req_ids:
            self.reqs.pop(req_id, None)
        new_ids = [r.req_id for r in so.scheduled_new_reqs]
        cached = so.scheduled_cached_reqs
        assert len(set(new_ids) | set(cached.req_ids)) == len(new_ids) + len(cached.req_ids)
        assert set(so.num_scheduled_tokens) == set(new_ids) | set(cached.req_ids)
        for new in so.scheduled_new_reqs:
            assert new.req_id not in self.reqs, f"{new.req_id} resent without a finish notice"
            assert new.num_computed_tokens % self.page_size == 0  # hits are whole pages
            self.reqs[new.req_id] = _State(new)
            self.seeds[new.req_id] = new.seed
        for req_id, toks, blocks, num_computed in zip(cached.req_ids, cached.new_token_ids,
                                                      cached.new_block_ids,
                                                      cached.num_computed_tokens):
            state = self.reqs[req_id]  # KeyError: the runner never learned this request
            assert num_computed == state.num_computed, (req_id, num_computed, state.num_computed)
            for t in toks:  # what the host learned is what this runner sampled, in order
                assert state.pending and state.pending.pop(0) == t, (req_id, t, state.pending)
            state.tokens.extend(toks)
            state.block_ids.extend(blocks)
        for req_id, drafts in so.scheduled_spec_decode_tokens.items():
            state = self.reqs[req_id]
            assert drafts and not state.pending, "drafts need the last token on the host"
            assert so.num_scheduled_tokens[req_id] == 1 + len(drafts)
            assert state.num_computed == len(state.tokens) - 1, "drafts after a non-decode"
            state.drafts = list(drafts)
        for req_id, n in so.num_scheduled_tokens.items():
            state = self.reqs[req_id]
            end = state.num_computed + n
            assert n > 0 and end <= len(state.seq), (req_id, state.num_computed, n)
            assert len(state.block_ids) * self.page_size >= end, "block table too short"
            assert 0 not in state.block_ids, "the null page was handed to a request"
            assert len(set(state.block_ids)) == len(state.block_ids)
            if self.scheduler is not None:
                assert state.tokens == self.scheduler.requests[req_id].all_token_ids
                assert state.block_ids == self.scheduler.kv_cache_manager.get_block_ids(req_id)

    def _check_ownership(self, batch) -> None:
        users: dict[int, int] = {}
        for state in self.reqs.values():
            for b in state.block_ids:
                users[b] = users.get(b, 0) + 1
        for req_id, n in batch:
            state = self.reqs[req_id]
            ps = self.page_size
            for idx in range(state.num_computed // ps, -(-(state.num_computed + n) // ps)):
                page = state.block_ids[idx]
                assert users[page] == 1, f"page {page} is written by {req_id} but shared"

    # -- the "model" ----------------------------------------------------------------------
    def _slot(self, state: _State, pos: int) -> tuple[int, int]:
        return state.block_ids[pos // self.page_size], pos % self.page_size

    def _write_kv(self, state: _State, n: int) -> None:
        c = state.num_computed
        kv = int(self.pool[self._slot(state, c - 1)]) if c else 0
        seq = state.seq
        for pos in range(c, c + n):
            kv = kv_of(kv, seq[pos], pos)
            self.pool[self._slot(state, pos)] = kv

    def _read_and_sample(self, req_id: str, state: _State, n: int, out: ModelRunnerOutput):
        end = state.num_computed + n
        seq = state.seq
        kv = 0
        kvs = []
        for pos in range(end):  # every position the request attends to must hold its own KV
            kv = kv_of(kv, seq[pos], pos)
            assert int(self.pool[self._slot(state, pos)]) == kv, f"{req_id}: bad KV at {pos}"
            kvs.append(kv)
        if state.drafts:
            self._verify_drafts(req_id, state, end, kvs, out)
            return
        sp = state.params
        if sp.prompt_logprobs is not None and state.num_computed < state.num_prompt:
            out.prompt_logprobs[req_id] = [
                None if p == 0 else Logprobs([state.tokens[p]], [-(p % 5) / 10.0], [1])
                for p in range(state.num_computed, min(end, state.num_prompt))]
        state.num_computed = end
        if end < len(seq):
            if req_id in self.fail_req_ids:
                out.errors[req_id] = "simulated failure"
            return  # a partial prefill chunk samples nothing
        tok = self._sample(kv, seq[end - 1])
        # The device samples (a step launched after this one reads the token) even when the
        # request's result is reported as failed.
        state.pending.append(tok)
        if req_id in self.fail_req_ids:
            out.errors[req_id] = "simulated failure"
            return
        out.sampled_token_ids[req_id] = [tok]
        if sp.logprobs is not None:
            out.logprobs[req_id] = [self._logprobs(tok, kv, sp.logprobs)]

    def _logprobs(self, tok: int, kv: int, k: int) -> Logprobs:
        top = [(tok + 1 + i) % self.vocab_size for i in range(k)]
        return Logprobs([tok] + top, [fake_logprob(kv)] + [-5.0] * k, [1] + list(range(2, k + 2)))

    def _sample(self, kv: int, last: int) -> int:
        return markov_token(last, self.vocab_size) if self.markov else next_token(kv,
                                                                                  self.vocab_size)

    def _verify_drafts(self, req_id: str, state: _State, end: int, kvs: list[int],
                       out: ModelRunnerOutput) -> None:
        """Samples at the last token and at each draft; keeps drafts up to the first the
        "model" disagrees with, plus its own token there."""
        drafts, seq = state.drafts, state.seq
        first = end - 1 - len(drafts)
        toks = []
        for j in range(len(drafts) + 1):
            toks.append(self._sample(kvs[first + j], seq[first + j]))
            if j < len(drafts) and toks[-1] != drafts[j]:
                break
        state.drafts = []
        state.num_computed = end - (len(drafts) + 1 - len(toks))
        state.pending.extend(toks)
        out.sampled_token_ids[req_id] = toks
        if state.params.logprobs is not None:
            out.logprobs[req_id] = [self._logprobs(t, kvs[first + j], state.params.logprobs)
                                    for j, t in enumerate(toks)]
