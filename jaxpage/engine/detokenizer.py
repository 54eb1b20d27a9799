"""Incremental detokenization and stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character may span tokens) and for
SentencePiece (a token's leading space depends on its neighbours). Like vLLM, we keep the token
strings and two offsets, and decode a short window each step::

    tokens:   ... | t[prefix_offset] ... t[read_offset-1] | t[read_offset] ... t[-1] |
                  |<------ already emitted (context) ---->|<---- not yet emitted ---->|
    new text = decode(window) minus decode(context), unless it ends in an incomplete
    character (U+FFFD), in which case nothing is emitted and the window grows next step.

Stop strings are searched in the text around the new characters, so a stop string that spans
token boundaries is found; the text is cut before it (or after it with
``include_stop_str_in_output``). While a request runs, the last ``max(len(stop)) - 1``
characters are held back from the reported text, so streamed text never has to be retracted.
"""

from __future__ import annotations

from typing import Any

from ..sampling_params import SamplingParams

# Prompt tokens kept as decoding context for the first output tokens (vLLM's value).
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5


class TokenizerInfo:
    """An HF-like tokenizer plus what the detokenizer looks up once rather than per token.

    The tokenizer needs ``convert_ids_to_tokens(ids, skip_special_tokens=...)`` and
    ``convert_tokens_to_string(tokens)``; ``get_added_vocab``, ``all_special_tokens`` and
    ``is_fast`` are used when present.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
        # Fast tokenizers decode added tokens themselves; slow ones need them kept apart.
        self.added_tokens = set() if getattr(tokenizer, "is_fast", False) else set(added)
        self.special_tokens = set(getattr(tokenizer, "all_special_tokens", ()) or ())

    def ids_to_tokens(self, token_ids: list[int], skip_special_tokens: bool) -> list[str]:
        tokens = self.tokenizer.convert_ids_to_tokens(token_ids,
                                                      skip_special_tokens=skip_special_tokens)
        if isinstance(tokens, str):
            tokens = [tokens]
        return [t for t in tokens if t is not None]  # ids past the tokenizer's vocab: no text

    def tokens_to_string(self, tokens: list[str], skip_special_tokens: bool,
                         spaces_between_special_tokens: bool) -> str:
        if not tokens:
            return ""
        if not self.added_tokens:
            return self.tokenizer.convert_tokens_to_string(tokens)
        sub_texts: list[str] = []
        current: list[str] = []
        for token in tokens:
            if skip_special_tokens and token in self.special_tokens:
                continue
            if token in self.added_tokens:
                if current:
                    sub_texts.append(self.tokenizer.convert_tokens_to_string(current))
                    current = []
                sub_texts.append(token)
            else:
                current.append(token)
        if current:
            sub_texts.append(self.tokenizer.convert_tokens_to_string(current))
        return (" " if spaces_between_special_tokens else "").join(sub_texts)


def check_stop_strings(text: str, new_char_count: int, stop: list[str],
                       include_in_output: bool) -> tuple[str, int] | None:
    """Finds the earliest stop string that overlaps the last ``new_char_count`` characters.

    Returns:
        (stop string, length to truncate the text to, or -1 for no truncation), or None.
    """
    if not new_char_count or not stop:
        return None
    best: tuple[str, int] | None = None
    for s in stop:
        index = text.find(s, max(0, len(text) - new_char_count - len(s) + 1))
        if index != -1 and (best is None or index < best[1]):
            best = (s, index)
    if best is None:
        return None
    s, index = best
    if include_in_output:
        index += len(s)
        if index >= len(text):
            return s, -1
    return s, index


class IncrementalDetokenizer:
    """Text of one request's output, built token by token.

    Args:
        tokenizer: a :class:`TokenizerInfo`, a raw HF-like tokenizer, or None (no text).
        prompt_token_ids: the prompt; its tail is decoding context for the first outputs.
        params: the request's sampling parameters (stop strings, special-token options).
    """

    def __init__(self, tokenizer: TokenizerInfo | Any | None, prompt_token_ids: list[int],
                 params: SamplingParams):
        if tokenizer is not None and not isinstance(tokenizer, TokenizerInfo):
            tokenizer = TokenizerInfo(tokenizer)
        self.tokenizer = tokenizer
        self.stop = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.skip_special_tokens = params.skip_special_tokens
        self.spaces_between_special_tokens = params.spaces_between_special_tokens
        self.stop_buffer_length = (max(map(len, self.stop)) - 1
                                   if self.stop and not self.include_stop_str_in_output else 0)
        self.output_text = ""
        self.tokens: list[str] = []
        self.prefix_offset = self.read_offset = 0
        if tokenizer is not None:
            context = prompt_token_ids[-(INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET + 2):]
            self.tokens = tokenizer.ids_to_tokens(list(context), self.skip_special_tokens)
            self.prefix_offset = max(len(self.tokens) - INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET, 0)
            self.read_offset = len(self.tokens)

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        """Decodes new output tokens and checks stop strings.

        Args:
            new_token_ids: tokens sampled this step.
            stop_terminated: the last of them is a stop token (EOS or ``stop_token_ids``); its
                text is left out unless ``include_stop_str_in_output``.

        Returns:
            The stop string that matched (the text is then cut), or None.
        """
        if self.tokenizer is None or not new_token_ids:
            return None
        if stop_terminated and not self.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        length_before = len(self.output_text)
        for token_id in new_token_ids:
            self.output_text += self._decode_next(token_id)
        match = check_stop_strings(self.output_text, len(self.output_text) - length_before,
                                   self.stop, self.include_stop_str_in_output)
        if match is None:
            return None
        stop_str, truncate_to = match
        if truncate_to != -1:
            self.output_text = self.output_text[:truncate_to]
        return stop_str

    def _decode_next(self, token_id: int) -> str:
        tok = self.tokenizer
        self.tokens.extend(tok.ids_to_tokens([token_id], self.skip_special_tokens))
        args = (self.skip_special_tokens, self.spaces_between_special_tokens)
        prefix_text = tok.tokens_to_string(self.tokens[self.prefix_offset:self.read_offset], *args)
        new_text = tok.tokens_to_string(self.tokens[self.prefix_offset:], *args)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing new): wait for the next token
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        return new_text[len(prefix_text):]

    def get_output_text(self, finished: bool) -> str:
        """The text to report: everything once finished, else all but the stop-string buffer."""
        if finished or not self.stop_buffer_length:
            return self.output_text
        return self.output_text[:max(len(self.output_text) - self.stop_buffer_length, 0)]
