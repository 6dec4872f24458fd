"""What a node answers for: its apex prefixes, the prefixes it hosts and those it delegates.

A node is configured with one or more apexes (``88`` for the top-level node, ``88.100`` for an
industry secondary node). Everything below an apex is its authority. Inside it, a prefix is
either *hosted* (the node stores its identifiers) or *delegated* to a site of other servers.
Every query is answered by the longest known prefix that covers the identifier's prefix:

* delegated              -> a referral to that site;
* hosted, exactly        -> the record, or NOT_FOUND;
* hosted, an ancestor    -> NOT_FOUND (the prefix was never allocated);
* none (outside apexes)  -> NotAuthoritative, never a silent miss.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from nodes.coherence import PrefixWatch
from nodes.storage import PrefixRow, RecordRow, Store, Transaction
from nodes.trust.audit import Actor, audit_row, nonce_of
from nodes.trust.permissions import Permissions
from resolver.attestation import ZoneKey, keys_from_json, keys_json
from resolver.errors import (
    AlreadyExists,
    FailedPrecondition,
    IdisError,
    InvalidArgument,
    NotAuthoritative,
    NotFound,
    PrefixNotHosted,
)
from resolver.identifier import Identifier, Prefix, parse_prefix
from resolver.record import DEFAULT_TTL, AdminGrant, AdminPermission, Record
from resolver.site import Referral, Site
from resolver.wire import decode_record, decode_site, encode_site


class PrefixKind(enum.IntEnum):
    HOSTED = 1
    DELEGATED = 2


@dataclass(frozen=True, slots=True)
class PrefixEntry:
    prefix: Prefix
    kind: PrefixKind
    site: Site | None = None
    ttl: int = 0
    identifier_count: int = 0
    admins: tuple[AdminGrant, ...] = ()
    zone_keys: tuple[ZoneKey, ...] = ()
    """For a delegated prefix: the keys its node signs with (the delegation this node signs
    lists them)."""

    def referral(self) -> Referral:
        assert self.site is not None
        return Referral(self.prefix, self.site, self.ttl)


def encode_grants(grants: Sequence[AdminGrant]) -> bytes:
    return json.dumps(
        [{"admin": g.admin, "index": g.index, "permissions": int(g.permissions)} for g in grants]
    ).encode()


def decode_grants(data: bytes | None) -> tuple[AdminGrant, ...]:
    if not data:
        return ()
    return tuple(AdminGrant(g["admin"], g["index"], AdminPermission(g["permissions"])) for g in json.loads(data))


def entry_from_row(row: PrefixRow) -> PrefixEntry:
    site = decode_site(row.site) if row.site else None
    return PrefixEntry(
        Prefix(row.key, row.display),
        PrefixKind(row.kind),
        site,
        row.ttl,
        row.identifier_count,
        decode_grants(row.admins),
        keys_from_json(row.zone_keys or ""),
    )


class Authority:
    """The prefix table of one node, kept in memory and written through to the store."""

    def __init__(
        self,
        store: Store,
        apexes: Iterable[Prefix],
        negative_ttl: int,
        on_prefix_change: Callable[[str], None] | None = None,
        watch: PrefixWatch | None = None,
    ) -> None:
        """``on_prefix_change`` is told the key of every prefix created, re-delegated or removed;
        ``watch`` tells when another process changed the prefix table."""
        self.store = store
        self.apexes = tuple(apexes)
        self.negative_ttl = negative_ttl
        self._on_prefix_change = on_prefix_change or (lambda key: None)
        self._watch = watch
        self._stale = False
        self._entries: dict[str, PrefixEntry] = {}
        self.permissions: Permissions | None = None
        """Checks prefix administration when set (nodes.trust.permissions)."""

    async def load(self) -> None:
        """Reads the prefix table, creating the apexes as hosted prefixes on first start."""

        async def create_apexes(tx: Transaction) -> None:
            for apex in self.apexes:
                if await tx.get_prefix(apex.key) is None:
                    await tx.put_prefix(PrefixRow(apex.key, apex.display, PrefixKind.HOSTED, None, 0, 0))

        await self.store.write(create_apexes)
        await self.refresh_counts()

    def mark_stale(self) -> None:
        """Another process changed the prefix table (or may have): reload it before the next
        answer."""
        self._stale = True

    async def sync(self) -> None:
        """Reloads the prefix table if another process changed it."""
        if self._stale or (self._watch is not None and self._watch.prefixes_changed()):
            self._stale = False
            await self.refresh_counts()

    # --- queries ---------------------------------------------------------------------------

    def closest_entry(self, prefix: Prefix) -> PrefixEntry | None:
        """The entry of the longest known prefix equal to or above ``prefix``."""
        key = prefix.key
        while True:
            entry = self._entries.get(key)
            if entry is not None:
                return entry
            cut = key.rfind(".")
            if cut < 0:
                return None
            key = key[:cut]

    def _covering(self, prefix: Prefix) -> PrefixEntry:
        entry = self.closest_entry(prefix)
        if entry is None:
            apexes = ", ".join(a.display for a in self.apexes)
            raise NotAuthoritative(f"prefix {prefix} is outside this node's authority ({apexes})")
        return entry

    def route(self, identifier: Identifier) -> Referral | None:
        """The referral for ``identifier``, or None when its record is to be read here; raises
        NotFound (prefix never allocated) or NotAuthoritative."""
        entry = self._covering(identifier.prefix)
        if entry.kind is PrefixKind.DELEGATED:
            return entry.referral()
        if entry.prefix.key != identifier.prefix.key:
            raise NotFound(f"prefix {identifier.prefix} is not allocated under {entry.prefix}", self.negative_ttl)
        return None

    def not_found(self, identifier: Identifier | str) -> NotFound:
        """The answer for an identifier of a prefix hosted here that has no record
        (``identifier`` as the requester wrote it: the message quotes it)."""
        return NotFound(f"identifier {identifier} not found", self.negative_ttl)

    async def answer(self, identifier: Identifier) -> Record | Referral:
        """The record or the referral for ``identifier``; raises NotFound/NotAuthoritative."""
        [answer] = await self.answer_rows([identifier])
        if isinstance(answer, IdisError):
            raise answer
        return decode_record(answer.record) if isinstance(answer, RecordRow) else answer

    async def answer_many(self, identifiers: Sequence[Identifier]) -> list[Record | Referral | IdisError]:
        """``answer`` for many identifiers, with one store query for all the records to read."""
        return [decode_record(a.record) if isinstance(a, RecordRow) else a for a in await self.answer_rows(identifiers)]

    async def answer_rows(self, identifiers: Sequence[Identifier]) -> list[RecordRow | Referral | IdisError]:
        """``answer_many`` with each record as its stored row (its proof needs the row's tree)."""
        await self.sync()
        answers: list[RecordRow | Referral | IdisError | None] = []
        for identifier in identifiers:
            try:
                answers.append(self.route(identifier))
            except IdisError as error:
                answers.append(error)
        stored = await self.stored_rows([i.key for i, a in zip(identifiers, answers, strict=True) if a is None])
        out: list[RecordRow | Referral | IdisError] = []
        for identifier, answer in zip(identifiers, answers, strict=True):
            if answer is None:
                answer = stored.get(identifier.key) or self.not_found(identifier)
            out.append(answer)
        return out

    async def stored_records(self, keys: Sequence[str]) -> dict[str, bytes | None]:
        """The records of those ``keys`` (normalised identifiers) that are read here, in the
        wire form they are stored in (``idis.v1.Record``, nothing decoded), with one store query;
        None for an identifier of a prefix hosted here that has no record (see ``not_found``).
        Keys answered otherwise (a referral, an unallocated prefix, outside the authority) are
        left out: ``answer`` tells what they get."""
        return {key: row.record if row is not None else None for key, row in (await self.stored_rows(keys)).items()}

    async def stored_rows(self, keys: Sequence[str]) -> dict[str, RecordRow | None]:
        """``stored_records`` with each record's stored row."""
        await self.sync()
        here = [key for key in keys if self._reads_here(key.partition("/")[0])]
        if len(here) == 1:
            return {here[0]: await self.store.get(here[0])}
        rows = await self.store.get_many(here)
        return {key: rows.get(key) for key in here}

    def _reads_here(self, prefix_key: str) -> bool:
        """True when ``route`` reads the identifiers of this prefix here (it is hosted here)."""
        entry = self._entries.get(prefix_key)
        return entry is not None and entry.kind is PrefixKind.HOSTED

    def hosted_for_write(self, identifier: Identifier) -> PrefixEntry:
        """The hosted prefix a write to ``identifier`` goes to; raises when it is not hosted here."""
        entry = self._covering(identifier.prefix)
        if entry.kind is PrefixKind.DELEGATED:
            servers = ", ".join(s.address for s in entry.site.servers) if entry.site else "?"
            raise NotAuthoritative(f"prefix {entry.prefix} is delegated to {servers}; register {identifier} there")
        if entry.prefix.key != identifier.prefix.key:
            raise PrefixNotHosted(
                f"prefix {identifier.prefix} is not hosted by this node; create it first"
                f" (idis prefix create {identifier.prefix})"
            )
        return entry

    def entries(self, under: Prefix | None = None) -> list[PrefixEntry]:
        chosen = [e for e in self._entries.values() if under is None or e.prefix.is_within(under)]
        return sorted(chosen, key=lambda e: e.prefix.key)

    def entry(self, prefix: Prefix) -> PrefixEntry | None:
        return self._entries.get(prefix.key)

    def grants_on(self, prefix: Prefix) -> tuple[AdminGrant, ...]:
        """The HS_ADMIN grants set on exactly ``prefix`` (none when it is not in the table)."""
        entry = self._entries.get(prefix.key)
        return entry.admins if entry is not None else ()

    # --- administration --------------------------------------------------------------------

    def _check_not_apex(self, prefix: Prefix) -> None:
        if any(prefix == apex for apex in self.apexes):
            raise InvalidArgument(f"prefix {prefix} is this node's apex; it is always hosted here")

    def _check_below_hosted(self, prefix: Prefix) -> None:
        """A new prefix must lie strictly below an apex, under a prefix this node hosts."""
        self._check_not_apex(prefix)
        parent = prefix.parent
        owner = self._covering(parent) if parent is not None else None
        if owner is None:
            raise NotAuthoritative(f"prefix {prefix} is outside this node's authority")
        if owner.kind is PrefixKind.DELEGATED:
            raise NotAuthoritative(f"prefix {prefix} lies under {owner.prefix}, which is delegated elsewhere")

    def _require_on_parent(self, needed: AdminPermission, prefix: Prefix, actor: Actor | None) -> None:
        """Prefixes are administered from their parent: ADD_NA creates, DELETE_NA removes."""
        if self.permissions is not None:
            self.permissions.require(actor.caller if actor else None, needed, prefix.parent or prefix)

    async def create_prefix(
        self, text: str, actor: Actor | None = None, admins: Sequence[AdminGrant] = ()
    ) -> PrefixEntry:
        """Starts hosting a prefix. Creating a prefix that is already hosted is a no-op (or sets
        its administrators, when given). Needs ADD_NA on the parent. An apex is refused
        (INVALID_ARGUMENT) before any permission is checked: it is nobody's to create."""
        prefix = parse_prefix(text)
        self._check_not_apex(prefix)
        await self.sync()
        existing = self._entries.get(prefix.key)
        if existing is not None and existing.kind is not PrefixKind.HOSTED:
            raise AlreadyExists(f"prefix {prefix} exists and is delegated; it cannot also be hosted")
        if existing is None:
            self._check_below_hosted(prefix)
        self._require_on_parent(AdminPermission.ADD_NA, prefix, actor)
        if existing is not None and not admins:
            return existing
        row = PrefixRow(
            prefix.key, prefix.display, PrefixKind.HOSTED, None, 0, 0, encode_grants(admins) if admins else None
        )

        async def work(tx: Transaction) -> None:
            await tx.put_prefix(row)
            await tx.audit(audit_row(actor, prefix, f"hosted, {len(admins)} administrators", time.time()))

        entry = PrefixEntry(prefix, PrefixKind.HOSTED, admins=tuple(admins) or (existing.admins if existing else ()))
        await self.store.write(work, nonce=nonce_of(actor), then=lambda _: self._changed(entry))
        return entry

    def _changed(self, entry: PrefixEntry) -> None:
        """After a prefix change committed (on the store's writer task, even if the caller is
        gone): the table in memory and every cache follow."""
        self._entries[entry.prefix.key] = entry
        self._on_prefix_change(entry.prefix.key)

    async def delegate_prefix(
        self,
        text: str,
        site: Site,
        ttl: int,
        actor: Actor | None = None,
        admins: Sequence[AdminGrant] = (),
        zone_keys: Sequence[ZoneKey] = (),
    ) -> PrefixEntry:
        """Delegates a prefix to a site (or re-points an existing delegation). Needs ADD_NA.
        ``zone_keys``: the keys the site signs the prefix's records with, which this node's
        signed delegation lists (none: its answers do not verify)."""
        prefix = parse_prefix(text)
        await self.sync()
        self._check_below_hosted(prefix)
        self._require_on_parent(AdminPermission.ADD_NA, prefix, actor)
        below = [e for e in self._entries.values() if e.prefix.is_within(prefix) and e.prefix != prefix]
        if below:
            raise FailedPrecondition(
                f"prefix {prefix} has sub-prefixes on this node ({', '.join(str(e.prefix) for e in below)});"
                " remove them before delegating it (idis prefix remove)"
            )
        ttl = ttl or DEFAULT_TTL

        async def work(tx: Transaction) -> PrefixEntry:
            current = await tx.get_prefix(prefix.key)
            if current is not None and current.kind == PrefixKind.HOSTED and current.identifier_count > 0:
                raise FailedPrecondition(
                    f"prefix {prefix} hosts {current.identifier_count} identifiers on this node;"
                    " it cannot be delegated away"
                )
            display = current.display if current is not None else prefix.display
            grants = encode_grants(admins) if admins else None
            keys = keys_json(zone_keys) if zone_keys else None
            await tx.put_prefix(
                PrefixRow(prefix.key, display, PrefixKind.DELEGATED, encode_site(site), ttl, 0, grants, keys)
            )
            servers = ", ".join(s.address for s in site.servers)
            kids = f", keys {', '.join(k.kid for k in zone_keys)}" if zone_keys else ""
            await tx.audit(audit_row(actor, prefix, f"delegated to {servers}, ttl {ttl}{kids}", time.time()))
            return PrefixEntry(
                Prefix(prefix.key, display),
                PrefixKind.DELEGATED,
                site,
                ttl,
                admins=tuple(admins),
                zone_keys=tuple(zone_keys),
            )

        return await self.store.write(work, nonce=nonce_of(actor), then=self._changed)

    async def remove_prefix(self, text: str, actor: Actor | None = None) -> PrefixEntry:
        """Stops hosting or delegating a prefix; returns it as it was. Needs DELETE_NA on the
        parent. Refused: an apex (INVALID_ARGUMENT, before any permission check), a prefix with
        sub-prefixes or identifiers on this node (FAILED_PRECONDITION, saying how many), one
        that is not in the table (NOT_FOUND, after the permission check: who may not remove
        prefixes there does not learn which exist). A delegated prefix's referral goes with it."""
        prefix = parse_prefix(text)
        self._check_not_apex(prefix)
        await self.sync()
        self._check_below_hosted(prefix)
        self._require_on_parent(AdminPermission.DELETE_NA, prefix, actor)
        if prefix.key not in self._entries:
            raise NotFound(f"prefix {prefix} is neither hosted nor delegated by this node")

        async def work(tx: Transaction) -> PrefixEntry:
            current = await tx.get_prefix(prefix.key)
            if current is None:
                raise NotFound(f"prefix {prefix} is neither hosted nor delegated by this node")
            below = await tx.sub_prefixes(prefix.key)
            if below:
                raise FailedPrecondition(
                    f"prefix {prefix} has {len(below)} sub-prefixes on this node ({', '.join(below[:5])}"
                    f"{', ...' if len(below) > 5 else ''}); remove them first"
                )
            if current.kind == PrefixKind.HOSTED and current.identifier_count > 0:
                raise FailedPrecondition(
                    f"prefix {prefix} hosts {current.identifier_count} identifiers on this node; delete them first"
                )
            await tx.delete_prefix(prefix.key)
            kind = "hosted" if current.kind == PrefixKind.HOSTED else "delegated"
            await tx.audit(audit_row(actor, prefix, f"removed ({kind})", time.time()))
            return entry_from_row(current)

        return await self.store.write(work, nonce=nonce_of(actor), then=self._removed)

    def _removed(self, entry: PrefixEntry) -> None:
        """After a prefix's removal committed: ``_changed`` for a prefix that is gone."""
        self._entries.pop(entry.prefix.key, None)
        self._on_prefix_change(entry.prefix.key)

    async def refresh_counts(self) -> None:
        """Re-reads the prefix table from the store (identifier counts change with every
        registration; other workers change prefixes)."""
        self._entries = {row.key: entry_from_row(row) for row in await self.store.prefixes()}
