"""A real node's Handle-protocol listeners (UDP and TCP), asked with plain sockets and read with
the spec's own codec (tests/handle_spec.py, HANDLE-INTEROP.md part B).

Two node processes on one SQLite file: ``main`` (the node under test, its Handle answer cache on)
and ``plain`` (its cache off: every answer computed afresh, the reference the cached answers must
equal after every write). ``plain`` also has a small per-source UDP budget, for the rate-limit test.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodes.hierarchy import NodeProcess, NodeSpec
from resolver.record import AdminPermission, Permission, Value, admin_value
from resolver.registrar import Registrar
from tests import handle_spec as spec
from tests.integration.conftest import Cluster
from tests.prometheus_text import scrape

APEX = "88.100.1"
LOOPBACK = "127.0.0.1"
TCP_TIMEOUT = 1.0
"""The node's [handle] tcp_timeout."""
MARGIN = 4.0
"""What a TCP connection may take beyond it (a loaded machine)."""
SOCKET_TIMEOUT = 10.0
"""The longest the test waits for any one answer: a lost answer fails the test, never hangs it."""
RATE = 50
"""The plain node's [handle] udp_rate_per_source and udp_burst."""

PRIVATE = Permission.ADMIN_READ | Permission.ADMIN_WRITE
SN_1 = [
    Value(1, "URL", b"https://f1.example.com/p/1"),
    Value(2, "EMAIL", b"ops@f1.example.com", ttl=600),
    Value(3, "SECRET", b"not for anonymous readers", permissions=PRIVATE),
    Value(4, "DESC", "Motor X200, série 1".encode(), ttl=30),
    admin_value(100, "88.100.1/ADMIN", 300, AdminPermission(0xFFF)),
]
MEDIUM = [Value(i, "DATA", bytes([64 + i]) * 200) for i in range(1, 7)]
"""An answer of three datagrams."""
BIG = [Value(i, "DATA", bytes([64 + i % 32]) * 200) for i in range(1, 31)]
"""An answer of 15 datagrams: more than [handle] udp_max_datagrams (4) allows over UDP."""


@dataclass
class Node:
    process: NodeProcess
    grpc: str
    port: int
    """UDP and TCP."""


@dataclass
class Nodes:
    main: Node
    plain: Node


def start(cluster: Cluster, spec_: NodeSpec) -> Node:
    """Starts a node; its Handle port is in its ready line."""
    address = cluster.start(spec_)
    process = cluster.processes[spec_.name]
    assert process.handle_port
    return Node(process, address, process.handle_port)


def write(node: Node, action: Callable[[Registrar], Awaitable[object]]) -> None:
    async def run() -> None:
        registrar = Registrar(node=node.grpc)
        try:
            await action(registrar)
        finally:
            await registrar.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    cluster = Cluster(tmp_path_factory.mktemp("handle"))
    listen = {"handle_listen": f"{LOOPBACK}:0"}
    try:
        settings: dict[str, dict[str, Any]] = {
            "node": {**listen, "metrics_listen": f"{LOOPBACK}:0"},
            "handle": {"tcp_timeout": TCP_TIMEOUT},
        }
        main = start(cluster, NodeSpec("main", "enterprise", APEX, 0, settings))
        limited = {"tcp_timeout": TCP_TIMEOUT, "udp_rate_per_source": RATE, "udp_burst": RATE}
        extra: dict[str, dict[str, Any]] = {
            "node": listen,
            "handle": limited,
            "storage": {"path": "main.sqlite3"},
            "cache": {"enabled": False},
        }
        plain = start(cluster, NodeSpec("plain", "enterprise", APEX, 0, extra))

        async def seed(registrar: Registrar) -> None:
            for name, values in (("SN-1", SN_1), ("MEDIUM", MEDIUM), ("BIG", BIG)):
                await registrar.create(f"{APEX}/{name}", values)

        write(main, seed)
        yield Nodes(main, plain)
    finally:
        cluster.stop_all()


# --- the client: plain sockets ---------------------------------------------------------------

_ids = iter(range(1000, 1 << 30))


def request(handle: bytes | str = b"88.100.1/SN-1", **fields: Any) -> bytes:
    """A request with a request id of its own."""
    return spec.request(handle, request_id=next(_ids), **fields)


def udp_datagrams(port: int, data: bytes, source: str = LOOPBACK) -> list[bytes]:
    """The datagrams answering one request (matched by its request id), once they are all in."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.bind((source, 0))
        sock.connect((LOOPBACK, port))
        sock.send(data)
        got: list[bytes] = []
        while not got or not spec.complete(got):
            datagram = sock.recv(65536)
            if datagram[8:12] == data[8:12]:
                got.append(datagram)
        return got


def udp(port: int, data: bytes) -> bytes:
    return spec.reassemble(udp_datagrams(port, data))


def tcp(port: int, data: bytes) -> bytes:
    """The answer to one request over TCP; the node closes the connection after it."""
    with socket.create_connection((LOOPBACK, port), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(data)
        parts = []
        while part := sock.recv(65536):
            parts.append(part)
        return b"".join(parts)


TRANSPORTS = {"udp": udp, "tcp": tcp}


def ask(transport: str, node: Node, data: bytes) -> spec.Answer:
    answer = spec.Answer(TRANSPORTS[transport](node.port, data))
    assert answer.message.request_id == int.from_bytes(data[8:12], "big")
    return answer


def as_spec(value: Value) -> spec.Value:
    """A registered value as the spec's decoder reads it (HS_ADMIN in Handle's binary form)."""
    data = value.data
    if value.type == "HS_ADMIN":
        data = spec.admin_data(0xFFF, b"88.100.1/ADMIN", 300)
    refs = tuple((r.identifier.encode(), r.index) for r in value.references)
    return spec.Value(
        value.index, value.type.encode(), data, value.ttl, int(value.ttl_type), 0, int(value.permissions), refs
    )


def contents(values: tuple[spec.Value, ...]) -> dict[int, spec.Value]:
    """Values by index, their timestamps (the node's) checked and zeroed."""
    assert all(v.timestamp > 1_700_000_000 for v in values), values
    return {
        v.index: spec.Value(v.index, v.type, v.data, v.ttl, v.ttl_type, 0, v.permissions, v.references) for v in values
    }


def public(values: list[Value]) -> dict[int, spec.Value]:
    return {v.index: as_spec(v) for v in values if v.permissions & Permission.PUBLIC_READ}


# --- resolution --------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
@pytest.mark.parametrize("flags", [spec.HSJ_FLAGS, spec.REC | spec.CA], ids=["PO", "no PO"])
def test_a_registered_identifier_is_answered_with_its_public_values(nodes: Nodes, transport: str, flags: int) -> None:
    data = request("88.100.1/SN-1", flags=flags)
    answer = ask(transport, nodes.main, data)
    assert answer.message.rc == 1
    assert answer.message.flags == (flags & (spec.CA | spec.PO)) | spec.AT | spec.REC
    assert (answer.message.opcode, answer.message.serial, answer.message.credential) == (1, 1, b"")
    assert answer.response.handle == b"88.100.1/SN-1"
    assert contents(answer.response.values) == public(SN_1)
    assert 3 not in contents(answer.response.values)  # never sent: not PUBLIC_READ


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_response_codes(nodes: Nodes, transport: str) -> None:
    cases: list[tuple[bytes, dict[str, Any], int]] = [
        (b"88.100.1/NOT-REGISTERED", {}, 100),
        (b"0.NA/99", {}, 301),
        (b"99/X", {}, 301),
        (b"88.100/X", {}, 301),
        (b"88.100.1/\xff", {}, 102),
        (b"88.100.1/SN-1", {"indexes": (77,)}, 200),
        (b"88.100.1/SN-1", {"indexes": (3,)}, 200),  # the private one
        (b"88.100.1/SN-1", {"types": (b"NOPE",)}, 200),
        (b"88.100.1/SN-1", {"opcode": 7}, 5),
    ]
    for handle, fields, rc in cases:
        answer = ask(transport, nodes.main, request(handle, **fields))
        assert answer.message.rc == rc, (handle, fields, answer.response)
        assert answer.message.flags & spec.AT and answer.message.flags & spec.REC
    gone = ask(transport, nodes.main, request(b"0.NA/99"))
    assert gone.response.message == b"That prefix doesn't live here"


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_index_and_type_filters_select_the_union(nodes: Nodes, transport: str) -> None:
    everything = public(SN_1)
    for fields, indexes in (
        ({"indexes": (2,)}, {2}),
        ({"types": (b"URL",)}, {1}),
        ({"types": (b"url",)}, {1}),
        ({"indexes": (1,), "types": (b"EMAIL",)}, {1, 2}),
        ({"indexes": (3, 4)}, {4}),  # 3 is private
        ({"types": (b"HS_ADMIN", b"SECRET")}, {100}),
    ):
        answer = ask(transport, nodes.main, request("88.100.1/SN-1", **fields))
        assert answer.message.rc == 1, fields
        assert contents(answer.response.values) == {i: everything[i] for i in indexes}, fields


def own_site_ports(site: spec.Site | None) -> set[tuple[int, int]]:
    """(protocol, port) of the query interfaces of a site of one server at 127.0.0.1."""
    assert site is not None and [s.address for s in site.servers] == [bytes(12) + socket.inet_aton(LOOPBACK)]
    return {(i.protocol, i.port) for i in site.servers[0].interfaces if i.type in (2, 3)}


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_site_info_names_the_handle_port_for_udp_and_tcp(nodes: Nodes, transport: str) -> None:
    answer = ask(transport, nodes.main, request(body=b"", opcode=2))
    assert (answer.message.rc, answer.message.opcode) == (1, 2)
    site = answer.response.site
    assert site is not None and site.serial == answer.message.serial == 1 and site.version == (2, 11)
    assert {(0, nodes.main.port), (1, nodes.main.port)} <= own_site_ports(site)


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_the_prefix_handle_of_the_served_prefix_names_this_node(nodes: Nodes, transport: str) -> None:
    for handle in (b"0.NA/88.100.1", b"0.na/88.100.1", b"88.100.1"):
        answer = ask(transport, nodes.main, request(handle))
        assert answer.message.rc == 1 and answer.response.handle == handle
        sites = [v for v in answer.response.values if v.type == b"HS_SITE"]
        assert len(sites) == 1 and sites[0].permissions & 0x2
        assert {(0, nodes.main.port), (1, nodes.main.port)} <= own_site_ports(spec.decode_site(sites[0].data))


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
@pytest.mark.parametrize(("suggested", "algorithm"), [((2, 11), "sha256"), ((2, 5), "sha1")])
def test_a_request_digest_is_taken_over_the_request_header_and_body(
    nodes: Nodes, transport: str, suggested: tuple[int, int], algorithm: str
) -> None:
    data = request("88.100.1/SN-1", flags=spec.HSJ_FLAGS | spec.RD, suggested=suggested)
    answer = ask(transport, nodes.main, data)
    body_length = struct.unpack_from(">I", data, 40)[0]
    code = 3 if algorithm == "sha256" else 2
    assert answer.message.flags & spec.RD and answer.message.version == suggested
    assert answer.response.digest == bytes([code]) + hashlib.new(algorithm, data[20 : 44 + body_length]).digest()
    assert contents(answer.response.values) == public(SN_1)


def claiming(length: int) -> bytes:
    """An envelope claiming a message of ``length`` bytes."""
    return request()[:16] + struct.pack(">I", length)


MALFORMED: dict[str, dict[str, bytes]] = {  # what is sent over each transport
    # Over TCP the node reads the envelope and answers: whatever follows it is never read.
    "message length 262145": {"udp": claiming(262145) + bytes(600), "tcp": claiming(262145)},
    "message length 23": {"udp": claiming(23) + bytes(23), "tcp": claiming(23)},
    "opcode 0": dict.fromkeys(TRANSPORTS, request("88.100.1/SN-1", opcode=0)),
}


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_is_answered_rc_4_with_opcode_0(nodes: Nodes, transport: str, case: str) -> None:
    # B.1: "A server MUST answer malformed input with an error message (rc 4 PROTOCOL_ERROR,
    # opcode 0), not silence, as HSJ does: messageLength > 262144 or < 24; opcode 0; ..."
    # (Opcode 0 was once answered rc 5 OPERATION_NOT_SUPPORTED; these cases caught it.)
    answer = ask(transport, nodes.main, MALFORMED[case][transport])
    assert (answer.message.rc, answer.message.opcode) == (4, 0), answer.response.message


def test_a_short_tcp_read_is_answered_rc_4(nodes: Nodes) -> None:
    data = request("88.100.1/SN-1")
    with socket.create_connection((LOOPBACK, nodes.main.port), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(data[:30])  # the envelope, then 10 of the message's bytes
        sock.shutdown(socket.SHUT_WR)
        answer = spec.Answer(sock.recv(65536))
        assert sock.recv(65536) == b""  # and the node closed the connection
    assert (answer.message.rc, answer.message.opcode, answer.message.request_id) == (4, 0, int.from_bytes(data[8:12]))
    assert answer.response.message == f"Expecting {len(data) - 20} bytes, only received 10".encode()


def test_a_slow_tcp_client_is_answered_read_timed_out(nodes: Nodes) -> None:
    data = request("88.100.1/SN-1")
    with socket.create_connection((LOOPBACK, nodes.main.port), timeout=TCP_TIMEOUT + MARGIN) as sock:
        sock.sendall(data[:30])  # and then nothing, the connection left open
        answer = spec.Answer(sock.recv(65536))  # a timeout here (the node never answering) fails the test
        assert sock.recv(65536) == b""
    assert (answer.message.rc, answer.response.message) == (4, b"Read timed out")


def udp_outcomes(node: Node) -> Counter[str]:
    """The node's ``idis_handle_udp_datagrams_total`` by outcome, received ones aside."""
    samples = scrape(node.process.metrics_port).samples("idis_handle_udp_datagrams_total")
    return Counter({s.labels["outcome"]: int(s.value) for s in samples if s.labels["outcome"] != "received"})


def test_cold_and_warm_answers_are_the_same_bytes(nodes: Nodes) -> None:
    variants: list[dict[str, Any]] = [{}, {"flags": spec.REC}, {"version": (2, 3), "suggested": (2, 6), "recursion": 3}]

    async def create(registrar: Registrar) -> None:
        for n in range(len(variants)):
            await registrar.create(f"88.100.1/WARM-{n}", [Value(1, "URL", b"https://warm.example.com", ttl=120)])

    write(nodes.main, create)
    for n, fields in enumerate(variants):  # each identifier asked for the first time: cold
        for handle, rc in ((f"88.100.1/WARM-{n}", 1), (f"88.100.1/COLD-{n}", 100)):
            data = request(handle, **fields)
            before = udp_outcomes(nodes.main)
            cold = udp(nodes.main.port, data)
            after_cold = udp_outcomes(nodes.main)
            warm = udp(nodes.main.port, data)
            after_warm = udp_outcomes(nodes.main)
            assert spec.masked(cold) == spec.masked(warm), (handle, fields)
            # The cold answer was computed in Python (passed on by the compiled loop), the warm
            # one answered by the compiled loop from the cache.
            assert after_cold - before == Counter(passed=1), (handle, fields)
            assert after_warm - after_cold == Counter(answered_fast=1), (handle, fields)
            message = spec.decode(warm)
            assert message.rc == rc and abs(message.expiration - (time.time() + 43200)) < 300


def test_a_large_answer_comes_in_chunks_and_a_too_large_one_is_sent_to_tcp(nodes: Nodes) -> None:
    port = nodes.main.port
    data = request("88.100.1/MEDIUM")
    datagrams = udp_datagrams(port, data)
    whole = spec.reassemble(datagrams)
    assert len(datagrams) == -(-(len(whole) - 20) // 492) == 3
    assert all(d[2] & spec.TC for d in datagrams) and max(len(d) for d in datagrams) == 512
    assert spec.masked(whole) == spec.masked(tcp(port, data))
    assert contents(spec.Answer(whole).response.values) == public(MEDIUM)

    data = request("88.100.1/BIG")
    refused = udp_datagrams(port, data)
    assert len(refused) == 1
    answer = spec.Answer(refused[0])
    assert answer.message.rc == 2 and b"TCP" in answer.response.message
    over_tcp = ask("tcp", nodes.main, data)
    assert over_tcp.message.rc == 1 and contents(over_tcp.response.values) == public(BIG)
    assert len(over_tcp.raw) - 20 > 4 * 492


# --- writes: the cached answers never go stale --------------------------------------------------


def test_after_every_write_the_cached_answers_equal_a_fresh_one(nodes: Nodes) -> None:
    handle = "88.100.1/CHANGING"

    def same(rc: int) -> dict[int, spec.Value]:
        """Asks the main node twice over UDP (the second from its cache) and the cache-less node
        over TCP; all three must be the same bytes but for the expiration time."""
        results = []
        for flags in (spec.HSJ_FLAGS, spec.REC):  # public only, or not: the same values
            data = request(handle, flags=flags)
            answers = [udp(nodes.main.port, data), udp(nodes.main.port, data), tcp(nodes.plain.port, data)]
            assert len({spec.masked(a) for a in answers}) == 1, answers
            answer = spec.Answer(answers[1])
            assert answer.message.rc == rc
            results.append(contents(answer.response.values))
        assert results[0] == results[1]
        return results[0]

    one, two = Value(1, "URL", b"https://a.example.com"), Value(2, "EMAIL", b"a@example.com")
    hidden, changed = Value(3, "NOTE", b"private", permissions=PRIVATE), Value(2, "EMAIL", b"b@example.com")
    one_hidden = Value(1, "URL", b"https://b.example.com", permissions=PRIVATE)
    five, nine = Value(5, "URL", b"https://c.example.com", ttl=60), Value(9, "URL", b"https://again.example.com")
    steps: list[tuple[str, Callable[[Registrar], Awaitable[object]], int, list[Value]]] = [
        ("create", lambda r: r.create(handle, [one]), 1, [one]),
        ("add values", lambda r: r.add_values(handle, [two, hidden]), 1, [one, two]),
        ("change a value", lambda r: r.modify_values(handle, [changed]), 1, [one, changed]),
        ("make a value private", lambda r: r.modify_values(handle, [one_hidden]), 1, [changed]),
        ("remove the last public value", lambda r: r.remove_values(handle, [2]), 200, []),
        ("add a value", lambda r: r.add_values(handle, [five]), 1, [five]),
        ("remove two private values", lambda r: r.remove_values(handle, [1, 3]), 1, [five]),
        ("delete", lambda r: r.delete(handle), 100, []),
        ("re-create", lambda r: r.create(handle, [nine]), 1, [nine]),
    ]
    assert same(100) == {}
    for name, action, rc, values in steps:
        write(nodes.main, action)
        assert same(rc) == public(values), name


# --- hostile input -------------------------------------------------------------------------------

FUZZ_HANDLES = [
    b"88.100.1/SN-1", b"88.100.1/NOT-REGISTERED", b"0.NA/88.100.1", b"0.na/88.100.1", b"88.100.1", b"0.NA/99",
    b"99/X", b"88.100/X", b"88.100.2/X", b"88.100.1.7/X", b"0.NA/88.100", b"0.NA/88", b"88", b"88.100.10/SN-1",
]  # fmt: skip


def served(handle: bytes) -> bool:
    """True when ``handle`` (``0.NA/<prefix>``, a slashless prefix, or an identifier) is about
    the one prefix the node serves."""
    text = handle.decode("utf-8", "replace")
    prefix = text[5:] if text[:5].upper() == "0.NA/" else text.partition("/")[0]
    return prefix.upper() == APEX


def valid_request(rng: random.Random) -> bytes:
    handle = rng.choice(FUZZ_HANDLES)
    kind = rng.random()
    if kind < 0.1:
        return spec.request(body=b"", opcode=2)
    if kind < 0.2:
        return spec.request(handle, indexes=(rng.randrange(5),), types=(b"URL",))
    return spec.request(handle, flags=rng.choice([spec.HSJ_FLAGS, spec.REC, spec.HSJ_FLAGS | spec.RD, 0]))


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Bit flips, a cut, an extension, or a length or count field set to 0, -1 or huge."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["flip", "flip", "cut", "extend", "field", "field"])
        if kind == "flip" and out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif kind == "cut":
            del out[rng.randrange(len(out) + 1) :]
        elif kind == "extend":
            out += rng.randbytes(rng.randint(1, 64))
        elif len(out) >= 48:
            handle_length = int.from_bytes(out[44:48], "big")
            offsets = [0, 2, 16, 20, 24, 28, 32, 40, 44] + [48 + handle_length + k for k in (0, 4, 8)]
            offset = rng.choice([o for o in offsets if o + 4 <= len(out)])
            number = rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 262145, rng.getrandbits(32)])
            out[offset : offset + 4] = number.to_bytes(4, "big")
    return bytes(out)


def hostile(rng: random.Random, request_id: int) -> bytes:
    """Random bytes, or a mutated valid request; with ``request_id`` when it has room for one."""
    data = rng.randbytes(rng.randint(0, 600)) if rng.random() < 0.2 else mutate(valid_request(rng), rng)
    if len(data) >= 12:
        data = data[:8] + request_id.to_bytes(4, "big") + data[12:]
    return data


def is_response(data: bytes) -> bool:
    return len(data) >= 28 and data[24:28] != bytes(4)


def check_answer(answer: spec.Answer, sent: bytes) -> None:
    """A response code from B.4's table (``spec.Answer`` checks it); rc 1 only about the prefix
    served, and then with the handle as sent."""
    if answer.message.rc == 1 and answer.message.opcode == 1:
        assert served(answer.response.handle), (sent, answer.response.handle)
        with contextlib.suppress(spec.SpecError):
            assert answer.response.handle == spec.decode_request(spec.decode(sent).body).handle


def fuzz_udp(port: int, sent: dict[int, bytes], batch: int = 100) -> dict[int, list[bytes]]:
    """Sends ``sent`` (by request id) in batches; the datagrams that came back, by request id.
    Within a batch, waits until every datagram that is not itself a response is answered."""
    answers: dict[int, list[bytes]] = defaultdict(list)
    ids = list(sent)
    shorts = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((LOOPBACK, port))
        for start_ in range(0, len(ids), batch):
            group = ids[start_ : start_ + batch]
            for request_id in group:
                sock.send(sent[request_id])
            waiting = {i for i in group if not is_response(sent[i]) and len(sent[i]) >= 12}
            shorts += sum(1 for i in group if len(sent[i]) < 12)  # answered with request id 0
            deadline = time.monotonic() + SOCKET_TIMEOUT
            while waiting or len(answers[0]) < shorts:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    datagram = sock.recv(65536)
                except TimeoutError:
                    break
                request_id = int.from_bytes(datagram[8:12], "big")
                answers[request_id].append(datagram)
                if spec.complete(answers[request_id]):
                    waiting.discard(request_id)
            assert not waiting, f"{len(waiting)} datagrams never answered, e.g. {sent[min(waiting)].hex()}"
            assert len(answers[0]) == shorts, "datagrams shorter than a request id never answered"
        sock.settimeout(0.5)  # late answers, e.g. to a datagram that was a response
        with contextlib.suppress(TimeoutError):
            while True:
                datagram = sock.recv(65536)
                answers[int.from_bytes(datagram[8:12], "big")].append(datagram)
    return answers


def test_hostile_datagrams(nodes: Nodes) -> None:
    rng = random.Random(2641)
    sent = {request_id: hostile(rng, request_id) for request_id in range(1_000_000, 1_003_000)}
    answers = fuzz_udp(nodes.main.port, sent)
    assert nodes.main.process.running
    responses = [i for i, data in sent.items() if is_response(data)]
    assert responses and not [i for i in responses if answers.get(i)], "a response was answered"
    kinds: dict[int, int] = defaultdict(int)
    for datagram in answers.pop(0, []):  # to datagrams too short to carry a request id
        assert spec.Answer(datagram).message.rc == 4
    for request_id, datagrams in answers.items():
        assert request_id in sent, request_id
        answer = spec.Answer(spec.reassemble(datagrams))
        kinds[answer.message.rc] += 1
        check_answer(answer, sent[request_id])
    assert kinds[1] and kinds[4] and kinds[100], dict(kinds)  # the fuzz reached the answers, not only the errors
    still_answered(nodes.main)


async def tcp_exchange(port: int, payload: bytes, close: bool) -> tuple[float, bytes | None]:
    """One connection: the time until the node ended it, and what it answered (None: reset)."""
    started = time.monotonic()
    async with asyncio.timeout(TCP_TIMEOUT + MARGIN):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            if payload:
                writer.write(payload)
                await writer.drain()
            if close:
                writer.write_eof()
            answer: bytes | None = await reader.read()
        except ConnectionError:
            answer = None
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return time.monotonic() - started, answer


async def fuzz_tcp(port: int, payloads: list[tuple[bytes, bool]]) -> list[tuple[float, bytes | None] | BaseException]:
    gate = asyncio.Semaphore(50)

    async def one(payload: bytes, close: bool) -> tuple[float, bytes | None]:
        async with gate:
            return await tcp_exchange(port, payload, close)

    return await asyncio.gather(*(one(p, c) for p, c in payloads), return_exceptions=True)


def test_hostile_tcp_connections(nodes: Nodes) -> None:
    rng = random.Random(2642)
    payloads = []
    for request_id in range(2_000_000, 2_000_300):
        roll = rng.random()
        payload = b"" if roll < 0.05 else hostile(rng, request_id)
        payloads.append((payload, roll > 0.5))  # half keep the connection open: the node times them out
    outcomes = asyncio.run(fuzz_tcp(nodes.main.port, payloads))
    assert nodes.main.process.running
    failures = [(p, o) for p, o in zip(payloads, outcomes, strict=True) if isinstance(o, BaseException)]
    assert not failures, f"{len(failures)} connections outlived {TCP_TIMEOUT + MARGIN} s or failed: {failures[:3]}"
    timed_out = 0
    for (payload, _), outcome in zip(payloads, outcomes, strict=True):
        assert not isinstance(outcome, BaseException)
        elapsed, data = outcome
        assert elapsed < TCP_TIMEOUT + MARGIN
        if data:
            answer = spec.Answer(data)
            check_answer(answer, payload)
            timed_out += answer.response.message == b"Read timed out"
    assert timed_out > 10  # the ones left open were answered rc 4 after tcp_timeout
    still_answered(nodes.main)


def still_answered(node: Node) -> None:
    for transport in TRANSPORTS:
        answer = ask(transport, node, request("88.100.1/SN-1"))
        assert answer.message.rc == 1 and contents(answer.response.values) == public(SN_1)
    log = Path(node.process.log_path).read_text(encoding="utf-8")
    assert "Traceback" not in log, log[-3000:]


# --- UDP: a budget per source address --------------------------------------------------------


def burst_answers(sock: socket.socket) -> tuple[set[bytes], float]:
    """The request ids answered on ``sock`` (at least the burst's, then until a second passes
    without an answer), and when the last answer was read."""
    answered: set[bytes] = set()
    last = time.monotonic()
    with contextlib.suppress(TimeoutError):
        while True:
            sock.settimeout(SOCKET_TIMEOUT if len(answered) < RATE else 1.0)
            answer = sock.recv(65536)
            last = time.monotonic()
            assert spec.decode(answer).rc == 100
            answered.add(answer[8:12])
    return answered, last


def test_udp_answers_per_source_are_limited(nodes: Nodes) -> None:
    # Two sources (127.0.0.1 and 127.0.0.2) send 500 datagrams each at once to the node with a
    # budget of RATE answers a second and bursts of RATE per source.
    sources = {}
    for address in (LOOPBACK, "127.0.0.2"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((address, 0))
        sock.connect((LOOPBACK, nodes.plain.port))
        sources[address] = sock
    try:
        started = time.monotonic()
        for sock in sources.values():
            for _ in range(500):
                sock.send(request("88.100.1/NOT-REGISTERED"))
        for address, sock in sources.items():
            answered, last = burst_answers(sock)
            # Each answer took a token of its source's bucket: the burst, plus what the bucket
            # refilled between the first datagram sent and the last answer read.
            bound = RATE + RATE * (last - started) + 1
            assert RATE <= len(answered) <= bound, (address, len(answered), last - started)
    finally:
        for sock in sources.values():
            sock.close()
