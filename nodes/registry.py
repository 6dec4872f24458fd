"""Registration: creating, changing and deleting identifiers on the node that hosts their prefix.

Rules, after the Handle System and the national SNMS API:

* Create is idempotent: if the identifier exists with the same values, the call succeeds and
  says ``created=False`` (a client that timed out retries safely); with different values it is
  ALREADY_EXISTS. Prefixes compare case-insensitively, so ``88.100.a/x`` collides with
  ``88.100.A/x``. The comparison is with what the caller may read of the stored record (all of
  it with READ_VALUE, else its public values), so a Create cannot confirm a guess of a private
  value: a caller without READ_VALUE gets ALREADY_EXISTS for a request carrying private values,
  and ``created=False`` when its (public) values equal the record's public values.
* Every change bumps the record's version; a write that names ``expected_version`` fails with
  FAILED_PRECONDITION when the stored version differs, so two clients never overwrite each other
  unknowingly.
* Every value is validated (index range and uniqueness, type, size) before anything is stored;
  a rejected request changes nothing.
* A batch holds at most ``Limits.max_batch`` items; each item succeeds or fails on its own.
* With permissions enforced, the caller must hold the HS_ADMIN bits the change needs
  (``nodes.trust.permissions``): the value right of the operation, and ADD_ADMIN, MODIFY_ADMIN or
  REMOVE_ADMIN for admin data (HS_ADMIN and every credential type, HS_PUBKEY first). The rights
  that do not depend on the record are checked before anything that does, so a caller without
  them learns nothing of it (not which indexes exist); every accepted change is written to the
  audit trail in the same transaction as the change itself.
* A write answers with the record as the caller may read it (``readable_part``, the rule
  resolution answers by): private values only to a caller holding READ_VALUE.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

from nodes.authority import Authority
from nodes.storage import RecordRow, Transaction
from nodes.trust.attester import Attester, SignedTree
from nodes.trust.audit import Actor, audit_row, batch_audit, nonce_of
from nodes.trust.permissions import readable_part
from nodes.trust.secret_keys import SecretSealer
from resolver.cache import created_records, template_reference
from resolver.errors import (
    AlreadyExists,
    FailedPrecondition,
    IdisError,
    InvalidValue,
    LimitExceeded,
    NotFound,
    ValueExists,
    ValueNotFound,
    VersionConflict,
)
from resolver.identifier import Identifier, Prefix, grammatical_identifier, parse_identifier
from resolver.record import AdminPermission, Limits, Record, Value, check_indexes, check_values, is_admin_data
from resolver.template import REFERENCE_TYPE, Fields, Typed, fields_of, is_template_identifier, template_in
from resolver.wire import decode_record, encode_record, encode_stamped, record_pb2, registration_pb2, values_from_pb

if TYPE_CHECKING:
    from nodes.templates import Fetched, Templates


@dataclass(frozen=True, slots=True)
class WriteResult:
    record: Record
    created: bool = True


@dataclass(frozen=True, slots=True)
class EncodedCreate:
    """A batch item that the wire fast path (``resolver.cache.created_records``) has checked and
    encoded: its record as stored at version 1, stamped. Its values are plain (no HS_ type, no
    references), so creating it needs ADD_HANDLE alone and seals nothing."""

    identifier: Identifier
    record: bytes


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """A whole batch that the wire fast path checked and encoded, as it gives it: each item's
    identifier text, where its prefix ends, and its record as stored at version 1, stamped
    (``EncodedCreate``'s, without an object per item)."""

    items: Sequence[tuple[str, int, bytes]]

    def created(self) -> list[EncodedCreate]:
        prefixes: dict[str, Prefix] = {}
        return [EncodedCreate(grammatical_identifier(t, cut, prefixes), record) for t, cut, record in self.items]


@dataclass(frozen=True, slots=True)
class BatchItemResult:
    """Outcome of one batch item: ``error`` is None on success."""

    version: int = 0
    created: bool = False
    error: IdisError | None = None


CREATED = BatchItemResult(version=1, created=True)
"""A batch item's usual outcome: created, at version 1."""


def _stamp(values: Sequence[Value], now: int) -> tuple[Value, ...]:
    # Built field by field: dataclasses.replace costs several times as much, once per value written.
    return tuple(Value(v.index, v.type, v.data, v.ttl, v.ttl_type, now, v.permissions, v.references) for v in values)


def _check_version(identifier: Identifier, stored: int, expected: int) -> None:
    if expected and expected != stored:
        raise VersionConflict(f"identifier {identifier} is at version {stored}, not the expected {expected}")


def _admin_rights(before: Sequence[Value], after: Sequence[Value]) -> AdminPermission:
    """The *_ADMIN rights a change needs for the admin data it touches. ``before``: the stored
    values the change touches; ``after``: what it stores at those indexes and at new ones.
    Admin data appearing needs ADD_ADMIN, disappearing REMOVE_ADMIN, touched in place
    MODIFY_ADMIN -- even when it stays the same, so success or refusal reveals nothing of it."""
    old = {v.index: is_admin_data(v) for v in before}
    new = {v.index: is_admin_data(v) for v in after}
    needed = AdminPermission(0)
    for index in old.keys() | new.keys():
        was, becomes = old.get(index, False), new.get(index, False)
        if becomes and not was:
            needed |= AdminPermission.ADD_ADMIN
        if was and not becomes:
            needed |= AdminPermission.REMOVE_ADMIN
        if was and becomes:
            needed |= AdminPermission.MODIFY_ADMIN
    return needed


REPLACE_RIGHTS = AdminPermission.MODIFY_VALUE | AdminPermission.ADD_VALUE | AdminPermission.REMOVE_VALUE
"""What replacing every value of a record needs (besides the *_ADMIN rights of admin data)."""


def _replacement(old: Record, checked: Sequence[Value], now: int) -> tuple[tuple[Value, ...], AdminPermission, str]:
    """The values replacing all of ``old``'s, the admin rights that needs, and the audit text.
    Values that did not change keep their timestamp."""
    kept = []
    for v in checked:
        before = old.value(v.index)
        kept.append(before if before is not None and before.same_content(v) else replace(v, timestamp=now))
    return tuple(kept), _admin_rights(old.values, checked), f"replaced values, indexes {[v.index for v in checked]}"


def _item_values(item: registration_pb2.CreateRequest) -> tuple[str, tuple[Value, ...]] | IdisError:
    """A batch item's identifier and values, or why its values do not decode."""
    try:
        return item.identifier, values_from_pb(item.values, for_write=True)
    except IdisError as error:
        return error


async def _around_errors(
    decoded: Sequence[object], run: Callable[[list[Any]], Awaitable[list[BatchItemResult]]]
) -> list[BatchItemResult]:
    """``run`` over the items that decoded; each of the others keeps its error, in its place."""
    outcomes = iter(await run([d for d in decoded if not isinstance(d, IdisError)]))
    return [BatchItemResult(error=d) if isinstance(d, IdisError) else next(outcomes) for d in decoded]


class Registry:
    """The write side of a node. ``on_change`` is told the keys of the identifiers that changed
    (a batch's all at once); ``on_created`` (the prefix as hosted, how many) for identifiers
    created."""

    def __init__(
        self,
        authority: Authority,
        limits: Limits,
        on_change: Callable[[Sequence[str]], None] | None = None,
        clock: Callable[[], float] = time.time,
        on_created: Callable[[str, int], None] | None = None,
        identifiers_per_prefix: int = 0,
    ) -> None:
        """``identifiers_per_prefix``: the registration quota of every prefix (0: none)."""
        self.identifiers_per_prefix = identifiers_per_prefix
        self.authority = authority
        self.limits = limits
        self._on_change = on_change or (lambda keys: None)
        self._on_created = on_created or (lambda prefix, count: None)
        self._clock = clock
        self.sealer = SecretSealer()
        self.attester: Attester | None = None
        """Signs every write (verifiable resolution) when set."""

    templates: Templates | None = None
    """The metadata templates registrations are checked against (``nodes.templates``); None:
    no check (a node that hosts no registrations of its own, the tests of other things)."""

    def notify_changed(self, keys: Sequence[str]) -> None:
        """Tells the caches that records changed outside a write of this registry's (signed
        afresh in the background)."""
        self._on_change(keys)

    def _signed_one(self, key: str, version: int, wire: bytes) -> SignedTree | None:
        """The signed tree of one record at ``version`` (a write of one), when the node signs."""
        if self.attester is None:
            return None
        prefix = key[: key.index("/")]
        return self.attester.sign_tree(prefix, self.attester.leaves([key], [version], [wire]))

    def _signed_batch(self, prefixes: Sequence[str], leaves: Sequence[bytes]) -> list[tuple[SignedTree, Sequence[int]]]:
        """A batch's signed trees, one per prefix, each with the places of its records."""
        if self.attester is None or not prefixes:
            return []
        if list(prefixes).count(prefixes[0]) == len(prefixes):  # the usual batch: one prefix
            return [(self.attester.sign_tree(prefixes[0], leaves), range(len(prefixes)))]
        places: dict[str, list[int]] = {}
        for i, prefix in enumerate(prefixes):
            places.setdefault(prefix, []).append(i)
        return [(self.attester.sign_tree(p, [leaves[i] for i in at]), at) for p, at in places.items()]

    def _require(
        self, actor: Actor | None, needed: AdminPermission, identifier: Identifier, record: Record | None = None
    ) -> None:
        if self.authority.permissions is not None:
            self.authority.permissions.require(actor.caller if actor else None, needed, identifier.prefix, record)

    async def _hosted(self, identifier: Identifier) -> None:
        """Raises unless this node hosts the identifier's prefix (as of the latest prefix table)."""
        await self.authority.sync()
        self.authority.hosted_for_write(identifier)

    async def _prepare(self, identifier_text: str, values: Sequence[Value]) -> tuple[Identifier, tuple[Value, ...]]:
        identifier = parse_identifier(identifier_text)
        checked = check_values(values, self.limits)
        await self._hosted(identifier)
        [sealed] = await self.sealer.sealed([checked])  # secrets are stored sealed
        return identifier, sealed

    async def _room(self, tx: Transaction, prefix: Identifier | str, wanted: int) -> int:
        """How many of ``wanted`` new identifiers the prefix's quota still admits."""
        if not self.identifiers_per_prefix:
            return wanted
        key = prefix.prefix.key if isinstance(prefix, Identifier) else prefix
        row = await tx.get_prefix(key)
        held = row.identifier_count if row is not None else 0
        return max(0, min(wanted, self.identifiers_per_prefix - held))

    def _quota_error(self, identifier: Identifier) -> LimitExceeded:
        return LimitExceeded(f"prefix {identifier.prefix} holds its quota of {self.identifiers_per_prefix} identifiers")

    def _readable(self, record: Record, actor: Actor | None) -> Record:
        """What the caller may read of ``record``: the answer to its write."""
        return readable_part(record, actor.caller if actor else None, self.authority.permissions)

    async def _existing(
        self,
        tx: Transaction,
        identifier: Identifier,
        expected_version: int,
        actor: Actor | None,
        needed: AdminPermission,
    ) -> Record:
        """The stored record, once the caller holds ``needed`` on it (or on its prefix): without
        that, PermissionDenied whether it exists or not, before anything else is said of it."""
        row = await tx.get(identifier.key)
        if row is None:
            self._require(actor, needed, identifier)
            raise NotFound(f"identifier {identifier} not found")
        old = decode_record(row.record)
        self._require(actor, needed, identifier, old)
        _check_version(identifier, row.version, expected_version)
        return old

    async def create(
        self, identifier_text: str, values: Sequence[Value], actor: Actor | None = None, if_exists: str = "same"
    ) -> WriteResult:
        """Creates the identifier. When it exists already, ``if_exists`` decides: ``same`` (the
        gRPC rule) succeeds with ``created=False`` if the request equals what the caller may
        read of it, else ALREADY_EXISTS; ``refuse`` is always ALREADY_EXISTS (the Handle REST
        API's ``overwrite=false``); ``replace`` replaces all its values in the same transaction
        (``overwrite=true``), with the rights a Replace needs."""
        identifier, checked = await self._prepare(identifier_text, values)
        if not checked:
            raise InvalidValue(f"identifier {identifier} needs at least one value")
        if is_template_identifier(identifier):
            template_in(identifier, checked)  # a template's own record: one definition, well formed
            if_exists = "same" if if_exists == "replace" else if_exists  # a published version never changes
        if self.templates is not None:
            await self.templates.check(identifier, checked)
        creating = AdminPermission.ADD_HANDLE | _admin_rights((), checked)
        if if_exists != "replace":
            self._require(actor, creating, identifier)
        now = int(self._clock())
        new = Record(identifier, _stamp(checked, now), 1)

        async def work(tx: Transaction) -> WriteResult:
            row = await tx.get(identifier.key)
            if row is not None:
                old = decode_record(row.record)
                if if_exists == "replace":
                    return await self._replace_in(tx, old, row.version, checked, now, actor)
                if if_exists == "refuse":
                    raise AlreadyExists(f"identifier {identifier} already exists")
                return self._idempotent(new, old, actor)
            self._require(actor, creating, identifier)
            if not await self._room(tx, identifier, 1):
                raise self._quota_error(identifier)
            wire = encode_record(new)
            form = self.authority.store.compression.encode(wire)
            signed = self._signed_one(identifier.key, 1, wire)
            trees = [(signed, [0])] if signed is not None else []
            await tx.insert_columns([identifier.key], [form], {identifier.prefix.key: 1}, trees)
            await tx.audit(audit_row(actor, identifier, "created v1", self._clock()))
            return WriteResult(self._readable(new, actor), created=True)

        def then(result: WriteResult) -> None:
            self._on_change((identifier.key,))
            if result.created:
                self._on_created(self._label(identifier.prefix.key), 1)

        return await self.authority.store.write(work, nonce=nonce_of(actor), then=then)

    async def _replace_in(
        self, tx: Transaction, old: Record, version: int, checked: tuple[Value, ...], now: int, actor: Actor | None
    ) -> WriteResult:
        """Replaces every value of the stored ``old`` within ``tx`` (rights checked here)."""
        values, more, what = _replacement(old, checked, now)
        self._require(actor, REPLACE_RIGHTS | more, old.identifier, old)
        record = Record(old.identifier, check_values(values, self.limits), version + 1)
        await self._update(tx, record)
        await tx.audit(audit_row(actor, old.identifier, f"{what}; v{version} -> v{record.version}", self._clock()))
        return WriteResult(self._readable(record, actor), created=False)

    async def _update(self, tx: Transaction, record: Record) -> None:
        """Stores a record's new version (signed, when the node signs)."""
        key, wire = record.identifier.key, encode_record(record)
        await tx.update(RecordRow(key, record.version, wire), self._signed_one(key, record.version, wire))

    def _idempotent(self, new: Record, stored: Record, actor: Actor | None) -> WriteResult:
        """A Create of an existing identifier: success if the request equals what the caller may
        read of the record, else ALREADY_EXISTS -- never a comparison with what it may not read."""
        seen = self._readable(stored, actor)
        if stored.identifier.display == new.identifier.display and seen.same_content(new):
            return WriteResult(seen, created=False)
        raise AlreadyExists(f"identifier {stored.identifier} already exists with other values")

    async def _change(
        self,
        identifier: Identifier,
        expected_version: int,
        actor: Actor | None,
        needed: AdminPermission,
        change: Callable[[Record], tuple[tuple[Value, ...], AdminPermission, str]],
    ) -> WriteResult:
        """Reads the record once the caller holds ``needed`` (the rights the request alone
        calls for), computes its new values and the further rights that needs, checks them,
        stores version + 1 and audits it, all in one transaction. The new values must still
        follow the template they name (read before the transaction, checked in it)."""
        _unchanging(identifier)
        fetched = await self._templates_for(identifier, change)

        async def work(tx: Transaction) -> WriteResult:
            record = await self._change_in(tx, identifier, expected_version, actor, needed, change, fetched)
            return WriteResult(self._readable(record, actor), created=False)

        return await self.authority.store.write(
            work, nonce=nonce_of(actor), then=lambda result: self._on_change((identifier.key,))
        )

    async def _change_in(
        self,
        tx: Transaction,
        identifier: Identifier,
        expected_version: int,
        actor: Actor | None,
        needed: AdminPermission,
        change: Callable[[Record], tuple[tuple[Value, ...], AdminPermission, str]],
        fetched: Fetched,
    ) -> Record:
        """``_change`` within ``tx``: the record as stored now at version + 1."""
        old = await self._existing(tx, identifier, expected_version, actor, needed)
        values, more, what = change(old)
        self._require(actor, needed | more, identifier, old)
        record = Record(old.identifier, check_values(values, self.limits), old.version + 1)
        if self.templates is not None:
            error = self.templates.violation(identifier, fields_of(record.values), fetched, record.values)
            if error is not None:
                raise error
        await self._update(tx, record)
        await tx.audit(audit_row(actor, identifier, f"{what}; v{old.version} -> v{record.version}", self._clock()))
        return record

    async def _templates_for(
        self, identifier: Identifier, change: Callable[[Record], tuple[tuple[Value, ...], AdminPermission, str]]
    ) -> Fetched:
        """The templates a change would have the record name, read now (from the record as
        stored now; the transaction checks against them)."""
        if self.templates is None:
            return {}
        row = await self.authority.store.get(identifier.key)
        if row is None:
            return {}
        try:
            preview, _, _ = change(decode_record(row.record))
        except IdisError:  # the transaction says so, once the caller's rights are checked
            return {}
        return await self.templates.prefetch([(identifier, fields_of(preview))])

    async def replace(
        self, identifier_text: str, values: Sequence[Value], expected_version: int = 0, actor: Actor | None = None
    ) -> WriteResult:
        identifier, checked = await self._prepare(identifier_text, values)
        if not checked:
            raise InvalidValue(f"identifier {identifier} needs at least one value (use Delete to remove it)")
        now = int(self._clock())
        return await self._change(
            identifier, expected_version, actor, REPLACE_RIGHTS, lambda old: _replacement(old, checked, now)
        )

    async def delete(self, identifier_text: str, expected_version: int = 0, actor: Actor | None = None) -> int:
        identifier = parse_identifier(identifier_text)
        _unchanging(identifier)
        await self._hosted(identifier)

        async def work(tx: Transaction) -> int:
            return await self._delete_in(tx, identifier, expected_version, actor)

        return await self.authority.store.write(
            work, nonce=nonce_of(actor), then=lambda version: self._on_change((identifier.key,))
        )

    async def _delete_in(
        self, tx: Transaction, identifier: Identifier, expected_version: int, actor: Actor | None
    ) -> int:
        """``delete`` within ``tx``: the version deleted."""
        old = await self._existing(tx, identifier, expected_version, actor, AdminPermission.DELETE_HANDLE)
        # Deleting an identifier deletes its admin data too (an administrator's keys, say).
        self._require(actor, AdminPermission.DELETE_HANDLE | _admin_rights(old.values, ()), identifier, old)
        await tx.delete(identifier.key)
        await tx.audit(audit_row(actor, identifier, f"deleted v{old.version}", self._clock()))
        return old.version

    async def add_values(
        self, identifier_text: str, values: Sequence[Value], expected_version: int = 0, actor: Actor | None = None
    ) -> WriteResult:
        identifier, checked = await self._prepare(identifier_text, values)
        now = int(self._clock())

        def change(old: Record) -> tuple[tuple[Value, ...], AdminPermission, str]:
            for v in checked:
                if old.value(v.index) is not None:
                    raise ValueExists(f"identifier {identifier} already has a value at index {v.index}")
            return old.values + _stamp(checked, now), AdminPermission(0), f"added indexes {[v.index for v in checked]}"

        needed = AdminPermission.ADD_VALUE | _admin_rights((), checked)
        return await self._change(identifier, expected_version, actor, needed, change)

    async def modify_values(
        self, identifier_text: str, values: Sequence[Value], expected_version: int = 0, actor: Actor | None = None
    ) -> WriteResult:
        identifier, checked = await self._prepare(identifier_text, values)
        now = int(self._clock())

        def change(old: Record) -> tuple[tuple[Value, ...], AdminPermission, str]:
            changes = {v.index: v for v in _stamp(checked, now)}
            missing = sorted(set(changes) - {v.index for v in old.values})
            if missing:
                raise ValueNotFound(f"identifier {identifier} has no value at index {missing[0]}")
            touched = [v for v in old.values if v.index in changes]
            values = tuple(changes.get(v.index, v) for v in old.values)
            return values, _admin_rights(touched, checked), f"modified indexes {sorted(changes)}"

        return await self._change(identifier, expected_version, actor, AdminPermission.MODIFY_VALUE, change)

    async def put_values(
        self, identifier_text: str, values: Sequence[Value], actor: Actor | None = None
    ) -> WriteResult:
        """Adds the values at new indexes and replaces those at existing ones, in one
        transaction (the Handle REST API's ``PUT ?index=...&overwrite=true``). ``created`` in
        the result: no existing value was replaced. It needs ADD_VALUE and MODIFY_VALUE whatever
        it ends up doing, so a caller without both learns nothing of which indexes exist."""
        identifier, checked = await self._prepare(identifier_text, values)
        if not checked:
            raise InvalidValue(f"no values to put on {identifier}")
        now = int(self._clock())
        replaced: list[int] = []

        def change(old: Record) -> tuple[tuple[Value, ...], AdminPermission, str]:
            changes = {v.index: v for v in _stamp(checked, now)}
            touched = [v for v in old.values if v.index in changes]
            replaced.extend(v.index for v in touched)
            kept = tuple(changes.pop(v.index, v) for v in old.values)
            values = kept + tuple(changes.values())
            return values, _admin_rights(touched, checked), f"put indexes {sorted(v.index for v in checked)}"

        needed = AdminPermission.ADD_VALUE | AdminPermission.MODIFY_VALUE
        result = await self._change(identifier, 0, actor, needed, change)
        return replace(result, created=not replaced)

    async def remove_values(
        self, identifier_text: str, indexes: Sequence[int], expected_version: int = 0, actor: Actor | None = None
    ) -> WriteResult:
        identifier = parse_identifier(identifier_text)
        try:
            gone = set(check_indexes(indexes))
            if not gone:
                raise InvalidValue("no value indexes to remove")
        except InvalidValue as exc:
            exc.field = "indexes"  # the request field at fault (resolver.status)
            raise
        await self._hosted(identifier)

        def change(old: Record) -> tuple[tuple[Value, ...], AdminPermission, str]:
            missing = sorted(gone - {v.index for v in old.values})
            if missing:
                raise ValueNotFound(f"identifier {identifier} has no value at index {missing[0]}")
            remaining = tuple(v for v in old.values if v.index not in gone)
            if not remaining:
                raise InvalidValue(
                    f"removing every value of {identifier} would leave an empty record; delete it instead"
                )
            removed = [v for v in old.values if v.index in gone]
            return remaining, _admin_rights(removed, ()), f"removed indexes {sorted(gone)}"

        return await self._change(identifier, expected_version, actor, AdminPermission.REMOVE_VALUE, change)

    def _label(self, prefix_key: str) -> str:
        """The name ``on_created`` is told a prefix by: as the node hosts it (as created), the
        name every per-prefix metric uses, whatever case a registrant wrote it in."""
        entry = self.authority.entry(Prefix(prefix_key, prefix_key))
        return entry.prefix.display if entry is not None else prefix_key

    def now(self) -> int:
        """The node's clock in whole seconds: what a write stamps its values with."""
        return int(self._clock())

    def _batch_record(self, text: str, values: Sequence[Value]) -> Record:
        """A batch item given as text and values, checked (the values not yet stamped)."""
        return Record(parse_identifier(text), check_values(values, self.limits), 1)

    def _prepare_encoded(self, batch: EncodedBatch, actor: Actor | None) -> _Prepared | None:
        """The whole of an encoded batch accepted at once, without a step per item, when that is
        the answer the item-by-item check (``_prepare_items``) would give: no identifier twice,
        each prefix hosted here and open to the caller. None otherwise (that check decides)."""
        texts = [text for text, _, _ in batch.items]
        prefixes = [text[:cut].upper() for text, cut, _ in batch.items]
        keys = [prefix + text[cut:] for prefix, (text, cut, _) in zip(prefixes, batch.items, strict=True)]
        if len(set(keys)) != len(keys):
            return None
        decided = _BatchDecisions()
        for text, cut, _ in dict(zip(prefixes, batch.items, strict=True)).values():  # an item of each prefix
            identifier = grammatical_identifier(text, cut, {})
            try:
                decided.hosted(self.authority, identifier)
                decided.allowed(self, actor, identifier, AdminPermission.ADD_HANDLE)
            except IdisError:
                return None
        return _Prepared(list(range(len(keys))), keys, prefixes, texts, [record for _, _, record in batch.items])

    def _prepare_items(
        self, items: Sequence[tuple[str, Sequence[Value]] | EncodedCreate], actor: Actor | None
    ) -> tuple[_Prepared, list[BatchItemResult]]:
        """Each item checked on its own, in order: the accepted ones, and the refusals by position."""
        prepared = _Prepared([], [], [], [], [])
        refused: list[BatchItemResult] = [BatchItemResult()] * len(items)
        first: dict[str, int] = {}
        decided = _BatchDecisions()
        for position, item in enumerate(items):
            try:
                entry = item if isinstance(item, EncodedCreate) else self._batch_record(*item)
                identifier = entry.identifier
                decided.hosted(self.authority, identifier)
                if isinstance(entry, Record) and not entry.values:
                    raise InvalidValue(f"identifier {identifier} needs at least one value")
                if identifier.key in first:
                    raise InvalidValue(
                        f"identifier {identifier} appears twice in the batch (item {first[identifier.key] + 1})"
                    )
                needed = AdminPermission.ADD_HANDLE
                if isinstance(entry, Record):
                    needed |= _admin_rights((), entry.values)
                decided.allowed(self, actor, identifier, needed)
                first[identifier.key] = position
                prepared.add(position, identifier, entry if isinstance(entry, Record) else entry.record)
            except IdisError as error:
                refused[position] = BatchItemResult(error=error)
        return prepared, refused

    async def _follow_templates(self, prepared: _Prepared, results: list[BatchItemResult]) -> _Prepared:
        """The items that follow the templates they name (and name one where their prefix
        requires it); the others refused, each with every violation of its own. Items that name
        no template, under prefixes that require none, cost a byte search each; encoded items
        that name one are checked from their wire form by the compiled check, and only those it
        is not sure of are decoded and checked in Python (which says what is wrong)."""
        templates = cast("Templates", self.templates)
        to_check: dict[int, tuple[Identifier, Fields, Sequence[Typed]]] = {}
        quick: dict[int, bytes] = {}  # encoded items naming one template: the template named
        for i, entry in enumerate(prepared.entries):
            if isinstance(entry, Record):
                names = any(v.type == REFERENCE_TYPE for v in entry.values)
            else:
                names = NAMES_A_TEMPLATE in entry
                reference = template_reference(entry) if names else None
                if reference is not None:
                    quick[i] = reference
                    continue
            if names or templates.required:
                identifier = prepared.identifier(i)
                if not names and not templates.requires(identifier.prefix):
                    continue
                to_check[i] = self._fields_of(identifier, entry)
        if not to_check and not quick:
            return prepared
        named = {(prepared.prefixes[i], reference): i for i, reference in quick.items()}  # one item of each
        asked = [(prepared.identifier(i), {REFERENCE_TYPE: [reference]}) for (_, reference), i in named.items()]
        fetched = await templates.prefetch([*((i, f) for i, f, _ in to_check.values()), *asked])
        for i, reference in quick.items():
            entry = cast(bytes, prepared.entries[i])
            if not templates.fits(reference, prepared.prefixes[i], entry, fetched):
                to_check[i] = self._fields_of(prepared.identifier(i), entry)
        kept: list[int] = []
        for i in range(len(prepared.keys)):
            error = templates.violation(*to_check[i][:2], fetched, to_check[i][2]) if i in to_check else None
            if error is None:
                kept.append(i)
            else:
                results[prepared.positions[i]] = BatchItemResult(error=error)
        return prepared if len(kept) == len(prepared.keys) else prepared.only(kept)

    @staticmethod
    def _fields_of(identifier: Identifier, entry: Record | bytes) -> tuple[Identifier, Fields, Sequence[Typed]]:
        """A batch item's values, and the same by type, for the Python check (an encoded item's
        as protobuf messages: nothing more is built to check them)."""
        values: Sequence[Typed] = (
            entry.values if isinstance(entry, Record) else record_pb2.Record.FromString(entry).values
        )
        return identifier, fields_of(values), values

    async def _seal_batch(self, prepared: _Prepared) -> None:
        """Seals the secrets of the items given as values, as every other write's (encoded items
        hold none: the fast path leaves every HS_ type to the Python path)."""
        at = [i for i, entry in enumerate(prepared.entries) if isinstance(entry, Record)]
        if not at:
            return
        records = [cast(Record, prepared.entries[i]) for i in at]
        sealed = await self.sealer.sealed([record.values for record in records])
        for i, record, values in zip(at, records, sealed, strict=True):
            if values is not record.values:
                prepared.entries[i] = replace(record, values=values)

    async def batch_create(
        self,
        items: Sequence[tuple[str, Sequence[Value]] | EncodedCreate] | EncodedBatch,
        actor: Actor | None = None,
        now: int | None = None,
    ) -> list[BatchItemResult]:
        """Creates many identifiers in one transaction; each item gets its own result. Items
        may come as text and values or already encoded (``EncodedCreate``, or a whole
        ``EncodedBatch``, stamped ``now``)."""
        self.limits.check_batch(len(items.items) if isinstance(items, EncodedBatch) else len(items))
        now = self.now() if now is None else now
        await self.authority.sync()  # once for the batch: the items are checked against one table
        fast = self._prepare_encoded(items, actor) if isinstance(items, EncodedBatch) else None
        if fast is not None:
            prepared, results = fast, [BatchItemResult()] * len(fast.keys)
        else:
            prepared, results = self._prepare_items(
                items.created() if isinstance(items, EncodedBatch) else items, actor
            )
        if self.templates is not None:
            prepared = await self._follow_templates(prepared, results)
        await self._seal_batch(prepared)
        # The stored forms and the audit trail's rows are made before the transaction, which then
        # only stores them: one writer serves the whole node, so its transactions are kept short.
        wires = [e if isinstance(e, bytes) else encode_stamped(e, now) for e in prepared.entries]
        prepared.forms = self.authority.store.compression.encode_many(wires)
        audit = batch_audit(actor, prepared.texts, prepared.prefixes, "created v1 (batch)", self._clock())
        # Signed before the transaction too, as if every item were new (the usual batch).
        leaves = self.attester.leaves(prepared.keys, [1] * len(wires), wires) if self.attester else []
        signed = self._signed_batch(prepared.prefixes, leaves)

        async def work(tx: Transaction) -> _Prepared:
            wanted = Counter(prepared.prefixes)
            room = {prefix: await self._room(tx, prefix, len(prepared.keys)) for prefix in wanted}
            fits = all(room[prefix] >= count for prefix, count in wanted.items())
            if fits and await tx.insert_new(prepared.keys, prepared.forms, wanted, signed):
                for position in prepared.positions:  # the usual batch: every item is new and fits
                    results[position] = CREATED
                await tx.audit_batch(audit)
                return prepared
            chosen = self._fresh(prepared, await tx.get_many(prepared.keys), room, results, actor)
            fresh = prepared.only(chosen)
            if chosen:
                # The trees signed before held items that are not created: sign those that are.
                trees = self._signed_batch(fresh.prefixes, [leaves[i] for i in chosen]) if leaves else []
                await tx.insert_columns(fresh.keys, fresh.forms, Counter(fresh.prefixes), trees)
                await tx.audit_batch(audit.only(chosen))
            return fresh

        def then(fresh: _Prepared) -> None:
            self._on_change(fresh.keys)
            for prefix, count in Counter(fresh.prefixes).items():
                self._on_created(self._label(prefix), count)

        await self.authority.store.write(work, nonce=nonce_of(actor), then=then)
        return results

    async def batch_create_request(
        self, request: registration_pb2.BatchCreateRequest, actor: Actor | None = None
    ) -> list[BatchItemResult]:
        """``batch_create`` of a BatchCreateRequest's items, a result for each: plain items are
        checked and encoded from the wire by the compiled fast path (``created_records``), the
        rest the Python way with the same outcome; an item whose values do not decode gets its
        error."""
        limits = self.limits
        count = len(request.items)
        limits.check_batch(count)
        now = self.now()
        fast = created_records(
            request.SerializeToString(),
            now,
            limits.max_values,
            limits.max_value_bytes,
            limits.max_type_bytes,
            limits.max_record_bytes,
        )
        if fast is not None and None not in fast:  # the usual bulk load: no item for the Python path
            return await self.batch_create(EncodedBatch(cast(list[tuple[str, int, bytes]], fast)), actor, now)
        prefixes: dict[str, Prefix] = {}
        decoded: list[tuple[str, tuple[Value, ...]] | EncodedCreate | IdisError] = []
        for position, encoded in enumerate(fast or [None] * count):
            if encoded is not None:
                text, cut, record = encoded
                decoded.append(EncodedCreate(grammatical_identifier(text, cut, prefixes), record))
            else:
                decoded.append(_item_values(request.items[position]))
        return await _around_errors(decoded, lambda items: self.batch_create(items, actor, now))

    async def batch_replace_request(
        self, request: registration_pb2.BatchCreateRequest, actor: Actor | None = None
    ) -> list[BatchItemResult]:
        """``batch_replace`` of a BatchReplace call's items, a result for each; an item whose
        values do not decode gets its error."""
        self.limits.check_batch(len(request.items))
        decoded = [_item_values(item) for item in request.items]
        return await _around_errors(decoded, lambda items: self.batch_replace(items, actor))

    async def batch_replace(
        self, items: Sequence[tuple[str, Sequence[Value]]], actor: Actor | None = None
    ) -> list[BatchItemResult]:
        """Replaces the values of many identifiers in one transaction, each item as ``replace``
        would (rights, template, limits) with its own result: a refused item changes nothing, the
        others are stored together or, if the transaction fails, not at all. A retry stores the
        same values again (a version more each)."""
        self.limits.check_batch(len(items))
        now = int(self._clock())
        results = [BatchItemResult()] * len(items)
        planned: list[tuple[int, Identifier, tuple[Value, ...]]] = []
        await self.authority.sync()
        for position, (text, values) in enumerate(items):
            try:
                identifier = parse_identifier(text)
                _unchanging(identifier)
                self.authority.hosted_for_write(identifier)
                checked = check_values(values, self.limits)
                if not checked:
                    raise InvalidValue(f"identifier {identifier} needs at least one value (use Delete to remove it)")
                planned.append((position, identifier, checked))
            except IdisError as error:
                results[position] = BatchItemResult(error=error)
        sealed = await self.sealer.sealed([checked for _, _, checked in planned])
        fetched = (
            await self.templates.prefetch([(i, fields_of(v)) for (_, i, _), v in zip(planned, sealed, strict=True)])
            if self.templates is not None
            else {}
        )

        async def work(tx: Transaction) -> list[str]:
            changed: list[str] = []
            for (position, identifier, _), values in zip(planned, sealed, strict=True):

                def change(
                    old: Record, values: tuple[Value, ...] = values
                ) -> tuple[tuple[Value, ...], AdminPermission, str]:
                    return _replacement(old, values, now)

                try:
                    record = await self._change_in(tx, identifier, 0, actor, REPLACE_RIGHTS, change, fetched)
                except IdisError as error:
                    results[position] = BatchItemResult(error=error)
                    continue
                results[position] = BatchItemResult(version=record.version)
                changed.append(identifier.key)
            return changed

        await self.authority.store.write(work, nonce=nonce_of(actor), then=self._on_change)
        return results

    async def batch_delete(self, texts: Sequence[str], actor: Actor | None = None) -> list[BatchItemResult]:
        """Deletes many identifiers in one transaction, each with its own result (``version``:
        the one deleted); one that is not there is NOT_FOUND and changes nothing."""
        self.limits.check_batch(len(texts))
        results = [BatchItemResult()] * len(texts)
        planned: list[tuple[int, Identifier]] = []
        await self.authority.sync()
        for position, text in enumerate(texts):
            try:
                identifier = parse_identifier(text)
                _unchanging(identifier)
                self.authority.hosted_for_write(identifier)
                planned.append((position, identifier))
            except IdisError as error:
                results[position] = BatchItemResult(error=error)

        async def work(tx: Transaction) -> list[str]:
            deleted: list[str] = []
            for position, identifier in planned:
                try:
                    version = await self._delete_in(tx, identifier, 0, actor)
                except IdisError as error:
                    results[position] = BatchItemResult(error=error)
                    continue
                results[position] = BatchItemResult(version=version)
                deleted.append(identifier.key)
            return deleted

        await self.authority.store.write(work, nonce=nonce_of(actor), then=self._on_change)
        return results

    def _fresh(
        self,
        prepared: _Prepared,
        stored: dict[str, RecordRow],
        room: dict[str, int],
        results: list[BatchItemResult],
        actor: Actor | None,
    ) -> list[int]:
        """Which prepared items to create (by their place in ``prepared``), item by item: an item
        already stored is an idempotent retry or ALREADY_EXISTS, an item past its prefix's quota
        is refused; every result is set in ``results``."""
        fresh: list[int] = []
        for i, (key, prefix, position, entry) in enumerate(
            zip(prepared.keys, prepared.prefixes, prepared.positions, prepared.entries, strict=True)
        ):
            row = stored.get(key)
            if row is None:
                if room[prefix] <= 0:
                    results[position] = BatchItemResult(error=self._quota_error(prepared.identifier(i)))
                    continue
                room[prefix] -= 1
                fresh.append(i)
                results[position] = CREATED
                continue
            try:
                record = decode_record(entry) if isinstance(entry, bytes) else entry
                same = self._idempotent(record, decode_record(row.record), actor)
                results[position] = BatchItemResult(version=same.record.version, created=False)
            except IdisError as error:
                results[position] = BatchItemResult(error=error)
        return fresh


@dataclass(slots=True)
class _Prepared:
    """A batch's accepted items as columns, in the batch's order: where each was in the batch,
    its key, its prefix's key, the identifier as given, and its record (values still to seal and
    encode, or already encoded at version 1)."""

    positions: list[int]
    keys: list[str]
    prefixes: list[str]
    texts: list[str]
    entries: list[Record | bytes]
    forms: list[bytes] = field(default_factory=list)
    """The records' stored forms (stamped, sealed, compressed), once made."""

    def add(self, position: int, identifier: Identifier, entry: Record | bytes) -> None:
        self.positions.append(position)
        self.keys.append(identifier.key)
        self.prefixes.append(identifier.prefix.key)
        self.texts.append(str(identifier))
        self.entries.append(entry)

    def only(self, chosen: Sequence[int]) -> _Prepared:
        """The items at the places ``chosen``."""
        return _Prepared(
            [self.positions[i] for i in chosen],
            [self.keys[i] for i in chosen],
            [self.prefixes[i] for i in chosen],
            [self.texts[i] for i in chosen],
            [self.entries[i] for i in chosen],
            [self.forms[i] for i in chosen] if self.forms else [],
        )

    def identifier(self, i: int) -> Identifier:
        text = self.texts[i]
        return grammatical_identifier(text, text.index("/"), {})


class _BatchDecisions:
    """What a batch decides once per prefix rather than once per item: that the prefix is
    hosted here, and whether the caller holds the rights a new identifier needs under it (a new
    identifier's rights come from its prefix alone)."""

    def __init__(self) -> None:
        self._hosted: set[str] = set()
        self._allowed: dict[tuple[str, AdminPermission], IdisError | None] = {}

    def hosted(self, authority: Authority, identifier: Identifier) -> None:
        """Raises unless the identifier's prefix is hosted here (each refusal names its item)."""
        if identifier.prefix.key not in self._hosted:
            authority.hosted_for_write(identifier)
            self._hosted.add(identifier.prefix.key)

    def allowed(self, registry: Registry, actor: Actor | None, identifier: Identifier, needed: AdminPermission) -> None:
        decided = (identifier.prefix.key, needed)
        if decided not in self._allowed:
            try:
                registry._require(actor, needed, identifier)
                self._allowed[decided] = None
            except IdisError as denied:
                self._allowed[decided] = denied
        verdict = self._allowed[decided]
        if verdict is not None:
            raise verdict  # it names the prefix, the same for every item under it


NAMES_A_TEMPLATE = b"\x12\x08" + REFERENCE_TYPE.encode()
"""A value of type TEMPLATE in a record's wire form (field 2 of ``idis.v1.Value``, 8 bytes)."""


def _unchanging(identifier: Identifier) -> None:
    """A published template version is never changed nor deleted: registrations name it."""
    if is_template_identifier(identifier):
        raise FailedPrecondition(f"{identifier} is a published template version: publish a new version instead")
