"""The page pool: reference counts, an O(1) LRU free queue, and the prefix-cache index.

Every page is a :class:`KVCacheBlock`. A page with ``ref_cnt == 0`` sits in the free queue; if it
still holds a cached prefix it keeps its cache entry until it is handed out again (evicted), so a
later request can revive it (``touch``) without recomputing. Page 0 is the null page: never handed
out, so the runner can pad block tables with 0.

Free queue (a doubly linked list through the blocks themselves, sentinels at both ends)::

    head -> [uncached pages, freed most recently first] [cached pages, least recently used first] <- tail
            ^ get_new_blocks pops here (evicts)                        free_blocks appends here ^

A freed page that caches nothing is worthless, so it goes to the head and is reused first; a freed
cached page goes to the tail, so cached prefixes live as long as possible and the least recently
freed one is evicted first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockCacheKey:
    """What a cached page holds, for verifying a hash hit (never trusted by hash alone).

    ``parent_uid`` is the ``uid`` of the cache entry of the previous page of the same prefix: it
    pins the whole chain, so two prefixes whose hashes collide can never share pages.
    """

    block_hash: bytes
    parent_uid: int | None
    token_bytes: bytes
    extra_keys: tuple | None
    uid: int


class KVCacheBlock:
    """One page of the KV pool and its free-queue links."""

    __slots__ = ("block_id", "ref_cnt", "cache_key", "prev_free", "next_free", "is_null")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.cache_key: BlockCacheKey | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None
        self.is_null = False

    @property
    def block_hash(self) -> bytes | None:
        return None if self.cache_key is None else self.cache_key.block_hash

    def __repr__(self) -> str:
        cached = "cached" if self.cache_key is not None else "-"
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}, {cached})"


class FreeKVCacheBlockQueue:
    """Doubly linked list of free pages: O(1) pop at the head, push at either end, and removal."""

    def __init__(self, blocks: Iterable[KVCacheBlock]):
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        if block.prev_free is None or block.next_free is None:
            raise RuntimeError(f"{block} is not in the free queue")
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        self._insert_after(self._tail.prev_free, block)

    def appendleft(self, block: KVCacheBlock) -> None:
        self._insert_after(self._head, block)

    def _insert_after(self, prev: KVCacheBlock, block: KVCacheBlock) -> None:
        if block.prev_free is not None or block.next_free is not None:
            raise RuntimeError(f"{block} is already in the free queue")
        nxt = prev.next_free
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self.num_free_blocks += 1

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """Head to tail (eviction order); O(n), for tests and debugging."""
        out, block = [], self._head.next_free
        while block is not self._tail:
            out.append(block)
            block = block.next_free
        return out


class BlockPool:
    """Pages ``1 .. num_blocks-1`` for requests (page 0 is the null page).

    Args:
        num_blocks: pages in the pool, the null page included.
        enable_caching: keep the hash -> page index (prefix caching).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (page 0 is reserved), got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.is_null = True
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks[1:])
        # block hash -> {block_id: block}: several pages may share a hash (a collision, or the
        # same content computed twice before either was cached); lookups verify each candidate.
        self.cached_block_hash_to_block: dict[bytes, dict[int, KVCacheBlock]] = {}
        self._next_uid = 0

    # -- allocation ---------------------------------------------------------------------------
    def get_num_free_blocks(self) -> int:
        """Pages that can be handed out now (free uncached pages plus evictable cached ones)."""
        return self.free_block_queue.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pops ``num_blocks`` pages from the head of the free queue (evicting their cache
        entries) with ``ref_cnt`` 1. Raises ValueError if there are not enough."""
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(f"cannot get {num_blocks} free blocks from the pool")
        out = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Takes a reference on prefix-cache hits; a free one leaves the free queue in O(1)."""
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference from each page; pages reaching 0 join the free queue in the
        order given (callers pass a request's pages tail first, so its tail is evicted first)."""
        for block in ordered_blocks:
            if block.is_null:
                continue
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.cache_key is not None:
                    self.free_block_queue.append(block)
                else:
                    self.free_block_queue.appendleft(block)

    # -- prefix cache -------------------------------------------------------------------------
    def get_cached_block(self, block_hash: bytes, parent_uid: int | None, token_bytes: bytes,
                         extra_keys: tuple | None) -> KVCacheBlock | None:
        """The cached page whose content is exactly (parent entry, tokens, extra keys), or None."""
        candidates = self.cached_block_hash_to_block.get(block_hash)
        if not candidates:
            return None
        for block in candidates.values():
            key = block.cache_key
            if (key.parent_uid == parent_uid and key.token_bytes == token_bytes
                    and key.extra_keys == extra_keys):
                return block
        return None

    def cache_block(self, block: KVCacheBlock, block_hash: bytes, parent_uid: int | None,
                    token_bytes: bytes, extra_keys: tuple | None) -> int:
        """Registers a full, computed page in the index; returns its cache entry uid."""
        if block.is_null:
            raise RuntimeError("the null page cannot be cached")
        if block.cache_key is not None:
            return block.cache_key.uid
        uid = self._next_uid
        self._next_uid += 1
        block.cache_key = BlockCacheKey(block_hash, parent_uid, token_bytes, extra_keys, uid)
        self.cached_block_hash_to_block.setdefault(block_hash, {})[block.block_id] = block
        return uid

    def _evict(self, block: KVCacheBlock) -> None:
        key = block.cache_key
        if key is None:
            return
        candidates = self.cached_block_hash_to_block[key.block_hash]
        del candidates[block.block_id]
        if not candidates:
            del self.cached_block_hash_to_block[key.block_hash]
        block.cache_key = None

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix; refused (False) while any page is in use."""
        if self.get_num_free_blocks() != self.num_blocks - 1:
            return False
        for block in self.blocks:
            block.cache_key = None
        self.cached_block_hash_to_block.clear()
        return True

    def get_usage(self) -> float:
        """Fraction of usable pages held by requests (cached free pages count as free)."""
        return 1.0 - self.get_num_free_blocks() / (self.num_blocks - 1)
