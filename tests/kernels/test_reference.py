"""The jnp reference (the oracle of every kernel) against a naive per-request float64 loop."""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage.kernels_pallas import reference
from tests.kernels.paged_inputs import assert_close, make_inputs, naive_attention

CASES = [
    # (q_lens, kv_lens, K, G, H, S, T, R, soft_cap, sliding_window)
    ((5, 1, 9, 0, 1), (5, 17, 40, 0, 33), 2, 4, 64, 16, 24, 7, None, None),
    ((1, 1, 1), (1, 15, 16), 1, 8, 128, 16, None, 4, None, None),
    ((3, 2), (64, 65), 2, 1, 64, 64, 8, None, 30.0, None),
    ((7, 1), (130, 129), 1, 4, 64, 128, None, None, None, 50),
    ((4, 6), (4, 70), 3, 3, 64, 32, 16, None, 20.0, 9),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_reference_matches_naive_loop(case):
    q_lens, kv_lens, k, g, h, s, t, r, cap, window = case
    x = make_inputs(zlib.crc32(repr(case).encode()), q_lens=q_lens, kv_lens=kv_lens, num_kv_heads=k, group=g,
                    head_dim=h, page_size=s, dtype=jnp.float32, num_tokens=t, num_reqs=r)
    kwargs = dict(sm_scale=h ** -0.5, soft_cap=cap, sliding_window=window)
    out = reference.ragged_paged_attention(*x.args(), **kwargs)
    assert_close(out, naive_attention(x, **kwargs), dtype=jnp.float32,
                 num_valid_rows=x.num_valid_rows)


def test_write_kv_places_rows_at_slots():
    pool = jnp.zeros(reference.kv_cache_shape(4, 8, 2, 16), jnp.float32)  # (P, 2, K, S, H)
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((3, 2, 16)), jnp.float32) for _ in range(2))
    slots = jnp.asarray([3 * 8 + 5, 1 * 8 + 0, 0], jnp.int32)  # page 3 off 5, page 1 off 0, null
    out = np.asarray(reference.write_kv(pool, k, v, slots))
    np.testing.assert_array_equal(out[3, 0, :, 5], k[0])
    np.testing.assert_array_equal(out[3, 1, :, 5], v[0])
    np.testing.assert_array_equal(out[1, 0, :, 0], k[1])
    assert np.count_nonzero(out[2]) == 0
