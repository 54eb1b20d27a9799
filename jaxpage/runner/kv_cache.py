"""Sizes and allocates the global KV page pool (one array per layer, layout from the kernels)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxpage import kernels_pallas, sharding
from jaxpage.models.attention import ScaledKVPool

logger = logging.getLogger("jaxpage")

# Without device memory stats (the CPU backend) the pool is capped at this many bytes.
CPU_KV_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: jnp.dtype
    shards: int = 1  # devices the kv heads split over (tensor parallelism)
    scaled: bool = False  # per-layer K/V scales beside each pool (calculate_kv_scales)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across all layers (K and V), all devices together."""
        return (self.num_layers * 2 * self.num_kv_heads * self.page_size * self.head_dim
                * jnp.dtype(self.dtype).itemsize)

    @property
    def device_page_bytes(self) -> int:
        """Bytes of one page on each device."""
        return self.page_bytes // self.shards


def determine_num_pages(spec: KVCacheSpec, *, num_pages: int | None, gpu_memory_utilization: float,
                        max_model_len: int, max_num_seqs: int, device: jax.Device,
                        reserve_bytes: int = 0) -> int:
    """Pool size in pages (page 0, the null page, included).

    With ``num_pages`` given, that; else ``gpu_memory_utilization`` of the device's memory minus
    what is in use (the weights) and ``reserve_bytes`` (activations of the largest step); on a
    device without memory stats, enough for every sequence at ``max_model_len`` up to 1 GiB.
    With tensor parallelism ``device`` is one of the mesh's, holding 1/shards of each page.

    Raises:
        ValueError: the pool cannot hold one sequence of ``max_model_len`` tokens.
    """
    pages_per_seq = math.ceil(max_model_len / spec.page_size)
    if num_pages is None:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            free = gpu_memory_utilization * stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            num_pages = int((free - reserve_bytes) // spec.device_page_bytes)
        else:
            want = max_num_seqs * pages_per_seq + 1
            num_pages = max(2, min(want, CPU_KV_BUDGET_BYTES // spec.device_page_bytes))
    if num_pages - 1 < pages_per_seq:
        raise ValueError(
            f"the KV pool has room for {max(num_pages - 1, 0) * spec.page_size} tokens "
            f"({num_pages} pages of {spec.page_size}, {spec.page_bytes / 2**20:.2f} MiB each) but "
            f"max_model_len is {max_model_len}: lower max_model_len, or raise "
            "gpu_memory_utilization / num_pages.")
    return num_pages


def allocate_kv_pool(spec: KVCacheSpec, num_pages: int, backend: str,
                     mesh: jax.sharding.Mesh | None = None) -> list:
    """One pool array per layer; on a mesh, split over the kv heads (each device its slice).
    With ``spec.scaled`` each layer's pool comes with its scales, zeros until the first step
    calibrates them (``ScaledKVPool``; replicated on a mesh)."""
    shape = kernels_pallas.kv_cache_shape(num_pages, spec.page_size, spec.num_kv_heads,
                                          spec.head_dim, backend=backend)
    where = None if mesh is None else sharding.kv_pool_sharding(
        mesh, len(shape), kernels_pallas.kv_cache_head_axis(backend))
    pools = [jnp.zeros(shape, spec.dtype, device=where) for _ in range(spec.num_layers)]
    if not spec.scaled:
        return pools
    rep = None if mesh is None else sharding.replicated(mesh)
    return [ScaledKVPool(p, jnp.zeros((2,), jnp.float32, device=rep)) for p in pools]


def describe_pool(spec: KVCacheSpec, num_pages: int, max_model_len: int) -> str:
    tokens = (num_pages - 1) * spec.page_size
    pages_per_seq = math.ceil(max_model_len / spec.page_size)
    conc = (num_pages - 1) / pages_per_seq
    split = f" over {spec.shards} devices" if spec.shards > 1 else ""
    return (f"KV pool: {num_pages} pages x {spec.page_size} tokens = {tokens} tokens of KV "
            f"({num_pages * spec.page_bytes / 2**30:.2f} GiB{split}, {np.dtype(spec.dtype).name}); "
            f"max concurrency at max_model_len={max_model_len}: {conc:.2f}x")
