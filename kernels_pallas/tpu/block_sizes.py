"""Block sizes for the TPU ragged paged attention kernel, and the VMEM arithmetic behind them.

The kernel has three knobs (see ``ragged_paged_attention.py``):

    pages_per_block     KV pages brought into VMEM per DMA round; keys per block L = pages * S
    queries_per_block   query tokens per grid step (TQ); a power of two, a multiple of the
                        query tile (``query_tile``: 8 rows for f32 matmul operands, 16 for bf16)
    kv_heads_per_block  KV heads per grid step (divides K); fewer heads = less VMEM, more steps

NOT YET MEASURED: no TPU was reachable when this table was written (the project's device
machines are GPUs), so the entries are derived, not timed. The reasoning, to be replaced by a
sweep on a real chip (v5e / v6e):
- L = 256 keys per block keeps the (rows, L) score tile lane-dense (a multiple of 128 lanes)
  and the per-block DMA large enough (>= 128 KiB at K = 8, H = 128, bf16) to run near HBM speed,
  while two slots of K+V for 8 heads still fit in a few MiB of VMEM.
- TQ = 64 gives G * TQ = 256 matmul rows at G = 4 (fills the MXU on v6e); decode rows do
  not pay for it because single-request rows take the narrow path (one sublane tile).
- fp8 pools keep L = 256: the per-block DMA halves (64 KiB at K = 8, H = 128), but a longer L
  would also widen the f32 score tile, which does not shrink with the pool.
Each entry is then shrunk by ``fit_block_sizes`` until the VMEM estimate fits the budget.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpage.kernels_pallas import reference

LANES = 128
# The default scoped VMEM limit on v5e; v6e has 32 MiB scoped / 128 MiB physical, v7x 64 MiB
# physical. Staying under 16 MiB needs no vmem_limit_bytes on any current chip.
VMEM_BUDGET_BYTES = 16 * 1024 * 1024

# page_size -> pages per KV block (L = 256 keys).
PAGES_PER_BLOCK = {8: 32, 16: 16, 32: 8, 64: 4, 128: 2, 256: 1}
# kv itemsize (bytes) -> query tokens per block, for large batches. Small batches use the
# smallest power of two >= num_tokens.
QUERIES_PER_BLOCK = {4: 64, 2: 64, 1: 64}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    pages_per_block: int
    queries_per_block: int
    kv_heads_per_block: int


def sublane_tile(*dtypes) -> int:
    """Rows of one native (sublane, 128) tile for the narrowest dtype: 8 (32-bit), 16, 32."""
    return _tile_rows(min(np.dtype(d).itemsize for d in dtypes))


def query_tile(q_dtype, kv_dtype) -> int:
    """Rows of the narrow (decode) path and the unit of ``queries_per_block``: the sublane tile
    of the matmul operands, i.e. q's dtype and the compute dtype. An fp8 pool is upcast to q's
    dtype before any matmul, so its 32-row tile does not widen the query rows (a bf16 pool
    under f32 queries does: q is cast to bf16)."""
    return sublane_tile(q_dtype, reference.compute_dtype(q_dtype, kv_dtype))


def _tile_rows(itemsize: int) -> int:
    return 8 * (4 // itemsize)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def vmem_bytes(bs: BlockSizes, *, group: int, page_size: int, head_dim: int,
               q_itemsize: int, kv_itemsize: int) -> int:
    """Estimate of the kernel's VMEM use; the lane dim is padded to 128 in VMEM, and a page to
    whole sublane tiles of the pool's dtype (32 rows for fp8: S = 16 takes a 32-row tile)."""
    kvb, nb, tq = bs.kv_heads_per_block, bs.pages_per_block, bs.queries_per_block
    hp = _round_up(head_dim, LANES)
    keys = nb * page_size
    kv_buf = 2 * 2 * kvb * nb * _round_up(page_size, _tile_rows(kv_itemsize)) * hp * kv_itemsize
    q_and_o = 2 * 2 * kvb * group * tq * hp * q_itemsize  # Pallas double-buffers q and out
    acc = kvb * group * tq * hp * 4
    m_l = 2 * kvb * group * tq * LANES * 4
    scores = 3 * group * tq * _round_up(keys, LANES) * 4  # s, p and the mask, one head at a time
    # fp8 (the only 1-byte pools): one head's K and V upcast via f32 to q's dtype.
    upcast = 2 * keys * hp * (4 + q_itemsize) if kv_itemsize == 1 else 0
    return kv_buf + q_and_o + acc + m_l + scores + upcast


def fit_block_sizes(*, num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                    page_size: int, pages_per_seq: int, q_dtype, kv_dtype,
                    pages_per_block: int | None = None, queries_per_block: int | None = None,
                    kv_heads_per_block: int | None = None,
                    budget: int = VMEM_BUDGET_BYTES) -> BlockSizes:
    """Picks block sizes from the table (or the caller's overrides) and fits them to VMEM."""
    group = num_q_heads // num_kv_heads
    q_itemsize, kv_itemsize = np.dtype(q_dtype).itemsize, np.dtype(kv_dtype).itemsize
    tile = query_tile(q_dtype, kv_dtype)

    nb = pages_per_block or PAGES_PER_BLOCK.get(page_size, max(1, 256 // page_size))
    nb = max(1, min(nb, pages_per_seq))
    if queries_per_block is None:
        tq = QUERIES_PER_BLOCK.get(kv_itemsize, 64)
        tq = min(tq, _next_pow2(max(num_tokens, tile)))
    else:
        tq = queries_per_block
    tq = max(tile, tq)
    kvb = kv_heads_per_block or num_kv_heads
    bs = BlockSizes(nb, tq, kvb)

    def fits(b: BlockSizes) -> bool:
        return vmem_bytes(b, group=group, page_size=page_size, head_dim=head_dim,
                          q_itemsize=q_itemsize, kv_itemsize=kv_itemsize) <= budget

    # Shrink only what the caller left to us: heads first (costs only more grid steps), then
    # pages (shorter DMAs), then queries (more KV re-reads for prefill).
    while not fits(bs):
        if kv_heads_per_block is None and bs.kv_heads_per_block > 1:
            kvb = bs.kv_heads_per_block // 2
            while num_kv_heads % kvb:
                kvb -= 1
            bs = dataclasses.replace(bs, kv_heads_per_block=kvb)
        elif pages_per_block is None and bs.pages_per_block > 1:
            bs = dataclasses.replace(bs, pages_per_block=bs.pages_per_block // 2)
        elif queries_per_block is None and bs.queries_per_block > tile:
            bs = dataclasses.replace(bs, queries_per_block=bs.queries_per_block // 2)
        else:
            break  # the caller pinned everything; vmem_limit_bytes is raised instead
    return bs
