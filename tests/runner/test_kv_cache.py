import jax
import jax.numpy as jnp
import pytest

from jaxpage.runner import kv_cache

SPEC = kv_cache.KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, dtype=jnp.float32)


class _FakeDevice:
    def __init__(self, stats):
        self._stats = stats

    def memory_stats(self):
        return self._stats


def test_page_bytes_counts_k_and_v_of_every_layer():
    assert SPEC.page_bytes == 2 * 2 * 2 * 4 * 8 * 4


def test_explicit_num_pages_wins():
    assert kv_cache.determine_num_pages(SPEC, num_pages=10, gpu_memory_utilization=0.9, max_model_len=16,
                                        max_num_seqs=4, device=jax.devices()[0]) == 10


def test_sized_from_device_memory_after_weights():
    dev = _FakeDevice({"bytes_limit": 1000 * SPEC.page_bytes, "bytes_in_use": 100 * SPEC.page_bytes})
    n = kv_cache.determine_num_pages(SPEC, num_pages=None, gpu_memory_utilization=0.5, max_model_len=16,
                                     max_num_seqs=4, device=dev, reserve_bytes=50 * SPEC.page_bytes)
    assert n == 500 - 100 - 50


def test_max_model_len_that_cannot_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="max_model_len is 64"):
        kv_cache.determine_num_pages(SPEC, num_pages=8, gpu_memory_utilization=0.9, max_model_len=64,
                                     max_num_seqs=4, device=jax.devices()[0])


def test_allocate_and_describe():
    pool = kv_cache.allocate_kv_pool(SPEC, 5, "reference")
    assert len(pool) == 2 and pool[0].shape == (5, 2, 2, 4, 8)
    text = kv_cache.describe_pool(SPEC, 5, 8)
    assert "5 pages x 4 tokens = 16 tokens of KV" in text and "2.00x" in text
