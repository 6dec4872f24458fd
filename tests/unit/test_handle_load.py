"""The compiled Handle load generator (bench/_handle_load.pyx) against tiny responders of the
test's own: every request sent is answered, lost or in flight, answers are matched by request id,
and the histogram adds up. No timing is asserted."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench._handle_load import HISTOGRAM_BUCKETS, bucket_bounds, latency_ms, merge, run_tcp, run_udp
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


class UdpResponder:
    """Answers each datagram with its own request id and rc 1, except: every ``drop_every``-th
    request gets no answer, and every ``bogus_every``-th first gets one with another id."""

    def __init__(self, drop_every: int = 0, bogus_every: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.drop_every, self.bogus_every = drop_every, bogus_every
        self.ids: list[int] = []
        self.dropped = self.bogus = 0
        self.stop = threading.Event()

    def serve(self) -> None:
        with self.sock:
            while not self.stop.wait(0):
                try:
                    data, peer = self.sock.recvfrom(2048)
                except TimeoutError:
                    continue
                request_id = int.from_bytes(data[8:12], "big")
                self.ids.append(request_id)
                n = len(self.ids)
                if self.drop_every and n % self.drop_every == 0:
                    self.dropped += 1
                    continue
                if self.bogus_every and n % self.bogus_every == 0:
                    self.bogus += 1
                    self.sock.sendto(answer(data, request_id ^ 0x40000000, rc=2), peer)
                self.sock.sendto(answer(data), peer)


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


def test_tcp_one_request_a_connection_answered_until_the_server_closes() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()
    served: list[int] = []

    def serve() -> None:
        with listener:
            while not stop.wait(0):
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(2)
                    data = conn.recv(20)
                    while len(data) < 20 + int.from_bytes(data[16:20], "big"):
                        data += conn.recv(4096)
                    served.append(int.from_bytes(data[8:12], "big"))
                    conn.sendall(answer(data, rc=100) + b"\0" * 100)

    with running(serve, stop):
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
