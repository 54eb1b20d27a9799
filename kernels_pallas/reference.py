"""Pure-jnp ragged paged attention: the oracle for every kernel and the CPU backend.

KV pool layout (one array per layer), shared by every backend in this package:

    kv_pages: (P, 2, K, S, H)   P pages, [0]=K / [1]=V, K kv heads, S tokens per page, H head dim

A token at absolute position ``pos`` of request ``i`` lives in page ``block_tables[i, pos // S]``
at offset ``pos % S``; ``slot = page * S + offset`` is what ``slot_mapping`` carries.

Ragged batch (prefill chunks and decodes mixed)::

    q rows:  |-- req 0: q_len 5 --|-- req 1: 1 --|-- req 2: 3 --|-- padding --|
    query_start_loc = [0, 5, 6, 9]                        num_seqs = 3, T = 16
    kv_lens[i] = tokens of context of request i *including* its new tokens, which are already
    written to the pool; query j of request i sits at position kv_lens[i] - q_len_i + j and
    attends causally to positions <= its own (and > pos - sliding_window, if set).

Rows past ``query_start_loc[num_seqs]`` are padding and come back as zeros. Nothing past
``kv_lens[i]`` is read into the result: freed pages hold other requests' stale KV (or NaN in
tests), so masking uses ``where``, never a multiply.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KV_AXES = "P2KSH"

# Pool dtypes narrower than the model's that the kernels upcast on load (one byte per value:
# half the KV bytes of bf16, twice the pages). No scale factors: values are stored as they are,
# saturated to the type's range (vLLM's fp8 KV cache with its default scales of 1.0).
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def is_fp8(dtype) -> bool:
    """True for the pool dtypes stored as 8-bit floats (``FP8_DTYPES``)."""
    return jnp.dtype(dtype) in FP8_DTYPES


def compute_dtype(q_dtype, kv_dtype):
    """The dtype K/V take for the matmuls: q's when the pool is fp8 (upcast on load), else the
    pool's own (a float32 pool under bf16 queries computes in float32, as before). The TPU
    kernel's rule; the GPU kernels take float16 for fp8 pools instead (``gpu._common.
    kv_compute_dtype``: a cheaper conversion there, and TPUs have no fast float16)."""
    return jnp.dtype(q_dtype) if is_fp8(kv_dtype) else jnp.dtype(kv_dtype)


def quantize_kv(x: jax.Array, dtype) -> jax.Array:
    """``x`` cast to the pool dtype; fp8 saturates at the type's largest finite value (a plain
    cast to float8_e4m3fn turns anything past 448 into NaN)."""
    dtype = jnp.dtype(dtype)
    if is_fp8(dtype):
        limit = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -limit, limit)
    return x.astype(dtype)


def kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Shape of one layer's KV pool for the reference (and GPU) layout."""
    return (num_pages, 2, num_kv_heads, page_size, head_dim)


def write_kv(kv_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Scatters new K/V rows into the pool.

    Args:
        kv_pages: (P, 2, K, S, H).
        k, v: (T, K, H) new keys/values, one row per token.
        slot_mapping: (T,) int32 ``page * S + offset``; padding tokens point into the null page 0.

    Returns:
        The updated pool (donate it to update in place).
    """
    num_pages, _, num_kv_heads, page_size, head_dim = kv_pages.shape
    page = slot_mapping // page_size  # (T,)
    offset = slot_mapping % page_size  # (T,)
    kv = quantize_kv(jnp.stack([k, v], axis=1), kv_pages.dtype)  # (T, 2, K, H)
    # Index (page, :, :, offset, :) per token; the mode="drop" guards stray out-of-range slots.
    return kv_pages.at[page[:, None, None], jnp.arange(2)[None, :, None],
                       jnp.arange(num_kv_heads)[None, None, :], offset[:, None, None]].set(
                           kv, mode="drop")


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window"))
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
) -> jax.Array:
    """Reference ragged paged attention; see the module docstring for the layout.

    Args:
        q: (T, N, H) queries of every scheduled token, requests packed back to back.
        kv_pages: (P, 2, K, S, H) this layer's pool.
        kv_lens: (R,) int32 context length per request, new tokens included.
        block_tables: (R, Pmax) int32 page ids per request (unused entries: any valid page id).
        query_start_loc: (R + 1,) int32 row offsets of each request's queries in ``q``.
        num_seqs: () or (1,) int32, requests in use; rows of later requests are padding.
        sm_scale: softmax scale, usually ``H ** -0.5``.
        soft_cap: optional tanh logit cap (Gemma 2 style).
        sliding_window: optional window; a query sees keys at positions in (pos - window, pos].

    Returns:
        (T, N, H) attention output in q's dtype; padding rows are zero.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, num_kv_heads, page_size, _ = kv_pages.shape
    num_reqs, _ = block_tables.shape
    group = num_q_heads // num_kv_heads
    num_seqs = jnp.reshape(num_seqs, ())

    # Which request each query row belongs to, and its absolute position.
    rows = jnp.arange(num_tokens, dtype=jnp.int32)  # (T,)
    req = jnp.searchsorted(query_start_loc[1:], rows, side="right").astype(jnp.int32)  # (T,)
    req_c = jnp.minimum(req, num_reqs - 1)
    valid_row = (req < num_seqs) & (rows < query_start_loc[jnp.minimum(num_seqs, num_reqs)])
    q_len = query_start_loc[req_c + 1] - query_start_loc[req_c]  # (T,)
    pos = kv_lens[req_c] - q_len + (rows - query_start_loc[req_c])  # (T,)
    kv_len = jnp.where(valid_row, kv_lens[req_c], 0)  # (T,)
    pages = block_tables[req_c]  # (T, Pmax)

    # Online softmax over one page at a time, only as far as the longest context goes: memory
    # stays O(T * S) whatever max_model_len is, and short batches cost little.
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32) * sm_scale

    def body(j, carry):
        m, l, acc = carry  # (T, K, G), (T, K, G), (T, K, G, H)
        kv = kv_pages[pages[:, j]].astype(jnp.float32)  # (T, 2, K, S, H)
        key_pos = j * page_size + jnp.arange(page_size, dtype=jnp.int32)  # (S,)
        mask = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] < kv_len[:, None])  # (T, S)
        if sliding_window is not None:
            mask &= key_pos[None, :] > pos[:, None] - sliding_window
        s = jnp.einsum("TKGH,TKSH->TKGS", qg, kv[:, 0])  # (T, K, G, S)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])  # masked entries: exp(-inf) = 0
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        # where(), not multiply: unused slots may hold NaN and 0 * NaN is NaN.
        v = jnp.where(mask[:, None, :, None], kv[:, 1], 0.0)  # (T, K, S, H)
        acc = acc * alpha[..., None] + jnp.einsum("TKGS,TKSH->TKGH", p, v)
        return m_new, l * alpha + jnp.sum(p, axis=-1), acc

    shape = (num_tokens, num_kv_heads, group)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    num_iters = (jnp.max(kv_len) + page_size - 1) // page_size
    _, l, acc = jax.lax.fori_loop(0, num_iters, body, init)
    o = acc / jnp.where(l == 0, 1.0, l)[..., None]
    o = jnp.where(valid_row[:, None, None, None], o, 0.0)
    return o.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
