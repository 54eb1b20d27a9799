"""Pieces shared by the GPU (Pallas, Triton lowering) paged-attention kernels.

Every ref access here uses *only* integer-array / scalar indexers (no slices): that form lowers to
one Triton gather-load (pointers = base + Σ index·stride, contiguous along H, so 16-byte vector
loads) and is also the form that Pallas' interpret mode can discharge on CPU.

Softmax runs in the log2 domain (``exp2``) with ``sm_scale·log2(e)`` folded into the scores, and
masked scores are a large *finite* negative number rather than -inf: a row whose keys are all
masked in one block then never computes ``-inf - -inf`` (NaN); its bogus partial sums are wiped
by the rescale factor ``exp2(NEG - m) = 0`` as soon as a real score arrives.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from jaxpage.kernels_pallas import reference
from jaxpage.kernels_pallas.validation import check_paged_inputs

NEG = -1e30  # masked-score value (finite on purpose, see the module docstring)
LOG2E = math.log2(math.e)


# The dtype an fp8 pool's K/V (and q) take for the matmuls under 16-bit queries. float16: every
# e4m3 / e5m2 value is exact in it, and the conversion is the cheap one (one PTX cvt per two
# e4m3 values on sm_89+; e5m2 is f16's top byte), where e4m3 -> bf16 needs a second conversion
# on top; measured 15% faster on the decode kernel (NOTES.md, "fp8 KV pool"). q and P are
# rounded to f16's 10 mantissa bits instead of bf16's 7.
FP8_COMPUTE_DTYPE = jnp.float16
F16_MAX = 65504.0


def kv_compute_dtype(q_dtype, kv_dtype):
    """The dtype of q, K and V in the matmuls: the pool's, or for an fp8 pool
    ``FP8_COMPUTE_DTYPE`` (float32 under float32 queries)."""
    if not reference.is_fp8(kv_dtype):
        return jnp.dtype(kv_dtype)
    return jnp.dtype(jnp.float32 if jnp.dtype(q_dtype) == jnp.float32 else FP8_COMPUTE_DTYPE)


def to_compute(q, compute_dtype):
    """q in ``kv_compute_dtype``; bf16 -> f16 saturates at f16's range instead of overflowing."""
    if q.dtype == compute_dtype:
        return q
    if jnp.dtype(compute_dtype) == jnp.float16 and q.dtype != jnp.float16:
        q = jnp.clip(q.astype(jnp.float32), -F16_MAX, F16_MAX)
    return q.astype(compute_dtype)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def cols_and_mask(head_dim_padded: int, head_dim: int):
    """Column iota (Hp,) and a column mask (None when H is already a power of two)."""
    cols = jnp.arange(head_dim_padded, dtype=jnp.int32)  # (Hp,)
    return cols, (None if head_dim_padded == head_dim else cols < head_dim)


def and_cols(row_mask, col_mask):
    """(M,) row mask & optional (Hp,) column mask -> (M, 1) or (M, Hp)."""
    if col_mask is None:
        return row_mask[:, None]
    return row_mask[:, None] & col_mask[None, :]


def block_page_ids(block_tables_ref, req, tok, tok_mask, page_size: int):
    """(BK,) int32 page id holding each token ``tok`` of request ``req`` (0 where masked).

    Split from the K/V load so that a loop can fetch the ids of a later block ahead of time:
    a K/V load whose addresses come from a load *in the same iteration* defeats Triton's
    software pipeliner (it waits for every copy before the math; see docs/benchmarks/NOTES.md).
    """
    max_pages = block_tables_ref.shape[1]
    if tok_mask is None:  # caller guarantees every token is live (< kv_len)
        return plgpu.load(block_tables_ref.at[req, tok // page_size])
    page_idx = jnp.minimum(tok // page_size, max_pages - 1)  # (BK,) index into the block table
    return plgpu.load(block_tables_ref.at[req, page_idx], mask=tok_mask, other=0)


def load_kv_rows(kv_pages_ref, pages, kind, kv_head, tok, tok_mask, cols, col_mask,
                 compute_dtype=None):
    """Gathers K (kind=0) or V (kind=1) rows of tokens ``tok`` living in pages ``pages``.

    Args:
        kv_pages_ref: (P, 2, K, S, H) the pool.
        pages: (BK,) int32 page id of each token (``block_page_ids``).
        tok: (BK,) int32 absolute token positions; tok_mask: (BK,) which of them to read, or
            None when all of them are live (no masks: the unmasked main loop of prefill).
        cols: (Hp,) int32 column iota; col_mask: None or (Hp,) bool.
        compute_dtype: the dtype the block is returned in (``kv_compute_dtype``: an fp8 pool
            is read as one byte per value and converted after the load).

    Returns:
        (BK, Hp) block; rows outside ``tok_mask`` are 0 and their memory is never touched, so
        stale or NaN KV past kv_len cannot leak in.
    """
    offset = tok % kv_pages_ref.shape[3]  # (BK,)
    ref = kv_pages_ref.at[pages[:, None], kind, kv_head, offset[:, None], cols[None, :]]
    if tok_mask is None:
        if col_mask is None:
            rows = plgpu.load(ref)  # (BK, Hp)
        else:
            rows = plgpu.load(ref, mask=jnp.broadcast_to(col_mask[None, :], (
                tok.shape[0], cols.shape[0])), other=0.0)
    else:
        # other=0.0, not 0: the lowering casts it to the pool's dtype, and has no int -> fp8.
        rows = plgpu.load(ref, mask=and_cols(tok_mask, col_mask), other=0.0)  # (BK, Hp)
    if compute_dtype is not None and rows.dtype != compute_dtype:
        rows = rows.astype(compute_dtype)  # an fp8 pool: upcast in registers, after the load
    return rows


def load_kv_block(kv_pages_ref, block_tables_ref, req, kv_head, tok, tok_mask, cols, col_mask,
                  compute_dtype=None):
    """K and V blocks ((BK, Hp) each) of tokens ``tok`` of request ``req``: one page-id gather
    shared by both loads. Arguments as ``block_page_ids`` and ``load_kv_rows``."""
    pages = block_page_ids(block_tables_ref, req, tok, tok_mask, kv_pages_ref.shape[3])
    return tuple(load_kv_rows(kv_pages_ref, pages, kind, kv_head, tok, tok_mask, cols, col_mask,
                              compute_dtype) for kind in (0, 1))


@dataclasses.dataclass(frozen=True)
class KvBlocks:
    """One request's KV range [lo, hi) of one kv head, in blocks of ``block_kv`` tokens.

    ``tokens``, ``page_ids`` and ``load_kv`` are the three steps of fetching a block, kept apart
    so that ``kv_loop`` can issue them in different iterations.
    """
    kv_pages_ref: object  # (P, 2, K, S, H)
    block_tables_ref: object  # (R, Pmax)
    req: jax.Array
    kv_head: jax.Array
    lo: jax.Array | int
    hi: jax.Array
    block_kv: int
    cols: jax.Array
    col_mask: jax.Array | None
    compute_dtype: object = None  # K/V upcast to it after the load (an fp8 pool), or as stored

    def tokens(self, blk):
        """(BK,) positions of block ``blk`` and which of them lie in [lo, hi)."""
        tok = blk * self.block_kv + jnp.arange(self.block_kv, dtype=jnp.int32)
        return tok, (tok >= self.lo) & (tok < self.hi)

    def page_ids(self, blk):
        """(BK,) page of each token of block ``blk`` (0 where masked)."""
        return block_page_ids(self.block_tables_ref, self.req, *self.tokens(blk),
                              self.kv_pages_ref.shape[3])

    def load_kv(self, blk, pages):
        """(BK, Hp) K and V of block ``blk`` from its page ids."""
        tok, tok_mask = self.tokens(blk)
        return tuple(load_kv_rows(self.kv_pages_ref, pages, kind, self.kv_head, tok, tok_mask,
                                  self.cols, self.col_mask, self.compute_dtype)
                     for kind in (0, 1))

    def decode_attend(self, q, *, sm_scale: float, soft_cap: float | None):
        """The ``attend`` of a single query position that sees every key in [lo, hi)."""
        def attend(carry, blk, k, v):
            _, tok_mask = self.tokens(blk)
            s = scores_log2(q, k, sm_scale=sm_scale, soft_cap=soft_cap)  # (M, BK)
            return online_softmax_step(carry, jnp.where(tok_mask[None, :], s, NEG), v)
        return attend


def kv_loop(first_blk, last_blk, carry, *, blocks: KvBlocks, attend, prefetch: str):
    """Runs ``attend`` over KV blocks [first_blk, last_blk); returns the final carry.

    Args:
        blocks: where the blocks come from (page ids, then K/V from those pages).
        attend(carry, blk, k, v) -> carry: the math of one block.
        prefetch: how the loads are laid over the iterations —
            "none": ids, K/V and math of a block in one iteration. The K/V addresses come
                from a load of the same iteration, and Triton's pipeliner then keeps two
                buffers and waits for every copy before the math.
            "index": the ids are fetched one block ahead (a loop-carried value), so Triton
                pipelines the K/V copies three deep, as in jax's dense attention kernel. With
                two CTAs per SM hiding each other's copies this measured no faster
                (docs/benchmarks/NOTES.md), so "none" is the default.
        Blocks past ``last_blk`` are fetched fully masked: they touch no memory.
    """
    if prefetch == "index":
        def body(blk, c):
            *c, pages = c
            next_pages = blocks.page_ids(blk + 1)
            return (*attend(tuple(c), blk, *blocks.load_kv(blk, pages)), next_pages)

        *carry, _ = lax.fori_loop(first_blk, last_blk, body,
                                  (*carry, blocks.page_ids(first_blk)))
        return tuple(carry)
    if prefetch != "none":
        raise ValueError(f"prefetch must be 'none' or 'index', got {prefetch!r}")
    return lax.fori_loop(
        first_blk, last_blk,
        lambda blk, c: attend(c, blk, *blocks.load_kv(blk, blocks.page_ids(blk))), carry)


def _precision(dtype):
    # float32 KV gets true fp32 products (IEEE); Triton's default for f32 would be tf32.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def scores_log2(q, k, *, sm_scale: float, soft_cap: float | None):
    """(M, H) x (BK, H) -> (M, BK) f32 logits already multiplied by log2(e)."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                        precision=_precision(q.dtype))  # (M, BK)
    if soft_cap is None:
        return s * (sm_scale * LOG2E)
    return jnp.tanh(s * (sm_scale / soft_cap)) * (soft_cap * LOG2E)


def online_softmax_step(carry, s, v):
    """One flash-attention update.

    Args:
        carry: (m (M,), l (M,), acc (M, Hp)) f32 running max (log2 domain), sum and output.
        s: (M, BK) masked log2-domain scores; v: (BK, Hp) values (zeros where masked).
    """
    m_prev, l_prev, acc = carry
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))  # (M,)
    alpha = jnp.exp2(m_prev - m_next)  # (M,)
    p = jnp.exp2(s - m_next[:, None])  # (M, BK)
    l_next = l_prev * alpha + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32, precision=_precision(v.dtype))
    return m_next, l_next, acc * alpha[:, None] + pv


def init_carry(rows: int, head_dim_padded: int):
    return (jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim_padded), jnp.float32))


def compiler_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def check_common(q: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array, block_tables: jax.Array):
    """Shape checks shared by both wrappers; returns (T, N, H, K, S, R, Pmax)."""
    return check_paged_inputs(q, kv_pages, kv_lens, block_tables)


def check_ragged(q, kv_pages, kv_lens, block_tables, query_start_loc, sliding_window):
    """``check_common`` plus the ragged kernels' own arguments; returns (T, N, H, K, S, R)."""
    num_tokens, num_q_heads, head_dim, num_kv_heads, page_size, num_reqs, _ = check_common(
        q, kv_pages, kv_lens, block_tables)
    if query_start_loc.shape != (num_reqs + 1,):
        raise ValueError(f"query_start_loc must be ({num_reqs + 1},), got {query_start_loc.shape}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    return num_tokens, num_q_heads, head_dim, num_kv_heads, page_size, num_reqs
