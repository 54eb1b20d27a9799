"""A request's greedy tokens do not depend on what else runs: batching, KV pressure with
preemption, prefix caching on/off and chunk size all give the same tokens (vLLM's rule where a
float near-tie flips one: the first divergent token lies in the other run's top-5)."""

import jax.numpy as jnp
import pytest

from tests.entrypoints.engine_util import assert_close, greedy, random_prompts, tiny_llm

NUM = 32
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(NUM, 512, 1, 40, seed=1, shared_prefix=20)


@pytest.fixture(scope="module")
def reference(prompts):
    """Each request alone (max_num_seqs=1): the baseline every other run must match."""
    llm = tiny_llm(max_num_seqs=1)
    outs = [llm.generate([p], greedy(MAX_TOKENS), use_tqdm=False)[0] for p in prompts]
    return outs


def _run(prompts, **kwargs):
    llm = tiny_llm(**kwargs)
    baseline = llm.engine.num_free_pages
    outs = llm.generate(prompts, greedy(MAX_TOKENS), use_tqdm=False)
    assert llm.engine.num_free_pages == baseline  # every page came back
    return llm, outs


def test_batched(prompts, reference):
    llm, outs = _run(prompts, max_num_seqs=32, max_num_batched_tokens=256)
    n = assert_close(reference, outs)
    print(f"batched: {n}/{NUM} identical")
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)


def test_preemption_under_kv_pressure(prompts, reference):
    llm, outs = _run(prompts, max_num_seqs=32, max_num_batched_tokens=128, num_pages=40,
                     max_model_len=96)
    assert llm.engine.get_stats()["num_preemptions"] > 0
    n = assert_close(reference, outs)
    print(f"preemption: {n}/{NUM} identical, {llm.engine.get_stats()['num_preemptions']} preemptions")


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_caching(prompts, reference, caching):
    llm, outs = _run(prompts, max_num_seqs=8, enable_prefix_caching=caching)
    hits = sum(o.num_cached_tokens for o in outs)
    assert (hits > 0) == caching
    n = assert_close(reference, outs)
    print(f"prefix caching={caching}: {n}/{NUM} identical, {hits} cached tokens")


def test_token_padding_gap(prompts, reference):
    # Steps pad to multiples of 48 past 48 instead of powers of two: other padded shapes, the
    # same tokens.
    llm, outs = _run(prompts, max_num_seqs=32, max_num_batched_tokens=256, token_padding_gap=48)
    runner = llm.engine.model_runner
    assert runner.buckets.token_buckets[:5] == (16, 32, 48, 96, 144)
    assert any(t & (t - 1) for t, *_ in runner.compile_seconds)  # a step ran at a multiple of 48
    n = assert_close(reference, outs)
    print(f"token padding gap 48: {n}/{NUM} identical")


def test_small_prefill_chunks(prompts, reference):
    llm, outs = _run(prompts, max_num_seqs=8, max_num_batched_tokens=16)
    n = assert_close(reference, outs)
    print(f"chunked prefill (16): {n}/{NUM} identical")


def test_fp8_pool_under_batching_preemption_and_caching(prompts):
    """An fp8 pool obeys the same rule against its own one-at-a-time run: the pages' values
    are the same bytes whatever shares the step (a quantization that depended on the batch,
    or stale fp8 pages read past kv_len, would break it)."""
    kw = dict(kv_cache_dtype="fp8")
    alone = tiny_llm(max_num_seqs=1, **kw)
    ref = [alone.generate([p], greedy(MAX_TOKENS), use_tqdm=False)[0] for p in prompts]
    llm, outs = _run(prompts, max_num_seqs=32, max_num_batched_tokens=128, num_pages=40,
                     max_model_len=96, **kw)
    stats = llm.engine.get_stats()
    assert stats["num_preemptions"] > 0 and sum(o.num_cached_tokens for o in outs) > 0
    n = assert_close(ref, outs)
    print(f"fp8 pool, batched + preemption + caching: {n}/{NUM} identical")


def test_scaled_fp8_pool_under_batching_preemption_and_caching(prompts):
    """``calculate_kv_scales``: the first step sets each layer's K/V scales, so two engines
    agree only once they hold the same scales. Given the one-at-a-time run's scales, the
    batched engine (preemption, prefix caching) obeys the rule above against that run, and
    keeps the scales it was given."""
    import numpy as np

    from jaxpage.models.attention import ScaledKVPool

    kw = dict(kv_cache_dtype="fp8", calculate_kv_scales=True)
    alone = tiny_llm(max_num_seqs=1, **kw)
    ref = [alone.generate([p], greedy(MAX_TOKENS), use_tqdm=False)[0] for p in prompts]
    scales = [np.asarray(p.scales) for p in alone.engine.model_runner.kv_pages]
    assert all(s.min() > 0 for s in scales)
    llm = tiny_llm(max_num_seqs=32, max_num_batched_tokens=128, num_pages=40, max_model_len=96,
                   **kw)
    runner = llm.engine.model_runner
    runner.kv_pages = [ScaledKVPool(p.pages, jnp.asarray(s))
                       for p, s in zip(runner.kv_pages, scales)]
    baseline = llm.engine.num_free_pages
    outs = llm.generate(prompts, greedy(MAX_TOKENS), use_tqdm=False)
    assert llm.engine.num_free_pages == baseline
    for p, s in zip(runner.kv_pages, scales):
        np.testing.assert_array_equal(np.asarray(p.scales), s)
    stats = llm.engine.get_stats()
    assert stats["num_preemptions"] > 0 and sum(o.num_cached_tokens for o in outs) > 0
    n = assert_close(ref, outs)
    print(f"scaled fp8 pool, batched + preemption + caching: {n}/{NUM} identical")
