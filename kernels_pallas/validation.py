"""Shape and dtype checks shared by every kernel wrapper (clear errors before any lowering)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_paged_inputs(q: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array,
                       block_tables: jax.Array, *, int32_only: bool = False):
    """Checks q (T, N, H), kv_pages (P, 2, K, S, H), kv_lens (R,), block_tables (R, Pmax).

    Args:
        int32_only: index arrays must be int32 exactly (TPU scalar prefetch); otherwise any
            integer dtype passes.

    Returns:
        (T, N, H, K, S, R, Pmax).
    """
    if q.ndim != 3:
        raise ValueError(f"q must be (T, N, H), got shape {q.shape}")
    if kv_pages.ndim != 5 or kv_pages.shape[1] != 2:
        raise ValueError(f"kv_pages must be (P, 2, K, S, H), got shape {kv_pages.shape}")
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, num_kv_heads, page_size, kv_head_dim = kv_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and kv_pages ({kv_head_dim}) differ")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be (R, Pmax), got shape {block_tables.shape}")
    num_reqs, max_pages = block_tables.shape
    if kv_lens.shape != (num_reqs,):
        raise ValueError(f"kv_lens must be ({num_reqs},), got shape {kv_lens.shape}")
    for name, a in (("kv_lens", kv_lens), ("block_tables", block_tables)):
        dtype = jnp.result_type(a)
        if (dtype != jnp.int32) if int32_only else not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"{name} must be {'int32' if int32_only else 'integer'}, got {dtype}")
    return num_tokens, num_q_heads, head_dim, num_kv_heads, page_size, num_reqs, max_pages
