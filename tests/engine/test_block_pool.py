import pytest

from jaxpage.engine.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]


def cache(pool: BlockPool, block: KVCacheBlock, tag: bytes, parent_uid=None) -> int:
    return pool.cache_block(block, b"h" + tag, parent_uid, tag, None)


def test_null_page_is_never_handed_out():
    pool = BlockPool(5)
    assert pool.null_block.block_id == 0 and pool.null_block.is_null
    assert free_ids(pool) == [1, 2, 3, 4]
    assert pool.get_num_free_blocks() == 4
    blocks = pool.get_new_blocks(4)
    assert [b.block_id for b in blocks] == [1, 2, 3, 4]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1, 1]
    assert pool.get_num_free_blocks() == 0 and pool.get_usage() == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    pool.free_blocks([pool.null_block])  # ignored, never queued
    assert pool.get_num_free_blocks() == 0


def test_pool_needs_a_usable_page():
    with pytest.raises(ValueError):
        BlockPool(1)


def test_uncached_pages_go_to_the_head_cached_to_the_tail():
    pool = BlockPool(7)
    b = pool.get_new_blocks(4)  # pages 1..4; free queue: 5 6
    cache(pool, b[0], b"a")
    cache(pool, b[1], b"b")
    # Freed tail first, like a request: 4 (uncached) -> head, 3 -> head, 2, 1 (cached) -> tail.
    pool.free_blocks(reversed(b))
    assert free_ids(pool) == [3, 4, 5, 6, 2, 1]
    assert [x.ref_cnt for x in b] == [0, 0, 0, 0]
    # Allocation takes worthless pages first; the cached ones are evicted last, child first.
    got = pool.get_new_blocks(5)
    assert [x.block_id for x in got] == [3, 4, 5, 6, 2]
    assert b[1].cache_key is None  # evicted: gone from the index
    assert pool.get_cached_block(b"hb", None, b"b", None) is None
    assert pool.get_cached_block(b"ha", None, b"a", None) is b[0]


def test_touch_revives_a_free_cached_page_in_place():
    pool = BlockPool(6)
    b = pool.get_new_blocks(5)
    for i, x in enumerate(b):
        cache(pool, x, bytes([i]))
    pool.free_blocks(b)  # in order: queue 1 2 3 4 5
    assert free_ids(pool) == [1, 2, 3, 4, 5]
    pool.touch([b[2]])  # from the middle, O(1)
    assert free_ids(pool) == [1, 2, 4, 5]
    assert b[2].ref_cnt == 1 and pool.get_num_free_blocks() == 4
    pool.touch([b[2]])  # a second user: shared page
    assert b[2].ref_cnt == 2 and pool.get_num_free_blocks() == 4
    pool.free_blocks([b[2]])
    assert b[2].ref_cnt == 1 and free_ids(pool) == [1, 2, 4, 5]
    pool.free_blocks([b[2]])
    assert free_ids(pool) == [1, 2, 4, 5, 3]  # most recently freed: evicted last


def test_double_free_raises():
    pool = BlockPool(3)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(RuntimeError):
        pool.free_blocks([b])


def test_cache_lookup_verifies_content_not_just_hash():
    pool = BlockPool(4)
    b1, b2 = pool.get_new_blocks(2)
    uid1 = pool.cache_block(b1, b"same", None, b"tokens-1", None)
    uid2 = pool.cache_block(b2, b"same", uid1, b"tokens-2", ("salt",))
    assert uid1 != uid2
    assert pool.get_cached_block(b"same", None, b"tokens-1", None) is b1
    assert pool.get_cached_block(b"same", uid1, b"tokens-2", ("salt",)) is b2
    assert pool.get_cached_block(b"same", None, b"tokens-2", ("salt",)) is None  # wrong parent
    assert pool.get_cached_block(b"same", uid1, b"tokens-2", None) is None  # wrong extra keys
    assert pool.get_cached_block(b"same", None, b"tokens-3", None) is None  # wrong tokens
    assert pool.get_cached_block(b"other", None, b"tokens-1", None) is None
    assert len(pool.cached_block_hash_to_block[b"same"]) == 2
    assert pool.cache_block(b1, b"x", None, b"y", None) == uid1  # already cached: unchanged


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(4)
    b = pool.get_new_blocks(2)
    cache(pool, b[0], b"a")
    assert not pool.reset_prefix_cache()
    pool.free_blocks(b)
    assert pool.reset_prefix_cache()
    assert pool.cached_block_hash_to_block == {} and b[0].cache_key is None
    assert pool.get_num_free_blocks() == 3


def test_free_queue_operations():
    blocks = [KVCacheBlock(i) for i in range(4)]
    q = FreeKVCacheBlockQueue(blocks[:3])
    q.appendleft(blocks[3])
    assert [b.block_id for b in q.get_all_free_blocks()] == [3, 0, 1, 2]
    q.remove(blocks[0])
    assert q.popleft() is blocks[3]
    assert [b.block_id for b in q.get_all_free_blocks()] == [1, 2] and q.num_free_blocks == 2
    with pytest.raises(RuntimeError):
        q.remove(blocks[0])  # not queued
    with pytest.raises(RuntimeError):
        q.append(blocks[1])  # already queued
    q.popleft(), q.popleft()
    with pytest.raises(ValueError):
        q.popleft()
