"""Ragged mixed prefill + decode paged attention for Hopper: Pallas with the Mosaic GPU lowering.

The Triton-lowered kernel (``ragged_attention.py``) stays the portable default; this one is
the Hopper path: K/V pages come in by TMA (one bulk copy per page chunk, issued by a memory
warpgroup) and both matmuls are wgmma on 64-row tiles. ``gpu.ragged_paged_attention`` takes it
on Hopper where it measured faster (``AUTO_HEAD_DIMS``; docs/benchmarks/NOTES.md, fourth to
sixth passes).

Work items are (query span slot, kv head) pairs, a span being ``q_tiles`` 64-row tiles of one
request, listed by ``item_schedule`` (request, kv head, first token each; natural or
longest-first order) and grouped by CTA (CTA p takes ``items[starts[p]:starts[p + 1]]``);
``item_scalars`` adds the request's query start and length, kv length and padding flag, so a
CTA starts on one level of loads. One CTA per item by default (CTA p takes item p); with
``persistent`` one CTA per SM takes every P-th item of the order, its K/V ring running on
from one item into the next::

    slot layout: request b's first slot = qsl[b] // span + b (span = q_tiles * block_q tokens);
    one extra pseudo request (b = num_seqs, rows [qsl[num_seqs], T)) covers the padding rows,
    which get zeros.

    tile rows (64 = G heads x block_q tokens):  row r = head g * block_q + token t
        Q comes in as G TMA copies (one per q head of the group, block_q rows each): straight
        into the swizzled tile where the rows start on a multiple of 8 (and Q's row count is
        one), else untiled and re-laid into the tile. A full tile that came in tiled leaves
        from the tile; the others from the untiled buffer, partial bands as a ladder of
        power-of-two TMA stores.

    warpgroups 0..q_tiles-1 (compute): one tile each, all on the same K/V blocks:
        QK^T (wgmma) -> masked online softmax (exp2) -> PV (wgmma); with two tiles and
        ``pingpong`` they take turns on the tensor cores (one's softmax hides behind the
        other's matmuls); a tile with fewer blocks (causal) releases the rest unread
    warpgroup q_tiles (memory): page ids from the block table (once per block, for K and V)
        -> TMA copies of K and V chunks (min(page, block_kv) rows each) into a ``depth``-deep
        ring of mbarrier-guarded slots, each slot freed when every compute warpgroup has
        released it

Named ranges (``region``) mark the phases of each warpgroup for Mosaic GPU's profiler
(``profile_dir``; ``tools/profile_mosaic.py`` sums them per role).

Key rows at or past kv_len may hold anything (NaN in the tests): K rows are masked in the
scores; the V rows of the last block are zeroed in shared memory before PV, since 0 * NaN is
NaN inside the MMA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpage.kernels_pallas.gpu import _common as cm
from jaxpage.kernels_pallas.gpu._mosaic_common import (PAD_SPANS, check_config, interpreter,
                                                       item_fields, item_scalars, item_schedule,
                                                       memory_regs, memory_warpgroup,
                                                       register_ops, store_rows)

TILE_ROWS = 64  # one warpgroup's wgmma M
PROFILE_RANGES = 512  # named ranges per warpgroup kept by the profiler (``profile_dir``)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    block_kv: int = 64  # KV tokens per pipeline step
    depth: int = 3  # K/V ring depth (pipeline stages)
    q_tiles: int = 1  # 64-row tiles per item, one compute warpgroup each (1 or 2)
    pingpong: bool = True  # with two tiles: take turns on the tensor cores
    compute_regs: int = 0  # setmaxnreg for the compute warpgroups (0: compiler's choice)
    order: str = "auto"  # work list order: one of ORDERS (``item_schedule``)
    persistent: bool = False  # one CTA per SM looping over the work list (else one per item)


# By measurement (tools/study_mosaic.py; docs/benchmarks/kernels_mosaic_runs.md, NOTES.md
# fourth to tenth passes): two 64-row tiles per item with ping-pong and setmaxnreg 232,
# 128-key blocks two deep, one CTA per item in batch order ("auto" with decodes), on H200 and
# H100; every other block size, depth, order, persistent and claimed-CTA form measured slower.
MOSAIC_TUNING: dict[int, MosaicConfig] = {
    64: MosaicConfig(block_kv=128, depth=2, q_tiles=2, compute_regs=232),
    128: MosaicConfig(block_kv=128, depth=2, q_tiles=2, compute_regs=232),
}


# Head dims where ``backend="auto"`` takes this kernel on Hopper: where it measured faster than
# the Triton kernel (H = 128, above). Not H = 64, where it measured slower.
AUTO_HEAD_DIMS = (128,)


def supported(num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
              dtype, kv_dtype=None) -> str | None:
    """None when this kernel handles the shape, else why not (the caller falls back).
    ``kv_dtype``: the pool's, when it differs from q's ``dtype``."""
    group = num_q_heads // num_kv_heads
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name} (wgmma path takes bfloat16/float16)"
    if kv_dtype is not None and jnp.dtype(kv_dtype) != jnp.dtype(dtype):
        # The ring feeds wgmma straight from shared memory: K/V must be in q's dtype there.
        return f"kv dtype {jnp.dtype(kv_dtype).name} (the pool must hold q's dtype)"
    if head_dim not in MOSAIC_TUNING:
        return f"head_dim {head_dim} (tuned: {sorted(MOSAIC_TUNING)})"
    if TILE_ROWS % group or (TILE_ROWS // group) % 8:
        return f"group {group} (needs 64 / group to be a multiple of 8)"
    if page_size % 8:
        return f"page_size {page_size} (needs a multiple of 8)"
    return None


def _kernel(block_tables_ref, items_ref, starts_ref, q_ref, kv_ref,  # inputs
            o_ref,  # output
            q_smem, o_smem, k_smem, v_smem,  # scratch: per-tile Q (swizzled), Q in / O out
            q_bar, k_bar, v_bar, k_free, v_free, sched,  # barriers
            *, sm_scale, soft_cap, sliding_window, group, block_q, block_kv, depth, page_size,
            q_tiles, pingpong, compute_regs, one_per_cta, profile_regions, interpret):
    def region(name):  # a range in the profiler's trace (``profile_dir``), if one it keeps
        keep = profile_regions is None or name in profile_regions
        return jax.named_scope(name) if keep else contextlib.nullcontext()

    num_reqs = block_tables_ref.shape[0]
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    span = q_tiles * block_q  # query tokens per item
    program = lax.axis_index("program")
    # This CTA's items: items[starts[program] : starts[program + 1]]; the K/V ring runs on
    # from one item into the next (ring step = blocks before + s). With one item per CTA it
    # is item ``program``, known without a load.
    my_first = program if one_per_cta else starts_ref[program]
    my_items = 1 if one_per_cta else starts_ref[program + 1] - my_first
    wg = lax.axis_index("wg")
    iota, in_layout, load_tile = register_ops(interpret)

    def item_at(i):
        """The scalars of this CTA's item i (``item_scalars``: one level of loads)."""
        return item_fields(items_ref, my_first + i, num_reqs=num_reqs, block_q=block_q,
                           span=span, block_kv=block_kv, sliding_window=sliding_window)

    @pl.when(wg < q_tiles)
    def _compute():
        if compute_regs and not interpret:
            plgpu.set_max_registers(compute_regs, action="increase")
        q_tile, io = q_smem.at[wg], o_smem.at[wg]
        rows_shape = (TILE_ROWS, block_kv)

        def one_item(i, base):
            it = item_at(i)
            q_start, kv_head, kv_len, lo_blk, n_blk = (
                it[k] for k in ("q_start", "kv_head", "kv_len", "lo_blk", "n_blk"))
            tok0, n_tok, first_pos, hi = it["tile"](wg)
            n_mine = jnp.where(hi > 0, lax.div(hi + block_kv - 1, jnp.int32(block_kv)) - lo_blk,
                               0)
            # Blocks every row of the tile sees in full (no mask): before its first query.
            n_full = 0 if sliding_window is not None else jnp.minimum(
                lax.div(first_pos + 1, jnp.int32(block_kv)), n_mine)
            # Pingpong: the two compute warpgroups take turns on the tensor cores (one's
            # softmax overlaps the other's matmuls), meeting at ``sched``; only when both
            # tiles have rows.
            pp_on = (it["tile"](q_tiles - 1)[1] > 0) if pingpong else None

            def meet(arrive=True, wait=True):
                if pingpong:
                    @pl.when(pp_on)
                    def _meet():
                        if arrive:
                            plgpu.barrier_arrive(sched)
                        if wait:
                            plgpu.barrier_wait(sched)

            def ring(s):
                return lax.rem(base + s, jnp.int32(depth))

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last output has left io

            @pl.when(n_blk > 0)
            def _item():
                if q_tiles > 1:
                    pl.when(wg == 1)(meet)

                @pl.when(n_mine > 0)
                def _attend():
                    # A TMA copy into tiled shared memory addresses global memory in whole
                    # 8-row tiles too (Mosaic GPU): Q rows that start on a multiple of 8, of a
                    # Q whose row count is one (every engine bucket's), land in the swizzled
                    # tile directly; the others land untiled (in the output buffer, free until
                    # the end) and are re-laid into the tile (~1 µs an item, bank conflicts).
                    q_row = q_start + tok0

                    def q_copies(dst):
                        for g in range(group):
                            plgpu.copy_gmem_to_smem(
                                q_ref.at[pl.ds(q_row, block_q), kv_head * group + g],
                                dst.at[pl.ds(g * block_q, block_q)], q_bar.at[wg])
                        plgpu.barrier_wait(q_bar.at[wg])

                    with region("q_in"):
                        aligned = False
                        if q_ref.shape[0] % 8 == 0:
                            aligned = lax.rem(q_row, jnp.int32(8)) == 0
                            pl.when(aligned)(lambda: q_copies(q_tile))

                        @pl.when(jnp.logical_not(aligned))
                        def _relayout():
                            q_copies(io)
                            q_tile[...] = load_tile(io, fast=False)
                            plgpu.commit_smem()
                    row, col = iota(rows_shape, 0), iota(rows_shape, 1)
                    q_pos = first_pos + lax.rem(row, jnp.int32(block_q))
                    def scores(buf):
                        """Raw QKᵀ of ring slot buf's block (K awaited), the other warpgroup's
                        turn on the tensor cores while it runs."""
                        # Mosaic GPU's interpreter (0.10) takes neither a transposed nor a
                        # register wgmma operand, nor run_state: there both products are dots.
                        if interpret:
                            sc = lax.dot_general(q_tile[...], k_smem.at[buf][...],
                                                 (((1,), (1,)), ((), ())),
                                                 preferred_element_type=jnp.float32)
                            meet()
                        else:
                            def qk(acc_ref):
                                plgpu.wgmma(acc_ref, q_tile, k_smem.at[buf].T)
                                meet()  # the other warpgroup's turn while this QKᵀ runs
                                return acc_ref[...]
                            with region("qk"):
                                sc = pl.run_scoped(qk, plgpu.ACC(rows_shape, jnp.float32))
                        plgpu.barrier_arrive(k_free.at[buf])
                        return sc

                    def softmax(sc, blk, state, masked):
                        """P of block blk (bf16/fp16), the running (acc, max, sum) rescaled."""
                        acc, m_i, l_i = state
                        if soft_cap is None:
                            sc = sc * (sm_scale * cm.LOG2E)
                        else:
                            sc = jnp.tanh(sc * (sm_scale / soft_cap)) * (soft_cap * cm.LOG2E)
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
                        return p.astype(dtype), (acc, m_new, l_i)

                    def pv(s, buf, blk, p16, acc, masked, wait_next_k):
                        """acc += P·V(s), then V(s)'s slot released; K(s + 1) awaited
                        meanwhile with ``wait_next_k``."""
                        meet(wait=False)  # softmax done
                        with region("wait_v"):
                            plgpu.barrier_wait(v_bar.at[buf])
                        with region("turn"):
                            meet(arrive=False)  # the tensor cores are free
                        if masked:
                            # Rows at or past kv_len may be NaN, and P (0 there) times NaN is
                            # NaN. Every tile that reads this block zeroes them first: each
                            # writes the same values, so a concurrent read sees real rows or
                            # zeros only.
                            @pl.when(blk * block_kv + block_kv > kv_len)
                            def _zero_tail():
                                vrow = iota((block_kv, head_dim), 0)
                                v = load_tile(v_smem.at[buf])
                                v_smem.at[buf][...] = jnp.where(
                                    blk * block_kv + vrow < kv_len, v, jnp.zeros_like(v))
                                plgpu.commit_smem()

                        def wait_next():
                            if wait_next_k:
                                @pl.when(s + 1 < n_mine)
                                def _wait():
                                    plgpu.barrier_wait(k_bar.at[ring(s + 1)])

                        if interpret:
                            acc = acc + jnp.dot(p16, v_smem.at[buf][...],
                                                preferred_element_type=jnp.float32)
                            wait_next()
                        else:  # accumulate into acc in place (the wgmma's C operand)
                            def pv_(acc_ref):
                                plgpu.wgmma(acc_ref, p16, v_smem.at[buf])
                                wait_next()  # while the tensor cores run PV
                            with region("pv_wait_k"):
                                acc = pl.run_state(pv_)(plgpu.ACC.init(acc))
                        plgpu.barrier_arrive(v_free.at[buf])
                        return acc

                    def step(s, carry, masked):
                        """Block s into the running softmax state (K(s) was awaited before,
                        K(s + 1) is awaited during PV(s))."""
                        buf, blk = ring(s), lo_blk + s
                        sc = scores(buf)
                        p16, (acc, m_i, l_i) = softmax(sc, blk, carry, masked)
                        return pv(s, buf, blk, p16, acc, masked, True), m_i, l_i

                    carry = (in_layout(jnp.zeros((TILE_ROWS, head_dim), jnp.float32),
                                       plgpu.Layout.WGMMA),
                             in_layout(jnp.full((TILE_ROWS,), cm.NEG, jnp.float32),
                                       plgpu.Layout.WGMMA.reduce(1)),
                             in_layout(jnp.zeros((TILE_ROWS,), jnp.float32),
                                       plgpu.Layout.WGMMA.reduce(1)))
                    with region("wait_k"):
                        plgpu.barrier_wait(k_bar.at[ring(0)])  # later K: during PV
                    # Unmasked blocks first, then the rest (the diagonal and the kv_len tail).
                    carry = lax.fori_loop(0, n_full, functools.partial(
                        step, masked=False), carry)
                    acc, _, l_i = lax.fori_loop(n_full, n_mine, functools.partial(
                        step, masked=True), carry)
                    with region("out"):
                        l_safe = jnp.where(l_i > 0, l_i, jnp.ones_like(l_i))
                        out = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
                        # A full tile whose Q came in tiled goes out the same way, from the Q
                        # tile (free after the last QKᵀ); the others row by row from io.
                        tiled = aligned is not False and aligned & (n_tok == block_q)
                        if tiled is not False:
                            @pl.when(tiled)
                            def _tiled_out():
                                q_tile[...] = out
                                plgpu.commit_smem()
                                for g in range(group):
                                    plgpu.copy_smem_to_gmem(
                                        q_tile.at[pl.ds(g * block_q, block_q)],
                                        o_ref.at[pl.ds(q_row, block_q), kv_head * group + g])

                        @pl.when(jnp.logical_not(tiled))
                        def _rows_out():
                            io[...] = out
                            plgpu.commit_smem()
                            store_rows(io, o_ref, q_row, n_tok, kv_head, group, block_q)

                # The item's blocks past this tile's: observed and released, turn for turn.
                @pl.loop(n_mine, n_blk)
                def _rest(s):
                    buf = ring(s)
                    plgpu.barrier_wait(k_bar.at[buf])
                    plgpu.barrier_arrive(k_free.at[buf])
                    meet()
                    plgpu.barrier_wait(v_bar.at[buf])
                    plgpu.barrier_arrive(v_free.at[buf])
                    meet()

                if q_tiles > 1:
                    pl.when(wg == 0)(meet)

            pad_tok0 = it["tile"](0)[0]

            @pl.when(it["is_pad"] & (pad_tok0 < it["q_len"]))
            def _zeros():  # padding rows: the output is defined as zero there
                io[...] = in_layout(jnp.zeros((TILE_ROWS, head_dim), dtype),
                                    plgpu.Layout.WGMMA)
                plgpu.commit_smem()

                @pl.loop(0, PAD_SPANS)  # a padding item takes PAD_SPANS spans
                def _band(j):
                    band = pad_tok0 + (j * q_tiles + wg) * block_q
                    n_rows = jnp.clip(it["q_len"] - band, 0, block_q)
                    pl.when(n_rows > 0)(lambda: store_rows(
                        io, o_ref, q_start + band, n_rows, kv_head, group, block_q))

            return base + n_blk

        lax.fori_loop(0, my_items, one_item, jnp.int32(0))
        # Before the CTA ends, the output stores must have read shared memory; their global
        # writes complete on their own (as CUTLASS's epilogues end).
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == q_tiles)
    def _memory():
        if compute_regs and not interpret:
            plgpu.set_max_registers(memory_regs(q_tiles, compute_regs), action="decrease")
        memory_warpgroup(item_at, my_items, block_tables_ref, kv_ref,
                         (k_smem, k_bar, k_free), (v_smem, v_bar, v_free),
                         block_kv=block_kv, depth=depth, page_size=page_size, region=region)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "soft_cap", "sliding_window", "block_kv", "depth", "q_tiles", "pingpong",
    "compute_regs", "order", "programs", "profile_dir", "profile_regions",
    "interpret"))
def ragged_paged_attention(q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs, *,
                           sm_scale: float, soft_cap: float | None = None,
                           sliding_window: int | None = None, block_kv: int | None = None,
                           depth: int | None = None, q_tiles: int | None = None,
                           pingpong: bool | None = None, compute_regs: int | None = None,
                           order: str | None = None, programs: int | None = None,
                           profile_dir: str | None = None,
                           profile_regions: tuple[str, ...] | None = None,
                           interpret: bool = False) -> jax.Array:
    """Same contract as ``reference.ragged_paged_attention``; see ``supported`` for the shapes
    it takes. ``block_kv``, ``depth``, ``q_tiles``, ``pingpong``, ``compute_regs``, ``order``,
    override the tuned table (benchmarks); ``programs`` is the number of CTAs,
    each taking its share of the work list (``item_schedule``; default: one per item, or one
    per SM of the device with the tuned ``persistent``, 132 SMs off GPU); ``profile_dir``
    writes a per-warpgroup trace of the kernel's named regions there (Mosaic GPU's profiler,
    ``tools/profile_mosaic.py``), only those in ``profile_regions`` if given; ``interpret``
    runs Mosaic GPU's interpreter on CPU (the CI tests; see ``_mosaic_common.interpreter``).

    Every array reaches the custom call at an address Mosaic GPU checks for 256-byte alignment
    ("Input buffer 0 is not 256-byte aligned"). Under jit, XLA's dynamic-slice fusion may hand
    the call a contiguous slice of a larger buffer as a view at a 128-byte offset (seen with
    JAX 0.11.2): slice such inputs (``block_tables`` out of a packed metadata buffer) at
    256-byte offsets, as the engine's packed step buffer does (``PACK_ALIGN``)."""
    num_tokens, num_q_heads, head_dim, num_kv_heads, page_size, num_reqs = cm.check_ragged(
        q, kv_pages, kv_lens, block_tables, query_start_loc, sliding_window)
    why = supported(num_q_heads, num_kv_heads, head_dim, page_size, q.dtype, kv_pages.dtype)
    if why:
        raise ValueError(f"Mosaic GPU ragged kernel does not take {why}")
    cfg = MOSAIC_TUNING[head_dim]
    block_kv = block_kv or cfg.block_kv
    depth = depth or cfg.depth
    q_tiles = q_tiles or cfg.q_tiles
    pingpong = (cfg.pingpong if pingpong is None else pingpong) and q_tiles == 2
    compute_regs = cfg.compute_regs if compute_regs is None else compute_regs
    order = order or cfg.order
    check_config(q_tiles=q_tiles, block_kv=block_kv, depth=depth, page_size=page_size,
                 compute_regs=compute_regs, order=order, tile_bytes=TILE_ROWS * head_dim
                 * q.dtype.itemsize, row_bytes=head_dim * q.dtype.itemsize)
    group = num_q_heads // num_kv_heads
    block_q = TILE_ROWS // group
    # Σ cdiv(q_len_b, span) over live requests + the padding pseudo request's spans.
    num_slots = num_tokens // (q_tiles * block_q) + num_reqs + 1
    if programs is None and cfg.persistent:
        dev = jax.devices()[0]
        programs = getattr(dev, "core_count", 0) if dev.platform == "gpu" else 0
        programs = programs or 132
    programs = max(1, min(programs or num_slots * num_kv_heads, num_slots * num_kv_heads))
    items, starts = item_schedule(kv_lens.astype(jnp.int32), query_start_loc.astype(jnp.int32),
                          num_seqs, span=q_tiles * block_q, num_slots=num_slots,
                          num_kv_heads=num_kv_heads, block_kv=block_kv, order=order,
                          programs=programs)
    tiled = (plgpu.TilingTransform((8, 128 // q.dtype.itemsize)), plgpu.SwizzleTransform(128))
    items = item_scalars(items, kv_lens.astype(jnp.int32), query_start_loc.astype(jnp.int32),
                         num_seqs, num_tokens)
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        group=group, block_q=block_q, block_kv=block_kv, depth=depth, page_size=page_size,
        q_tiles=q_tiles, pingpong=pingpong, compute_regs=compute_regs,
        one_per_cta=programs == num_slots * num_kv_heads, profile_regions=profile_regions,
        interpret=interpret)
    chunks = block_kv // min(page_size, block_kv)
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=[
            plgpu.SMEM((q_tiles, TILE_ROWS, head_dim), q.dtype, transforms=tiled),  # q
            plgpu.SMEM((q_tiles, TILE_ROWS, head_dim), q.dtype),  # q in, o out: untiled
            plgpu.SMEM((depth, block_kv, head_dim), q.dtype, transforms=tiled),  # k ring
            plgpu.SMEM((depth, block_kv, head_dim), q.dtype, transforms=tiled),  # v ring
            plgpu.Barrier(num_arrivals=group, num_barriers=q_tiles),  # q landed, per tile
            plgpu.Barrier(num_arrivals=chunks, num_barriers=depth),  # k landed
            plgpu.Barrier(num_arrivals=chunks, num_barriers=depth),  # v landed
            plgpu.Barrier(num_arrivals=q_tiles, num_barriers=depth),  # k slot free
            plgpu.Barrier(num_arrivals=q_tiles, num_barriers=depth),  # v slot free
            plgpu.Barrier(num_arrivals=2) if pingpong else None,  # pingpong turns
        ],
        grid=(programs,),
        grid_names=("program",),
        num_threads=q_tiles + 1,
        thread_name="wg",
        # Lane semantics: JAX 0.10's default, pinned so that 0.11 (whose default is the
        # warpgroup dialect with layout inference) compiles the same program.
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane,
            **(dict(profile_space=PROFILE_RANGES, profile_dir=profile_dir) if profile_dir
               else {})),
        interpret=interpreter() if interpret else None,
    )
    return call(block_tables.astype(jnp.int32), items, starts, q, kv_pages)
