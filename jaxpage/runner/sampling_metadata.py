"""Per-step sampling inputs: the device pytree, and the host-side numpy builder that fills it.

The runner calls :func:`build_sampling_metadata` once per step (numpy only), moves the result to
the device in its packed transfer, and hands it to :func:`jaxpage.runner.sampler.sample` inside a
jitted function. Every array has one row per request slot, padded to the step's ``R`` bucket;
padding rows are greedy with neutral parameters.

Compiled variants. The static fields below, plus the shapes of the padded arrays, form the jit
cache key of the sampler (per ``(R, V)`` bucket):

    all_greedy × has_top_k_top_p_min_p × has_penalties × has_logit_bias × max_num_logprobs
                  (only when not greedy)    (+ Lmax bucket)  (+ Bmax, Smax)  ∈ LOGPROBS_BUCKETS
    × has_token_mask (structured outputs)

The common case costs three variants: greedy, plain temperature sampling, and temperature with
top-k/top-p/min-p; logprobs at most triple that (0, 5, 20). Penalties add one variant per
power-of-two ``Lmax`` bucket (prompt + output length), logit_bias/min_tokens one per ``Bmax``
(``Smax`` stays 8 unless a request has more than 8 stop token ids). When a flag is off its
arrays shrink to width 1, so they never add shapes of their own.

Flags are monotone: turning one on (or growing a bucket) never changes a sampled token, only what
the step costs, because every transform is gated per row by that row's own parameters. A runner
that wants fewer executables may therefore pin flags on (``dataclasses.replace``); the sampler
tests check that this changes no token. Whether top-k/top-p take the fast path or the whole-row
search is decided on device (``lax.cond``), never by a variant. Jit the sampler on its own, apart
from the model step, so that its variants add to the token buckets rather than multiply them.

There is no ``all_random`` flag (vLLM has one): greedy rows inside a random batch cost one select
in the pass that takes the argmax anyway, so such a flag would double the variants for nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jaxpage.engine.scheduler_output import Logprobs
from jaxpage.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingType

# Top-logprob counts are padded up to one of these (0: no logprobs at all). A request asking
# for logprobs=0 (the sampled token's logprob only) gets the smallest non-zero bucket.
LOGPROBS_BUCKETS = (0, 5, MAX_LOGPROBS)
# Minimum widths of the padded id lists when their flag is on; wider lists round up to powers of 2.
MIN_STOP_IDS = 8          # Smax: stop ids suppressed under min_tokens (EOS + stop_token_ids)
MIN_LOGIT_BIAS = 8        # Bmax: logit_bias entries
MIN_PENALTY_TOKENS = 16   # Lmax: prompt + output token ids seen by the penalties
PAD_ID = -1               # pad of every id list; the sampler drops it before scattering


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingMetadata:
    """What the on-device sampler needs for one step; arrays padded to R request rows.

    Fields (R rows, V vocabulary):
        temperature: (R,) float32; 0 marks a greedy row.
        top_p: (R,) float32; 1 disables.
        top_k: (R,) int32 in [1, V]; V disables.
        min_p: (R,) float32; 0 disables.
        presence_penalties, frequency_penalties: (R,) float32; 0 disables.
        repetition_penalties: (R,) float32; 1 disables.
        seeds: (R, 2) uint32 threefry key data: (high, low) words of the request's 64-bit seed.
        output_pos: (R,) int32 tokens the request has generated so far; the PRNG key of a row is
            ``fold_in(key(seed), output_pos)``, never a function of the row index.
        suppress_stop_tokens: (R,) bool; True while the request has fewer than min_tokens outputs.
        stop_token_ids: (R, Smax) int32 EOS + stop_token_ids to suppress, PAD_ID padded.
        logit_bias_token_ids: (R, Bmax) int32, PAD_ID padded.
        logit_bias_values: (R, Bmax) float32 added to those logits.
        penalty_token_ids: (R, Lmax) int32 prompt then output token ids, PAD_ID padded.
        penalty_output_mask: (R, Lmax) bool; True where penalty_token_ids holds an output token.
        token_bitmask: (R, W) int32, W = ceil(V / 32): bit t % 32 of word t // 32 allows token
            t (structured outputs; every bit set in rows without a grammar); (R, 1) when off.
        all_greedy: static; every row is greedy: the sampler is one argmax.
        has_top_k_top_p_min_p: static; some random row filters its distribution.
        has_penalties: static; some row has presence/frequency/repetition penalties.
        has_logit_bias: static; some row has logit_bias entries or suppresses stop tokens
            (both are one sparse scatter into the logits).
        max_num_logprobs: static; width of the top-logprobs outputs, one of LOGPROBS_BUCKETS
            (0: no logprobs outputs at all).
        has_token_mask: static; some row's grammar masks its tokens (``token_bitmask``).
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    presence_penalties: jax.Array
    frequency_penalties: jax.Array
    repetition_penalties: jax.Array
    seeds: jax.Array
    output_pos: jax.Array
    suppress_stop_tokens: jax.Array
    stop_token_ids: jax.Array
    logit_bias_token_ids: jax.Array
    logit_bias_values: jax.Array
    penalty_token_ids: jax.Array
    penalty_output_mask: jax.Array
    token_bitmask: jax.Array
    all_greedy: bool = dataclasses.field(default=True, metadata=dict(static=True))
    has_top_k_top_p_min_p: bool = dataclasses.field(default=False, metadata=dict(static=True))
    has_penalties: bool = dataclasses.field(default=False, metadata=dict(static=True))
    has_logit_bias: bool = dataclasses.field(default=False, metadata=dict(static=True))
    max_num_logprobs: int = dataclasses.field(default=0, metadata=dict(static=True))
    has_token_mask: bool = dataclasses.field(default=False, metadata=dict(static=True))


@dataclass
class SamplingRow:
    """One request's sampling state at this step.

    Args:
        sampling_params: the request's parameters.
        seed: the request's 64-bit seed (the engine draws one when the user gave none; each of
            ``n > 1`` children needs its own).
        prompt_token_ids: read only when the request has penalties.
        output_token_ids: tokens generated so far; read only when the request has penalties.
        num_output_tokens: tokens generated so far, i.e. the output position being sampled;
            None means ``len(output_token_ids)`` (pass it when the host lags the device by a
            step under async scheduling).
        grammar: structured outputs: the row's grammar, for ``build_sampling_metadata``'s
            ``fill_token_masks`` (``structured_output.Grammar``).
        drafted: speculative decoding: the drafts this row samples after; its grammar's mask
            is the one after them.
    """

    sampling_params: SamplingParams
    seed: int
    prompt_token_ids: Sequence[int] | np.ndarray = ()
    output_token_ids: Sequence[int] | np.ndarray = ()
    num_output_tokens: int | None = None
    grammar: Any = None
    drafted: Sequence[int] = ()

    @property
    def output_pos(self) -> int:
        n = self.num_output_tokens
        return len(self.output_token_ids) if n is None else n


def build_sampling_metadata(
        rows: Sequence[SamplingRow], padded_num_reqs: int, vocab_size: int,
        fill_token_masks: Callable[[np.ndarray, list[tuple[int, Any]]], None] | None = None,
) -> SamplingMetadata:
    """Packs the rows of one step into numpy arrays (the caller moves them to the device).

    Args:
        rows: the requests that sample this step, in batch-row order.
        padded_num_reqs: R, the step's request bucket (>= len(rows)).
        vocab_size: V, the width of the logits.
        fill_token_masks: ``(mask, [(row, grammar, drafted), ...])`` writes those rows'
            allowed-token bitmasks (after the row's drafted tokens) into the (R, W) int32
            ``mask`` (``structured_output.fill_bitmasks``); needed when a row has a grammar.

    Returns:
        A SamplingMetadata of numpy arrays; rows past ``len(rows)`` are greedy and neutral.
    """
    num_reqs, R, V = len(rows), padded_num_reqs, vocab_size
    if num_reqs > R:
        raise ValueError(f"{num_reqs} rows do not fit padded_num_reqs={R}.")
    temperature = np.zeros(R, np.float32)
    top_p = np.ones(R, np.float32)
    top_k = np.full(R, V, np.int32)
    min_p = np.zeros(R, np.float32)
    presence = np.zeros(R, np.float32)
    frequency = np.zeros(R, np.float32)
    repetition = np.ones(R, np.float32)
    seeds = np.zeros((R, 2), np.uint32)
    output_pos = np.zeros(R, np.int32)
    suppress = np.zeros(R, bool)
    num_logprobs = -1
    for i, row in enumerate(rows):
        sp = row.sampling_params
        seed = int(row.seed) & 0xFFFF_FFFF_FFFF_FFFF
        seeds[i] = (seed >> 32, seed & 0xFFFF_FFFF)
        output_pos[i] = row.output_pos
        if sp.sampling_type == SamplingType.RANDOM:
            # Greedy rows keep neutral filters: they cannot move an argmax.
            temperature[i] = sp.temperature
            top_p[i] = sp.top_p
            top_k[i] = V if sp.top_k <= 0 else min(sp.top_k, V)
            min_p[i] = sp.min_p
        presence[i] = sp.presence_penalty
        frequency[i] = sp.frequency_penalty
        repetition[i] = sp.repetition_penalty
        suppress[i] = row.output_pos < sp.min_tokens and bool(sp.all_stop_token_ids)
        if sp.logprobs is not None:
            num_logprobs = max(num_logprobs, sp.logprobs)

    live = slice(0, num_reqs)
    has_logit_bias = any(r.sampling_params.logit_bias for r in rows) or bool(suppress.any())
    stop_ids, bias_ids, bias_values = _sparse_bias_arrays(rows, suppress, R, has_logit_bias)
    penalty_ids, output_mask = _penalty_arrays(rows, R)
    masked = [(i, r.grammar, r.drafted) for i, r in enumerate(rows) if r.grammar is not None]
    token_bitmask = np.full((R, mask_words(V) if masked else 1), -1, np.int32)
    if masked:
        if fill_token_masks is None:
            raise ValueError("rows with a grammar need fill_token_masks.")
        fill_token_masks(token_bitmask, masked)

    random = temperature[live] > 0
    return SamplingMetadata(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        presence_penalties=presence, frequency_penalties=frequency,
        repetition_penalties=repetition, seeds=seeds, output_pos=output_pos,
        suppress_stop_tokens=suppress, stop_token_ids=stop_ids,
        logit_bias_token_ids=bias_ids, logit_bias_values=bias_values,
        penalty_token_ids=penalty_ids, penalty_output_mask=output_mask,
        token_bitmask=token_bitmask,
        all_greedy=not random.any(),
        has_top_k_top_p_min_p=bool(np.any(random & ((top_k[live] < V) | (top_p[live] < 1.0)
                                                    | (min_p[live] > 0.0)))),
        has_penalties=any(r.sampling_params.has_penalties for r in rows),
        has_logit_bias=has_logit_bias,
        max_num_logprobs=logprobs_bucket(num_logprobs),
        has_token_mask=bool(masked),
    )


def mask_words(vocab_size: int) -> int:
    """int32 words of one row's token bitmask (structured outputs)."""
    return (vocab_size + 31) // 32


def logprobs_bucket(num_logprobs: int) -> int:
    """The top-logprobs width for the largest request (-1: nobody asked for logprobs)."""
    if num_logprobs < 0:
        return 0
    for b in LOGPROBS_BUCKETS[1:]:
        if num_logprobs <= b:
            return b
    raise ValueError(f"logprobs={num_logprobs} exceeds the cap {LOGPROBS_BUCKETS[-1]}.")


def make_logprobs(token_logprob: float, token_rank: int, topk_token_ids: np.ndarray,
                  topk_logprobs: np.ndarray, num_logprobs: int, token_id: int) -> Logprobs:
    """One position's host-side Logprobs: the chosen token first, then the top ``num_logprobs``.

    The arguments are one row of the sampler's (host-copied) LogprobsTensors.
    """
    n = int(num_logprobs)
    return Logprobs(token_ids=[int(token_id)] + [int(t) for t in topk_token_ids[:n]],
                    logprobs=[float(token_logprob)] + [float(v) for v in topk_logprobs[:n]],
                    ranks=[int(token_rank)] + list(range(1, n + 1)))


def _sparse_bias_arrays(rows: Sequence[SamplingRow], suppress: np.ndarray, num_rows: int,
                        has_logit_bias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R, Smax) stop ids to suppress, (R, Bmax) logit_bias ids and (R, Bmax) values."""
    stop_ids = _pad_lists(
        [sorted(r.sampling_params.all_stop_token_ids) if suppress[i] else []
         for i, r in enumerate(rows)], num_rows, MIN_STOP_IDS if has_logit_bias else 1)
    items = [list((r.sampling_params.logit_bias or {}).items()) for r in rows]
    bias_ids = _pad_lists([[t for t, _ in b] for b in items], num_rows,
                          MIN_LOGIT_BIAS if has_logit_bias else 1)
    bias_values = np.zeros(bias_ids.shape, np.float32)
    for i, b in enumerate(items):
        bias_values[i, :len(b)] = [v for _, v in b]
    return stop_ids, bias_ids, bias_values


def _penalty_arrays(rows: Sequence[SamplingRow], num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, Lmax) prompt-then-output ids of rows with penalties (others: padding), output mask."""
    penalized = [i for i, r in enumerate(rows) if r.sampling_params.has_penalties]
    lists: list[np.ndarray | list[int]] = [[] for _ in rows]
    for i in penalized:
        lists[i] = np.concatenate([np.asarray(rows[i].prompt_token_ids, np.int32).ravel(),
                                   np.asarray(rows[i].output_token_ids, np.int32).ravel()])
    ids = _pad_lists(lists, num_rows, MIN_PENALTY_TOKENS if penalized else 1)
    output_mask = np.zeros(ids.shape, bool)
    for i in penalized:
        output_mask[i, len(rows[i].prompt_token_ids):len(lists[i])] = True
    return ids, output_mask


def _pad_lists(lists: Sequence[Sequence[int]], num_rows: int, min_width: int) -> np.ndarray:
    """(num_rows, W) int32 ids padded with PAD_ID; W = max(min_width, next power of two)."""
    longest = max((len(x) for x in lists), default=0)
    width = max(min_width, 1 << max(longest - 1, 0).bit_length())
    out = np.full((num_rows, width), PAD_ID, np.int32)
    for i, ids in enumerate(lists):
        out[i, :len(ids)] = ids
    return out
