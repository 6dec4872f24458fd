"""Durable storage of prefixes and identifier records in one SQLite file (through aiosqlite).

Layout: one row per identifier, keyed by its normalised form ``PREFIX/suffix`` in a
``WITHOUT ROWID`` table, so a point lookup is one B-tree descent and listing a prefix is a range
scan over ``[PREFIX/, PREFIX0)`` ("0" is the character after "/"). The record column holds the
record's wire form (``idis.v1.Record``), compressed with a dictionary the database trained on
its own records (``nodes.compression``); rows hand records back uncompressed.

Durability: WAL journal, ``synchronous=FULL`` by default. A write is acknowledged only after its
COMMIT returned, so it survives the process being killed (and, with FULL, a power cut).

Concurrency: one writer connection whose transactions are serialised by an asyncio lock and
opened with ``BEGIN IMMEDIATE`` (which also excludes writers in other processes), and separate
reader connections that see only committed data. Records carry a version number for
optimistic concurrency checks across calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import resource
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from nodes.compression import TRAIN_AFTER_RECORDS, RecordCompression, UnknownDictionary
from nodes.trust.attester import SignedTree
from nodes.trust.audit import FIELD_BYTES, AuditRow, BatchAudit, bounded
from resolver.errors import Unauthenticated, Unavailable

log = logging.getLogger("idis.store")

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
)

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class PrefixRow:
    key: str
    display: str
    kind: int
    site: bytes | None
    ttl: int
    identifier_count: int
    admins: bytes | None = None
    """HS_ADMIN grants on the prefix (JSON list), see nodes.trust.permissions."""
    zone_keys: str | None = None
    """For a delegated prefix: the keys its node signs with (JSON list of key claims,
    ``resolver.attestation.ZoneKey.claim``), which the delegation this node signs lists."""


@dataclass(frozen=True, slots=True)
class RecordRow:
    key: str
    version: int
    record: bytes
    attestation: int | None = None
    """The signed batch (``attestations.id``) the record at this version belongs to, if any."""
    leaf: int = 0
    """The record's leaf in that batch's tree."""


@dataclass(frozen=True, slots=True)
class AttestationRow:
    """A write batch's signed tree as stored, under its id."""

    id: int
    signed: SignedTree


def prefix_of_key(key: str) -> str:
    return key[: key.index("/")]


def range_of_prefix(prefix_key: str) -> tuple[str, str]:
    """The half-open key range holding exactly the identifiers directly under ``prefix_key``."""
    return prefix_key + "/", prefix_key + "0"


class Transaction:
    """Statements inside one write transaction; only the store's writer task makes these."""

    def __init__(self, db: aiosqlite.Connection, store: Store) -> None:
        self._db = db
        self._store = store

    async def get(self, key: str) -> RecordRow | None:
        async with self._db.execute(f"SELECT {_ROW_COLUMNS} FROM identifiers WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else RecordRow(key, row[0], await self._store.decode(row[1]), row[2], row[3])

    async def get_many(self, keys: Sequence[str]) -> dict[str, RecordRow]:
        return await _rows_of(self._query, self._store.decode_many, keys)

    async def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        async with self._db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def insert_many(self, rows: Sequence[RecordRow]) -> None:
        """Inserts new records (in wire form) and counts them on their prefixes."""
        encode = self._store.compression.encode
        await self.insert_stored([RecordRow(r.key, r.version, encode(r.record)) for r in rows])

    async def insert_stored(self, rows: Sequence[RecordRow]) -> None:
        """``insert_many`` for records already in their stored form (compressed by a loader's
        own processes with this database's dictionary)."""
        await self._db.executemany(
            "INSERT INTO identifiers (key, version, record) VALUES (?, ?, ?)",
            [(r.key, r.version, r.record) for r in rows],
        )
        await self._count_new(Counter(prefix_of_key(r.key) for r in rows), len(rows))

    async def insert_columns(
        self,
        keys: Sequence[str],
        stored: Sequence[bytes],
        counts: Mapping[str, int],
        attested: Sequence[tuple[SignedTree, Sequence[int]]] = (),
    ) -> None:
        """New records at version 1, as columns: their keys and their stored forms; ``counts``
        says how many of them each prefix (by key) gets (a batch has both at hand: cheaper than a
        row object per record). ``attested``: the batch's signed trees, each with the places
        (in ``keys``) of its leaves in leaf order; the trees are stored and each record names
        its own and its leaf."""
        if not attested:
            await self._db.executemany(
                "INSERT INTO identifiers (key, version, record) VALUES (?, 1, ?)", zip(keys, stored, strict=True)
            )
        else:
            if len(attested) == 1 and attested[0][1] == range(len(keys)):  # one tree of them all, in order
                ids, leaves = [await self.add_attestation(attested[0][0], keys)] * len(keys), list(range(len(keys)))
            else:
                ids, leaves = [0] * len(keys), [0] * len(keys)
                for tree, places in attested:
                    tree_id = await self.add_attestation(tree, [keys[place] for place in places])
                    for leaf, place in enumerate(places):
                        ids[place], leaves[place] = tree_id, leaf
            await self._db.executemany(
                "INSERT INTO identifiers (key, version, record, attestation, leaf) VALUES (?, 1, ?, ?, ?)",
                zip(keys, stored, ids, leaves, strict=True),
            )
        await self._count_new(counts, len(keys))

    async def add_attestation(self, row: SignedTree, keys: Sequence[str]) -> int:
        """Stores a batch's signed tree and the keys of its leaves' records, in leaf order (what
        re-signing looks for: cheaper than an index of the records by tree); its id."""
        cursor = await self._db.execute(
            "INSERT INTO attestations (prefix, kid, statement, tree, size, expires, keys) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row.prefix, row.kid, row.statement, row.tree, row.size, row.expires, json.dumps(list(keys))),
        )
        return int(cursor.lastrowid or 0)

    async def replace_attestation(self, tree_id: int, signed: SignedTree) -> None:
        """Replaces a stored tree (re-signed, or rebuilt with the same leaves in the same places
        but those of records changed since retired) under the same id."""
        await self._db.execute(
            "UPDATE attestations SET kid = ?, statement = ?, expires = ?, tree = ?, size = ? WHERE id = ?",
            (signed.kid, signed.statement, signed.expires, signed.tree, signed.size, tree_id),
        )

    async def attest_existing(self, signed: SignedTree, rows: Sequence[RecordRow]) -> None:
        """Stores ``signed``, the tree over ``rows`` (records that belonged to none), and points
        each at its leaf, unless it changed since it was read (then it is signed already)."""
        tree_id = await self.add_attestation(signed, [row.key for row in rows])
        await self._db.executemany(
            "UPDATE identifiers SET attestation = ?, leaf = ? WHERE key = ? AND version = ? AND attestation IS NULL",
            [(tree_id, leaf, row.key, row.version) for leaf, row in enumerate(rows)],
        )

    async def still_pointing(self, tree_id: int, keys: Sequence[str]) -> int:
        """How many of the records ``keys`` still belong to the tree ``tree_id``."""
        count = 0
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            sql = f"SELECT count(*) FROM identifiers WHERE attestation = ? AND key IN ({','.join('?' * len(chunk))})"
            async with self._db.execute(sql, [tree_id, *chunk]) as cur:
                row = await cur.fetchone()
            count += int(row[0]) if row else 0
        return count

    async def index_unsigned(self) -> None:
        """Indexes the records that belong to no signed tree (a node that signs writes none;
        one that did not sign, or an offline load, may have): what ``unattested`` walks."""
        await self._db.execute(
            "CREATE INDEX IF NOT EXISTS identifiers_unsigned ON identifiers (key) WHERE attestation IS NULL"
        )

    async def drop_attestation(self, tree_id: int) -> None:
        """Deletes a stored tree no record points at any more (none ever will again: a record
        only ever moves to a new tree)."""
        await self._db.execute("DELETE FROM attestations WHERE id = ?", (tree_id,))

    async def insert_new(
        self,
        keys: Sequence[str],
        stored: Sequence[bytes],
        counts: Mapping[str, int],
        attested: Sequence[tuple[SignedTree, Sequence[int]]] = (),
    ) -> bool:
        """``insert_columns`` if none of ``keys`` is stored yet; else nothing changes and False.
        Cheaper than looking the keys up first when they usually are all new (a batch): the
        inserts look for each key anyway."""
        await self._db.execute("SAVEPOINT new_records")
        try:
            await self.insert_columns(keys, stored, counts, attested)
        except sqlite3.IntegrityError:  # a key is stored: undo the rows inserted before it
            await self._db.execute("ROLLBACK TO new_records")
            await self._db.execute("RELEASE new_records")
            return False
        # Any other failure is the transaction's: the writer rolls all of it back (SQLite may
        # have already), so the savepoint is left alone and the error is the one reported.
        await self._db.execute("RELEASE new_records")
        return True

    async def _count_new(self, counts: Mapping[str, int], new: int) -> None:
        """Counts ``new`` records on their prefixes, ``counts`` of them on each."""
        self._store.written += new
        await self._db.executemany(
            "UPDATE prefixes SET identifier_count = identifier_count + ? WHERE key = ?",
            [(n, p) for p, n in counts.items()],
        )

    async def update(self, row: RecordRow, attested: SignedTree | None = None) -> None:
        """Stores the record's new version (``attested``: the signed tree of that one record)."""
        tree_id = await self.add_attestation(attested, [row.key]) if attested is not None else None
        await self._db.execute(
            "UPDATE identifiers SET version = ?, record = ?, attestation = ?, leaf = 0 WHERE key = ?",
            (row.version, self._store.compression.encode(row.record), tree_id, row.key),
        )

    async def delete(self, key: str) -> None:
        await self._db.execute("DELETE FROM identifiers WHERE key = ?", (key,))
        await self._db.execute(
            "UPDATE prefixes SET identifier_count = identifier_count - 1 WHERE key = ?", (prefix_of_key(key),)
        )

    async def audit(self, row: AuditRow) -> None:
        """Records a write in the audit trail, inside this transaction (its fields cut to
        ``nodes.trust.audit.FIELD_BYTES``)."""
        await self.audit_many([row])

    async def audit_batch(self, batch: BatchAudit) -> None:
        """Records a batch's rows in one statement: the fields they share bound once, each row's
        target and prefix read from one JSON array (binding nine fields of every row in Python
        cost more than SQLite's work)."""
        if not batch.targets:
            return
        c = batch.common
        await self._db.execute(
            "INSERT INTO audit (at, identity, key_index, peer, method, target, prefix, result, detail)"
            " SELECT ?, ?, ?, ?, ?, value ->> 0, value ->> 1, ?, ? FROM json_each(?)",
            (int(c.at), c.identity, c.key_index, c.peer, c.method, c.result, c.detail, json.dumps(batch.targets)),
        )

    async def audit_many(self, rows: Sequence[AuditRow]) -> None:
        """Records ``rows``, each ``bounded`` first."""
        await self._db.executemany(
            "INSERT INTO audit (at, identity, key_index, peer, method, target, prefix, result, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (int(r.at), r.identity, r.key_index, r.peer, r.method, r.target, r.prefix, r.result, r.detail)
                for r in map(bounded, rows)
            ],
        )

    async def prune_audit(self, before: float, max_rows: int, step: int) -> int:
        """Deletes at most ``step`` of the oldest audit rows that are older than ``before`` (0:
        none by age) or beyond the newest ``max_rows`` (0: no limit); how many it deleted. Only
        the first ``step`` rows are looked at, so a step costs the same on any size of trail."""
        async with self._db.execute("SELECT min(seq), max(seq) FROM audit") as cur:
            row = await cur.fetchone()
        if row is None or row[0] is None:
            return 0
        first, last = int(row[0]), int(row[1])
        # Rows are only ever removed from the oldest end, so seq numbers above min(seq) are dense.
        beyond = last - max_rows if max_rows > 0 else first - 1
        cursor = await self._db.execute(
            "DELETE FROM audit WHERE seq IN (SELECT seq FROM (SELECT seq, at FROM audit ORDER BY seq LIMIT ?)"
            " WHERE seq <= ? OR at < ?)",
            (step, beyond, int(before)),
        )
        return max(0, cursor.rowcount)

    async def add_dictionary(self, data: bytes) -> int:
        """Stores a compression dictionary unless the database has one already; the id of the
        database's first dictionary."""
        async with self._db.execute("SELECT id FROM dictionaries ORDER BY id LIMIT 1") as cur:
            row = await cur.fetchone()
        if row is not None:
            return int(row[0])
        cursor = await self._db.execute(
            "INSERT INTO dictionaries (data, created_at) VALUES (?, ?)", (data, int(time.time()))
        )
        return int(cursor.lastrowid or 0)

    async def get_prefix(self, key: str) -> PrefixRow | None:
        sql = f"SELECT {_PREFIX_COLUMNS} FROM prefixes WHERE key = ?"
        async with self._db.execute(sql, (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else PrefixRow(*row)

    async def put_prefix(self, row: PrefixRow) -> None:
        await self._db.execute(
            "INSERT INTO prefixes (key, display, kind, site, ttl, identifier_count, created_at, admins, zone_keys)"
            " VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET kind = excluded.kind, site = excluded.site, ttl = excluded.ttl,"
            " admins = coalesce(excluded.admins, admins), zone_keys = coalesce(excluded.zone_keys, zone_keys)",
            (row.key, row.display, row.kind, row.site, row.ttl, int(time.time()), row.admins, row.zone_keys),
        )

    async def sub_prefixes(self, key: str) -> list[str]:
        """The keys of the prefixes below ``key`` (at any depth), in order."""
        sql = "SELECT key FROM prefixes WHERE key > ? AND key < ? ORDER BY key"
        return [r[0] for r in await self._query(sql, (key + ".", key + "/"))]

    async def delete_prefix(self, key: str) -> None:
        """Removes a prefix from the table (its identifiers and sub-prefixes are the caller's
        to check: none may be left)."""
        await self._db.execute("DELETE FROM prefixes WHERE key = ?", (key,))


T = TypeVar("T")

STORE_ERRORS = (sqlite3.Error, ValueError)
"""What a statement raises when the store itself fails (aiosqlite: ValueError once the
connection is gone)."""

WRITE_RECOVERY_INTERVAL = 1.0
"""Seconds between attempts to make a store that cannot write writable again."""

READ_MMAP_BYTES = 1 << 40
"""How much of the file readers map (SQLite caps it: 2 GiB in common builds): a page in the OS
page cache is then read with no system call, a third less CPU per record on the miss path. The
price: a disk error under a mapped page ends the process (SIGBUS) instead of failing one read."""

DIRECT_READ_PAUSES = (0.5, 8.0)
"""Seconds record reads go to the reader threads after one made on the event loop thread had to
wait for the disk (see ``Store._read_records``): the first, doubling while it goes on, to the
last."""


class StoreUnavailable(Unavailable):
    """The store cannot write now (the disk failed, the file went away...); the node retries by
    itself and its health says NOT_SERVING meanwhile."""


@dataclass(eq=False)
class _WriteJob:
    work: Callable[[Transaction], Awaitable[Any]]
    nonce: str
    nonce_ttl: float
    then: Callable[[Any], None] | None
    done: asyncio.Future[Any]
    abandoned: bool = False
    """The caller stopped waiting before the job began: skip it."""


class Store:
    """An open database file. Create with ``await Store.open(path)``; close with ``await close()``.

    Writes go through ``write()``: one writer task owns the write connection and runs every
    transaction from BEGIN to COMMIT (or ROLLBACK) and then its ``then`` step (cache
    invalidation), whatever happens to the caller meanwhile. A caller whose call is cancelled
    (a client deadline, a disconnect) stops waiting; a job that has begun still completes, a job
    that has not is skipped. So no transaction is ever left open and no committed change skips
    its invalidation."""

    def __init__(
        self, path: Path, synchronous: str, writer: aiosqlite.Connection, readers: list[aiosqlite.Connection]
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self._writer = writer
        self._readers = readers
        self._next_reader = itertools.cycle(readers)
        self._jobs: asyncio.Queue[_WriteJob | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._training: asyncio.Task[None] | None = None
        self._closed = False
        self.writable = True
        self.failure = ""
        """Why the store cannot write, when it cannot."""
        self.on_writable: Callable[[bool], None] = lambda writable: None
        """Told when the store stops being able to write, and when it can again (for health)."""
        self.observe: Callable[[str, float], None] = lambda operation, seconds: None
        """Told how long each point read and each write transaction took (for metrics)."""
        self.compression = RecordCompression()
        self.written = 0
        self.train_after = TRAIN_AFTER_RECORDS
        self._nonces_used = 0
        self._direct: sqlite3.Connection | None = None
        """A read-only connection used on the event loop thread (``_read_records``)."""
        self._direct_paused_until = 0.0
        self._direct_pause = DIRECT_READ_PAUSES[0]
        self._direct_rusage: resource.struct_rusage | None = None
        """This thread's resource use after the last direct read (None: take it afresh)."""

    @classmethod
    async def open(cls, path: Path, *, synchronous: str = "FULL", readers: int = 2) -> Store:
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
        store._writer_task = asyncio.create_task(store._serve_writes(), name=f"store-writer {path.name}")
        try:
            await store.load_dictionaries()
        except BaseException:
            await store.close()
            raise
        return store

    async def load_dictionaries(self) -> None:
        for dictionary_id, data in await self._read("SELECT id, data FROM dictionaries ORDER BY id", ()):
            if not self.compression.knows(dictionary_id):
                self.compression.add(dictionary_id, data)

    async def decode(self, stored: bytes) -> bytes:
        """The record's wire form from its stored form."""
        try:
            return self.compression.decode(stored)
        except UnknownDictionary:
            await self.load_dictionaries()  # another worker trained it
            return self.compression.decode(stored)

    async def decode_many(self, stored: Sequence[bytes]) -> list[bytes]:
        """The records' wire forms from their stored forms."""
        decode = self.compression.decode
        try:
            return [decode(s) for s in stored]
        except UnknownDictionary:
            await self.load_dictionaries()  # another worker trained it
            return [decode(s) for s in stored]

    async def train_dictionary(self, samples: Sequence[bytes] | None = None) -> int:
        """Trains a compression dictionary (on ``samples``, or on up to 20,000 stored records)
        and compresses new records with it; returns its id. A database has one dictionary: when
        another process stored one first, that one is loaded and used instead."""
        if samples is None:
            rows = await self._read("SELECT record FROM identifiers LIMIT 20000", ())
            samples = [await self.decode(r[0]) for r in rows]
        data = await asyncio.to_thread(RecordCompression.train, samples)

        async def store_it(tx: Transaction) -> int:
            return await tx.add_dictionary(data)

        dictionary_id = await self.write(store_it)
        await self.load_dictionaries()
        return dictionary_id

    def _maybe_train(self) -> None:
        """Starts training the database's dictionary off the write path, once."""
        if self.compression.current or self.written < self.train_after or self._training is not None:
            return
        self._training = asyncio.create_task(self._train_once(), name=f"store-train {self.path.name}")

    async def _train_once(self) -> None:
        try:
            rows = await self._read("SELECT count(*) FROM (SELECT 1 FROM identifiers LIMIT ?)", (self.train_after,))
            if rows[0][0] >= self.train_after:
                await self.train_dictionary()
        except Exception:  # compression is an optimisation: never fail a node for it
            log.exception("training the compression dictionary of %s failed", self.path)
        finally:
            self.written = 0
            self._training = None

    async def trained(self) -> None:
        """Waits for a dictionary training under way, if any (tests, offline loaders)."""
        if self._training is not None:
            await asyncio.shield(self._training)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._training is not None:
            self._training.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._training
        try:
            if self._writer_task is not None:
                self._jobs.put_nowait(None)
                await asyncio.shield(self._writer_task)
        finally:
            # Even when the caller is cancelled meanwhile: an aiosqlite connection left open
            # keeps a non-daemon thread alive, and the process could never exit.
            if self._direct is not None:
                self._direct.close()
            for conn in self._readers:
                await conn.close()
            await self._writer.close()

    async def write(
        self,
        work: Callable[[Transaction], Awaitable[T]],
        *,
        nonce: str = "",
        nonce_ttl: float = 600.0,
        then: Callable[[T], None] | None = None,
    ) -> T:
        """Runs ``work`` in one write transaction on the writer task and returns its result.

        Committed when ``work`` returns, rolled back if it raises (its exception is raised here).
        ``then`` runs right after COMMIT, on the writer task, before the result is handed back:
        whatever must follow a committed change (cache invalidation) goes there, so it happens
        even when the caller is gone. ``nonce``, the signed call's nonce, is recorded in the same
        transaction: a nonce already recorded (a replay, even one sent to another worker
        process) raises Unauthenticated and the transaction changes nothing."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        job = _WriteJob(work, nonce, nonce_ttl, then, asyncio.get_running_loop().create_future())
        job.done.add_done_callback(_consume)
        self._jobs.put_nowait(job)
        try:
            return cast(T, await asyncio.shield(job.done))
        except asyncio.CancelledError:
            job.abandoned = True
            raise

    async def _serve_writes(self) -> None:
        while True:
            if self.writable:
                job = await self._jobs.get()
            else:
                try:
                    job = await asyncio.wait_for(self._jobs.get(), WRITE_RECOVERY_INTERVAL)
                except TimeoutError:
                    await self._recover()
                    continue
            if job is None:
                return
            if job.abandoned:
                job.done.cancel()
                continue
            await self._run(job)

    async def _run(self, job: _WriteJob) -> None:
        if not self.writable:
            await self._recover()
            if not self.writable:
                job.done.set_exception(StoreUnavailable(f"the store cannot write: {self.failure}"))
                return
        started = time.perf_counter()
        for attempt in (1, 2):  # nothing has happened yet: after a recovery, begin once more
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
                break
            except STORE_ERRORS as exc:
                await self._failed(exc)
                if attempt == 2 or not self.writable:
                    job.done.set_exception(StoreUnavailable(f"the store cannot write: {exc}"))
                    return
        try:
            if job.nonce:
                await self._use_nonce(job.nonce, job.nonce_ttl)
            result = await job.work(Transaction(self._writer, self))
            await self._writer.execute("COMMIT")
        except Exception as exc:
            await self._roll_back()
            if isinstance(exc, STORE_ERRORS):
                await self._failed(exc)
                exc = StoreUnavailable(f"the store cannot write: {exc}")
            job.done.set_exception(exc)
            return
        self.observe("write_transaction", time.perf_counter() - started)
        if job.then is not None:
            try:
                job.then(result)
            except Exception:
                log.exception("a step after a committed write failed")
        job.done.set_result(result)
        self._maybe_train()

    async def _roll_back(self) -> None:
        try:
            if self._writer.in_transaction:
                await self._writer.execute("ROLLBACK")
        except STORE_ERRORS as exc:
            await self._failed(exc)

    async def _failed(self, exc: BaseException) -> None:
        """A statement failed for a reason of the store's own: make sure no transaction is left
        open, then find out whether the store can still write."""
        log.error("store %s failed: %s", self.path, exc)
        self._set_writable(False, str(exc))
        await self._recover()

    async def _recover(self) -> None:
        """Rolls back or reopens the write connection, then checks it can begin a transaction."""
        try:
            try:
                if self._writer.in_transaction:
                    await self._writer.execute("ROLLBACK")
            except STORE_ERRORS:
                with contextlib.suppress(Exception):
                    await self._writer.close()
                self._writer = await _connect_writer(self.path, self.synchronous)
            await self._writer.execute("BEGIN IMMEDIATE")
            await self._writer.execute("ROLLBACK")
        except (*STORE_ERRORS, OSError) as exc:
            self._set_writable(False, str(exc))
            return
        self._set_writable(True, "")

    def _set_writable(self, writable: bool, why: str) -> None:
        self.failure = why
        if writable != self.writable:
            self.writable = writable
            if writable:
                log.warning("store %s can write again", self.path)
            self.on_writable(writable)

    async def _use_nonce(self, nonce: str, ttl: float) -> None:
        now = int(time.time())
        self._nonces_used += 1
        if self._nonces_used % 1000 == 0:
            await self._writer.execute("DELETE FROM nonces WHERE expires < ?", (now,))
        try:
            await self._writer.execute("INSERT INTO nonces (nonce, expires) VALUES (?, ?)", (nonce, now + int(ttl)))
        except sqlite3.IntegrityError as exc:
            raise Unauthenticated("nonce already used: a signed call is good for one use") from exc

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

    async def get(self, key: str) -> RecordRow | None:
        started = time.perf_counter()
        rows = await self._read_records(f"SELECT {_ROW_COLUMNS} FROM identifiers WHERE key = ?", (key,))
        self.observe("get", time.perf_counter() - started)
        if not rows:
            return None
        version, record, attestation, leaf = rows[0]
        return RecordRow(key, version, await self.decode(record), attestation, leaf)

    async def attestations(self, ids: Sequence[int]) -> dict[int, AttestationRow]:
        """The signed trees of those ids (at most 500)."""
        sql = f"SELECT {_ATTESTATION_COLUMNS} FROM attestations WHERE id IN ({','.join('?' * len(ids))})"
        return {r[0]: _attestation_row(r) for r in await self._read_records(sql, list(ids))}

    async def expiring_attestations(self, before: int, limit: int) -> list[AttestationRow]:
        """Up to ``limit`` stored trees whose statements end before ``before``, soonest first."""
        sql = f"SELECT {_ATTESTATION_COLUMNS} FROM attestations WHERE expires < ? ORDER BY expires LIMIT ?"
        return [_attestation_row(r) for r in await self._read(sql, (before, limit))]

    async def attestations_signed_otherwise(self, prefix: str, kid: str, limit: int) -> list[AttestationRow]:
        """Up to ``limit`` stored trees of ``prefix`` signed by a key other than ``kid`` (after
        a key roll: to be signed again with the new key)."""
        sql = f"SELECT {_ATTESTATION_COLUMNS} FROM attestations WHERE prefix = ? AND kid != ? LIMIT ?"
        return [_attestation_row(r) for r in await self._read(sql, (prefix, kid, limit))]

    async def unattested(self, prefix_key: str, after: str, limit: int) -> list[RecordRow]:
        """Up to ``limit`` records directly under a prefix, in key order after ``after``, that
        belong to no signed tree (written before the node signed, or loaded offline)."""
        low, high = range_of_prefix(prefix_key)
        sql = (
            f"SELECT key, {_ROW_COLUMNS} FROM identifiers WHERE key > ? AND key >= ? AND key < ?"
            " AND attestation IS NULL ORDER BY key LIMIT ?"
        )
        rows = await self._read(sql, (after, low, high, limit))
        records = await self.decode_many([r[2] for r in rows])
        return [RecordRow(r[0], r[1], record, r[3], r[4]) for r, record in zip(rows, records, strict=True)]

    async def attested_records(self, tree_id: int) -> list[RecordRow]:
        """The records that still name the tree ``tree_id``, in leaf order."""
        listed = await self._read("SELECT keys FROM attestations WHERE id = ?", (tree_id,))
        if not listed:
            return []
        rows = await self.get_many(json.loads(listed[0][0]))
        return sorted((r for r in rows.values() if r.attestation == tree_id), key=lambda r: r.leaf)

    async def get_many(self, keys: Sequence[str]) -> dict[str, RecordRow]:
        """The rows of the keys that exist, in few queries (500 keys a query)."""
        started = time.perf_counter()
        found = await _rows_of(self._read_records, self.decode_many, keys)
        if keys:
            self.observe("get_many", time.perf_counter() - started)
        return found

    async def list_audit(
        self, prefix_key: str = "", identity: str = "", after: int = 0, limit: int = 100
    ) -> list[tuple[int, AuditRow]]:
        """Audit entries (sequence number, row) for a prefix (and the prefixes below it) or an
        identity (as recorded: ``shown``), oldest first, after sequence ``after``; each field
        cut to ``FIELD_BYTES`` (rows recorded before the bound are cut when read)."""
        where: list[str] = ["seq > ?"]
        params: list[object] = [after]
        if prefix_key:
            where.append("(prefix = ? OR (prefix >= ? AND prefix < ?))")
            params += [prefix_key, prefix_key + ".", prefix_key + "/"]
        if identity:
            where.append("identity = ?")
            params.append(identity)
        b = FIELD_BYTES
        columns = (
            f"substr(identity, 1, {b['identity']}), key_index, substr(peer, 1, {b['peer']}),"
            f" substr(method, 1, {b['method']}), substr(target, 1, {b['target']}),"
            f" substr(prefix, 1, {b['prefix']}), substr(result, 1, {b['result']}), substr(detail, 1, {b['detail']})"
        )
        sql = f"SELECT seq, at, {columns} FROM audit WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        return [(r[0], bounded(AuditRow(*r[1:]))) for r in await self._read(sql, [*params, limit])]

    async def insert_many(self, rows: Sequence[RecordRow]) -> None:
        """Inserts new records in one transaction of their own (loaders, tests)."""

        async def insert(tx: Transaction) -> None:
            await tx.insert_many(rows)

        await self.write(insert)

    async def insert_stored(self, rows: Sequence[RecordRow]) -> None:
        """Inserts records already in stored form in one transaction of their own (loaders)."""

        async def insert(tx: Transaction) -> None:
            await tx.insert_stored(rows)

        await self.write(insert)

    async def record_audit(self, rows: Sequence[AuditRow]) -> None:
        """Records refused calls (outside any change's transaction), all in one transaction."""

        async def record(tx: Transaction) -> None:
            await tx.audit_many(rows)

        await self.write(record)

    async def prune_audit(self, before: float, max_rows: int, step: int) -> int:
        """One bounded step of audit retention (``Transaction.prune_audit``) in a transaction of
        its own; how many rows it deleted."""

        async def prune(tx: Transaction) -> int:
            return await tx.prune_audit(before, max_rows, step)

        return await self.write(prune)

    async def list_keys(self, prefix_key: str, after: str, limit: int) -> list[str]:
        """Up to ``limit`` keys directly under a prefix, in order, strictly after ``after``."""
        low, high = range_of_prefix(prefix_key)
        sql = "SELECT key FROM identifiers WHERE key > ? AND key >= ? AND key < ? ORDER BY key LIMIT ?"
        return [r[0] for r in await self._read(sql, (after, low, high, limit))]

    async def list_keys_at(self, prefix_key: str, offset: int, limit: int) -> list[str]:
        """Up to ``limit`` keys directly under a prefix, in order, from the ``offset``-th (the
        Handle REST API's pages; costs a scan of the ``offset`` keys before them)."""
        low, high = range_of_prefix(prefix_key)
        sql = "SELECT key FROM identifiers WHERE key >= ? AND key < ? ORDER BY key LIMIT ? OFFSET ?"
        return [r[0] for r in await self._read(sql, (low, high, limit, offset))]

    async def identifier_count(self, prefix_key: str) -> int:
        """How many identifiers a prefix holds (kept by every write, in its transaction)."""
        rows = await self._read("SELECT identifier_count FROM prefixes WHERE key = ?", (prefix_key,))
        return int(rows[0][0]) if rows else 0

    async def prefixes(self) -> list[PrefixRow]:
        sql = f"SELECT {_PREFIX_COLUMNS} FROM prefixes ORDER BY key"
        return [PrefixRow(*r) for r in await self._read(sql, ())]


async def _rows_of(
    query: Callable[[str, Sequence[Any]], Awaitable[list[Any]]],
    decode_many: Callable[[Sequence[bytes]], Awaitable[list[bytes]]],
    keys: Sequence[str],
) -> dict[str, RecordRow]:
    """The rows of those ``keys`` that exist, 500 keys a query (within SQLite's variable limit)."""
    found: dict[str, RecordRow] = {}
    for start in range(0, len(keys), 500):
        chunk = list(keys[start : start + 500])
        sql = f"SELECT key, {_ROW_COLUMNS} FROM identifiers WHERE key IN ({','.join('?' * len(chunk))})"
        rows = await query(sql, chunk)
        records = await decode_many([row[2] for row in rows])
        for (key, version, _, attestation, leaf), record in zip(rows, records, strict=True):
            found[key] = RecordRow(key, version, record, attestation, leaf)
    return found


def _attestation_row(row: Sequence[Any]) -> AttestationRow:
    return AttestationRow(row[0], SignedTree(*row[1:]))


_PREFIX_COLUMNS = "key, display, kind, site, ttl, identifier_count, admins, zone_keys"
_ROW_COLUMNS = "version, record, attestation, leaf"
_ATTESTATION_COLUMNS = "id, prefix, kid, statement, tree, size, expires"


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


def _consume(done: asyncio.Future[Any]) -> None:
    """Marks a write's outcome as seen, so one whose caller went away is not reported as an
    exception never retrieved."""
    if not done.cancelled():
        done.exception()


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
            for statement in _statements(MIGRATIONS[version]):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version={version + 1}")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
