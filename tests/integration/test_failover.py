"""A site of several servers: the resolver moves on when one is down; negative answers are cached."""

from __future__ import annotations

import asyncio
import socket

import pytest

from resolver.errors import NotFound, Unavailable
from resolver.registrar import Registrar
from resolver.resolver import Resolver, SyncResolver, Trace
from tests.integration.conftest import Cluster


def dead_address() -> str:
    """An address on loopback where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_a_dead_server_of_a_site_is_skipped(hierarchy: Cluster) -> None:
    dead, enterprise = dead_address(), hierarchy.address("enterprise-1")
    registrar = Registrar(node=hierarchy.address("secondary-100"))
    try:
        await registrar.delegate_prefix("88.100.1", [dead, enterprise])
    finally:
        await registrar.close()
    async with Resolver([hierarchy.address("top-level")], timeout=2.0) as resolver:
        skipped = 0
        for n in (1, 2, 3):  # the Handle hash sends some of these to the dead server first
            trace = Trace()
            record = await resolver.resolve(f"88.100.1/SN-{n:04d}", trace)
            assert record.version == 1
            assert trace.hops[-1].server == enterprise
            skipped += sum(1 for h in trace.hops if h.server == dead and h.outcome.startswith("Unavailable"))
        assert skipped >= 1


async def test_a_site_with_no_live_server_is_unavailable(hierarchy: Cluster) -> None:
    dead = dead_address()
    registrar = Registrar(node=hierarchy.address("secondary-100"))
    try:
        await registrar.delegate_prefix("88.100.1", [dead])
    finally:
        await registrar.close()
    async with Resolver([hierarchy.address("top-level")], timeout=2.0) as resolver:
        with pytest.raises(Unavailable, match=f"no server for 88.100.1 answered: {dead}"):
            await resolver.resolve("88.100.1/SN-0001")


async def test_not_found_is_cached_for_the_negative_ttl(hierarchy: Cluster) -> None:
    async with Resolver([hierarchy.address("top-level")]) as resolver:
        with pytest.raises(NotFound):
            await resolver.resolve("88.100.1/NOPE")
        trace = Trace()
        with pytest.raises(NotFound):
            await resolver.resolve("88.100.1/NOPE", trace)
        assert trace.network_hops == 0
        assert 299 < resolver.cache.remaining_ttl(b"88.100.1/NOPE") <= 301  # whole seconds, rounded up


async def test_the_sync_resolver(hierarchy: Cluster) -> None:
    def resolve() -> int:
        with SyncResolver([hierarchy.address("top-level")]) as resolver:
            return resolver.resolve("88.100.1/SN-0003").version

    assert await asyncio.to_thread(resolve) == 1
