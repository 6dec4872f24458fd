"""Conversion between domain objects and the ``idis.v1`` wire messages.

The only module of the resolver layer that touches generated protobuf code; everything else
works with ``Record``, ``Value``, ``Referral`` and friends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError
from idis.v1 import (
    prefix_pb2,
    prefix_pb2_grpc,
    record_pb2,
    registration_pb2,
    registration_pb2_grpc,
    resolution_pb2,
    resolution_pb2_grpc,
)

from resolver.errors import IdisError, InvalidArgument, InvalidValue
from resolver.identifier import Identifier, parse_identifier, parse_prefix
from resolver.record import (
    DEFAULT_PERMISSIONS,
    DEFAULT_TTL,
    Permission,
    Record,
    Reference,
    TtlType,
    Value,
)
from resolver.site import Referral, Server, Site, parse_address
from resolver.status import error_from_item, status_code_of

if TYPE_CHECKING:
    from resolver.attestation import Proof

__all__ = [
    "prefix_pb2",
    "prefix_pb2_grpc",
    "record_pb2",
    "registration_pb2",
    "registration_pb2_grpc",
    "resolution_pb2",
    "resolution_pb2_grpc",
]


def value_to_pb(value: Value) -> record_pb2.Value:
    # Fields at their zero value are left out, as protobuf would leave them out of the wire
    # form anyway: the same bytes, at a third of the cost (this runs once per value written).
    msg = record_pb2.Value(
        index=value.index,
        type=value.type,
        data=value.data,
        ttl=value.ttl,
        timestamp=value.timestamp,
        permissions=int(value.permissions),
    )
    if value.ttl_type:
        msg.ttl_type = int(value.ttl_type)  # type: ignore[assignment]
    if value.references:
        msg.references.extend(record_pb2.Reference(identifier=r.identifier, index=r.index) for r in value.references)
    return msg


# Enum members by number, looked up rather than constructed (once per value read or written).
_PERMISSIONS = tuple(Permission(bits) for bits in range(16))
_TTL_TYPES = (TtlType(0), TtlType(1))


def value_from_pb(msg: record_pb2.Value, *, for_write: bool = False) -> Value:
    """A value from the wire; on writes, zero TTL and permissions mean the defaults."""
    ttl_type, permissions = msg.ttl_type, msg.permissions
    if ttl_type not in (0, 1):
        raise InvalidValue(f"value {msg.index} has unknown ttl_type {ttl_type}")
    if permissions & ~0xF:
        raise InvalidValue(f"value {msg.index} permissions {permissions:#x} has unknown bits")
    ttl = msg.ttl
    if for_write:
        ttl = ttl or DEFAULT_TTL
        bits = _PERMISSIONS[permissions] if permissions else DEFAULT_PERMISSIONS
    else:
        bits = _PERMISSIONS[permissions]
    references = msg.references
    # Positional, and no generator for the usual empty references: this runs once per value
    # of every write and of every record read (about half the cost of the keyword form).
    return Value(
        msg.index,
        msg.type,
        msg.data,
        ttl,
        _TTL_TYPES[ttl_type],
        0 if for_write else msg.timestamp,
        bits,
        tuple(Reference(r.identifier, r.index) for r in references) if references else (),
    )


def values_from_pb(msgs: object, *, for_write: bool = False) -> tuple[Value, ...]:
    return tuple(value_from_pb(m, for_write=for_write) for m in msgs)  # type: ignore[attr-defined]


def record_to_pb(record: Record) -> record_pb2.Record:
    return record_pb2.Record(
        identifier=record.identifier.display,
        values=[value_to_pb(v) for v in record.values],
        version=record.version,
    )


def record_from_pb(msg: record_pb2.Record) -> Record:
    return Record(parse_identifier(msg.identifier), values_from_pb(msg.values), msg.version)


def encode_record(record: Record) -> bytes:
    """The record in its wire form (also how nodes store it, so a hit needs no re-encoding)."""
    return record_to_pb(record).SerializeToString()


def encode_stamped(record: Record, timestamp: int) -> bytes:
    """``encode_record`` of the record with every value's timestamp set to ``timestamp``: the
    same bytes, without making the stamped values first (a batch create writes thousands)."""
    msg = record_to_pb(record)
    for value in msg.values:
        value.timestamp = timestamp
    return msg.SerializeToString()


def decode_record(data: bytes, identifier: Identifier | None = None) -> Record:
    msg = record_pb2.Record.FromString(data)
    record = record_from_pb(msg)
    return record if identifier is None else Record(identifier, record.values, record.version)


def site_to_pb(site: Site) -> record_pb2.Site:
    return record_pb2.Site(
        servers=[
            record_pb2.Server(
                address=s.address, server_id=s.server_id, handle_port=s.handle_port, https_port=s.https_port
            )
            for s in site.servers
        ]
    )


def site_from_pb(msg: record_pb2.Site) -> Site:
    if not msg.servers:
        raise InvalidArgument("site has no servers")
    return Site(
        tuple(
            Server(parse_address(s.address), s.server_id, _port(s.handle_port), _port(s.https_port))
            for s in msg.servers
        )
    )


def _port(port: int) -> int:
    if port > 65535:
        raise InvalidArgument(f"port {port} is out of range 1..65535")
    return port


def encode_site(site: Site) -> bytes:
    return site_to_pb(site).SerializeToString()


def decode_site(data: bytes) -> Site:
    return site_from_pb(record_pb2.Site.FromString(data))


def referral_to_pb(referral: Referral) -> record_pb2.Referral:
    return record_pb2.Referral(
        prefix=referral.prefix.display,
        site=site_to_pb(referral.site),
        ttl=referral.ttl,
        delegations=referral.delegations,
    )


def referral_from_pb(msg: record_pb2.Referral) -> Referral:
    return Referral(parse_prefix(msg.prefix), site_from_pb(msg.site), msg.ttl, tuple(msg.delegations))


# --- proofs (verifiable resolution) -------------------------------------------------------------


def proof_to_pb(proof: Proof) -> resolution_pb2.Proof:
    return resolution_pb2.Proof(
        attestation=proof.attestation,
        index=proof.index,
        path=proof.path,
        delegations=proof.delegations,
        private_digest=proof.private or b"",
        salt=proof.salt,
    )


def proof_field(proof: Proof) -> bytes:
    """``proof`` as ResolveResponse's field 4, to append to a serialised ResolveResponse (which
    ends with its fields 1-3): the bytes the message with the proof set serialises to."""
    return _proof_field(proof_to_pb(proof))


def proof_field_of(response: bytes) -> bytes:
    """The proof of a serialised ResolveResponse as ``proof_field`` gives it, to append to
    another answer (a recursive node relaying it); b"" when it has none."""
    message = resolution_pb2.ResolveResponse.FromString(response)
    return _proof_field(message.proof) if message.HasField("proof") else b""


def _proof_field(proof: resolution_pb2.Proof) -> bytes:
    data = proof.SerializeToString()
    return b"\x22" + varint(len(data)) + data  # field 4, length-delimited


def proof_from_pb(msg: resolution_pb2.Proof) -> Proof:
    from resolver.attestation import Proof  # resolver.attestation builds on this module

    return Proof(
        msg.attestation,
        msg.index,
        list(msg.path),
        list(msg.delegations),
        msg.private_digest if msg.private_digest else None,
        msg.salt,
    )


def denial_bytes(statement: str, delegations: Iterable[str]) -> bytes:
    """A serialised ``idis.v1.Denial`` (what a NOT_FOUND's trailer and batch item carry)."""
    return resolution_pb2.Denial(statement=statement, delegations=delegations).SerializeToString()


def denial_from_bytes(data: bytes) -> tuple[str, list[str]]:
    """(statement, delegations) of a serialised Denial; InvalidArgument when malformed."""
    try:
        msg = resolution_pb2.Denial.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(f"a denial is malformed: {exc}") from exc
    return msg.statement, list(msg.delegations)


# --- answers in their cached (serialised) form ------------------------------------------------


def item_status(error: IdisError | None) -> record_pb2.ItemStatus:
    """The per-item status of a batch answer (code 0 for success)."""
    if error is None:
        return record_pb2.ItemStatus(code=0)
    code = status_code_of(error).value[0]
    if not error.violations:  # the bytes every item status had (the compiled paths write them too)
        return record_pb2.ItemStatus(code=code, message=str(error))
    faults = [record_pb2.FieldFault(field=f"{error.field}[{f}]", description=d) for f, d in error.violations]
    return record_pb2.ItemStatus(code=code, message=str(error), reason=error.reason, faults=faults)


def item_error(status: record_pb2.ItemStatus) -> IdisError | None:
    """The error a batch item's status tells (None for success), as precise as the node said."""
    if not status.code:
        return None
    error = error_from_item(status.code, status.message, status.reason)
    if status.faults:
        error.violations = tuple(
            (f.field.removeprefix(f"{error.field}[").removesuffix("]"), f.description) for f in status.faults
        )
    return error


def batch_create_response(
    outcomes: Iterable[tuple[IdisError | None, int, bool]],
) -> registration_pb2.BatchCreateResponse:
    """The answer to a BatchCreate from each item's (error, version, created), in order. Made
    from the items' wire forms, the usual one (created at version 1) a constant: a message
    object per item cost 4 us, more than the node's whole fast path spends on the item."""
    parts = []
    for error, version, created in outcomes:
        if error is None and version == 1 and created:
            parts.append(_CREATED_ITEM)
        else:
            item = registration_pb2.BatchCreateItem(status=item_status(error), version=version, created=created)
            data = item.SerializeToString()
            parts.append(b"\x0a" + varint(len(data)) + data)
    return registration_pb2.BatchCreateResponse.FromString(b"".join(parts))


def not_found_item(message: str, negative_ttl: int, denial: bytes = b"") -> bytes:
    """The serialised ResolveBatchItem of a NOT_FOUND answer: how negative answers are cached
    (``denial``: a serialised Denial, from a node that signs)."""
    status = record_pb2.ItemStatus(code=5, message=message)
    item = resolution_pb2.ResolveBatchItem(status=status, negative_ttl=negative_ttl)
    if denial:
        item.denial.ParseFromString(denial)
    return item.SerializeToString()


def not_found_from_item(data: bytes) -> tuple[str, int, bytes]:
    """(message, negative TTL, serialised denial or b"") of a cached NOT_FOUND answer."""
    item = resolution_pb2.ResolveBatchItem.FromString(data)
    denial = item.denial.SerializeToString() if item.HasField("denial") else b""
    return item.status.message, item.negative_ttl, denial


def decode_answer(data: bytes) -> Record | Referral:
    """The record or referral in a serialised ResolveResponse."""
    response = resolution_pb2.ResolveResponse.FromString(data)
    if response.HasField("referral"):
        return referral_from_pb(response.referral)
    if response.HasField("record"):
        return record_from_pb(response.record)
    raise InvalidArgument("the answer holds neither a record nor a referral")


def frame_batch_item(item: bytes) -> bytes:
    """``item`` as one occurrence of ResolveBatchResponse.items (field 1), for joining with the
    fragments the fast path produced."""
    return b"\x0a" + varint(len(item)) + item


def varint(value: int) -> bytes:
    """The protobuf base-128 varint encoding of a non-negative integer."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_CREATED_ITEM = (
    b"\x0a\x06"
    + registration_pb2.BatchCreateItem(status=item_status(None), version=1, created=True).SerializeToString()
)
"""A BatchCreateResponse's ``items`` field holding a new identifier's item (6 bytes)."""


def decode_request(decode: Callable[[bytes], Any], data: bytes, what: str) -> Any:
    """``decode(data)``; a malformed message is InvalidArgument naming ``what`` was expected."""
    try:
        return decode(data)
    except DecodeError as exc:
        raise InvalidArgument(f"request is not a valid {what}: {exc}") from exc
