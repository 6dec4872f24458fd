"""The store contract, and what every engine shares: the writer task, reads, compression.

A store holds the prefix table, the identifiers' records (their wire form, compressed with a
dictionary the database trained on its own records: ``nodes.compression``), signed trees,
nonces and the audit trail. An engine (``nodes.storage.sqlite``, ``nodes.storage.postgres``)
supplies connections and what it must do to begin, commit and recover; the statements are
shared (``nodes.storage.transaction``).

Writes go through ``write()``: one writer task owns the process's write connection and runs
every transaction from BEGIN to COMMIT (or ROLLBACK) and then its ``then`` step (cache
invalidation), whatever happens to the caller meanwhile. A caller whose call is cancelled (a
client deadline, a disconnect) stops waiting; a job that has begun still completes, a job that
has not is skipped. So no transaction is ever left open and no committed change skips its
invalidation. Each engine serialises write transactions across processes too (SQLite's write
lock, a PostgreSQL advisory lock), so a transaction reads what every earlier one committed.

A write is acknowledged only after its COMMIT returned."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from nodes.compression import TRAIN_AFTER_RECORDS, RecordCompression, UnknownDictionary
from nodes.storage.rows import (
    HOSTED_TOTALS,
    LARGEST_PREFIXES,
    AttestationRow,
    LargestPrefixes,
    PrefixRow,
    RecordRow,
    StoreUnavailable,
    largest_of,
    range_of_prefix,
)
from nodes.storage.transaction import (
    ATTESTATION_COLUMNS,
    PREFIX_COLUMNS,
    ROW_COLUMNS,
    Connection,
    Transaction,
    attestation_row,
    rows_of,
)
from nodes.trust.audit import FIELD_BYTES, AuditRow, bounded
from resolver.errors import Unauthenticated

log = logging.getLogger("idis.store")

T = TypeVar("T")

WRITE_RECOVERY_INTERVAL = 1.0
"""Seconds between attempts to make a store that cannot write writable again."""

NONCE_SWEEP_EVERY = 1000
"""Expired nonces are deleted once every this many signed writes."""


@dataclass(eq=False)
class _WriteJob:
    work: Callable[[Transaction], Awaitable[Any]]
    nonce: str
    nonce_ttl: float
    then: Callable[[Any], None] | None
    done: asyncio.Future[Any]
    abandoned: bool = False
    """The caller stopped waiting before the job began: skip it."""


class Store(ABC):
    """An open database. Made by an engine's ``open``; close with ``await close()``."""

    engine = ""
    store_errors: tuple[type[BaseException], ...] = ()
    """What a statement raises when the store itself fails (rather than the statement)."""
    probe_interval: float | None = None
    """Seconds without writes after which the writer task checks that the store could still
    write (None: only writes find out: a file does not go away by itself)."""

    def __init__(self, name: str) -> None:
        self.name = name
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

    # What an engine supplies, and ``_connection``: the one write transactions run on (the writer
    # task's alone).
    _connection: Connection

    @abstractmethod
    async def _begin(self) -> None:
        """Begins a write transaction, holding the database's write lock until it ends."""

    @abstractmethod
    async def _commit(self) -> None: ...

    @abstractmethod
    async def _roll_back_open(self) -> None:
        """Rolls back the write transaction, if one is open."""

    @abstractmethod
    async def _reopen(self) -> None:
        """Replaces a write connection that failed."""

    @abstractmethod
    async def _check_writable(self) -> None:
        """Raises unless a write transaction could begin now."""

    @abstractmethod
    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Runs a read (``?`` placeholders) on a reader: it sees committed data only."""

    async def _read_records(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """``_read`` for the record reads of the hot path (an engine may make them cheaper)."""
        return await self._read(sql, params)

    @abstractmethod
    async def _close_connections(self) -> None: ...

    @abstractmethod
    async def _publish(self, tx: Transaction) -> None:
        """Tells the other processes serving this database what ``tx`` changed, as part of it."""

    # The writer task.

    async def _start(self) -> None:
        """Starts the writer task and loads the compression dictionary (closes the store if
        that fails)."""
        self._writer_task = asyncio.create_task(self._serve_writes(), name=f"store-writer {self.name}")
        try:
            await self.load_dictionaries()
        except BaseException:
            await self.close()
            raise

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
            if self.writable and self.probe_interval is None:
                job = await self._jobs.get()
            else:
                wait = WRITE_RECOVERY_INTERVAL if not self.writable else self.probe_interval
                try:
                    job = await asyncio.wait_for(self._jobs.get(), wait)
                except TimeoutError:
                    await self._between_writes()
                    continue
            if job is None:
                return
            if job.abandoned:
                job.done.cancel()
                continue
            try:
                await self._run(job)
            except Exception as exc:  # a bug must fail one write, not every write after it
                log.exception("store %s: a write failed unexpectedly", self.name)
                if not job.done.done():
                    job.done.set_exception(StoreUnavailable(f"the store cannot write: {exc}"))

    async def _run(self, job: _WriteJob) -> None:
        if not self.writable:
            await self._recover()
            if not self.writable:
                job.done.set_exception(StoreUnavailable(f"the store cannot write: {self.failure}"))
                return
        started = time.perf_counter()
        for attempt in (1, 2):  # nothing has happened yet: after a recovery, begin once more
            try:
                await self._begin()
                break
            except self.store_errors as exc:
                await self._failed(exc)
                if attempt == 2 or not self.writable:
                    job.done.set_exception(StoreUnavailable(f"the store cannot write: {exc}"))
                    return
        try:
            tx = Transaction(self._connection, self)
            if job.nonce:
                await self._use_nonce(tx, job.nonce, job.nonce_ttl)
            result = await job.work(tx)
            await self._publish(tx)
            await self._commit()
        except Exception as exc:
            await self._roll_back()
            if isinstance(exc, self.store_errors):
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

    async def _between_writes(self) -> None:
        """Probes a writable store, or tries to recover one that is not."""
        await (self._probe() if self.writable else self._recover())

    async def _probe(self) -> None:
        """Finds out, between writes, whether the store could still write (health follows)."""
        try:
            await self._check_writable()
        except (*self.store_errors, OSError) as exc:  # type: ignore[misc]  # a tuple of classes
            await self._failed(exc)

    async def _use_nonce(self, tx: Transaction, nonce: str, ttl: float) -> None:
        self._nonces_used += 1
        sweep = self._nonces_used % NONCE_SWEEP_EVERY == 0
        if not await tx.use_nonce(nonce, int(time.time()) + int(ttl), sweep):
            raise Unauthenticated("nonce already used: a signed call is good for one use")

    async def _roll_back(self) -> None:
        try:
            await self._roll_back_open()
        except self.store_errors as exc:
            await self._failed(exc)

    async def _failed(self, exc: BaseException) -> None:
        """A statement failed for a reason of the store's own: make sure no transaction is left
        open, then find out whether the store can still write."""
        log.error("store %s failed: %s", self.name, exc)
        self._set_writable(False, str(exc))
        await self._recover()

    async def _recover(self) -> None:
        """Rolls back or reopens the write connection, then checks it can begin a transaction."""
        try:
            try:
                await self._roll_back_open()
            except self.store_errors:
                await self._reopen()
            await self._check_writable()
        except (*self.store_errors, OSError) as exc:  # type: ignore[misc]  # a tuple of classes
            self._set_writable(False, str(exc) or type(exc).__name__)
            return
        except Exception as exc:  # unforeseen: still no writer task may end over it
            log.exception("store %s: recovering failed unexpectedly", self.name)
            self._set_writable(False, str(exc) or type(exc).__name__)
            return
        self._set_writable(True, "")

    def _set_writable(self, writable: bool, why: str) -> None:
        self.failure = why
        if writable != self.writable:
            self.writable = writable
            if writable:
                log.warning("store %s can write again", self.name)
            self.on_writable(writable)

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
            await self._close_connections()

    # Compression.

    async def load_dictionaries(self) -> None:
        for dictionary_id, data in await self._read("SELECT id, data FROM dictionaries ORDER BY id", ()):
            if not self.compression.knows(dictionary_id):
                self.compression.add(dictionary_id, data)

    async def decode(self, stored: bytes) -> bytes:
        """The record's wire form from its stored form."""
        try:
            return self.compression.decode(stored)
        except UnknownDictionary:
            await self.load_dictionaries()  # another process trained it
            return self.compression.decode(stored)

    async def decode_many(self, stored: Sequence[bytes]) -> list[bytes]:
        """The records' wire forms from their stored forms."""
        decode = self.compression.decode
        try:
            return [decode(s) for s in stored]
        except UnknownDictionary:
            await self.load_dictionaries()  # another process trained it
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
        self._training = asyncio.create_task(self._train_once(), name=f"store-train {self.name}")

    async def _train_once(self) -> None:
        try:
            rows = await self._read(
                "SELECT count(*) FROM (SELECT 1 FROM identifiers LIMIT ?) AS sample", (self.train_after,)
            )
            if rows[0][0] >= self.train_after:
                await self.train_dictionary()
        except Exception:  # compression is an optimisation: never fail a node for it
            log.exception("training the compression dictionary of %s failed", self.name)
        finally:
            self.written = 0
            self._training = None

    async def trained(self) -> None:
        """Waits for a dictionary training under way, if any (tests, offline loaders)."""
        if self._training is not None:
            await asyncio.shield(self._training)

    # Reads.

    async def get(self, key: str) -> RecordRow | None:
        started = time.perf_counter()
        rows = await self._read_records(f"SELECT {ROW_COLUMNS} FROM identifiers WHERE key = ?", (key,))
        self.observe("get", time.perf_counter() - started)
        if not rows:
            return None
        version, record, attestation, leaf = rows[0]
        return RecordRow(key, version, await self.decode(record), attestation, leaf)

    async def get_many(self, keys: Sequence[str]) -> dict[str, RecordRow]:
        """The rows of the keys that exist, in few queries (500 keys a query)."""
        started = time.perf_counter()
        found = await rows_of(self._read_records, self.decode_many, keys)
        if keys:
            self.observe("get_many", time.perf_counter() - started)
        return found

    async def attestations(self, ids: Sequence[int]) -> dict[int, AttestationRow]:
        """The signed trees of those ids (at most 500)."""
        sql = f"SELECT {ATTESTATION_COLUMNS} FROM attestations WHERE id IN ({','.join('?' * len(ids))})"
        return {r[0]: attestation_row(r) for r in await self._read_records(sql, list(ids))}

    async def expiring_attestations(self, before: int, limit: int) -> list[AttestationRow]:
        """Up to ``limit`` stored trees whose statements end before ``before``, soonest first."""
        sql = f"SELECT {ATTESTATION_COLUMNS} FROM attestations WHERE expires < ? ORDER BY expires LIMIT ?"
        return [attestation_row(r) for r in await self._read(sql, (before, limit))]

    async def attestations_signed_otherwise(self, prefix: str, kid: str, limit: int) -> list[AttestationRow]:
        """Up to ``limit`` stored trees of ``prefix`` signed by a key other than ``kid`` (after
        a key roll: to be signed again with the new key)."""
        sql = f"SELECT {ATTESTATION_COLUMNS} FROM attestations WHERE prefix = ? AND kid != ? LIMIT ?"
        return [attestation_row(r) for r in await self._read(sql, (prefix, kid, limit))]

    async def unattested(self, prefix_key: str, after: str, limit: int) -> list[RecordRow]:
        """Up to ``limit`` records directly under a prefix, in key order after ``after``, that
        belong to no signed tree (written before the node signed, or loaded offline)."""
        low, high = range_of_prefix(prefix_key)
        sql = (
            f"SELECT key, {ROW_COLUMNS} FROM identifiers WHERE key > ? AND key >= ? AND key < ?"
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
        sql = f"SELECT {PREFIX_COLUMNS} FROM prefixes ORDER BY key"
        return [PrefixRow(*r) for r in await self._read(sql, ())]

    async def largest_prefixes(self, limit: int) -> LargestPrefixes:
        """The ``limit`` hosted prefixes with the most identifiers (``LargestPrefixes``)."""
        largest = await self._read(LARGEST_PREFIXES, (limit,))
        return largest_of(largest, (await self._read(HOSTED_TOTALS, ()))[0])

    # Writes in a transaction of their own.

    async def shared_secret(self, name: str, size: int = 32) -> bytes:
        """A secret every process serving this database shares (all the servers of a site on
        PostgreSQL, a node's workers on SQLite), made by whichever asks first."""

        async def get_or_make(tx: Transaction) -> bytes:
            return await tx.secret(name, size)

        return await self.write(get_or_make)

    async def insert_many(self, rows: Sequence[RecordRow]) -> None:
        """Inserts new records in one transaction of their own (loaders, tests)."""

        async def insert(tx: Transaction) -> None:
            await tx.insert_many(rows)

        await self.write(insert)

    async def insert_columns(self, keys: Sequence[str], stored: Sequence[bytes], counts: Mapping[str, int]) -> None:
        """Inserts new records, as columns of keys and stored forms (compressed by a loader's
        own processes with this database's dictionary), in one transaction of their own;
        ``counts``: how many each prefix (by key) gets."""

        async def insert(tx: Transaction) -> None:
            await tx.insert_columns(keys, stored, counts)

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


def _consume(done: asyncio.Future[Any]) -> None:
    """Marks a write's outcome as seen, so one whose caller went away is not reported as an
    exception never retrieved."""
    if not done.cancelled():
        done.exception()
