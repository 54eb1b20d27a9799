"""Sampling parameters with vLLM's names and defaults, validated in one place.

Every front end (offline ``LLM``, the HTTP server, the CLI) builds a :class:`SamplingParams`
and the engine calls :meth:`SamplingParams.verify` against the model before anything is
allocated, so a bad request fails fast with a clear ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

# Fields a model's generation_config.json may set as its sampling defaults (vLLM's rule).
GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# Caps from shared/RELIABILITY.md: bounded everything.
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_LOGIT_BIAS = 1024
MAX_GRAMMAR_CHARS = 1 << 16  # a schema, regex or grammar (its text, or a schema's JSON)
MAX_CHOICES = 1024


@dataclass
class StructuredOutputsParams:
    """Constrains the output to a language (vLLM's ``StructuredOutputsParams``); exactly one of
    ``json``, ``regex``, ``choice``, ``grammar`` or ``json_object`` is set.

    Args:
        json: a JSON schema (dict, or its JSON text): the output is one JSON value it accepts.
        regex: the output matches this regular expression (Rust ``regex`` syntax, anchored).
        choice: the output is exactly one of these strings.
        grammar: a context-free grammar in Lark syntax (llguidance's dialect; GBNF is turned
            into it when it reads as GBNF: ``root ::= ...``).
        json_object: any JSON object (OpenAI's ``response_format={"type": "json_object"}``).
        disable_any_whitespace: JSON without whitespace between tokens (compact output).
        whitespace_pattern: a regex for the whitespace JSON may hold between tokens.

    The engine compiles it for its tokenizer when the request is added (a bad schema, regex or
    grammar is a ``ValueError`` then) and masks every sampled token to what the language still
    allows; the request stops when the language is complete.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise param_error("structured_outputs",
                              "must set exactly one of json, regex, choice, grammar, json_object; "
                              f"got {kinds or 'none'}.")
        if self.json is not None:
            if not isinstance(self.json, (str, dict)):
                raise param_error("structured_outputs", "json must be a JSON schema (an object "
                                  f"or its JSON text), got {type(self.json).__name__}.")
            text = self.json if isinstance(self.json, str) else _json_text(self.json)
            if len(text) > MAX_GRAMMAR_CHARS:
                raise param_error("structured_outputs", f"json schema exceeds {MAX_GRAMMAR_CHARS} characters.")
        for name in ("regex", "grammar", "whitespace_pattern"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v or len(v) > MAX_GRAMMAR_CHARS):
                raise param_error("structured_outputs", f"{name} must be a non-empty string of at "
                                  f"most {MAX_GRAMMAR_CHARS} characters.")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or len(self.choice) > MAX_CHOICES
                    or not all(isinstance(c, str) and c for c in self.choice)
                    or sum(map(len, self.choice)) > MAX_GRAMMAR_CHARS):
                raise param_error("structured_outputs", f"choice must be a list of 1 to "
                                  f"{MAX_CHOICES} non-empty strings.")
            self.choice = list(self.choice)
        if self.json_object not in (None, True, False):
            raise param_error("structured_outputs", "json_object must be a boolean.")

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(k for k in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, k) not in (None, False))


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1


@dataclass
class SamplingParams:
    """How to sample one request; field names and defaults follow vLLM.

    Args:
        n: number of completions per prompt (they share the prompt's KV pages).
        temperature: 0 means greedy; must lie in [0, 2].
        top_p: nucleus mass in (0, 1].
        top_k: keep the k most likely tokens; -1 (or 0) disables.
        min_p: drop tokens whose probability is below ``min_p * p_max``; in [0, 1].
        presence_penalty, frequency_penalty: OpenAI-style, in [-2, 2].
        repetition_penalty: CTRL-style, > 0 (1 disables).
        seed: per-request seed; the same seed gives the same tokens whatever else is batched.
        stop: strings that end generation (not included unless ``include_stop_str_in_output``).
        stop_token_ids: token ids that end generation (included in the output ids).
        ignore_eos: keep generating past EOS.
        max_tokens: cap on generated tokens (None: up to the model's context limit).
        min_tokens: EOS and ``stop_token_ids`` are suppressed until this many tokens exist.
        logprobs: return this many top logprobs per generated token (plus the sampled one).
        prompt_logprobs: likewise for each prompt token.
        skip_special_tokens, spaces_between_special_tokens: detokenizer options.
        include_stop_str_in_output: keep the matched stop string in the text.
        logit_bias: token id -> bias added to its logit before sampling.
        structured_outputs: constrain the output to a JSON schema, regex, choice or grammar
            (``StructuredOutputsParams``).
        return_hidden: also return the final-normed hidden state of the last prompt token
            (``RequestOutput.hidden``; what ``LLM.embed`` pools). jaxpage's own field.
        truncate_prompt_tokens: keep only the prompt's last this many tokens (vLLM's left
            truncation; None keeps all).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    return_hidden: bool = False
    truncate_prompt_tokens: int | None = None
    # Filled by the engine: the model's EOS ids, so the scheduler needs no tokenizer.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._validate()
        self.all_stop_token_ids = set(self.stop_token_ids)

    # -- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        def bad(param: str, msg: str) -> ValueError:
            err = ValueError(f"{param} {msg}")
            err.param = param  # type: ignore[attr-defined]
            return err

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}.")
        if not _is_real(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", f"must be in [0, 2], got {self.temperature!r}.")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}.")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", f"must be -1 (disabled) or a positive integer, got {self.top_k!r}.")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p!r}.")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -2.0 <= v <= 2.0:
                raise bad(name, f"must be in [-2, 2], got {v!r}.")
        if not _is_real(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty!r}.")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise bad("seed", f"must be an integer, got {self.seed!r}.")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens!r}.")
        if self.truncate_prompt_tokens is not None and (
                not _is_int(self.truncate_prompt_tokens) or self.truncate_prompt_tokens < 1):
            raise bad("truncate_prompt_tokens",
                      f"must be an integer >= 1, got {self.truncate_prompt_tokens!r}.")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", f"must be >= 0, got {self.min_tokens!r}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens}).")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"must be in [0, {MAX_LOGPROBS}], got {v!r}.")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"allows at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}.")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_LEN:
                raise bad("stop", f"strings must be non-empty and at most {MAX_STOP_STRING_LEN} characters.")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise bad("stop_token_ids", f"must be non-negative integers, got {t!r}.")
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise bad("logit_bias", f"allows at most {MAX_LOGIT_BIAS} entries.")
            for v in self.logit_bias.values():
                if not math.isfinite(v) or not -100.0 <= v <= 100.0:
                    raise bad("logit_bias", f"values must be in [-100, 100], got {v!r}.")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                  StructuredOutputsParams):
            raise bad("structured_outputs", "must be a StructuredOutputsParams, got "
                      f"{type(self.structured_outputs).__name__}.")

    def verify(self, *, vocab_size: int, max_model_len: int, num_prompt_tokens: int) -> None:
        """Checks what depends on the model; raises ``ValueError`` naming the bad field."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise param_error("stop_token_ids", f"contains {t}, outside the vocabulary [0, {vocab_size}).")
        if self.logit_bias:
            for t in self.logit_bias:
                if not 0 <= t < vocab_size:
                    raise param_error("logit_bias", f"token id {t} is outside the vocabulary [0, {vocab_size}).")
        if num_prompt_tokens >= max_model_len:
            raise param_error(
                "prompt",
                f"has {num_prompt_tokens} tokens; the model's context length is {max_model_len}, "
                "leaving no room for output.", code="context_length_exceeded")
        if self.max_tokens is not None and num_prompt_tokens + self.max_tokens > max_model_len:
            raise param_error(
                "max_tokens",
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens + self.max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                f"{self.max_tokens} for the completion).", code="context_length_exceeded")

    # -- derived ------------------------------------------------------------------------------
    @property
    def sampling_type(self) -> SamplingType:
        return SamplingType.GREEDY if self.temperature < 1e-5 else SamplingType.RANDOM

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def clone(self) -> "SamplingParams":
        import copy
        return copy.deepcopy(self)


def param_error(param: str, msg: str, code: str | None = None) -> ValueError:
    err = ValueError(f"{param} {msg}" if not msg[:1].isupper() else msg)
    err.param = param  # type: ignore[attr-defined]
    err.code = code  # type: ignore[attr-defined]
    return err


def _json_text(obj: object) -> str:
    import json
    try:
        return json.dumps(obj)
    except (TypeError, ValueError) as e:
        raise param_error("structured_outputs", f"json schema is not JSON-serializable: {e}") from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each round asks for 2 x beam_width logprobs


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's beam search parameters.

    Args:
        beam_width: beams kept per prompt (1..``MAX_BEAM_WIDTH``).
        max_tokens: most output tokens of a beam.
        ignore_eos: keep extending beams past an end-of-sequence token.
        temperature: of the one-token step each round (0: greedy); the candidates are the top
            raw logprobs either way, plus the token that step samples.
        length_penalty: exponent of the length that divides a beam's cumulative logprob.
        include_stop_str_in_output: accepted for vLLM's signature; beam search has no stop
            strings, so it changes nothing.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.beam_width) or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}], "
                             f"got {self.beam_width!r}.")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if not _is_real(self.length_penalty):
            raise ValueError(f"length_penalty must be finite, got {self.length_penalty!r}.")
        # temperature: SamplingParams' own check, on the step each round runs
        SamplingParams(temperature=self.temperature, max_tokens=1)


@dataclass
class PoolingParams:
    """vLLM's pooling parameters for ``LLM.embed`` and ``/v1/embeddings``.

    Args:
        dimensions: keep the first this many dimensions (Matryoshka embeddings; None: all).
        normalize: scale the embedding to unit L2 norm (after ``dimensions``).
    """

    dimensions: int | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.dimensions is not None and (not _is_int(self.dimensions)
                                            or self.dimensions < 1):
            raise param_error("dimensions", f"must be an integer >= 1, got {self.dimensions!r}.")

    def check(self, hidden_size: int) -> None:
        """Refuses ``dimensions`` past the model's hidden size."""
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise param_error("dimensions", f"must be at most the model's hidden size "
                              f"{hidden_size}, got {self.dimensions}.")

    def pool(self, hidden) -> list[float]:
        """The embedding of a (D,) final hidden state (last-token pooling, as vLLM's default
        for decoder models)."""
        import numpy as np

        self.check(len(hidden))
        v = np.asarray(hidden, np.float64)[:self.dimensions]
        if self.normalize:
            v = v / max(float(np.linalg.norm(v)), 1e-12)
        return v.astype(np.float32).tolist()
