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
