"""Records and their typed values (the Handle data model, RFC 3651).

A record is the list of values stored for one identifier. Each value has an index unique in the
record, a type (``URL``, ``EMAIL``, ``HS_ADMIN``, an industry metadata field...), opaque data,
a TTL that tells caches how long they may keep it, the time it last changed, permission bits,
and references to values of other identifiers.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from resolver.errors import InvalidArgument, InvalidIdentifier, InvalidValue, LimitExceeded
from resolver.identifier import Identifier, parse_identifier

DEFAULT_TTL = 86400
"""Seconds; the Handle default for a value's TTL."""

MAX_INDEX = 2**32 - 1

MAX_REFERENCE_BYTES = 2048
"""The longest identifier a value may refer to (a Handle's length limit)."""


class Permission(enum.IntFlag):
    """Per-value permission bits (RFC 3651 §3.1)."""

    PUBLIC_WRITE = 0x1
    PUBLIC_READ = 0x2
    ADMIN_WRITE = 0x4
    ADMIN_READ = 0x8


DEFAULT_PERMISSIONS = Permission.ADMIN_READ | Permission.ADMIN_WRITE | Permission.PUBLIC_READ


class TtlType(enum.IntEnum):
    RELATIVE = 0
    ABSOLUTE = 1


@dataclass(frozen=True, slots=True)
class Reference:
    identifier: str
    index: int


@dataclass(frozen=True, slots=True)
class Value:
    index: int
    type: str
    data: bytes
    ttl: int = DEFAULT_TTL
    ttl_type: TtlType = TtlType.RELATIVE
    timestamp: int = 0
    """Epoch seconds of the last change, set by the node that stores the value."""
    permissions: Permission = DEFAULT_PERMISSIONS
    references: tuple[Reference, ...] = ()

    @property
    def publicly_readable(self) -> bool:
        return bool(self.permissions & Permission.PUBLIC_READ)

    def same_content(self, other: Value) -> bool:
        """Equal in everything a registrant sets (the timestamp is the node's)."""
        return replace(self, timestamp=0) == replace(other, timestamp=0)

    def text(self) -> str:
        """The data as text when it is UTF-8, else as hex."""
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            return "0x" + self.data.hex()


@dataclass(frozen=True, slots=True)
class Record:
    identifier: Identifier
    values: tuple[Value, ...]
    version: int = 0

    def value(self, index: int) -> Value | None:
        for v in self.values:
            if v.index == index:
                return v
        return None

    def values_of_type(self, type_: str) -> list[Value]:
        return [v for v in self.values if v.type == type_]

    def cache_ttl(self, now: int) -> int:
        """Seconds a resolver may cache the record: the smallest TTL among its values."""
        ttls = [(v.ttl if v.ttl_type is TtlType.RELATIVE else max(0, v.ttl - now)) for v in self.values]
        return min(ttls) if ttls else DEFAULT_TTL

    def same_content(self, other: Record) -> bool:
        """Same identifier and same values, whatever the version and timestamps."""
        if self.identifier != other.identifier or len(self.values) != len(other.values):
            return False
        mine = sorted(self.values, key=lambda v: v.index)
        theirs = sorted(other.values, key=lambda v: v.index)
        return all(a.same_content(b) for a, b in zip(mine, theirs, strict=True))

    def public_view(self) -> Record:
        """The record as an anonymous reader may see it: publicly readable values only."""
        return replace(self, values=tuple(v for v in self.values if v.publicly_readable))


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits on records, enforced on every write (defaults follow HANDLE.NET's caps)."""

    max_value_bytes: int = 65536
    max_values: int = 2048
    max_type_bytes: int = 128
    max_record_bytes: int = 262144
    max_references: int = 64
    max_batch: int = 2000

    def check_batch(self, size: int) -> None:
        """Raises LimitExceeded for a batch of more than ``max_batch`` items."""
        if size > self.max_batch:
            raise LimitExceeded(f"batch of {size} items; the limit is {self.max_batch}")


def check_indexes(indexes: Iterable[int]) -> tuple[int, ...]:
    """Validates value indexes named by a request (1..2^32-1, each once), raising InvalidValue."""
    indexes = tuple(indexes)
    seen: set[int] = set()
    for index in indexes:
        if not 1 <= index <= MAX_INDEX:
            raise InvalidValue(f"value index {index} is out of range 1..{MAX_INDEX}")
        if index in seen:
            raise InvalidValue(f"value index {index} appears more than once")
        seen.add(index)
    return indexes


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_values(values: Iterable[Value], limits: Limits) -> tuple[Value, ...]:
    """Validates values about to be written, raising InvalidValue/LimitExceeded naming the problem.

    Every value a node stores passes here, on every write path: indexes, types, sizes, and the
    data of the types a node itself reads (``check_data``), so nothing is stored that the node
    could not later read, change or delete. Returns the values sorted by index.
    """
    values = tuple(values)
    if len(values) > limits.max_values:
        raise LimitExceeded(f"{len(values)} values in one record; the limit is {limits.max_values}")
    check_indexes(v.index for v in values)
    total = 0
    for v in values:
        type_bytes = _GOOD_TYPES.get(v.type) or _type_bytes(v)
        if type_bytes > limits.max_type_bytes:
            raise InvalidValue(f"value {v.index} type is {type_bytes} bytes long; the limit is {limits.max_type_bytes}")
        if len(v.data) > limits.max_value_bytes:
            raise InvalidValue(
                f"value {v.index} data is {len(v.data)} bytes long; the limit is {limits.max_value_bytes}"
            )
        if len(v.references) > limits.max_references:
            raise InvalidValue(
                f"value {v.index} has {len(v.references)} references; the limit is {limits.max_references}"
            )
        total += _references_size(v)
        if v.ttl < 0 or v.ttl > MAX_INDEX:
            raise InvalidValue(f"value {v.index} ttl {v.ttl} is out of range")
        if int(v.permissions) & ~0xF:
            raise InvalidValue(f"value {v.index} permissions {v.permissions:#x} has unknown bits")
        check_data(v)
        total += len(v.data) + type_bytes + 32
    if total > limits.max_record_bytes:
        raise LimitExceeded(f"record is about {total} bytes; the limit is {limits.max_record_bytes}")
    return tuple(sorted(values, key=lambda v: v.index))


_GOOD_TYPES: dict[str, int] = {}
"""Value types already found well-formed, and their length in bytes (a few hundred distinct
types cover most registrations: URL, EMAIL...); at most ``_GOOD_TYPES_MAX`` remembered."""
_GOOD_TYPES_MAX = 4096


def _type_bytes(v: Value) -> int:
    """The length of a value's type in bytes, once it is checked (Unicode, not empty, no
    control character); remembered in ``_GOOD_TYPES``."""
    try:
        length = len(v.type.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidValue(f"value {v.index} type is not valid Unicode") from None
    if length == 0:
        raise InvalidValue(f"value {v.index} has an empty type")
    if _CONTROL_CHARACTER.search(v.type) is not None:
        raise InvalidValue(f"value {v.index} type {v.type!r} contains a control character")
    if len(_GOOD_TYPES) < _GOOD_TYPES_MAX:
        _GOOD_TYPES[v.type] = length
    return length


def _references_size(v: Value) -> int:
    """The bytes of a value's references, once each is checked (index range, length, Unicode)."""
    size = 0
    for r in v.references:
        if not 0 <= r.index <= MAX_INDEX:
            raise InvalidValue(f"value {v.index} reference index {r.index} is out of range 0..{MAX_INDEX}")
        try:
            length = len(r.identifier.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidValue(f"value {v.index} reference is not valid Unicode") from None
        if length > MAX_REFERENCE_BYTES:
            raise InvalidValue(f"value {v.index} reference is {length} bytes; the limit is {MAX_REFERENCE_BYTES}")
        size += length + 8
    return size


def check_data(value: Value) -> None:
    """Raises InvalidValue unless the data of a value the node interprets is well-formed: an
    HS_ADMIN value must hold a grant (``grant_of``, also what CreatePrefix reads its
    administrators with), an HS_PUBKEY value an Ed25519 key. Other types are opaque."""
    if value.type == ADMIN_TYPE:
        grant_of(value)
    elif value.type == PUBKEY_TYPE:
        from resolver.signing import parse_public_key  # here: resolver.signing imports this module

        try:
            parse_public_key(value.data)
        except InvalidArgument as exc:
            raise InvalidValue(f"value {value.index}: {exc}") from exc


# --- HS_ADMIN: who may administer an identifier or a prefix ------------------------------------

ADMIN_TYPE = "HS_ADMIN"

PUBKEY_TYPE = "HS_PUBKEY"
"""An administrator's public key (``resolver.signing`` reads and writes its data)."""

SECKEY_TYPE = "HS_SECKEY"
"""An administrator's secret key (HTTP Basic on the REST API); nodes store it sealed, never serve it."""

DEFAULT_SECRET_INDEX = 301
"""Where an administrator's HS_SECKEY is put by default (its HS_PUBKEY is at 300)."""

CREDENTIAL_TYPES = frozenset({PUBKEY_TYPE, SECKEY_TYPE, "HS_CERT", "HS_SIGNATURE"})
"""Value types that let whoever controls them prove to be the identifier: every credential type."""

ADMIN_DATA_TYPES = frozenset({ADMIN_TYPE}) | CREDENTIAL_TYPES
"""Administrative data: who may administer (HS_ADMIN) and how an administrator is recognised (the
credentials). Adding, changing or removing such a value, or creating or deleting an identifier
that carries one, needs ADD_ADMIN, MODIFY_ADMIN or REMOVE_ADMIN besides the value rights."""


def is_admin_data(value: Value) -> bool:
    return value.type in ADMIN_DATA_TYPES


class AdminPermission(enum.IntFlag):
    """HS_ADMIN permission bits (the Handle System's)."""

    ADD_HANDLE = 0x1
    DELETE_HANDLE = 0x2
    ADD_NA = 0x4
    DELETE_NA = 0x8
    MODIFY_VALUE = 0x10
    REMOVE_VALUE = 0x20
    ADD_VALUE = 0x40
    MODIFY_ADMIN = 0x80
    REMOVE_ADMIN = 0x100
    ADD_ADMIN = 0x200
    READ_VALUE = 0x400
    LIST_HDLS = 0x800


ALL_ADMIN_PERMISSIONS = AdminPermission(0xFFF)


@dataclass(frozen=True, slots=True)
class AdminGrant:
    """One HS_ADMIN value: ``admin`` (its HS_PUBKEY at ``index``; 0 = any) holds ``permissions``."""

    admin: str
    index: int
    permissions: AdminPermission

    def allows(self, identity_key: str, key_index: int, needed: AdminPermission) -> bool:
        return (
            parse_identifier(self.admin).key == identity_key
            and self.index in (0, key_index)
            and (self.permissions & needed) == needed
        )


def admin_value(index: int, admin: str, admin_index: int, permissions: AdminPermission) -> Value:
    """An HS_ADMIN value. Its data is JSON: {"admin": ..., "index": ..., "permissions": ...}."""
    data = json.dumps({"admin": admin, "index": admin_index, "permissions": int(permissions)}).encode()
    return Value(index, ADMIN_TYPE, data)


def grant_of(value: Value) -> AdminGrant:
    """The grant an HS_ADMIN value holds; raises InvalidValue when it is malformed."""
    try:
        obj = json.loads(value.data)
        grant = AdminGrant(str(obj["admin"]), int(obj["index"]), AdminPermission(int(obj["permissions"]) & 0xFFF))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidValue(
            f'value {value.index}: HS_ADMIN data must be JSON {{"admin": ..., "index": ..., "permissions": ...}}'
        ) from exc
    if not 0 <= grant.index <= MAX_INDEX:
        raise InvalidValue(f"value {value.index}: HS_ADMIN index {grant.index} is out of range 0..{MAX_INDEX}")
    try:
        parse_identifier(grant.admin)
    except InvalidIdentifier as exc:
        raise InvalidValue(f"value {value.index}: HS_ADMIN admin {grant.admin!r}: {exc}") from exc
    return grant


def grants_of(values: Iterable[Value], *, skip_malformed: bool = False) -> list[AdminGrant]:
    """The grants of the HS_ADMIN values among ``values``. A malformed one raises InvalidValue, or
    with ``skip_malformed`` grants nothing (for stored records: one written before its data was
    checked must not make the record impossible to repair or delete)."""
    grants = []
    for v in values:
        if v.type == ADMIN_TYPE:
            try:
                grants.append(grant_of(v))
            except InvalidValue:
                if not skip_malformed:
                    raise
    return grants


def select_values(values: Sequence[Value], indexes: Sequence[int], types: Sequence[str]) -> list[Value]:
    """The values a request's index and type filters select (the REST API's ``index`` and ``type``
    parameters, the Handle protocol's index and type lists): the union of both (HSJ
    ``Util.filterValues``); every value when neither is given. Types match ASCII
    case-insensitively; ``T.`` also matches types starting with ``T.`` and ``T`` itself."""
    if not indexes and not types:
        return list(values)
    wanted_types = [t.lower() for t in types]

    def type_matches(type_: str) -> bool:
        lowered = type_.lower()
        for t in wanted_types:
            if lowered == t or (t.endswith(".") and (lowered.startswith(t) or lowered == t[:-1])):
                return True
        return False

    wanted_indexes = set(indexes)
    return [v for v in values if v.index in wanted_indexes or type_matches(v.type)]
