"""The compiled Handle load generator (bench/_handle_load.pyx) against tiny responders of the
test's own: every request sent is answered, lost or in flight, answers are matched by request id,
and the histogram adds up; in its DNS mode too (16-bit ids at offset 0, the RCODE). No timing is
asserted."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench._handle_load import HISTOGRAM_BUCKETS, bucket_bounds, latency_ms, merge, run_tcp, run_udp
from bench.knot_baseline import dns_queries
from resolver.handle_protocol import Op, ResolutionRequest, encode_resolution_request, request_message

DEADLINE_S = 20.0
"""The most a responder thread lives, whatever happens to the test."""


def requests(count: int) -> list[bytes]:
    return [
        request_message(Op.RESOLUTION, encode_resolution_request(ResolutionRequest(f"88.100.1/K{i}".encode())), 7)
        for i in range(count)
    ]


def answer(request: bytes, request_id: int | None = None, rc: int = 1) -> bytes:
    """The envelope of ``request`` (its id, or ``request_id``), then opcode 1 and ``rc``."""
    envelope = request[:8] + (request[8:12] if request_id is None else request_id.to_bytes(4, "big")) + request[12:20]
    return envelope + (1).to_bytes(4, "big") + rc.to_bytes(4, "big")


def dns_answer(query: bytes, query_id: int | None = None, rcode: int = 0) -> bytes:
    """A DNS answer to ``query`` (its ID, or ``query_id``): QR and AA set, ``rcode``, the question."""
    header = (query[:2] if query_id is None else query_id.to_bytes(2, "big")) + bytes([0x84, rcode])
    return header + query[4:]


class UdpResponder:
    """Answers each datagram with its own request id and rc 1, except: every ``drop_every``-th
    request gets no answer, and every ``bogus_every``-th first gets one with another id. With
    ``dns``, a DNS server: the 16-bit ID at offset 0, and the RCODE 3 (NXDOMAIN) for every
    ``nxdomain_every``-th query, 0 (NOERROR) for the others."""

    def __init__(self, drop_every: int = 0, bogus_every: int = 0, dns: bool = False, nxdomain_every: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.drop_every, self.bogus_every = drop_every, bogus_every
        self.dns, self.nxdomain_every = dns, nxdomain_every
        self.ids: list[int] = []
        self.dropped = self.bogus = self.nxdomain = 0
        self.stop = threading.Event()

    def reply(self, data: bytes, n: int, bogus: bool = False) -> bytes:
        """The answer to the ``n``-th request ``data``: one with another id if ``bogus``."""
        if not self.dns:
            return answer(data, int.from_bytes(data[8:12], "big") ^ 0x40000000, rc=2) if bogus else answer(data)
        if bogus:
            return dns_answer(data, int.from_bytes(data[:2], "big") ^ 0x8000, rcode=2)
        nxdomain = bool(self.nxdomain_every) and n % self.nxdomain_every == 0
        self.nxdomain += nxdomain
        return dns_answer(data, rcode=3 if nxdomain else 0)

    def serve(self) -> None:
        with self.sock:
            while not self.stop.wait(0):
                try:
                    data, peer = self.sock.recvfrom(2048)
                except TimeoutError:
                    continue
                self.ids.append(int.from_bytes(data[:2] if self.dns else data[8:12], "big"))
                n = len(self.ids)
                if self.drop_every and n % self.drop_every == 0:
                    self.dropped += 1
                    continue
                if self.bogus_every and n % self.bogus_every == 0:
                    self.bogus += 1
                    self.sock.sendto(self.reply(data, n, bogus=True), peer)
                self.sock.sendto(self.reply(data, n), peer)


@contextlib.contextmanager
def running(target: Callable[[], None], stop: threading.Event) -> Iterator[None]:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    timer = threading.Timer(DEADLINE_S, stop.set)
    timer.start()
    try:
        yield
    finally:
        stop.set()
        timer.cancel()
        thread.join(5)


def accounted(result: dict[str, int]) -> int:
    return result["answered"] + result["lost"] + result["failed"] + result["in_flight"]


def test_udp_every_request_is_answered_or_lost_and_lost_is_exactly_what_was_dropped() -> None:
    responder = UdpResponder(drop_every=10)
    with running(responder.serve, responder.stop):
        result = run_udp("127.0.0.1", responder.port, requests(300), 30.0, window=60, timeout=1.0, limit=300)
    assert result["sent"] == 300 == len(responder.ids)
    assert len(set(responder.ids)) == 300  # a request id of its own for every send
    assert responder.dropped == 30
    assert result["lost"] == 30
    assert result["answered"] == 270 and result["in_flight"] == 0 and result["stale"] == 0
    assert accounted(result) == result["sent"]
    assert result["rc"] == {1: 270}
    assert sum(result["histogram"].values()) == 270 == sum(result["per_second"])
    assert result["bytes_received"] == 270 * 28


def test_udp_answers_are_matched_by_request_id() -> None:
    responder = UdpResponder(bogus_every=7)
    with running(responder.serve, responder.stop):
        result = run_udp("127.0.0.1", responder.port, requests(50), 30.0, window=8, timeout=1.0, limit=200)
    assert result["sent"] == 200 and responder.bogus == 200 // 7
    assert result["stale"] == responder.bogus  # answers with an id not outstanding count for nothing
    assert result["answered"] == 200 and result["lost"] == 0
    assert result["rc"] == {1: 200}  # never the bogus answers' rc 2


def test_udp_a_run_without_a_server_loses_what_it_sent() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never read: no answer, no ICMP
        result = run_udp("127.0.0.1", silent.getsockname()[1], requests(5), 30.0, window=4, timeout=0.05, limit=10)
    assert result["sent"] == 10 == result["lost"] and result["answered"] == 0
    assert latency_ms(result)["p99_ms"] == 0.0


def test_dns_answers_are_counted_by_rcode_and_lost_is_exactly_what_was_dropped() -> None:
    responder = UdpResponder(drop_every=10, dns=True, nxdomain_every=3)
    queries = dns_queries(1000, 300, seed=1)
    with running(responder.serve, responder.stop):
        result = run_udp("127.0.0.1", responder.port, queries, 30.0, 60, 1.0, limit=300, protocol="dns")
    assert result["sent"] == 300 == len(responder.ids)
    # the slot (6 bits for a window of 60) below its generation: no id twice in 300 sends
    assert len(set(responder.ids)) == 300 and all(i < 1 << 16 and i % 64 < 60 for i in responder.ids)
    assert responder.dropped == 30 == result["lost"]
    assert result["answered"] == 270 and result["in_flight"] == 0 and result["stale"] == 0
    assert accounted(result) == result["sent"]
    assert responder.nxdomain == 90  # multiples of 3 up to 300 that are not multiples of 10
    assert result["rc"] == {0: 180, 3: 90}
    assert sum(result["histogram"].values()) == 270 == sum(result["per_second"])
    assert result["bytes_received"] == sum(len(queries[i % 300]) for i in range(300) if (i + 1) % 10)


def test_dns_answers_are_matched_by_id() -> None:
    responder = UdpResponder(bogus_every=7, dns=True)
    with running(responder.serve, responder.stop):
        result = run_udp("127.0.0.1", responder.port, dns_queries(10, 50), 30.0, 8, 1.0, limit=200, protocol="dns")
    assert result["sent"] == 200 and responder.bogus == 200 // 7
    assert result["stale"] == responder.bogus  # another generation of the slot: not outstanding
    assert result["answered"] == 200 and result["lost"] == 0
    assert result["rc"] == {0: 200}  # never the bogus answers' SERVFAIL


def test_dns_mode_bounds_its_window_and_checks_its_options() -> None:
    queries = dns_queries(10, 5)
    with pytest.raises(ValueError, match="4096"):
        run_udp("127.0.0.1", 9, queries, 1.0, 4097, protocol="dns")
    with pytest.raises(ValueError, match="protocol"):
        run_udp("127.0.0.1", 9, queries, 1.0, protocol="http")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"12\.\.65507"):
        run_udp("127.0.0.1", 9, [b"\0" * 11], 1.0, protocol="dns")
    with pytest.raises(ValueError, match=r"28\.\.65507"):
        run_udp("127.0.0.1", 9, [b"\0" * 27], 1.0)  # long enough for DNS, too short for Handle


def serve_tcp(listener: socket.socket, stop: threading.Event, reply: Callable[[bytes], bytes], hold: bool) -> None:
    """Until ``stop``: accepts a connection, reads its request, sends ``reply(request)``, and
    closes it (or, with ``hold``, keeps it open until ``stop``)."""
    held: list[socket.socket] = []
    with listener:
        while not stop.wait(0):
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(2)
                data = conn.recv(20)
                while len(data) < 20 + int.from_bytes(data[16:20], "big"):
                    data += conn.recv(4096)
                conn.sendall(reply(data))
            finally:
                if hold:
                    held.append(conn)
                else:
                    conn.close()
    for conn in held:
        conn.close()


def test_tcp_bytes_of_an_answer_still_being_read_when_the_run_stops_are_not_counted() -> None:
    # The server answers but never closes: every request is still in flight at the end, its
    # answer's bytes read but not yet over, so none is answered and no bytes are an answer's.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()
    with running(lambda: serve_tcp(listener, stop, lambda data: answer(data, rc=100), hold=True), stop):
        result = run_tcp("127.0.0.1", listener.getsockname()[1], requests(4), 0.3, connections=2, timeout=5.0)
    assert result["in_flight"] == 2 and result["answered"] == 0 and accounted(result) == result["sent"] == 2
    assert result["bytes_received"] == 0


def test_tcp_one_request_a_connection_answered_until_the_server_closes() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()
    served: list[int] = []

    def reply(data: bytes) -> bytes:
        served.append(int.from_bytes(data[8:12], "big"))
        return answer(data, rc=100) + b"\0" * 100

    with running(lambda: serve_tcp(listener, stop, reply, hold=False), stop):
        result = run_tcp("127.0.0.1", listener.getsockname()[1], requests(20), 0.5, connections=4, timeout=2.0)
    assert result["answered"] > 0 and result["lost"] == 0 and result["failed"] == 0
    assert accounted(result) == result["sent"]
    assert result["rc"] == {100: result["answered"]}
    assert len(set(served)) == len(served)  # a request id of its own for every connection
    assert result["bytes_received"] == 128 * result["answered"]


def test_histograms_merge_and_give_percentiles_from_fixed_log_buckets() -> None:
    for index in range(HISTOGRAM_BUCKETS - 1):
        low, high = bucket_bounds(index)
        assert high == bucket_bounds(index + 1)[0]
        assert (high - low) / low <= 1 / 64 if index >= 128 else high - low == 1
    # 90 answers near 100 µs and 10 near 10 ms, in two processes' results
    merged = merge([result_of(56, 4, 1.0), result_of(34, 6, 1.5)])
    assert merged["answered"] == 100 and merged["elapsed_s"] == 1.5
    figures = latency_ms(merged)
    assert figures["p50_ms"] == pytest.approx(0.1, rel=0.01)
    assert figures["p90_ms"] == pytest.approx(0.1, rel=0.01)
    assert figures["p99_ms"] == pytest.approx(10.0, rel=0.01)
    assert figures["mean_ms"] == pytest.approx(1.09) and figures["max_ms"] == 10.0


def result_of(fast: int, slow: int, elapsed: float) -> dict[str, Any]:
    """A run's result with ``fast`` answers in 100 µs and ``slow`` ones in 10 ms."""
    return {
        "answered": fast + slow,
        "histogram": {bucket_of(100_000): fast, bucket_of(10_000_000): slow},
        "latency_sum_ns": fast * 100_000 + slow * 10_000_000,
        "latency_max_ns": 10_000_000 if slow else 100_000,
        "elapsed_s": elapsed,
    }


def bucket_of(ns: int) -> int:
    return next(i for i in range(HISTOGRAM_BUCKETS) if bucket_bounds(i)[0] <= ns < bucket_bounds(i)[1])
