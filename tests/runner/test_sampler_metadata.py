"""The host-side builder of SamplingMetadata: padding, neutral rows, flags and bucketed widths."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxpage.runner.sampling_metadata import (
    LOGPROBS_BUCKETS, PAD_ID, SamplingMetadata, SamplingRow, build_sampling_metadata,
    logprobs_bucket, make_logprobs)
from jaxpage.sampling_params import SamplingParams

V = 100


def _row(seed=0, prompt=(), output=(), pos=None, **params):
    return SamplingRow(SamplingParams(**params), seed=seed, prompt_token_ids=list(prompt),
                       output_token_ids=list(output), num_output_tokens=pos)


def test_padding_rows_are_greedy_and_neutral():
    md = build_sampling_metadata([_row(temperature=0.8, top_k=5, top_p=0.5, min_p=0.1, seed=7)],
                                 padded_num_reqs=4, vocab_size=V)
    assert md.temperature.tolist() == pytest.approx([0.8, 0, 0, 0])
    assert md.top_k.tolist() == [5, V, V, V]
    assert md.top_p.tolist() == pytest.approx([0.5, 1, 1, 1])
    assert md.min_p.tolist() == pytest.approx([0.1, 0, 0, 0])
    assert md.repetition_penalties.tolist() == [1.0] * 4
    assert md.presence_penalties.tolist() == md.frequency_penalties.tolist() == [0.0] * 4
    assert md.seeds.tolist() == [[0, 7], [0, 0], [0, 0], [0, 0]]
    assert not md.suppress_stop_tokens.any()
    assert (md.all_greedy, md.has_top_k_top_p_min_p, md.has_penalties, md.has_logit_bias,
            md.max_num_logprobs) == (False, True, False, False, 0)
    # Flags off: their arrays shrink to width 1 and add no shapes of their own.
    for name in ("stop_token_ids", "logit_bias_token_ids", "penalty_token_ids"):
        assert getattr(md, name).shape == (4, 1) and (getattr(md, name) == PAD_ID).all()


def test_greedy_rows_drop_their_filters_and_greedy_batches_stay_cheap():
    md = build_sampling_metadata([_row(temperature=0.0, top_k=3, top_p=0.2, min_p=0.5),
                                  _row(temperature=1e-6)], 2, V)
    assert md.all_greedy and not md.has_top_k_top_p_min_p
    assert md.temperature.tolist() == [0.0, 0.0] and md.top_k.tolist() == [V, V]


def test_plain_temperature_needs_no_filter_pass():
    md = build_sampling_metadata([_row(temperature=0.7), _row(top_k=-1), _row(top_k=V + 50)], 4, V)
    assert not md.all_greedy and not md.has_top_k_top_p_min_p
    assert md.top_k.tolist() == [V] * 4  # disabled and oversized top_k both mean "keep all"


def test_seeds_split_into_threefry_words():
    seeds = [0, 1, 2**32 + 3, 2**64 - 1, -1, -(2**63)]
    md = build_sampling_metadata([_row(seed=s) for s in seeds], 8, V)
    want = [((s % 2**64) >> 32, s % 2**32) for s in seeds] + [(0, 0)] * 2
    assert [tuple(x) for x in md.seeds.tolist()] == want
    assert md.seeds.dtype == np.uint32


def test_output_position_defaults_to_number_of_outputs():
    md = build_sampling_metadata([_row(output=[4, 5, 6]), _row(output=[4], pos=9)], 2, V)
    assert md.output_pos.tolist() == [3, 9]


def test_min_tokens_suppresses_all_stop_ids_until_reached():
    sp = SamplingParams(stop_token_ids=[5, 3], min_tokens=2)
    sp.all_stop_token_ids |= {99}  # EOS, added by the engine
    rows = [SamplingRow(sp, seed=0, num_output_tokens=n) for n in (0, 1, 2)]
    md = build_sampling_metadata(rows, 4, V)
    assert md.has_logit_bias and md.suppress_stop_tokens.tolist() == [True, True, False, False]
    assert md.stop_token_ids.shape == (4, 8)
    assert md.stop_token_ids[0].tolist() == [3, 5, 99] + [PAD_ID] * 5
    assert (md.stop_token_ids[2:] == PAD_ID).all()
    # Without stop ids there is nothing to suppress and no flag.
    md = build_sampling_metadata([_row(min_tokens=3, stop_token_ids=[])], 1, V)
    assert not md.has_logit_bias


def test_many_stop_ids_widen_to_the_next_power_of_two():
    sp = SamplingParams(stop_token_ids=list(range(10)), min_tokens=1)
    md = build_sampling_metadata([SamplingRow(sp, seed=0)], 1, V)
    assert md.stop_token_ids.shape == (1, 16)


def test_logit_bias_is_sparse_and_bucketed():
    rows = [_row(logit_bias={7: 1.5, 2: -3.0}), _row(), _row(logit_bias={i: 0.5 for i in range(9)})]
    md = build_sampling_metadata(rows, 4, V)
    assert md.has_logit_bias and md.logit_bias_token_ids.shape == (4, 16)
    assert md.logit_bias_token_ids[0, :3].tolist() == [7, 2, PAD_ID]
    assert md.logit_bias_values[0, :3].tolist() == [1.5, -3.0, 0.0]
    assert (md.logit_bias_token_ids[1] == PAD_ID).all()
    assert (md.logit_bias_token_ids[2, :9] >= 0).all()
    small = build_sampling_metadata([_row(logit_bias={1: 1.0})], 4, V)
    assert small.logit_bias_token_ids.shape == (4, 8)


def test_penalty_tokens_are_prompt_then_output_for_penalised_rows_only():
    rows = [_row(prompt=[1, 2, 3], output=[4, 4], repetition_penalty=1.2),
            _row(prompt=list(range(30)), output=[9]),            # no penalties: not packed
            _row(prompt=list(range(20)), output=[1], presence_penalty=0.5)]
    md = build_sampling_metadata(rows, 4, V)
    assert md.has_penalties and md.penalty_token_ids.shape == (4, 32)
    assert md.penalty_token_ids[0, :6].tolist() == [1, 2, 3, 4, 4, PAD_ID]
    assert md.penalty_output_mask[0, :6].tolist() == [False] * 3 + [True] * 2 + [False]
    assert (md.penalty_token_ids[1] == PAD_ID).all() and not md.penalty_output_mask[1].any()
    assert md.penalty_output_mask[2].sum() == 1 and md.penalty_output_mask[2, 20]


@pytest.mark.parametrize("asked, bucket", [(None, 0), (0, 5), (1, 5), (5, 5), (6, 20), (20, 20)])
def test_logprobs_buckets(asked, bucket):
    md = build_sampling_metadata([_row(logprobs=asked), _row()], 2, V)
    assert md.max_num_logprobs == bucket and bucket in LOGPROBS_BUCKETS
    assert logprobs_bucket(-1 if asked is None else asked) == bucket


def test_rejects_more_rows_than_the_bucket():
    with pytest.raises(ValueError, match="padded_num_reqs"):
        build_sampling_metadata([_row(), _row()], 1, V)


def test_is_a_pytree_with_static_flags():
    md = build_sampling_metadata([_row(temperature=0.5, logprobs=2)], 2, V)
    leaves, treedef = jax.tree.flatten(md)
    assert len(leaves) == 16 and all(isinstance(x, np.ndarray) for x in leaves)
    other = build_sampling_metadata([_row(temperature=0.9, logprobs=4, seed=3)], 2, V)
    assert jax.tree.structure(other) == treedef  # same flags and shapes: same jit cache entry
    assert isinstance(jax.tree.unflatten(treedef, leaves), SamplingMetadata)


def test_make_logprobs_puts_the_chosen_token_first():
    lp = make_logprobs(-2.5, 3, np.array([8, 1, 5, 0, 0]), np.array([-0.1, -1.0, -2.5, -9, -9]),
                       num_logprobs=2, token_id=5)
    assert lp.token_ids == [5, 8, 1] and lp.ranks == [3, 1, 2]
    assert lp.logprobs == pytest.approx([-2.5, -0.1, -1.0])
