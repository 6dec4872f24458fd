"""One write transaction's statements, the same SQL on every engine.

The statements are written once, with ``?`` placeholders; each engine's ``Connection`` runs them
its own way (PostgreSQL numbers the placeholders) and holds the few statements the engines spell
differently (``audit_from_json``)."""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from nodes.storage.rows import AttestationRow, PrefixRow, RecordRow, prefix_of_key
from nodes.trust.attester import SignedTree
from nodes.trust.audit import AuditRow, BatchAudit, bounded

if TYPE_CHECKING:
    from nodes.storage.store import Store

PREFIX_COLUMNS = "key, display, kind, site, ttl, identifier_count, admins, zone_keys"
ROW_COLUMNS = "version, record, attestation, leaf"
ATTESTATION_COLUMNS = "id, prefix, kid, statement, tree, size, expires"
ONES = itertools.repeat(1)
"""The version of every new record (zipped with the others: ``strict=False`` for it alone)."""
KEYS_PER_QUERY = 500
"""Keys looked up in one ``IN (...)`` (within SQLite's variable limit)."""


class Connection(Protocol):
    """A connection in an engine's own terms, as the shared statements use it."""

    integrity_errors: tuple[type[BaseException], ...]
    """What a statement raises when a row it inserts breaks a uniqueness constraint."""
    audit_from_json: str
    """INSERT of audit rows that share their other fields, from a JSON array of [target,
    prefix] pairs; parameters: at, identity, key_index, peer, method, result, detail, JSON."""

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]: ...

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Runs a statement; how many rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def insert_id(self, sql: str, params: Sequence[Any]) -> int:
        """Runs an INSERT of one row into a table keyed by ``id``; the id it was given."""
        ...

    async def copy(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Inserts many rows, the engine's fastest way (PostgreSQL: COPY)."""
        ...


class Transaction:
    """Statements inside one write transaction; only the store's writer task makes these."""

    def __init__(self, db: Connection, store: Store) -> None:
        self._db = db
        self._store = store
        self.changed_keys: list[str] = []
        """The identifiers this transaction wrote (published to the other processes of a
        PostgreSQL site as it commits: ``Store._publish``)."""
        self.changed_prefixes: list[str] = []
        """The prefixes it created, changed or removed."""

    def touched(self, keys: Iterable[str]) -> None:
        """Says that the answers about the records ``keys`` changed (their signed trees did,
        say), though no statement here wrote them."""
        self.changed_keys.extend(keys)

    async def get(self, key: str) -> RecordRow | None:
        rows = await self._db.fetch(f"SELECT {ROW_COLUMNS} FROM identifiers WHERE key = ?", (key,))
        if not rows:
            return None
        version, record, attestation, leaf = rows[0]
        return RecordRow(key, version, await self._store.decode(record), attestation, leaf)

    async def get_many(self, keys: Sequence[str]) -> dict[str, RecordRow]:
        return await rows_of(self._db.fetch, self._store.decode_many, keys)

    async def insert_many(self, rows: Sequence[RecordRow]) -> None:
        """Inserts new records (in wire form) and counts them on their prefixes."""
        encode = self._store.compression.encode
        stored = [(r.key, r.version, encode(r.record)) for r in rows]
        await self._db.copy("identifiers", ("key", "version", "record"), stored)
        self.changed_keys.extend(r.key for r in rows)
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
        if len(stored) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(stored)} records")
        self.changed_keys.extend(keys)
        if not attested:
            await self._db.copy("identifiers", ("key", "version", "record"), zip(keys, ONES, stored, strict=False))
        else:
            if len(attested) == 1 and attested[0][1] == range(len(keys)):  # one tree of them all, in order
                ids, leaves = [await self.add_attestation(attested[0][0], keys)] * len(keys), list(range(len(keys)))
            else:
                ids, leaves = [0] * len(keys), [0] * len(keys)
                for tree, places in attested:
                    tree_id = await self.add_attestation(tree, [keys[place] for place in places])
                    for leaf, place in enumerate(places):
                        ids[place], leaves[place] = tree_id, leaf
            await self._db.copy(
                "identifiers",
                ("key", "version", "record", "attestation", "leaf"),
                zip(keys, ONES, stored, ids, leaves, strict=False),
            )
        await self._count_new(counts, len(keys))

    async def add_attestation(self, row: SignedTree, keys: Sequence[str]) -> int:
        """Stores a batch's signed tree and the keys of its leaves' records, in leaf order (what
        re-signing looks for: cheaper than an index of the records by tree); its id."""
        return await self._db.insert_id(
            "INSERT INTO attestations (prefix, kid, statement, tree, size, expires, keys) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row.prefix, row.kid, row.statement, row.tree, row.size, row.expires, json.dumps(list(keys))),
        )

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
        self.changed_keys.extend(row.key for row in rows)
        await self._db.executemany(
            "UPDATE identifiers SET attestation = ?, leaf = ? WHERE key = ? AND version = ? AND attestation IS NULL",
            [(tree_id, leaf, row.key, row.version) for leaf, row in enumerate(rows)],
        )

    async def still_pointing(self, tree_id: int, keys: Sequence[str]) -> int:
        """How many of the records ``keys`` still belong to the tree ``tree_id``."""
        count = 0
        for start in range(0, len(keys), KEYS_PER_QUERY):
            chunk = list(keys[start : start + KEYS_PER_QUERY])
            sql = f"SELECT count(*) FROM identifiers WHERE attestation = ? AND key IN ({','.join('?' * len(chunk))})"
            rows = await self._db.fetch(sql, [tree_id, *chunk])
            count += int(rows[0][0]) if rows else 0
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
        except self._db.integrity_errors:  # a key is stored: undo the rows inserted before it
            await self._db.execute("ROLLBACK TO SAVEPOINT new_records")
            await self._db.execute("RELEASE SAVEPOINT new_records")
            return False
        # Any other failure is the transaction's: the writer rolls all of it back (the engine may
        # have already), so the savepoint is left alone and the error is the one reported.
        await self._db.execute("RELEASE SAVEPOINT new_records")
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
        self.changed_keys.append(row.key)
        await self._db.execute(
            "UPDATE identifiers SET version = ?, record = ?, attestation = ?, leaf = 0 WHERE key = ?",
            (row.version, self._store.compression.encode(row.record), tree_id, row.key),
        )

    async def delete(self, key: str) -> None:
        self.changed_keys.append(key)
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
        cost more than the engine's work)."""
        if not batch.targets:
            return
        c = batch.common
        await self._db.execute(
            self._db.audit_from_json,
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
        rows = await self._db.fetch("SELECT min(seq), max(seq) FROM audit")
        if not rows or rows[0][0] is None:
            return 0
        first, last = int(rows[0][0]), int(rows[0][1])
        # Rows are only ever removed from the oldest end, so seq numbers above min(seq) are dense.
        beyond = last - max_rows if max_rows > 0 else first - 1
        deleted = await self._db.execute(
            "DELETE FROM audit WHERE seq IN (SELECT seq FROM (SELECT seq, at FROM audit ORDER BY seq LIMIT ?) AS oldest"
            " WHERE seq <= ? OR at < ?)",
            (step, beyond, int(before)),
        )
        return max(0, deleted)

    async def add_dictionary(self, data: bytes) -> int:
        """Stores a compression dictionary unless the database has one already; the id of the
        database's first dictionary."""
        rows = await self._db.fetch("SELECT id FROM dictionaries ORDER BY id LIMIT 1")
        if rows:
            return int(rows[0][0])
        return await self._db.insert_id(
            "INSERT INTO dictionaries (data, created_at) VALUES (?, ?)", (data, int(time.time()))
        )

    async def get_prefix(self, key: str) -> PrefixRow | None:
        rows = await self._db.fetch(f"SELECT {PREFIX_COLUMNS} FROM prefixes WHERE key = ?", (key,))
        return PrefixRow(*rows[0]) if rows else None

    async def put_prefix(self, row: PrefixRow) -> None:
        self.changed_prefixes.append(row.key)
        await self._db.execute(
            "INSERT INTO prefixes (key, display, kind, site, ttl, identifier_count, created_at, admins, zone_keys)"
            " VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET kind = excluded.kind, site = excluded.site, ttl = excluded.ttl,"
            " admins = coalesce(excluded.admins, prefixes.admins),"
            " zone_keys = coalesce(excluded.zone_keys, prefixes.zone_keys)",
            (row.key, row.display, row.kind, row.site, row.ttl, int(time.time()), row.admins, row.zone_keys),
        )

    async def sub_prefixes(self, key: str) -> list[str]:
        """The keys of the prefixes below ``key`` (at any depth), in order."""
        sql = "SELECT key FROM prefixes WHERE key > ? AND key < ? ORDER BY key"
        return [r[0] for r in await self._db.fetch(sql, (key + ".", key + "/"))]

    async def delete_prefix(self, key: str) -> None:
        """Removes a prefix from the table (its identifiers and sub-prefixes are the caller's
        to check: none may be left)."""
        self.changed_prefixes.append(key)
        await self._db.execute("DELETE FROM prefixes WHERE key = ?", (key,))

    async def secret(self, name: str, size: int) -> bytes:
        """The secret ``name``, made now (``size`` random bytes) if the database has none yet."""
        rows = await self._db.fetch("SELECT value FROM secrets WHERE name = ?", (name,))
        if rows:
            return bytes(rows[0][0])
        value = secrets.token_bytes(size)
        await self._db.execute("INSERT INTO secrets (name, value) VALUES (?, ?)", (name, value))
        return value

    async def use_nonce(self, nonce: str, expires: int, sweep: bool) -> bool:
        """Records a signed call's nonce until ``expires`` (``sweep``: first deletes the expired
        ones); False when it was recorded already (a replay): the transaction must then fail."""
        if sweep:
            await self._db.execute("DELETE FROM nonces WHERE expires < ?", (int(time.time()),))
        try:
            await self._db.execute("INSERT INTO nonces (nonce, expires) VALUES (?, ?)", (nonce, expires))
        except self._db.integrity_errors:
            return False
        return True


async def rows_of(
    query: Callable[[str, Sequence[Any]], Awaitable[list[Any]]],
    decode_many: Callable[[Sequence[bytes]], Awaitable[list[bytes]]],
    keys: Sequence[str],
) -> dict[str, RecordRow]:
    """The rows of those ``keys`` that exist, ``KEYS_PER_QUERY`` keys a query."""
    found: dict[str, RecordRow] = {}
    for start in range(0, len(keys), KEYS_PER_QUERY):
        chunk = list(keys[start : start + KEYS_PER_QUERY])
        sql = f"SELECT key, {ROW_COLUMNS} FROM identifiers WHERE key IN ({','.join('?' * len(chunk))})"
        rows = await query(sql, chunk)
        records = await decode_many([row[2] for row in rows])
        for (key, version, _, attestation, leaf), record in zip(rows, records, strict=True):
            found[key] = RecordRow(key, version, record, attestation, leaf)
    return found


def attestation_row(row: Sequence[Any]) -> AttestationRow:
    return AttestationRow(row[0], SignedTree(*row[1:]))
