from __future__ import annotations

import pytest

from nodes.trust.quotas import RateLimited, StreamCounter, TokenBuckets, peer_host
from resolver.errors import LimitExceeded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_the_burst_then_the_rate_and_says_when_to_retry() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2, burst=3, clock=clock)
    for _ in range(3):
        buckets.take("10.0.0.1", "peer")
    with pytest.raises(RateLimited, match=r"peer 10\.0\.0\.1 is over its limit of 2 calls/s") as info:
        buckets.take("10.0.0.1", "peer")
    assert info.value.retry_after == pytest.approx(0.5)
    buckets.take("10.0.0.2", "peer")  # others are not affected
    clock.now += 0.5
    buckets.take("10.0.0.1", "peer")  # recovered
    with pytest.raises(RateLimited):
        buckets.take("10.0.0.1", "peer")


def test_zero_rate_is_unlimited_and_keys_are_bounded() -> None:
    TokenBuckets(rate=0, burst=0).take("x", "peer")
    buckets = TokenBuckets(rate=1, burst=1, max_keys=10)
    for n in range(100):
        buckets.take(f"k{n}", "peer")
    assert len(buckets._buckets) == 10


def test_stream_counter() -> None:
    streams = StreamCounter(2)
    streams.open("a")
    streams.open("a")
    with pytest.raises(LimitExceeded, match="peer a already has 2 streams open"):
        streams.open("a")
    streams.close("a")
    streams.open("a")
    streams.open("b")


@pytest.mark.parametrize(
    ("peer", "host"),
    [("ipv4:127.0.0.1:5432", "127.0.0.1"), ("ipv6:[::1]:5432", "::1"), ("unix:/tmp/s", "/tmp/s")],
)
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host
