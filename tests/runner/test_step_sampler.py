"""``StepSampler.plan``: the steady-state metadata (the step before's arrays, this step's
output positions) equals metadata built anew, and is taken only where that holds."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpage import SamplingParams
from jaxpage.runner.input_batch import CachedRequestState, InputBatch
from jaxpage.runner.sampling import StepSampler
from jaxpage.runner.sampling_metadata import build_sampling_metadata

V = 97


def _states(params: list[SamplingParams]) -> list[CachedRequestState]:
    return [CachedRequestState(f"r{i}", i, 5, sp, 1000 + i, 5 + i, 2, 5 + i)
            for i, sp in enumerate(params)]


def _fresh(sampler, states, samples, rows):
    """What plan builds without the steady state: rows from ``_row``, built anew."""
    rs = [sampler._row(s, do) for s, do in zip(states, samples)]
    return build_sampling_metadata(rs, rows, V)


def _same(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y, f.name


def test_steady_metadata_equals_metadata_built_anew():
    sampler = StepSampler(V, InputBatch(8, 64, 4, 16))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=5, seed=3),
              SamplingParams(temperature=1.0, top_p=0.9, logprobs=2)]
    states = _states(params)
    samples = [True, True, False]  # the third is a chunk that does not sample this step
    first = sampler.plan(states, samples, 4)
    assert sampler._steady is not None and sampler._steady[1] is first.md
    for s in states:  # a step later: each sampling request one token on
        s.num_tokens += 1
        s.num_pending = 0
    want = _fresh(sampler, states, samples, 4)
    got = sampler.plan(states, samples, 4)
    assert got.md.temperature is first.md.temperature  # the steady path: arrays reused
    assert got.md.output_pos is not first.md.output_pos  # with this step's positions
    _same(got.md, want)
    assert got.md.output_pos.tolist()[:2] == [states[0].num_output_tokens,
                                              states[1].num_output_tokens]


def test_steady_metadata_is_not_taken_where_rows_differ():
    sampler = StepSampler(V, InputBatch(8, 64, 4, 16))
    states = _states([SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, seed=1)])
    first = sampler.plan(states, [True, True], 4).md
    # another request in a row: built anew
    other = _states([SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, seed=1)])
    for s in other:
        s.num_pending = 0
    want = _fresh(sampler, other, [True, True], 4)  # before plan marks their tokens pending
    md = sampler.plan(other, [True, True], 4).md
    _same(md, want)
    assert md.temperature[1] == np.float32(0.9) and first.temperature[1] == np.float32(0.5)
    # a request whose row follows its outputs (penalties): never the steady path
    pen = _states([SamplingParams(temperature=0.0, presence_penalty=0.5)])
    for _ in range(2):
        for s in pen:
            s.num_pending = 0
        assert sampler._steady_metadata(pen, [True], [[]], 4) is None
        sampler.plan(pen, [True], 4)
    # a different bucket: built anew
    assert sampler._steady_metadata(pen[:0], [], [], 8) is None


def test_a_penalised_requests_token_in_flight_counts_without_a_read_back(monkeypatch):
    import jax
    import jax.numpy as jnp

    batch = InputBatch(8, 64, 4, 16)
    sampler = StepSampler(V, batch)
    hot = 11  # the token in flight; the logits favour it by a margin a penalty undoes
    sp = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=0.5,
                        repetition_penalty=1.5)
    state = CachedRequestState("r", 3, 4, sp, 0, 6, 1, 6)
    batch.token_ids[3, :6] = [1, 2, 3, 4, 5, 6]  # prompt 1..4, outputs 5, 6
    sampler.last_sampled = jnp.zeros(8, jnp.int32).at[3].set(hot)
    logits = np.zeros((2, V), np.float32)
    logits[:, hot], logits[:, 40] = 1.0, 0.9
    state.num_pending = 1  # async: the token of the step before is still on the device

    def no_read_back(*a, **k):
        raise AssertionError("plan read the device back")

    monkeypatch.setattr(jax, "device_get", no_read_back)
    plan = sampler.plan([state], [True], 2)
    monkeypatch.undo()
    got = sampler.launch(jnp.asarray(logits), plan).out.sampled_token_ids
    # the same request with that token known on the host
    known = CachedRequestState("r", 3, 4, sp, 0, 7, 1, 7)
    batch.token_ids[3, 6] = hot
    want = sampler.launch(jnp.asarray(logits), sampler.plan([known], [True], 2))
    assert int(got[0]) == int(want.out.sampled_token_ids[0]) == 40  # the penalty counted it
