"""The Handle protocol through the real hierarchy: three node processes, each with UDP and TCP
Handle listeners; the client walks 0.NA/ prefix handles the way HSJ resolvers do, and hostile
servers of the test's own cannot lead it astray."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from resolver.errors import HopLimitExceeded, NotAuthoritative, NotFound, ReferralLoop, Unavailable
from resolver.handle_client import HandleClient, HandleResolver
from resolver.handle_protocol import (
    PROTOCOL_HTTPS,
    PROTOCOL_TCP,
    PROTOCOL_UDP,
    RC,
    SITE_PREFIX_TYPE,
    SITE_TYPE,
    Flag,
    HandleSite,
    Interface,
    SiteServer,
    blob,
    decode_message,
    decode_resolution_request,
    encode_site,
    error_body,
    respond,
    sites_of,
    values_section,
)
from resolver.record import Permission, Value
from resolver.registrar import Registrar
from resolver.resolver import Trace
from tests.integration.conftest import Cluster, Local


def handle_address(cluster: Cluster, name: str) -> str:
    return f"127.0.0.1:{cluster.processes[name].handle_port}"


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
async def test_the_walk_goes_top_secondary_enterprise_over_0na_prefix_handles(
    hierarchy: Cluster, protocol: str
) -> None:
    top, secondary, enterprise = (handle_address(hierarchy, n) for n in ("top-level", "secondary-100", "enterprise-1"))
    resolver = HandleResolver([top], HandleClient(protocol, timeout=2.0, tcp_fallback=False))
    trace = Trace()
    record = await resolver.resolve("88.100.1/SN-0001", trace)
    assert record.value(2) is not None and record.value(2).data == b"MOTOR-X200"  # type: ignore[union-attr]
    assert [h.server for h in trace.hops] == [top, secondary, enterprise]
    assert [h.question for h in trace.hops] == ["0.NA/88.100.1", "0.NA/88.100.1", "88.100.1/SN-0001"]
    assert trace.hops[0].outcome.startswith("rc 303 PREFIX_REFERRAL")
    assert trace.hops[1].outcome.startswith("rc 1 SUCCESS")

    # The secondary hosts 88.100.2 itself: its own site answers 0.NA/88.100.2 and the identifier.
    trace = Trace()
    part = await resolver.resolve("88.100.2/PART-0001", trace)
    assert part.value(2) is not None and part.value(2).data == b"quality@supplier-2.example.com"  # type: ignore[union-attr]
    assert [h.server for h in trace.hops] == [top, secondary, secondary]

    with pytest.raises(NotFound):
        await resolver.resolve("88.100.1/NO-SUCH-SN")
    with pytest.raises(NotAuthoritative, match="That prefix doesn't live here"):
        await resolver.resolve("99.1/X")
    with pytest.raises(NotFound):  # 88.100.7 was never allocated under the secondary
        await resolver.resolve("88.100.7/X")


async def test_the_hierarchy_of_make_run_resolves_over_the_handle_protocol(local: Local) -> None:
    """idis-local's nodes (TLS, signed writes, HTTPS) as configured by make run: the Handle
    walk from the top-level node's endpoint in endpoints.json, and a write seen at once."""
    resolver = HandleResolver([local.endpoints["top-level"]["handle"]], HandleClient("udp", tcp_fallback=False))
    record = await resolver.resolve("88.100.1/SN-0003")
    assert record.value(3) is not None and record.value(3).data == b"2026-11-03"  # type: ignore[union-attr]
    local.register("88.100.1/HANDLE-1", [{"index": 1, "type": "URL", "data": "https://f1.example.com/h/1"}])
    fresh = await resolver.resolve("88.100.1/HANDLE-1")
    assert [v.data for v in fresh.values] == [b"https://f1.example.com/h/1"]
    local.register("88.100.1/HANDLE-1", [{"index": 1, "type": "URL", "data": "https://f1.example.com/h/2"}])
    assert [v.data for v in (await resolver.resolve("88.100.1/HANDLE-1")).values] == [b"https://f1.example.com/h/2"]


async def test_prefix_handles_answer_hs_site_with_the_delegated_servers_interfaces(hierarchy: Cluster) -> None:
    client = HandleClient("udp", timeout=2.0, tcp_fallback=False)
    top = hierarchy.processes["top-level"]
    secondary = hierarchy.processes["secondary-100"]
    enterprise = hierarchy.processes["enterprise-1"]

    referral = await client.ask("127.0.0.1", top.handle_port, "0.NA/88.100.1")
    assert referral.rc == RC.PREFIX_REFERRAL and referral.handle == ""
    (site,) = sites_of(referral.values, (SITE_PREFIX_TYPE,))
    (server,) = site.servers
    assert server.address == "127.0.0.1"
    assert server.port(PROTOCOL_UDP) == server.port(PROTOCOL_TCP) == secondary.handle_port
    assert server.port(PROTOCOL_HTTPS) == secondary.http_port

    # Exactly the delegated prefix: rc 1 with an HS_SITE (and it is authoritative).
    known = await client.ask("127.0.0.1", top.handle_port, "0.NA/88.100")
    assert known.rc == RC.SUCCESS and known.flags & Flag.AT
    (site,) = sites_of(known.values, (SITE_TYPE,))
    assert site.servers[0].port(PROTOCOL_UDP) == secondary.handle_port
    # Slashless prefix handles are read as 0.NA/ ones.
    assert (await client.ask("127.0.0.1", top.handle_port, "88.100")).values == known.values

    answer = await client.ask("127.0.0.1", secondary.handle_port, "0.NA/88.100.1")
    (site,) = sites_of(answer.values, (SITE_TYPE,))
    assert site.servers[0].port(PROTOCOL_TCP) == enterprise.handle_port
    # The node's own apex: its own interfaces.
    own = await client.ask("127.0.0.1", enterprise.handle_port, "0.NA/88.100.1")
    (site,) = sites_of(own.values, (SITE_TYPE,))
    assert site.servers[0].port(PROTOCOL_UDP) == enterprise.handle_port
    assert dict(site.attributes)["desc"].startswith("IDIS enterprise node")


async def test_redelegating_a_prefix_changes_the_cached_0na_answer_at_once(hierarchy: Cluster) -> None:
    client = HandleClient("udp", timeout=2.0, tcp_fallback=False)
    secondary = hierarchy.processes["secondary-100"]
    before = await client.ask("127.0.0.1", secondary.handle_port, "0.NA/88.100.1")
    assert before == await client.ask("127.0.0.1", secondary.handle_port, "0.NA/88.100.1")  # now cached
    registrar = Registrar(node=hierarchy.address("secondary-100"))
    try:
        await registrar.delegate_prefix("88.100.1", ["127.0.0.1:9+handle:19"])
    finally:
        await registrar.close()
    after = await client.ask("127.0.0.1", secondary.handle_port, "0.NA/88.100.1")
    (site,) = sites_of(after.values, (SITE_TYPE,))
    assert [s.port(PROTOCOL_UDP) for s in site.servers] == [19]
    # ... and a prefix below it, asked of the top-level node, still refers to the secondary.
    top = hierarchy.processes["top-level"]
    below = await client.ask("127.0.0.1", top.handle_port, "0.NA/88.100.1.5")
    assert below.rc == RC.PREFIX_REFERRAL


async def test_dnrf_and_old_clients_get_301_instead_of_a_referral(hierarchy: Cluster) -> None:
    top = hierarchy.processes["top-level"]
    from resolver.handle_protocol import Op, ResolutionRequest, encode_resolution_request, request_message

    body = encode_resolution_request(ResolutionRequest(b"0.NA/88.100.1"))
    for flags, version in ((int(Flag.REC | Flag.PO | Flag.DNRF), (2, 11)), (int(Flag.REC | Flag.PO), (2, 4))):
        message = request_message(Op.RESOLUTION, body, 77, flags=flags, version=version, suggested=version)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(message, ("127.0.0.1", top.handle_port))
            answer = decode_message(sock.recv(4096))
        assert answer.header.rc == RC.SERVER_NOT_RESP
        assert answer.envelope.request_id == 77


def test_idis_resolve_over_the_handle_protocol_from_the_command_line(hierarchy: Cluster) -> None:
    top = handle_address(hierarchy, "top-level")
    for protocol in ("handle-udp", "handle-tcp"):
        command = ["-m", "resolver.cli", "resolve", "--protocol", protocol, "--root", top, "88.100.1/SN-0002"]
        run = subprocess.run(
            [sys.executable, *command, "--json", "--trace"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "IDIS_CA": ""},
        )
        assert run.returncode == 0, run.stderr
        document = json.loads(run.stdout)
        assert document["identifier"] == "88.100.1/SN-0002"
        assert {v["type"] for v in document["values"]} == {"URL", "PRODUCT_MODEL", "MANUFACTURE_DATE"}
        assert len(document["trace"]) == 3
    text = subprocess.run(
        [
            sys.executable,
            "-m",
            "resolver.cli",
            "resolve",
            "--protocol",
            "handle-tcp",
            "--root",
            top,
            "88.100.1/SN-0002",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = text.stdout.splitlines()
    assert lines[0] == "88.100.1/SN-0002"  # no "(version 0)": the Handle protocol carries no version
    assert "PRODUCT_MODEL" in lines[2] and "MOTOR-X200" in lines[2]
    missing = subprocess.run(
        [sys.executable, "-m", "resolver.cli", "resolve", "--protocol", "handle-udp", "--root", top, "88.100.1/NOPE"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 3, missing.stdout + missing.stderr  # EXIT_NOT_FOUND


# --- hostile servers of the test's own ------------------------------------------------------


@contextlib.contextmanager
def rogue_server(answer: Callable[[bytes, int], bytes | None]) -> Iterator[int]:
    """A UDP server on 127.0.0.1 answering every request with ``answer(request, own_port)``;
    stops when the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)
    port = int(sock.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, source = sock.recvfrom(4096)
            except TimeoutError:
                continue
            reply = answer(data, port)
            if reply is not None:
                sock.sendto(reply, source)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def referral_to(port: int) -> Callable[[bytes, int], bytes]:
    """A server that refers every prefix handle to the site at ``port``."""

    def answer(data: bytes, own_port: int) -> bytes:
        request = decode_message(data)
        site = HandleSite((SiteServer(1, "127.0.0.1", (Interface(2, PROTOCOL_UDP, port),)),))
        value = Value(1, SITE_PREFIX_TYPE, encode_site(site), permissions=Permission.PUBLIC_READ)
        return respond(request, RC.PREFIX_REFERRAL, blob(b"") + values_section([value]), 1, 0)

    return answer


async def test_a_server_that_refers_to_itself_is_a_loop() -> None:
    with rogue_server(lambda data, own: referral_to(own)(data, own)) as port:
        resolver = HandleResolver([f"127.0.0.1:{port}"], HandleClient("udp", timeout=1.0, tcp_fallback=False))
        with pytest.raises(ReferralLoop):
            await resolver.resolve("88.100.1/SN-0001")


async def test_servers_referring_in_a_ring_stop_at_the_hop_limit() -> None:
    chain: list[int] = []

    def onward(index: int) -> Callable[[bytes, int], bytes]:
        return lambda data, own: referral_to(chain[(index + 1) % len(chain)])(data, own)

    with contextlib.ExitStack() as stack:
        chain.extend(stack.enter_context(rogue_server(onward(i))) for i in range(12))
        resolver = HandleResolver([f"127.0.0.1:{chain[0]}"], HandleClient("udp", timeout=1.0, tcp_fallback=False))
        with pytest.raises(HopLimitExceeded):
            await resolver.resolve("88.100.1/SN-0001")


async def test_an_answer_for_another_handle_or_request_is_refused() -> None:
    def other_handle(data: bytes, own: int) -> bytes:
        request = decode_message(data)
        query = decode_resolution_request(request.body)
        if query.handle.startswith(b"0.NA/"):
            site = HandleSite((SiteServer(1, "127.0.0.1", (Interface(2, PROTOCOL_UDP, own),)),))
            value = Value(1, SITE_TYPE, encode_site(site), permissions=Permission.PUBLIC_READ)
            return respond(request, RC.SUCCESS, blob(query.handle) + values_section([value]), 1, 0)
        forged = Value(1, "URL", b"https://evil.example/")
        return respond(request, RC.SUCCESS, blob(b"88.100.1/SOMETHING-ELSE") + values_section([forged]), 1, 0)

    with rogue_server(other_handle) as port:
        resolver = HandleResolver([f"127.0.0.1:{port}"], HandleClient("udp", timeout=1.0, tcp_fallback=False))
        with pytest.raises(Unavailable, match=r"answered for '88\.100\.1/SOMETHING-ELSE'"):
            await resolver.resolve("88.100.1/SN-0001")

    def wrong_id(data: bytes, own: int) -> bytes:
        request = decode_message(data)
        reply = bytearray(respond(request, RC.HANDLE_NOT_FOUND, error_body(""), 1, 0))
        reply[8:12] = (int.from_bytes(reply[8:12], "big") ^ 1).to_bytes(4, "big")
        return bytes(reply)

    with rogue_server(wrong_id) as port:
        client = HandleClient("udp", timeout=0.3, attempts=2, tcp_fallback=False)
        with pytest.raises(Exception, match="no answer"):  # someone else's answer is ignored
            await client.ask("127.0.0.1", port, "88.100.1/SN-0001")


def _answered(port: int, source: str, count: int) -> int:
    """How many of ``count`` requests sent at once from ``source`` get an answer."""
    from resolver.handle_protocol import Op, ResolutionRequest, encode_resolution_request, request_message

    body = encode_resolution_request(ResolutionRequest(b"88.100.1/SN-0001"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for n in range(count):
            sock.sendto(request_message(Op.RESOLUTION, body, n + 1), ("127.0.0.1", port))
        sock.settimeout(1.0)
        answers = 0
        with contextlib.suppress(TimeoutError):
            while True:
                sock.recv(4096)
                answers += 1
    return answers


def test_on_a_dual_stack_socket_each_ipv4_source_has_its_own_budget(cluster: Cluster) -> None:
    """IPv4 clients reach a [::] socket as ::ffff:a.b.c.d: each must still be its own source,
    or one client (or anyone spoofing any IPv4 address) spends every IPv4 client's budget."""
    from nodes.hierarchy import NodeSpec

    extra: dict[str, dict[str, Any]] = {
        "node": {"handle_listen": "[::]:0"},
        "handle": {"advertise": "127.0.0.1", "udp_rate_per_source": 1, "udp_burst": 20},
    }
    cluster.start(NodeSpec("enterprise-1", "enterprise", "88.100.1", 0, extra))
    port = cluster.processes["enterprise-1"].handle_port
    first = _answered(port, "127.0.0.1", 100)
    assert 10 <= first <= 20 + 5  # the burst, and what a second at 1/s refills
    assert _answered(port, "127.0.0.1", 50) <= 5  # its budget is spent ...
    assert _answered(port, "127.0.0.2", 10) == 10  # ... another IPv4 source's is not
