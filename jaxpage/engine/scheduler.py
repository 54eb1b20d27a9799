"""Continuous batching with vLLM v1's single rule: no prefill or decode phases.

Every step, each request is given tokens until ``num_computed_tokens`` catches up with
``len(all_token_ids)``, under a shared token budget (``max_num_batched_tokens``) and a cap on
requests (``max_num_seqs``). A long prompt therefore runs in chunks (chunked prefill), and a
decode is just a request that is one token behind::

    request A (prefill, chunked by the budget)
    |<----------------------- all_token_ids (prompt) ----------------------->|
    |<-- num_computed_tokens -->|<---- scheduled this step ---->|<-- later -->|
                                 no token sampled: range does not reach the end

    request B (decode)
    |<------------------ all_token_ids (prompt + outputs) ------------------>|
    |<------------------------ num_computed_tokens ----------------------->|1|
                                                     the runner samples a token ^

    request C (new, prefix-cache hit)
    |<------------------------- all_token_ids ------------------------->|
    |<-- cached pages (hits) -->|<--------- scheduled this step --------->|
    num_computed_tokens starts here ^                  reaches the end: samples ^

Speculative decoding (``speculative_config``): a request in decode may run its last token plus
drafts from the proposer (``spec_decode.py``) in one step; ``num_computed_tokens`` advances over
all of them at scheduling and falls back by the drafts the runner rejected once the step is
read (their KV stays in the request's pages, past its length, to be overwritten).

Running requests are served first, in arrival order; then the waiting queue, first come first
served. When ``allocate_slots`` finds no room for a running request, the request at the tail of
the running queue (the latest to join) is preempted by recompute: its pages are freed, its
``num_computed_tokens`` drops to 0, and it goes back to the front of the waiting queue with
every token it has, prompt and outputs, to be recomputed (mostly from the prefix cache) later.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import SchedulerConfig, SpeculativeConfig
from .kv_cache_manager import KVCacheManager
from .request import Request, RequestStatus
from .spec_decode import NgramProposer
from .scheduler_output import (CachedRequestData, Logprobs, ModelRunnerOutput,
                                             NewRequestData, SchedulerOutput)


@dataclass
class RequestUpdate:
    """What one step did to one request (input to the engine's output processing)."""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list[Logprobs] | None = None
    new_prompt_logprobs: list[Logprobs | None] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.request.is_finished


class Scheduler:
    """Decides, each step, which requests run and how many tokens each computes.

    Args:
        scheduler_config: ``max_num_seqs``, ``max_num_batched_tokens``, chunked prefill,
            ``max_waiting_requests``.
        kv_cache_manager: the page allocator (and prefix cache).
        max_model_len: longest sequence; defaults to ``scheduler_config.max_model_len``.
        speculative_config: drafts for requests in decode (None: none). Drafts need the last
            token on the host, so only synchronous steps (no token in flight) carry them.
    """

    def __init__(self, scheduler_config: SchedulerConfig, kv_cache_manager: KVCacheManager,
                 *, max_model_len: int | None = None,
                 speculative_config: SpeculativeConfig | None = None):
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.enable_chunked_prefill = scheduler_config.enable_chunked_prefill
        self.max_waiting_requests = scheduler_config.max_waiting_requests
        self.max_model_len = max_model_len or scheduler_config.max_model_len
        self.kv_cache_manager = kv_cache_manager
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Finished, aborted or preempted since the last SchedulerOutput.
        self.finished_req_ids: set[str] = set()
        # req_id -> how many of its tokens the runner holds (the rest go out as new_token_ids).
        self._num_tokens_sent: dict[str, int] = {}
        self.proposer = (NgramProposer(speculative_config) if speculative_config is not None
                         else None)
        # Statistics.
        self.num_draft_tokens = 0  # drafts scheduled (speculative decoding)
        self.num_accepted_tokens = 0  # of those, kept
        self.num_preemptions = 0
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    # -- queue --------------------------------------------------------------------------------
    def add_request(self, request: Request, *, reserved: bool = False) -> None:
        """Queues a request (FCFS). ``reserved``: the caller already counted it against
        ``max_waiting_requests`` (the engine does for the later children of ``n > 1``)."""
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use.")
        if not reserved and len(self.waiting) >= self.max_waiting_requests:
            raise ValueError(f"the waiting queue is full ({self.max_waiting_requests} requests).")
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Picks this step's batch, allocates its pages, and advances ``num_computed_tokens``."""
        num_scheduled: dict[str, int] = {}  # req_id -> tokens, in batch order
        new_block_ids: dict[str, list[int]] = {}
        drafts: dict[str, list[int]] = {}
        scheduled_running, num_preempted = self._schedule_running(num_scheduled, new_block_ids,
                                                                  drafts)
        scheduled_new = [] if num_preempted else self._schedule_waiting(num_scheduled)
        output = SchedulerOutput(
            scheduled_new_reqs=[self._new_request_data(r) for r in scheduled_new],
            scheduled_cached_reqs=self._cached_request_data(scheduled_running, new_block_ids),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=self.finished_req_ids,
            scheduled_spec_decode_tokens=drafts,
        )
        self.finished_req_ids = set()
        # Advance now (not after the step) so that the next schedule() can run while this step
        # is in flight (async scheduling). A request whose range reaches its end samples a
        # token the host learns only at update_from_output: it is pending until then.
        for req_id, n in num_scheduled.items():
            request = self.requests[req_id]
            request.num_computed_tokens += n
            if request.num_computed_tokens >= request.num_tokens + request.num_pending_tokens:
                request.num_pending_tokens += 1
        return output

    def _schedule_running(self, num_scheduled: dict[str, int],
                          new_block_ids: dict[str, list[int]],
                          drafts: dict[str, list[int]]) -> tuple[list[Request], int]:
        """Running requests, oldest first; preempts from the tail when pages run out. A
        request's drafts (``drafts[req_id]``) run after its last token; they are dropped rather
        than preempting anyone for their pages.

        Returns the scheduled requests and how many were preempted.
        """
        budget = self.max_num_batched_tokens
        scheduled: list[Request] = []
        num_preempted = 0
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens + request.num_pending_tokens
                          - request.num_computed_tokens, budget)
            if num_new <= 0 or self._will_finish(request):
                i += 1
                continue
            # Drafts never take the budget from a running request behind this one.
            spec = self._propose(request, budget - num_new - (len(self.running) - i - 1))
            new_blocks = (self.kv_cache_manager.allocate_slots(request, num_new + len(spec))
                          if spec else None)
            if new_blocks is not None:
                num_new += len(spec)
                drafts[request.req_id] = spec
            while new_blocks is None and (
                    new_blocks := self.kv_cache_manager.allocate_slots(request, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                num_preempted += 1
                if victim is request:
                    break
            if new_blocks is None:
                break  # the request itself was the tail; everything older is scheduled
            scheduled.append(request)
            num_scheduled[request.req_id] = num_new
            new_block_ids[request.req_id] = [b.block_id for b in new_blocks]
            budget -= num_new
            i += 1
        return scheduled, num_preempted

    def _propose(self, request: Request, budget: int) -> list[int]:
        """Drafts for a request in decode with its last token known, within the step's
        ``budget`` and what its length caps leave (every draft kept plus the model's own token
        must still fit). A structured-output request's drafts are the tokens its grammar
        forces next (a JSON schema's keys and punctuation), not n-grams."""
        if (self.proposer is None or request.num_pending_tokens
                or request.num_tokens - request.num_computed_tokens != 1):
            return []
        room = min(budget, self.proposer.k, request.max_tokens - request.num_output_tokens - 1,
                   self.max_model_len - request.num_tokens - 1)
        if room <= 0:
            return []
        if request.grammar is not None:
            return request.grammar.forced_tokens(room)
        return self.proposer.propose(request.token_array(), room)

    def _will_finish(self, request: Request) -> bool:
        """True when a token in flight is sure to end the request (its length caps): it is not
        scheduled again, so no step computes a token that would be thrown away."""
        if not request.num_pending_tokens:
            return False
        return (request.num_output_tokens + request.num_pending_tokens >= request.max_tokens
                or request.num_tokens + request.num_pending_tokens >= self.max_model_len)

    def _schedule_waiting(self, num_scheduled: dict[str, int]) -> list[Request]:
        """Admits waiting requests first come first served, with their prefix-cache hits."""
        kv = self.kv_cache_manager
        budget = self.max_num_batched_tokens - sum(num_scheduled.values())
        scheduled: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            hits, num_hit = kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break  # the whole prompt must fit one step: wait for a step with room
                num_new = budget
            if kv.allocate_slots(request, num_new, new_computed_blocks=hits) is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.time()
            self.num_prefix_query_tokens += request.num_tokens
            self.num_prefix_hit_tokens += num_hit
            scheduled.append(request)
            num_scheduled[request.req_id] = num_new
            budget -= num_new
        return scheduled

    def _new_request_data(self, request: Request) -> NewRequestData:
        self._num_tokens_sent[request.req_id] = request.num_tokens
        return NewRequestData(
            req_id=request.req_id, all_token_ids=list(request.all_token_ids),
            num_prompt_tokens=request.num_prompt_tokens, sampling_params=request.sampling_params,
            seed=request.seed, block_ids=self.kv_cache_manager.get_block_ids(request.req_id),
            num_computed_tokens=request.num_computed_tokens, grammar=request.grammar)

    def _cached_request_data(self, requests: list[Request],
                             new_block_ids: dict[str, list[int]]) -> CachedRequestData:
        data = CachedRequestData()
        for request in requests:
            sent = self._num_tokens_sent[request.req_id]
            data.req_ids.append(request.req_id)
            data.new_token_ids.append(request.all_token_ids[sent:])
            data.new_block_ids.append(new_block_ids[request.req_id])
            data.num_computed_tokens.append(request.num_computed_tokens)
            self._num_tokens_sent[request.req_id] = request.num_tokens
        return data

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        # A token in flight is dropped: recomputed, it samples the same (seeded by position).
        request.num_pending_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self.finished_req_ids.add(request.req_id)
        self._num_tokens_sent.pop(request.req_id, None)

    # -- after the step -----------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> list[RequestUpdate]:
        """Caches newly full pages, appends sampled tokens, applies stop checks, frees the pages
        of finished requests.

        Returns:
            One update per request that got tokens, prompt logprobs, or finished this step.
        """
        so, mro = scheduler_output, model_runner_output
        starts = {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs}
        starts.update(zip(so.scheduled_cached_reqs.req_ids,
                          so.scheduled_cached_reqs.num_computed_tokens))
        updates: list[RequestUpdate] = []
        finished: list[Request] = []
        for req_id, num_tokens in so.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted since it was scheduled
            end = starts[req_id] + num_tokens
            error = mro.errors.get(req_id)
            sampled = mro.sampled_token_ids.get(req_id) or []
            if error is None and end >= request.num_tokens and not sampled:
                error = "the model runner returned no token for the request"
            spec = so.scheduled_spec_decode_tokens.get(req_id)
            if error is None and spec and not 1 <= len(sampled) <= len(spec) + 1:
                error = (f"the model runner returned {len(sampled)} tokens for a request with "
                         f"{len(spec)} drafts")
            if error is not None:
                request.status = RequestStatus.FINISHED_ERROR
                finished.append(request)
                updates.append(RequestUpdate(request, [], error=error))
                continue
            if spec:  # drafts past the first the model disagreed with: their KV is void
                num_rejected = len(spec) + 1 - len(sampled)
                request.num_computed_tokens -= num_rejected
                end -= num_rejected
                self.num_draft_tokens += len(spec)
                self.num_accepted_tokens += len(spec) - num_rejected
            new_token_ids: list[int] = []
            if end >= request.num_tokens:  # the range reached the end: the runner sampled
                request.num_pending_tokens = max(request.num_pending_tokens - 1, 0)
                for token_id in sampled:
                    request.append_output_token_ids(token_id)
                    new_token_ids.append(token_id)
                    if self._check_stop(request):
                        break
                if request.metrics.first_token_time is None:
                    request.metrics.first_token_time = time.time()
            self.kv_cache_manager.cache_blocks(request, end)
            hidden = mro.hidden.get(req_id)
            if hidden is not None:  # return_hidden: kept for the request's output
                request.hidden = hidden
            logprobs = mro.logprobs.get(req_id)
            if logprobs is not None:
                logprobs = logprobs[:len(new_token_ids)]
            prompt_logprobs = mro.prompt_logprobs.get(req_id)
            if request.is_finished:
                finished.append(request)
            if new_token_ids or prompt_logprobs or request.is_finished:
                updates.append(RequestUpdate(request, new_token_ids, logprobs, prompt_logprobs))
        self._remove_finished(finished)
        return updates

    def _check_stop(self, request: Request) -> bool:
        """Stop tokens (EOS unless ignore_eos, ``stop_token_ids``) once ``min_tokens`` exist,
        then the length caps. Sets status and stop_reason."""
        sp = request.sampling_params
        last = request.output_token_ids[-1]
        if request.num_output_tokens >= sp.min_tokens and last in sp.all_stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = last if last in sp.stop_token_ids else None
            return True
        if (request.num_output_tokens >= request.max_tokens
                or request.num_tokens >= self.max_model_len):
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    # -- finishing ----------------------------------------------------------------------------
    def finish_requests(self, req_ids: str | Iterable[str],
                        finished_status: RequestStatus) -> list[Request]:
        """Ends unfinished requests (abort, stop string, error) and frees their pages.

        Unknown or already finished ids are ignored. Returns the requests it finished.
        """
        if not finished_status.is_finished:
            raise ValueError(f"{finished_status!r} is not a finished status.")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        done: dict[str, Request] = {}
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is not None and req_id not in done:
                request.status = finished_status
                done[req_id] = request
        finished = list(done.values())
        self._remove_finished(finished)
        return finished

    def _remove_finished(self, requests: list[Request]) -> None:
        if not requests:
            return
        ids = {r.req_id for r in requests}
        self.running = [r for r in self.running if r.req_id not in ids]
        if any(r.req_id in ids for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if r.req_id not in ids)
        now = time.time()
        for request in requests:
            self.kv_cache_manager.free(request)
            self.finished_req_ids.add(request.req_id)
            self._num_tokens_sent.pop(request.req_id, None)
            del self.requests[request.req_id]
            request.metrics.finished_time = now
