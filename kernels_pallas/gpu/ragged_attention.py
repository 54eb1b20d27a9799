"""Ragged mixed prefill + decode paged attention for GPUs: Pallas, Triton lowering.

Query blocks are laid over the ragged batch so that no block straddles two requests::

    q rows:          |--- req 0 (q_len 5) ---|- req 1 (1) -|-------- req 2 (9) --------| pad |
    block_q = 4:     [ b0: rows 0-3 ][b1: 4]  [ b2: 5 ]     [ b3: 6-9 ][ b4: 10-13 ][b5: 14]
    first block of request b = query_start_loc[b] // block_q + b   (monotone, never overlaps)

    grid = (T // block_q + R, K):  program (i, h) finds its request by binary search over
    query_start_loc, takes rows [qb·block_q, (qb+1)·block_q) of it and all G q heads of kv head h:
    an MMA tile of block_m = block_q·Gp rows (row r = token r // Gp, q head h·G + r % Gp),
    and runs causal flash attention over that request's pages, block_kv tokens per iteration.

A request with exactly one query row (a decode) takes a branch (``decode_tile``) with a tile of
max(16, Gp) rows, the decode kernel's, instead of the block_m-row tile with only G live rows.

A program whose index falls past its request's last block does nothing. The KV range of a
block is [lo, hi): hi = min(kv_len, position of its last query + 1), lo = 0 or the sliding
window's start for its first query; loads outside it are masked off (never touched).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpage.kernels_pallas import reference
from jaxpage.kernels_pallas.gpu import _common as cm


@dataclasses.dataclass(frozen=True)
class RaggedConfig:
    block_m: int  # MMA rows per program = block_q tokens × Gp heads (power of two, >= 16)
    block_kv: int  # KV tokens per loop iteration (power of two)
    num_warps: int
    num_stages: int
    decode_tile: bool = False  # single-token requests on a small tile of their own (a branch)
    decode_block_kv: int = 64  # KV tokens per iteration on that path
    order: str = "natural"  # "reverse", "lpt" (longest KV span first) or "auto" (see kernel)
    prefetch: str = "none"  # prefill tile: "index" = page ids a block ahead (see cm.kv_loop)
    decode_prefetch: str = "none"  # the same for the decode tile


# Tuned block sizes, keyed by head_dim. The 128 entry was chosen by measurement on an H100 (bf16,
# N/K = 32/8; the mixed batch of docs/benchmarks/kernels_h100_sweep.md): of block_m {32, 64, 128} x
# block_kv {32, 64} x (warps, stages) {(4,2), (4,3), (8,3)}, 64/64/4/3 was fastest (378 µs;
# 128-row tiles 472-549 µs). The 64 entry by the same sweep at H = 64 on an H200 (27 tiles, plus
# decode_block_kv 32..256; docs/benchmarks/kernels_h64.md): 64/64/4/2 178 µs, the same tile with
# 3 stages 197-206 µs (two entries of the sweep), 64/32/4/2 194 µs, 128-row tiles >= 198 µs;
# decode_block_kv 128 best (64: 227, 256: 234). The 256 entry by two runs on an H200 at H = 256
# (docs/benchmarks/kernels_h256.md, mixed batch, floor 256-258 µs): 64/32/4/2 with
# decode_block_kv 64 540 µs; with 32 / 128: 579-593 / 838; 3 stages 577; 64-key blocks 872
# (4 warps), 991 (8); 32-row tiles 777-920; no decode tile 740; the earlier guess (8 warps)
# 1167-1177.
# decode_tile / decode_block_kv=128 (H200, three interleaved runs each): mixed batch 393 µs
# (single-token requests on the 64-row tile) -> 318 µs; decode_block_kv 64 gave 330 µs.
# order="lpt" (H200, tools/study_prefill.py): the 4 prefill chunks alone 228 -> 181-196 µs (the
# longest programs no longer start last), but the mixed batch ~5% slower than natural in 5 of 6
# paired runs; "auto" takes LPT only for batches without decodes (``launch_schedule``).
# prefetch="index" gives the 3-deep copy pipeline jax's dense kernel has, but measured no
# faster (222 vs 227 µs) and is off; see docs/benchmarks/NOTES.md for both.
RAGGED_TUNING: dict[int, RaggedConfig] = {
    64: RaggedConfig(block_m=64, block_kv=64, num_warps=4, num_stages=2, decode_tile=True,
                     decode_block_kv=128, order="auto"),
    128: RaggedConfig(block_m=64, block_kv=64, num_warps=4, num_stages=3, decode_tile=True,
                      decode_block_kv=128, order="auto"),
    256: RaggedConfig(block_m=64, block_kv=32, num_warps=4, num_stages=2, decode_tile=True,
                      decode_block_kv=64, order="auto"),
}


# fp8 pools (K/V upcast to f16 after the load), by a sweep of the mixed batch on an H200
# (page 64; docs/benchmarks/fp8/mixed_sweep_h200.json): at H = 128, 128-key blocks two deep
# 297 µs against the bf16 entry's 319 (64-key blocks, 3 stages; decode_block_kv 256, 128-row
# tiles, 8 warps all slower). At H = 64 nothing beat the bf16 entry (168 µs; 2 stages 167.8,
# 128-key blocks 179). Both stay slower than a bf16 pool (278 / 144 µs): NOTES.md, "fp8 KV pool".
RAGGED_TUNING_FP8: dict[int, RaggedConfig] = {
    **RAGGED_TUNING, 128: dataclasses.replace(RAGGED_TUNING[128], block_kv=128, num_stages=2)}


def ragged_config(head_dim: int, kv_dtype=None) -> RaggedConfig:
    """The tuned entry nearest ``head_dim``, from the fp8 table for an fp8 pool."""
    table = RAGGED_TUNING_FP8 if kv_dtype is not None and reference.is_fp8(kv_dtype) else (
        RAGGED_TUNING)
    key = min(table, key=lambda d: abs(d - head_dim))
    return table[key]


def _ragged_kernel(
    num_seqs_ref,  # (1,) int32
    kv_lens_ref,  # (R,) int32
    block_tables_ref,  # (R, Pmax) int32
    query_start_loc_ref,  # (R + 1,) int32
    schedule_ref,  # (num_q_blocks * K,) int32 launch order ("lpt", "auto"), else unused (1,)
    q_ref,  # (T, N, H)
    kv_pages_ref,  # (P, 2, K, S, H)
    o_init_ref,  # (T, N, H) zeros, aliased to o_ref (padding rows stay 0)
    o_ref,  # (T, N, H)
    *,
    sm_scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    group: int,
    group_padded: int,
    head_dim_padded: int,
    block_q: int,
    block_kv: int,
    search_steps: int,
    split_causal: bool,
    skip_decode: bool,
    decode_rows: int,  # 0: single-token requests take the prefill tile too
    decode_block_kv: int,
    order: str,
    num_q_blocks: int,
    num_kv_heads: int,
    prefetch: str,
    decode_prefetch: str,
):
    del o_init_ref  # same buffer as o_ref
    if order in ("lpt", "auto"):
        # A 1-D grid over (query block, kv head) pairs in the order of ``schedule`` (entries
        # slot * K + kv head; see ``launch_schedule``).
        entry = schedule_ref[pl.program_id(0)]  # >= 0: truncating div/rem (jnp's floor forms
        heads = jnp.int32(num_kv_heads)          # of scalars fail to lower for Triton)
        i, kv_head = lax.div(entry, heads), lax.rem(entry, heads)
    else:
        pid, kv_head = pl.program_id(0), pl.program_id(1)
        # "reverse": the last query blocks of the batch start first; in a batch laid out as
        # prefills then decodes, that is the decodes, then each chunk's longest (last) blocks.
        i = num_q_blocks - 1 - pid if order == "reverse" else pid
    num_reqs = block_tables_ref.shape[0]
    head_dim = q_ref.shape[2]
    block_m = block_q * group_padded
    num_seqs = jnp.minimum(num_seqs_ref[0], num_reqs)

    # Largest request b < num_seqs whose first block (qsl[b] // block_q + b) is <= i.
    def search(_, lo_hi):
        lo, hi = lo_hi
        mid = (lo + hi) // 2
        right = query_start_loc_ref[mid] // block_q + mid <= i
        return jnp.where(right, mid, lo), jnp.where(right, hi, mid)

    req, _ = lax.fori_loop(0, search_steps, search, (jnp.int32(0), num_seqs))
    q_start = query_start_loc_ref[req]
    q_len = query_start_loc_ref[req + 1] - q_start
    q_blk = i - (q_start // block_q + req)
    active = (req < num_seqs) & (q_blk * block_q < q_len)
    if skip_decode:  # single-token requests are done by the decode kernel (mixed path)
        active &= q_len > 1
    kv_len = kv_lens_ref[req]
    ctx_len = kv_len - q_len  # position of the request's first query
    cols, col_mask = cm.cols_and_mask(head_dim_padded, head_dim)
    kv_dtype = cm.kv_compute_dtype(q_ref.dtype, kv_pages_ref.dtype)  # q, K, V in the matmuls

    def prefill_path():
        r = jnp.arange(block_m, dtype=jnp.int32)  # (BM,)
        tok_in_req = q_blk * block_q + r // group_padded  # (BM,)
        g = r % group_padded  # (BM,)
        row_mask = active & (tok_in_req < q_len) & (g < group)  # (BM,)
        rows = q_start + tok_in_req  # (BM,) rows of q / o
        heads = kv_head * group + g  # (BM,)
        q_pos = ctx_len + tok_in_req  # (BM,) absolute position of each query
        q = cm.to_compute(plgpu.load(q_ref.at[rows[:, None], heads[:, None], cols[None, :]],
                                     mask=cm.and_cols(row_mask, col_mask), other=0),
                          kv_dtype)  # (BM, Hp)

        first_pos = ctx_len + q_blk * block_q
        hi = jnp.where(active,
                       jnp.minimum(kv_len, ctx_len + jnp.minimum(q_len, (q_blk + 1) * block_q)), 0)
        lo = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)

        def full_body(blk, carry):  # every key visible to every row: no masks at all
            tok = blk * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # (BK,)
            k, v = cm.load_kv_block(kv_pages_ref, block_tables_ref, req, kv_head, tok, None,
                                    cols, col_mask, kv_dtype)  # (BK, Hp) each
            s = cm.scores_log2(q, k, sm_scale=sm_scale, soft_cap=soft_cap)  # (BM, BK)
            return cm.online_softmax_step(carry, s, v)

        blocks = cm.KvBlocks(kv_pages_ref, block_tables_ref, req, kv_head, lo, hi, block_kv,
                             cols, col_mask, kv_dtype)

        def attend(carry, blk, k, v):
            tok, tok_mask = blocks.tokens(blk)
            s = cm.scores_log2(q, k, sm_scale=sm_scale, soft_cap=soft_cap)  # (BM, BK)
            mask = tok_mask[None, :] & (tok[None, :] <= q_pos[:, None])  # (BM, BK) causal
            if sliding_window is not None:
                mask &= tok[None, :] > q_pos[:, None] - sliding_window
            s = jnp.where(mask, s, cm.NEG)
            return cm.online_softmax_step(carry, s, v)

        carry = cm.init_carry(block_m, head_dim_padded)
        first_blk = lo // block_kv
        if split_causal and sliding_window is None:
            # Blocks wholly at or before the block's first query position are visible to all
            # of its rows and lie inside kv_len: run them without masks, then the diagonal.
            first_blk = jnp.where(active, (first_pos + 1) // block_kv, 0)
            carry = lax.fori_loop(0, first_blk, full_body, carry)
        _, l, acc = cm.kv_loop(first_blk, pl.cdiv(hi, block_kv), carry, blocks=blocks,
                               attend=attend, prefetch=prefetch)
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]  # (BM, Hp)
        plgpu.store(o_ref.at[rows[:, None], heads[:, None], cols[None, :]],
                    out.astype(o_ref.dtype), mask=cm.and_cols(row_mask, col_mask))

    def decode_path():
        # One query row (q_len == 1): a tile of decode_rows = max(16, Gp) rows holding the G
        # q heads, as in the decode kernel, instead of block_m rows of which G would be live.
        g = jnp.arange(decode_rows, dtype=jnp.int32)  # (DR,)
        heads = kv_head * group + g
        row_mask = active & (g < group)
        q = cm.to_compute(plgpu.load(q_ref.at[q_start, heads[:, None], cols[None, :]],
                                     mask=cm.and_cols(row_mask, col_mask), other=0),
                          kv_dtype)  # (DR, Hp)
        hi = jnp.where(active, kv_len, 0)  # the query sits at kv_len - 1: all keys visible
        lo = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)

        blocks = cm.KvBlocks(kv_pages_ref, block_tables_ref, req, kv_head, lo, hi,
                             decode_block_kv, cols, col_mask, kv_dtype)
        _, l, acc = cm.kv_loop(lo // decode_block_kv, pl.cdiv(hi, decode_block_kv),
                               cm.init_carry(decode_rows, head_dim_padded), blocks=blocks,
                               attend=blocks.decode_attend(q, sm_scale=sm_scale,
                                                           soft_cap=soft_cap),
                               prefetch=decode_prefetch)
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]  # (DR, Hp)
        plgpu.store(o_ref.at[q_start, heads[:, None], cols[None, :]], out.astype(o_ref.dtype),
                    mask=cm.and_cols(row_mask, col_mask))

    if decode_rows:
        lax.cond(q_len == 1, decode_path, prefill_path)
    else:
        prefill_path()


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "soft_cap", "sliding_window", "block_m", "block_kv", "num_warps", "num_stages",
    "split_causal", "skip_decode", "decode_tile", "decode_block_kv", "order", "prefetch",
    "decode_prefetch", "interpret"))
def ragged_paged_attention(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    block_m: int | None = None,
    block_kv: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split_causal: bool = False,
    skip_decode: bool = False,
    decode_tile: bool | None = None,
    decode_block_kv: int | None = None,
    order: str | None = None,
    prefetch: str | None = None,
    decode_prefetch: str | None = None,
    out_init: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Mixed prefill + decode attention; contract as ``reference.ragged_paged_attention``.

    Args:
        q: (T, N, H); kv_pages: (P, 2, K, S, H); kv_lens: (R,); block_tables: (R, Pmax);
        query_start_loc: (R + 1,); num_seqs: () or (1,) — see ``reference.py``.
        sm_scale, soft_cap, sliding_window: as in the reference.
        block_m, block_kv, num_warps, num_stages: overrides of the tuned table (benchmarks).
        split_causal: run key blocks below the diagonal in a second, unmasked loop. Off by
            default: measured slower on an H100 (prefill half of the mixed batch: 249 µs with
            it, 218 µs without), see docs/benchmarks/NOTES.md.
        decode_tile: give single-token requests their own small tile (max(16, Gp) rows, the
            decode kernel's) through a branch, instead of a block_m-row tile with G live rows.
        decode_block_kv: KV tokens per iteration on that path.
        order: "natural" (program i takes query block i), "reverse" (the last blocks first),
            "lpt" (longest KV span first within decodes and within prefill blocks, the two
            interleaved, every kv head of a block together; small sorts on device, see
            ``lpt_schedule``) or "auto" ("lpt" when no request is a single-token decode, else
            the natural order; ``launch_schedule``).
        prefetch: prefill tile's loop: "none" (page ids, K/V and math of a block in one
            iteration) or "index" (page ids fetched one block ahead, so Triton pipelines the
            K/V copies three deep). See ``_common.kv_loop``.
        decode_prefetch: the same for the decode tile.
        skip_decode: leave requests with exactly one query row alone (their rows keep
            ``out_init``): the decode kernel does them (``gpu.mixed_paged_attention``).
        out_init: (T, N, H) initial output, aliased; default zeros.
        interpret: run the Pallas interpreter (CPU tests).

    Returns:
        (T, N, H) in q's dtype; padding rows are zero.
    """
    num_tokens, num_q_heads, head_dim, num_kv_heads, _, num_reqs = cm.check_ragged(
        q, kv_pages, kv_lens, block_tables, query_start_loc, sliding_window)
    cfg = ragged_config(head_dim, kv_pages.dtype)
    block_m = block_m or cfg.block_m
    block_kv = block_kv or cfg.block_kv
    for name, val in (("block_m", block_m), ("block_kv", block_kv)):
        if val != cm.next_pow2(val) or val < 16:
            raise ValueError(f"{name} must be a power of two >= 16, got {val}")
    group = num_q_heads // num_kv_heads
    group_padded = cm.next_pow2(group)
    block_q = max(1, block_m // group_padded)
    head_dim_padded = cm.next_pow2(head_dim)
    # Blocks needed: Σ cdiv(q_len_b, block_q) <= T // block_q + num_seqs (see the diagram).
    num_q_blocks = num_tokens // block_q + num_reqs
    decode_tile = cfg.decode_tile if decode_tile is None else decode_tile
    decode_block_kv = decode_block_kv or cfg.decode_block_kv
    order = order or cfg.order
    if order not in ("natural", "reverse", "lpt", "auto"):
        raise ValueError(f"order must be 'natural', 'reverse', 'lpt' or 'auto', got {order!r}")
    if decode_block_kv != cm.next_pow2(decode_block_kv) or decode_block_kv < 16:
        raise ValueError(f"decode_block_kv must be a power of two >= 16, got {decode_block_kv}")
    prefetch = prefetch or cfg.prefetch
    decode_prefetch = decode_prefetch or cfg.decode_prefetch
    for name, val in (("prefetch", prefetch), ("decode_prefetch", decode_prefetch)):
        if val not in ("none", "index"):
            raise ValueError(f"{name} must be 'none' or 'index', got {val!r}")
    decode_rows = max(16, group_padded)
    if not decode_tile or skip_decode or decode_rows >= block_q * group_padded:
        decode_rows = 0  # no smaller tile to gain (or nothing to decode here)
    search_steps = max(1, num_reqs.bit_length() + 1)

    kernel = functools.partial(
        _ragged_kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        group=group, group_padded=group_padded, head_dim_padded=head_dim_padded,
        block_q=block_q, block_kv=block_kv, search_steps=search_steps,
        split_causal=split_causal, skip_decode=skip_decode, decode_rows=decode_rows,
        decode_block_kv=decode_block_kv, order=order, num_q_blocks=num_q_blocks,
        num_kv_heads=num_kv_heads,
        prefetch=prefetch, decode_prefetch=decode_prefetch)
    num_seqs = jnp.reshape(num_seqs, (1,)).astype(jnp.int32)
    kv_lens, query_start_loc = kv_lens.astype(jnp.int32), query_start_loc.astype(jnp.int32)
    if order in ("lpt", "auto"):
        schedule = launch_schedule(kv_lens, query_start_loc, num_seqs[0], block_q=block_q,
                                   num_q_blocks=num_q_blocks, num_kv_heads=num_kv_heads,
                                   sliding_window=sliding_window, auto=order == "auto")
        grid = (num_q_blocks * num_kv_heads,)
    else:
        schedule = jnp.zeros((1,), jnp.int32)
        grid = (num_q_blocks, num_kv_heads)
    return pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        input_output_aliases={7: 0},
        compiler_params=cm.compiler_params(num_warps or cfg.num_warps,
                                           num_stages or cfg.num_stages),
        interpret=interpret,
        name=f"jaxpage_ragged_bm{block_q * group_padded}_bkv{block_kv}",
    )(num_seqs, kv_lens, block_tables.astype(jnp.int32), query_start_loc, schedule, q, kv_pages,
      jnp.zeros_like(q) if out_init is None else out_init.astype(q.dtype))


def lpt_schedule(kv_lens, query_start_loc, num_seqs, *, block_q: int, num_q_blocks: int,
                 sliding_window: int | None = None):
    """Query-block slots in launch order, as (num_q_blocks,) int32.

    Slot i is the kernel's natural index (request b's blocks start at qsl[b] // block_q + b).
    Two classes of programs share the launch: decodes (one query row: memory-bound) and
    prefill blocks (compute-bound). Within each class the longest KV span goes first (LPT list
    scheduling: one late long program would otherwise be the kernel's tail — a 512-token
    chunk behind 1.5k tokens of context is ~30 KV blocks in one program). The two classes are
    then interleaved evenly, so that memory-bound and compute-bound programs share the SMs at
    every moment instead of running as two phases. Empty slots go last. A few tiny XLA ops,
    identical in every layer, so XLA computes them once per step.
    """
    num_reqs = kv_lens.shape[0]
    starts = query_start_loc[:-1]
    q_lens = query_start_loc[1:] - starts
    first = starts // block_q + jnp.arange(num_reqs, dtype=jnp.int32)  # (R,) non-decreasing
    slots = jnp.arange(num_q_blocks, dtype=jnp.int32)
    # Largest live request b with first[b] <= slot (the kernel's binary search, vectorized).
    live_first = jnp.where(jnp.arange(num_reqs) < num_seqs, first, jnp.iinfo(jnp.int32).max)
    req = jnp.clip(jnp.sum(live_first[None, :] <= slots[:, None], axis=1) - 1, 0, num_reqs - 1)
    blk = slots - first[req]
    q_len, kv_len = q_lens[req], kv_lens[req]
    ctx = kv_len - q_len
    hi = jnp.minimum(kv_len, ctx + jnp.minimum(q_len, (blk + 1) * block_q))
    lo = 0 if sliding_window is None else jnp.maximum(ctx + blk * block_q - sliding_window + 1, 0)
    live = (req < num_seqs) & (blk >= 0) & (blk * block_q < q_len)
    by_cost = jnp.argsort(-jnp.where(live, hi - lo, -1), stable=True)  # longest first
    # Rank of each slot within its class (decode / prefill) in that order, then interleave:
    # key = (rank + 1/2) / class size, so each class is spread evenly over [0, 1).
    decode = (q_len == 1)[by_cost]
    rank = jnp.where(decode, jnp.cumsum(decode) - 1, jnp.cumsum(~decode) - 1)
    size = jnp.where(decode, jnp.sum(decode & live[by_cost]), jnp.sum(~decode & live[by_cost]))
    key = (rank + 0.5) / jnp.maximum(size, 1) + jnp.where(live[by_cost], 0.0, 2.0)
    return by_cost[jnp.argsort(key, stable=True)].astype(jnp.int32)


def launch_schedule(kv_lens, query_start_loc, num_seqs, *, block_q: int, num_q_blocks: int,
                    num_kv_heads: int, sliding_window: int | None = None, auto: bool = False):
    """(num_q_blocks * K,) int32 launch order of (query block, kv head) pairs: slot * K + head.

    "lpt": ``lpt_schedule``'s slot order, every kv head of a slot launched together. "auto":
    the same when no live request is a single-token decode, else the natural order (kv head
    outermost, slots in batch order). Measured on an H200 (docs/benchmarks/NOTES.md): LPT takes
    a prefill-only batch from ~230 to ~190 µs, but on a mixed prefill + decode batch the natural
    order was ~5% faster in 5 of 6 paired runs.
    """
    slots = lpt_schedule(kv_lens, query_start_loc, num_seqs, block_q=block_q,
                         num_q_blocks=num_q_blocks, sliding_window=sliding_window)
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32)
    lpt = (slots[:, None] * num_kv_heads + heads[None, :]).reshape(-1)
    if not auto:
        return lpt
    natural = (jnp.arange(num_q_blocks, dtype=jnp.int32)[None, :] * num_kv_heads
               + heads[:, None]).reshape(-1)  # kv head outermost, as the 2-D natural grid
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    live = jnp.arange(kv_lens.shape[0]) < num_seqs
    return jnp.where(jnp.any(live & (q_lens == 1)), natural, lpt)
