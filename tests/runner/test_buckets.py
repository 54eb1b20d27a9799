import pytest

from jaxpage.runner.buckets import Buckets


def test_token_and_request_buckets():
    b = Buckets.create(max_num_batched_tokens=2048, max_num_seqs=64)
    assert b.token_buckets == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert b.req_buckets == (8, 16, 32, 64)


def test_non_power_of_two_limits_are_buckets():
    b = Buckets.create(max_num_batched_tokens=100, max_num_seqs=12)
    assert b.token_buckets == (16, 32, 64, 100)
    assert b.req_buckets == (8, 12)


@pytest.mark.parametrize("t,r,want", [(1, 1, (16, 8)), (16, 9, (16, 16)), (17, 3, (32, 8)),
                                      (2048, 64, (2048, 64)), (300, 33, (512, 64))])
def test_pick(t, r, want):
    assert Buckets.create(2048, 64).pick(t, r) == want


def test_pick_rejects_oversized_step():
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        Buckets.create(64, 8).pick(65, 1)


def test_pairs_cover_every_reachable_step():
    b = Buckets.create(256, 32)
    pairs = set(b.pairs())
    for t in range(1, 257):
        for r in range(1, min(t, 32) + 1):  # every request has at least one token
            assert b.pick(t, r) in pairs
    assert len(pairs) < len(b.token_buckets) * len(b.req_buckets) + 1
