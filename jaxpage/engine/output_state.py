"""Output-side state of the engine's requests: what a request has streamed so far (text,
logprobs, prompt logprobs), the fan-out of an ``n > 1`` request into children, and the cut of
a step's tokens where a stop string or a grammar ended the output inside it."""

from __future__ import annotations

import time

from ..outputs import CompletionOutput, RequestMetrics
from ..sampling_params import SamplingParams
from .detokenizer import IncrementalDetokenizer
from .request import Request
from .scheduler import RequestUpdate
from .scheduler_output import Logprobs


def keep_first(update: RequestUpdate, n: int) -> None:
    """Keeps the first ``n`` of a step's new tokens (several: speculative decoding) and drops
    the rest from the request, its update and their logprobs: a stop string or the grammar
    ended the output inside the step, where plain decoding would have stopped."""
    request = update.request
    request.truncate_output(request.num_output_tokens - (len(update.new_token_ids) - n))
    request.stop_reason = None  # a stop token among those dropped
    update.new_token_ids = update.new_token_ids[:n]
    if update.new_logprobs is not None:
        update.new_logprobs = update.new_logprobs[:n]


class ParentRequest:
    """An ``n > 1`` request fanned out into children ``f"{i}_{req_id}"`` (vLLM's naming).

    Child 0 runs first; the others join once it has produced a token, by which time the prompt's
    full pages are in the prefix cache, so the children share them instead of recomputing.
    """

    def __init__(self, req_id: str, n: int, arrival_time: float):
        self.req_id = req_id
        self.n = n
        self.child_ids = [f"{i}_{req_id}" for i in range(n)]
        self.outputs: dict[int, CompletionOutput] = {}
        self.pending: list[Request] = []  # children waiting for child 0's prompt to be cached
        self.head_state: RequestState | None = None  # child 0: prompt, prompt_logprobs
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.num_finished = 0

    @staticmethod
    def child_params(params: SamplingParams, index: int) -> SamplingParams:
        child = params.clone()
        child.n = 1
        if params.seed is not None:
            child.seed = params.seed + index  # distinct but reproducible samples per child
        return child

    def record(self, index: int, completion: CompletionOutput, request: Request) -> None:
        self.outputs[index] = completion
        m, cm = self.metrics, request.metrics
        for name in ("first_scheduled_time", "first_token_time"):
            mine, theirs = getattr(m, name), getattr(cm, name)
            if theirs is not None and (mine is None or theirs < mine):
                setattr(m, name, theirs)
        if completion.finished():
            self.num_finished += 1
            m.finished_time = max(m.finished_time or 0.0, cm.finished_time or time.time())

    @property
    def finished(self) -> bool:
        return self.num_finished == self.n


class RequestState:
    """Output-side state of one scheduler request (a whole n = 1 request, or one child)."""

    def __init__(self, request: Request, prompt: str | None, detokenizer: IncrementalDetokenizer,
                 parent: ParentRequest | None, index: int):
        self.request = request
        self.prompt = prompt
        self.detokenizer = detokenizer
        self.parent = parent
        self.index = index
        sp = request.sampling_params
        self.logprobs: list[Logprobs] | None = [] if sp.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if sp.logprobs is not None else None
        self.prompt_logprobs: list[Logprobs | None] | None = (
            [] if sp.prompt_logprobs is not None else None)
        self.num_preemptions_seen = 0
        self.error: str | None = None
        self.final_only = False  # the engine reports it once, finished (``add_request``)

    def add_logprobs(self, update: RequestUpdate) -> None:
        if self.logprobs is not None and update.new_logprobs:
            self.logprobs.extend(update.new_logprobs)
            self.cumulative_logprob += sum(lp.logprobs[0] for lp in update.new_logprobs)
        plp, request = update.new_prompt_logprobs, self.request
        if self.prompt_logprobs is None or not plp:
            return
        if len(self.prompt_logprobs) >= request.num_prompt_tokens:
            return  # complete; a recompute after preemption sends them again
        if request.num_preemptions != self.num_preemptions_seen:
            self.prompt_logprobs.clear()  # recomputed from the start after preemption
            self.num_preemptions_seen = request.num_preemptions
        self.prompt_logprobs.extend(plp)

    def completion(self) -> CompletionOutput:
        r = self.request
        return CompletionOutput(
            index=self.index, text=self.detokenizer.get_output_text(r.is_finished),
            token_ids=list(r.output_token_ids), cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=r.finish_reason, stop_reason=r.stop_reason)
