"""The Handle System's binary protocol, resolution only: RFC 3652 as HANDLE.NET 9 speaks it
(protocol 2.11), both ways (``../shared/HANDLE-INTEROP.md`` part B).

A message on the wire is a 20-byte envelope, a 24-byte header, a body and a credential section
(``int4`` length, empty for anonymous resolution). Integers are big-endian; a *blob* is an
``int4`` length and that many bytes. Over TCP one request and one answer are exchanged per
connection; over UDP a message longer than 492 bytes travels as 492-byte chunks, each with its
own envelope (TC set, ``message_id`` = chunk number, ``message_length`` = the whole message's).

Everything a peer sends is bounded before it is trusted: message length, array counts and blob
lengths are checked against what is left of the message and against HSJ's limits, and a
violation raises ``ProtocolError`` (answered with rc 4), never an IndexError or a huge
allocation. The node (``nodes/handle``) and the client (``resolver/handle_client.py``) share
this module; the compiled fast path (``LookupCache.handle_answer``) writes the same bytes.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from resolver.record import (
    ADMIN_TYPE,
    AdminGrant,
    AdminPermission,
    Permission,
    Reference,
    TtlType,
    Value,
    admin_value,
    grant_of,
)

PORT = 2641
"""IANA ``hdl-srv``, TCP and UDP."""

VERSION = (2, 11)
"""The protocol version this implementation speaks (HSJ 9's)."""

ENVELOPE = struct.Struct(">BBBBiiii")
HEADER = struct.Struct(">iiIHBBIi")
ENVELOPE_SIZE = ENVELOPE.size  # 20
HEADER_SIZE = HEADER.size  # 24
MAX_MESSAGE = 262144
MIN_MESSAGE = HEADER_SIZE + 4
UDP_CHUNK = 492
"""Data bytes of one UDP datagram of a multi-datagram message (HSJ computes offsets from it)."""
MAX_HANDLE = 2048
MAX_VALUES = 2048
MAX_ARRAY = 1_048_576
EXPIRATION = 43200
"""Seconds added to now for a message's expiration time, as HSJ does."""


class Op(enum.IntEnum):
    RESOLUTION = 1
    GET_SITE_INFO = 2


class RC(enum.IntEnum):
    """Response codes (HSJ's ``AbstractMessage.RC_*``)."""

    SUCCESS = 1
    ERROR = 2
    SERVER_TOO_BUSY = 3
    PROTOCOL_ERROR = 4
    OPERATION_NOT_SUPPORTED = 5
    RECURSION_COUNT_TOO_HIGH = 6
    SERVER_BACKUP = 7
    HANDLE_NOT_FOUND = 100
    HANDLE_ALREADY_EXISTS = 101
    INVALID_HANDLE = 102
    VALUES_NOT_FOUND = 200
    VALUE_ALREADY_EXISTS = 201
    INVALID_VALUE = 202
    OUT_OF_DATE_SITE_INFO = 300
    SERVER_NOT_RESP = 301
    SERVICE_REFERRAL = 302
    PREFIX_REFERRAL = 303
    INVALID_ADMIN = 400
    INSUFFICIENT_PERMISSIONS = 401
    AUTHENTICATION_NEEDED = 402
    AUTHENTICATION_FAILED = 403
    INVALID_CREDENTIAL = 404
    AUTHEN_TIMEOUT = 405
    AUTHEN_ERROR = 406
    SESSION_TIMEOUT = 500
    SESSION_FAILED = 501
    INVALID_SESSION_KEY = 502
    NEED_TO_REAUTHENTICATE = 503
    INVALID_SESSION_SETUP_REQUEST = 504
    SESSION_MESSAGE_REJECTED = 505


KNOWN_RCS = frozenset(int(rc) for rc in RC)


class Flag(enum.IntFlag):
    """Header op flags (B.4)."""

    AT = 0x80000000  # authoritative
    CT = 0x40000000  # certify (sign the response)
    ENC = 0x20000000  # encrypt
    REC = 0x10000000  # recursion allowed
    CA = 0x08000000  # cache certify
    CN = 0x04000000  # continuous (streamed lists)
    KC = 0x02000000  # keep connection
    PO = 0x01000000  # public only
    RD = 0x00800000  # return request digest
    OVRW = 0x00400000
    MINT = 0x00200000
    DNRF = 0x00100000  # do not refer


ECHOED = Flag.AT | Flag.CT | Flag.ENC | Flag.CA | Flag.PO | Flag.RD | Flag.DNRF
"""The request flags a response carries back (HSJ ``takeValuesFrom``)."""

# Envelope flag bits (byte 2); its low 2 bits are the suggested major version.
CP = 0x80
EC = 0x40
TC = 0x20

# HS_SITE interface types and protocols (B.7).
INTERFACE_ADMIN = 1
INTERFACE_QUERY = 2
INTERFACE_BOTH = 3
PROTOCOL_UDP = 0
PROTOCOL_TCP = 1
PROTOCOL_HTTP = 2
PROTOCOL_HTTPS = 3

SITE_TYPE = "HS_SITE"
SITE_PREFIX_TYPE = "HS_SITE.PREFIX"
NA_PREFIX = "0.NA/"
"""Prefix handles: ``0.NA/88.100`` is the handle of prefix ``88.100``."""


class ProtocolError(Exception):
    """A malformed message: answered with rc 4 PROTOCOL_ERROR and this message."""


# --- reading -------------------------------------------------------------------------------


class Reader:
    """A bounds-checked cursor over a message's bytes."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def _take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.end:
            raise ProtocolError(f"message ends inside {what}")
        self.pos = start + n
        return start

    def int4(self, what: str = "an int4") -> int:
        start = self._take(4, what)
        return int.from_bytes(self.data[start : start + 4], "big", signed=True)

    def int2(self, what: str = "an int2") -> int:
        start = self._take(2, what)
        return int.from_bytes(self.data[start : start + 2], "big")

    def byte(self, what: str = "a byte") -> int:
        start = self._take(1, what)
        return self.data[start]

    def raw(self, n: int, what: str) -> bytes:
        start = self._take(n, what)
        return self.data[start : start + n]

    def blob(self, what: str, limit: int = MAX_MESSAGE) -> bytes:
        n = self.int4(f"the length of {what}")
        if n < 0 or n > limit:
            raise ProtocolError(f"{what} is {n} bytes long; at most {limit}")
        return self.raw(n, what)

    def count(self, what: str, limit: int = MAX_ARRAY) -> int:
        n = self.int4(f"the count of {what}")
        if n < 0 or n > limit:
            raise ProtocolError(f"{n} {what}; at most {limit}")
        return n

    @property
    def remaining(self) -> int:
        return self.end - self.pos


def blob(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def int4(n: int) -> bytes:
    return n.to_bytes(4, "big", signed=n < 0)


# --- envelope and header ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    major: int
    minor: int
    flags: int
    """CP, EC, TC (the high 3 bits of byte 2)."""
    suggested: tuple[int, int]
    session_id: int
    request_id: int
    message_id: int
    message_length: int

    @property
    def version(self) -> tuple[int, int]:
        return (self.major, self.minor)

    def encode(self) -> bytes:
        major, minor = self.suggested
        return ENVELOPE.pack(
            self.major,
            self.minor,
            (self.flags & 0xE0) | (major & 0x03),
            minor,
            self.session_id,
            self.request_id,
            self.message_id,
            self.message_length,
        )


def decode_envelope(data: bytes) -> Envelope:
    if len(data) < ENVELOPE_SIZE:
        raise ProtocolError(f"Expecting {ENVELOPE_SIZE} bytes, only received {len(data)}")
    major, minor, flags, suggested_minor, session, request, message, length = ENVELOPE.unpack_from(data)
    suggested_major = flags & 0x03
    suggested = (suggested_major, suggested_minor) if suggested_major else (major, minor)
    return Envelope(major, minor, flags & 0xE0, suggested, session, request, message, length)


def check_length(envelope: Envelope) -> None:
    if not MIN_MESSAGE <= envelope.message_length <= MAX_MESSAGE:
        raise ProtocolError(f"message length {envelope.message_length} is outside {MIN_MESSAGE}..{MAX_MESSAGE}")


@dataclass(frozen=True, slots=True)
class Header:
    opcode: int
    rc: int
    flags: int
    site_serial: int
    recursion: int
    expiration: int
    body_length: int

    def encode(self) -> bytes:
        return HEADER.pack(
            self.opcode, self.rc, self.flags & 0xFFFFFFFF, self.site_serial & 0xFFFF, self.recursion & 0xFF, 0,
            self.expiration & 0xFFFFFFFF, self.body_length,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message: envelope, header, body and credential section."""

    envelope: Envelope
    header: Header
    body: bytes
    credential: bytes
    signed_part: bytes
    """Header and body as encoded: what a request digest is taken over."""


def decode_message(data: bytes) -> Message:
    """A whole message (envelope + ``message_length`` bytes); raises ProtocolError."""
    envelope = decode_envelope(data)
    check_length(envelope)
    if len(data) - ENVELOPE_SIZE != envelope.message_length:
        raise ProtocolError(
            f"Expecting {envelope.message_length} bytes, only received {len(data) - ENVELOPE_SIZE}"
            if len(data) - ENVELOPE_SIZE < envelope.message_length
            else f"{len(data) - ENVELOPE_SIZE - envelope.message_length} bytes follow the message"
        )
    if envelope.flags & (CP | EC):
        raise ProtocolError("compressed or encrypted messages need a session; none is offered here")
    opcode, rc, flags, serial, recursion, _, expiration, body_length = HEADER.unpack_from(data, ENVELOPE_SIZE)
    header = Header(opcode, rc, flags, serial, recursion, expiration, body_length)
    body_start = ENVELOPE_SIZE + HEADER_SIZE
    if body_length < 0 or body_start + body_length + 4 > len(data):
        raise ProtocolError(f"body length {body_length} does not fit the message")
    body_end = body_start + body_length
    reader = Reader(data, body_end)
    credential = reader.blob("the credential section")
    if reader.remaining:
        raise ProtocolError(f"{reader.remaining} bytes follow the credential section")
    return Message(envelope, header, data[body_start:body_end], credential, data[ENVELOPE_SIZE:body_end])


def encode_message(envelope: Envelope, header: Header, body: bytes, credential: bytes = b"") -> bytes:
    """Envelope + header + body + credential section; ``message_length`` and ``body_length``
    are set from the parts."""
    length = HEADER_SIZE + len(body) + 4 + len(credential)
    env = Envelope(
        envelope.major, envelope.minor, envelope.flags & ~TC, envelope.suggested, envelope.session_id,
        envelope.request_id, 0, length,
    )  # fmt: skip
    head = Header(
        header.opcode, header.rc, header.flags, header.site_serial, header.recursion, header.expiration, len(body)
    )
    return env.encode() + head.encode() + body + blob(credential)


# --- UDP: one message in several datagrams ----------------------------------------------------


def datagrams(message: bytes) -> list[bytes]:
    """A whole message (envelope + message) as the datagrams that carry it over UDP: itself when
    the message fits one (at most 492 bytes after the envelope), else 492-byte chunks, each
    with the envelope's TC flag set and its chunk number as ``message_id`` (B.1)."""
    payload = memoryview(message)[ENVELOPE_SIZE:]
    if len(payload) <= UDP_CHUNK:
        return [message]
    head = bytearray(message[:ENVELOPE_SIZE])
    head[2] |= TC
    out = []
    for number, start in enumerate(range(0, len(payload), UDP_CHUNK)):
        head[12:16] = number.to_bytes(4, "big")
        out.append(bytes(head) + payload[start : start + UDP_CHUNK])
    return out


class Reassembly:
    """Puts a message sent in several datagrams back together (chunk k at offset k*492)."""

    def __init__(self, envelope: Envelope) -> None:
        check_length(envelope)
        self.request_id = envelope.request_id
        self.length = envelope.message_length
        self.chunks: dict[int, bytes] = {}
        self.expected = -(-self.length // UDP_CHUNK)
        self.head = envelope

    def add(self, datagram: bytes) -> bytes | None:
        """Takes one datagram of this message; the whole message once every chunk is in."""
        envelope = decode_envelope(datagram)
        number = envelope.message_id
        if envelope.request_id != self.request_id or envelope.message_length != self.length:
            raise ProtocolError("a datagram of another message")
        if not 0 <= number < self.expected:
            raise ProtocolError(f"chunk {number} of a message of {self.expected} chunks")
        chunk = datagram[ENVELOPE_SIZE:]
        last = number == self.expected - 1
        wanted = self.length - UDP_CHUNK * number if last else UDP_CHUNK
        if len(chunk) != wanted:
            raise ProtocolError(f"chunk {number} holds {len(chunk)} bytes; expected {wanted}")
        self.chunks[number] = chunk
        if len(self.chunks) < self.expected:
            return None
        head = bytearray(datagram[:ENVELOPE_SIZE])
        head[2] &= ~TC & 0xFF
        head[12:16] = b"\0\0\0\0"
        return bytes(head) + b"".join(self.chunks[k] for k in range(self.expected))


# --- values ----------------------------------------------------------------------------------


def encode_admin(grant: AdminGrant) -> bytes:
    """HS_ADMIN data as Handle encodes it: int2 permissions, admin handle blob, int4 index."""
    return (int(grant.permissions) & 0xFFFF).to_bytes(2, "big") + blob(grant.admin.encode()) + int4(grant.index)


def decode_admin(data: bytes) -> AdminGrant:
    """HS_ADMIN data in Handle's encoding (or its legacy int4-permissions variant)."""
    reader = Reader(data)
    if len(data) >= 4 and len(data) == 2 + 4 + int.from_bytes(data[4:8], "big") + 4 + 2:
        permissions = reader.int4("admin permissions")  # legacyByteLength: int4 permissions
    else:
        permissions = reader.int2("admin permissions")
    admin = reader.blob("the admin handle", MAX_HANDLE).decode("utf-8", "replace")
    index = reader.int4("the admin index")
    return AdminGrant(admin, index, AdminPermission(permissions & 0xFFF))


def value_data(value: Value) -> bytes:
    """A value's data as Handle clients expect it: HS_ADMIN in Handle's binary form (the node
    keeps its own JSON grant, converted at the edge), everything else as stored."""
    if value.type == ADMIN_TYPE:
        try:
            return encode_admin(grant_of(value))
        except ValueError:
            return value.data  # a malformed stored grant is shown as it is
    return value.data


def encode_value(value: Value) -> bytes:
    """One value (B.5)."""
    parts = [
        struct.pack(
            ">IIBIB",
            value.index & 0xFFFFFFFF,
            value.timestamp & 0xFFFFFFFF,
            int(value.ttl_type),
            value.ttl & 0xFFFFFFFF,
            int(value.permissions),
        ),
        blob(value.type.encode()),
        blob(value_data(value)),
        int4(len(value.references)),
    ]
    parts += [blob(r.identifier.encode()) + int4(r.index) for r in value.references]
    return b"".join(parts)


def values_section(values: Iterable[Value]) -> bytes:
    """``int4`` count, then the values: the tail of a resolution body."""
    encoded = [encode_value(v) for v in values]
    return int4(len(encoded)) + b"".join(encoded)


def decode_value(reader: Reader) -> Value:
    index = reader.int4("a value index") & 0xFFFFFFFF
    timestamp = reader.int4("a value timestamp") & 0xFFFFFFFF
    ttl_type = reader.byte("a TTL type")
    ttl = reader.int4("a TTL") & 0xFFFFFFFF
    permissions = reader.byte("value permissions")
    type_ = reader.blob("a value type", MAX_HANDLE).decode("utf-8", "replace")
    data = reader.blob("value data")
    references = tuple(
        Reference(reader.blob("a reference", MAX_HANDLE).decode("utf-8", "replace"), reader.int4("a reference index"))
        for _ in range(reader.count("references", MAX_VALUES))
    )
    if ttl_type not in (0, 1):
        raise ProtocolError(f"TTL type {ttl_type} is neither 0 (relative) nor 1 (absolute)")
    value = Value(index, type_, data, ttl, TtlType(ttl_type), timestamp, Permission(permissions & 0xF), references)
    if type_ == ADMIN_TYPE:
        try:
            grant = decode_admin(data)
        except (ProtocolError, ValueError):
            return value
        converted = admin_value(index, grant.admin, grant.index, grant.permissions)
        return Value(index, type_, converted.data, ttl, TtlType(ttl_type), timestamp, value.permissions, references)
    return value


def decode_values(reader: Reader) -> list[Value]:
    return [decode_value(reader) for _ in range(reader.count("values", MAX_VALUES))]


# --- HS_SITE ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interface:
    type: int
    """INTERFACE_QUERY, _ADMIN or _BOTH."""
    protocol: int
    """PROTOCOL_UDP, _TCP, _HTTP or _HTTPS."""
    port: int


@dataclass(frozen=True, slots=True)
class SiteServer:
    server_id: int
    address: str
    """An IPv4 or IPv6 address."""
    interfaces: tuple[Interface, ...]
    public_key: bytes = b""

    def port(self, protocol: int) -> int | None:
        for i in self.interfaces:
            if i.protocol == protocol and i.type in (INTERFACE_QUERY, INTERFACE_BOTH):
                return i.port
        return None


@dataclass(frozen=True, slots=True)
class HandleSite:
    """An HS_SITE value's data (B.7)."""

    servers: tuple[SiteServer, ...]
    serial: int = 1
    version: tuple[int, int] = VERSION
    primary: bool = True
    hash_option: int = 0
    attributes: tuple[tuple[str, str], ...] = field(default=())

    def server_for(self, handle: str) -> list[SiteServer]:
        """The servers in the order to try them for ``handle``: the one Handle's hash picks
        first (B.7: MD5 of the upper-cased part ``hash_option`` names, last 4 bytes signed,
        absolute value modulo the count), then the others."""
        if not self.servers:
            return []
        prefix, _, suffix = handle.partition("/")
        if prefix.upper() == "0.NA" and suffix:
            prefix = suffix
        part = {0: prefix, 1: suffix}.get(self.hash_option, handle)
        digest = hashlib.md5(part.upper().encode("utf-8")).digest()
        first = abs(int.from_bytes(digest[-4:], "big", signed=True)) % len(self.servers)
        return list(self.servers[first:] + self.servers[:first])


def _address_bytes(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return bytes(12) + ip.packed  # HSJ left-pads IPv4 with zeros
    return ip.packed


def _address_text(data: bytes) -> str:
    if data[:12] == bytes(12):
        return str(ipaddress.IPv4Address(data[12:]))
    mapped = ipaddress.IPv6Address(data)
    return str(mapped.ipv4_mapped) if mapped.ipv4_mapped is not None else str(mapped)


def encode_site(site: HandleSite) -> bytes:
    out = [
        struct.pack(">HBBHBB", 1, site.version[0], site.version[1], site.serial & 0xFFFF, 0x80 if site.primary else 0,
                    site.hash_option),
        blob(b""),
        int4(len(site.attributes)),
    ]  # fmt: skip
    out += [blob(k.encode()) + blob(v.encode()) for k, v in site.attributes]
    out.append(int4(len(site.servers)))
    for server in site.servers:
        out += [int4(server.server_id), _address_bytes(server.address), blob(server.public_key)]
        out.append(int4(len(server.interfaces)))
        out += [bytes((i.type, i.protocol)) + int4(i.port) for i in server.interfaces]
    return b"".join(out)


def decode_site(data: bytes) -> HandleSite:
    reader = Reader(data)
    reader.int2("the site data format")
    version = (reader.byte("the site's major version"), reader.byte("the site's minor version"))
    serial = reader.int2("the site serial")
    primary = bool(reader.byte("the primary mask") & 0x80)
    hash_option = reader.byte("the hash option")
    reader.blob("the hash filter", MAX_HANDLE)
    attributes = tuple(
        (reader.blob("an attribute name", MAX_HANDLE).decode("utf-8", "replace"),
         reader.blob("an attribute value").decode("utf-8", "replace"))
        for _ in range(reader.count("site attributes", MAX_VALUES))
    )  # fmt: skip
    servers = []
    for _ in range(reader.count("site servers", MAX_VALUES)):
        server_id = reader.int4("a server id")
        address = _address_text(reader.raw(16, "a server address"))
        public_key = reader.blob("a server key")
        interfaces = tuple(
            Interface(reader.byte("an interface type"), reader.byte("an interface protocol"), reader.int4("a port"))
            for _ in range(reader.count("interfaces", 64))
        )
        servers.append(SiteServer(server_id, address, interfaces, public_key))
    return HandleSite(tuple(servers), serial, version, primary, hash_option, attributes)


# --- bodies ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolutionRequest:
    handle: bytes
    """As sent: UTF-8 (not yet checked)."""
    indexes: tuple[int, ...] = ()
    types: tuple[bytes, ...] = ()


def decode_resolution_request(body: bytes) -> ResolutionRequest:
    reader = Reader(body)
    handle = reader.blob("the handle", MAX_HANDLE)
    indexes = tuple(reader.int4("an index") for _ in range(reader.count("indexes", MAX_VALUES)))
    types = tuple(reader.blob("a type", MAX_HANDLE) for _ in range(reader.count("types", MAX_VALUES)))
    if reader.remaining:
        raise ProtocolError(f"{reader.remaining} bytes follow the resolution request")
    return ResolutionRequest(handle, indexes, types)


def encode_resolution_request(request: ResolutionRequest) -> bytes:
    return (
        blob(request.handle)
        + int4(len(request.indexes))
        + b"".join(int4(i) for i in request.indexes)
        + int4(len(request.types))
        + b"".join(blob(t) for t in request.types)
    )


def error_body(message: str) -> bytes:
    return blob(message.encode("utf-8"))


def request_digest(request: Message) -> bytes:
    """The digest a response carries when the request set RD (B.6.5): SHA-256 for >= 2.7,
    SHA-1 for 2.1-2.6, the old int4-length MD5 below."""
    version = request.envelope.suggested
    if version >= (2, 7):
        return b"\x03" + hashlib.sha256(request.signed_part).digest()
    if version >= (2, 1):
        return b"\x02" + hashlib.sha1(request.signed_part).digest()
    return int4(16) + hashlib.md5(request.signed_part).digest()


def response_version(request: Envelope) -> tuple[int, int]:
    """min(the request's suggested version, ours)."""
    return min(request.suggested, VERSION)


def respond(request: Message, rc: int, body: bytes, site_serial: int, now: int, authoritative: bool = True) -> bytes:
    """The response to ``request`` (envelope + message): versions, ids, flags and recursion
    count as B.9 says, the request digest first in the body when RD was asked."""
    major, minor = response_version(request.envelope)
    flags = (request.header.flags & ECHOED) | Flag.REC | (Flag.AT if authoritative else 0)
    if request.header.flags & Flag.RD:
        body = request_digest(request) + body
    envelope = Envelope(major, minor, 0, VERSION, request.envelope.session_id, request.envelope.request_id, 0, 0)
    header = Header(request.header.opcode, rc, int(flags), site_serial, request.header.recursion, now + EXPIRATION, 0)
    return encode_message(envelope, header, body)


def bare_error(request_id: int, rc: int, message: str, site_serial: int, now: int) -> bytes:
    """An error for a message too malformed to answer in kind: opcode 0, version 2.11."""
    envelope = Envelope(*VERSION, 0, VERSION, 0, request_id, 0, 0)
    header = Header(0, rc, int(Flag.REC | Flag.AT), site_serial, 0, now + EXPIRATION, 0)
    return encode_message(envelope, header, error_body(message))


def request_message(
    opcode: int,
    body: bytes,
    request_id: int,
    flags: int = int(Flag.REC | Flag.CA | Flag.PO),
    now: int = 0,
    version: tuple[int, int] = VERSION,
    suggested: tuple[int, int] = VERSION,
) -> bytes:
    """A request as HSJ sends it (site serial unknown, no session, no credential): in
    ``version``, suggesting ``suggested`` (a client older than 2.8 suggests its own version)."""
    envelope = Envelope(version[0], version[1], 0, suggested, 0, request_id, 0, 0)
    return encode_message(envelope, Header(opcode, 0, flags, 0xFFFF, 0, now + EXPIRATION, 0), body)


@dataclass(frozen=True, slots=True)
class Response:
    """A decoded response to a resolution or site-info request."""

    rc: int
    flags: int
    site_serial: int
    handle: str = ""
    values: tuple[Value, ...] = ()
    message: str = ""
    digest: bytes = b""


def _digest(reader: Reader, message: Message, request_version: tuple[int, int] | None) -> bytes:
    if not message.header.flags & Flag.RD:
        return b""
    version = request_version or message.envelope.version
    if version >= (2, 1):
        code = reader.byte("the digest algorithm")
        return bytes((code,)) + reader.raw({3: 32, 2: 20, 1: 16}.get(code, 0), "the request digest")
    return reader.raw(reader.int4("the digest length") & 0xFF, "the request digest")


def decode_response(message: Message, request_version: tuple[int, int] | None = None) -> Response:
    """The body of a response, by its response code (B.6)."""
    header = message.header
    if header.rc not in KNOWN_RCS:
        raise ProtocolError(f"unknown response code {header.rc}")
    reader = Reader(message.body)
    digest = _digest(reader, message, request_version)
    if header.rc == RC.SUCCESS and header.opcode == Op.GET_SITE_INFO:
        site = message.body[reader.pos :]
        return Response(header.rc, header.flags, header.site_serial, values=(Value(1, SITE_TYPE, site),), digest=digest)
    if header.rc == RC.SUCCESS:
        handle = reader.blob("the handle", MAX_HANDLE).decode("utf-8", "replace")
        values = tuple(decode_values(reader))
        return Response(header.rc, header.flags, header.site_serial, handle, values, digest=digest)
    if header.rc in (RC.SERVICE_REFERRAL, RC.PREFIX_REFERRAL):
        handle = reader.blob("the referral handle", MAX_HANDLE).decode("utf-8", "replace")
        values = tuple(decode_values(reader)) if reader.remaining else ()
        return Response(header.rc, header.flags, header.site_serial, handle, values, digest=digest)
    text = reader.blob("the error message").decode("utf-8", "replace") if reader.remaining >= 4 else ""
    return Response(header.rc, header.flags, header.site_serial, message=text, digest=digest)


def sites_of(values: Sequence[Value], types: Iterable[str] = (SITE_TYPE, SITE_PREFIX_TYPE)) -> list[HandleSite]:
    """The sites among ``values`` (HS_SITE, HS_SITE.PREFIX), skipping malformed ones."""
    wanted = set(types)
    out = []
    for v in values:
        if v.type in wanted:
            try:
                out.append(decode_site(v.data))
            except (ProtocolError, ValueError):
                continue
    return out
