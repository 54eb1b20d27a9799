"""Structured outputs: a request's grammar (JSON schema, regex, choice, Lark/GBNF grammar)
compiled for the engine's tokenizer by llguidance, and the per-step token masks it allows.

Host side, no jax. The engine compiles a request's ``StructuredOutputsParams`` when the request
is added (a bad schema, regex or grammar is a ``ValueError`` then, naming ``structured_outputs``),
gives each request (each ``n > 1`` child) its own ``Grammar`` (a copy of a cached, compiled
one: a batch of requests with one schema compiles it once), and feeds it every token the
request commits. At dispatch the runner asks the sampling rows' grammars for bitmasks of the
tokens allowed next (``fill_bitmasks``: on llguidance's thread pool, while the device runs the
step's forward pass) (bit ``t % 32`` of word ``t // 32``, ceil(V / 32) int32 words per row);
the sampler sets every other logit to -inf before anything else (vLLM's order, so the
logprobs describe the constrained distribution). A request stops (finish reason "stop") when
its grammar can take no further token.

A mask needs every earlier token consumed. Under async scheduling (``LLMEngine._step_async``)
step N + 1's model is launched before step N is read back, as for any request, but its sampler
only after the host has fed step N's tokens to the grammars and computed the masks
(``ModelRunner.dispatch(defer_sampling=True)`` / ``launch_sampling``).
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from typing import Any, Iterable

import numpy as np

from ..sampling_params import StructuredOutputsParams, param_error


GRAMMAR_CACHE_SIZE = 128  # compiled constraints kept per engine (pristine matchers)
_executor = None
_executor_lock = threading.Lock()


def fill_bitmasks(mask: np.ndarray, entries: list[tuple]) -> None:
    """Writes each ``(row, grammar)``'s allowed-token bitmask into ``mask[row]`` ((R, W) int32,
    C-contiguous); several rows in parallel on llguidance's threads (the GIL released).

    An entry ``(row, grammar, drafted)`` with drafted tokens (speculative decoding) gets the
    mask after them: the grammar takes them, fills the row, and rolls them back; such rows go
    one by one, after the parallel ones (a grammar may own several rows)."""
    plain = []
    for row, grammar, *drafted in entries:
        if drafted and len(drafted[0]):
            grammar.fill_bitmask_after(mask, row, drafted[0])
        else:
            plain.append((row, grammar))
    entries = plain
    if not entries:
        return
    if len(entries) == 1:
        row, grammar = entries[0]
        grammar.fill_bitmask(mask, row)
        return
    global _executor
    from llguidance import LLExecutor
    from llguidance.numpy import fill_next_token_bitmask_par

    with _executor_lock:
        if _executor is None:
            _executor = LLExecutor()
    fill_next_token_bitmask_par(_executor, [(g._matcher, row) for row, g in entries], mask)


class Grammar:
    """One request's matcher: which tokens may come next, and the tokens it has taken."""

    def __init__(self, matcher: Any):
        self._matcher = matcher

    def copy(self) -> "Grammar":
        return Grammar(self._matcher.deep_copy())

    def fill_bitmask(self, mask: np.ndarray, row: int) -> None:
        """Writes the allowed-token bitmask into ``mask[row]`` ((R, W) int32, C-contiguous)."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, mask, row)

    def fill_bitmask_after(self, mask: np.ndarray, row: int, tokens: list[int]) -> None:
        """``fill_bitmask`` as if ``tokens`` had been taken (drafts); the state is unchanged
        after. If the grammar refuses one of them, the row is unreachable (its sample counts
        only when every earlier draft was sampled, under its mask) and allows every token."""
        m = self._matcher
        if m.validate_tokens(tokens) < len(tokens):
            mask[row] = -1
            return
        if not m.consume_tokens(tokens):
            raise RuntimeError(f"grammar refused validated drafts: {m.get_error()[:200]}")
        self.fill_bitmask(mask, row)
        m.rollback(len(tokens))

    def forced_tokens(self, limit: int) -> list[int]:
        """Tokens the grammar forces next (llguidance's fast-forward tokens), at most
        ``limit``: drafts that plain decoding makes too, whenever the model's tokenization of
        the forced text is the grammar's."""
        if limit <= 0 or self._matcher.is_stopped():
            return []
        return [int(t) for t in self._matcher.compute_ff_tokens()[:limit]]

    def accept(self, token_ids: Iterable[int]) -> bool:
        """Consumes committed tokens; False (the matcher then stays in error) if the grammar
        does not allow one of them."""
        return all(self._matcher.consume_token(int(t)) for t in token_ids)

    @property
    def terminated(self) -> bool:
        """The grammar takes no further token (the request is done)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error() if self._matcher.is_error() else ""


class GrammarCompiler:
    """Compiles ``StructuredOutputsParams`` for one tokenizer (its llguidance view is built on
    first use: ~1 s for a 128 K vocabulary)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(int(t) for t in eos_token_ids)
        self._ll_tokenizer = None
        self._cache: OrderedDict[str, Any] = OrderedDict()  # key -> pristine matcher
        # The server validates requests on its own thread while the engine's thread adds them.
        self._lock = threading.Lock()

    def _tokenizer(self):
        if self._ll_tokenizer is None:
            import llguidance

            backend = getattr(self._hf_tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise param_error("structured_outputs", "structured outputs need a fast (Rust) "
                                  "tokenizer; this model's is "
                                  f"{type(self._hf_tokenizer).__name__}.")
            backend = copy.copy(backend)  # the matcher tokenizes nothing: no padding, truncation
            backend.no_padding()
            backend.no_truncation()
            self._ll_tokenizer = llguidance.LLTokenizer(
                backend.to_str(), n_vocab=self.vocab_size,
                eos_token=self._eos or self._hf_tokenizer.eos_token_id)
        return self._ll_tokenizer

    @staticmethod
    def grammar_text(so: StructuredOutputsParams) -> str:
        """llguidance's grammar for the constraint (not yet checked)."""
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import any_to_lark

        kind = so.kind
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else so.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise param_error("structured_outputs", f"json schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise param_error("structured_outputs", "json schema must be a JSON object.")
            options: dict[str, Any] = {"whitespace_flexible": not so.disable_any_whitespace}
            if so.whitespace_pattern is not None:
                options["whitespace_pattern"] = so.whitespace_pattern
            try:
                return LLMatcher.grammar_from_json_schema(schema, defaults=options)
            except ValueError as e:
                raise param_error("structured_outputs", f"json schema: {e}") from None
        if kind == "regex":
            return LLMatcher.grammar_from_regex(so.regex)
        if kind == "choice":  # Lark string literals read JSON's escapes
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in so.choice))
        try:
            return LLMatcher.grammar_from_lark(any_to_lark(so.grammar))
        except Exception as e:  # noqa: BLE001 - the GBNF reader's own errors
            raise param_error("structured_outputs", f"grammar: {e}") from None

    def compile(self, so: StructuredOutputsParams) -> Grammar:
        """A fresh matcher for ``so``; ``ValueError`` (param ``structured_outputs``) if the
        schema, regex or grammar does not compile. Compiled constraints are cached (LRU)."""
        key = json.dumps([so.kind, so.json, so.regex, so.choice, so.grammar,
                          so.disable_any_whitespace, so.whitespace_pattern], sort_keys=True)
        with self._lock:
            pristine = self._cache.get(key)
            if pristine is None:
                pristine = self._compile(so)
                self._cache[key] = pristine
                if len(self._cache) > GRAMMAR_CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            return Grammar(pristine.deep_copy())

    def _compile(self, so: StructuredOutputsParams) -> Any:
        from llguidance import LLMatcher

        grammar = self.grammar_text(so)
        tokenizer = self._tokenizer()
        message = LLMatcher.validate_grammar(grammar, tokenizer)
        if message and not message.startswith("WARNING"):
            raise param_error("structured_outputs", f"{so.kind} does not compile: "
                              f"{message.strip()[:2000]}")
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise param_error("structured_outputs", f"{so.kind} does not compile: "
                              f"{matcher.get_error()[:2000]}")
        return matcher
