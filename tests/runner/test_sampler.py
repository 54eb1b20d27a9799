"""The on-device sampler against numpy references of each transform (vLLM v1 semantics)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage.runner import sampler
from jaxpage.runner.sampler import (
    SamplingRow, apply_logit_bias, apply_penalties, apply_top_k_top_p_min_p,
    build_sampling_metadata, compute_logprobs_for_tokens, sample)
from jaxpage.sampling_params import SamplingParams

V = 97  # odd on purpose: nothing may assume a power-of-two vocabulary
_sample = jax.jit(sample)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_allowed(x, top_k, top_p, min_p):
    """vLLM v1 filtering of one row of temperature-scaled logits, by sorting, in float64.

    Where equal logits straddle the top-p boundary this sort keeps some of them and the sampler
    keeps all (test_ties_at_a_threshold_are_kept_whole); other tests keep ties off the boundary.
    """
    x = np.asarray(x, np.float64)
    n = len(x)
    keep = np.isfinite(x)
    if min_p > 0:  # MinPLogitsProcessor: p < min_p * p_max is dropped
        p = _softmax(x)
        keep &= p >= min_p * p.max()
    if top_k < n:  # values below the k-th largest are dropped; ties at it survive
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    if top_p < 1:  # ascending cumsum <= 1 - p is dropped <=> mass strictly above >= p
        p = _softmax(np.where(keep, x, -np.inf))
        order = np.argsort(-p, kind="stable")
        above = np.cumsum(p[order]) - p[order]
        in_nucleus = np.zeros(n, bool)
        in_nucleus[order] = above < top_p
        keep &= in_nucleus
    return keep


def ref_penalties(logits, prompt_ids, output_ids, presence, frequency, repetition):
    out = np.asarray(logits, np.float32).copy()
    seen = np.zeros(len(out), bool)
    seen[list(prompt_ids) + list(output_ids)] = True
    out[seen] = np.where(out[seen] > 0, out[seen] / np.float32(repetition),
                         out[seen] * np.float32(repetition))
    counts = np.bincount(np.asarray(output_ids, int), minlength=len(out)).astype(np.float32)
    return out - np.float32(frequency) * counts - np.float32(presence) * (counts > 0)


def _md(rows, num_padded=None, vocab_size=V):
    return build_sampling_metadata(rows, num_padded or len(rows), vocab_size)


def _row(seed=0, pos=0, prompt=(), output=(), **params):
    return SamplingRow(SamplingParams(**params), seed=seed, prompt_token_ids=list(prompt),
                       output_token_ids=list(output), num_output_tokens=pos)


def _logits(num_rows, seed=0, scale=2.0, vocab_size=V):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num_rows, vocab_size)).astype(np.float32) * scale


# -- transforms ------------------------------------------------------------------------------

FILTER_CASES = [  # (top_k, top_p, min_p)
    (V, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.0), (V - 1, 1.0, 0.0), (V, 0.9, 0.0),
    (V, 0.3, 0.0), (V, 0.999, 0.0), (V, 1e-6, 0.0), (V, 1.0, 0.1), (V, 1.0, 0.6),
    (20, 0.8, 0.0), (10, 0.95, 0.05), (V, 0.5, 0.02), (3, 0.2, 0.9),
]


def test_sortable_key_orders_like_floats():
    x = np.array([-np.inf, -3e38, -1.5, -1e-40, -0.0, 0.0, 1e-40, 1e-30, 1.0, 2.5, 3e38, np.inf],
                 np.float32)
    keys = np.asarray(sampler._sortable_key(jnp.asarray(x)))
    assert (np.diff(keys.astype(np.int64)) > 0).all()


@functools.cache
def _filter(num_chunks):
    return jax.jit(functools.partial(apply_top_k_top_p_min_p, num_candidate_chunks=num_chunks))


def _filter_case_inputs():
    x = _logits(len(FILTER_CASES), seed=1)
    x[3, :40] = -np.inf                     # rows with -inf entries (biased away / suppressed)
    x[4, 10:20] = x[4, 10]                  # ties
    top_k, top_p, min_p = (np.array(c, t) for c, t in
                           zip(zip(*FILTER_CASES), (np.int32, np.float32, np.float32)))
    return x, top_k, top_p, min_p


@pytest.mark.parametrize("num_chunks", [sampler.NUM_CANDIDATE_CHUNKS, 3])
def test_filter_allowed_set_matches_numpy(num_chunks):
    """Fast path (all 7 chunks of V=97 are candidates), then a mix of fast and fallback rows."""
    x, top_k, top_p, min_p = _filter_case_inputs()
    got = np.asarray(_filter(num_chunks)(x, top_k, top_p, min_p))
    for r, (k, p, mp) in enumerate(FILTER_CASES):
        want = ref_allowed(x[r], k, p, mp)
        np.testing.assert_array_equal(np.isfinite(got[r]), want, err_msg=f"case {FILTER_CASES[r]}")
        np.testing.assert_array_equal(got[r][want], x[r][want])  # survivors untouched
    assert np.isfinite(got[0]).sum() == V and np.isfinite(got[1]).sum() == 1
    exact = _fast_path_exact(x, top_k, top_p, num_chunks)
    assert exact.all() if num_chunks > 7 else (exact.any() and not exact.all())


def _fast_path_exact(x, top_k, top_p, num_chunks):
    keys = sampler._sortable_key(jnp.asarray(x))
    cand, bound = sampler._candidate_chunks(jnp.asarray(x), num_chunks)
    if bound is None:
        return np.ones(len(x), bool)
    _, k_t, p_t = sampler._filter_floor(sampler._sortable_key(cand), cand, keys, jnp.asarray(x),
                                        jnp.max(x, -1), jnp.zeros(len(x), jnp.uint32), top_k, top_p)
    return np.asarray(((top_k >= x.shape[1]) | (k_t > bound)) & ((top_p >= 1) | (p_t > bound)))


def test_another_rows_fallback_never_moves_a_fast_path_row():
    x, top_k, top_p, min_p = _filter_case_inputs()
    exact = _fast_path_exact(x, top_k, top_p, 3)
    mixed = np.asarray(_filter(3)(x, top_k, top_p, min_p))        # this batch falls back
    top_k[~exact], top_p[~exact] = V, 1.0                           # now no row needs to
    alone = np.asarray(_filter(3)(x, top_k, top_p, min_p))
    np.testing.assert_array_equal(mixed[exact], alone[exact])


def test_top_k_matches_lax_top_k_with_ties():
    x = _logits(4, seed=15, vocab_size=1000)
    x[0] = 0.0                                                      # all tied
    x[1, ::7] = 9.0                                                 # ties at the top
    for k in (1, 5, 20):
        values, ids = sampler._top_k(jnp.asarray(x), k)
        want_values, want_ids = jax.lax.top_k(jnp.asarray(x), k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(values, want_values)


def test_ties_at_a_threshold_are_kept_whole():
    """A sort would keep one of two equal logits at the boundary, by index; we keep both."""
    x = np.zeros((2, 16), np.float32)
    x[:, :4] = [5.0, 4.0, 3.0, 3.0]  # probabilities .58 .21 .079 .079: the nucleus of .85 ends
    got = _filter(sampler.NUM_CANDIDATE_CHUNKS)(  # inside the tie
        x, np.array([3, 16]), np.array([1.0, 0.85], np.float32), np.zeros(2, np.float32))
    assert np.isfinite(np.asarray(got)).tolist() == [[True] * 4 + [False] * 12] * 2


def test_penalties_match_numpy():
    logits = _logits(4, seed=2)
    logits[:, :10] = np.abs(logits[:, :10]) * np.array([1, -1] * 5)  # both signs among seen ids
    cases = [  # prompt ids, output ids (with repeats), presence, frequency, repetition
        ([1, 2, 3], [3, 4, 4, 4, 9], 0.5, 0.3, 1.3),
        ([5, 6], [], 0.0, 0.0, 0.7),
        ([0] * 20, [0, 7, 7], -1.0, -0.5, 1.0),
        ([], [8], 2.0, 2.0, 2.0),
    ]
    rows = [_row(prompt=p, output=o, pos=len(o), presence_penalty=pp, frequency_penalty=fp,
                 repetition_penalty=rp) for p, o, pp, fp, rp in cases]
    md = _md(rows)
    assert md.has_penalties and md.penalty_token_ids.shape[1] == 32
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), md))
    for r, case in enumerate(cases):
        np.testing.assert_allclose(got[r], ref_penalties(logits[r], *case), rtol=1e-6, atol=1e-6)


def test_logit_bias_and_min_tokens_suppression_match_numpy():
    logits = _logits(3, seed=3)
    bias = {4: 5.0, 90: -100.0, 0: 0.25}
    stop = SamplingParams(stop_token_ids=[7, 11], min_tokens=3)
    rows = [_row(logit_bias=bias),
            SamplingRow(stop, seed=0, num_output_tokens=2),   # still under min_tokens
            SamplingRow(stop, seed=0, num_output_tokens=3)]   # reached it: nothing suppressed
    got = np.asarray(jax.jit(apply_logit_bias)(jnp.asarray(logits), _md(rows)))
    want = logits.copy()
    for t, b in bias.items():
        want[0, t] += np.float32(b)
    want[1, [7, 11]] = -np.inf
    np.testing.assert_array_equal(got, want)


# -- sampling ------------------------------------------------------------------------------------

def test_greedy_is_argmax_of_biased_penalised_logits():
    logits = _logits(6, seed=4)
    rows = [_row(temperature=0.0), _row(temperature=0.0, logit_bias={5: 50.0}),
            _row(temperature=0.0, prompt=[int(np.argmax(logits[2]))], repetition_penalty=2.0),
            _row(temperature=0.0, top_k=3, top_p=0.1)]
    out = _sample(logits, _md(rows, 6))
    want = np.argmax(logits, -1)
    want[1] = 5
    want[2] = np.argmax(ref_penalties(logits[2], rows[2].prompt_token_ids, [], 0, 0, 2.0))
    np.testing.assert_array_equal(np.asarray(out.sampled_token_ids), want)
    assert out.logprobs is None


def test_min_tokens_blocks_stop_tokens_until_reached():
    logits = np.zeros((2, V), np.float32)
    logits[:, 13] = 10.0  # the stop token is by far the most likely
    params = SamplingParams(temperature=0.0, stop_token_ids=[13], min_tokens=2)
    params.all_stop_token_ids |= {96}  # the engine adds EOS
    early = [SamplingRow(params, seed=0, num_output_tokens=n) for n in (0, 1)]
    assert 13 not in np.asarray(_sample(logits, _md(early)).sampled_token_ids)
    late = [SamplingRow(params, seed=0, num_output_tokens=n) for n in (2, 5)]
    assert np.asarray(_sample(logits, _md(late)).sampled_token_ids).tolist() == [13, 13]


def _draw(logits_row, params, num_draws, vocab_size):
    """num_draws samples of one distribution: rows differ only by (seed, output position)."""
    rows = [_row(seed=1000 + i, pos=i % 7, **params) for i in range(num_draws)]
    md = _md(rows, vocab_size=vocab_size)
    logits = np.broadcast_to(logits_row, (num_draws, vocab_size))
    return np.asarray(_sample(logits, md).sampled_token_ids)


def _chi_square(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs))
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token of probability zero"
    expected = probs[support] * len(tokens)
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


@pytest.mark.parametrize("params", [
    dict(temperature=0.7), dict(temperature=1.0), dict(temperature=1.5, top_k=6),
    dict(temperature=1.0, top_p=0.8), dict(temperature=0.9, min_p=0.1, top_p=0.95),
])
def test_sampled_distribution_matches_filtered_softmax(params):
    vocab = 16
    logits = np.linspace(-2.0, 2.0, vocab, dtype=np.float32)
    logits = logits[np.random.default_rng(5).permutation(vocab)]
    tokens = _draw(logits, params, 4096, vocab)
    x = logits / params["temperature"]
    allowed = ref_allowed(x, params.get("top_k", vocab), params.get("top_p", 1.0),
                          params.get("min_p", 0.0))
    probs = np.where(allowed, _softmax(x), 0.0)
    stat, dof = _chi_square(tokens, probs / probs.sum())
    # Fixed seeds make this deterministic; the bound is ~5 sigma of the chi-square, and a 15% error
    # in the temperature already lands above it.
    assert stat < dof + 5 * np.sqrt(2 * dof), (stat, dof)


@pytest.mark.parametrize("case", FILTER_CASES[1:])
def test_sampled_token_always_in_allowed_set(case):
    top_k, top_p, min_p = case
    logits = _logits(1, seed=6)[0]
    tokens = _draw(logits, dict(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p), 512, V)
    allowed = ref_allowed(logits, top_k, top_p, min_p)
    assert allowed[tokens].all()
    if allowed.sum() <= 4:  # a small set is covered entirely
        assert set(tokens.tolist()) == set(np.flatnonzero(allowed).tolist())


def test_seeded_sampling_is_independent_of_batch_composition():
    """RELIABILITY promise 12: same (seed, output position) -> same token, whatever the batch."""
    logits = _logits(1, seed=7, scale=1.0)[0]   # flat: many tokens are plausible
    other = _logits(8, seed=8)
    neighbours = {"greedy": dict(temperature=0.0),
                  "top_k": dict(temperature=0.8, top_k=5, logprobs=20),
                  "penalties": dict(temperature=0.0, presence_penalty=1.0, logit_bias={2: 3.0}),
                  "min_p": dict(temperature=1.3, min_p=0.2, min_tokens=4, stop_token_ids=[1])}
    layouts = [["me"], ["min_p", "me", "top_k"], ["penalties"] * 4 + ["me", "greedy"],
               ["greedy", "greedy", "me"]]
    for params in (dict(temperature=0.9, top_p=0.95), dict(temperature=1.1)):
        sequences = []
        for layout in layouts:
            tokens = []
            for pos in range(6):
                rows = [_row(seed=4242, pos=pos, **params) if name == "me" else
                        _row(seed=slot, pos=pos, prompt=[1, 2], output=[3], **neighbours[name])
                        for slot, name in enumerate(layout)]
                md = _md(rows, num_padded=8)
                if layout is layouts[-1]:   # a flag pinned on changes no token either
                    md = dataclasses.replace(md, has_top_k_top_p_min_p=True)
                batch = np.stack([logits if name == "me" else other[slot]
                                  for slot, name in enumerate(layout)])
                batch = np.concatenate([batch, other[:md.temperature.shape[0] - len(layout)]])
                out = np.asarray(_sample(batch, md).sampled_token_ids)
                tokens.append(int(out[layout.index("me")]))
            sequences.append(tokens)
        assert all(s == sequences[0] for s in sequences), sequences
        assert len(set(sequences[0])) > 2  # the positions really draw different tokens


def test_seed_changes_tokens_and_handles_64_bit_seeds():
    logits = np.zeros((8, V), np.float32)
    seeds = [0, 1, 2**32, 2**63 + 5, -1, -(2**63), 2**64 - 1, 12345]
    md = _md([_row(seed=s, temperature=1.0) for s in seeds])
    tokens = np.asarray(_sample(logits, md).sampled_token_ids)
    assert len(set(tokens.tolist())) >= 6
    assert md.seeds[3].tolist() == [2**31, 5] and md.seeds[4].tolist() == md.seeds[6].tolist()


# -- logprobs ------------------------------------------------------------------------------------

def test_logprobs_are_raw_and_match_numpy():
    logits = _logits(4, seed=9)
    rows = [_row(temperature=0.0, logprobs=3), _row(seed=3, temperature=1.7, top_k=4, logprobs=0),
            _row(temperature=0.0, logit_bias={1: 30.0}, logprobs=20), _row(seed=4)]
    md = _md(rows)
    assert md.max_num_logprobs == 20
    out = _sample(logits, md)
    tokens = np.asarray(out.sampled_token_ids)
    lp = jax.tree.map(np.asarray, out.logprobs)
    want = _log_softmax(logits)  # raw: before bias, temperature and filtering
    np.testing.assert_allclose(lp.token_logprobs, want[np.arange(4), tokens], atol=1e-5)
    chosen = want[np.arange(4), tokens]
    np.testing.assert_array_equal(lp.token_ranks, (want >= chosen[:, None]).sum(-1))
    np.testing.assert_array_equal(lp.topk_token_ids, np.argsort(-want, -1)[:, :20])
    np.testing.assert_allclose(lp.topk_logprobs, -np.sort(-want, -1)[:, :20], atol=1e-5)
    assert tokens[2] == 1 and lp.token_ranks[2] > 1  # biased token: its raw rank is honest


@pytest.mark.parametrize("k", [0, 4])
def test_compute_logprobs_for_tokens(k):
    logits = _logits(10, seed=10)
    ids = np.random.default_rng(11).integers(0, V, 10).astype(np.int32)
    lp = jax.jit(compute_logprobs_for_tokens, static_argnums=2)(logits, ids, k)
    lp = jax.tree.map(np.asarray, lp)
    want = _log_softmax(logits)
    np.testing.assert_allclose(lp.token_logprobs, want[np.arange(10), ids], atol=1e-5)
    chosen = want[np.arange(10), ids]
    np.testing.assert_array_equal(lp.token_ranks, (want >= chosen[:, None]).sum(-1))
    assert lp.topk_token_ids.shape == (10, k)
    np.testing.assert_array_equal(lp.topk_token_ids, np.argsort(-want, -1)[:, :k])


# -- compiled variants ---------------------------------------------------------------------------

def test_typical_batches_compile_few_variants():
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    typical = [dict(temperature=0.0), dict(), dict(temperature=0.7), dict(top_p=0.9),
               dict(temperature=0.8, top_k=40, top_p=0.95), dict(logprobs=5),
               dict(temperature=0.0, logprobs=1)]
    rng = np.random.default_rng(12)
    batches = []
    for i in range(40):
        n = int(rng.integers(1, 9))
        rows = [_row(seed=int(rng.integers(1 << 30)), pos=int(rng.integers(100)),
                     **typical[rng.integers(len(typical))]) for _ in range(n)]
        batches.append(_md(rows, num_padded=8))
    logits = _logits(8, seed=13)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for md in batches:
            _sample(logits, md).sampled_token_ids.block_until_ready()
        first_pass = len(compiles)
        for md in batches:  # steady state: nothing new
            _sample(logits, md).sampled_token_ids.block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    flags = {(m.all_greedy, m.has_top_k_top_p_min_p, m.max_num_logprobs) for m in batches}
    assert len(flags) <= 6, flags  # 3 sampling modes x logprobs {0, 5}
    # At most one compile per distinct key (fewer when another test compiled it already).
    assert first_pass <= len(flags), (first_pass, flags)
    assert len(compiles) == first_pass
