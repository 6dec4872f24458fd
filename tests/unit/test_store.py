"""The SQLite store on real files: schema, transactions, range scans."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from nodes.store import SCHEMA_VERSION, PrefixRow, RecordRow, Store, range_of_prefix


async def test_schema_is_versioned_and_wal_is_on(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "n.sqlite3")
    await store.close()
    with sqlite3.connect(tmp_path / "n.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = await Store.open(tmp_path / "n.sqlite3")  # reopening migrates nothing and works
    await again.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "n.sqlite3") as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer than this program"):
        await Store.open(tmp_path / "n.sqlite3")


async def test_a_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "n.sqlite3")
    try:

        async def fails_half_way() -> None:
            async with store.transaction() as tx:
                await tx.put_prefix(PrefixRow("88", "88", 1, None, 0, 0))
                await tx.insert_many([RecordRow("88/A", 1, b"a")])
                raise ZeroDivisionError

        with pytest.raises(ZeroDivisionError):
            await fails_half_way()
        assert await store.get("88/A") is None
        assert await store.prefixes() == []
    finally:
        await store.close()


async def test_listing_a_prefix_is_a_range_scan_that_excludes_neighbours(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "n.sqlite3")
    try:
        async with store.transaction() as tx:
            for p in ("88.1", "88.10", "88.1.2"):
                await tx.put_prefix(PrefixRow(p, p, 1, None, 0, 0))
            keys = ["88.1/a", "88.1/b", "88.1/c/d", "88.10/x", "88.1.2/y", "88.1/"]
            await tx.insert_many([RecordRow(k, 1, b"") for k in keys])
        assert await store.list_keys("88.1", "", 10) == ["88.1/", "88.1/a", "88.1/b", "88.1/c/d"]
        assert await store.list_keys("88.1", "88.1/a", 2) == ["88.1/b", "88.1/c/d"]
        counts = {p.key: p.identifier_count for p in await store.prefixes()}
        assert counts == {"88.1": 4, "88.10": 1, "88.1.2": 1}
        assert range_of_prefix("88.1") == ("88.1/", "88.10")
    finally:
        await store.close()


async def test_reads_see_only_committed_writes(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "n.sqlite3")
    try:
        async with store.transaction() as tx:
            await tx.insert_many([RecordRow("88/A", 1, b"a")])
            assert await store.get("88/A") is None  # not yet committed
        row = await store.get("88/A")
        assert row is not None and row.record == b"a"
    finally:
        await store.close()


async def test_records_are_compressed_once_a_dictionary_is_trained(tmp_path: Path) -> None:
    from bench.dataset import registrations
    from resolver.identifier import parse_identifier
    from resolver.record import Record
    from resolver.wire import encode_record

    store = await Store.open(tmp_path / "n.sqlite3")
    other = None
    try:
        store.train_after = 200
        records = {
            parse_identifier(i).key: encode_record(Record(parse_identifier(i), tuple(v), 1))
            for i, v in registrations("88.1", 600)
        }
        items = list(records.items())
        for start in range(0, len(items), 100):
            async with store.transaction() as tx:
                await tx.insert_many([RecordRow(k, 1, r) for k, r in items[start : start + 100]])
        assert store.compression.current == 1  # trained after 200 records
        for key, record in items:
            row = await store.get(key)
            assert row is not None and row.record == record  # every record reads back as written
        with sqlite3.connect(tmp_path / "n.sqlite3") as db:
            stored = dict(db.execute("SELECT key, record FROM identifiers"))
        late = [stored[k] for k, _ in items[300:]]
        assert all(s[0] == 0x01 for s in late)
        assert sum(map(len, late)) < 0.5 * sum(len(r) for _, r in items[300:])
        # Another process that has not loaded the dictionary yet still reads the records.
        other = await Store.open(tmp_path / "n.sqlite3")
        await store.train_dictionary()
        async with store.transaction() as tx:
            await tx.update(RecordRow(items[0][0], 2, items[0][1]))
        row = await other.get(items[0][0])
        assert row is not None and row.record == items[0][1] and row.version == 2
    finally:
        await store.close()
        if other is not None:
            await other.close()
