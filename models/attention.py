"""Per-step attention metadata and the paged-attention call every model layer makes."""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jaxpage import kernels_pallas, sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """What one jitted step needs to read and write the paged KV pool.

    Arrays are padded to the step's bucket: T tokens, R request slots, Pmax pages per request.
    Padding tokens write into the null page 0 (``slot_mapping`` = 0..S-1) and are never read.

    Fields:
        slot_mapping: (T,) int32 pool slot ``page * S + offset`` for each new token's K/V.
        block_tables: (R, Pmax) int32 page ids of each request (padding: 0, the null page).
        seq_lens: (R,) int32 context length after this step's tokens (0 for padding rows).
        query_start_loc: (R + 1,) int32 row offset of each request's tokens in the batch.
        num_seqs: (1,) int32 number of real requests.
        attention_backend: static; "reference" | "pallas" (already resolved from "auto").
        max_q_len: static hint; 1 promises a decode-only step (request b's one token in row b),
            which lets the kernels take their split-KV decode path. None: any mix.
        mesh: static; with tensor parallelism, the device mesh whose "model" axis splits the
            heads and the pool (``jaxpage/sharding.py``): attention runs per device under
            ``shard_map``. None: one device.
    """

    slot_mapping: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array
    num_seqs: jax.Array
    attention_backend: str = dataclasses.field(default="reference", metadata=dict(static=True))
    max_q_len: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    mesh: Mesh | None = dataclasses.field(default=None, metadata=dict(static=True))


def paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_pages: jax.Array,
                    md: AttentionMetadata, *, sm_scale: float, soft_cap: float | None = None,
                    sliding_window: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Writes this step's K/V into the pool, then attends over each request's pages.

    Args:
        q: (T, N, H); k, v: (T, K, H); kv_pages: one layer's pool.

    Returns:
        ((T, N, H) attention output, updated kv_pages).
    """
    local = functools.partial(_write_and_attend, backend=md.attention_backend,
                              max_q_len=md.max_q_len, sm_scale=sm_scale, soft_cap=soft_cap,
                              sliding_window=sliding_window)
    tables = (md.slot_mapping, md.seq_lens, md.block_tables, md.query_start_loc, md.num_seqs)
    if md.mesh is None:
        return local(q, k, v, kv_pages, *tables)
    # Tensor parallel: each device attends with its own heads over its own slice of the pool
    # (GQA groups stay whole: N and K split by the same factor); the step's tables are whole.
    heads = P(None, sharding.MODEL_AXIS, None)  # (T, N|K, H)
    pool = sharding.kv_pool_spec(kv_pages.ndim,
                                 kernels_pallas.kv_cache_head_axis(md.attention_backend))
    return jax.shard_map(local, mesh=md.mesh, in_specs=(heads, heads, heads, pool) + (P(),) * 5,
                         out_specs=(heads, pool), check_vma=False)(q, k, v, kv_pages, *tables)


def _write_and_attend(q, k, v, kv_pages, slot_mapping, seq_lens, block_tables, query_start_loc,
                      num_seqs, *, backend, max_q_len, sm_scale, soft_cap, sliding_window):
    kv_pages = kernels_pallas.write_kv(kv_pages, k, v, slot_mapping, backend=backend)
    out = kernels_pallas.ragged_paged_attention(
        q, kv_pages, seq_lens, block_tables, query_start_loc, num_seqs, sm_scale=sm_scale,
        soft_cap=soft_cap, sliding_window=sliding_window, backend=backend, max_q_len=max_q_len)
    return out, kv_pages
