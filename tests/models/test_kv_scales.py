"""Per-layer K/V scales of an fp8 pool (``calculate_kv_scales``, ``models/attention.py``): the
first step calibrates them from its live tokens, later steps keep them, and attention through
the scaled pool matches exact attention where the unscaled fp8 pool cannot (K/V below e4m3's
normal range, or beyond its largest value)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage.kernels_pallas import reference
from jaxpage.models.attention import (KV_SCALE_HEADROOM, AttentionMetadata, ScaledKVPool,
                                      paged_attention)

T, N, K, H, S = 64, 4, 2, 32, 16
LIVE = 48  # rows past it are padding (the null page), as the engine pads a step


def _md():
    # one request of LIVE tokens on pages 1..3 (shuffled order), padding rows into page 0
    pages = jnp.array([[3, 1, 2, 0]], jnp.int32)
    slots = np.concatenate([np.asarray(pages[0, np.arange(LIVE) // S]) * S + np.arange(LIVE) % S,
                            np.arange(T - LIVE) % S])
    return AttentionMetadata(slot_mapping=jnp.asarray(slots, jnp.int32), block_tables=pages,
                             seq_lens=jnp.array([LIVE], jnp.int32),
                             query_start_loc=jnp.array([0, LIVE], jnp.int32),
                             num_seqs=jnp.array([1], jnp.int32))


def _qkv(seed, k_mag, v_mag, pad_mag=0.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(T, N, H))
    k, v = rng.normal(size=(T, K, H)) * k_mag, rng.normal(size=(T, K, H)) * v_mag
    k[LIVE:] *= pad_mag / k_mag if pad_mag else 1.0
    v[LIVE:] *= pad_mag / v_mag if pad_mag else 1.0
    return [jnp.asarray(x, jnp.float32) for x in (q, k, v)]


def _attend(q, k, v, pool):
    out, pool = paged_attention(q, k, v, pool, _md(), sm_scale=H ** -0.5)
    return out[:LIVE], pool


def _err(out, exact):
    return float(jnp.abs(out - exact).max() / jnp.abs(exact).max())


def _pool(dtype, scaled=False, scales=(0.0, 0.0)):
    pages = jnp.zeros(reference.kv_cache_shape(4, S, K, H), dtype)
    return ScaledKVPool(pages, jnp.asarray(scales, jnp.float32)) if scaled else pages


@pytest.mark.parametrize("k_mag,v_mag,plain_err_min", [
    (1e-3, 1e-3, 0.2),  # below e4m3's smallest normal (2^-6): the plain pool underflows
    (900.0, 900.0, 0.2),  # past its largest value (448): the plain pool saturates
])
def test_scales_rescue_what_plain_fp8_loses(k_mag, v_mag, plain_err_min):
    q, k, v = _qkv(0, k_mag, v_mag)
    q = q / k_mag  # scores of order one, whatever K's magnitude
    exact, _ = _attend(q, k, v, _pool(jnp.float32))
    plain, _ = _attend(q, k, v, _pool(jnp.float8_e4m3fn))
    scaled, pool = _attend(q, k, v, _pool(jnp.float8_e4m3fn, scaled=True))
    assert _err(plain, exact) > plain_err_min
    assert _err(scaled, exact) < 0.08  # e4m3's 3-bit mantissa: ~6% per value
    assert isinstance(pool, ScaledKVPool) and pool.pages.dtype == jnp.float8_e4m3fn


def test_calibration_takes_live_rows_only_and_is_kept():
    q, k, v = _qkv(1, 2.0, 0.5, pad_mag=1e4)  # padding rows 1e4: must not set the scales
    _, pool = _attend(q, k, v, _pool(jnp.float8_e4m3fn, scaled=True))
    top = KV_SCALE_HEADROOM * float(jnp.finfo(jnp.float8_e4m3fn).max)
    want = [float(jnp.abs(k[:LIVE]).max()) / top, float(jnp.abs(v[:LIVE]).max()) / top]
    np.testing.assert_allclose(np.asarray(pool.scales), want, rtol=1e-6)
    # A later step keeps them, whatever its own magnitudes; its K/V are stored with them.
    q2, k2, v2 = _qkv(2, 1.0, 1.0)  # within the headroom: stored unsaturated
    _, pool2 = _attend(q2, k2, v2, pool)
    np.testing.assert_array_equal(np.asarray(pool2.scales), np.asarray(pool.scales))
    page, off = 3, 5  # token 5 sits on page 3 (the block table's first page)
    stored = np.asarray(pool2.pages[page, 0, :, off].astype(jnp.float32))
    np.testing.assert_allclose(stored * want[0], np.asarray(k2[5]), rtol=0.07, atol=0)


def test_given_scales_are_used_and_a_zero_step_calibrates_to_one():
    q, k, v = _qkv(3, 1.0, 1.0)
    exact, _ = _attend(q, k, v, _pool(jnp.float32))
    fixed, pool = _attend(q, k, v, _pool(jnp.float8_e4m3fn, scaled=True, scales=(0.01, 0.02)))
    np.testing.assert_array_equal(np.asarray(pool.scales), np.float32([0.01, 0.02]))
    assert _err(fixed, exact) < 0.08
    zeros = [jnp.zeros_like(x) for x in (k, v)]
    _, pool = _attend(q, *zeros, _pool(jnp.float8_e4m3fn, scaled=True))
    np.testing.assert_array_equal(np.asarray(pool.scales), [1.0, 1.0])
