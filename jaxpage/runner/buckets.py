"""Padded batch shapes: every step runs one of a few precompiled (tokens, requests) buckets."""

from __future__ import annotations

import bisect
from dataclasses import dataclass


def _bucket_sizes(lo: int, hi: int, gap: int = 0) -> list[int]:
    """lo, 2 lo, 4 lo, ... below hi, then hi; with ``gap``: from ``gap`` on, every multiple of
    it instead of doubling."""
    out, v = [], lo
    while v < hi:
        out.append(v)
        if gap and v >= gap:
            v += gap
        elif gap and 2 * v > gap:
            v = gap
        else:
            v *= 2
    out.append(hi)
    return out


@dataclass(frozen=True)
class Buckets:
    """Token buckets: powers of two from 16 up to ``max_num_batched_tokens`` (which is always
    one), or with ``token_padding_gap`` g > 0 powers of two up to g and then every multiple of g
    (as vLLM's TPU runner pads: a partly filled step pads to fewer rows, for more compiled
    buckets); request buckets: powers of two from ``min(8, max_num_seqs)`` up to
    ``max_num_seqs``.

    A step with ``t`` tokens of ``r`` requests pads to the smallest token bucket >= t and the
    smallest request bucket >= r. Since every request has at least one token (r <= t), only
    pairs with ``R <= T`` or R the first request bucket >= T can occur: ``pairs()`` lists those.
    """

    token_buckets: tuple[int, ...]
    req_buckets: tuple[int, ...]

    @classmethod
    def create(cls, max_num_batched_tokens: int, max_num_seqs: int,
               token_padding_gap: int = 0) -> "Buckets":
        tok = _bucket_sizes(min(16, max_num_batched_tokens), max_num_batched_tokens,
                             token_padding_gap)
        req = _bucket_sizes(min(8, max_num_seqs), max_num_seqs)
        return cls(tuple(tok), tuple(req))

    def pick(self, num_tokens: int, num_reqs: int) -> tuple[int, int]:
        """The (T, R) bucket for a step; raises if the step exceeds the largest bucket."""
        i = bisect.bisect_left(self.token_buckets, num_tokens)
        j = bisect.bisect_left(self.req_buckets, num_reqs)
        if i == len(self.token_buckets) or j == len(self.req_buckets):
            raise ValueError(f"step of {num_tokens} tokens / {num_reqs} requests exceeds the largest "
                             f"bucket ({self.token_buckets[-1]}, {self.req_buckets[-1]})")
        return self.token_buckets[i], self.req_buckets[j]

    def pairs(self) -> list[tuple[int, int]]:
        out = []
        for t in self.token_buckets:
            for r in self.req_buckets:
                if r <= t or r == self.req_buckets[min(bisect.bisect_left(self.req_buckets, t),
                                                       len(self.req_buckets) - 1)]:
                    out.append((t, r))
        return out
