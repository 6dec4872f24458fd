"""The embedded engine: one SQLite file (through aiosqlite), the default.

Layout: one row per identifier, keyed by its normalised form ``PREFIX/suffix`` in a
``WITHOUT ROWID`` table, so a point lookup is one B-tree descent and listing a prefix is a range
scan over ``[PREFIX/, PREFIX0)``.

Durability: WAL journal, ``synchronous=FULL`` by default: a committed write survives the process
being killed and, with FULL, a power cut.

Concurrency: one writer connection whose transactions are opened with ``BEGIN IMMEDIATE`` (which
also excludes writers in other processes), and separate reader connections that see only
committed data; record reads of the hot path run on the event loop thread while the OS page
cache serves them (``SqliteStore._read_records``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import resource
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from nodes.storage.store import Store
from nodes.storage.transaction import Transaction

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

# Each entry upgrades the schema by one version; PRAGMA user_version records where a file is.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE prefixes (
        key TEXT PRIMARY KEY,
        display TEXT NOT NULL,
        kind INTEGER NOT NULL,
        site BLOB,
        ttl INTEGER NOT NULL DEFAULT 0,
        identifier_count INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE identifiers (
        key TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        record BLOB NOT NULL
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE dictionaries (
        id INTEGER PRIMARY KEY,
        data BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    """,
    """
    ALTER TABLE prefixes ADD COLUMN admins BLOB;
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        identity TEXT NOT NULL,
        key_index INTEGER NOT NULL,
        peer TEXT NOT NULL,
        method TEXT NOT NULL,
        target TEXT NOT NULL,
        prefix TEXT NOT NULL,
        result TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_by_prefix ON audit (prefix, seq);
    CREATE INDEX audit_by_identity ON audit (identity, seq);
    """,
    """
    CREATE TABLE nonces (
        nonce TEXT PRIMARY KEY,
        expires INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
    # Verifiable resolution: each write batch's signed Merkle tree, each record's place in one,
    # and the keys a delegated prefix's own node signs with (its parent's delegation lists them).
    """
    CREATE TABLE attestations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        prefix TEXT NOT NULL,
        kid TEXT NOT NULL,
        statement TEXT NOT NULL,
        tree BLOB NOT NULL,
        size INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        keys TEXT NOT NULL
    );
    CREATE INDEX attestations_by_expiry ON attestations (expires);
    CREATE INDEX attestations_by_signer ON attestations (prefix, kid);
    ALTER TABLE identifiers ADD COLUMN attestation INTEGER;
    ALTER TABLE identifiers ADD COLUMN leaf INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE prefixes ADD COLUMN zone_keys TEXT;
    """,
    # Secrets every process serving the database shares (the HTTP API's session key).
    """
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

STORE_ERRORS = (sqlite3.Error, ValueError)
"""What a statement raises when the store itself fails (aiosqlite: ValueError once the
connection is gone)."""

READ_MMAP_BYTES = 1 << 40
"""How much of the file readers map (SQLite caps it: 2 GiB in common builds): a page in the OS
page cache is then read with no system call, a third less CPU per record on the miss path. The
price: a disk error under a mapped page ends the process (SIGBUS) instead of failing one read."""

DIRECT_READ_PAUSES = (0.5, 8.0)
"""Seconds record reads go to the reader threads after one made on the event loop thread had to
wait for the disk (see ``SqliteStore._read_records``): the first, doubling while it goes on, to
the last."""


class SqliteConnection:
    """The shared statements' ``Connection`` on an aiosqlite connection."""

    integrity_errors: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)
    audit_from_json = (
        "INSERT INTO audit (at, identity, key_index, peer, method, target, prefix, result, detail)"
        " SELECT ?, ?, ?, ?, ?, value ->> 0, value ->> 1, ?, ? FROM json_each(?)"
    )

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return list(await self.db.execute_fetchall(sql, params))

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self.db.execute(sql, params)
        return int(cursor.rowcount)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self.db.executemany(sql, rows)

    async def insert_id(self, sql: str, params: Sequence[Any]) -> int:
        cursor = await self.db.execute(sql, params)
        return int(cursor.lastrowid or 0)

    async def copy(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        await self.db.executemany(insert_sql(table, columns), rows)


class SqliteStore(Store):
    """An open database file. Create with ``await SqliteStore.open(path)``."""

    engine = "sqlite"
    store_errors = STORE_ERRORS

    def __init__(
        self, path: Path, synchronous: str, writer: aiosqlite.Connection, readers: list[aiosqlite.Connection]
    ) -> None:
        super().__init__(path.name)
        self.path = path
        self.synchronous = synchronous
        self._writer = writer
        self._connection = SqliteConnection(writer)
        self._readers = readers
        self._next_reader = itertools.cycle(readers)
        self._direct: sqlite3.Connection | None = None
        """A read-only connection used on the event loop thread (``_read_records``)."""
        self._direct_paused_until = 0.0
        self._direct_pause = DIRECT_READ_PAUSES[0]
        self._direct_rusage: resource.struct_rusage | None = None
        """This thread's resource use after the last direct read (None: take it afresh)."""

    @classmethod
    async def open(cls, path: Path, *, synchronous: str = "FULL", readers: int = 2) -> SqliteStore:
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await _connect_writer(path, synchronous)
        reader_conns: list[aiosqlite.Connection] = []
        direct: sqlite3.Connection | None = None
        try:
            await _migrate(writer)
            for _ in range(max(1, readers)):
                conn = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
                reader_conns.append(conn)
                await conn.execute("PRAGMA busy_timeout=10000")
                await conn.execute(f"PRAGMA mmap_size={READ_MMAP_BYTES}")
            # No busy timeout: a read that would wait for a lock goes to the reader threads instead.
            direct = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=0)
            direct.execute(f"PRAGMA mmap_size={READ_MMAP_BYTES}")
        except BaseException:
            # Every connection opened so far is closed: an aiosqlite connection left open keeps
            # a non-daemon thread alive, and the process could never exit.
            if direct is not None:
                direct.close()
            for conn in reader_conns:
                await conn.close()
            await writer.close()
            raise
        store = cls(path, synchronous, writer, reader_conns)
        store._direct = direct
        await store._start()
        return store

    async def _begin(self) -> None:
        await self._writer.execute("BEGIN IMMEDIATE")

    async def _commit(self) -> None:
        await self._writer.execute("COMMIT")

    async def _roll_back_open(self) -> None:
        if self._writer.in_transaction:
            await self._writer.execute("ROLLBACK")

    async def _reopen(self) -> None:
        with contextlib.suppress(Exception):
            await self._writer.close()
        self._writer = await _connect_writer(self.path, self.synchronous)
        self._connection = SqliteConnection(self._writer)

    async def _publish(self, tx: Transaction) -> None:
        """Nothing: the processes of one file are one node's workers, which learn of changes
        through their shared change log (``nodes.coherence``)."""

    async def _check_writable(self) -> None:
        await self._writer.execute("BEGIN IMMEDIATE")
        await self._writer.execute("ROLLBACK")

    async def _close_connections(self) -> None:
        # Even when the caller is cancelled meanwhile: an aiosqlite connection left open keeps a
        # non-daemon thread alive, and the process could never exit.
        if self._direct is not None:
            self._direct.close()
        for conn in self._readers:
            await conn.close()
        await self._writer.close()

    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        # One call into the connection's thread (execute and fetch together): a cancelled
        # caller can never leave a statement half-read, holding an old snapshot open.
        return list(await next(self._next_reader).execute_fetchall(sql, params))

    async def _read_records(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """``_read`` for the record reads of the hot path, made right here on the event loop
        thread while the OS page cache serves them: the hop to a reader thread and back costs
        far more than a lookup in cached pages (50-100 us of CPU against 7 us), and would make a
        unary cache miss a third slower than a hit. A read that had to wait for the disk (a
        major page fault or a block read on this thread) blocked the loop meanwhile: record
        reads then go to the reader threads, where waiting blocks no one else, for a pause
        (DIRECT_READ_PAUSES) that doubles as long as reads tried here after it wait too."""
        direct = self._direct
        if direct is not None and time.monotonic() >= self._direct_paused_until:
            # Counted since the previous direct read: what else ran on this thread meanwhile
            # blocked the loop just the same if it waited for the disk.
            before = self._direct_rusage or resource.getrusage(resource.RUSAGE_THREAD)
            try:
                rows: list[Any] | None = direct.execute(sql, params).fetchall()
            except sqlite3.OperationalError:  # busy (a WAL recovery): the reader threads wait for it
                rows = None
            after = self._direct_rusage = resource.getrusage(resource.RUSAGE_THREAD)
            if after.ru_majflt > before.ru_majflt or after.ru_inblock > before.ru_inblock:
                self._direct_paused_until = time.monotonic() + self._direct_pause
                self._direct_pause = min(2 * self._direct_pause, DIRECT_READ_PAUSES[1])
                self._direct_rusage = None
            else:
                self._direct_pause = DIRECT_READ_PAUSES[0]
            if rows is not None:
                return rows
        return await self._read(sql, params)


async def _connect_writer(path: Path, synchronous: str) -> aiosqlite.Connection:
    # The busy timeout comes first: other worker processes may be opening the same file.
    writer = await aiosqlite.connect(path, isolation_level=None, timeout=10.0)
    try:
        await _enable_wal(writer)
        await writer.execute(f"PRAGMA synchronous={synchronous}")
    except BaseException:
        await writer.close()
        raise
    return writer


async def _enable_wal(db: aiosqlite.Connection) -> None:
    """Switches the file to WAL once; later opens (other workers) find it so already. Switching
    needs a moment with no other connection, which SQLite does not wait for: retry briefly."""
    for attempt in range(100):
        async with db.execute("PRAGMA journal_mode") as cur:
            row = await cur.fetchone()
        if row is not None and str(row[0]).lower() == "wal":
            return
        try:
            await db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if attempt == 99:
                raise
            await asyncio.sleep(0.05)


async def _version(db: aiosqlite.Connection) -> int:
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _migrate(db: aiosqlite.Connection) -> None:
    current = await _version(db)
    if current > SCHEMA_VERSION:
        raise RuntimeError(f"database schema version {current} is newer than this program's ({SCHEMA_VERSION})")
    for version in range(current, SCHEMA_VERSION):
        await db.execute("BEGIN IMMEDIATE")
        if await _version(db) > version:  # another process migrated it meanwhile
            await db.execute("ROLLBACK")
            continue
        try:
            for statement in statements_of(MIGRATIONS[version]):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version={version + 1}")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")


@functools.lru_cache(maxsize=64)
def insert_sql(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def statements_of(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
