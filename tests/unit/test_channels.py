"""The channel pool: bounded, least recently used channel closed first."""

from __future__ import annotations

import grpc.aio
import pytest

from resolver.channels import EVICTION_GRACE, ChannelPool


class FakeChannel:
    def __init__(self, address: str) -> None:
        self.address = address
        self.closed_with: list[float | None] = []

    async def close(self, grace: float | None = None) -> None:
        self.closed_with.append(grace)


class FakePool(ChannelPool):
    """Channels that only record how they were closed."""

    def __init__(self, max_channels: int) -> None:
        super().__init__(max_channels=max_channels)
        self.opened: dict[str, FakeChannel] = {}

    def _open(self, address: str) -> grpc.aio.Channel:
        channel = FakeChannel(address)
        self.opened[address] = channel
        return channel  # type: ignore[return-value]


async def test_the_least_recently_used_channel_is_closed_when_the_pool_is_full() -> None:
    pool = FakePool(max_channels=2)
    a = pool.get("10.0.0.1:1")
    pool.get("10.0.0.2:1")
    assert pool.get("10.0.0.1:1") is a  # reused, and now the most recently used
    pool.get("10.0.0.3:1")
    assert len(pool) == 2
    assert pool.get("10.0.0.1:1") is a
    await pool.close()
    closed = {address: channel.closed_with for address, channel in pool.opened.items()}
    # The evicted channel lets calls in flight finish; the rest are closed at once by close().
    assert closed == {"10.0.0.1:1": [None], "10.0.0.2:1": [EVICTION_GRACE], "10.0.0.3:1": [None]}


async def test_many_addresses_keep_at_most_max_channels_real_channels() -> None:
    pool = ChannelPool(max_channels=3)
    for n in range(20):
        pool.get(f"127.0.0.1:{20000 + n}")
    assert len(pool) == 3
    await pool.close()
    assert len(pool) == 0


def test_a_pool_holds_at_least_one_channel() -> None:
    with pytest.raises(ValueError, match="max_channels must be at least 1"):
        ChannelPool(max_channels=0)
