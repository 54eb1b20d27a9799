"""The Mosaic GPU kernel's transposed decode tile (``ragged_mosaic``, option ``decode_tile``)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpage.kernels_pallas.gpu import _common as cm
from jaxpage.kernels_pallas.gpu._mosaic_common import register_ops


def decode_tile(q_ref, o_smem, q16_smem, p_smem, ot_smem, k_smem, v_smem, q_bar, k_bar, v_bar,
                 k_free, v_free, *, q_start, kv_head, kv_len, lo_blk, n_blk, group, block_kv,
                 depth, sm_scale, soft_cap, sliding_window, interpret):
    """One query token, G heads: keys are wgmma's M and the heads its N (16 columns, G live),
    instead of a 64-row tile with G live rows — 4x the waste instead of 16x::

        Sᵀ (block_kv, 16) = K · Qᵀ     softmax down each column (one per head)
        Oᵀ (H, 16)       += Vᵀ · P      P stored as is; K, V, Q, P in 32-byte swizzled tiles
        O (64, H)         = E · (Oᵀ)ᵀ   E = identity (64, 16): Oᵀ back to rows, exactly

    Leaves O in ``o_smem``, the G heads at rows off .. off + G - 1 (returns off). Same ring
    protocol as the 64-row tile.
    """
    head_dim = q_ref.shape[2]
    dtype = q_ref.dtype
    cols = q16_smem.shape[0]  # 16
    iota, in_layout, load_tile, _ = register_ops(interpret)
    # A TMA copy into a tiled tile needs a tile-aligned start: take the 16 heads from the
    # 8-aligned one below this group's first; this group's heads are columns off .. off + G - 1.
    off = lax.rem(kv_head * group, jnp.int32(8))
    plgpu.copy_gmem_to_smem(q_ref.at[q_start, pl.ds(kv_head * group - off, cols)], q16_smem,
                            q_bar)
    for _ in range(group - 1):  # q_bar counts G arrivals, as for the 64-row tile
        plgpu.barrier_arrive(q_bar)
    plgpu.barrier_wait(q_bar)
    q_pos = kv_len - 1
    key = iota((block_kv, cols), 0)

    def step(s, carry):
        acc_t, m_i, l_i = carry  # (H, 16), (16,), (16,)
        buf = lax.rem(s, jnp.int32(depth))
        blk = lo_blk + s
        plgpu.barrier_wait(k_bar.at[buf])
        if interpret:  # the interpreter's wgmma takes no transposed operand: plain dots
            st = jnp.dot(k_smem.at[buf][...], q16_smem[...].T,
                         preferred_element_type=jnp.float32)
        else:
            def qk(ref):
                plgpu.wgmma(ref, k_smem.at[buf], plgpu.transpose_ref(q16_smem, (1, 0)))
                return ref[...]
            st = pl.run_scoped(qk, plgpu.ACC((block_kv, cols), jnp.float32))
        plgpu.barrier_arrive(k_free.at[buf])
        if soft_cap is None:
            st = st * (sm_scale * cm.LOG2E)
        else:
            st = jnp.tanh(st * (sm_scale / soft_cap)) * (soft_cap * cm.LOG2E)
        kv_pos = blk * block_kv + key
        mask = kv_pos < kv_len
        if sliding_window is not None:
            mask = mask & (kv_pos > q_pos - sliding_window)
        st = jnp.where(mask, st, cm.NEG)
        m_new = jnp.maximum(m_i, st.max(axis=0))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(st - lax.broadcast_in_dim(m_new, st.shape, [1]))
        l_i = l_i * alpha + p.sum(axis=0)
        acc_t = acc_t * lax.broadcast_in_dim(alpha, acc_t.shape, [1])
        p_smem[...] = p.astype(dtype)
        plgpu.barrier_wait(v_bar.at[buf])

        @pl.when(blk * block_kv + block_kv > kv_len)
        def _zero_tail():  # 0 * NaN is NaN inside the MMA
            vrow = iota((block_kv, head_dim), 0)
            v = load_tile(v_smem.at[buf])
            v_smem.at[buf][...] = jnp.where(blk * block_kv + vrow < kv_len, v, jnp.zeros_like(v))

        plgpu.commit_smem()  # P (and a zeroed tail) visible to the tensor cores
        if interpret:
            acc_t = acc_t + jnp.dot(v_smem.at[buf][...].T, p_smem[...],
                                    preferred_element_type=jnp.float32)
        else:
            def pv(ref):
                plgpu.wgmma(ref, plgpu.transpose_ref(v_smem.at[buf], (1, 0)), p_smem)
            acc_t = pl.run_state(pv)(plgpu.ACC.init(acc_t))
        plgpu.barrier_arrive(v_free.at[buf])
        return acc_t, m_new, l_i

    carry = (in_layout(jnp.zeros((head_dim, cols), jnp.float32), plgpu.Layout.WGMMA),
             in_layout(jnp.full((cols,), cm.NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(0)),
             in_layout(jnp.zeros((cols,), jnp.float32), plgpu.Layout.WGMMA.reduce(0)))
    acc_t, _, l_i = lax.fori_loop(0, n_blk, step, carry)
    l_safe = jnp.where(l_i > 0, l_i, jnp.ones_like(l_i))
    ot = acc_t / lax.broadcast_in_dim(l_safe, acc_t.shape, [1])
    # Columns of other heads (or past the last head) go to zero: E · (Oᵀ)ᵀ sums over every
    # column, and 0 * NaN would reach the live rows.
    head = iota(acc_t.shape, 1)
    ot_smem[...] = jnp.where((head >= off) & (head < off + group), ot,
                             jnp.zeros_like(ot)).astype(dtype)
    plgpu.commit_smem()
    eye = (iota((64, cols), 0) == iota((64, cols), 1)).astype(dtype)
    if interpret:
        out = jnp.dot(eye, ot_smem[...].T, preferred_element_type=jnp.float32)
    else:
        def rows(ref):
            plgpu.wgmma(ref, eye, plgpu.transpose_ref(ot_smem, (1, 0)))
            return ref[...]
        out = pl.run_scoped(rows, plgpu.ACC((64, head_dim), jnp.float32))
    o_smem[...] = out.astype(dtype)
    return off
