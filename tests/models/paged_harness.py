"""A minimal stand-in for the engine's runner, for model tests: pages, metadata, one jitted step.

Each step packs the scheduled tokens of several requests back to back, pads them to a fixed
bucket (``max_num_tokens`` rows, ``max_num_seqs`` request slots) so every step reuses one
compiled executable, and runs the model over a NaN-poisoned paged pool whose pages are handed
out in shuffled order::

    tokens:  |-- req a: 5 new --|-- req b: 1 --|-- req c: 3 --|-- padding (slot in page 0) --|
    query_start_loc = [0, 5, 6, 9, 9, ...]      seq_lens = [ctx_a, ctx_b, ctx_c, 0, ...]
    block_tables[i] = shuffled page ids of request i, then 0 (the null page)

Any read of a page slot past ``seq_lens`` (or a padding row leaking) turns logits into NaN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpage import kernels_pallas
from jaxpage.models.attention import AttentionMetadata


@dataclasses.dataclass
class _Request:
    token_ids: list[int]
    num_computed: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)


class PagedRunner:
    def __init__(self, model: nnx.Module, *, page_size: int = 4, num_pages: int = 128,
                 max_num_tokens: int = 64, max_num_seqs: int = 8, max_pages_per_seq: int = 16,
                 kv_dtype=jnp.float32, seed: int = 0, token_buckets: tuple[int, ...] = ()):
        cfg = model.config
        self.page_size = page_size
        self.max_num_tokens, self.max_num_seqs = max_num_tokens, max_num_seqs
        # Each step pads to the smallest bucket that fits (one compiled executable per bucket).
        self.token_buckets = sorted({*token_buckets, max_num_tokens})
        self.max_pages_per_seq = max_pages_per_seq
        shape = kernels_pallas.kv_cache_shape(num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_pages = [jnp.full(shape, jnp.nan, kv_dtype) for _ in range(cfg.num_hidden_layers)]
        rng = np.random.default_rng(seed)
        self.free_pages = [int(p) for p in rng.permutation(np.arange(1, num_pages))]  # 0 = null
        self.requests: dict[str, _Request] = {}
        graphdef, state = nnx.split(model)

        @jax.jit
        def step(state, input_ids, positions, kv_pages, md):
            m = nnx.merge(graphdef, state)
            hidden, kv_pages = m(input_ids, positions, kv_pages, md)  # (T, D)
            return m.compute_logits(hidden), kv_pages  # (T, V)

        self._step = lambda *args: step(state, *args)

    def add_request(self, req_id: str, token_ids: list[int]) -> None:
        self.requests[req_id] = _Request(list(token_ids))

    def append_token(self, req_id: str, token_id: int) -> None:
        self.requests[req_id].token_ids.append(int(token_id))

    def step(self, schedule: dict[str, int]) -> dict[str, np.ndarray]:
        """Runs ``schedule`` {req_id: num_new_tokens}; returns {req_id: (num_new, V) logits}."""
        S, R = self.page_size, self.max_num_seqs
        assert len(schedule) <= R and sum(schedule.values()) <= self.max_num_tokens
        T = next(b for b in self.token_buckets if b >= sum(schedule.values()))
        input_ids = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slot_mapping = np.arange(T, dtype=np.int32) % S  # padding rows: slots of the null page
        block_tables = np.zeros((R, self.max_pages_per_seq), np.int32)
        seq_lens = np.zeros(R, np.int32)
        query_start_loc = np.zeros(R + 1, np.int32)
        row = 0
        for i, (req_id, num_new) in enumerate(schedule.items()):
            req = self.requests[req_id]
            start, end = req.num_computed, req.num_computed + num_new
            assert end <= len(req.token_ids)
            while len(req.pages) * S < end:
                req.pages.append(self.free_pages.pop())
            pos = np.arange(start, end)
            input_ids[row:row + num_new] = req.token_ids[start:end]
            positions[row:row + num_new] = pos
            slot_mapping[row:row + num_new] = np.asarray(req.pages)[pos // S] * S + pos % S
            block_tables[i, :len(req.pages)] = req.pages
            seq_lens[i] = end
            row += num_new
            query_start_loc[i + 1:] = row
            req.num_computed = end
        md = AttentionMetadata(
            slot_mapping=jnp.asarray(slot_mapping), block_tables=jnp.asarray(block_tables),
            seq_lens=jnp.asarray(seq_lens), query_start_loc=jnp.asarray(query_start_loc),
            num_seqs=jnp.asarray([len(schedule)], jnp.int32), attention_backend="reference")
        logits, self.kv_pages = self._step(jnp.asarray(input_ids), jnp.asarray(positions),
                                           self.kv_pages, md)
        logits = np.asarray(logits)
        out, row = {}, 0
        for req_id, num_new in schedule.items():
            out[req_id] = logits[row:row + num_new]
            row += num_new
        return out


def prefill_and_decode(runner: PagedRunner, prompts: list[list[int]], prefill_steps: list[dict[int, int]],
                       num_decode: int) -> tuple[list[np.ndarray], list[list[int]], list[np.ndarray]]:
    """Prefills the prompts with the given chunked schedule, then decodes greedily, all batched.

    Args:
        prompts: token ids per request.
        prefill_steps: per step, {request index: number of prompt tokens}; must cover every prompt.
        num_decode: greedy tokens per request (one per request per step).

    Returns:
        (per request: (len(prompt), V) prompt logits; per request: generated token ids;
         per request: (num_decode, V) logits that chose each generated token).
    """
    for i, p in enumerate(prompts):
        runner.add_request(str(i), p)
    prompt_logits: list[list[np.ndarray]] = [[] for _ in prompts]
    for schedule in prefill_steps:
        out = runner.step({str(i): n for i, n in schedule.items()})
        for i in schedule:
            prompt_logits[i].append(out[str(i)])
    prompt_logits_cat = [np.concatenate(chunks) for chunks in prompt_logits]
    assert all(len(lg) == len(p) for lg, p in zip(prompt_logits_cat, prompts)), "schedule must cover prompts"
    last = [lg[-1] for lg in prompt_logits_cat]
    generated: list[list[int]] = [[] for _ in prompts]
    decode_logits: list[list[np.ndarray]] = [[] for _ in prompts]
    for step in range(num_decode):
        for i in range(len(prompts)):
            tok = int(np.argmax(last[i]))
            generated[i].append(tok)
            decode_logits[i].append(last[i])
            runner.append_token(str(i), tok)
        if step == num_decode - 1:
            break
        out = runner.step({str(i): 1 for i in range(len(prompts))})
        last = [out[str(i)][0] for i in range(len(prompts))]
    return prompt_logits_cat, generated, [np.stack(d) for d in decode_logits]


def chunked_prefill_schedule(prompt_lens: list[int], max_num_tokens: int,
                             max_num_seqs: int) -> list[dict[int, int]]:
    """vLLM's rule in miniature: each step fills the token budget, oldest request first."""
    remaining, steps = list(prompt_lens), []
    while any(remaining):
        budget, step = max_num_tokens, {}
        for i, left in enumerate(remaining):
            if left and budget and len(step) < max_num_seqs:
                step[i] = min(left, budget)
                remaining[i] -= step[i]
                budget -= step[i]
        steps.append(step)
    return steps
