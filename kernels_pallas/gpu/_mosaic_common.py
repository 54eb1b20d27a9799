"""Helpers of the Mosaic GPU ragged kernel (``ragged_mosaic``): register ops, the CPU
interpreter, ragged TMA stores, the work list, and the memory warpgroup."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


# JAX 0.10 takes ``plgpu.load(ref, idx, ...)`` (idx required); 0.11 deprecates idx in favour
# of ``plgpu.load(ref.at[idx], ...)``.
_LOAD_IDX = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_NEEDS_IDX = _LOAD_IDX is not None and _LOAD_IDX.default is inspect.Parameter.empty


def load(ref, **kw):
    """``plgpu.load`` of the whole ref, in the form this JAX takes without a warning."""
    return plgpu.load(ref, (), **kw) if _LOAD_NEEDS_IDX else plgpu.load(ref, **kw)


def register_ops(interpret: bool):
    """(iota, in_layout, load_tile) in wgmma's register layout, or — for Mosaic GPU's
    interpreter, which knows no register layouts — their plain jnp forms."""
    if interpret:
        def iota(shape, dim):
            return lax.broadcasted_iota(jnp.int32, shape, dim)

        def in_layout(x, layout):
            del layout
            return x

        def load_tile(ref, fast=True):
            del fast
            return ref[...]

        return iota, in_layout, load_tile

    def iota(shape, dim):
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def load_tile(ref, fast=True):  # fast=False: allow a bank-conflicted transfer (untiled)
        return load(ref, layout=plgpu.Layout.WGMMA, optimized=fast)

    return iota, plgpu.layout_cast, load_tile


def interpreter():
    """Mosaic GPU's CPU interpreter (private in JAX 0.10). Reads past an array's end return the
    interpreter's fill value (NaN) where the TMA unit would return zeros: only query rows of a
    tile's dead tail read there, and nothing of them is stored."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # pragma: no cover - depends on the installed JAX
        raise NotImplementedError("this JAX has no Mosaic GPU interpreter") from e
    return InterpretGPUParams(out_of_bounds_reads="uninitialized")


def store_rows(o_smem, o_ref, row0, n_rows, kv_head, group, block_q):
    """TMA stores of the first ``n_rows`` rows of each head's block_q-row band of ``o_smem``
    to ``o_ref[row0 : row0 + n_rows, head]``. TMA boxes are static, so a partial band goes out
    as a ladder of power-of-two pieces (n_rows = 13: 8 + 4 + 1)."""
    for g in range(group):
        head = kv_head * group + g

        @pl.when(n_rows == block_q)
        def _full():
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(g * block_q, block_q)],
                                    o_ref.at[pl.ds(row0, block_q), head])

        @pl.when(n_rows < block_q)
        def _ladder():
            done = jnp.int32(0)
            size = block_q // 2
            while size:
                @pl.when(lax.bitwise_and(n_rows, jnp.int32(size)) != 0)
                def _piece():
                    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(g * block_q + done, size)],
                                            o_ref.at[pl.ds(row0 + done, size), head])

                done = done + lax.bitwise_and(n_rows, jnp.int32(size))
                size //= 2


# Spans of padding rows per item of the padding pseudo request. An engine step padded to its
# bucket has up to ~T / 2 padding rows; one CTA per span and kv head writing zeros cost the
# H100 10.8 µs of 216 on the mixed batch padded 2112 → 4096 rows (NOTES twelfth pass).
PAD_SPANS = 8


def item_schedule(kv_lens, query_start_loc, num_seqs, *, span: int, num_slots: int,
                  num_kv_heads: int, block_kv: int, order: str, programs: int):
    """The work list: ``(items, starts)``. ``items`` (num_items, 3) int32 holds (request, kv
    head, first query token) of every item, grouped by CTA: CTA p takes
    ``items[starts[p]:starts[p + 1]]`` in that order, its K/V ring running on across them.

    Request b's spans are slots qsl[b] // span + b ...; request num_seqs is the padding pseudo
    request (rows [qsl[num_seqs], T), written as zeros), whose items take ``PAD_SPANS`` spans
    each: its later slots stay empty. ``order``:

    * "natural": kv head outermost, slots in batch order, dealt round-robin (CTA p takes
      entries p, p + programs, ... of that list);
    * "lpt": most KV blocks first (the long items start early instead of forming the tail),
      dealt round-robin in snake order (every other round reversed, so the CTA that takes a
      round's longest item takes the next round's shortest);
    * "auto": "lpt" when no live request is a single-token decode, else "natural" (measured
      best for prefill-only and for mixed batches respectively, NOTES.md fifth pass);

    Tiny XLA ops on the step's metadata, the same in every layer.
    """
    num_reqs = kv_lens.shape[0]
    num_seqs = jnp.minimum(jnp.reshape(num_seqs, ()), num_reqs)
    b = jnp.arange(num_reqs + 1, dtype=jnp.int32)
    first = jnp.where(b <= num_seqs, query_start_loc // span + b, jnp.iinfo(jnp.int32).max)
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    req = jnp.sum(first[None, :] <= slots[:, None], axis=1, dtype=jnp.int32) - 1
    tok0 = (slots - first[req]) * span * jnp.where(req == num_seqs, PAD_SPANS, 1)
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32)
    items = jnp.stack([jnp.broadcast_to(req[None, :], (num_kv_heads, num_slots)),
                       jnp.broadcast_to(heads[:, None], (num_kv_heads, num_slots)),
                       jnp.broadcast_to(tok0[None, :], (num_kv_heads, num_slots))], axis=-1)
    items = items.reshape(num_kv_heads * num_slots, 3)
    n = items.shape[0]
    if order == "natural":
        return _round_robin(items, programs)
    q_len = query_start_loc[jnp.minimum(req + 1, num_reqs)] - query_start_loc[req]
    kv_len = kv_lens[jnp.minimum(req, num_reqs - 1)]
    live = (req < num_seqs) & (tok0 < q_len)
    hi = jnp.minimum(kv_len, kv_len - q_len + jnp.minimum(q_len, tok0 + span))
    cost = jnp.tile(jnp.where(live, (hi + block_kv - 1) // block_kv, 0), num_kv_heads)
    k = np.arange(n)
    rnd, pos = k // programs, k % programs
    size = np.minimum(programs, n - rnd * programs)
    snake = np.where(rnd % 2 == 1, rnd * programs + size - 1 - pos, k)
    lpt = _round_robin(items[_largest_first(cost)[snake]], programs)
    if order == "lpt":
        return lpt
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    decodes = (jnp.arange(num_reqs) < num_seqs) & (q_lens == 1)
    nat, starts = _round_robin(items, programs)
    return jnp.where(jnp.any(decodes), nat, lpt[0]), starts


# Columns of the kernel's work list (``item_scalars``).
ITEM_REQ, ITEM_KV_HEAD, ITEM_TOK0, ITEM_Q_START, ITEM_Q_LEN, ITEM_KV_LEN, ITEM_IS_PAD = range(7)
ITEM_COLS = 7


def item_scalars(items, kv_lens, query_start_loc, num_seqs, num_tokens: int):
    """``item_schedule``'s (request, kv head, first token) rows extended by the scalars the
    kernel needs of each item's request — first query row, query length, kv length, padding
    flag (the pseudo request after the last live one, rows [qsl[num_seqs], num_tokens)) — so
    that a CTA starts on one level of loads instead of a chain of dependent ones."""
    num_reqs = kv_lens.shape[0]
    num_seqs = jnp.minimum(jnp.reshape(num_seqs, ()), num_reqs)
    req = items[:, ITEM_REQ]
    is_pad = req == num_seqs
    q_start = query_start_loc[req]
    q_end = jnp.where(is_pad, num_tokens, query_start_loc[jnp.minimum(req + 1, num_reqs)])
    kv_len = kv_lens[jnp.minimum(req, num_reqs - 1)]
    return jnp.concatenate([items, jnp.stack(
        [q_start, q_end - q_start, kv_len, is_pad.astype(jnp.int32)], axis=1)],
        axis=1).astype(jnp.int32)


def item_fields(items_ref, k, *, num_reqs: int, block_q: int, span: int, block_kv: int,
                sliding_window):
    """Work item k's fields (``item_scalars``' row: one level of loads) and what follows from
    them: its KV length, its blocks ``[lo_blk, lo_blk + n_blk)`` and ``tile(t)``."""
    row = [items_ref[k, c] for c in range(ITEM_COLS)]  # independent loads
    req, kv_head, item_tok0 = row[ITEM_REQ], row[ITEM_KV_HEAD], row[ITEM_TOK0]
    it = dict(req=req, kv_head=kv_head, is_pad=row[ITEM_IS_PAD] != 0)
    q_len = row[ITEM_Q_LEN]
    it.update(q_start=row[ITEM_Q_START], q_len=q_len)
    it["req_row"] = jnp.minimum(req, num_reqs - 1)  # the padding request reads no row
    live = (~it["is_pad"]) & (item_tok0 < q_len)
    it["kv_len"] = kv_len = jnp.where(live, row[ITEM_KV_LEN], 0)
    ctx_len = kv_len - q_len

    def tile(t):
        """(first token, live rows per head, first query position, KV end) of tile t."""
        tok0 = item_tok0 + t * block_q
        n_tok = jnp.clip(q_len - tok0, 0, block_q)
        first_pos = ctx_len + tok0
        hi = jnp.where(live & (n_tok > 0), jnp.minimum(kv_len, first_pos + n_tok), 0)
        return tok0, n_tok, first_pos, hi

    it["tile"] = tile
    # The item's KV blocks [lo_blk, lo_blk + n_blk): every tile's, streamed once for all.
    hi_item = jnp.where(live, jnp.minimum(kv_len, ctx_len + jnp.minimum(
        q_len, item_tok0 + span)), 0)
    if sliding_window is None:
        it["lo_blk"] = lo_blk = jnp.int32(0)
    else:
        it["lo_blk"] = lo_blk = lax.div(
            jnp.maximum(tile(0)[2] - sliding_window + 1, 0), jnp.int32(block_kv))
    it["n_blk"] = jnp.where(live, lax.div(hi_item + block_kv - 1, jnp.int32(block_kv))
                            - lo_blk, 0)
    return it


RANK_SORT_MAX = 4096  # work lists up to this long are ordered by counting, not by a sort


def _largest_first(cost):
    """``argsort(-cost, stable=True)``. Up to ``RANK_SORT_MAX`` entries as ranks counted in
    one fused n x n comparison and a scatter: XLA's GPU sort took 10.5 µs on the mixed
    batch's 1,040 entries (H100), once per step."""
    n = cost.shape[0]
    if n > RANK_SORT_MAX:
        return jnp.argsort(-cost, stable=True)
    i = jnp.arange(n, dtype=jnp.int32)
    ahead = (cost[None, :] > cost[:, None]) | (
        (cost[None, :] == cost[:, None]) & (i[None, :] < i[:, None]))
    rank = jnp.sum(ahead, axis=1, dtype=jnp.int32)
    return jnp.zeros(n, jnp.int32).at[rank].set(i, unique_indices=True)


def _round_robin(items, programs: int):
    """Entry k of ``items`` to CTA k % programs, grouped by CTA (a static permutation; none
    with one CTA per entry, the default)."""
    k = np.arange(items.shape[0])
    if programs == k.size:
        return items, jnp.asarray(np.arange(k.size + 1, dtype=np.int32))
    counts = np.bincount(k % programs, minlength=programs)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return items[np.lexsort((k // programs, k % programs))], jnp.asarray(starts)


MEMORY_REGS_MAX = 40  # the memory warpgroup's setmaxnreg when the compute side leaves more


def memory_regs(q_tiles: int, compute_regs: int) -> int:
    """setmaxnreg of the memory warpgroup beside ``q_tiles`` compute warpgroups at
    ``compute_regs`` each: what the SM's 64K registers leave (split evenly over the CTA's
    threads at launch, in steps of 8), at most ``MEMORY_REGS_MAX``; 232 → 40, 240 → 24 (as
    FlashAttention-3 runs) with two compute warpgroups."""
    per_thread = 65536 // (128 * (q_tiles + 1)) // 8 * 8
    regs = min(MEMORY_REGS_MAX, (q_tiles + 1) * per_thread - q_tiles * compute_regs)
    if compute_regs % 8 or not 24 <= compute_regs <= 256 or regs < 24:
        raise ValueError(f"compute_regs {compute_regs} with {q_tiles} compute warpgroups leaves "
                         f"{regs} registers for the memory warpgroup (setmaxnreg takes "
                         f"multiples of 8 in 24..256)")
    return regs


SMEM_BYTES = 227 * 1024  # Hopper's shared memory per CTA
ORDERS = ("natural", "lpt", "auto")  # work list orders (``item_schedule``)


def check_config(*, q_tiles: int, block_kv: int, depth: int, page_size: int, compute_regs: int,
                 order: str, tile_bytes: int, row_bytes: int):
    """Clear errors for a kernel configuration the hardware or the kernel cannot take."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if q_tiles not in (1, 2):
        raise ValueError(f"q_tiles must be 1 or 2, got {q_tiles}")
    if block_kv % 64 or block_kv % min(page_size, block_kv) or block_kv > 256:
        # 64: wgmma's K step for 16-bit operands in 128-byte swizzled tiles (P·V has K = block_kv)
        raise ValueError(f"block_kv must be a multiple of 64 (<= 256) and of the page chunk, "
                         f"got {block_kv}")
    smem = 2 * q_tiles * tile_bytes + 2 * depth * block_kv * row_bytes  # Q in + tiled, K + V
    if smem > SMEM_BYTES:
        raise ValueError(f"q_tiles {q_tiles}, depth {depth}, block_kv {block_kv} need {smem} "
                         f"bytes of shared memory (> {SMEM_BYTES})")
    if compute_regs:
        memory_regs(q_tiles, compute_regs)  # raises on a split the register file cannot take


def memory_warpgroup(item_at, my_items, block_tables_ref, kv_ref, k_ring, v_ring, *,
                     block_kv: int, depth: int, page_size: int, region=None):
    """The ragged kernel's memory warpgroup (``ragged_mosaic``): for each of the CTA's items
    (``item_at(i)``: the scalars of its i-th), for each KV block, the block's page ids from the
    block table (once for K and V), then TMA copies of the K and V chunks (min(page, block_kv)
    rows each) into the ``depth``-deep rings — ``k_ring``/``v_ring`` = (slots, landed barriers,
    free barriers) — each slot reused once the compute warpgroups have released it. The ring
    runs on from one item into the next. ``region(name)``: the profiler range of a phase."""
    max_pages = block_tables_ref.shape[1]
    region = region or jax.named_scope
    chunk = min(page_size, block_kv)

    def block_pages(it, s):
        """Page ids of the chunks of the item's KV block s (K and V share them)."""
        pos = (it["lo_blk"] + s) * block_kv
        return tuple(block_tables_ref[it["req_row"], jnp.minimum(
            lax.div(pos + c * chunk, jnp.int32(page_size)), max_pages - 1)]
            for c in range(block_kv // chunk))

    def one_item(i, base):
        it = item_at(i)

        def fetch(s, _):
            buf = lax.rem(base + s, jnp.int32(depth))
            with region("pages"):
                pages = block_pages(it, s)
            for kind, (smem, bar, free) in enumerate((k_ring, v_ring)):
                with region("wait_free"):
                    @pl.when(base + s >= depth)
                    def _wait():
                        plgpu.barrier_wait(free.at[buf])

                with region("issue"):
                    for c, page in enumerate(pages):
                        pos = (it["lo_blk"] + s) * block_kv + c * chunk
                        plgpu.copy_gmem_to_smem(
                            kv_ref.at[page, kind, it["kv_head"],
                                      pl.ds(lax.rem(pos, jnp.int32(page_size)), chunk)],
                            smem.at[buf, pl.ds(c * chunk, chunk)], bar.at[buf])

        lax.fori_loop(0, it["n_blk"], fetch, None)
        return base + it["n_blk"]

    total = lax.fori_loop(0, my_items, one_item, jnp.int32(0))

    # Observe the last ``depth`` releases too, so every barrier phase has been waited on
    # when the CTA ends (the interpreter checks it).
    @pl.loop(jnp.maximum(total - depth, 0), total)
    def _drain(s):
        buf = lax.rem(s, jnp.int32(depth))
        plgpu.barrier_wait(k_ring[2].at[buf])
        plgpu.barrier_wait(v_ring[2].at[buf])
