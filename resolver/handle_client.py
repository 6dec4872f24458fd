"""A Handle-protocol client (``resolver/handle_protocol.py``): one request over UDP or TCP, and a
resolver that walks the hierarchy the Handle way.

To resolve ``88.100.1/SN-1`` the resolver asks the top-level server for the prefix handle
``0.NA/88.100.1``. A server that delegated an ancestor of the prefix answers 303 with the
delegated site (HS_SITE.PREFIX); the server that knows the prefix itself answers 1 with the site
serving it (HS_SITE); that site is then asked for the identifier. Every step is bounded: the
number of hops, the servers asked (a site already asked again is a loop), the time per request,
the size of what a server may send. An answer must be of the kind asked for (a response to this
request id, for the handle sent), or it is refused.

UDP requests are retried on the HSJ schedule (a resend after each timeout, up to ``attempts``);
a multi-datagram answer is reassembled by request id; an answer that does not fit UDP (rc 2)
or does not arrive is asked again over TCP when ``tcp_fallback`` is on, as HSJ clients do.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from resolver.errors import (
    HopLimitExceeded,
    IdisError,
    InternalError,
    InvalidArgument,
    InvalidIdentifier,
    LimitExceeded,
    NotAuthoritative,
    NotFound,
    ReferralLoop,
    ResolutionFailed,
    Timeout,
    Unavailable,
    ValueNotFound,
)
from resolver.handle_protocol import (
    ENVELOPE_SIZE,
    KNOWN_RCS,
    MAX_MESSAGE,
    NA_PREFIX,
    PROTOCOL_TCP,
    PROTOCOL_UDP,
    RC,
    SITE_PREFIX_TYPE,
    SITE_TYPE,
    TC,
    HandleSite,
    Op,
    ProtocolError,
    Reassembly,
    ResolutionRequest,
    Response,
    check_length,
    decode_envelope,
    decode_message,
    decode_response,
    encode_resolution_request,
    request_message,
    sites_of,
)
from resolver.identifier import parse_identifier, parse_prefix
from resolver.record import Record
from resolver.resolver import Trace

PROTOCOLS = ("udp", "tcp")
MAX_HOPS = 10
MAX_SERVERS = 8
"""Servers of one site a resolution tries, at most."""
DEADLINE = 30.0
"""Seconds one resolution may take in all, every hop and retry included."""


def _error_of(response: Response, handle: str) -> IdisError:
    """The domain error of an answer that is not a success."""
    text = response.message or _name(response.rc)
    where = f"{handle}: {text}"
    if response.rc == RC.HANDLE_NOT_FOUND:
        return NotFound(f"{handle} not found")
    if response.rc == RC.VALUES_NOT_FOUND:
        return ValueNotFound(f"{handle}: no value matched")
    if response.rc == RC.INVALID_HANDLE:
        return InvalidIdentifier(where)
    if response.rc == RC.SERVER_NOT_RESP:
        return NotAuthoritative(where)
    if response.rc == RC.SERVER_TOO_BUSY:
        return LimitExceeded(where)
    if response.rc == RC.PROTOCOL_ERROR:
        return InvalidArgument(where)
    return InternalError(f"{handle}: response code {response.rc} {text}")


class HandleClient:
    """Sends one Handle request to one server and returns its decoded answer."""

    def __init__(
        self, protocol: str = "udp", timeout: float = 2.0, attempts: int = 3, tcp_fallback: bool = True
    ) -> None:
        if protocol not in PROTOCOLS:
            raise InvalidArgument(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.protocol = protocol
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.tcp_fallback = tcp_fallback

    async def ask(
        self,
        host: str,
        port: int,
        handle: str,
        indexes: Sequence[int] = (),
        types: Sequence[str] = (),
        opcode: int = Op.RESOLUTION,
    ) -> Response:
        """The answer of ``host:port`` to one request (resolution of ``handle``, or site info)."""
        request_id = secrets.randbelow(2**31 - 1) + 1
        body = (
            encode_resolution_request(
                ResolutionRequest(handle.encode(), tuple(indexes), tuple(t.encode() for t in types))
            )
            if opcode == Op.RESOLUTION
            else b""
        )
        message = request_message(opcode, body, request_id, now=int(time.time()))
        if self.protocol == "udp":
            try:
                data = await self._udp(host, port, message, request_id)
            except Timeout:
                if not self.tcp_fallback:
                    raise
                data = await self._tcp(host, port, message)
            response = self._decode(data, request_id)
            if response.rc == RC.ERROR and self.tcp_fallback:  # e.g. too large for UDP
                response = self._decode(await self._tcp(host, port, message), request_id)
        else:
            response = self._decode(await self._tcp(host, port, message), request_id)
        if opcode == Op.RESOLUTION and response.rc == RC.SUCCESS and response.handle != handle:
            raise ResolutionFailed(f"{host}:{port} answered for {response.handle!r} when asked for {handle!r}")
        return response

    @staticmethod
    def _decode(data: bytes, request_id: int) -> Response:
        try:
            message = decode_message(data)
            if message.envelope.request_id != request_id:
                raise ProtocolError(f"answer to request {message.envelope.request_id}, not {request_id}")
            return decode_response(message)
        except ProtocolError as error:
            raise ResolutionFailed(f"malformed answer: {error}") from None

    async def _udp(self, host: str, port: int, message: bytes, request_id: int) -> bytes:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()

        class Receiver(asyncio.DatagramProtocol):
            reassembly: Reassembly | None = None

            def datagram_received(self, data: bytes, addr: object) -> None:
                if done.done() or len(data) < ENVELOPE_SIZE:
                    return
                try:
                    envelope = decode_envelope(data)
                    if envelope.request_id != request_id:
                        return  # someone else's answer
                    if not envelope.flags & TC:
                        done.set_result(data)
                        return
                    if self.reassembly is None:
                        self.reassembly = Reassembly(envelope)
                    elif envelope.message_length != self.reassembly.length:
                        return  # a chunk of a late answer to an earlier try: not this one
                    whole = self.reassembly.add(data)
                except ProtocolError as error:
                    done.set_exception(ResolutionFailed(f"malformed answer from {host}:{port}: {error}"))
                    return
                if whole is not None:
                    done.set_result(whole)

        transport, _ = await loop.create_datagram_endpoint(Receiver, remote_addr=(host, port))
        try:
            for _attempt in range(self.attempts):
                transport.sendto(message)
                try:
                    return await asyncio.wait_for(asyncio.shield(done), self.timeout)
                except TimeoutError:
                    continue
            raise Timeout(f"no answer from {host}:{port} over UDP after {self.attempts} tries")
        finally:
            transport.close()
            if not done.done():
                done.cancel()

    async def _tcp(self, host: str, port: int, message: bytes) -> bytes:
        try:
            async with asyncio.timeout(self.timeout * self.attempts):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(message)
                    await writer.drain()
                    head = await reader.readexactly(ENVELOPE_SIZE)
                    envelope = decode_envelope(head)
                    check_length(envelope)
                    if envelope.message_length > MAX_MESSAGE:
                        raise ProtocolError("answer too long")
                    return head + await reader.readexactly(envelope.message_length)
                finally:
                    writer.close()
        except TimeoutError:
            raise Timeout(f"no answer from {host}:{port} over TCP in {self.timeout * self.attempts:.1f} s") from None
        except (OSError, asyncio.IncompleteReadError) as error:
            raise Unavailable(f"{host}:{port} over TCP: {error}") from None
        except ProtocolError as error:
            raise ResolutionFailed(f"malformed answer from {host}:{port}: {error}") from None


@dataclass(frozen=True, slots=True)
class Server:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_server(address: str) -> Server:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"server address {address!r} is not host:port with a port in 1..65535")
    return Server(host.strip("[]"), int(port))


class HandleResolver:
    """Resolves handles through the hierarchy over the Handle protocol, from ``roots`` (the
    top-level node's Handle servers, ``host:port``)."""

    def __init__(
        self,
        roots: Sequence[str],
        client: HandleClient | None = None,
        max_hops: int = MAX_HOPS,
        deadline: float = DEADLINE,
    ) -> None:
        self.roots = [parse_server(r) for r in roots]
        if not self.roots:
            raise InvalidArgument("at least one root server is needed")
        self.client = client or HandleClient()
        self.max_hops = max_hops
        self.deadline = deadline

    def _servers(self, site: HandleSite, handle: str) -> list[Server]:
        """The servers of ``site`` to ask about ``handle``, in the order Handle's hash gives, at
        most MAX_SERVERS of them (a hostile site may list thousands), each with a port in
        1..65535 for this client's protocol."""
        protocol = PROTOCOL_UDP if self.client.protocol == "udp" else PROTOCOL_TCP
        out = []
        for server in site.server_for(handle):
            port = server.port(protocol)
            if port is not None and 0 < port < 65536:
                out.append(Server(server.address, port))
            if len(out) == MAX_SERVERS:
                break
        return out

    async def _ask_any(
        self,
        servers: list[Server],
        handle: str,
        trace: Trace | None,
        indexes: Sequence[int] = (),
        types: Sequence[str] = (),
    ) -> tuple[Server, Response]:
        """The first answer of ``servers``, tried in order (the next one when one fails)."""
        failures = []
        for server in servers:
            started = time.perf_counter()
            try:
                response = await self.client.ask(server.host, server.port, handle, indexes, types)
            except (Timeout, Unavailable, ResolutionFailed, OverflowError, ValueError) as error:
                failures.append(f"{server} ({error})")
                if trace is not None:
                    trace.add(str(server), handle, f"{type(error).__name__}: {error}", started)
                continue
            if trace is not None:
                trace.add(str(server), handle, _outcome(response), started)
            return server, response
        raise Unavailable(f"no server answered for {handle}: {'; '.join(failures)}")

    async def site_of(self, prefix: str, trace: Trace | None = None) -> list[Server]:
        """The servers of the site that serves ``prefix``, found from the roots."""
        handle = NA_PREFIX + parse_prefix(prefix).key
        servers = self.roots
        asked: set[Server] = set()
        for _hop in range(self.max_hops):
            fresh = [s for s in servers if s not in asked]
            if not fresh:
                raise ReferralLoop(f"referral loop looking up {handle}: {', '.join(map(str, servers))} asked already")
            server, response = await self._ask_any(fresh, handle, trace)
            asked.add(server)
            if response.rc == RC.SUCCESS:
                sites = sites_of(response.values, (SITE_TYPE,))
                if not sites:
                    raise ResolutionFailed(f"{server} answered {handle} without an HS_SITE value")
                return self._servers(sites[0], handle)
            if response.rc == RC.PREFIX_REFERRAL:
                sites = sites_of(response.values, (SITE_PREFIX_TYPE,))
                if not sites:
                    raise ResolutionFailed(f"{server} referred {handle} without an HS_SITE.PREFIX value")
                servers = self._servers(sites[0], handle)
                if not servers:
                    raise ResolutionFailed(
                        f"{server} referred {handle} to a site with no {self.client.protocol} server"
                    )
                continue
            raise _error_of(response, handle)
        raise HopLimitExceeded(f"more than {self.max_hops} referrals looking up {handle}")

    async def resolve_response(
        self, handle: str, indexes: Sequence[int] = (), types: Sequence[str] = (), trace: Trace | None = None
    ) -> Response:
        """The answer of the server that serves ``handle`` (rc 1), or the domain error of its
        answer. A prefix handle (``0.NA/88.100`` or ``88.100``) is answered by the site that
        knows the prefix. Within ``deadline`` seconds in all, else Timeout."""
        try:
            async with asyncio.timeout(self.deadline):
                return await self._resolve_response(handle, indexes, types, trace)
        except TimeoutError:
            raise Timeout(f"resolving {handle} took more than {self.deadline:.0f} s") from None

    async def _resolve_response(
        self, handle: str, indexes: Sequence[int], types: Sequence[str], trace: Trace | None
    ) -> Response:
        if "/" not in handle or handle[: len(NA_PREFIX)].upper() == NA_PREFIX:
            prefix = handle.split("/", 1)[1] if "/" in handle else handle
            parse_prefix(prefix)
            parent = prefix.rpartition(".")[0]
            servers = await self.site_of(parent, trace) if parent else self.roots
        else:
            servers = await self.site_of(str(parse_identifier(handle).prefix), trace)
        if not servers:
            raise ResolutionFailed(f"the site serving {handle} has no {self.client.protocol} server")
        _, response = await self._ask_any(servers, handle, trace, indexes, types)
        if response.rc != RC.SUCCESS:
            raise _error_of(response, handle)
        return response

    async def resolve(self, handle: str, trace: Trace | None = None) -> Record:
        """The record of an identifier, as its node serves it over the Handle protocol."""
        identifier = parse_identifier(handle)
        response = await self.resolve_response(handle, trace=trace)
        return Record(identifier, response.values)


def _name(rc: int) -> str:
    return RC(rc).name if rc in KNOWN_RCS else f"code {rc}"


def _outcome(response: Response) -> str:
    name = _name(response.rc)
    if response.rc == RC.SUCCESS:
        types = ", ".join(sorted({v.type for v in response.values})) or "no values"
        return f"rc 1 {name}: {len(response.values)} value(s) ({types})"
    if response.rc == RC.PREFIX_REFERRAL:
        return f"rc 303 {name} -> " + ", ".join(
            f"{s.address}:{s.port(PROTOCOL_UDP) or s.port(PROTOCOL_TCP)}"
            for site in sites_of(response.values)
            for s in site.servers
        )
    return f"rc {response.rc} {name}" + (f": {response.message}" if response.message else "")
