"""Paged attention for jaxpage: one public op, several backends.

``ragged_paged_attention`` and ``write_kv`` are what models call; ``kv_cache_shape`` is what
the engine uses to allocate the pool, so nothing outside this package assumes a layout.
"""

from __future__ import annotations

import jax

from jaxpage.kernels_pallas import reference

BACKENDS = ("auto", "reference", "pallas")
# Concrete backends, what AttentionMetadata carries once "auto"/"pallas" met a platform.
RESOLVED_BACKENDS = ("reference", "pallas_gpu", "pallas_tpu")
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def resolve_backend(backend: str, platform: str | None = None) -> str:
    """Maps a user-facing backend to a concrete one for ``platform`` (default: JAX's backend).

    ``auto`` is the Pallas kernel on GPU and TPU and the reference elsewhere; ``pallas`` is the
    platform's Pallas kernel (on CPU: the GPU kernel, runnable only with ``interpret=True``).
    Passing the platform explicitly lets ``jax.export`` lower for a platform this host lacks.
    """
    if backend in RESOLVED_BACKENDS:
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {backend!r}.")
    platform = platform or jax.default_backend()
    if backend == "auto" and platform not in GPU_PLATFORMS + ("tpu",):
        return "reference"
    return "pallas_tpu" if platform == "tpu" else "pallas_gpu"


def kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                   backend: str = "reference") -> tuple[int, ...]:
    """Shape of one layer's KV pool, ``(P, 2, K, S, H)`` for every backend today."""
    del backend  # one layout for all backends so far
    return reference.kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim)


def kv_cache_head_axis(backend: str = "reference") -> int:
    """The kv-head axis of ``kv_cache_shape``'s layout: tensor parallelism splits the pool there."""
    del backend  # one layout for all backends so far
    return 2


def write_kv(kv_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             backend: str = "reference") -> jax.Array:
    """Writes new K/V (T, K, H) into the pool at ``slot_mapping`` (T,)."""
    del backend  # an XLA scatter for now; fusing into the kernel later if it pays
    return reference.write_kv(kv_pages, k, v, slot_mapping)


def ragged_paged_attention(q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs, *,
                           sm_scale: float, soft_cap: float | None = None,
                           sliding_window: int | None = None, backend: str = "auto",
                           interpret: bool = False, max_q_len: int | None = None):
    """Mixed prefill + decode paged attention; see ``reference.py`` for the exact contract.

    ``max_q_len`` is a static hint: 1 promises a decode-only batch (every live request has
    exactly one query row, row b for request b), which selects the split-KV decode kernel.
    """
    backend = resolve_backend(backend)
    if backend == "reference":
        return reference.ragged_paged_attention(
            q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs,
            sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    if backend == "pallas_gpu":
        from jaxpage.kernels_pallas import gpu  # imported lazily: Triton / Mosaic GPU Pallas APIs
        return gpu.ragged_paged_attention(
            q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs, sm_scale=sm_scale,
            soft_cap=soft_cap, sliding_window=sliding_window, max_q_len=max_q_len,
            interpret=interpret)
    # Imported lazily: Mosaic TPU APIs. True interpret -> the TPU interpreter.
    from jaxpage.kernels_pallas.tpu import ragged_paged_attention as tpu_rpa
    return tpu_rpa.ragged_paged_attention(
        q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs, sm_scale=sm_scale,
        soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret)
