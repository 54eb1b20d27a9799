"""The Mosaic GPU ragged kernel's one-token tile (``ragged_mosaic``, option ``decode_tile``).

A tile with one query token (a decode, or a chunk's last token) has G live rows of the 64-row
tile: QKᵀ, the softmax and PV cost the full tile for G = 4 of 64 rows. Here the keys are
wgmma's M and the G heads its N (16 columns, G live), a quarter of the tensor-core work and a
sixteenth of the softmax per block::

    Sᵀ (block_kv, 16) = K · Qᵀ       A = K ring slot, B = the 16-row Q tile, transposed
    softmax down each column (one per head; axis-0 reductions, through shared memory)
    P (16, block_kv)  = (Sᵀ)ᵀ        stored transposed (WGMMA_TRANSPOSED register layout)
    Oᵀ (H, 16)       += Vᵀ · Pᵀ      A = V ring slot, transposed; B = P, transposed

Every operand keeps the ring's 128-byte swizzle (wgmma takes one swizzle for both operands;
NOTES.md, eighth pass): the transposed store of P is what makes that possible. Same ring
protocol as the 64-row tile (``ragged_mosaic._kernel``): K(s) awaited before step s, K(s + 1)
during PV(s), each slot released after use. Only the first compute warpgroup runs it: the
axis-0 reductions share one scratch area per CTA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpage.kernels_pallas.gpu import _common as cm

COLS = 16  # wgmma N of the transposed tile (the G <= 8 heads of one kv head, zero-padded)
region = jax.named_scope  # profiler ranges (``ragged_mosaic.region``), prefixed "d_"


def attend_one_token(q_ref, o_ref, io, q_tile, p_tile, k_smem, v_smem, q_bar, k_bar, v_bar,
                     k_free, v_free, ring, ops, *, token, kv_head, kv_len, q_pos, lo_blk,
                     n_mine, n_full, group, block_kv, sm_scale, soft_cap, sliding_window,
                     interpret):
    """Attention of query row ``token`` (position ``q_pos``) for the G heads of ``kv_head``
    over KV blocks lo_blk .. lo_blk + n_mine - 1 of ring steps ``ring(0) ..``; the output
    leaves by TMA from ``io`` (the caller waits for it before reusing ``io``)."""
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    iota, in_layout, load_tile = ops
    # Q: the G heads land untiled at rows 0 .. G - 1 (one TMA box; q_bar counts G
    # arrivals, as for the 64-row tile) and are re-laid, other rows zero, into the tile.
    with region("d_q_in"):
        plgpu.copy_gmem_to_smem(q_ref.at[token, pl.ds(kv_head * group, group)],
                                io.at[pl.ds(0, group)], q_bar)
        for _ in range(group - 1):
            plgpu.barrier_arrive(q_bar)
        plgpu.barrier_wait(q_bar)
        q = load_tile(io, fast=False)
        q_tile[...] = jnp.where(iota(q_tile.shape, 0) < group, q, jnp.zeros_like(q))
        plgpu.commit_smem()
    q16 = q_tile.at[pl.ds(0, COLS)]
    key = iota((block_kv, COLS), 0)

    def step(s, carry, masked):
        acc_t, m_i, l_i = carry  # (H, 16), (16,), (16,)
        buf = ring(s)
        blk = lo_blk + s
        if interpret:  # the interpreter's wgmma takes no transposed operand: plain dots
            st = jnp.dot(k_smem.at[buf][...], q16[...].T, preferred_element_type=jnp.float32)
        else:
            def qk(acc_ref):
                plgpu.wgmma(acc_ref, k_smem.at[buf], q16.T)
                return acc_ref[...]
            with region("d_qk"):
                st = pl.run_scoped(qk, plgpu.ACC((block_kv, COLS), jnp.float32))
        plgpu.barrier_arrive(k_free.at[buf])
        if soft_cap is None:
            st = st * (sm_scale * cm.LOG2E)
        else:
            st = jnp.tanh(st * (sm_scale / soft_cap)) * (soft_cap * cm.LOG2E)
        if masked:
            kv_pos = blk * block_kv + key
            mask = (kv_pos <= q_pos) & (kv_pos < kv_len)
            if sliding_window is not None:
                mask = mask & (kv_pos > q_pos - sliding_window)
            st = jnp.where(mask, st, cm.NEG)
        m_new = jnp.maximum(m_i, st.max(axis=0))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(st - lax.broadcast_in_dim(m_new, st.shape, [1]))
        l_i = l_i * alpha + p.sum(axis=0)
        acc_t = acc_t * lax.broadcast_in_dim(alpha, acc_t.shape, [1])
        if interpret:
            p_tile[...] = p.astype(dtype).T
        else:
            p_tile.T[...] = plgpu.layout_cast(
                p.astype(dtype), plgpu.Layout.WGMMA_TRANSPOSED)
        with region("d_wait_v"):
            plgpu.barrier_wait(v_bar.at[buf])
        if masked:
            @pl.when(blk * block_kv + block_kv > kv_len)
            def _zero_tail():  # rows past kv_len may be NaN, and 0 * NaN is NaN in the MMA
                vrow = iota((block_kv, head_dim), 0)
                v = load_tile(v_smem.at[buf])
                v_smem.at[buf][...] = jnp.where(blk * block_kv + vrow < kv_len, v,
                                                jnp.zeros_like(v))

        plgpu.commit_smem()  # P (and a zeroed tail) visible to the tensor cores

        def wait_next_k():
            @pl.when(s + 1 < n_mine)
            def _wait():
                plgpu.barrier_wait(k_bar.at[ring(s + 1)])

        if interpret:
            acc_t = acc_t + jnp.dot(v_smem.at[buf][...].T, p_tile[...].T,
                                    preferred_element_type=jnp.float32)
            wait_next_k()
        else:
            def pv(acc_ref):
                plgpu.wgmma(acc_ref, v_smem.at[buf].T,
                            p_tile.T)
                wait_next_k()  # while the tensor cores run PV
            with region("d_pv_wait_k"):
                acc_t = pl.run_state(pv)(plgpu.ACC.init(acc_t))
        plgpu.barrier_arrive(v_free.at[buf])
        return acc_t, m_new, l_i

    carry = (in_layout(jnp.zeros((head_dim, COLS), jnp.float32), plgpu.Layout.WGMMA),
             in_layout(jnp.full((COLS,), cm.NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(0)),
             in_layout(jnp.zeros((COLS,), jnp.float32), plgpu.Layout.WGMMA.reduce(0)))
    with region("d_wait_k"):
        plgpu.barrier_wait(k_bar.at[ring(0)])
    carry = lax.fori_loop(0, n_full, lambda s, c: step(s, c, masked=False), carry)
    acc_t, _, l_i = lax.fori_loop(n_full, n_mine, lambda s, c: step(s, c, masked=True), carry)
    # Oᵀ goes back to rows through the Q tile (its last read, the last QKᵀ, has completed),
    # transposed on the way in; then to the untiled staging buffer the TMA store reads.
    with region("d_out"):
        l_safe = jnp.where(l_i > 0, l_i, jnp.ones_like(l_i))
        o_t = (acc_t / lax.broadcast_in_dim(l_safe, acc_t.shape, [1])).astype(dtype)
        if interpret:
            q16[...] = o_t.T
        else:
            q16.T[...] = plgpu.layout_cast(
                o_t, plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.commit_smem()
        io[...] = load_tile(q_tile)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(io.at[pl.ds(0, group)],
                                o_ref.at[token, pl.ds(kv_head * group, group)])
