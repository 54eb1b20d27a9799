"""One generation request as the scheduler sees it: tokens, progress, status."""

from __future__ import annotations

import enum
import time
from typing import Any

import numpy as np

from ..outputs import RequestMetrics
from ..sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request; every status from FINISHED_STOPPED on is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's ``finish_reason`` for a final status, None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """A request's token state. The engine validates inputs before building one.

    Args:
        req_id: unique id.
        prompt_token_ids: the prompt, non-empty.
        sampling_params: owned by this request (the engine passes a private copy).
        seed: per-request PRNG seed for the runner.
        max_tokens: resolved cap on output tokens (``sampling_params.max_tokens`` or what the
            context leaves).
        arrival_time: wall-clock seconds (``time.time()``); now if None.
        cache_salt: tenant key mixed into the first page's prefix-cache hash.
    """

    def __init__(self, req_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 *, seed: int, max_tokens: int, arrival_time: float | None = None,
                 cache_salt: str | None = None, grammar: Any = None):
        self.req_id = req_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.seed = seed
        self.max_tokens = max_tokens
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.cache_salt = cache_salt
        # structured outputs: the request's ``structured_output.Grammar`` (None: unconstrained)
        self.grammar = grammar
        self.output_token_ids: list[int] = []
        # Prompt + output in one list so appending a token is O(1) and slicing needs no concat.
        self._all_token_ids: list[int] = list(self.prompt_token_ids)
        # Tokens whose KV sits in pages (advanced by the scheduler when it schedules them).
        self.num_computed_tokens = 0
        # Prompt tokens served by the prefix cache when first scheduled; -1 until then.
        self.num_cached_tokens = -1
        self.status = RequestStatus.WAITING
        # The stop token id or stop string that ended the request (None for EOS / length).
        self.stop_reason: int | str | None = None
        # Chained SHA-256 hashes of this request's full pages, filled lazily by KVCacheManager.
        self.block_hashes: list[bytes] = []
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        self.num_preemptions = 0
        # Tokens sampled by steps in flight whose ids the host does not know yet (async
        # scheduling: at most one; always 0 between steps when stepping synchronously).
        self.num_pending_tokens = 0
        # (D,) final hidden state of the last prompt token, for ``return_hidden`` requests.
        self.hidden = None
        # Speculative decoding: the context as a growing int32 array (``token_array``).
        self._token_buf: np.ndarray | None = None
        self._token_buf_len = 0  # how many of its leading entries are current

    # -- token views --------------------------------------------------------------------------
    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by outputs. Read-only by convention: mutate via append_output_token_ids."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drops output tokens past the first ``num_output_tokens`` (a stop string matched
        inside a step that appended several)."""
        del self.output_token_ids[num_output_tokens:]
        del self._all_token_ids[self.num_prompt_tokens + num_output_tokens:]
        self._token_buf_len = min(self._token_buf_len, self.num_tokens)

    def token_array(self) -> np.ndarray:
        """All tokens as an int32 array (a view of a buffer that grows by doubling, so a
        request's context is converted once, not at every step)."""
        n, buf, have = self.num_tokens, self._token_buf, self._token_buf_len
        if buf is None or len(buf) < n:
            grown = np.empty(max(2 * n, 64), np.int32)
            if buf is not None:
                grown[:have] = buf[:have]
            self._token_buf = buf = grown
        if have < n:
            buf[have:n] = self._all_token_ids[have:n]
            self._token_buf_len = n
        return buf[:n]

    # -- status -------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def __repr__(self) -> str:
        return (f"Request({self.req_id!r}, {self.status.name}, tokens={self.num_tokens} "
                f"(prompt {self.num_prompt_tokens}), computed={self.num_computed_tokens})")
