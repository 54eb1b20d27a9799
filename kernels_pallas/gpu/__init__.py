"""Paged attention kernels for NVIDIA GPUs: Pallas with the Triton lowering.

- ``ragged_attention.ragged_paged_attention``: the general mixed prefill + decode kernel
  (single-token requests inside it take a small decode tile of their own, one launch).
- ``decode_attention.decode_paged_attention``: the decode-only fast path (one query token per
  request, split-KV), chosen by the static hint ``max_q_len=1``.
- ``ragged_mosaic.ragged_paged_attention``: the same op for Hopper, written with Mosaic GPU
  (TMA page copies by a memory warpgroup, wgmma); ``ragged_paged_attention`` takes it on
  Hopper GPUs for the shapes it supports.
- ``mixed_paged_attention``: decode kernel on the single-token requests + ragged kernel on the
  rest, two launches; measured slower than the ragged kernel alone, kept for benchmarks.

Measured on an H200 (docs/benchmarks/kernels.md) and an H100 (kernels_h100.md); NOTES.md says why.

Both read the pool in the package's ``(P, 2, K, S, H)`` layout and run on CPU with
``interpret=True`` (the CI tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpage.kernels_pallas.gpu import ragged_mosaic
from jaxpage.kernels_pallas.gpu.decode_attention import decode_paged_attention
from jaxpage.kernels_pallas.gpu.ragged_attention import ragged_paged_attention as ragged_kernel

__all__ = ["decode_paged_attention", "mixed_paged_attention", "mosaic_applies", "ragged_kernel",
           "ragged_mosaic", "ragged_paged_attention"]


def mixed_paged_attention(q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs, *,
                          sm_scale: float, soft_cap: float | None = None,
                          sliding_window: int | None = None, interpret: bool = False,
                          decode_kwargs=None, ragged_kwargs=None) -> jax.Array:
    """Mixed batch in two launches: the decode kernel on its single-token requests (rows from
    ``query_start_loc``), then the ragged kernel on the rest, both writing one aliased output."""
    kw = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
              interpret=interpret)
    out = decode_paged_attention(q, kv_pages, kv_lens, block_tables, num_seqs,
                                 query_start_loc=query_start_loc, out_init=jnp.zeros_like(q),
                                 **kw, **(decode_kwargs or {}))
    return ragged_kernel(q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs,
                         skip_decode=True, out_init=out, **kw, **(ragged_kwargs or {}))


def ragged_paged_attention(q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs, *,
                           sm_scale: float, soft_cap: float | None = None,
                           sliding_window: int | None = None, max_q_len: int | None = None,
                           ragged_impl: str = "auto", interpret: bool = False) -> jax.Array:
    """Picks the kernel for a batch.

    ``max_q_len`` is a static hint (the batch shape is static under jit, the lengths are not):
    1 means every live request has exactly one query row, row ``b`` for request ``b``, and
    takes the split-KV decode kernel. Anything else (or None) runs a ragged kernel:
    ``ragged_impl`` "triton" (portable), "mosaic" (Hopper: TMA + wgmma, ``ragged_mosaic``) or
    "auto": Mosaic on a Hopper GPU for the shapes it takes at the head dims where it measured
    faster (``ragged_mosaic.AUTO_HEAD_DIMS``; docs/benchmarks/NOTES.md), Triton otherwise and
    in the interpreter.
    """
    if max_q_len == 1:
        return decode_paged_attention(q, kv_pages, kv_lens, block_tables, num_seqs,
                                      sm_scale=sm_scale, soft_cap=soft_cap,
                                      sliding_window=sliding_window, interpret=interpret)
    if ragged_impl not in ("auto", "triton", "mosaic"):
        raise ValueError(f"ragged_impl must be 'auto', 'triton' or 'mosaic', got {ragged_impl!r}")
    if ragged_impl == "auto":
        ragged_impl = "mosaic" if not interpret and mosaic_applies(q, kv_pages) else "triton"
    if ragged_impl == "mosaic":
        return ragged_mosaic.ragged_paged_attention(
            q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs, sm_scale=sm_scale,
            soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret)
    return ragged_kernel(q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs,
                         sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
                         interpret=interpret)


def mosaic_applies(q, kv_pages) -> bool:
    """True on a Hopper GPU (compute capability 9.x) for shapes ``ragged_mosaic`` takes, at
    the head dims where it measured faster than the Triton kernel. At every step size: on an
    H200 it was 2x faster on small verify steps of speculative decoding, as fast on small
    chunks beside decodes, and 2-3 µs slower only on one request's first 16-64 tokens
    (``tools/bench_small_steps.py``, docs/benchmarks/small_steps.md)."""
    if jax.default_backend() != "gpu":
        return False
    if not str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9"):
        return False
    _, num_q_heads, head_dim = q.shape
    _, _, num_kv_heads, page_size, _ = kv_pages.shape
    return head_dim in ragged_mosaic.AUTO_HEAD_DIMS and ragged_mosaic.supported(
        num_q_heads, num_kv_heads, head_dim, page_size, q.dtype, kv_pages.dtype) is None
