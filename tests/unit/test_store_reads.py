"""The store's record reads on the event loop thread (``Store._read_records``): made there
while the page cache serves them, sent to the reader threads while reads wait for the disk or
for a lock, with the same rows either way."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import nodes.storage.sqlite
from nodes.storage import RecordRow
from nodes.storage.sqlite import DIRECT_READ_PAUSES, SqliteStore

KEYS = sorted(f"88/K{n}" for n in range(20))


class Disk:
    """Stands in for the store's ``resource`` module (getrusage) and for the disk under its
    loop-thread connection: after ``wait()``, its next read waits for the disk (a major page
    fault)."""

    RUSAGE_THREAD = 1

    def __init__(self, store: SqliteStore) -> None:
        self.faults = 0
        self.pending = False
        self.connection = store._direct
        store._direct = self  # type: ignore[assignment]

    def wait(self) -> None:
        self.pending = True

    def execute(self, sql: str, params: Sequence[Any]) -> Any:
        assert self.connection is not None
        if self.pending:
            self.pending = False
            self.faults += 1
        return self.connection.execute(sql, params)

    def close(self) -> None:
        assert self.connection is not None
        self.connection.close()

    def getrusage(self, who: int) -> Any:
        return type("Usage", (), {"ru_majflt": self.faults, "ru_inblock": 0})()


class Clock:
    """Stands in for the store's ``time`` module: monotonic() stands still unless moved."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.perf_counter = time.perf_counter
        self.time = time.time

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "n.sqlite3")
    await s.insert_many([RecordRow(k, 1, k.encode()) for k in KEYS])
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def disk(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> Disk:
    disk = Disk(store)
    monkeypatch.setattr(nodes.storage.sqlite, "resource", disk)
    return disk


@pytest.fixture
def threaded(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements that went to the reader threads."""
    sent: list[str] = []
    read = store._read

    async def counting(sql: str, params: Sequence[Any]) -> list[Any]:
        sent.append(sql)
        return await read(sql, params)

    monkeypatch.setattr(store, "_read", counting)
    return sent


async def rows(store: SqliteStore) -> tuple[Any, ...]:
    return await store.get(KEYS[0]), await store.get("88/NONE"), await store.get_many([*KEYS, "88/NONE"])


async def test_reads_served_by_the_page_cache_stay_on_the_loop_thread(
    store: SqliteStore, threaded: list[str], disk: Disk
) -> None:
    one, none, many = await rows(store)
    assert one == RecordRow(KEYS[0], 1, KEYS[0].encode()) and none is None
    assert sorted(many) == KEYS and all(many[k].record == k.encode() for k in KEYS)
    assert threaded == []


async def test_a_read_that_waited_for_the_disk_sends_reads_to_the_threads_for_a_while(
    store: SqliteStore, threaded: list[str], disk: Disk, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(nodes.storage.sqlite, "time", clock)
    expected = await rows(store)
    first, longest = DIRECT_READ_PAUSES
    pause = first
    for _ in range(6):  # reads keep waiting: each pause twice the one before, up to the longest
        disk.wait()
        assert await store.get(KEYS[1]) is not None  # made here, and it waited
        threaded.clear()
        assert await rows(store) == expected
        assert len(threaded) == 3  # all three in the threads
        clock.now += pause - 0.001
        await store.get(KEYS[2])
        assert len(threaded) == 4  # still paused
        clock.now += 0.001
        pause = min(2 * pause, longest)
    assert pause == longest
    threaded.clear()
    assert await rows(store) == expected  # reads that do not wait: here again, and the pause reset
    assert threaded == []
    disk.wait()
    await store.get(KEYS[1])
    clock.now += first
    assert await rows(store) == expected and threaded == []


async def test_a_read_that_would_wait_for_a_lock_goes_to_the_threads(
    store: SqliteStore, threaded: list[str], disk: Disk
) -> None:
    class Busy:
        def execute(self, sql: str, params: Sequence[Any]) -> Any:
            raise sqlite3.OperationalError("database is locked")

        def close(self) -> None:
            pass

    expected = await rows(store)
    store._direct = Busy()  # type: ignore[assignment]
    assert await rows(store) == expected
    assert len(threaded) == 3
