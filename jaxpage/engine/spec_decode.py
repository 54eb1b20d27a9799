"""Draft tokens for speculative decoding, proposed on the host (numpy only, no jax).

N-gram prompt lookup (vLLM's ``method="ngram"``): when the last n tokens of a request's
context occurred earlier in it, the tokens that followed that occurrence are a cheap guess at
what comes next. Summaries, edits, code and retrieval answers repeat their input often, and
there the guess is often right::

    context  ... the  cat  sat  on  the  mat  .  The  cat  sat | ?  ?  ?
                      ^^^^^^^^^              ^^^^^^^^^ last n = 2 tokens
                      earlier match -> drafts: on  the  mat

The step then runs the request's last token and the drafts together; the runner samples every
position as it would have one at a time and keeps the drafts up to the first disagreement, plus
the model's own token there (``runner/sampling.py``). The output is the one plain decoding gives.
"""

from __future__ import annotations

import numpy as np

from ..config import SpeculativeConfig


class NgramProposer:
    """Proposes up to ``num_speculative_tokens`` drafts from a request's own context.

    The longest n-gram in [``prompt_lookup_min``, ``prompt_lookup_max``] that ends the context
    and occurred before wins; among its occurrences the latest, whose continuation is the most
    recent evidence.
    """

    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, tokens: np.ndarray, max_drafts: int | None = None) -> list[int]:
        """Drafts following ``tokens`` (1-D int array: the request's whole context).

        Args:
            tokens: prompt + output so far.
            max_drafts: a cap below ``num_speculative_tokens`` (what the request's length
                limits leave); 0 or less proposes nothing.
        """
        k = self.k if max_drafts is None else min(self.k, max_drafts)
        L = len(tokens)
        if k <= 0 or L < self.min_n + 1:
            return []
        # Ends of earlier occurrences of the last token, latest first: position e < L - 1 with
        # tokens[e] == tokens[-1] ends a candidate match that has a token after it.
        ends = np.flatnonzero(tokens[:L - 1] == tokens[L - 1])[::-1]
        if ends.size == 0:
            return []
        # Extend every candidate backwards one token at a time; ``length`` counts how many of
        # the last tokens it matches (up to max_n).
        length = np.ones(ends.size, np.int64)
        alive = np.ones(ends.size, bool)
        for j in range(1, self.max_n):
            pos = ends - j
            ok = alive & (pos >= 0)
            ok[ok] = tokens[pos[ok]] == tokens[L - 1 - j]
            length += ok
            alive = ok
            if not alive.any():
                break
        best = int(length.max())
        if best < self.min_n:
            return []
        e = int(ends[np.argmax(length == best)])  # the latest among the longest
        return tokens[e + 1:e + 1 + k].tolist()
