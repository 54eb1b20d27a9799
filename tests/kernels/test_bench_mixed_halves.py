"""``tools/bench_kernels.py``'s decode half of the mixed batch is the same attention as the
whole batch's decode rows (checked with the jnp reference, no GPU)."""

import os
import sys

import numpy as np

from jaxpage.kernels_pallas import reference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import bench_kernels as bk  # noqa: E402


def test_decode_half_is_the_batch_s_decode_rows():
    md, q, pools, info = bk.mixed_batch(16, seed=3, scale=1 / 16)
    pool = pools[0]
    full = reference.ragged_paged_attention(q, pool, md["kv_lens"], md["block_tables"],
                                            md["query_start_loc"], md["num_seqs"],
                                            sm_scale=bk.SM_SCALE)
    half, start, num_dec = bk.decode_half(md, 4)
    assert num_dec == len(info["q_lens"]) - 4 and start == sum(info["q_lens"][:4])
    call = bk.on_rows(lambda q_, pool_: reference.ragged_paged_attention(
        q_, pool_, half["kv_lens"], half["block_tables"], half["query_start_loc"],
        half["num_seqs"], sm_scale=bk.SM_SCALE), start)
    got = np.asarray(call(q, pool), np.float32)[:num_dec]
    want = np.asarray(full, np.float32)[start:start + num_dec]
    # bf16 outputs of two differently shaped batches: one rounding step apart at most; a wrong
    # request, row or page would be off by O(1).
    np.testing.assert_allclose(got, want, rtol=0, atol=8e-3)
    assert np.abs(want).max() > 0.5
