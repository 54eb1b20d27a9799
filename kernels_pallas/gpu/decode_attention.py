"""Decode-only paged attention for GPUs: Pallas, Triton lowering, split-KV ("flash-decoding").

One query token per request; row ``t`` of ``q`` belongs to request ``t`` (the caller's promise
when it selects this path with ``max_q_len=1``: every live request has exactly one new token, so
``query_start_loc[:num_seqs + 1] == arange``). Rows ``t >= num_seqs`` are padding and come back 0.

Work split, step 1 (``_decode_kernel``)::

    grid = (T rows, K kv heads, num_splits)
    program (t, h, s): all G q heads of kv head h for request t (one MMA tile of Gp >= 16 rows)
        against KV blocks [first + s*per_split, first + (s+1)*per_split) of that request,
        block_kv tokens (several pages) per loop iteration, gathered through the block table.

    kv range of request t:  |--- split 0 ---|--- split 1 ---| ... |-- split n-1 --|  (kv_len)
                            per_split = cdiv(cdiv(kv_len, block_kv), num_splits) blocks

The split is taken from the *dynamic* kv_len, so every split gets an even share whatever the
static block-table width. With ``num_splits == 1`` the kernel writes the normalized output
directly; otherwise each program writes its normalized partial output and log2-sum-exp, and step
2 (``_combine_kernel``, grid (T, N)) merges the splits: out = Σ 2^(lse_s - M)·o_s / Σ 2^(lse_s - M).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpage.kernels_pallas import reference
from jaxpage.kernels_pallas.gpu import _common as cm


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_kv: int  # KV tokens per loop iteration (power of two; may span several pages)
    num_warps: int
    num_stages: int
    prefetch: str = "none"  # "index": page ids fetched a block ahead (``cm.kv_loop``)


# Tuned block sizes, keyed by head_dim; other head dims take the nearest entry. The 128 entry was
# chosen by measurement on an H100 (bf16, N/K = 32/8, docs/benchmarks/kernels_h100_sweep.md): of
# block_kv {32, 64, 128} x (warps, stages) {(4,2), (4,3), (4,4), (8,3)}, 64/4/3 was best or within
# noise of it at B=64 ctx 2048 (89%), B=256 ctx 8192 (96%) and B=16 ctx 2048 (75% vs best 76%),
# for pages 16 and 128; 32-token blocks lost 5-15 points. The 64 entry by the same sweep on an
# H200 at H = 64 (docs/benchmarks/kernels_h64.md): 128/4/2 best at B=64 ctx 2048 (88% page 16,
# 90% page 128; 3 stages 82/88%), within 1 point of the best at B=16 ctx 2048 (58 vs 59%) and
# B=256 ctx 8192 (99 vs 100%). The 256 entry by two runs on an H200 at H = 256
# (docs/benchmarks/kernels_h256.md; B {16, 64} x ctx {2048, 8192} x page {16, 128}): of block_kv
# {16, 32, 64} x (warps, stages) {(4,2), (4,3), (8,2)}, 32/4/3 had the best mean (90% of read
# BW) and one cell under the targets (B=64 ctx 8192 page 128: 79%); 32/4/2 88% with two (75-82%
# at B=64 ctx 8192), 64/4/2 89% with two (81-86% at B=64 ctx 2048); 8 warps 55-71%.
DECODE_TUNING: dict[int, DecodeConfig] = {
    64: DecodeConfig(block_kv=128, num_warps=4, num_stages=2),
    128: DecodeConfig(block_kv=64, num_warps=4, num_stages=3),
    256: DecodeConfig(block_kv=32, num_warps=4, num_stages=3),
}


# Split-KV until rows × kv heads × splits reaches this many programs (~4 per SM of an H100's
# 132), but keep at least MIN_BLOCKS_PER_SPLIT blocks in each split. Measured (H100, page 16):
# B=16 ctx 2048 -> 8 splits 76% of read BW vs 60% unsplit; B=64 (512 programs) best unsplit.
TARGET_PROGRAMS = 512
MIN_BLOCKS_PER_SPLIT = 2
MAX_SPLITS = 16
COMBINE_NUM_WARPS = 1


# fp8 pools (K/V upcast to f16 after the load): by a sweep on an H200 (page 64, e4m3; block_kv
# {64, 128, 256} x warps {4, 8} x stages {2, 3}; docs/benchmarks/kernels_fp8.md). Twice the
# tokens per block of the bf16 entries: the block's bytes stay the same and the per-block
# costs are paid half as often. H = 128: 128/4/2 best or within 2% at B = 16 / 64 / 256
# (35.2 / 100.3 / 1568 µs, where the bf16 entry's 64/4/3 took 41.0 / 127.1 / 1995); H = 64:
# 256/4/2 best at B = 16 and 64 (20.5 / 56.3 µs vs 24.6 / 81.5 for 128/4/2). H = 256 is
# unmeasured and keeps its bf16 entry.
DECODE_TUNING_FP8: dict[int, DecodeConfig] = {
    64: DecodeConfig(block_kv=256, num_warps=4, num_stages=2),
    128: DecodeConfig(block_kv=128, num_warps=4, num_stages=2),
    256: DECODE_TUNING[256],
}


def decode_config(head_dim: int, kv_dtype=None) -> DecodeConfig:
    """The tuned entry nearest ``head_dim``, from the fp8 table for an fp8 pool."""
    table = DECODE_TUNING_FP8 if kv_dtype is not None and reference.is_fp8(kv_dtype) else (
        DECODE_TUNING)
    key = min(table, key=lambda d: abs(d - head_dim))
    return table[key]


def choose_num_splits(num_rows: int, num_kv_heads: int, max_kv_tokens: int, block_kv: int) -> int:
    """Static split count: fill the GPU when the batch is small, never split short contexts."""
    splits = 1
    while (splits < MAX_SPLITS and num_rows * num_kv_heads * splits < TARGET_PROGRAMS
           and 2 * splits * MIN_BLOCKS_PER_SPLIT * block_kv <= max_kv_tokens):
        splits *= 2
    return splits


def _decode_kernel(
    num_seqs_ref,  # (1,) int32
    kv_lens_ref,  # (R,) int32
    block_tables_ref,  # (R, Pmax) int32
    query_start_loc_ref,  # (R + 1,) int32 (read only when by_request)
    q_ref,  # (T, N, H)
    kv_pages_ref,  # (P, 2, K, S, H)
    *refs,  # [o_init (T, N, H) aliased to o (by_request, 1 split)], outputs:
    # o: (T, N, H) when num_splits == 1, else (rows, num_splits, N, H) f32 partials, and
    # lse: (rows, num_splits, N) f32 log2-sum-exp of each partial (num_splits > 1)
    sm_scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    group: int,
    group_padded: int,
    head_dim_padded: int,
    block_kv: int,
    num_splits: int,
    by_request: bool,
    prefetch: str,
):
    p, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_reqs = block_tables_ref.shape[0]
    head_dim = q_ref.shape[2]
    refs = refs[1:] if by_request and num_splits == 1 else refs  # drop o_init (same buffer)

    if by_request:  # program p = request p, its row from query_start_loc; q_len != 1 skipped
        req = p
        row = query_start_loc_ref[req]
        valid = (req < num_seqs_ref[0]) & (query_start_loc_ref[req + 1] - row == 1)
    else:  # program p = row p = request p (the max_q_len == 1 promise)
        req = jnp.minimum(p, num_reqs - 1)
        row = p
        valid = p < jnp.minimum(num_seqs_ref[0], num_reqs)
    kv_len = jnp.where(valid, kv_lens_ref[req], 0)
    lo = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)

    # This split's share of the [lo, kv_len) blocks.
    first_blk = lo // block_kv
    num_blks = pl.cdiv(kv_len, block_kv) - first_blk
    per_split = pl.cdiv(num_blks, num_splits)
    start = first_blk + split * per_split
    end = jnp.minimum(start + per_split, first_blk + num_blks)

    cols, col_mask = cm.cols_and_mask(head_dim_padded, head_dim)
    g = jnp.arange(group_padded, dtype=jnp.int32)  # (Gp,)
    heads = kv_head * group + g  # (Gp,) q heads of this kv head (rows >= G are padding)
    g_mask = g < group
    kv_dtype = cm.kv_compute_dtype(q_ref.dtype, kv_pages_ref.dtype)
    q = cm.to_compute(plgpu.load(q_ref.at[row, heads[:, None], cols[None, :]],
                                 mask=cm.and_cols(g_mask & valid, col_mask), other=0),
                      kv_dtype)  # (Gp, Hp)

    blocks = cm.KvBlocks(kv_pages_ref, block_tables_ref, req, kv_head, lo, kv_len, block_kv,
                         cols, col_mask, kv_dtype)
    m, l, acc = cm.kv_loop(start, end, cm.init_carry(group_padded, head_dim_padded),
                           blocks=blocks, prefetch=prefetch,
                           attend=blocks.decode_attend(q, sm_scale=sm_scale, soft_cap=soft_cap))
    has_keys = l > 0  # (Gp,) False for empty splits and padding rows
    out = acc / jnp.where(has_keys, l, 1.0)[:, None]  # (Gp, Hp)
    if num_splits == 1:
        (o_ref,) = refs
        # Row mode writes every row (zeros for padding); by-request mode only its own rows.
        row_mask = g_mask & valid if by_request else g_mask
        plgpu.store(o_ref.at[row, heads[:, None], cols[None, :]], out.astype(o_ref.dtype),
                    mask=cm.and_cols(row_mask, col_mask))
    else:
        o_ref, lse_ref = refs
        plgpu.store(o_ref.at[p, split, heads[:, None], cols[None, :]], out,
                    mask=cm.and_cols(g_mask, col_mask))
        lse = jnp.where(has_keys, m + jnp.log2(jnp.where(has_keys, l, 1.0)), cm.NEG)  # (Gp,)
        plgpu.store(lse_ref.at[p, split, heads], lse, mask=g_mask)


def _combine_kernel(
    num_seqs_ref,  # (1,) int32
    query_start_loc_ref,  # (R + 1,) int32 (read only when by_request)
    o_part_ref,  # (rows, num_splits, N, H) f32
    lse_ref,  # (rows, num_splits, N) f32
    *refs,  # [o_init (T, N, H) aliased to o (by_request)], o: (T, N, H)
    num_splits: int,
    head_dim_padded: int,
    by_request: bool,
):
    p, head = pl.program_id(0), pl.program_id(1)
    o_ref = refs[-1]
    head_dim = o_ref.shape[2]
    cols, col_mask = cm.cols_and_mask(head_dim_padded, head_dim)
    sp = jnp.arange(num_splits, dtype=jnp.int32)  # (SPLITS,)
    lse = plgpu.load(lse_ref.at[p, sp, head])  # (SPLITS,)
    mask = None if col_mask is None else jnp.broadcast_to(col_mask[None, :],
                                                          (num_splits, head_dim_padded))
    o = plgpu.load(o_part_ref.at[p, sp[:, None], head, cols[None, :]], mask=mask,
                   other=None if mask is None else 0.0)  # (SPLITS, Hp)
    w = jnp.exp2(lse - jnp.max(lse))  # (SPLITS,); all 1 when every split is empty (then o = 0)
    out = (jnp.sum(w[:, None] * o, axis=0) / jnp.sum(w)).astype(o_ref.dtype)  # (Hp,)
    if by_request:
        row = query_start_loc_ref[p]
        valid = (p < num_seqs_ref[0]) & (query_start_loc_ref[p + 1] - row == 1)
        store_mask = jnp.broadcast_to(valid, (head_dim_padded,))
        if col_mask is not None:
            store_mask &= col_mask
        plgpu.store(o_ref.at[row, head, cols], out, mask=store_mask)
    else:
        plgpu.store(o_ref.at[p, head, cols], out, mask=col_mask)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "soft_cap", "sliding_window", "block_kv", "num_splits", "num_warps", "num_stages",
    "prefetch", "interpret"))
def decode_paged_attention(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    num_seqs: jax.Array,
    *,
    query_start_loc: jax.Array | None = None,
    out_init: jax.Array | None = None,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    block_kv: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    prefetch: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Decode attention: one query row per request.

    Two ways to find the rows: by default row t is request t's single new token (rows >=
    num_seqs are padding and come back 0). With ``query_start_loc`` and ``out_init`` given,
    request b's row is ``query_start_loc[b]``, only requests with exactly one query row are
    computed, and every other row keeps ``out_init``'s value (the decode half of a mixed batch).

    Args:
        q: (T, N, H) queries.
        kv_pages: (P, 2, K, S, H) this layer's pool.
        kv_lens: (R,) int32 context lengths, the new token included.
        block_tables: (R, Pmax) int32 page ids.
        num_seqs: () or (1,) int32 live requests.
        query_start_loc, out_init: (R + 1,) int32 and (T, N, H), see above (both or neither).
        sm_scale, soft_cap, sliding_window: as in ``reference.ragged_paged_attention``.
        block_kv, num_splits, num_warps, num_stages: overrides of the tuned table (benchmarks).
        prefetch: "none" or "index": page ids fetched a block ahead (``_common.kv_loop``).
        interpret: run the Pallas interpreter (CPU tests).

    Returns:
        (T, N, H) in q's dtype.
    """
    num_tokens, num_q_heads, head_dim, num_kv_heads, page_size, num_reqs, max_pages = (
        cm.check_common(q, kv_pages, kv_lens, block_tables))
    by_request = query_start_loc is not None
    if by_request != (out_init is not None):
        raise ValueError("query_start_loc and out_init go together")
    if by_request and (query_start_loc.shape != (num_reqs + 1,) or out_init.shape != q.shape):
        raise ValueError(f"query_start_loc must be ({num_reqs + 1},) and out_init {q.shape}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    cfg = decode_config(head_dim, kv_pages.dtype)
    block_kv = block_kv or cfg.block_kv
    if block_kv != cm.next_pow2(block_kv) or block_kv < 16:
        raise ValueError(f"block_kv must be a power of two >= 16, got {block_kv}")
    num_warps = num_warps or cfg.num_warps
    num_stages = num_stages or cfg.num_stages
    prefetch = prefetch or cfg.prefetch
    num_rows = num_reqs if by_request else num_tokens  # programs along grid axis 0
    if num_splits is None:
        num_splits = choose_num_splits(num_rows, num_kv_heads, max_pages * page_size, block_kv)
    if num_splits != cm.next_pow2(num_splits):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    group = num_q_heads // num_kv_heads
    group_padded = max(16, cm.next_pow2(group))  # an MMA tile needs >= 16 rows
    head_dim_padded = cm.next_pow2(head_dim)

    num_seqs = jnp.reshape(num_seqs, (1,)).astype(jnp.int32)
    # Row mode never reads query_start_loc: pass kv_lens in its place (no extra buffer).
    qsl = (query_start_loc if by_request else kv_lens).astype(jnp.int32)
    kernel = functools.partial(
        _decode_kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        group=group, group_padded=group_padded, head_dim_padded=head_dim_padded,
        block_kv=block_kv, num_splits=num_splits, by_request=by_request, prefetch=prefetch)
    args = [num_seqs, kv_lens.astype(jnp.int32), block_tables.astype(jnp.int32), qsl, q, kv_pages]
    aliases = {}
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
        if by_request:
            args.append(out_init.astype(q.dtype))
            aliases = {len(args) - 1: 0}
    else:
        out_shape = (
            jax.ShapeDtypeStruct((num_rows, num_splits, num_q_heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_rows, num_splits, num_q_heads), jnp.float32))
    result = pl.pallas_call(
        kernel,
        grid=(num_rows, num_kv_heads, num_splits),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=cm.compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"jaxpage_decode_bkv{block_kv}_s{num_splits}",
    )(*args)
    if num_splits == 1:
        return result
    o_part, lse = result
    args = [num_seqs, qsl, o_part, lse]
    if by_request:
        args.append(out_init.astype(q.dtype))
    return pl.pallas_call(
        functools.partial(_combine_kernel, num_splits=num_splits,
                          head_dim_padded=head_dim_padded, by_request=by_request),
        grid=(num_rows, num_q_heads),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        input_output_aliases={4: 0} if by_request else {},
        compiler_params=cm.compiler_params(COMBINE_NUM_WARPS, 1),
        interpret=interpret,
        name=f"jaxpage_decode_combine_s{num_splits}",
    )(*args)
