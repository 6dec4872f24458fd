"""The store on both engines (a real SQLite file, a real PostgreSQL server): schema,
transactions, range scans, cancellation, recovery. One suite: ``open_store`` runs each test on each
engine."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from bench.postgres_server import PostgresServer
from nodes.storage import PrefixRow, RecordRow, Store, StoreUnavailable, Transaction, range_of_prefix
from nodes.storage.postgres import SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION
from nodes.storage.postgres import PostgresStore
from nodes.storage.sqlite import SCHEMA_VERSION, SqliteStore
from tests.engines import Opener


def in_transaction(store: Store) -> bool:
    if isinstance(store, SqliteStore):
        return bool(store._writer.in_transaction)
    assert isinstance(store, PostgresStore)
    return store._writer.is_in_transaction()


async def writable_again(store: Store) -> None:
    """Waits (up to 10 s) for the writer task's own retries, every WRITE_RECOVERY_INTERVAL, to
    make the store writable again."""
    for _ in range(200):
        if store.writable:
            return
        await asyncio.sleep(0.05)


async def break_write_connection(store: Store) -> None:
    """The write connection goes away under the store."""
    if isinstance(store, SqliteStore):
        await store._writer.close()
    else:
        assert isinstance(store, PostgresStore)
        store._writer.terminate()


async def test_schema_is_versioned_and_wal_is_on(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "n.sqlite3")
    await store.close()
    with sqlite3.connect(tmp_path / "n.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = await SqliteStore.open(tmp_path / "n.sqlite3")  # reopening migrates nothing and works
    await again.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "n.sqlite3") as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer than this program"):
        await SqliteStore.open(tmp_path / "n.sqlite3")


async def test_a_failed_transaction_changes_nothing(open_store: Opener) -> None:
    store = await open_store()
    try:

        async def fails_half_way(tx: Transaction) -> None:
            await tx.put_prefix(PrefixRow("88", "88", 1, None, 0, 0))
            await tx.insert_many([RecordRow("88/A", 1, b"a")])
            raise ZeroDivisionError

        with pytest.raises(ZeroDivisionError):
            await store.write(fails_half_way)
        assert await store.get("88/A") is None
        assert await store.prefixes() == []
    finally:
        await store.close()


async def test_listing_a_prefix_is_a_range_scan_that_excludes_neighbours(open_store: Opener) -> None:
    store = await open_store()
    try:

        async def fill(tx: Transaction) -> None:
            for p in ("88.1", "88.10", "88.1.2"):
                await tx.put_prefix(PrefixRow(p, p, 1, None, 0, 0))
            keys = ["88.1/a", "88.1/b", "88.1/c/d", "88.10/x", "88.1.2/y", "88.1/"]
            await tx.insert_many([RecordRow(k, 1, b"") for k in keys])

        await store.write(fill)
        assert await store.list_keys("88.1", "", 10) == ["88.1/", "88.1/a", "88.1/b", "88.1/c/d"]
        assert await store.list_keys("88.1", "88.1/a", 2) == ["88.1/b", "88.1/c/d"]
        counts = {p.key: p.identifier_count for p in await store.prefixes()}
        assert counts == {"88.1": 4, "88.10": 1, "88.1.2": 1}
        assert range_of_prefix("88.1") == ("88.1/", "88.10")
    finally:
        await store.close()


async def test_reads_see_only_committed_writes(open_store: Opener) -> None:
    store = await open_store()
    try:

        async def insert(tx: Transaction) -> None:
            await tx.insert_many([RecordRow("88/A", 1, b"a")])
            assert await store.get("88/A") is None  # not yet committed

        await store.write(insert)
        row = await store.get("88/A")
        assert row is not None and row.record == b"a"
    finally:
        await store.close()


async def test_records_are_compressed_once_a_dictionary_is_trained(open_store: Opener) -> None:
    from bench.dataset import registrations
    from resolver.identifier import parse_identifier
    from resolver.record import Record
    from resolver.wire import encode_record

    store = await open_store()
    # Another process, open before the dictionary exists: it still reads the records after.
    other = await open_store()
    try:
        store.train_after = 200
        records = {
            parse_identifier(i).key: encode_record(Record(parse_identifier(i), tuple(v), 1))
            for i, v in registrations("88.1", 600)
        }
        items = list(records.items())
        for start in range(0, 300, 100):
            await store.insert_many([RecordRow(k, 1, r) for k, r in items[start : start + 100]])
        await store.trained()  # training runs off the write path, after 200 records
        assert store.compression.current == 1
        for start in range(300, len(items), 100):
            await store.insert_many([RecordRow(k, 1, r) for k, r in items[start : start + 100]])
        for key, record in items:
            row = await store.get(key)
            assert row is not None and row.record == record  # every record reads back as written
        stored = {r[0]: r[1] for r in await store._read("SELECT key, record FROM identifiers", ())}
        late = [stored[k] for k, _ in items[300:]]
        assert all(s[0] == 0x01 for s in late)
        assert sum(map(len, late)) < 0.5 * sum(len(r) for _, r in items[300:])
        assert other.compression.current == 0
        assert await store.train_dictionary() == 1  # one dictionary per database, whoever asks

        async def update(tx: Transaction) -> None:
            await tx.update(RecordRow(items[0][0], 2, items[0][1]))

        await store.write(update)
        row = await other.get(items[-1][0])
        assert row is not None and row.record == items[-1][1]
        row = await other.get(items[0][0])
        assert row is not None and row.record == items[0][1] and row.version == 2
        assert (await store._read("SELECT count(*) FROM dictionaries", ()))[0][0] == 1
    finally:
        await store.close()
        await other.close()


async def test_a_caller_cancelled_mid_transaction_leaves_no_transaction_open(open_store: Opener) -> None:
    """The transaction runs on the writer task: cancelling the caller neither interrupts it nor
    skips what follows its COMMIT, and the next write begins cleanly."""
    store = await open_store()
    try:
        inside, release = asyncio.Event(), asyncio.Event()
        followed: list[str] = []

        async def slow(tx: Transaction) -> str:
            await tx.insert_many([RecordRow("88/A", 1, b"a")])
            inside.set()
            await release.wait()
            return "88/A"

        caller = asyncio.create_task(store.write(slow, then=followed.append))
        await inside.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        release.set()
        await store.insert_many([RecordRow("88/B", 1, b"b")])  # queued behind the first: it completed
        assert followed == ["88/A"]  # the step after COMMIT ran although its caller was gone
        assert await store.get("88/A") is not None and await store.get("88/B") is not None
        assert not in_transaction(store)
    finally:
        await store.close()


async def test_a_write_whose_caller_left_before_it_began_is_skipped(open_store: Opener) -> None:
    store = await open_store()
    try:
        inside, release = asyncio.Event(), asyncio.Event()

        async def blocker(tx: Transaction) -> None:
            inside.set()
            await release.wait()

        first = asyncio.create_task(store.write(blocker))
        await inside.wait()
        queued = asyncio.create_task(store.insert_many([RecordRow("88/SKIPPED", 1, b"s")]))
        await asyncio.sleep(0)  # let it enqueue
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        await first
        await store.insert_many([RecordRow("88/AFTER", 1, b"a")])
        assert await store.get("88/SKIPPED") is None
        assert await store.get("88/AFTER") is not None
    finally:
        await store.close()


async def test_a_lost_write_connection_is_reopened_and_health_is_told(open_store: Opener) -> None:
    store = await open_store()
    told: list[bool] = []
    store.on_writable = told.append
    try:
        await break_write_connection(store)
        await store.insert_many([RecordRow("88/A", 1, b"a")])  # reopened, then written
        assert told == [False, True]
        assert store.writable and not in_transaction(store)
        assert await store.get("88/A") is not None
    finally:
        await store.close()


async def test_a_store_that_cannot_write_refuses_writes_until_it_recovers(tmp_path: Path) -> None:
    path = tmp_path / "n.sqlite3"
    store = await SqliteStore.open(path)
    told: list[bool] = []
    store.on_writable = told.append
    try:
        await store._writer.close()
        moved = tmp_path / "moved.sqlite3"
        path.rename(moved)
        path.mkdir()  # reopening the file now fails
        with pytest.raises(StoreUnavailable):
            await store.insert_many([RecordRow("88/A", 1, b"a")])
        with pytest.raises(StoreUnavailable, match="cannot write"):
            await store.insert_many([RecordRow("88/B", 1, b"b")])
        assert told == [False] and not store.writable
        path.rmdir()
        moved.rename(path)
        await writable_again(store)
        assert told == [False, True]
        await store.insert_many([RecordRow("88/C", 1, b"c")])
        assert await store.get("88/C") is not None
    finally:
        await store.close()


async def test_a_batchs_audit_rows_are_stored_as_each_row_would_be(open_store: Opener) -> None:
    from nodes.trust.audit import Actor, Caller, batch_audit
    from resolver.identifier import parse_identifier

    actor = Actor(Caller(parse_identifier("88.100.1/ADMIN"), 300), "ipv4:127.0.0.1:5", "BatchCreate")
    targets = [parse_identifier(t) for t in ("88.100.1/A", "88.100.1/\u0410\u0411\"'\\", "88.100.b/" + "x" * 240)]
    batch = batch_audit(actor, [str(t) for t in targets], [t.prefix.key for t in targets], "created v1 (batch)", 1)
    store = await open_store()
    try:

        async def record(tx: Transaction) -> None:
            await tx.audit_batch(batch.only([2, 0, 1]))
            await tx.audit_batch(batch.only([]))  # nothing to record: no row

        await store.write(record)
        got = [row for _, row in await store.list_audit()]
        assert got == [batch.rows()[i] for i in (2, 0, 1)]  # in order, field for field
        assert [row for _, row in await store.list_audit("88.100.B")] == [batch.rows()[2]]
    finally:
        await store.close()


def test_a_batch_compresses_to_the_bytes_of_each_record_compressed_alone() -> None:
    from bench.dataset import registration_wire
    from nodes.compression import RecordCompression

    records = [wire for _, wire in registration_wire("88.1", 400, 1, 0, 400, 1_800_000_000)]
    compression = RecordCompression()
    assert compression.encode_many(records[:5]) == records[:5]  # no dictionary yet: as they are
    compression.add(1, RecordCompression.train(records[:300]))
    batch = compression.encode_many(records[300:])
    assert batch == [compression.encode(r) for r in records[300:]]
    assert [compression.decode(s) for s in batch] == records[300:]
    assert compression.encode_many([]) == []


async def test_postgresql_schema_is_versioned_and_a_newer_one_is_refused(postgres: PostgresServer) -> None:
    dsn = await postgres.create_database()
    store = await PostgresStore.open(dsn)
    await store.close()
    again = await PostgresStore.open(dsn)  # reopening migrates nothing and works
    await again.close()
    connection = await asyncpg.connect(dsn)
    try:
        assert await connection.fetchval("SELECT max(version) FROM idis_schema") == POSTGRES_SCHEMA_VERSION
        # Keys order byte by byte whatever the database's collation: prefix ranges depend on it.
        collations = await connection.fetch(
            "SELECT table_name, collation_name FROM information_schema.columns WHERE column_name = 'key'"
        )
        assert {(r[0], r[1]) for r in collations} == {("identifiers", "C"), ("prefixes", "C")}
        await connection.execute("INSERT INTO idis_schema (version) VALUES ($1)", POSTGRES_SCHEMA_VERSION + 1)
    finally:
        await connection.close()
    with pytest.raises(RuntimeError, match="newer than this program"):
        await PostgresStore.open(dsn)


async def test_a_postgresql_store_whose_server_is_gone_refuses_writes_until_it_is_back() -> None:
    """The server stops (a crash, a failover under way): health is told within a probe interval,
    writes or none, and writes fail with UNAVAILABLE; once a primary answers again, the writer
    reconnects by itself."""
    cluster = PostgresServer()
    cluster.init()
    cluster.start()
    try:
        store = await PostgresStore.open(await cluster.create_database())
        told: list[bool] = []
        store.on_writable = told.append
        try:
            await store.insert_many([RecordRow("88/A", 1, b"a")])
            cluster.stop("immediate")
            for _ in range(200):  # no write needed: the writer's probe finds out by itself
                if not store.writable:
                    break
                await asyncio.sleep(0.05)
            assert told == [False]
            with pytest.raises(StoreUnavailable, match="cannot write"):
                await store.insert_many([RecordRow("88/B", 1, b"b")])
            assert told == [False] and not store.writable
            with pytest.raises(StoreUnavailable, match="cannot read"):
                await store.get("88/A")
            cluster.start()
            await writable_again(store)
            assert told == [False, True]
            await store.insert_many([RecordRow("88/C", 1, b"c")])
            assert await store.get("88/C") is not None and await store.get("88/A") is not None
            assert await store.get("88/B") is None
        finally:
            await store.close()
    finally:
        cluster.remove()


async def test_reads_from_a_standby_are_never_older_than_the_process_own_writes() -> None:
    """With reads from a streaming standby, a process's reads go to the primary while the
    standby lacks one of its acknowledged writes (here: replay paused), and back to the standby
    once it has caught up. Another process reading the standby meanwhile may see the old state
    (that is what reading from a standby means)."""
    primary, standby = PostgresServer(), PostgresServer()
    primary.init()
    primary.start()
    try:
        dsn = await primary.create_database()
        standby.follow(primary)
        standby.start()
        site = dsn.replace(f"127.0.0.1:{primary.port}", f"127.0.0.1:{primary.port},127.0.0.1:{standby.port}")
        writer = await PostgresStore.open(site, read_from="standby")
        other = await PostgresStore.open(site, read_from="standby")
        on_standby = await asyncpg.connect(standby.dsn(dsn.rpartition("/")[2]))
        try:
            await writer.insert_many([RecordRow("88/A", 1, b"a")])
            await writable_again(writer)
            for _ in range(200):  # the standby has it; reads are on the standby again
                if writer._written_lsn <= writer._replayed_lsn and await other.get("88/A") is not None:
                    break
                await asyncio.sleep(0.05)
            assert await other.get("88/A") is not None
            before = writer.primary_reads
            assert (await writer.get("88/A")) is not None and writer.primary_reads == before  # from the standby
            await on_standby.execute("SELECT pg_wal_replay_pause()")
            await writer.insert_many([RecordRow("88/B", 1, b"b")])
            assert await writer.get("88/B") is not None  # its own write: read on the primary
            assert writer.primary_reads == before + 1
            assert await other.get("88/B") is None  # the standby's state: older
            await on_standby.execute("SELECT pg_wal_replay_resume()")
            for _ in range(200):
                if await other.get("88/B") is not None and writer._written_lsn <= writer._replayed_lsn:
                    break
                await asyncio.sleep(0.05)
            assert await other.get("88/B") is not None
            reads = writer.primary_reads
            assert await writer.get("88/B") is not None and writer.primary_reads == reads  # the standby again
        finally:
            await on_standby.close()
            await writer.close()
            await other.close()
    finally:
        standby.remove()
        primary.remove()


async def test_an_unforeseen_error_while_recovering_fails_writes_but_never_ends_the_writer(open_store: Opener) -> None:
    """Whatever recovering raises (a client library's own error class, a bug), the writer task
    goes on: the write gets UNAVAILABLE, and once the store recovers, writes succeed again."""
    store = await open_store()
    check = store._check_writable
    calls = 0

    async def fails_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("unforeseen")
        await check()

    store._check_writable = fails_once  # type: ignore[method-assign]
    try:
        await break_write_connection(store)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.insert_many([RecordRow("88/A", 1, b"a")]), 10)
        await writable_again(store)
        await asyncio.wait_for(store.insert_many([RecordRow("88/B", 1, b"b")]), 10)
        assert await store.get("88/B") is not None and calls >= 2
    finally:
        await store.close()


async def test_a_shared_secret_is_made_once_and_is_the_same_for_every_process(open_store: Opener) -> None:
    """The HTTP session key, say: whichever process asks first makes it, every other process on
    the database (a site's servers, a node's workers) and every restart gets the same."""
    first, second = await open_store(), await open_store()
    try:
        key = await first.shared_secret("http-sessions")
        assert len(key) == 32 and await second.shared_secret("http-sessions") == key
        assert await second.shared_secret("something-else") != key
    finally:
        await first.close()
        await second.close()
    again = await open_store()
    try:
        assert await again.shared_secret("http-sessions") == key
    finally:
        await again.close()


async def test_the_largest_hosted_prefixes_are_counted_for_the_metrics(open_store: Opener) -> None:
    store = await open_store()
    try:

        async def fill(tx: Transaction) -> None:
            for key, kind in (("88.1", 1), ("88.2", 1), ("88.3", 1), ("88.9", 2)):
                await tx.put_prefix(PrefixRow(key, key, kind, None, 0, 0))
            await tx.insert_many([RecordRow(f"88.{p}/{n}", 1, b"r") for p, n in ((1, 1), (2, 1), (2, 2), (3, 1))])

        await store.write(fill)
        assert await store.largest_prefixes(1) == ([("88.2", 2)], 2, 2)  # the delegated 88.9 not among them
        assert await store.largest_prefixes(5) == ([("88.2", 2), ("88.1", 1), ("88.3", 1)], 0, 0)
    finally:
        await store.close()
