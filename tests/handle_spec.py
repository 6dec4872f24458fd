"""The Handle binary protocol as ``../shared/HANDLE-INTEROP.md`` part B describes it, written from
that text alone (it imports nothing of ``resolver.handle_protocol`` or ``nodes.handle``), so the
tests can hold our codec and our node to the spec rather than to themselves.

* ``request`` builds a message (envelope B.2, header B.3, body, credential section), by default
  a resolution request (B.6.1) as HSJ sends it (B.8);
* ``decode`` reads a whole message and ``decode_response`` its body by response code (B.6): values
  (B.5) for rc 1, a site (B.7) for rc 1 of GET_SITE_INFO, a referral (B.6.3) for 302/303, an error
  message otherwise, after the request digest when RD is set (B.6.5);
* ``split`` and ``reassemble`` are UDP's 492-byte chunks (B.1);
* ``value``, ``admin_data`` and ``site_data`` encode what the decoders read, for the other way round.

Everything malformed raises ``SpecError``: these decoders are strict on purpose.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

ENVELOPE = struct.Struct(">BBBBIIII")
HEADER = struct.Struct(">IIIHBBII")
CHUNK = 492
MAX_VALUES = 2048

# Envelope byte 2 (B.2) and header op flags (B.4).
CP, EC, TC = 0x80, 0x40, 0x20
AT, CT, ENC, REC, CA, CN, KC, PO, RD, DNRF = (
    0x80000000, 0x40000000, 0x20000000, 0x10000000, 0x08000000, 0x04000000, 0x02000000, 0x01000000, 0x00800000,
    0x00100000,
)  # fmt: skip
HSJ_FLAGS = REC | CA | PO
"""What HSJ sets on a plain resolution (B.8)."""

RESPONSE_CODES = frozenset([1, 2, 3, 4, 5, 6, 7, 100, 101, 102, 200, 201, 202, 300, 301, 302, 303])
RESPONSE_CODES |= frozenset(range(400, 407)) | frozenset(range(500, 506))
"""The table of B.4: an HSJ client throws on any other code."""


class SpecError(ValueError):
    """The bytes are not what part B describes."""


def int4(n: int) -> bytes:
    return (n & 0xFFFFFFFF).to_bytes(4, "big")


def blob(data: bytes) -> bytes:
    return int4(len(data)) + data


# --- building --------------------------------------------------------------------------------


def resolution_body(handle: bytes | str, indexes: tuple[int, ...] = (), types: tuple[bytes, ...] = ()) -> bytes:
    """B.6.1: handle, index list, type list."""
    raw = handle.encode() if isinstance(handle, str) else handle
    return (
        blob(raw)
        + int4(len(indexes))
        + b"".join(int4(i) for i in indexes)
        + int4(len(types))
        + b"".join(blob(t) for t in types)
    )


def request(
    handle: bytes | str = b"",
    *,
    indexes: tuple[int, ...] = (),
    types: tuple[bytes, ...] = (),
    body: bytes | None = None,
    request_id: int = 1,
    session_id: int = 0,
    message_id: int = 0,
    opcode: int = 1,
    rc: int = 0,
    flags: int = HSJ_FLAGS,
    version: tuple[int, int] = (2, 11),
    suggested: tuple[int, int] | None = (2, 11),
    envelope_flags: int = 0,
    serial: int = 0xFFFF,
    recursion: int = 0,
    expiration: int = 1795953600,
    credential: bytes = b"",
) -> bytes:
    """A whole message: envelope, header, body (a resolution body of ``handle`` unless ``body``
    is given) and credential section. ``suggested`` None leaves byte 2's low bits and byte 3 zero
    (suggested = the envelope's version)."""
    if body is None:
        body = resolution_body(handle, indexes, types)
    tail = body + blob(credential)
    major, minor = suggested or (0, 0)
    envelope = ENVELOPE.pack(
        version[0], version[1], (envelope_flags & 0xE0) | (major & 0x03), minor, session_id & 0xFFFFFFFF,
        request_id & 0xFFFFFFFF, message_id, 24 + len(tail),
    )  # fmt: skip
    header = HEADER.pack(opcode, rc, flags, serial, recursion, 0, expiration, len(body))
    return envelope + header + tail


@dataclass(frozen=True)
class Value:
    """One handle value (B.5)."""

    index: int
    type: bytes
    data: bytes
    ttl: int = 86400
    ttl_type: int = 0
    timestamp: int = 0
    permissions: int = 0x0E
    references: tuple[tuple[bytes, int], ...] = ()


def value(v: Value) -> bytes:
    out = struct.pack(">IIBIB", v.index, v.timestamp, v.ttl_type, v.ttl, v.permissions) + blob(v.type) + blob(v.data)
    return out + int4(len(v.references)) + b"".join(blob(h) + int4(i) for h, i in v.references)


def values_section(values: list[Value]) -> bytes:
    return int4(len(values)) + b"".join(value(v) for v in values)


def admin_data(permissions: int, handle: bytes, index: int) -> bytes:
    """HS_ADMIN data (B.5.2)."""
    return struct.pack(">H", permissions) + blob(handle) + int4(index)


@dataclass(frozen=True)
class Interface:
    type: int
    """0 out of service, 1 admin, 2 query, 3 both."""
    protocol: int
    """0 UDP, 1 TCP, 2 HTTP, 3 HTTPS."""
    port: int


@dataclass(frozen=True)
class Server:
    server_id: int
    address: bytes
    """16 bytes: IPv6, or 12 zero bytes and an IPv4 address."""
    public_key: bytes
    interfaces: tuple[Interface, ...]


@dataclass(frozen=True)
class Site:
    """HS_SITE data (B.7)."""

    data_format: int
    version: tuple[int, int]
    serial: int
    primary_mask: int
    hash_option: int
    hash_filter: bytes
    attributes: tuple[tuple[bytes, bytes], ...]
    servers: tuple[Server, ...]


def site_data(site: Site) -> bytes:
    out = struct.pack(">HBBHBB", site.data_format, *site.version, site.serial, site.primary_mask, site.hash_option)
    out += blob(site.hash_filter) + int4(len(site.attributes)) + b"".join(blob(k) + blob(v) for k, v in site.attributes)
    out += int4(len(site.servers))
    for s in site.servers:
        out += int4(s.server_id) + s.address + blob(s.public_key) + int4(len(s.interfaces))
        out += b"".join(struct.pack(">BBI", i.type, i.protocol, i.port) for i in s.interfaces)
    return out


# --- reading ---------------------------------------------------------------------------------


class Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise SpecError(f"{n} bytes wanted at {self.pos}, {len(self.data) - self.pos} left")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def blob(self) -> bytes:
        return self.take(self.u32())

    def count(self, limit: int = MAX_VALUES) -> int:
        n = self.u32()
        if n > limit:
            raise SpecError(f"a count of {n}")
        return n

    def done(self) -> None:
        if self.pos != len(self.data):
            raise SpecError(f"{len(self.data) - self.pos} bytes left over")


@dataclass(frozen=True)
class Message:
    version: tuple[int, int]
    envelope_flags: int
    suggested: tuple[int, int]
    session_id: int
    request_id: int
    message_id: int
    message_length: int
    opcode: int
    rc: int
    flags: int
    serial: int
    recursion: int
    expiration: int
    body: bytes
    credential: bytes
    digested: bytes
    """Header and body: what a request digest is taken over (B.6.5)."""


def decode(data: bytes) -> Message:
    """A whole message: envelope and exactly ``messageLength`` bytes (B.2, B.3)."""
    if len(data) < 20 + 24 + 4:
        raise SpecError(f"{len(data)} bytes cannot hold an envelope, a header and a credential length")
    major, minor, byte2, byte3, session, request_id, message_id, length = ENVELOPE.unpack_from(data)
    if length != len(data) - 20:
        raise SpecError(f"messageLength {length}, but {len(data) - 20} bytes follow the envelope")
    opcode, rc, flags, serial, recursion, reserved, expiration, body_length = HEADER.unpack_from(data, 20)
    if reserved or byte2 & 0x1C:
        raise SpecError("reserved bits set")
    rest = Cursor(data[44:])
    body = rest.take(body_length)
    credential = rest.blob()
    rest.done()
    suggested = (byte2 & 0x03, byte3) if byte2 & 0x03 else (major, minor)
    return Message(
        (major, minor), byte2 & 0xE0, suggested, session, request_id, message_id, length, opcode, rc, flags, serial,
        recursion, expiration, body, credential, data[20 : 44 + body_length],
    )  # fmt: skip


@dataclass(frozen=True)
class ResolutionRequest:
    handle: bytes
    indexes: tuple[int, ...]
    types: tuple[bytes, ...]


def decode_request(body: bytes) -> ResolutionRequest:
    c = Cursor(body)
    handle = c.blob()
    indexes = tuple(c.u32() for _ in range(c.count()))
    types = tuple(c.blob() for _ in range(c.count()))
    c.done()
    return ResolutionRequest(handle, indexes, types)


def read_value(c: Cursor) -> Value:
    index, timestamp, ttl_type, ttl, permissions = struct.unpack(">IIBIB", c.take(14))
    if ttl_type not in (0, 1):
        raise SpecError(f"ttl type {ttl_type}")
    type_, data = c.blob(), c.blob()
    references = tuple((c.blob(), c.u32()) for _ in range(c.count()))
    return Value(index, type_, data, ttl, ttl_type, timestamp, permissions, references)


def read_values(c: Cursor) -> tuple[Value, ...]:
    return tuple(read_value(c) for _ in range(c.count()))


def decode_admin(data: bytes) -> tuple[int, bytes, int]:
    """HS_ADMIN data: (permissions, admin handle, admin index)."""
    c = Cursor(data)
    result = (c.u16(), c.blob(), c.u32())
    c.done()
    return result


def decode_site(data: bytes) -> Site:
    c = Cursor(data)
    head = struct.unpack(">HBBHBB", c.take(8))
    hash_filter = c.blob()
    attributes = tuple((c.blob(), c.blob()) for _ in range(c.count()))
    servers = []
    for _ in range(c.count()):
        server_id, address, key = c.u32(), c.take(16), c.blob()
        interfaces = tuple(Interface(c.u8(), c.u8(), c.u32()) for _ in range(c.count()))
        servers.append(Server(server_id, address, key, interfaces))
    c.done()
    return Site(head[0], (head[1], head[2]), head[3], head[4], head[5], hash_filter, attributes, tuple(servers))


@dataclass(frozen=True)
class Response:
    rc: int
    digest: bytes = b""
    handle: bytes = b""
    """rc 1: the handle as the request wrote it; 302/303: the referral handle."""
    values: tuple[Value, ...] = ()
    site: Site | None = None
    """rc 1 to GET_SITE_INFO."""
    message: bytes = b""


def read_digest(c: Cursor, version: tuple[int, int]) -> bytes:
    """B.6.5, by the response's version."""
    if version < (2, 1):
        return c.take(c.u32())
    code = c.u8()
    size = {3: 32, 2: 20}.get(code)
    if size is None or code != (3 if version >= (2, 7) else 2):
        raise SpecError(f"digest algorithm {code} in a {version} response")
    return bytes([code]) + c.take(size)


def decode_response(message: Message) -> Response:
    """The body of a response by its response code (B.6)."""
    if message.rc not in RESPONSE_CODES:
        raise SpecError(f"response code {message.rc} is not in B.4's table")
    c = Cursor(message.body)
    digest = read_digest(c, message.version) if message.flags & RD else b""
    if message.rc == 1 and message.opcode == 2:
        return Response(1, digest, site=decode_site(message.body[c.pos :]))
    if message.rc == 1:
        handle = c.blob()
        values = read_values(c)
        c.done()
        return Response(1, digest, handle, values)
    if message.rc in (302, 303):
        handle = c.blob()
        values = read_values(c) if c.pos < len(message.body) else ()
        c.done()
        return Response(message.rc, digest, handle, values)
    text = c.blob()
    c.done()
    return Response(message.rc, digest, message=text)


# --- UDP -------------------------------------------------------------------------------------


def split(data: bytes) -> list[bytes]:
    """A message as the datagrams that carry it (B.1)."""
    if len(data) - 20 <= CHUNK:
        return [data]
    out = []
    for k, start in enumerate(range(20, len(data), CHUNK)):
        head = bytearray(data[:20])
        head[2] |= TC
        head[12:16] = int4(k)
        out.append(bytes(head) + data[start : start + CHUNK])
    return out


def reassemble(datagrams: list[bytes]) -> bytes:
    """The message the datagrams of one answer carry, in any order: one datagram as it is, or
    chunks with TC set, chunk k at offset k*492, all with the same requestId and the whole
    message's length (B.1). Raises SpecError when they are not that."""
    if len(datagrams) == 1 and len(datagrams[0]) >= 20 and not datagrams[0][2] & TC:
        return datagrams[0]
    heads = [ENVELOPE.unpack_from(d) for d in datagrams if len(d) >= 20]
    if len(heads) != len(datagrams) or not heads:
        raise SpecError("a datagram shorter than an envelope")
    length, request_id = heads[0][7], heads[0][5]
    expected = -(-length // CHUNK)
    payload = bytearray(length)
    seen = set()
    for d, (*_, request, k, total) in zip(datagrams, heads, strict=True):
        if not d[2] & TC or request != request_id or total != length or not 0 <= k < expected or k in seen:
            raise SpecError(f"chunk {k} does not belong (TC, requestId, length or number)")
        if len(d) - 20 != min(CHUNK, length - k * CHUNK):
            raise SpecError(f"chunk {k} holds {len(d) - 20} bytes")
        seen.add(k)
        payload[k * CHUNK : k * CHUNK + len(d) - 20] = d[20:]
    if len(seen) != expected:
        raise SpecError(f"{len(seen)} of {expected} chunks")
    head = bytearray(datagrams[0][:20])
    head[2] &= ~TC & 0xFF
    head[12:16] = bytes(4)
    return bytes(head) + bytes(payload)


def complete(datagrams: list[bytes]) -> bool:
    """True when ``datagrams`` (of one requestId) hold a whole answer."""
    first = datagrams[0]
    if len(first) < 20 or not first[2] & TC:
        return True
    return len({d[12:16] for d in datagrams}) >= -(-int.from_bytes(first[16:20], "big") // CHUNK)


@dataclass
class Answer:
    """A decoded answer: the message and its body."""

    raw: bytes
    message: Message = field(init=False)
    response: Response = field(init=False)

    def __post_init__(self) -> None:
        self.message = decode(self.raw)
        self.response = decode_response(self.message)


def masked(data: bytes) -> bytes:
    """A response with its expiration time (header offset 16) zeroed, for comparing answers made
    at different seconds."""
    return data[:36] + bytes(4) + data[40:]
