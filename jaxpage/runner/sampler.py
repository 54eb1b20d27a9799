"""On-device sampling for one step: logits (R, V) -> token ids (R,) and optional logprobs.

Pure functions of (logits, SamplingMetadata); jit them with the metadata as an argument (its
static flags pick the graph, see ``sampling_metadata.py`` for the variant policy). The order
follows vLLM v1::

    raw logits ──► log_softmax ─────────────────────────────────────────────► logprobs (raw)
        └─► + logit_bias, stop ids -> -inf under min_tokens ─► penalties ──┬─► argmax (greedy rows)
                                                                            └─► / temperature
            ─► min-p ─► top-k ─► top-p (renormalised over what top-k/min-p kept) ─► + Gumbel ─► argmax

Logprobs are vLLM's default ``raw_logprobs``: log_softmax of the model's logits before any bias,
penalty, temperature or filter, so they describe the model, not the sampling distribution.

Filtering without a full-vocab sort: min-p is a threshold at ``max + log(min_p)``; top-k and
top-p are thresholds found by a radix select over the float bit patterns (an order-preserving
uint32 key per logit). Each of the 8 passes of 4 bits reads the row once and counts (top-k) or
sums the probability mass (top-p) at or above 16 candidate thresholds, so both are exact for any
k up to V and any p, cost 16 fused row passes in all, and need neither ``lax.top_k`` with a cap
(XLA:GPU lowers a large top-k to a sort anyway) nor a sort fallback. Ties at a threshold are all
kept (a sort would split them arbitrarily).

Reproducibility: a row's noise comes from ``fold_in(key(seed), output_pos)`` only, and every
transform is gated by the row's own parameters, so a request samples the same tokens whatever
else is batched, whichever row it sits in, and whichever flags the batch switched on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpage.runner.sampling_metadata import (
    PAD_ID, SamplingMetadata, SamplingRow, build_sampling_metadata)

__all__ = ["LogprobsTensors", "SamplerOutput", "SamplingMetadata", "SamplingRow",
           "build_sampling_metadata", "compute_logprobs_for_tokens", "sample",
           "apply_logit_bias", "apply_penalties", "apply_top_k_top_p_min_p"]

_RADIX_BITS = 4  # 8 passes of 16 candidate thresholds per radix select


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogprobsTensors:
    """Logprobs of N positions (N = R rows when sampling, T tokens for prompt logprobs).

    Fields:
        token_logprobs: (N,) float32 logprob of the chosen (sampled or prompt) token.
        token_ranks: (N,) int32 1-based rank of that token: how many tokens have a logprob >= it.
        topk_token_ids: (N, k) int32 the k most likely tokens, best first.
        topk_logprobs: (N, k) float32 their logprobs.
    """

    token_logprobs: jax.Array
    token_ranks: jax.Array
    topk_token_ids: jax.Array
    topk_logprobs: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """sampled_token_ids: (R,) int32. logprobs: None unless md.max_num_logprobs > 0."""

    sampled_token_ids: jax.Array
    logprobs: LogprobsTensors | None = None


def sample(logits: jax.Array, md: SamplingMetadata) -> SamplerOutput:
    """Samples one token per row.

    Args:
        logits: (R, V) the model's logits for the last token of each request.
        md: this step's SamplingMetadata, rows aligned with ``logits``.

    Returns:
        SamplerOutput with (R,) int32 token ids and, when ``md.max_num_logprobs > 0``, the raw
        logprobs of the sampled tokens, their ranks and the top ``max_num_logprobs`` per row.
    """
    logits = logits.astype(jnp.float32)                        # (R, V)
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1) if md.max_num_logprobs else None
    if md.has_logit_bias:
        logits = apply_logit_bias(logits, md)
    if md.has_penalties:
        logits = apply_penalties(logits, md)
    if md.all_greedy:
        token_ids = jnp.argmax(logits, axis=-1)
    else:
        token_ids = _sample_random(logits, md)
    token_ids = token_ids.astype(jnp.int32)                    # (R,)
    if raw_logprobs is None:
        return SamplerOutput(token_ids)
    return SamplerOutput(token_ids, _gather_logprobs(raw_logprobs, token_ids, md.max_num_logprobs))


def compute_logprobs_for_tokens(logits: jax.Array, token_ids: jax.Array, k: int) -> LogprobsTensors:
    """Raw logprobs of given tokens (prompt_logprobs): logits[t] scores token_ids[t].

    Args:
        logits: (T, V); the caller aligns row t with the token that follows it.
        token_ids: (T,) int32.
        k: static number of top logprobs per position (0 gives (T, 0) arrays).
    """
    raw_logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return _gather_logprobs(raw_logprobs, token_ids.astype(jnp.int32), k)


def _gather_logprobs(raw_logprobs: jax.Array, token_ids: jax.Array, k: int) -> LogprobsTensors:
    token_lp = jnp.take_along_axis(raw_logprobs, token_ids[:, None], axis=-1)  # (N, 1)
    # vLLM's rank: tokens at least as likely as the chosen one, so the argmax has rank 1.
    ranks = jnp.sum(raw_logprobs >= token_lp, axis=-1, dtype=jnp.int32)         # (N,)
    topk_lp, topk_ids = jax.lax.top_k(raw_logprobs, k)                          # (N, k)
    return LogprobsTensors(token_lp[:, 0], ranks, topk_ids.astype(jnp.int32), topk_lp)


def apply_logit_bias(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Adds logit_bias, then sets the stop ids of rows still under min_tokens to -inf."""
    R, V = logits.shape
    rows = jnp.arange(R)[:, None]
    bias_ids = _drop_pad(md.logit_bias_token_ids, V)                           # (R, Bmax)
    logits = logits.at[rows, bias_ids].add(md.logit_bias_values, mode="drop")
    stop_ids = jnp.where(md.suppress_stop_tokens[:, None], md.stop_token_ids, PAD_ID)
    return logits.at[rows, _drop_pad(stop_ids, V)].set(-jnp.inf, mode="drop")  # (R, V)


def apply_penalties(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """vLLM's penalties: repetition over prompt + output tokens, presence/frequency over output."""
    R, V = logits.shape
    rows = jnp.arange(R)[:, None]
    ids = _drop_pad(md.penalty_token_ids, V)                                   # (R, Lmax)
    output_counts = jnp.zeros((R, V), jnp.int32).at[rows, ids].add(
        md.penalty_output_mask.astype(jnp.int32), mode="drop")                 # (R, V)
    seen = jnp.zeros((R, V), jnp.bool_).at[rows, ids].set(True, mode="drop")   # (R, V)
    rep = md.repetition_penalties[:, None]
    # CTRL-style: shrink positive logits, push negative ones further down.
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - md.frequency_penalties[:, None] * output_counts.astype(jnp.float32)
    return logits - md.presence_penalties[:, None] * (output_counts > 0).astype(jnp.float32)


def _sample_random(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    R, V = logits.shape
    is_greedy = md.temperature <= 0.0                                          # (R,)
    x = logits / jnp.where(is_greedy, 1.0, md.temperature)[:, None]           # (R, V)
    if md.has_top_k_top_p_min_p:
        x = apply_top_k_top_p_min_p(x, md.top_k, md.top_p, md.min_p)
    # Gumbel-max: argmax(x + G) is a draw from softmax(x), with no softmax and no cumsum.
    noisy = x + _gumbel_noise(md.seeds, md.output_pos, V)                     # (R, V)
    return jnp.argmax(jnp.where(is_greedy[:, None], logits, noisy), axis=-1)


def _gumbel_noise(seeds: jax.Array, output_pos: jax.Array, vocab_size: int) -> jax.Array:
    """(R, V) Gumbel(0, 1) noise; row r depends only on (seeds[r], output_pos[r])."""
    def one_row(seed, pos):
        key = jax.random.wrap_key_data(seed, impl="threefry2x32")
        return jax.random.gumbel(jax.random.fold_in(key, pos), (vocab_size,), jnp.float32)
    return jax.vmap(one_row)(seeds, output_pos)


def apply_top_k_top_p_min_p(x: jax.Array, top_k: jax.Array, top_p: jax.Array,
                            min_p: jax.Array) -> jax.Array:
    """Sets filtered logits to -inf, per row; a row with neutral parameters is returned as is.

    Args:
        x: (R, V) temperature-scaled logits.
        top_k: (R,) int32, V disables; top_p: (R,) float32, 1 disables; min_p: (R,) float32,
            0 disables.
    """
    V = x.shape[-1]
    keys = _sortable_key(x)                                                    # (R, V) uint32
    x_max = jnp.max(x, axis=-1, keepdims=True)                                 # (R, 1)
    # min-p: p >= min_p * p_max  <=>  x >= x_max + log(min_p).
    keep = (min_p[:, None] <= 0.0) | (x >= x_max + jnp.log(min_p)[:, None])  # (R, V)
    # top-k: keep values >= the k-th largest (ties at the threshold all survive).
    k_thresh = _radix_select(keys, None, top_k.astype(jnp.float32))           # (R,)
    keep &= (top_k[:, None] >= V) | (keys >= k_thresh[:, None])
    # top-p over the survivors, renormalised: keep the smallest top set holding >= top_p of the
    # mass, i.e. a token survives iff the mass strictly above it is < top_p (vLLM's rule).
    mass = jnp.where(keep, jnp.exp(x - x_max), 0.0)                            # (R, V)
    target = top_p * jnp.sum(mass, axis=-1)                                    # (R,)
    p_thresh = _radix_select(keys, mass, target)                               # (R,)
    keep &= (top_p[:, None] >= 1.0) | (keys >= p_thresh[:, None])
    return jnp.where(keep, x, -jnp.inf)


def _radix_select(keys: jax.Array, weights: jax.Array | None, target: jax.Array) -> jax.Array:
    """Per row, the largest threshold u with sum(weights[keys >= u]) >= target.

    Args:
        keys: (R, V) uint32 order-preserving keys; weights: (R, V) non-negative, None for ones
            (then the answer is the key of the target-th largest value); target: (R,).

    Returns:
        (R,) uint32 thresholds, built 4 bits at a time from the top.
    """
    num_digits = 1 << _RADIX_BITS
    digits = jnp.arange(num_digits, dtype=jnp.uint32)                         # (16,)
    thresh = jnp.zeros(keys.shape[:1], jnp.uint32)                             # (R,)
    zero = jnp.zeros((), jnp.int32 if weights is None else jnp.float32)
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        cand = thresh[:, None] | (digits << shift)[None, :]                   # (R, 16)
        # One variadic row reduction with 16 accumulators reads the row once per pass; a
        # (R, 16, V) broadcast-and-sum would read it 16 times (2x slower on an H100).
        terms = [jnp.where(keys >= cand[:, d:d + 1], 1 if weights is None else weights, zero)
                 for d in range(num_digits)]                                   # 16 x (R, V)
        mass = jax.lax.reduce(terms, [zero] * num_digits,
                              lambda a, b: [u + v for u, v in zip(a, b)], (1,))
        mass = jnp.stack(mass, axis=-1).astype(jnp.float32)                    # (R, 16)
        # mass falls as the digit grows; take the last digit still reaching the target
        # (digit 0 always does in exact arithmetic; max() guards a rounding miss).
        digit = jnp.maximum(jnp.sum(mass >= target[:, None], axis=-1) - 1, 0)
        thresh = thresh | (digit.astype(jnp.uint32) << shift)
    return thresh


def _sortable_key(x: jax.Array) -> jax.Array:
    """uint32 keys ordered like the float32 values (negatives flipped, sign bit set on positives)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x8000_0000))


def _drop_pad(ids: jax.Array, vocab_size: int) -> jax.Array:
    """PAD_ID -> vocab_size, an index that ``mode="drop"`` scatters skip (JAX wraps negatives)."""
    return jnp.where(ids < 0, vocab_size, ids)
