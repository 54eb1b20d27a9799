"""The engine: validate, queue, and step (schedule -> execute -> update -> outputs).

With ``async_scheduling`` a step is schedule N + 1 -> dispatch N + 1 -> collect N -> update N
-> outputs: the device runs step N + 1 while the host reads and processes step N.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from ..config import CacheConfig, SchedulerConfig, SpeculativeConfig
from .detokenizer import IncrementalDetokenizer, TokenizerInfo
from .output_state import ParentRequest, RequestState, keep_first
from .kv_cache_manager import KVCacheManager
from .request import Request, RequestStatus
from .scheduler import RequestUpdate, Scheduler
from .scheduler_output import ModelRunnerOutput, SchedulerOutput
from .structured_output import Grammar, GrammarCompiler
from ..outputs import CompletionOutput, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams

logger = logging.getLogger("jaxpage")


class ModelRunnerLike(Protocol):
    """``execute_model`` runs a step to its end; async scheduling also needs ``dispatch`` (launch
    a step, return a handle) and ``collect`` (wait for it, read it back)."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...


def _error(param: str, msg: str, code: str | None = None) -> ValueError:
    err = ValueError(msg)
    err.param = param  # type: ignore[attr-defined]
    err.code = code  # type: ignore[attr-defined]
    return err


class LLMEngine:
    """Continuous-batching engine over a model runner; host side only (no jax here).

    Args:
        model_runner: any object with ``execute_model(SchedulerOutput) -> ModelRunnerOutput``.
        tokenizer: HF-like tokenizer for incremental text, or None (token ids only, no ``stop``).
        scheduler_config: batching limits.
        cache_config: ``page_size`` and ``enable_prefix_caching``.
        num_pages: pages in the runner's KV pool (page 0 is the null page).
        vocab_size: the model's vocabulary size (prompt ids must lie in ``[0, vocab_size)``).
        eos_token_ids: EOS id(s); they stop a request unless ``ignore_eos``.
        max_model_len: longest sequence (prompt + output).
        seed: seeds the draw of per-request seeds for requests without one (None: random).
        speculative_config: speculative decoding (drafts need the last token on the host, so
            the engine then steps synchronously; the runner must verify drafts).
    """

    def __init__(self, model_runner: ModelRunnerLike, tokenizer: Any | None, *,
                 scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_pages: int,
                 vocab_size: int, eos_token_ids: int | Iterable[int] | None, max_model_len: int,
                 seed: int | None = None, speculative_config: SpeculativeConfig | None = None):
        page_size = cache_config.page_size
        if -(-max_model_len // page_size) > num_pages - 1:
            raise ValueError(
                f"max_model_len {max_model_len} needs {-(-max_model_len // page_size)} pages of "
                f"{page_size} tokens, but the KV pool has only {num_pages - 1} usable pages; "
                "lower max_model_len or give the pool more memory.")
        if not scheduler_config.enable_chunked_prefill and (
                max_model_len > scheduler_config.max_num_batched_tokens):
            raise ValueError(f"max_num_batched_tokens ({scheduler_config.max_num_batched_tokens}) "
                             f"must be >= max_model_len ({max_model_len}) without chunked prefill.")
        self.model_runner = model_runner
        self.tokenizer = TokenizerInfo(tokenizer) if tokenizer is not None else None
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        if eos_token_ids is None:
            eos_token_ids = ()
        elif isinstance(eos_token_ids, int):
            eos_token_ids = (eos_token_ids,)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.kv_cache_manager = KVCacheManager(
            num_pages, page_size, enable_caching=cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.kv_cache_manager,
                                   max_model_len=max_model_len,
                                   speculative_config=speculative_config)
        self.speculative = speculative_config is not None
        self._states: dict[str, RequestState] = {}  # scheduler req_id -> state, unfinished
        self._parents: dict[str, ParentRequest] = {}
        self._num_pending_children = 0
        self._rng = random.Random(seed)
        self.async_scheduling = scheduler_config.async_scheduling
        if self.async_scheduling and not hasattr(model_runner, "dispatch"):
            raise ValueError("async_scheduling needs a model runner with dispatch / collect.")
        self._in_flight: tuple[SchedulerOutput, Any] | None = None  # dispatched, not collected
        self._grammars = (None if tokenizer is None else
                          GrammarCompiler(tokenizer, vocab_size, self.eos_token_ids))
        self._num_structured = 0  # unfinished requests (children) with a grammar

    # -- requests -----------------------------------------------------------------------------
    def validate_request(self, prompt_token_ids: Any, sampling_params: SamplingParams, *,
                         req_id: str | None = None, cache_salt: str | None = None) -> list[int]:
        """Checks a request without queueing it; raises ``ValueError`` (with ``param`` and
        ``code`` attributes) naming the problem. Returns the prompt as a list of ints."""
        return self._validate(prompt_token_ids, sampling_params, req_id=req_id,
                              cache_salt=cache_salt)[0]

    def _validate(self, prompt_token_ids: Any, sampling_params: SamplingParams, *,
                  req_id: str | None, cache_salt: str | None) -> tuple[list[int], Grammar | None]:
        """``validate_request``, and the request's compiled grammar (structured outputs)."""
        if req_id is not None:
            if not isinstance(req_id, str) or not req_id:
                raise _error("request_id", "request_id must be a non-empty string.")
            if req_id in self._parents or req_id in self._states:
                raise _error("request_id", f"request id {req_id!r} is already in use.")
        if not isinstance(sampling_params, SamplingParams):
            raise _error("sampling_params", "sampling_params must be a SamplingParams, got "
                         f"{type(sampling_params).__name__}.")
        try:
            ids = np.asarray(prompt_token_ids)
        except (TypeError, ValueError):
            raise _error("prompt", "prompt_token_ids must be a flat list of integers.") from None
        if ids.ndim != 1 or ids.size == 0:
            raise _error("prompt", "prompt must contain at least one token (a flat list of ids).")
        if ids.dtype.kind not in "iu":
            raise _error("prompt", "prompt_token_ids must be integers.")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise _error("prompt", f"prompt contains token id {int(bad[0])}, outside the "
                         f"vocabulary [0, {self.vocab_size}).")
        if sampling_params.truncate_prompt_tokens is not None:  # left truncation
            ids = ids[-sampling_params.truncate_prompt_tokens:]
        sampling_params.verify(vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                               num_prompt_tokens=int(ids.size))
        if sampling_params.stop and self.tokenizer is None:
            raise _error("stop", "stop strings need a tokenizer; this engine has none.")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise _error("cache_salt", "cache_salt must be a non-empty string.")
        limit = self.scheduler.max_waiting_requests
        if len(self.scheduler.waiting) + self._num_pending_children + sampling_params.n > limit:
            raise _error("request", f"the request queue is full ({limit} waiting); retry later.",
                         code="queue_full")
        grammar = None
        if sampling_params.structured_outputs is not None:
            if self._grammars is None:
                raise _error("structured_outputs", "structured outputs need a tokenizer; this "
                             "engine has none.")
            grammar = self._grammars.compile(sampling_params.structured_outputs)
        return ids.tolist(), grammar

    def add_request(self, req_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams, *, prompt: str | None = None,
                    arrival_time: float | None = None, cache_salt: str | None = None,
                    final_only: bool = False) -> None:
        """Validates (before allocating anything) and queues a request.

        ``n > 1`` fans out into children that share the prompt's pages; their outputs come back
        together under ``req_id``. ``final_only`` (vLLM's ``RequestOutputKind.FINAL_ONLY``, what
        ``LLM.generate`` reads): ``step`` returns the request's output once, when it finishes,
        instead of a copy of everything so far at every step. Raises ``ValueError`` for a bad
        request.
        """
        ids, grammar = self._validate(prompt_token_ids, sampling_params, req_id=req_id,
                                      cache_salt=cache_salt)
        n = sampling_params.n
        child_ids = [req_id] if n == 1 else [f"{i}_{req_id}" for i in range(n)]
        if any(c in self._states or c in self._parents for c in child_ids):
            raise _error("request_id", f"request id {req_id!r} collides with one in use.")
        arrival_time = time.time() if arrival_time is None else arrival_time
        parent = ParentRequest(req_id, n, arrival_time) if n > 1 else None
        requests, states = [], []
        for index, child_id in enumerate(child_ids):
            params = (ParentRequest.child_params(sampling_params, index) if parent
                      else sampling_params.clone())
            params.all_stop_token_ids = set(params.stop_token_ids) | (
                set() if params.ignore_eos else set(self.eos_token_ids))
            request = Request(
                child_id, ids, params,
                seed=params.seed if params.seed is not None else self._rng.getrandbits(63),
                max_tokens=params.max_tokens or self.max_model_len - len(ids),
                arrival_time=arrival_time, cache_salt=cache_salt,
                grammar=None if grammar is None else grammar.copy() if index else grammar)
            detok = IncrementalDetokenizer(self.tokenizer, ids, params)
            states.append(RequestState(request, prompt, detok, parent, index))
            states[-1].final_only = final_only
            requests.append(request)
        self.scheduler.add_request(requests[0])  # the last check that can fail
        self._states.update(zip(child_ids, states))
        if grammar is not None:
            self._num_structured += len(states)
        if parent is not None:
            parent.head_state = states[0]
            parent.pending = requests[1:]
            self._num_pending_children += len(parent.pending)
            self._parents[req_id] = parent

    def abort_request(self, req_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Aborts requests (unknown or finished ids are ignored) and frees their pages at once.

        Returns their final outputs (``finish_reason="abort"``), for callers that want them.
        """
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        outputs = []
        for req_id in req_ids:
            parent = self._parents.get(req_id)
            states = ([self._states[c] for c in parent.child_ids if c in self._states]
                      if parent else [self._states[req_id]] if req_id in self._states else [])
            if not states:
                continue
            if parent is not None:
                self._num_pending_children -= len(parent.pending)
                parent.pending = []
            self.scheduler.finish_requests([s.request.req_id for s in states],
                                           RequestStatus.FINISHED_ABORTED)
            for state in states:  # children never queued are not the scheduler's to finish
                if not state.request.is_finished:
                    state.request.status = RequestStatus.FINISHED_ABORTED
                    state.request.metrics.finished_time = time.time()
            outputs.extend(self._make_outputs(states))
        return outputs

    # -- stepping -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns outputs of requests that progressed or finished.

        With speculative decoding every step is synchronous: drafts follow the last token.
        Structured outputs keep async scheduling: a step's model runs before the step before
        is read back, and only its sampler waits for the grammars' masks."""
        if self.async_scheduling and not self.speculative:
            return self._step_async()
        outputs = self._process_updates(self._update_in_flight())  # leaving async: drain
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty and not scheduler_output.finished_req_ids:
            return outputs
        # An empty batch still goes out: it tells the runner which requests to forget.
        model_runner_output = self._execute_model(scheduler_output)
        updates = self.scheduler.update_from_output(scheduler_output, model_runner_output)
        outputs += self._process_updates(updates)
        if self.scheduler.finished_req_ids and not self.scheduler.has_unfinished_requests():
            self._execute_model(self.scheduler.schedule())  # going idle: the runner forgets now
        return outputs

    def _step_async(self) -> list[RequestOutput]:
        """Dispatches step N + 1, then collects and processes step N (still in flight).

        With grammars live, step N + 1's sampler is launched only after step N's tokens have
        gone through the grammars (its model step is launched first, so the device runs it
        while the host reads step N back and computes the masks)."""
        so = self.scheduler.schedule()
        dispatched = None
        deferred = bool(self._num_structured)
        if not so.is_empty or so.finished_req_ids:
            dispatched = (so, self._dispatch(so, background=True, defer_sampling=deferred))
        outputs = self._process_updates(self._update_in_flight())
        if dispatched is not None and getattr(dispatched[1], "deferred", None) is not None:
            try:
                self.model_runner.launch_sampling(dispatched[1])
            except Exception as e:  # noqa: BLE001 - its requests fail at collect
                logger.exception("model runner failed to launch a step's sampler")
                dispatched = (so, e)
        self._in_flight = dispatched
        if not self.scheduler.has_unfinished_requests():  # going idle
            self._update_in_flight()  # tokens of requests that ended meanwhile: dropped
            if self.scheduler.finished_req_ids:
                self._execute_model(self.scheduler.schedule())  # the runner forgets them now
        return outputs

    def _update_in_flight(self) -> list[RequestUpdate]:
        """Collects the step in flight (if any) and applies it to the scheduler."""
        if self._in_flight is None:
            return []
        so, handle = self._in_flight
        self._in_flight = None
        return self.scheduler.update_from_output(so, self._collect(so, handle))

    def _dispatch(self, so: SchedulerOutput, background: bool = False,
                  defer_sampling: bool = False) -> Any:
        try:
            return self.model_runner.dispatch(so, background=background,
                                              defer_sampling=defer_sampling)
        except Exception as e:  # noqa: BLE001 - failed at launch: its requests fail at collect
            logger.exception("model runner failed to launch a step")
            return e

    def _collect(self, so: SchedulerOutput, handle: Any) -> ModelRunnerOutput:
        try:
            if isinstance(handle, Exception):
                raise handle
            return self.model_runner.collect(handle)
        except Exception as e:  # noqa: BLE001
            return self._failed_step(so, e)

    def _execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        try:
            return self.model_runner.execute_model(scheduler_output)
        except Exception as e:  # noqa: BLE001
            return self._failed_step(scheduler_output, e)

    @staticmethod
    def _failed_step(so: SchedulerOutput, e: Exception) -> ModelRunnerOutput:
        """Fails this step's requests, and only them: the engine keeps serving."""
        logger.error("model runner failed a step of %d requests", len(so.num_scheduled_tokens),
                     exc_info=e)
        msg = f"internal error in the model runner ({type(e).__name__})"
        return ModelRunnerOutput(sampled_token_ids={},
                                 errors=dict.fromkeys(so.num_scheduled_tokens, msg))

    def _process_updates(self, updates: list[RequestUpdate]) -> list[RequestOutput]:
        touched: list[RequestState] = []
        for update in updates:
            request = update.request
            state = self._states[request.req_id]
            state.error = update.error or state.error
            grammar_done = (request.grammar is not None and bool(update.new_token_ids)
                            and self._advance_grammar(state, update))
            stop_str = self._detokenize(state, update)
            state.add_logprobs(update)
            if stop_str is not None:
                request.stop_reason = stop_str
            if stop_str is not None or grammar_done:
                if request.is_finished:
                    request.status = RequestStatus.FINISHED_STOPPED
                else:
                    self.scheduler.finish_requests(request.req_id, RequestStatus.FINISHED_STOPPED)
            touched.append(state)
            parent = state.parent
            if parent and parent.pending and (request.num_output_tokens or request.is_finished):
                for child in parent.pending:  # child 0's prompt pages are cached by now
                    self.scheduler.add_request(child, reserved=True)
                self._num_pending_children -= len(parent.pending)
                parent.pending = []
        return self._make_outputs(touched)

    @staticmethod
    def _detokenize(state: RequestState, update: RequestUpdate) -> str | None:
        """Adds the update's tokens to the text; returns the stop string that matched, if any.

        Several tokens in one step (speculative decoding) go in one at a time when the request
        has stop strings, and tokens after the one that completed a match are dropped, as if
        they had come one step each."""
        request, tokens = update.request, update.new_token_ids
        # the last token is a stop token (EOS or stop_token_ids) that ended the request
        stopped = (request.status == RequestStatus.FINISHED_STOPPED and bool(tokens)
                   and tokens[-1] in request.sampling_params.all_stop_token_ids)
        if len(tokens) <= 1 or not state.detokenizer.stop:
            return state.detokenizer.update(tokens, stopped)
        for i, token_id in enumerate(tokens):
            last = i == len(tokens) - 1
            stop_str = state.detokenizer.update([token_id], stopped and last)
            if stop_str is not None:
                if not last:
                    keep_first(update, i + 1)
                return stop_str
        return None

    def _advance_grammar(self, state: RequestState, update: RequestUpdate) -> bool:
        """Feeds the update's tokens to the request's grammar, one by one. Returns True when
        the grammar is complete (the caller finishes the request, finish reason "stop"); tokens
        after the one that completed it (drafts kept in the same step) are dropped, as plain
        decoding never makes them. A token that broke the grammar (only a masking bug could)
        fails the request."""
        request, tokens = state.request, update.new_token_ids
        for i, token_id in enumerate(tokens):
            if not request.grammar.accept([token_id]):
                state.error = f"structured output: a sampled token broke the grammar " \
                              f"({request.grammar.error[:200]})"
                logger.error("request %s: %s", request.req_id, state.error)
                if not request.is_finished:
                    self.scheduler.finish_requests(request.req_id, RequestStatus.FINISHED_ERROR)
                return False
            if request.grammar.terminated:
                if i < len(tokens) - 1:
                    keep_first(update, i + 1)
                    return True
                # complete at the step's last token: as before, a request that its length cap
                # ended at the same token keeps finish reason "length"
                return not request.is_finished
        return False

    def _make_outputs(self, states: list[RequestState]) -> list[RequestOutput]:
        outputs, parents = [], {}
        for state in states:
            request = state.request
            if state.final_only and not request.is_finished:
                continue  # nothing to report until it ends
            completion = state.completion()
            if request.is_finished and self._states.pop(request.req_id, None) is not None:
                self._num_structured -= request.grammar is not None
            if state.parent is None:
                outputs.append(self._request_output(state, request.req_id, [completion],
                                                    request.is_finished, request.metrics))
            else:
                state.parent.record(state.index, completion, request)
                parents.setdefault(state.parent.req_id, state.parent)
        for parent in parents.values():
            if parent.finished:
                self._parents.pop(parent.req_id, None)
            elif parent.head_state.final_only:
                continue
            completions = [parent.outputs[i] for i in sorted(parent.outputs)]
            outputs.append(self._request_output(parent.head_state, parent.req_id, completions,
                                                parent.finished, parent.metrics))
        return outputs

    @staticmethod
    def _request_output(state: RequestState, req_id: str, completions: list[CompletionOutput],
                        finished: bool, metrics: RequestMetrics) -> RequestOutput:
        request = state.request
        return RequestOutput(
            request_id=req_id, prompt=state.prompt, prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=(list(state.prompt_logprobs) if state.prompt_logprobs is not None
                             else None),
            outputs=completions, finished=finished,
            num_cached_tokens=max(request.num_cached_tokens, 0), metrics=metrics, error=state.error,
            hidden=request.hidden)

    # -- introspection ------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    def get_num_unfinished_requests(self) -> int:
        """Unfinished user requests (an ``n > 1`` request counts once)."""
        return len(self._parents) + sum(1 for s in self._states.values() if s.parent is None)

    @property
    def num_free_pages(self) -> int:
        """Pages not held by any request (cached-but-free pages count); for leak checks."""
        return self.kv_cache_manager.num_free_pages

    def get_stats(self) -> dict[str, float]:
        s = self.scheduler
        return {
            "num_running": len(s.running), "num_waiting": len(s.waiting),
            "kv_cache_usage": self.kv_cache_manager.usage, "num_preemptions": s.num_preemptions,
            "prefix_cache_queries": s.num_prefix_query_tokens,
            "prefix_cache_hits": s.num_prefix_hit_tokens,
            "spec_decode_num_draft_tokens": s.num_draft_tokens,
            "spec_decode_num_accepted_tokens": s.num_accepted_tokens,
        }
