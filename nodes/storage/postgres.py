"""The engine for more than one machine: PostgreSQL, through asyncpg.

Several node processes, on one machine or many, serve the same prefixes from one PostgreSQL
cluster. The schema is SQLite's, in PostgreSQL's types; keys are ``COLLATE "C"`` so that they
order byte by byte, as the key ranges of ``nodes.storage.rows.range_of_prefix`` need.

Writes: each process has one write connection (the writer task's), opened with
``target_session_attrs=read-write``: given several hosts, it finds the primary, and finds it again
after a failover. A write transaction first takes one advisory lock, so write transactions are
serialised across every process, as SQLite's are: each reads what every earlier one committed
(the registry's version checks and idempotent retries rely on it). A write is acknowledged after
COMMIT returned: with a synchronous standby (``synchronous_commit = on``), only once the
standby has it too. A COMMIT whose connection broke has an unknown outcome: the caller gets
UNAVAILABLE and retries, and the registry's retries are idempotent.

Reads: a pool of ``readers`` connections, to the primary or (``read_from = "standby"``) to a
streaming standby when one is up.

Changes: each write transaction publishes the keys and prefixes it changed with ``NOTIFY``
(delivered to every listening process when, and only when, it commits); ``Changes`` listens, and a
lost listening connection means everything cached may be stale (``on_lost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.connect_utils import SessionAttribute

from nodes.storage.rows import StoreUnavailable
from nodes.storage.sqlite import statements_of
from nodes.storage.store import Store
from nodes.storage.transaction import Transaction

log = logging.getLogger("idis.store")

WRITE_LOCK = 0x1D15_0001
"""The advisory lock every write transaction holds (``pg_advisory_xact_lock``)."""
MIGRATION_LOCK = 0x1D15_0002

CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection (each host of a multi-host DSN in turn)."""
COMMAND_TIMEOUT = 30.0
"""Seconds a statement may take before the call fails (a stuck primary must not hang writes)."""

# Each entry upgrades the schema by one version; the table idis_schema records where a database is.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE prefixes (
        key TEXT COLLATE "C" PRIMARY KEY,
        display TEXT NOT NULL,
        kind INTEGER NOT NULL,
        site BYTEA,
        ttl BIGINT NOT NULL DEFAULT 0,
        identifier_count BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        admins BYTEA,
        zone_keys TEXT
    );
    CREATE TABLE identifiers (
        key TEXT COLLATE "C" PRIMARY KEY,
        version BIGINT NOT NULL,
        record BYTEA NOT NULL,
        attestation BIGINT,
        leaf INTEGER NOT NULL DEFAULT 0
    );
    ALTER TABLE identifiers ALTER COLUMN record SET STORAGE EXTERNAL;
    CREATE TABLE dictionaries (
        id BIGSERIAL PRIMARY KEY,
        data BYTEA NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE audit (
        seq BIGSERIAL PRIMARY KEY,
        at BIGINT NOT NULL,
        identity TEXT NOT NULL,
        key_index INTEGER NOT NULL,
        peer TEXT NOT NULL,
        method TEXT NOT NULL,
        target TEXT NOT NULL,
        prefix TEXT COLLATE "C" NOT NULL,
        result TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_by_prefix ON audit (prefix, seq);
    CREATE INDEX audit_by_identity ON audit (identity, seq);
    CREATE TABLE nonces (
        nonce TEXT PRIMARY KEY,
        expires BIGINT NOT NULL
    );
    CREATE TABLE attestations (
        id BIGSERIAL PRIMARY KEY,
        prefix TEXT NOT NULL,
        kid TEXT NOT NULL,
        statement TEXT NOT NULL,
        tree BYTEA NOT NULL,
        size INTEGER NOT NULL,
        expires BIGINT NOT NULL,
        keys TEXT NOT NULL
    );
    CREATE INDEX attestations_by_expiry ON attestations (expires);
    CREATE INDEX attestations_by_signer ON attestations (prefix, kid)
    """,
    """
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    )
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

PRIMARY_PROBE_INTERVAL = 1.0
"""Seconds without writes after which the writer checks it still reaches a primary: health says
NOT_SERVING within about this long of losing it, writes or none."""
STANDBY_POLL_INTERVAL = 0.05
"""Seconds between reads of how far the readers' standby has replayed (with reads from a
standby): how long after the standby has a process's own write its reads still go to the primary."""
CURRENT_LSN = "SELECT pg_current_wal_lsn()::text"
STANDBY_STATE = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text,"
    " CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0"
    " ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END"
)
REPLICATION_STATE = (
    "SELECT coalesce(max(extract(epoch FROM replay_lag)), 0), count(*) FILTER (WHERE sync_state IN ('sync', 'quorum'))"
    " FROM pg_stat_replication"
)
CAUGHT_UP = 1 << 64
UNKNOWN_LSN = CAUGHT_UP - 1
"""This process's last write's place, when reading it failed: reads go to the primary until the
standby watcher reads the primary's place instead."""
CHANGES_CHANNEL = "idis_changes"
"""The NOTIFY channel write transactions publish their changes on."""
NOTIFY_BYTES = 7900
"""Most bytes in one notification's payload (PostgreSQL's limit is 8000)."""
FEED_CHECK_INTERVAL = 2.0
"""Seconds between checks that the listening connection still answers (a host that vanished
sends nothing: only a question finds out)."""
FEED_RETRY_INTERVAL = 0.5
STALE_AFTER = 30.0
"""Seconds a process deaf to other processes' changes goes on answering from its caches."""

STORE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)
"""What a statement raises when the store itself fails: the server's errors (a standby refusing
writes, an administrator's shutdown...), a connection gone, no server of the DSN a primary
(``TargetServerAttributeNotMatched``: every host answered, none writable, as during a
promotion), no answer in time."""


class NotPrimary(ConnectionError):
    """The write connection reached a server that cannot write (a standby)."""


@functools.lru_cache(maxsize=4096)
def numbered(sql: str) -> str:
    """The statement with PostgreSQL's numbered placeholders for its ``?`` ones."""
    parts = sql.split("?")
    return parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], 1))


def _rows_changed(status: str) -> int:
    """How many rows a command changed, from its status ("UPDATE 3", "INSERT 0 1")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def shown_dsn(dsn: str) -> str:
    """The DSN without its password (for logs and task names)."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresConnection:
    """The shared statements' ``Connection`` on an asyncpg connection."""

    integrity_errors: tuple[type[BaseException], ...] = (asyncpg.UniqueViolationError,)
    audit_from_json = (
        "INSERT INTO audit (at, identity, key_index, peer, method, target, prefix, result, detail)"
        " SELECT ?::bigint, ?::text, ?::integer, ?::text, ?::text, t ->> 0, t ->> 1, ?::text, ?::text"
        " FROM jsonb_array_elements(?::jsonb) AS t"
    )

    def __init__(self, db: asyncpg.Connection) -> None:
        self.db = db

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return cast(list[Sequence[Any]], await self.db.fetch(numbered(sql), *params))

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return _rows_changed(await self.db.execute(numbered(sql), *params))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self.db.executemany(numbered(sql), rows)

    async def insert_id(self, sql: str, params: Sequence[Any]) -> int:
        return int(await self.db.fetchval(numbered(sql) + " RETURNING id", *params))

    async def copy(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        await self.db.copy_records_to_table(table, records=rows, columns=list(columns))


class PostgresStore(Store):
    """An open PostgreSQL database. Create with ``await PostgresStore.open(dsn)``."""

    engine = "postgresql"
    store_errors = STORE_ERRORS
    probe_interval = PRIMARY_PROBE_INTERVAL

    def __init__(
        self, dsn: str, writer: asyncpg.Connection, pool: asyncpg.Pool, primary_pool: asyncpg.Pool | None = None
    ) -> None:
        super().__init__(shown_dsn(dsn))
        self.dsn = dsn
        self._writer = writer
        self._connection = PostgresConnection(writer)
        self._pool = pool
        self._primary_pool = primary_pool
        """With reads from a standby: readers on the primary, for what the standby lacks yet."""
        self._written_lsn = 0
        """Where in the primary's WAL this process's latest acknowledged write ends."""
        self._replayed_lsn = 0
        """How far the readers' server has replayed the WAL (CAUGHT_UP: it is the primary)."""
        self.replication_lag = 0.0
        """Seconds the readers' standby is behind (0 on the primary), as last read."""
        self.primary_reads = 0
        """Reads sent to the primary because the standby lacked this process's own writes."""
        self._watching: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, dsn: str, *, readers: int = 2, read_from: str = "primary") -> PostgresStore:
        """Connects (the writer to the primary, ``readers`` readers to the primary or, with
        ``read_from="standby"``, preferably to a standby) and brings the schema up to date."""
        if read_from not in ("primary", "standby"):
            raise ValueError('read_from must be "primary" or "standby"')
        writer = await _connect_writer(dsn)
        pools: list[asyncpg.Pool] = []
        try:
            await _migrate(writer)
            pools.append(await _pool(dsn, readers, SessionAttribute.read_write))
            if read_from == "standby":
                pools.insert(0, await _pool(dsn, readers, SessionAttribute.prefer_standby))
        except BaseException:
            for pool in pools:
                await pool.close()
            await writer.close()
            raise
        store = cls(dsn, writer, pools[0], pools[1] if len(pools) > 1 else None)
        if store._primary_pool is not None:  # the schema, as migrated, is read on the primary till the standby has it
            store._written_lsn = lsn(await writer.fetchval(CURRENT_LSN))
            store._watching = asyncio.create_task(store._watch_standby(), name=f"store-standby {store.name}")
        await store._start()
        return store

    async def _begin(self) -> None:
        # One round trip: the lock is taken as the transaction begins, before anything is read.
        await self._writer.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})")

    async def _commit(self) -> None:
        await self._writer.execute("COMMIT")
        if self._primary_pool is not None:  # reads go to the primary until the standby has it
            try:
                self._written_lsn = max(self._written_lsn, lsn(await self._writer.fetchval(CURRENT_LSN)))
            except STORE_ERRORS:  # committed: never fail it now
                self._written_lsn = UNKNOWN_LSN

    async def _watch_standby(self) -> None:
        """Follows how far the readers' server has replayed the primary's WAL (and how far
        behind it is), every STANDBY_POLL_INTERVAL."""
        while True:
            try:
                state = await self._pool.fetchrow(STANDBY_STATE)
                if state is None:
                    raise ValueError("no state")
                in_recovery, replayed, lag = state
                self._replayed_lsn = lsn(replayed) if in_recovery else CAUGHT_UP
                self.replication_lag = float(lag or 0.0) if in_recovery else 0.0
                if self._written_lsn == UNKNOWN_LSN and self._primary_pool is not None:
                    self._written_lsn = lsn(await self._primary_pool.fetchval(CURRENT_LSN))
            except (*STORE_ERRORS, ValueError) as exc:  # type: ignore[misc]  # a tuple of classes
                log.debug("reading the standby's state failed: %s", exc)
                self._replayed_lsn = 0  # unknown: read from the primary meanwhile
            await asyncio.sleep(STANDBY_POLL_INTERVAL)

    async def _roll_back_open(self) -> None:
        if self._writer.is_closed():
            raise ConnectionError("the write connection is closed")
        if self._writer.is_in_transaction():
            await self._writer.execute("ROLLBACK")

    async def _reopen(self) -> None:
        self._writer.terminate()
        self._writer = await _connect_writer(self.dsn)
        self._connection = PostgresConnection(self._writer)

    async def _check_writable(self) -> None:
        if await self._writer.fetchval("SELECT pg_is_in_recovery()"):
            self._writer.terminate()  # the next recovery looks for the primary again
            raise NotPrimary("the server is a standby: no primary reached")

    async def _publish(self, tx: Transaction) -> None:
        if not tx.changed_keys and not tx.changed_prefixes:
            return
        payloads = change_payloads(tx.changed_keys, tx.changed_prefixes, time.time())
        await self._writer.execute(
            f"SELECT pg_notify('{CHANGES_CHANNEL}', payload) FROM unnest($1::text[]) AS payload", payloads
        )

    async def figures(self) -> dict[str, float]:
        """What its metrics show: the reader pools' connections (open, idle), how far the
        standbys are behind (read on the standby this process reads from, or else on the primary
        from ``pg_stat_replication``), how many synchronous standbys the primary has, and the
        reads sent to the primary for this process's own writes."""
        out: dict[str, float] = {"primary_reads": self.primary_reads}
        for name, pool in (("readers", self._pool), ("primary_readers", self._primary_pool)):
            out[f"{name}_open"], out[f"{name}_idle"] = pool_sizes(pool)
        out["replication_lag"], out["sync_standbys"] = self.replication_lag, -1
        with contextlib.suppress(*STORE_ERRORS):
            row = await self._primary_reader().fetchrow(REPLICATION_STATE)
            if row is not None:
                out["sync_standbys"] = int(row[1])
                if self._primary_pool is None:
                    out["replication_lag"] = float(row[0])
        return out

    async def footprint(self) -> dict[str, Any]:
        """How many identifiers the database holds, and its size on disk."""
        identifiers = int(await self._primary_reader().fetchval("SELECT count(*) FROM identifiers"))
        size = int(await self._primary_reader().fetchval("SELECT pg_database_size(current_database())"))
        return {
            "identifiers_in_database": identifiers,
            "database_bytes": size,
            "bytes_per_registration": round(size / identifiers, 1) if identifiers else None,
        }

    def _primary_reader(self) -> asyncpg.Pool:
        return self._primary_pool or self._pool

    def writer_pid(self) -> int:
        """The server process of the write connection (whose notifications are this process's own)."""
        return self._writer.get_server_pid()

    async def _close_connections(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        for pool in (self._pool, self._primary_pool):
            if pool is None:
                continue
            try:
                await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT)
            except (TimeoutError, *STORE_ERRORS):  # type: ignore[misc]  # a tuple of classes
                pool.terminate()
        with contextlib.suppress(*STORE_ERRORS):
            await asyncio.wait_for(self._writer.close(), CONNECT_TIMEOUT)
        self._writer.terminate()

    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        query = numbered(sql)
        pool = self._pool
        if self._primary_pool is not None and self._written_lsn > self._replayed_lsn:
            pool = self._primary_pool  # never older than this process's own acknowledged writes
            self.primary_reads += 1
        for attempt in (1, 2):  # a connection broken by a failover is replaced: try once more
            try:
                return list(await pool.fetch(query, *params))
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as exc:
                if attempt == 2:
                    raise StoreUnavailable(f"the store cannot read: {exc}") from exc
            except (asyncpg.CannotConnectNowError, asyncpg.exceptions.InternalClientError) as exc:
                raise StoreUnavailable(f"the store cannot read: {exc}") from exc
        raise AssertionError("unreachable")


def lsn(text: str | None) -> int:
    """A WAL position (``16/B374D848``) as a number."""
    if not text:
        return 0
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def pool_sizes(pool: asyncpg.Pool | None) -> tuple[int, int]:
    """A pool's connections: (open, idle)."""
    return (pool.get_size(), pool.get_idle_size()) if pool is not None else (0, 0)


async def _pool(dsn: str, size: int, attrs: SessionAttribute) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max(1, size),
        timeout=CONNECT_TIMEOUT,
        command_timeout=COMMAND_TIMEOUT,
        target_session_attrs=attrs,
    )


async def _connect_writer(dsn: str) -> asyncpg.Connection:
    connection: asyncpg.Connection = await asyncpg.connect(
        dsn, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT, target_session_attrs=SessionAttribute.read_write
    )
    return connection


async def _migrate(db: asyncpg.Connection) -> None:
    async with db.transaction():
        await db.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        await db.execute("CREATE TABLE IF NOT EXISTS idis_schema (version INTEGER NOT NULL)")
        current = await db.fetchval("SELECT max(version) FROM idis_schema") or 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(f"database schema version {current} is newer than this program's ({SCHEMA_VERSION})")
        for version in range(current, SCHEMA_VERSION):
            for statement in statements_of(MIGRATIONS[version]):
                await db.execute(statement)
            await db.execute("INSERT INTO idis_schema (version) VALUES ($1)", version + 1)


def change_payloads(keys: Sequence[str], prefixes: Sequence[str], at: float) -> list[str]:
    """The notifications telling of changed identifier ``keys`` and ``prefixes``: lines ``t`` (the
    time the change was published, for the lag), then ``k<key>`` and ``p<key>``, each payload
    within NOTIFY_BYTES."""
    head = f"t{at:.6f}"
    payloads: list[str] = []
    lines, size = [head], len(head)
    for line in [*(f"p{p}" for p in prefixes), *(f"k{k}" for k in keys)]:
        length = len(line.encode()) + 1
        if size + length > NOTIFY_BYTES and len(lines) > 1:
            payloads.append("\n".join(lines))
            lines, size = [head], len(head)
        lines.append(line)
        size += length
    if len(lines) > 1:
        payloads.append("\n".join(lines))
    return payloads


def parse_change(payload: str) -> tuple[float, list[str], list[str]]:
    """``change_payloads``' payload read back: when, keys, prefixes."""
    at, keys, prefixes = 0.0, [], []
    for line in payload.split("\n"):
        kind, rest = line[:1], line[1:]
        if kind == "k":
            keys.append(rest)
        elif kind == "p":
            prefixes.append(rest)
        elif kind == "t":
            with contextlib.suppress(ValueError):
                at = float(rest)
    return at, keys, prefixes


class ChangeFeed:
    """Listens, on the primary, to the changes other processes commit and tells them on.

    ``on_change(keys, prefixes, lag)`` runs on the event loop as each notification arrives (the
    ones of this process's own writer are skipped: its caches heard them before the write was
    acknowledged). While the listening connection is lost, changes committed elsewhere may be
    missed: ``on_lost`` runs once listening has resumed, and once already if that takes longer
    than ``stale_after`` seconds. Until then, what was cached is still answered: when the
    primary itself is down (the usual cause), nothing can be committed meanwhile anyway, and
    answering from the cache through a failover is what a site must do."""

    def __init__(
        self,
        dsn: str,
        own_pid: Callable[[], int],
        on_change: Callable[[list[str], list[str], float], None],
        on_lost: Callable[[], None],
        stale_after: float = STALE_AFTER,
    ) -> None:
        self.dsn = dsn
        self.own_pid = own_pid
        self.on_change = on_change
        self.on_lost = on_lost
        self.stale_after = stale_after
        self.listening = asyncio.Event()
        self.losses = 0
        self._lost_at: float | None = None
        self._forgotten = False

    def _notified(self, connection: object, pid: int, channel: str, payload: object) -> None:
        with contextlib.suppress(ConnectionError, asyncpg.InterfaceError):
            if pid == self.own_pid():
                return
        at, keys, prefixes = parse_change(str(payload))
        self.on_change(keys, prefixes, max(0.0, time.time() - at) if at else 0.0)

    async def run(self) -> None:
        """Listens until cancelled, reconnecting whenever the connection is lost."""
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(
                    self.dsn,
                    timeout=CONNECT_TIMEOUT,
                    command_timeout=CONNECT_TIMEOUT,
                    target_session_attrs=SessionAttribute.read_write,  # a standby cannot LISTEN
                )
                await connection.add_listener(CHANGES_CHANNEL, self._notified)
                if self._lost_at is not None:
                    self.on_lost()  # changes between the loss and now may have been missed
                    self._lost_at, self._forgotten = None, False
                self.listening.set()
                while True:  # a vanished host answers nothing: ask, so as to find out
                    await asyncio.sleep(FEED_CHECK_INTERVAL)
                    await connection.fetchval("SELECT 1")
            except Exception as exc:  # whatever it was, listening must go on: a deaf feed forgets
                self._deaf(exc)
            finally:
                if connection is not None:
                    connection.terminate()
            await asyncio.sleep(FEED_RETRY_INTERVAL)

    def _deaf(self, exc: BaseException) -> None:
        """Listening failed (or could not resume): counts the loss once, and forgets what was
        cached once it has lasted ``stale_after``."""
        now = time.monotonic()
        if self.listening.is_set() or self._lost_at is None:
            self.listening.clear()
            self._lost_at = now
            self.losses += 1
            log.warning("listening for changes to %s was lost (%s)", shown_dsn(self.dsn), exc)
        if not self._forgotten and now - self._lost_at >= self.stale_after:
            log.warning("deaf to other processes' changes for %.0f s: cached answers forgotten", now - self._lost_at)
            self._forgotten = True
            self.on_lost()
