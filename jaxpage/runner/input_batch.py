"""Persistent host-side request state and the packed int32 buffer sent to the device each step.

The runner learns a request once (``NewRequestData``) and afterwards only diffs, so per-request
token ids and block-table rows live in preallocated numpy arrays indexed by a slot. Each step
fills one flat int32 buffer with every array the jitted step needs and ships it in a single
host-to-device transfer; the step slices it back apart at static offsets (``PackedLayout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxpage.engine.scheduler_output import SchedulerOutput
from jaxpage.sampling_params import SamplingParams


# Every array in the packed buffer starts at a multiple of this many int32s (256 bytes). XLA
# hands a kernel a contiguous slice of the buffer as a view at its offset, and Mosaic GPU's
# custom call rejects an input that is not 256-byte aligned ("Input buffer 0 is not 256-byte
# aligned": the block tables, at 3 T int32s, in buckets of T = 16 or 32, or any T not a
# multiple of 64). NOTES.md, session 17.
PACK_ALIGN = 64


@dataclass(frozen=True)
class PackedLayout:
    """Offsets of each array inside the packed buffer of a (T, R) bucket; each array starts
    ``PACK_ALIGN``-aligned."""

    num_tokens: int  # T
    num_reqs: int  # R
    pages_per_req: int  # Pmax
    # L, the rows of logits the step returns: one per request (0 means R), or with speculative
    # decoding one per position a request samples (its last token and each draft).
    num_logits: int = 0

    @property
    def logits_rows(self) -> int:
        return self.num_logits or self.num_reqs

    def sizes(self) -> dict[str, int]:
        t, r = self.num_tokens, self.num_reqs
        return dict(input_ids=t, positions=t, slot_mapping=t, block_tables=r * self.pages_per_req,
                    seq_lens=r, query_start_loc=r + 1, num_seqs=1,
                    logits_indices=self.logits_rows, placeholder_slots=t)

    def offsets(self) -> dict[str, int]:
        """Where each array starts: the sizes before it, each rounded up to ``PACK_ALIGN``."""
        out, off = {}, 0
        for name, size in self.sizes().items():
            out[name] = off
            off += -(-size // PACK_ALIGN) * PACK_ALIGN
        return out

    @property
    def total(self) -> int:
        name, size = list(self.sizes().items())[-1]
        return self.offsets()[name] + size

    def unpack(self, buf):
        """Splits a packed buffer (numpy or jax) into named arrays (static slices)."""
        sizes = self.sizes()
        out = {name: buf[off:off + sizes[name]] for name, off in self.offsets().items()}
        out["block_tables"] = out["block_tables"].reshape(self.num_reqs, self.pages_per_req)
        return out


@dataclass
class CachedRequestState:
    req_id: str
    slot: int
    num_prompt_tokens: int
    sampling_params: SamplingParams
    seed: int
    num_tokens: int  # tokens known (prompt + output); ids in InputBatch.token_ids[slot]
    num_blocks: int
    num_computed_tokens: int
    # Tokens sampled by dispatched steps whose ids are on the device only (async scheduling):
    # the sampler keeps the last one per slot, and the next step reads its input id there.
    num_pending: int = 0
    grammar: Any = None  # structured outputs (``NewRequestData.grammar``)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens


def packing_order(num_scheduled: dict[str, int]) -> list[str]:
    """The step's requests in the order their tokens are packed: chunks of several tokens
    first, those whose length is a multiple of 8 ahead of the rest, then single tokens. So as
    many chunks as possible start on an 8-row boundary, where the Hopper attention kernel
    copies their queries straight into its swizzled tiles (docs/benchmarks/NOTES.md, eleventh
    pass: the benchmark's prefill chunks 7% faster there). The order changes no token: each
    row samples the same whatever its position (``sampler.py``)."""
    return sorted(num_scheduled, key=lambda r: (num_scheduled[r] == 1, num_scheduled[r] % 8 != 0))


class InputBatch:
    """Slot-indexed staging arrays for up to ``max_num_reqs`` live requests."""

    def __init__(self, max_num_reqs: int, max_model_len: int, pages_per_req: int, page_size: int):
        self.max_num_reqs = max_num_reqs
        self.page_size = page_size
        self.pages_per_req = pages_per_req
        self.token_ids = np.zeros((max_num_reqs, max_model_len), np.int32)
        self.block_table = np.zeros((max_num_reqs, pages_per_req), np.int32)
        self.requests: dict[str, CachedRequestState] = {}
        self._free_slots = list(range(max_num_reqs - 1, -1, -1))

    def update(self, so: SchedulerOutput) -> None:
        """Applies one step's diffs: drop finished/preempted, add new, extend cached."""
        for req_id in so.finished_req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None:
                self._free_slots.append(state.slot)
        for new in so.scheduled_new_reqs:
            if new.req_id in self.requests:  # resumed after preemption without a finish notice
                self._free_slots.append(self.requests.pop(new.req_id).slot)
            slot = self._free_slots.pop()
            n, b = len(new.all_token_ids), len(new.block_ids)
            self.token_ids[slot, :n] = new.all_token_ids
            self.block_table[slot, :b] = new.block_ids
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, slot, new.num_prompt_tokens, new.sampling_params, new.seed, n, b,
                new.num_computed_tokens, grammar=new.grammar)
        cached = so.scheduled_cached_reqs
        for req_id, new_tokens, new_blocks, num_computed in zip(
                cached.req_ids, cached.new_token_ids, cached.new_block_ids, cached.num_computed_tokens):
            state = self.requests[req_id]
            if new_tokens:
                self.token_ids[state.slot, state.num_tokens:state.num_tokens + len(new_tokens)] = new_tokens
                state.num_tokens += len(new_tokens)
                state.num_pending = max(state.num_pending - len(new_tokens), 0)
            if new_blocks:
                self.block_table[state.slot, state.num_blocks:state.num_blocks + len(new_blocks)] = new_blocks
                state.num_blocks += len(new_blocks)
            state.num_computed_tokens = num_computed

    def prepare(self, so: SchedulerOutput, req_ids: list[str], layout: PackedLayout) -> np.ndarray:
        """Fills the packed int32 buffer for ``req_ids`` (batch order) in ``layout``'s bucket.

        Padding tokens point at slot 0..S-1 of the null page 0; padding request rows have
        seq_len 0 and an all-zero block table. A position past the tokens the host knows (the
        token a step in flight samples) gets ``placeholder_slots`` = its slot + 1: the step
        reads its id from the sampler's device-side record (0: the id in ``input_ids``).
        A request's drafts (speculative decoding) are staged past its known tokens, where the
        next step's tokens overwrite them, and each of its last 1 + drafts positions gets a
        logits row.
        """
        buf = np.zeros(layout.total, np.int32)
        a = layout.unpack(buf)  # views into buf
        slots = np.array([self.requests[r].slot for r in req_ids], np.int64)
        counts = np.array([so.num_scheduled_tokens[r] for r in req_ids], np.int64)
        starts = np.array([self.requests[r].num_computed_tokens for r in req_ids], np.int64)
        spec = so.scheduled_spec_decode_tokens
        num_drafts = (np.array([len(spec.get(r, ())) for r in req_ids], np.int64) if spec
                      else np.zeros(len(req_ids), np.int64))
        for r in spec:
            state = self.requests[r]
            self.token_ids[state.slot, state.num_tokens:state.num_tokens + len(spec[r])] = spec[r]
        num_reqs, num_tokens = len(req_ids), int(counts.sum())
        qsl = np.zeros(num_reqs + 1, np.int64)
        np.cumsum(counts, out=qsl[1:])
        # Per-token request index and position, vectorized.
        tok_req = np.repeat(np.arange(num_reqs), counts)  # (t,)
        positions = starts[tok_req] + (np.arange(num_tokens) - qsl[:-1][tok_req])  # (t,)
        a["input_ids"][:num_tokens] = self.token_ids[slots[tok_req], positions]
        known = np.array([self.requests[r].num_tokens for r in req_ids], np.int64) + num_drafts
        a["placeholder_slots"][:num_tokens] = np.where(positions >= known[tok_req],
                                                       slots[tok_req] + 1, 0)
        a["positions"][:num_tokens] = positions
        pages = self.block_table[slots[tok_req], positions // self.page_size]
        a["slot_mapping"][:num_tokens] = pages * self.page_size + positions % self.page_size
        a["slot_mapping"][num_tokens:] = np.arange(layout.num_tokens - num_tokens) % self.page_size
        a["block_tables"][:num_reqs] = self.block_table[slots]
        a["seq_lens"][:num_reqs] = starts + counts
        a["query_start_loc"][:num_reqs + 1] = qsl
        a["query_start_loc"][num_reqs + 1:] = num_tokens
        a["num_seqs"][0] = num_reqs
        if not spec:
            a["logits_indices"][:num_reqs] = qsl[1:] - 1
            return buf
        rows = 1 + num_drafts  # logits rows per request: its last position and each draft's
        row_start = np.repeat(np.cumsum(rows) - rows, rows)
        a["logits_indices"][:int(rows.sum())] = (np.repeat(qsl[1:] - rows, rows)
                                                 + np.arange(int(rows.sum())) - row_start)
        return buf
