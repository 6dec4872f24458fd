"""A site of several servers: node processes serving the same prefixes from one PostgreSQL
database. A change committed through one reaches the caches of the others by itself (NOTIFY, as
it commits), and a process whose listening was cut forgets what it cached."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from bench.postgres_server import PostgresServer
from nodes.hierarchy import NodeSpec
from nodes.storage.postgres import CHANGES_CHANNEL, ChangeFeed, change_payloads, parse_change
from resolver.errors import NotFound
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.resolver import Resolver
from tests.integration.conftest import Cluster
from tests.prometheus_text import scrape


@pytest.fixture
def store_engine() -> str:
    return "postgresql"


SEEN_WITHIN = 10.0
"""Seconds a change may take to be seen through another server before the test fails (the
measured lag is milliseconds: bench/RESULTS.md)."""


async def eventually(check: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until ``check`` holds, polled; fails after SEEN_WITHIN."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < SEEN_WITHIN, "the change was not seen through the other server"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def site(cluster: Cluster, postgres: PostgresServer) -> tuple[str, str]:
    """Two servers of one site: the same apex, the same database."""
    extra = {"storage": {"engine": "postgresql", "dsn": postgres.create_database_now()}}
    extra["node"] = {"metrics_listen": "127.0.0.1:0"}
    a = cluster.start(NodeSpec("site-a", "top-level", "88.5", 0, extra))
    b = cluster.start(NodeSpec("site-b", "top-level", "88.5", 0, extra))
    return a, b


async def test_a_write_through_one_server_reaches_the_others_cache(cluster: Cluster, postgres: PostgresServer) -> None:
    a, b = site(cluster, postgres)
    registrar = Registrar(node=a)
    try:
        await registrar.create("88.5/X", [Value(1, "URL", b"first")])
        async with Resolver([b], cache_answers=False) as through_b:
            assert (await through_b.resolve("88.5/X")).value(1).data == b"first"  # type: ignore[union-attr]
            assert (await through_b.resolve("88.5/X")).value(1).data == b"first"  # type: ignore[union-attr]  # cached on b
            await registrar.replace("88.5/X", [Value(1, "URL", b"second")])

            async def second() -> bool:
                return (await through_b.resolve("88.5/X")).value(1).data == b"second"  # type: ignore[union-attr]

            await eventually(second)
            # Not found, cached on b as such, then created through a.
            try:
                await through_b.resolve("88.5/Y")
                raise AssertionError("88.5/Y should not exist yet")
            except NotFound:
                pass
            await registrar.create("88.5/Y", [Value(1, "URL", b"y")])

            async def created() -> bool:
                try:
                    await through_b.resolve("88.5/Y")
                    return True
                except NotFound:
                    return False

            await eventually(created)
            # A prefix made through a is hosted by b too: it registers there.
            await registrar.create_prefix("88.5.7")
            registrar_b = Registrar(node=b)
            try:

                async def hosted() -> bool:
                    try:
                        await registrar_b.create("88.5.7/Z", [Value(1, "URL", b"z")])
                        return True
                    except NotFound:
                        return False

                await eventually(hosted)
            finally:
                await registrar_b.close()
            assert (await through_b.resolve("88.5.7/Z")).version == 1
    finally:
        await registrar.close()
    # b's metrics: the changes it heard from a, with their lag, and its store's pool.
    figures = scrape(cluster.processes["site-b"].metrics_port)
    assert figures.value("idis_store_change_lag_seconds_count") >= 3
    assert figures.value("idis_store_change_feed_lost_total") == 0
    for _ in range(50):  # read every second
        if scrape(cluster.processes["site-b"].metrics_port).value("idis_store_readers_open") >= 1:
            break
        await asyncio.sleep(0.1)
    figures = scrape(cluster.processes["site-b"].metrics_port)
    assert figures.value("idis_store_readers_open") >= 1 and figures.value("idis_store_sync_standbys") == 0
    assert figures.value("idis_store_writable") == 1


def test_change_payloads_fit_a_notification_and_read_back() -> None:
    keys = [f"88.100.1/SN-{n:06d}-\u4e2d\u6587" for n in range(2000)]
    payloads = change_payloads(keys, ["88.100.2"], 1_800_000_000.25)
    assert len(payloads) > 1 and all(len(p.encode()) <= 7900 for p in payloads)
    read = [parse_change(p) for p in payloads]
    assert all(at == 1_800_000_000.25 for at, _, _ in read)
    assert [k for _, ks, _ in read for k in ks] == keys
    assert [p for _, _, ps in read for p in ps] == ["88.100.2"]
    assert change_payloads([], [], 1.0) == []


async def test_a_feed_cut_off_listens_again_and_then_forgets(postgres: PostgresServer) -> None:
    """Its connection killed (a network cut, a failover): the feed reconnects by itself, says
    that changes may have been missed (what was cached must go), and hears the next change."""
    dsn = await postgres.create_database()
    heard: list[tuple[list[str], list[str]]] = []
    lost: list[float] = []

    def changed(keys: list[str], prefixes: list[str], lag: float) -> None:
        heard.append((keys, prefixes))

    feed = ChangeFeed(dsn, lambda: 0, changed, lambda: lost.append(1))
    task = asyncio.create_task(feed.run())
    other = await asyncpg.connect(dsn)
    try:
        await asyncio.wait_for(feed.listening.wait(), 10)
        await other.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, change_payloads(["88/A"], [], time.time())[0])
        await eventually(lambda: _true(bool(heard)))
        assert heard == [(["88/A"], [])] and lost == []
        await other.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND datname = current_database()"
        )
        await eventually(lambda: _true(lost == [1] and feed.listening.is_set()))
        await other.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, change_payloads([], ["88.9"], time.time())[0])
        await eventually(lambda: _true(len(heard) == 2))
        assert heard[1] == ([], ["88.9"]) and feed.losses == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await other.close()


async def test_a_feed_deaf_for_long_forgets_before_it_hears_again() -> None:
    """The database unreachable for longer than ``stale_after``: what was cached is forgotten
    then, without waiting for listening to resume, and once more when it does."""
    server = PostgresServer()
    server.init()
    server.start()
    lost: list[bool] = []
    try:
        dsn = await server.create_database()
        feed = ChangeFeed(
            dsn, lambda: 0, lambda keys, prefixes, lag: None, lambda: lost.append(feed.listening.is_set())
        )
        feed.stale_after = 0.5
        task = asyncio.create_task(feed.run())
        try:
            await asyncio.wait_for(feed.listening.wait(), 10)
            server.stop("immediate")
            await eventually(lambda: _true(lost == [False]))  # still deaf: forgotten all the same
            server.start()
            await eventually(lambda: _true(lost == [False, False] and feed.listening.is_set()))
            assert feed.losses == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        server.remove()


async def _true(value: bool) -> bool:
    return value
