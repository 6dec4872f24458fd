"""What a node answers on the Handle protocol (HANDLE-INTEROP.md B.9), with no socket in sight:
request bytes in, response bytes out, from the same ``Authority`` the gRPC and HTTP transports
use.

* ``88.100.1/SN-1``, prefix hosted here: rc 1 with the values an anonymous reader may see (index
  and type filters as in HSJ), 100 when there is no such identifier, 200 when nothing is left to
  show; prefix delegated or outside the authority: 301 "That prefix doesn't live here" (HSJ
  clients look up ``0.NA/<prefix>`` first, and this node does not resolve on a client's behalf
  over this protocol).
* ``0.NA/88.100`` (or slashless ``88.100``): a prefix hosted here or delegated from here answers
  1 with an HS_SITE value (this node's own interfaces, or the delegated site's) and the prefix's
  HS_ADMIN values; a prefix below one delegated from here answers 303 with the delegated site as
  HS_SITE.PREFIX (301 with DNRF or for clients older than 2.5); unallocated: 100.
* GET_SITE_INFO: this node's site; other opcodes: 5; a malformed message: 4 (in kind when the
  header could be read, else a bare error), never silence.

A plain request's record is read in its stored wire form and its answer built from those bytes
in C (``handle_values``), no Record decoded, unless only the Python path may build it (HS_ADMIN
values, absolute TTLs...). Answers that depend on nothing but the identifier (no filters) are
cached in the Handle answer cache (``LookupCache.handle_answer``): the values section of rc 1,
or rc 100/200 with their body; every write invalidates them (``nodes.coherence``), and an answer computed while an
invalidation happened is not cached. Private values are never in an answer: a request without
the public-only flag gets the public values too (HSJ would challenge for the others; B.9 allows
this deviation), so the cached bytes serve both.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

from nodes.authority import Authority, PrefixEntry, PrefixKind
from nodes.trust.permissions import readable_part
from resolver.cache import LookupCache, handle_values
from resolver.errors import InvalidIdentifier, NotAuthoritative, NotFound
from resolver.handle_protocol import (
    ENVELOPE_SIZE,
    HEADER_SIZE,
    MAX_MESSAGE,
    NA_PREFIX,
    PROTOCOL_HTTPS,
    PROTOCOL_TCP,
    PROTOCOL_UDP,
    RC,
    SITE_PREFIX_TYPE,
    SITE_TYPE,
    Flag,
    HandleSite,
    Interface,
    Message,
    Op,
    ProtocolError,
    ResolutionRequest,
    SiteServer,
    bare_error,
    blob,
    decode_message,
    decode_resolution_request,
    encode_site,
    error_body,
    int4,
    respond,
    values_section,
)
from resolver.identifier import MAX_IDENTIFIER_BYTES, Identifier, parse_identifier, parse_prefix
from resolver.record import DEFAULT_TTL, Permission, TtlType, Value, admin_value, select_values
from resolver.site import Referral, Site

log = logging.getLogger("idis.handle")

NOT_HERE = "That prefix doesn't live here"
SITE_PERMISSIONS = Permission.ADMIN_READ | Permission.ADMIN_WRITE | Permission.PUBLIC_READ
ADMIN_INDEX = 100
"""Index of a prefix's first HS_ADMIN value in a ``0.NA/`` answer (HS_SITE is at 1)."""


def handle_site(site: Site, serial: int = 1) -> HandleSite:
    """A delegated site in Handle's form: each server with an IP address and a Handle port, its
    UDP and TCP query interfaces (and HTTPS when it has one). A server known only by host name
    or without a Handle port cannot be reached by Handle clients and is left out."""
    servers: list[SiteServer] = []
    for server in site.servers:
        try:
            ipaddress.ip_address(server.host)
        except ValueError:
            continue
        if not server.handle_port:
            continue
        interfaces = [Interface(2, PROTOCOL_UDP, server.handle_port), Interface(2, PROTOCOL_TCP, server.handle_port)]
        if server.https_port:
            interfaces.append(Interface(2, PROTOCOL_HTTPS, server.https_port))
        servers.append(SiteServer(server.server_id or len(servers) + 1, server.host, tuple(interfaces)))
    return HandleSite(tuple(servers), serial)


LARGEST_CACHED_SECTION = MAX_MESSAGE - (ENVELOPE_SIZE + HEADER_SIZE + 4 + MAX_IDENTIFIER_BYTES + 4)
"""A values section any answer built on it fits a message with (the cache answers without
checking sizes); a larger one is answered (rc 2, too large) but not cached."""


def _cache_section(cache: LookupCache, key: bytes, section: bytes, ttl: int, generation: int) -> None:
    if len(section) <= LARGEST_CACHED_SECTION:
        cache.set(key, section, ttl, if_generation=generation)


@dataclass(frozen=True, slots=True)
class Prefetched:
    """Stored records read for a batch of requests (``Authority.stored_records``), and the cache
    generation read before they were: answers built from them are cached only if no
    invalidation happened since."""

    records: dict[str, bytes | None]
    generation: int


def _plain_key(request: Message) -> str | None:
    """The key of the identifier a plain resolution request asks for (no filters, not a prefix
    handle), else None."""
    try:
        if request.header.opcode != Op.RESOLUTION:
            return None
        query = decode_resolution_request(request.body)
        if query.indexes or query.types:
            return None
        text = query.handle.decode("utf-8")
        if "/" not in text or text[: len(NA_PREFIX)].upper() == NA_PREFIX:
            return None
        return parse_identifier(text).key
    except (ProtocolError, UnicodeDecodeError, InvalidIdentifier):
        return None


def request_id_of(data: bytes) -> int:
    """The request id of a message too malformed to decode, if it has one (else 0)."""
    return int.from_bytes(data[8:12], "big", signed=True) if len(data) >= 12 else 0


class HandleAnswers:
    """The Handle protocol's answers of one node process."""

    def __init__(
        self,
        authority: Authority,
        own_site: Callable[[], HandleSite],
        clock: Callable[[], float],
        cache: LookupCache | None = None,
        cache_max_ttl: int = 3600,
        serial: int = 1,
    ) -> None:
        self.authority = authority
        self.own_site = own_site
        self.clock = clock
        self.cache = cache
        self.cache_max_ttl = cache_max_ttl
        self.serial = serial

    async def respond_many(self, messages: list[bytes], max_size: int = MAX_MESSAGE) -> list[bytes | None]:
        """``respond`` to each of several requests (a batch of UDP misses), each decoded once,
        the records of the plain ones read from the store in one query first."""
        decoded = [self._decode(message) for message in messages]
        keys = [key for d in decoded if isinstance(d, Message) and (key := _plain_key(d)) is not None]
        prefetched = None
        if keys and self.cache is not None:
            generation = self.cache.generation  # before the store is read: see _identifier
            prefetched = Prefetched(await self.authority.stored_records(keys), generation)
        return [await self._respond(d, max_size, prefetched) if isinstance(d, Message) else d for d in decoded]

    async def respond(self, data: bytes, max_size: int = MAX_MESSAGE) -> bytes | None:
        """The response (envelope and message) to one whole request message; None for a
        message that is itself a response (never answered). An answer longer than
        ``max_size`` bytes is replaced by rc 2 naming the size (over UDP: ask over TCP)."""
        decoded = self._decode(data)
        return await self._respond(decoded, max_size, None) if isinstance(decoded, Message) else decoded

    def _decode(self, data: bytes) -> Message | bytes | None:
        """The request in ``data``; else the answer it gets already: rc 4 when it is malformed,
        None when it is a response."""
        try:
            request = decode_message(data)
        except ProtocolError as error:
            return bare_error(request_id_of(data), RC.PROTOCOL_ERROR, str(error), self.serial, int(self.clock()))
        return request if request.header.rc == 0 else None

    async def _respond(self, request: Message, max_size: int, prefetched: Prefetched | None) -> bytes:
        now = int(self.clock())
        try:
            rc, body = await self._answer(request, prefetched)
        except ProtocolError as error:  # malformed: rc 4 with opcode 0, as HSJ answers (B.1)
            return bare_error(request.envelope.request_id, RC.PROTOCOL_ERROR, str(error), self.serial, now)
        except Exception:  # the store failing, a bug: rc 2 for this request, the others go on
            log.exception("Handle: answering request %d failed", request.envelope.request_id)
            rc, body = RC.ERROR, error_body("internal error; try again later")
        response = respond(request, rc, body, self.serial, now)
        if len(response) > max_size:
            message = f"the answer is {len(response)} bytes; at most {max_size} fit one answer here"
            if max_size < MAX_MESSAGE:
                message += " over UDP: ask over TCP"
            response = respond(request, RC.ERROR, error_body(message), self.serial, now)
        return response

    async def _answer(self, request: Message, prefetched: Prefetched | None = None) -> tuple[int, bytes]:
        if request.envelope.suggested < (2, 1):
            return RC.PROTOCOL_ERROR, error_body("protocol versions before 2.1 are not served here")
        if request.header.flags & Flag.ENC:
            return RC.SESSION_FAILED, error_body("encrypted answers need a session; none is offered here")
        if request.header.opcode == 0:
            raise ProtocolError("opcode 0 is no operation")
        if request.header.opcode == Op.RESOLUTION:
            return await self._resolution(request, decode_resolution_request(request.body), prefetched)
        if request.header.opcode == Op.GET_SITE_INFO:
            return RC.SUCCESS, encode_site(self.own_site())
        return RC.OPERATION_NOT_SUPPORTED, error_body(
            f"operation {request.header.opcode} is not served here: only resolution (1) and site info (2)"
        )

    async def _resolution(
        self, request: Message, query: ResolutionRequest, prefetched: Prefetched | None = None
    ) -> tuple[int, bytes]:
        try:
            text = query.handle.decode("utf-8")
        except UnicodeDecodeError:
            return RC.INVALID_HANDLE, error_body("the handle is not valid UTF-8")
        if "/" not in text:
            return await self._prefix_handle(request, query, text)
        if text[: len(NA_PREFIX)].upper() == NA_PREFIX:
            return await self._prefix_handle(request, query, text[len(NA_PREFIX) :])
        try:
            identifier = parse_identifier(text)
        except InvalidIdentifier as error:
            return RC.INVALID_HANDLE, error_body(str(error))
        return await self._identifier(query, identifier, prefetched)

    def _cacheable(self, query: ResolutionRequest) -> LookupCache | None:
        return self.cache if not query.indexes and not query.types else None

    async def _identifier(
        self, query: ResolutionRequest, identifier: Identifier, prefetched: Prefetched | None = None
    ) -> tuple[int, bytes]:
        cache = self._cacheable(query)
        generation = cache.generation if cache is not None else 0  # before the store is read
        key = identifier.key.encode()
        if cache is not None:  # a plain request: answered from the stored bytes when it can be
            if prefetched is not None and identifier.key in prefetched.records:
                stored, generation = prefetched.records, prefetched.generation
            else:
                stored = await self.authority.stored_records([identifier.key])
            if identifier.key in stored:
                record = stored[identifier.key]
                if record is None:
                    return self._not_found(cache, key, self.authority.negative_ttl, generation)
                section = handle_values(record)
                if section is not None:
                    _cache_section(cache, key, section, self.cache_max_ttl, generation)
                    return RC.SUCCESS, blob(query.handle) + section
        try:
            answer = await self.authority.answer(identifier)
        except NotFound as error:
            return self._not_found(cache, key, error.negative_ttl, generation)
        except NotAuthoritative:
            return RC.SERVER_NOT_RESP, error_body(NOT_HERE)
        if isinstance(answer, Referral):
            return RC.SERVER_NOT_RESP, error_body(NOT_HERE)
        public = readable_part(answer, None, self.authority.permissions).values
        if cache is not None and all(v.ttl_type is TtlType.RELATIVE for v in answer.values):
            self._cache_values(cache, key, list(public), self.cache_max_ttl, generation)
        return self._values_answer(query, list(public))

    def _not_found(
        self, cache: LookupCache | None, key: bytes, negative_ttl: int, generation: int
    ) -> tuple[int, bytes]:
        body = error_body("")  # HSJ's 100 has an empty message
        if cache is not None:
            ttl = min(negative_ttl, self.cache_max_ttl)
            cache.set(key, int4(RC.HANDLE_NOT_FOUND) + body, ttl, True, if_generation=generation)
        return RC.HANDLE_NOT_FOUND, body

    @staticmethod
    def _values_answer(query: ResolutionRequest, values: list[Value]) -> tuple[int, bytes]:
        chosen = select_values(values, query.indexes, [t.decode("utf-8", "replace") for t in query.types])
        if not chosen:
            return RC.VALUES_NOT_FOUND, error_body("")
        return RC.SUCCESS, blob(query.handle) + values_section(chosen)

    @staticmethod
    def _cache_values(cache: LookupCache, key: bytes, values: list[Value], ttl: int, generation: int) -> None:
        if values:
            _cache_section(cache, key, values_section(values), ttl, generation)
        else:
            cache.set(key, int4(RC.VALUES_NOT_FOUND) + error_body(""), ttl, True, if_generation=generation)

    async def _prefix_handle(self, request: Message, query: ResolutionRequest, text: str) -> tuple[int, bytes]:
        """``0.NA/<prefix>``: where the prefix is served (B.9)."""
        try:
            prefix = parse_prefix(text)
        except InvalidIdentifier as error:
            return RC.INVALID_HANDLE, error_body(str(error))
        cache = self._cacheable(query)
        generation = cache.generation if cache is not None else 0
        await self.authority.sync()
        entry = self.authority.closest_entry(prefix)
        key = (NA_PREFIX + prefix.key).encode()
        if entry is None:
            return RC.SERVER_NOT_RESP, error_body(NOT_HERE)
        if entry.prefix != prefix:
            if entry.kind is PrefixKind.HOSTED:  # under a prefix hosted here, never allocated
                body = error_body("")
                if cache is not None:
                    ttl = min(self.authority.negative_ttl, self.cache_max_ttl)
                    cache.set(key, int4(RC.HANDLE_NOT_FOUND) + body, ttl, True, if_generation=generation)
                return RC.HANDLE_NOT_FOUND, body
            if request.header.flags & Flag.DNRF or request.envelope.suggested < (2, 5):
                return RC.SERVER_NOT_RESP, error_body(NOT_HERE)
            return RC.PREFIX_REFERRAL, blob(b"") + values_section([self._site_value(entry, SITE_PREFIX_TYPE)])
        values = [self._site_value(entry, SITE_TYPE)] + [
            admin_value(ADMIN_INDEX + n, grant.admin, grant.index, grant.permissions)
            for n, grant in enumerate(entry.admins)
        ]
        if cache is not None:
            self._cache_values(cache, key, values, min(entry.ttl or DEFAULT_TTL, self.cache_max_ttl), generation)
        return self._values_answer(query, values)

    def _site_value(self, entry: PrefixEntry, type_: str) -> Value:
        if entry.kind is PrefixKind.HOSTED or entry.site is None:
            site = self.own_site()
            ttl = DEFAULT_TTL
        else:
            site = handle_site(entry.site)
            ttl = entry.ttl or DEFAULT_TTL
        return Value(1, type_, encode_site(site), ttl, permissions=SITE_PERMISSIONS)


def own_handle_site(host: str, handle_port: int, https_port: int, serial: int, description: str) -> HandleSite:
    """This node's site: one server at ``host`` (an IP address) with its Handle interfaces (UDP
    and TCP) and, when it serves one, its HTTPS interface."""
    interfaces = [Interface(2, PROTOCOL_UDP, handle_port), Interface(2, PROTOCOL_TCP, handle_port)]
    if https_port:
        interfaces.append(Interface(2, PROTOCOL_HTTPS, https_port))
    return HandleSite((SiteServer(1, host, tuple(interfaces)),), serial, attributes=(("desc", description),))
