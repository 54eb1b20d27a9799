"""Ragged mixed prefill + decode paged attention for Hopper: Pallas with the Mosaic GPU lowering.

The Triton-lowered kernel (``ragged_attention.py``) stays the portable default; this one is
the Hopper path: K/V pages come in by TMA (one bulk copy per page chunk, issued by a memory
warpgroup) and both matmuls are wgmma on a 64-row tile. ``gpu.ragged_paged_attention`` takes it
on Hopper where it measured faster (``AUTO_HEAD_DIMS``; docs/benchmarks/NOTES.md, fourth pass).

Work items (one CTA each) are the Triton kernel's (query block slot, kv head) pairs::

    slot layout: request b's first slot = qsl[b] // block_q + b; one extra pseudo request
    (b = num_seqs, rows [qsl[num_seqs], T)) covers the padding rows, which get zeros.

    tile rows (64 = G heads x block_q tokens):  row r = head g * block_q + token t
        Q comes in as G TMA copies (one per q head of the group, block_q rows each, landing
        untiled because a request starts at any row) and is re-laid into a swizzled tile; the
        output leaves the same way, partial bands as a ladder of power-of-two TMA stores.

    warpgroups 0..nc-1 (compute): QK^T (wgmma) -> masked online softmax (exp2) -> PV (wgmma);
        with nc = 2 they take alternate KV blocks and merge their partial softmax states
    warpgroup nc (memory): page ids from the block table -> TMA copies of K and V chunks
        (min(page, block_kv) rows each) into a ``depth``-deep ring of mbarrier-guarded slots

Key rows at or past kv_len may hold anything (NaN in the tests): K rows are masked in the
scores; the V rows of the last block are zeroed in shared memory before PV, since 0 * NaN is
NaN inside the MMA.

Options built but not yet measured (off; docs/benchmarks/NOTES.md has their predictions):
``overlap`` (the next block's QKᵀ in flight during this block's softmax) and ``decode_tile``
(single-token requests on a transposed tile, ``_mosaic_decode``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpage.kernels_pallas.gpu import _common as cm
from jaxpage.kernels_pallas.gpu._mosaic_common import interpreter, register_ops, store_rows
from jaxpage.kernels_pallas.gpu._mosaic_decode import decode_tile as run_decode_tile

TILE_ROWS = 64  # one warpgroup's wgmma M


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    block_kv: int = 64  # KV tokens per pipeline step
    depth: int = 3  # K/V ring depth (pipeline stages)
    compute_wgs: int = 1  # compute warpgroups splitting each tile's KV blocks (1 or 2)
    compute_regs: int = 0  # setmaxnreg for the compute warpgroups (0: compiler's choice)
    overlap: bool = False  # next block's QKᵀ in flight during this block's softmax (1 wg)
    decode_tile: bool = False  # single-token requests on a transposed tile (32-byte swizzle)


# By measurement on H200s (JAX 0.11.2; tools/study_mosaic.py, docs/benchmarks/
# kernels_mosaic_runs.md), mixed batch of bench_kernels at H = 128: block_kv 128 / depth 2
# 263-274 µs in four runs (Triton kernel 318-354 in the same runs); 128 / 3 269; 64 / 3 291-296;
# 64 / 2 291-299; 64 / 4 292; two compute warpgroups 285-320 (every variant slower). At H = 64
# the same tile was the best Mosaic candidate (214-223 µs) but slower than Triton (167-176).
MOSAIC_TUNING: dict[int, MosaicConfig] = {
    64: MosaicConfig(block_kv=128, depth=2),
    128: MosaicConfig(block_kv=128, depth=2),
}


# Head dims where ``backend="auto"`` takes this kernel on Hopper: where it measured faster than
# the Triton kernel (H = 128, above). Not H = 64, where it measured slower.
AUTO_HEAD_DIMS = (128,)


def supported(num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
              dtype) -> str | None:
    """None when this kernel handles the shape, else why not (the caller falls back)."""
    group = num_q_heads // num_kv_heads
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name} (wgmma path takes bfloat16/float16)"
    if head_dim not in MOSAIC_TUNING:
        return f"head_dim {head_dim} (tuned: {sorted(MOSAIC_TUNING)})"
    if TILE_ROWS % group or (TILE_ROWS // group) % 8:
        return f"group {group} (needs 64 / group to be a multiple of 8)"
    if page_size % 8:
        return f"page_size {page_size} (needs a multiple of 8)"
    return None


def _kernel(num_seqs_ref, kv_lens_ref, block_tables_ref, qsl_ref, q_ref, kv_ref,  # inputs
            o_ref,  # output
            q_smem, o_smem, k_smem, v_smem, acc_smem, m_smem, l_smem,  # scratch (None: unused)
            q16_smem, p_smem, ot_smem,  # decode tile buffers (None without it)
            q_bar, k_bar, v_bar, k_free, v_free, q_ready, merge_bar,  # scratch barriers
            *, sm_scale, soft_cap, sliding_window, group, block_q, block_kv, depth, page_size,
            num_slots, search_steps, compute_wgs, compute_regs, overlap, decode_tile,
            interpret):
    num_reqs, max_pages = block_tables_ref.shape
    num_tokens, _, head_dim = q_ref.shape
    dtype = q_ref.dtype
    item = lax.axis_index("item")
    kv_head = lax.div(item, jnp.int32(num_slots))
    slot = lax.rem(item, jnp.int32(num_slots))
    num_seqs = jnp.minimum(num_seqs_ref[0], num_reqs)

    # Largest b <= num_seqs with first slot qsl[b] // block_q + b <= slot (b = num_seqs is the
    # padding pseudo request).
    def search(_, lo_hi):
        lo, hi = lo_hi
        mid = lax.div(lo + hi + 1, jnp.int32(2))
        right = lax.div(qsl_ref[mid], jnp.int32(block_q)) + mid <= slot
        return jnp.where(right, mid, lo), jnp.where(right, hi, mid - 1)

    req, _ = lax.fori_loop(0, search_steps, search, (jnp.int32(0), num_seqs))
    q_start = qsl_ref[req]
    is_pad = req == num_seqs
    q_end = jnp.where(is_pad, jnp.int32(num_tokens), qsl_ref[jnp.minimum(req + 1, num_reqs)])
    q_len = q_end - q_start
    q_blk = slot - (lax.div(q_start, jnp.int32(block_q)) + req)
    tok0 = q_blk * block_q
    n_tok = jnp.clip(q_len - tok0, 0, block_q)  # live query rows of this block (per head)
    live = (~is_pad) & (n_tok > 0)
    req_row = jnp.minimum(req, num_reqs - 1)  # req = num_seqs (padding) reads no real row
    kv_len = jnp.where(live, kv_lens_ref[req_row], 0)
    ctx_len = kv_len - q_len
    first_pos = ctx_len + tok0
    hi = jnp.where(live, jnp.minimum(kv_len, first_pos + n_tok), 0)
    if sliding_window is None:
        lo_blk = jnp.int32(0)
    else:
        lo_blk = lax.div(jnp.maximum(first_pos - sliding_window + 1, 0), jnp.int32(block_kv))
    n_blk = jnp.where(live, lax.div(hi + block_kv - 1, jnp.int32(block_kv)) - lo_blk, 0)
    # Blocks every row of the tile sees in full (no mask needed): before the first query.
    n_full = 0 if sliding_window is not None else jnp.minimum(
        lax.div(first_pos + 1, jnp.int32(block_kv)), n_blk)
    wg = lax.axis_index("wg")
    iota, in_layout, load_tile, load_row = register_ops(interpret)
    # Single-token requests on the transposed decode tile (``_mosaic_decode``), if enabled.
    # (TMA boxes of 16 heads: only where the model has at least 16 q heads.)
    use_tile = decode_tile and q_ref.shape[1] >= 16
    decode_here = (n_blk > 0) & (q_len == 1) if use_tile else None
    # Items the 64-row tile takes (every live item without the decode tile).
    tile_items = (n_blk > 0) & ~decode_here if use_tile else n_blk > 0

    nc = compute_wgs  # compute warpgroups 0..nc-1 take KV blocks s = wg, wg + nc, ...; then
    # the memory warpgroup nc. A ring slot is always read by the same warpgroup (depth % nc ==
    # 0), so every warpgroup sees every phase of the barriers it waits on.

    @pl.when(wg < nc)
    def _compute():
        if compute_regs and not interpret:
            plgpu.set_max_registers(compute_regs, action="increase")
        rows_shape = (TILE_ROWS, block_kv)

        @pl.when(tile_items)
        def _attend():
            @pl.when(wg == 0)
            def _load_q():
                # Q rows start anywhere: a TMA copy into tiled shared memory needs a
                # tile-aligned (8-row) start in global memory too, so Q lands untiled (in the
                # output buffer, free until the end) and is re-laid into the swizzled tile.
                for g in range(group):
                    plgpu.copy_gmem_to_smem(
                        q_ref.at[pl.ds(q_start + tok0, block_q), kv_head * group + g],
                        o_smem.at[pl.ds(g * block_q, block_q)], q_bar)
                plgpu.barrier_wait(q_bar)
                q_smem[...] = load_tile(o_smem, fast=False)  # bank conflicts, once per item
                plgpu.commit_smem()
                if nc > 1:
                    plgpu.barrier_arrive(q_ready)

            if nc > 1:
                @pl.when(wg > 0)
                def _wait_q():
                    plgpu.barrier_wait(q_ready)

            row, col = iota(rows_shape, 0), iota(rows_shape, 1)
            q_pos = first_pos + lax.rem(row, jnp.int32(block_q))

            def qk(buf):
                def body(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[buf], (1, 0)))
                    return acc_ref[...]
                return body

            def scale(sc):
                if soft_cap is None:
                    return sc * (sm_scale * cm.LOG2E)
                return jnp.tanh(sc * (sm_scale / soft_cap)) * (soft_cap * cm.LOG2E)

            def scores(s):
                """Scaled QKᵀ of KV block s (waits for its K, then frees the K slot)."""
                buf = lax.rem(s, jnp.int32(depth))
                plgpu.barrier_wait(k_bar.at[buf])
                # Mosaic GPU's interpreter (0.10) takes neither a transposed nor a register
                # wgmma operand, nor run_state: there both products are plain dots.
                if interpret:
                    sc = jax.lax.dot_general(q_smem[...], k_smem.at[buf][...],
                                             (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)
                else:
                    sc = pl.run_scoped(qk(buf), plgpu.ACC(rows_shape, jnp.float32))
                plgpu.barrier_arrive(k_free.at[buf])
                return scale(sc)

            def update(s, sc, carry, masked):
                """Online softmax over block s's scores and PV (waits for its V, frees it)."""
                acc, m_i, l_i = carry
                buf = lax.rem(s, jnp.int32(depth))
                blk = lo_blk + s
                if masked:
                    kv_pos = blk * block_kv + col
                    mask = (kv_pos <= q_pos) & (kv_pos < kv_len)
                    if sliding_window is not None:
                        mask = mask & (kv_pos > q_pos - sliding_window)
                    sc = jnp.where(mask, sc, cm.NEG)
                m_new = jnp.maximum(m_i, sc.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, rows_shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                plgpu.barrier_wait(v_bar.at[buf])
                if masked:
                    # Rows at or past kv_len may be NaN, and P (0 there) times NaN is NaN.
                    # Only this warpgroup reads this block: no race on the rewrite.
                    @pl.when(blk * block_kv + block_kv > kv_len)
                    def _zero_tail():
                        vrow = iota((block_kv, head_dim), 0)
                        v = load_tile(v_smem.at[buf])
                        v_smem.at[buf][...] = jnp.where(blk * block_kv + vrow < kv_len, v,
                                                        jnp.zeros_like(v))
                        plgpu.commit_smem()

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[buf])

                if interpret:
                    acc = acc + jnp.dot(p.astype(dtype), v_smem.at[buf][...],
                                        preferred_element_type=jnp.float32)
                else:  # accumulate into acc in place (the wgmma's C operand)
                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[buf])
                return acc, m_new, l_i

            def step(i, carry, masked):
                s = wg + nc * i
                return update(s, scores(s), carry, masked)

            def overlapped_step(i, carry, masked):
                """Block i's softmax and PV while the tensor cores compute block i + 1's QKᵀ
                (issued first, asynchronously; read after PV)."""
                *carry, sc = carry
                if interpret:  # no async wgmma there: the same order of barrier events
                    carry = update(i, sc, carry, masked)
                    return (*carry, scores(i + 1))
                nxt = lax.rem(i + 1, jnp.int32(depth))
                plgpu.barrier_wait(k_bar.at[nxt])

                def body(qk_ref):
                    plgpu.wgmma(qk_ref, q_smem, plgpu.transpose_ref(k_smem.at[nxt], (1, 0)))
                    return (*update(i, sc, carry, masked), qk_ref[...])

                *carry, sc = pl.run_scoped(body, plgpu.ACC(rows_shape, jnp.float32))
                plgpu.barrier_arrive(k_free.at[nxt])
                return (*carry, scale(sc))

            carry = (in_layout(jnp.zeros((TILE_ROWS, head_dim), jnp.float32),
                               plgpu.Layout.WGMMA),
                     in_layout(jnp.full((TILE_ROWS,), cm.NEG, jnp.float32),
                               plgpu.Layout.WGMMA.reduce(1)),
                     in_layout(jnp.zeros((TILE_ROWS,), jnp.float32),
                               plgpu.Layout.WGMMA.reduce(1)))
            if overlap:  # one compute warpgroup: n_blk > 0 blocks, all its own
                # Blocks 0 .. n_blk - 2 overlapped (unmasked ones first), the last one alone,
                # masked (a superset mask is exact for a block that needs none).
                n_ov_full = jnp.minimum(n_full, n_blk - 1)
                carry = (*carry, scores(jnp.int32(0)))
                carry = lax.fori_loop(0, n_ov_full,
                                      functools.partial(overlapped_step, masked=False), carry)
                *carry, sc = lax.fori_loop(n_ov_full, n_blk - 1,
                                           functools.partial(overlapped_step, masked=True), carry)
                acc, m_i, l_i = update(n_blk - 1, sc, carry, masked=True)
            else:
                # This warpgroup's blocks s = wg + nc * i: the unmasked ones (s < n_full), then
                # the rest (the diagonal and the kv_len tail, masked).
                n_mine_full = lax.div(jnp.maximum(n_full - wg, 0) + nc - 1, jnp.int32(nc))
                n_mine = lax.div(jnp.maximum(n_blk - wg, 0) + nc - 1, jnp.int32(nc))
                carry = lax.fori_loop(0, n_mine_full, functools.partial(step, masked=False),
                                      carry)
                acc, m_i, l_i = lax.fori_loop(n_mine_full, n_mine,
                                              functools.partial(step, masked=True), carry)

            if nc > 1:  # warpgroup 1 hands its partial softmax state to warpgroup 0
                @pl.when(wg == 1)
                def _publish():
                    acc_smem[...] = acc
                    m_smem[...] = m_i
                    l_smem[...] = l_i
                    plgpu.barrier_arrive(merge_bar)

            @pl.when(wg == 0)
            def _finish():
                acc_0, l_0 = acc, l_i
                if nc > 1:
                    plgpu.barrier_wait(merge_bar)
                    m_1, l_1 = load_row(m_smem), load_row(l_smem)
                    m = jnp.maximum(m_i, m_1)
                    a_0, a_1 = jnp.exp2(m_i - m), jnp.exp2(m_1 - m)
                    acc_0 = (acc * lax.broadcast_in_dim(a_0, acc.shape, [0])
                             + load_tile(acc_smem) * lax.broadcast_in_dim(a_1, acc.shape, [0]))
                    l_0 = l_i * a_0 + l_1 * a_1
                l_safe = jnp.where(l_0 > 0, l_0, jnp.ones_like(l_0))
                o_smem[...] = (acc_0 / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)

        if use_tile:
            @pl.when(decode_here)
            def _decode():
                off = run_decode_tile(
                    q_ref, o_smem, q16_smem, p_smem, ot_smem, k_smem, v_smem, q_bar, k_bar,
                    v_bar, k_free, v_free, q_start=q_start, kv_head=kv_head, kv_len=kv_len,
                    lo_blk=lo_blk, n_blk=n_blk, group=group, block_kv=block_kv, depth=depth,
                    sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
                    interpret=interpret)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(off, group)],
                                        o_ref.at[q_start, pl.ds(kv_head * group, group)])
                plgpu.wait_smem_to_gmem(0)

        @pl.when((wg == 0) & (n_blk == 0) & is_pad)
        def _zeros():  # padding rows: the output is defined as zero there
            o_smem[...] = in_layout(jnp.zeros((TILE_ROWS, head_dim), dtype),
                                    plgpu.Layout.WGMMA)

        @pl.when((wg == 0) & (tile_items | is_pad))
        def _store():
            plgpu.commit_smem()
            store_rows(o_smem, o_ref, q_start + tok0, n_tok, kv_head, group, block_q)
            plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == nc)
    def _memory():
        if compute_regs and not interpret:
            plgpu.set_max_registers(40, action="decrease")
        chunk = min(page_size, block_kv)

        def page_ids(s):
            """Page id and row offset of each chunk of block s: one table read serves K and V."""
            out = []
            for c in range(block_kv // chunk):
                pos = (lo_blk + s) * block_kv + c * chunk
                idx = jnp.minimum(lax.div(pos, jnp.int32(page_size)), max_pages - 1)
                out.append((block_tables_ref[req_row, idx], lax.rem(pos, jnp.int32(page_size))))
            return tuple(out)

        def fetch(s, ids):
            # The next block's ids are read before this block's copies wait for a free slot,
            # so the table reads' latency hides behind that wait (the copies need them now).
            nxt = page_ids(jnp.minimum(s + 1, n_blk - 1))
            buf = lax.rem(s, jnp.int32(depth))
            for kind, smem, bar, free in ((0, k_smem, k_bar, k_free), (1, v_smem, v_bar, v_free)):
                @pl.when(s >= depth)
                def _wait():
                    plgpu.barrier_wait(free.at[buf])

                for c, (page, off) in enumerate(ids):
                    plgpu.copy_gmem_to_smem(kv_ref.at[page, kind, kv_head, pl.ds(off, chunk)],
                                            smem.at[buf, pl.ds(c * chunk, chunk)], bar.at[buf])
            return nxt

        lax.fori_loop(0, n_blk, fetch, page_ids(jnp.int32(0)))

        # Observe the last ``depth`` releases too, so every barrier phase has been waited on
        # when the CTA ends (the interpreter checks it; a persistent loop would need it).
        @pl.loop(jnp.maximum(n_blk - depth, 0), n_blk)
        def _drain(s):
            buf = lax.rem(s, jnp.int32(depth))
            plgpu.barrier_wait(k_free.at[buf])
            plgpu.barrier_wait(v_free.at[buf])


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "soft_cap", "sliding_window", "block_kv", "depth", "compute_wgs", "compute_regs",
    "overlap", "decode_tile", "interpret"))
def ragged_paged_attention(q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs, *,
                           sm_scale: float, soft_cap: float | None = None,
                           sliding_window: int | None = None, block_kv: int | None = None,
                           depth: int | None = None, compute_wgs: int | None = None,
                           compute_regs: int | None = None, overlap: bool | None = None,
                           decode_tile: bool | None = None,
                           interpret: bool = False) -> jax.Array:
    """Same contract as ``reference.ragged_paged_attention``; see ``supported`` for the shapes
    it takes. ``block_kv``, ``depth``, ``compute_wgs``, ``compute_regs``, ``overlap``,
    ``decode_tile`` override the tuned table (benchmarks); ``interpret`` runs Mosaic GPU's interpreter on CPU (the CI tests; see
    ``_mosaic_common.interpreter``)."""
    num_tokens, num_q_heads, head_dim, num_kv_heads, page_size, num_reqs = cm.check_ragged(
        q, kv_pages, kv_lens, block_tables, query_start_loc, sliding_window)
    why = supported(num_q_heads, num_kv_heads, head_dim, page_size, q.dtype)
    if why:
        raise ValueError(f"Mosaic GPU ragged kernel does not take {why}")
    cfg = MOSAIC_TUNING[head_dim]
    block_kv = block_kv or cfg.block_kv
    depth = depth or cfg.depth
    compute_regs = cfg.compute_regs if compute_regs is None else compute_regs
    compute_wgs = compute_wgs or cfg.compute_wgs
    if compute_wgs not in (1, 2) or depth % compute_wgs:
        raise ValueError(f"compute_wgs must be 1 or 2 and divide depth, got {compute_wgs} "
                         f"(depth {depth})")
    overlap = cfg.overlap if overlap is None else overlap
    decode_tile = cfg.decode_tile if decode_tile is None else decode_tile
    if (overlap or decode_tile) and compute_wgs != 1:
        raise ValueError("overlap and decode_tile take one compute warpgroup (compute_wgs=1)")
    if block_kv % 64 or block_kv % min(page_size, block_kv) or block_kv > 256:
        # 64: wgmma's K step for 16-bit operands in 128-byte swizzled tiles (P·V has K = block_kv)
        raise ValueError(f"block_kv must be a multiple of 64 (<= 256) and of the page chunk, "
                         f"got {block_kv}")
    group = num_q_heads // num_kv_heads
    block_q = TILE_ROWS // group
    # Σ cdiv(q_len_b, block_q) over live requests + the padding pseudo request's blocks.
    num_slots = num_tokens // block_q + num_reqs + 1
    # The decode tile's transposed operands lower only with 32-byte swizzle (NOTES.md), and the
    # ring is shared by both tiles.
    swizzle = 32 if decode_tile else 128
    tiled = (plgpu.TilingTransform((8, swizzle // q.dtype.itemsize)),
             plgpu.SwizzleTransform(swizzle))
    dec = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))
    dec_cols = 16  # the decode tile's N: G heads, padded
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        group=group, block_q=block_q, block_kv=block_kv, depth=depth, page_size=page_size,
        num_slots=num_slots, search_steps=max(1, (num_reqs + 1).bit_length() + 1),
        compute_wgs=compute_wgs, compute_regs=compute_regs, overlap=overlap,
        decode_tile=decode_tile, interpret=interpret)
    chunks = block_kv // min(page_size, block_kv)
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=[
            plgpu.SMEM((TILE_ROWS, head_dim), q.dtype, transforms=tiled),  # q
            plgpu.SMEM((TILE_ROWS, head_dim), q.dtype),  # q in, o out: untiled, any row
            plgpu.SMEM((depth, block_kv, head_dim), q.dtype, transforms=tiled),  # k ring
            plgpu.SMEM((depth, block_kv, head_dim), q.dtype, transforms=tiled),  # v ring
            # warpgroup 1's partial (acc, m, l) for the merge (none with one warpgroup)
            *([plgpu.SMEM((TILE_ROWS, head_dim), jnp.float32,
                          transforms=(plgpu.TilingTransform((8, 32)),
                                      plgpu.SwizzleTransform(128))),
               plgpu.SMEM((TILE_ROWS,), jnp.float32), plgpu.SMEM((TILE_ROWS,), jnp.float32)]
              if compute_wgs > 1 else [None, None, None]),
            # decode tile: Q (16 x H), P (block_kv x 16), Oᵀ (H x 16); none without it
            plgpu.SMEM((dec_cols, head_dim), q.dtype, transforms=dec) if decode_tile else None,
            plgpu.SMEM((block_kv, dec_cols), q.dtype, transforms=dec) if decode_tile else None,
            plgpu.SMEM((head_dim, dec_cols), q.dtype, transforms=dec) if decode_tile else None,
            plgpu.Barrier(num_arrivals=group),
            plgpu.Barrier(num_arrivals=chunks, num_barriers=depth),
            plgpu.Barrier(num_arrivals=chunks, num_barriers=depth),
            plgpu.Barrier(num_barriers=depth),
            plgpu.Barrier(num_barriers=depth),
            plgpu.Barrier(),  # q_ready: warpgroup 0 has laid out Q
            plgpu.Barrier(),  # merge_bar: warpgroup 1 has published its partial state
        ],
        grid=(num_slots * num_kv_heads,),
        grid_names=("item",),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        # Lane semantics: JAX 0.10's default, pinned so that 0.11 (whose default is the
        # warpgroup dialect with layout inference) compiles the same program.
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpreter() if interpret else None,
    )
    return call(jnp.reshape(num_seqs, (1,)).astype(jnp.int32), kv_lens.astype(jnp.int32),
                block_tables.astype(jnp.int32), query_start_loc.astype(jnp.int32), q, kv_pages)
