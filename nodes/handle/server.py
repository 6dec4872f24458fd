"""The node's Handle-protocol listeners: UDP and TCP on one port (2641 by default), in every
worker process (``SO_REUSEPORT``), on the node's own event loop.

UDP: the socket is read by ``UdpEndpoint`` (compiled: ``recvmmsg``/``sendmmsg``, 64 datagrams a
system call), which answers cache hits itself, with no Python object made per datagram, and
hands the rest to ``HandleAnswers``. Each wake-up of the loop reads at most 16 batches, so TCP,
gRPC and HTTP keep their turn. Answers the Python side computes go back through the endpoint,
split into 492-byte chunks when larger than one datagram, but at most ``[handle]
udp_max_datagrams`` of them: a larger answer is replaced by rc 2 saying to ask over TCP, so a
small spoofed request cannot be amplified. Every source address has a budget of answers per
second (``udp_rate_per_source``, a token bucket in the endpoint, like DNS response-rate
limiting); beyond it datagrams are dropped unanswered. Datagrams that are responses, or come from
port 0 or this port, are never answered. At most ``max_pending`` answers are computed at once;
beyond that datagrams are dropped (UDP clients retry).

TCP: one request per connection, as HSJ does: read the envelope and the message (within
``tcp_timeout`` seconds, else rc 4 "Read timed out"), answer (from the cache when it can),
close. Each connection's peer pays one token of ``[quotas] peer_calls_per_second`` (the budget
gRPC and HTTP share; beyond it rc 3), and at most ``max_connections`` are open at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from nodes.config import HandleSection
from nodes.handle.answers import HandleAnswers, request_id_of
from nodes.trust.quotas import Quotas, RateLimited
from resolver.cache import LookupCache, UdpEndpoint
from resolver.handle_protocol import (
    ENVELOPE_SIZE,
    RC,
    TC,
    UDP_CHUNK,
    ProtocolError,
    bare_error,
    check_length,
    datagrams,
    decode_envelope,
)

log = logging.getLogger("idis.handle")

ROUNDS_PER_WAKEUP = 16
UDP_BUFFER_BYTES = 4 * 1024 * 1024


def _bind(family: int, kind: int, host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER_BYTES)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_pair(listen: str, reuse_port: bool = False) -> tuple[socket.socket, socket.socket, int]:
    """A UDP and a TCP socket bound to the same port of ``listen`` (port 0: a free one for both);
    OSError when they cannot be had."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    port = int(port_text)
    for _ in range(1 if port else 20):  # port 0: the UDP port's number may be taken for TCP; retry
        udp = _bind(family, socket.SOCK_DGRAM, host, port, reuse_port)
        try:
            tcp = _bind(family, socket.SOCK_STREAM, host, int(udp.getsockname()[1]), reuse_port)
        except OSError:
            udp.close()
            if port:
                raise
            continue
        return udp, tcp, int(udp.getsockname()[1])
    raise OSError(f"cannot bind UDP and TCP on one free port of {host}")


class HandleInterface:
    """The running UDP and TCP listeners of one node process."""

    def __init__(
        self,
        answers: HandleAnswers,
        udp: socket.socket,
        port: int,
        cache: LookupCache | None,
        settings: HandleSection,
        quotas: Quotas | None = None,
    ) -> None:
        self.answers = answers
        self.udp = udp
        self.port = port
        self.cache = cache
        self.endpoint = UdpEndpoint(udp.fileno(), settings.udp_rate_per_source, settings.udp_burst, own_port=port)
        # Over UDP the whole answer is bounded: the chunks it may take, 492 bytes each.
        self.udp_max_size = ENVELOPE_SIZE + settings.udp_max_datagrams * UDP_CHUNK
        self.max_pending = settings.max_pending
        self.tcp_timeout = settings.tcp_timeout
        self.quotas = quotas
        self.connections = asyncio.Semaphore(settings.max_connections)
        self.pending: set[asyncio.Task[Any]] = set()
        self.pending_requests = 0
        self.handlers: set[asyncio.Task[Any]] = set()  # TCP connections being answered
        self.dropped = 0
        self.server: asyncio.Server | None = None
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def start(
        cls,
        answers: HandleAnswers,
        listen: str,
        settings: HandleSection,
        cache: LookupCache | None = None,
        quotas: Quotas | None = None,
        reuse_port: bool = False,
    ) -> HandleInterface:
        """Serves on ``listen`` (port 0: any free one, the same for UDP and TCP); OSError when
        it cannot bind."""
        udp, tcp, port = bind_pair(listen, reuse_port)
        interface = cls(answers, udp, port, cache, settings, quotas)
        try:
            tcp.listen(1024)
            interface.server = await asyncio.start_server(interface._connection, sock=tcp)
        except OSError:
            tcp.close()
            udp.close()
            raise
        interface.loop.add_reader(udp.fileno(), interface._readable)
        return interface

    # --- UDP ----------------------------------------------------------------------------------

    def _readable(self) -> None:
        serial = self.answers.serial
        for _ in range(ROUNDS_PER_WAKEUP):
            rest = self.endpoint.serve(self.cache, int(time.time()), serial)
            if rest is None:
                return
            if not rest:
                continue
            if self.pending_requests + len(rest) > self.max_pending:
                self.dropped += len(rest)
                continue
            self.pending_requests += len(rest)
            task = self.loop.create_task(self._answer_datagrams(rest))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _answer_datagrams(self, rest: list[tuple[bytes, object]]) -> None:
        """Answers the datagrams one ``serve`` left to Python (their records read in one store
        query)."""
        try:
            await self._answer_all(rest)
        except Exception:  # one bad batch must not stop the listener; the clients retry
            log.exception("Handle: answering %d UDP requests failed", len(rest))
        finally:
            self.pending_requests -= len(rest)

    async def _answer_all(self, rest: list[tuple[bytes, object]]) -> None:
        answers: list[bytes | None] = [None] * len(rest)
        requests: list[int] = []
        for position, (datagram, _) in enumerate(rest):
            try:
                if decode_envelope(datagram).flags & TC:  # a request in several datagrams
                    raise ProtocolError("requests in several datagrams are not taken over UDP; send it over TCP")
            except ProtocolError as error:
                answers[position] = self._bare(datagram, str(error))
                continue
            requests.append(position)
        computed = await self.answers.respond_many([rest[p][0] for p in requests], max_size=self.udp_max_size)
        for position, answer in zip(requests, computed, strict=True):
            answers[position] = answer
        for (_, source), answer in zip(rest, answers, strict=True):
            if answer is not None:
                self.endpoint.send(source, datagrams(answer))

    # --- TCP ----------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections.locked():
            writer.close()  # full: no answer at all costs the least
            return
        task = asyncio.current_task()
        if task is not None:
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)
        async with self.connections:
            try:
                response = await self._tcp_answer(reader, writer)
                if response is not None:
                    writer.write(response)
                    async with asyncio.timeout(self.tcp_timeout):
                        await writer.drain()
            except (ConnectionError, TimeoutError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(1):
                        await writer.wait_closed()

    async def _tcp_answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        serial = self.answers.serial
        head = b""
        try:
            async with asyncio.timeout(self.tcp_timeout):
                head = await reader.readexactly(ENVELOPE_SIZE)
                envelope = decode_envelope(head)
                check_length(envelope)
                data = head + await reader.readexactly(envelope.message_length)
        except asyncio.IncompleteReadError as short:
            if not head:
                return None if not short.partial else self._bare(short.partial, "the envelope is cut short")
            expected = int.from_bytes(head[16:20], "big")
            return self._bare(head, f"Expecting {expected} bytes, only received {len(short.partial)}")
        except TimeoutError:
            return self._bare(head, "Read timed out")
        except ProtocolError as error:
            return self._bare(head, str(error))
        if self.quotas is not None and self.quotas.peers.rate > 0:
            peer = writer.get_extra_info("peername")
            try:
                self.quotas.peers.take(str(peer[0]) if peer else "-", "peer")
            except RateLimited as refused:
                return self._bare(head, str(refused), RC.SERVER_TOO_BUSY)
        if self.cache is not None:
            hit: bytes | None = self.cache.handle_answer(data, int(time.time()), serial)
            if hit is not None:
                return hit
        return await self.answers.respond(data)

    def _bare(self, head: bytes, message: str, rc: int = RC.PROTOCOL_ERROR) -> bytes:
        return bare_error(request_id_of(head), rc, message, self.answers.serial, int(time.time()))

    # --- stop ---------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stops listening, cancels the answers in progress (UDP batches, TCP connections) and
        closes the sockets."""
        self.loop.remove_reader(self.udp.fileno())
        if self.server is not None:
            self.server.close()
        waiting = [*self.pending, *self.handlers]
        for task in waiting:
            task.cancel()
        for task in waiting:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self.server.wait_closed()
        self.endpoint.close()
        self.udp.close()

    def stats(self) -> dict[str, int]:
        e = self.endpoint
        return {
            "received": e.received,
            "answered_fast": e.answered,
            "passed": e.passed,
            "limited": e.limited,
            "ignored": e.ignored,
            "send_failures": e.send_failures,
            "dropped_busy": self.dropped,
        }
