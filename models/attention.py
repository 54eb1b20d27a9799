"""Per-step attention metadata and the paged-attention call every model layer makes."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaledKVPool:
    """One layer's pool with its scales (vLLM's per-layer ``k_scale`` / ``v_scale``): the pool
    holds K / k_scale and V / v_scale. ``scales`` (2,) float32 is (k_scale, v_scale); zeros
    mean "not calibrated yet": the first step that runs calibrates them from its own K and V
    (``calibrated_scales``), writes with them, and returns them in the pool it hands back, so
    every later step reads them from there (``calculate_kv_scales``; no host round trip)."""

    pages: jax.Array
    scales: jax.Array


# Calibration maps the largest |K| (|V|) of the first step's tokens to this fraction of the
# pool type's largest value: later tokens up to 2x larger still fit (past that they saturate),
# at the price of one bit of range at the small end.
KV_SCALE_HEADROOM = 0.5


def calibrated_scales(k: jax.Array, v: jax.Array, md: AttentionMetadata, dtype) -> jax.Array:
    """(k_scale, v_scale) from this step's live tokens (padding rows excluded): the largest
    magnitude over KV_SCALE_HEADROOM x the largest value of ``dtype``; 1 where all are zero."""
    live = jnp.arange(k.shape[0]) < md.query_start_loc[md.num_seqs[0]]  # (T,)
    top = KV_SCALE_HEADROOM * float(jnp.finfo(dtype).max)
    amax = jnp.stack([jnp.max(jnp.where(live[:, None, None], jnp.abs(x.astype(jnp.float32)), 0))
                      for x in (k, v)])  # (2,)
    return jnp.where(amax > 0, amax / top, 1.0)


def paged_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    kv_pages: jax.Array | ScaledKVPool, md: AttentionMetadata, *,
                    sm_scale: float, soft_cap: float | None = None,
                    sliding_window: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Writes this step's K/V into the pool, then attends over each request's pages.

    Args:
        q: (T, N, H); k, v: (T, K, H); kv_pages: one layer's pool, or a ``ScaledKVPool``:
            then K / k_scale and V / v_scale are stored, and the kernels see q k_scale (scores
            q . K) and return attention over V / v_scale, which is multiplied back.

    Returns:
        ((T, N, H) attention output, updated kv_pages of the same kind).
    """
    if isinstance(kv_pages, ScaledKVPool):
        stored = kv_pages.scales
        scales = jnp.where(stored > 0, stored, calibrated_scales(k, v, md, kv_pages.pages.dtype))
        f32 = jnp.float32
        k = k.astype(f32) / scales[0]  # quantized on the write (write_kv saturates)
        v = v.astype(f32) / scales[1]
        q = (q.astype(f32) * scales[0]).astype(q.dtype)
        out, pages = paged_attention(q, k, v, kv_pages.pages, md, sm_scale=sm_scale,
                                     soft_cap=soft_cap, sliding_window=sliding_window)
        return (out.astype(f32) * scales[1]).astype(out.dtype), ScaledKVPool(pages, scales)
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
