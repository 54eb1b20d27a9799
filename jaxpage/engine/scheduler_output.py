"""The contract between the scheduler (host) and the model runner (device side).

New requests carry their full data once; requests already known to the runner carry only
what changed since the last step (vLLM v1's convention). The runner keeps persistent per-request
state (token ids, block table row) keyed by ``req_id`` and drops it on ``finished_req_ids``.

Token ranges of one running request at a step::

    |<------------- all_token_ids (prompt + output so far) ------------>|
    |<--- num_computed_tokens (KV in pages) --->|<- num_scheduled ->|
                                                 these rows go in the batch; if the range reaches
                                                 the end of all_token_ids the runner samples one
                                                 new token for the request, otherwise (a partial
                                                 prefill chunk) it samples nothing for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (or is resuming after preemption: state was dropped)."""

    req_id: str
    # Every token known so far: prompt, plus outputs already generated if resumed after preemption.
    all_token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    # Per-request seed for the on-device PRNG (the engine draws one when the user gave none).
    seed: int
    # Page ids covering at least num_computed_tokens + num_scheduled_tokens tokens.
    block_ids: list[int]
    # Tokens whose KV is already in pages (prefix-cache hit); the batch starts after them.
    num_computed_tokens: int
    # Structured outputs: the request's grammar (``structured_output.Grammar``), which the
    # runner asks for the mask of allowed tokens whenever the request samples.
    grammar: Any = None


@dataclass
class CachedRequestData:
    """Requests the runner already holds: parallel lists, one entry per request."""

    req_ids: list[str] = field(default_factory=list)
    # Token ids appended since the runner last saw the request (the token sampled last step).
    new_token_ids: list[list[int]] = field(default_factory=list)
    # Pages appended to the request's block table this step.
    new_block_ids: list[list[int]] = field(default_factory=list)
    # Tokens with KV in pages BEFORE this step; the step computes
    # [num_computed_tokens, num_computed_tokens + num_scheduled_tokens[req_id]).
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    # req_id -> tokens to run this step; its keys are exactly the requests in this batch.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests finished, aborted or preempted since the last step: the runner forgets them.
    finished_req_ids: set[str]
    # Speculative decoding: req_id -> draft tokens that follow its last token in this step
    # (num_scheduled_tokens counts them); the runner samples each position and returns the
    # drafts it kept plus its own next token.
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class Logprobs:
    """Logprobs of one position: the chosen token first, then the top-k (OpenAI style)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]  # 1-based rank of each token; the chosen one's true rank first


@dataclass
class ModelRunnerOutput:
    """What one step produced, for requests in the batch that reached the end of their tokens."""

    # req_id -> sampled token ids: one, or with drafts the kept drafts and one more.
    sampled_token_ids: dict[str, list[int]]
    # req_id -> logprobs of each sampled token (only for requests that asked for logprobs).
    logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)
    # req_id -> logprobs of the prompt positions computed in this step (prompt_logprobs).
    prompt_logprobs: dict[str, list[Logprobs | None]] = field(default_factory=dict)
    # req_id -> error message for requests that failed inside the step (finish_reason "error").
    errors: dict[str, str] = field(default_factory=dict)
    # req_id -> (D,) final hidden state of its last prompt token (``return_hidden`` requests
    # at the step that sampled their first token).
    hidden: dict[str, Any] = field(default_factory=dict)
