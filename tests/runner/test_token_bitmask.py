"""Structured outputs in the sampler: a row's token bitmask (bit t % 32 of word t // 32)
leaves only its allowed tokens to sample, greedy or random, and costs other rows nothing."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxpage.runner.sampler import apply_token_bitmask, sample
from jaxpage.runner.sampling_metadata import SamplingRow, build_sampling_metadata, mask_words
from jaxpage.sampling_params import SamplingParams

V = 1000  # not a multiple of 32: the last word is partly outside the vocabulary


def _bitmask(allowed: np.ndarray) -> np.ndarray:
    """(R, V) bool -> (R, W) int32, numpy's own bit packing (little-endian words)."""
    R = allowed.shape[0]
    padded = np.zeros((R, mask_words(V) * 32), bool)
    padded[:, :V] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view(np.int32)


def test_bitmask_matches_numpy_packing():
    rng = np.random.default_rng(0)
    allowed = rng.random((5, V)) < 0.1
    logits = rng.standard_normal((5, V)).astype(np.float32)
    out = np.asarray(apply_token_bitmask(logits, _bitmask(allowed)))
    np.testing.assert_array_equal(out[allowed], logits[allowed])
    assert np.isneginf(out[~allowed]).all()


def _rows_with_masks(params, masks):
    """Rows whose "grammar" is the mask itself; ``_fill`` copies it into place."""
    return [SamplingRow(p, seed=i, grammar=m) for i, (p, m) in enumerate(zip(params, masks))]


def _fill(buf, entries):
    for row, mask, _drafted in entries:
        buf[row] = mask


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampled_tokens_stay_inside_the_mask(temperature):
    rng = np.random.default_rng(1)
    R = 16
    logits = rng.standard_normal((R, V)).astype(np.float32) * 3
    allowed = np.zeros((R, V), bool)
    for i in range(R):
        allowed[i, rng.choice(V, size=1 + i % 5, replace=False)] = True
    masks = [_bitmask(allowed[i:i + 1])[0] if i % 4 else None for i in range(R)]
    params = [SamplingParams(temperature=temperature, seed=i, top_k=50 if i % 3 else -1)
              for i in range(R)]
    md = build_sampling_metadata(_rows_with_masks(params, masks), R, V, _fill)
    assert md.has_token_mask and md.token_bitmask.shape == (R, mask_words(V))
    assert (md.token_bitmask[::4] == -1).all()  # rows without a grammar allow everything
    tokens = np.asarray(jax.jit(sample)(logits, md).sampled_token_ids)
    for i in range(R):
        if masks[i] is not None:
            assert allowed[i, tokens[i]], i
            if temperature == 0.0:
                assert tokens[i] == np.flatnonzero(allowed[i])[np.argmax(logits[i][allowed[i]])]


def test_rows_without_a_grammar_sample_as_without_the_flag():
    """The flag is monotone like the others: all-ones rows draw the very same tokens."""
    rng = np.random.default_rng(2)
    R = 8
    logits = rng.standard_normal((R, V)).astype(np.float32)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, top_p=0.9, logprobs=2)
              for i in range(R)]
    plain = build_sampling_metadata(_rows_with_masks(params, [None] * R), R, V)
    all_ones = np.full(mask_words(V), -1, np.int32)
    masked = build_sampling_metadata(_rows_with_masks(params, [all_ones] + [None] * (R - 1)),
                                     R, V, _fill)
    assert masked.has_token_mask and not plain.has_token_mask
    a, b = jax.jit(sample)(logits, plain), jax.jit(sample)(logits, masked)
    np.testing.assert_array_equal(a.sampled_token_ids, b.sampled_token_ids)
    np.testing.assert_array_equal(a.logprobs.topk_token_ids, b.logprobs.topk_token_ids)
