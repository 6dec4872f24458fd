from __future__ import annotations

import pytest

from nodes.trust.quotas import (
    Charge,
    RateLimited,
    StreamCounter,
    TokenBuckets,
    charge,
    cost_of,
    current_charge,
    peer_host,
)
from resolver.errors import LimitExceeded
from resolver.wire import resolution_pb2


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


def test_a_call_costs_its_items_and_a_batch_above_the_burst_leaves_a_debt() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=10, burst=100, clock=clock)
    buckets.take("p", "peer", 60)
    with pytest.raises(RateLimited, match=r"burst 100; this call costs 60\); retry in 2001 ms") as info:
        buckets.take("p", "peer", 60)  # 40 left: 2 s until 60
    assert info.value.retry_after == pytest.approx(2.0)
    clock.now += 6  # full again
    buckets.take("p", "peer", 300)  # more than the burst: taken from a full bucket, 200 owed
    with pytest.raises(RateLimited, match="retry in 20101 ms"):
        buckets.take("p", "peer")
    assert not buckets.admits("p") and buckets.admits("q")


def test_cost_of_a_batch_is_its_number_of_items() -> None:
    batch = resolution_pb2.ResolveBatchRequest(
        requests=[resolution_pb2.ResolveRequest(identifier=f"88.1/{n}") for n in range(300)]
    ).SerializeToString()
    assert cost_of(resolution_pb2.ResolveBatchRequest, "requests", batch) == 300
    assert cost_of(resolution_pb2.ResolveBatchRequest, "requests", b"") == 1
    assert cost_of(resolution_pb2.ResolveBatchRequest, "requests", b"\xff\xff\xff") == 1  # malformed


def test_charge_spends_from_the_bucket_of_the_call_being_served() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=1, burst=10, clock=clock)
    charge(1000)  # outside a call: nothing to charge
    token = current_charge.set(Charge(buckets, "10.0.0.1"))
    try:
        charge(10)
        with pytest.raises(RateLimited, match=r"peer 10\.0\.0\.1 is over its limit"):
            charge(1)
    finally:
        current_charge.reset(token)
    assert buckets.admits("10.0.0.2", 10)
