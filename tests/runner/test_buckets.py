import pytest

from jaxpage.config import SchedulerConfig
from jaxpage.runner.buckets import Buckets


def test_token_and_request_buckets():
    b = Buckets.create(max_num_batched_tokens=2048, max_num_seqs=64)
    assert b.token_buckets == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert b.req_buckets == (8, 16, 32, 64)


def test_token_padding_gap():
    # vLLM's TPU runner's padding: powers of two up to the gap, then its multiples.
    assert Buckets.create(4096, 128, 512).token_buckets == (
        16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096)
    assert Buckets.create(1000, 8, 256).token_buckets == (16, 32, 64, 128, 256, 512, 768, 1000)
    assert Buckets.create(300, 8, 48).token_buckets == (16, 32, 48, 96, 144, 192, 240, 288, 300)
    assert Buckets.create(100, 8, 512).token_buckets == Buckets.create(100, 8).token_buckets
    # a 2108-token step: 4096 rows by powers of two, 2560 with a gap of 512
    assert Buckets.create(4096, 128).pick(2108, 64)[0] == 4096
    assert Buckets.create(4096, 128, 512).pick(2108, 64)[0] == 2560


def test_token_padding_gap_must_be_a_multiple_of_16():
    for gap in (-16, 8, 100):
        with pytest.raises(ValueError, match="token_padding_gap must be 0 or a positive multiple"):
            SchedulerConfig(token_padding_gap=gap)
    assert SchedulerConfig(token_padding_gap=64).token_padding_gap == 64


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


@pytest.mark.parametrize("gap", [0, 48])
def test_pairs_cover_every_reachable_step(gap):
    b = Buckets.create(256, 32, gap)
    pairs = set(b.pairs())
    for t in range(1, 257):
        for r in range(1, min(t, 32) + 1):  # every request has at least one token
            assert b.pick(t, r) in pairs
    assert len(pairs) < len(b.token_buckets) * len(b.req_buckets) + 1
