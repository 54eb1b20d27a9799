"""Which pages each request holds, and automatic prefix caching over the block pool.

A request's pages, ``page_size`` = 4 here::

    all_token_ids   | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 __ __ |
    block table     |   page 7    |   page 3    |   page 9    |
    block_hashes    |     h0      |     h1      |      (not full: never cached)
                    h0 = H(None, t0..t3, (cache_salt,))    h1 = H(h0, t4..t7, None)

Only full pages whose KV has been computed are cached (``cache_blocks``, after each step), so a
hit never points at KV that a kernel is still writing. A lookup walks the request's hashes from
the start and stops at the first miss; each hit is verified against the page's stored tokens,
extra keys and parent entry, so a hash collision can only cost a miss, never wrong KV.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from .block_pool import BlockPool, KVCacheBlock
from .request import Request

# Parent "hash" of a prefix's first page. Fixed so hashes are reproducible across processes.
NONE_HASH = hashlib.sha256(b"jaxpage-prefix-cache-v1").digest()


def token_bytes(token_ids) -> bytes:
    """Canonical bytes of one page's token ids (little-endian int64)."""
    return np.asarray(token_ids, dtype="<i8").tobytes()


def hash_block_tokens(parent_hash: bytes | None, tokens: bytes, extra_keys: tuple | None) -> bytes:
    """SHA-256 over (parent hash, the page's token bytes, extra keys): the chained page hash.

    Module-level so tests can monkeypatch it (e.g. to force collisions).
    """
    h = hashlib.sha256()
    h.update(parent_hash if parent_hash is not None else NONE_HASH)
    h.update(len(tokens).to_bytes(8, "little"))
    h.update(tokens)
    h.update(repr(extra_keys).encode())
    return h.digest()


def block_extra_keys(request: Request, block_index: int) -> tuple | None:
    """Extra keys of one page. The salt goes into the first page only: the chain carries it on."""
    if block_index == 0 and request.cache_salt is not None:
        return (request.cache_salt,)
    return None


class KVCacheManager:
    """Allocates pages to requests and serves prefix-cache hits.

    Args:
        num_pages: pages in the pool, the null page 0 included.
        page_size: tokens per page.
        enable_caching: automatic prefix caching on/off.
    """

    def __init__(self, num_pages: int, page_size: int, *, enable_caching: bool = True):
        self.page_size = page_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_pages, enable_caching)
        self.req_to_blocks: defaultdict[str, list[KVCacheBlock]] = defaultdict(list)
        # req_id -> how many of its leading pages are in the cache index (hit or cached by it).
        self.num_cached_block: dict[str, int] = {}

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    def get_block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(req_id, ())]

    # -- prefix cache -------------------------------------------------------------------------
    def _update_block_hashes(self, request: Request, num_full_blocks: int) -> list[bytes]:
        """Extends ``request.block_hashes`` to its first ``num_full_blocks`` full pages."""
        hashes, ps, tokens = request.block_hashes, self.page_size, request.all_token_ids
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block_tokens(parent, token_bytes(tokens[i * ps:(i + 1) * ps]),
                                            block_extra_keys(request, i)))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest verified cached prefix of ``request``'s tokens.

        At least one token is always left to compute, so the step produces logits to sample from.
        Requests asking for ``prompt_logprobs`` get no hit (cached positions would have none).

        Returns:
            (pages to pass to ``allocate_slots`` as ``new_computed_blocks``, tokens they cover)
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        ps = self.page_size
        max_blocks = (request.num_tokens - 1) // ps
        hashes = self._update_block_hashes(request, max_blocks)
        tokens = request.all_token_ids
        blocks: list[KVCacheBlock] = []
        parent_uid = None
        for i in range(max_blocks):
            block = self.block_pool.get_cached_block(
                hashes[i], parent_uid, token_bytes(tokens[i * ps:(i + 1) * ps]),
                block_extra_keys(request, i))
            if block is None:
                break
            blocks.append(block)
            parent_uid = block.cache_key.uid
        return blocks, len(blocks) * ps

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Indexes the request's pages that are full and computed up to ``num_computed_tokens``."""
        if not self.enable_caching:
            return
        req_id = request.req_id
        start = self.num_cached_block.get(req_id, 0)
        num_full = min(num_computed_tokens, request.num_tokens) // self.page_size
        if num_full <= start:
            return
        blocks = self.req_to_blocks[req_id]
        hashes = self._update_block_hashes(request, num_full)
        ps, tokens = self.page_size, request.all_token_ids
        parent_uid = blocks[start - 1].cache_key.uid if start else None
        for i in range(start, num_full):
            parent_uid = self.block_pool.cache_block(
                blocks[i], hashes[i], parent_uid, token_bytes(tokens[i * ps:(i + 1) * ps]),
                block_extra_keys(request, i))
        self.num_cached_block[req_id] = num_full

    # -- allocation ---------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None
                       ) -> list[KVCacheBlock] | None:
        """Makes room for ``num_new_tokens`` more tokens of ``request``.

        Token layout after the call::

            |<- request.num_computed_tokens ->|<- new_computed_blocks ->|<- num_new_tokens ->|
            |      pages it already holds     |   prefix-cache hits     |   new pages (tail)   |

        Args:
            request: the request; ``num_computed_tokens`` is its progress before this step.
            num_new_tokens: tokens to compute this step.
            new_computed_blocks: cache hits from ``get_computed_blocks`` (first scheduling only).

        Returns:
            The newly allocated pages (possibly empty), or None if the pool is short; on None
            nothing changed.
        """
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be positive, got {num_new_tokens}.")
        new_computed_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks[request.req_id]
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.page_size
        num_required = -(-(num_computed + num_new_tokens) // self.page_size)
        num_new_blocks = num_required - len(req_blocks) - len(new_computed_blocks)
        # Hits that sit in the free queue stop being allocatable once touched.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.block_pool.get_num_free_blocks() - num_evictable_hits:
            if not req_blocks:
                del self.req_to_blocks[request.req_id]
            return None
        if new_computed_blocks:
            self.block_pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
            self.num_cached_block[request.req_id] = len(req_blocks)
        new_blocks = self.block_pool.get_new_blocks(max(num_new_blocks, 0))
        req_blocks.extend(new_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        """Releases the request's pages, tail first, so its deepest pages are evicted first."""
        blocks = self.req_to_blocks.pop(request.req_id, [])
        self.num_cached_block.pop(request.req_id, None)
        self.block_pool.free_blocks(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()
