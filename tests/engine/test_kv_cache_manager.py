from jaxpage.engine import kv_cache_manager
from jaxpage.engine.kv_cache_manager import KVCacheManager
from jaxpage.engine.request import Request
from jaxpage.sampling_params import SamplingParams

PS = 4  # page size in these tests


def make_request(req_id, tokens, *, cache_salt=None, **params) -> Request:
    return Request(req_id, list(tokens), SamplingParams(**params), seed=0, max_tokens=16,
                   cache_salt=cache_salt)


def run_prefill(kv: KVCacheManager, request: Request) -> list[int]:
    """Schedules a request's whole prompt (with its cache hits) and marks it computed."""
    hits, num_hit = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_hit, new_computed_blocks=hits) is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request, request.num_computed_tokens)
    return kv.get_block_ids(request.req_id)


def free_ids(kv: KVCacheManager) -> list[int]:
    return [b.block_id for b in kv.block_pool.free_block_queue.get_all_free_blocks()]


def test_allocate_exact_pages_and_usage():
    kv = KVCacheManager(10, PS)
    a = make_request("a", range(10))
    new = kv.allocate_slots(a, 10)
    assert [b.block_id for b in new] == [1, 2, 3]
    assert kv.get_block_ids("a") == [1, 2, 3]
    assert kv.num_free_pages == 6 and abs(kv.usage - 3 / 9) < 1e-9
    a.num_computed_tokens = 10
    a.append_output_token_ids([10, 11])  # 12 tokens: still fits page 3
    assert kv.allocate_slots(a, 2) == []
    a.num_computed_tokens = 12
    a.append_output_token_ids(12)
    assert [b.block_id for b in kv.allocate_slots(a, 1)] == [4]
    kv.free(a)
    assert kv.num_free_pages == 9 and kv.get_block_ids("a") == []


def test_prefix_hit_reuses_exact_pages_and_refcounts():
    kv = KVCacheManager(10, PS)
    a = make_request("a", range(10))
    assert run_prefill(kv, a) == [1, 2, 3]
    kv.free(a)
    # Tail first: uncached page 3 to the head, cached pages 2 then 1 to the tail.
    assert free_ids(kv) == [3, 4, 5, 6, 7, 8, 9, 2, 1]
    b = make_request("b", [0, 1, 2, 3, 4, 5, 6, 7, 8, 99, 98])
    hits, num_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [1, 2] and num_hit == 8
    new = kv.allocate_slots(b, b.num_tokens - num_hit, new_computed_blocks=hits)
    assert [x.block_id for x in new] == [3]
    assert kv.get_block_ids("b") == [1, 2, 3]
    assert [kv.block_pool.blocks[i].ref_cnt for i in (1, 2, 3)] == [1, 1, 1]
    # A second sharer of the same prefix while b still holds it.
    c = make_request("c", list(range(8)) + [50])
    hits, num_hit = kv.get_computed_blocks(c)
    kv.allocate_slots(c, 1, new_computed_blocks=hits)
    assert kv.get_block_ids("c") == [1, 2, 4]
    assert [kv.block_pool.blocks[i].ref_cnt for i in (1, 2)] == [2, 2]
    kv.free(b)
    kv.free(c)
    assert kv.num_free_pages == 9


def test_a_hit_never_covers_the_whole_prompt():
    kv = KVCacheManager(10, PS)
    run_prefill(kv, make_request("a", range(9)))
    exact = make_request("b", range(8))  # two full cached pages, but one token must run
    assert kv.get_computed_blocks(exact)[1] == 4
    longer = make_request("c", range(9))
    assert kv.get_computed_blocks(longer)[1] == 8


def test_cache_salt_isolates_tenants():
    kv = KVCacheManager(20, PS)
    run_prefill(kv, make_request("a", range(9), cache_salt="tenant-1"))
    assert kv.get_computed_blocks(make_request("b", range(9), cache_salt="tenant-2"))[1] == 0
    assert kv.get_computed_blocks(make_request("c", range(9)))[1] == 0
    assert kv.get_computed_blocks(make_request("d", range(9), cache_salt="tenant-1"))[1] == 8
    # The salt enters the first hash and therefore every hash of the chain.
    x, y = make_request("x", range(9), cache_salt="s"), make_request("y", range(9))
    kv.get_computed_blocks(x), kv.get_computed_blocks(y)
    assert x.block_hashes[0] != y.block_hashes[0] and x.block_hashes[1] != y.block_hashes[1]


def test_hashes_are_chained_on_the_prefix():
    kv = KVCacheManager(20, PS)
    run_prefill(kv, make_request("a", [1, 1, 1, 1, 2, 2, 2, 2, 0]))
    b = make_request("b", [2, 2, 2, 2, 0])  # a's second page, but at the start
    assert kv.get_computed_blocks(b)[1] == 0
    a2 = make_request("a2", [1, 1, 1, 1, 2, 2, 2, 2, 0])
    kv.get_computed_blocks(a2)
    assert b.block_hashes[0] != a2.block_hashes[1]
    assert len(a2.block_hashes[0]) == 32  # SHA-256


def test_hash_collisions_are_caught_by_verification(monkeypatch):
    monkeypatch.setattr(kv_cache_manager, "hash_block_tokens", lambda parent, toks, extra: b"c")
    kv = KVCacheManager(20, PS)
    assert run_prefill(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])) == [1, 2, 3]
    # Same hash, different tokens: a miss, not a wrong hit.
    b = make_request("b", [11, 12, 13, 14, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(b) == ([], 0)
    # Cache b's first page elsewhere; b's second page then matches a's page 2 in hash and
    # tokens, but its parent differs, so only b's own first page is a hit.
    assert run_prefill(kv, make_request("c", [11, 12, 13, 14, 0])) == [4, 5]
    hits, num_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [4] and num_hit == 4
    assert len(kv.block_pool.cached_block_hash_to_block[b"c"]) == 3


def test_lru_evicts_least_recently_freed_and_tail_pages_first():
    kv = KVCacheManager(5, PS)  # usable pages 1..4
    a, b = make_request("a", range(8)), make_request("b", range(100, 108))
    assert run_prefill(kv, a) == [1, 2] and run_prefill(kv, b) == [3, 4]
    kv.free(a)
    kv.free(b)
    assert free_ids(kv) == [2, 1, 4, 3]
    c = make_request("c", range(200, 204))
    assert run_prefill(kv, c) == [2]  # a's tail page is evicted first
    # a's first page survived; its second did not.
    assert kv.get_computed_blocks(make_request("a2", list(range(8)) + [0]))[1] == 4
    assert kv.get_computed_blocks(make_request("b2", list(range(100, 108)) + [0]))[1] == 8


def test_shortage_returns_none_and_changes_nothing():
    kv = KVCacheManager(5, PS)
    a = make_request("a", range(12))
    kv.allocate_slots(a, 12)
    b = make_request("b", range(50, 58))
    assert kv.allocate_slots(b, 8) is None
    assert kv.num_free_pages == 1 and "b" not in kv.req_to_blocks


def test_free_cached_hits_count_against_free_pages():
    kv = KVCacheManager(5, PS)
    a = make_request("a", range(8))
    run_prefill(kv, a)
    kv.free(a)
    assert free_ids(kv) == [3, 4, 2, 1]
    big = make_request("big", list(range(8)) + list(range(50, 59)))  # 17 tokens: 5 pages
    hits, num_hit = kv.get_computed_blocks(big)
    assert num_hit == 8
    # 3 new pages needed; 4 are free but 2 of those are the hits themselves.
    assert kv.allocate_slots(big, big.num_tokens - num_hit, new_computed_blocks=hits) is None
    assert free_ids(kv) == [3, 4, 2, 1] and kv.block_pool.blocks[1].ref_cnt == 0
    ok = make_request("ok", list(range(8)) + [60, 61, 62])  # 3 pages: 1 new
    hits, num_hit = kv.get_computed_blocks(ok)
    assert [x.block_id for x in kv.allocate_slots(ok, 3, new_computed_blocks=hits)] == [3]
    assert kv.get_block_ids("ok") == [1, 2, 3] and free_ids(kv) == [4]


def test_output_pages_are_cached_too():
    kv = KVCacheManager(10, PS)
    a = make_request("a", range(6))
    run_prefill(kv, a)
    for t in (6, 7, 8):  # decode: each sampled token is computed by the next step
        a.append_output_token_ids(t)
        kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        kv.cache_blocks(a, a.num_computed_tokens)
    assert kv.num_cached_block["a"] == 2  # tokens 0..7 computed: two full pages
    kv.free(a)
    resumed = make_request("r", range(10))
    assert kv.get_computed_blocks(resumed)[1] == 8


def test_prefix_caching_off_and_prompt_logprobs_skip_the_cache():
    kv = KVCacheManager(10, PS, enable_caching=False)
    a = make_request("a", range(9))
    run_prefill(kv, a)
    assert kv.block_pool.cached_block_hash_to_block == {} and a.block_hashes == []
    kv.free(a)
    assert kv.get_computed_blocks(make_request("b", range(9))) == ([], 0)
    assert free_ids(kv) == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # uncached pages back at the head

    kv = KVCacheManager(10, PS)
    run_prefill(kv, make_request("a", range(9)))
    assert kv.get_computed_blocks(make_request("p", range(9), prompt_logprobs=2)) == ([], 0)
