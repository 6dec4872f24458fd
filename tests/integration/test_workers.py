"""A node as two worker processes on one port: both serve, no worker answers stale, and the
supervisor serves one /metrics that sums them, with the probes for all of them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import grpc.aio

from bench.idis_bench import process_cpu_seconds
from nodes.hierarchy import NodeSpec
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.wire import resolution_pb2
from tests.integration.conftest import Cluster
from tests.integration.test_metrics import STANDARD
from tests.prometheus_text import Exposition, scrape
from tests.unit.test_probes import get as probe

OBSERVED = NodeSpec(
    "w",
    "enterprise",
    "88.7",
    0,
    extra={"node": {"workers": 2, "metrics_listen": "127.0.0.1:0"}, "metrics": {"report_interval": 0.2}},
)
"""Two workers whose supervisor serves /metrics; they report five times a second."""

BOUND = 300  # polls of 0.1 s: how long a state the node reaches by itself may take (30 s)


async def resolve_on_fresh_connections(address: str, identifier: str, connections: int) -> set[bytes]:
    """The distinct answers seen over ``connections`` new TCP connections (SO_REUSEPORT spreads
    them over the workers)."""
    request = resolution_pb2.ResolveRequest(identifier=identifier).SerializeToString()
    answers = set()
    for _ in range(connections):
        async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            rpc = channel.unary_unary(
                "/idis.v1.Resolution/Resolve", request_serializer=None, response_deserializer=None
            )
            for _ in range(3):  # the first fills that worker's cache, the others hit it
                answers.add(await rpc(request))
    return answers


async def test_two_workers_share_the_port_and_never_serve_stale(cluster: Cluster) -> None:
    address = await asyncio.to_thread(
        cluster.start, NodeSpec("w", "enterprise", "88.7", 0, extra={"node": {"workers": 2}})
    )
    registrar = Registrar(node=address)
    try:
        await registrar.create("88.7/X", [Value(1, "URL", b"version-1")])
        answers = await resolve_on_fresh_connections(address, "88.7/X", 12)
        assert len(answers) == 1 and b"version-1" in next(iter(answers))
        for version in range(2, 6):  # each write lands on one worker; every worker must see it
            await registrar.replace("88.7/X", [Value(1, "URL", b"version-%d" % version)])
            answers = await resolve_on_fresh_connections(address, "88.7/X", 12)
            assert len(answers) == 1 and b"version-%d" % version in next(iter(answers))
        await registrar.create_prefix("88.7.1")  # the prefix table changes on every worker too
        await registrar.create("88.7.1/Y", [Value(1, "URL", b"y")])
        assert len(await resolve_on_fresh_connections(address, "88.7.1/Y", 12)) == 1
    finally:
        await registrar.close()


async def get_on_fresh_connections(base: str, path: str, connections: int) -> set[str]:
    """The distinct HTTP answers seen over ``connections`` new TCP connections (spread over the
    workers by SO_REUSEPORT), three requests on each: the first may fill that worker's cache."""
    answers = set()
    for _ in range(connections):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=False)) as session:
            for _ in range(3):
                async with session.get(base + path) as response:
                    answers.add(f"{response.status} {await response.text()}")
    return answers


async def test_the_http_api_on_two_workers_never_serves_stale(cluster: Cluster) -> None:
    spec = NodeSpec("w", "enterprise", "88.7", 0, extra={"node": {"workers": 2, "http_listen": "127.0.0.1:0"}})
    address = await asyncio.to_thread(cluster.start, spec)
    base = f"http://127.0.0.1:{cluster.processes['w'].http_port}"
    registrar = Registrar(node=address)
    try:
        await registrar.create("88.7/H", [Value(1, "URL", b"version-1")])
        for version in range(1, 5):  # a gRPC write lands on one worker; every worker's HTTP cache must drop it
            if version > 1:
                await registrar.replace("88.7/H", [Value(1, "URL", b"version-%d" % version)])
            answers = await get_on_fresh_connections(base, "/api/handles/88.7/H", 12)
            assert len(answers) == 1 and f"version-{version}" in next(iter(answers)), answers
        async with aiohttp.ClientSession() as session:  # a REST write, then gRPC and REST agree
            body = {"values": [{"index": 1, "type": "URL", "data": "via-rest"}]}
            async with session.put(base + "/api/handles/88.7/H", json=body) as response:
                assert response.status == 200
        answers = await get_on_fresh_connections(base, "/api/handles/88.7/H", 12)
        assert len(answers) == 1 and "via-rest" in next(iter(answers))
        await registrar.delete("88.7/H")
        answers = await get_on_fresh_connections(base, "/api/handles/88.7/H", 12)
        assert answers == {'404 {"responseCode":100,"handle":"88.7/H"}'}
    finally:
        await registrar.close()


async def test_every_worker_takes_load(cluster: Cluster) -> None:
    address = await asyncio.to_thread(
        cluster.start, NodeSpec("w", "enterprise", "88.7", 0, extra={"node": {"workers": 2}})
    )
    process = cluster.processes["w"]
    assert process.proc is not None
    pids = process.worker_pids
    assert len(pids) == 2
    registrar = Registrar(node=address)
    try:
        await registrar.create("88.7/LOAD", [Value(1, "URL", b"x")])
    finally:
        await registrar.close()
    before = [process_cpu_seconds(p) for p in pids]
    await resolve_on_fresh_connections(address, "88.7/LOAD", 40)
    after = [process_cpu_seconds(p) for p in pids]
    assert all(b > a for a, b in zip(before, after, strict=True))


async def test_a_worker_that_dies_is_replaced(cluster: Cluster) -> None:
    spec = NodeSpec("w", "enterprise", "88.7", 0, extra={"node": {"workers": 2, "log_format": "json"}})
    address = await asyncio.to_thread(cluster.start, spec)
    process = cluster.processes["w"]
    os.kill(process.worker_pids[0], signal.SIGKILL)

    def events() -> list[dict[str, Any]]:
        lines = process.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def serving_worker_0() -> int:
        return sum(1 for e in events() if e.get("worker") == 0 and " serving 88.7 on " in e["message"])

    for _ in range(600):  # until the supervisor has started a new worker 0 (at most a minute)
        if serving_worker_0() == 2:
            break
        await asyncio.sleep(0.1)
    assert serving_worker_0() == 2
    assert any("worker 0 exited with -9; restarting it" in e["message"] for e in events())
    registrar = Registrar(node=address)
    try:
        await registrar.create("88.7/AFTER", [Value(1, "URL", b"after")])
    finally:
        await registrar.close()
    answers = await resolve_on_fresh_connections(address, "88.7/AFTER", 12)
    assert len(answers) == 1 and b"after" in next(iter(answers))
    assert process.running


async def ping_on_fresh_connections(address: str, connections: int) -> None:
    for _ in range(connections):
        async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            ping = channel.unary_unary("/idis.v1.Resolution/Ping", request_serializer=None, response_deserializer=None)
            await ping(b"")


async def eventually(check: Callable[[], bool]) -> bool:
    """Whether ``check`` holds within BOUND polls (the workers report every 0.2 s)."""
    for _ in range(BOUND):
        if await asyncio.to_thread(check):
            return True
        await asyncio.sleep(0.1)
    return False


async def test_one_metrics_endpoint_counts_every_call_once(cluster: Cluster) -> None:
    address = await asyncio.to_thread(cluster.start, OBSERVED)
    process = cluster.processes["w"]
    registrar = Registrar(node=address)
    try:
        for n in range(3):
            await registrar.create(f"88.7/M-{n}", [Value(1, "URL", b"m")])
    finally:
        await registrar.close()
    await ping_on_fresh_connections(address, 24)  # spread over both workers by the kernel
    await resolve_on_fresh_connections(address, "88.7/M-0", 12)
    resolved = 12 * 3  # calls made
    cpu_before = sum(process_cpu_seconds(pid) for pid in process.worker_pids)

    metrics = await asyncio.to_thread(scrape, process.metrics_port)
    assert metrics.value("idis_requests_total", method="Ping", code="OK") == 24
    assert metrics.value("idis_requests_total", method="Resolve", code="OK") == resolved
    assert metrics.value("idis_request_duration_seconds_count", method="Ping") == 24
    assert metrics.value("idis_registrations_total", prefix="88.7") == 3
    assert metrics.value("idis_identifiers", prefix="88.7") == 3  # read once, not once per worker
    assert len(metrics.samples("idis_node_info")) == 1
    assert metrics.value("idis_node_info", name="w", role="enterprise", cache="cython") == 1
    assert set(STANDARD) <= metrics.families
    # the node's CPU: the supervisor's and every worker's (which only grows)
    assert metrics.value("process_cpu_seconds_total") >= cpu_before

    def cache_lookups() -> float:  # each Resolve is one hit or one miss, in one worker's cache
        metrics = scrape(process.metrics_port)
        labels = {"node": "w", "implementation": "cython"}
        return metrics.value("idis_cache_hits_total", **labels) + metrics.value("idis_cache_misses_total", **labels)

    assert await eventually(lambda: cache_lookups() == resolved), cache_lookups()


async def test_counters_survive_a_replaced_worker_and_its_live_gauges_go(cluster: Cluster) -> None:
    address = await asyncio.to_thread(cluster.start, OBSERVED)
    process = cluster.processes["w"]
    await ping_on_fresh_connections(address, 20)
    before: Exposition = await asyncio.to_thread(scrape, process.metrics_port)
    killed = process.worker_pids[0]
    shared = cluster.state / "w.sqlite3.metrics"
    assert list(shared.glob(f"gauge_livesum_{killed}.db"))  # its cache entries and bytes
    os.kill(killed, signal.SIGKILL)

    def replaced() -> bool:
        return not list(shared.glob(f"gauge_live*_{killed}.db")) and probe(process.metrics_port, "/readyz")[0] == 200

    assert await eventually(replaced)  # mark_process_dead dropped its cache gauges; the node is ready again
    await ping_on_fresh_connections(address, 4)
    after = await asyncio.to_thread(scrape, process.metrics_port)
    assert after.value("idis_requests_total", method="Ping", code="OK") == 24  # the dead worker's 20 kept
    assert after.value("process_cpu_seconds_total") >= before.value("process_cpu_seconds_total")


async def test_probes_answer_for_every_worker(cluster: Cluster) -> None:
    await asyncio.to_thread(cluster.start, OBSERVED)
    process = cluster.processes["w"]
    port = process.metrics_port
    assert await asyncio.to_thread(probe, port, "/readyz") == (200, "SERVING\n")
    assert await asyncio.to_thread(probe, port, "/healthz") == (200, "alive\n")
    wedged = process.worker_pids[1]
    os.kill(wedged, signal.SIGSTOP)  # its event loop no longer turns
    try:
        assert await eventually(lambda: probe(port, "/healthz")[0] == 503)
        status, text = await asyncio.to_thread(probe, port, "/healthz")
        assert status == 503 and "worker 1 has not reported" in text
        assert (await asyncio.to_thread(probe, port, "/readyz"))[0] == 503
    finally:
        os.kill(wedged, signal.SIGCONT)
    assert await eventually(lambda: probe(port, "/healthz") == (200, "alive\n"))
    assert await eventually(lambda: probe(port, "/readyz") == (200, "SERVING\n"))


async def test_the_shared_metrics_folder_is_made_afresh_and_removed(cluster: Cluster) -> None:
    shared = cluster.state / "w.sqlite3.metrics"
    shared.mkdir()
    (shared / "counter_999999.db").write_bytes(b"left by a node that was killed")
    await asyncio.to_thread(cluster.start, OBSERVED)
    assert shared.is_dir() and not (shared / "counter_999999.db").exists()
    assert await asyncio.to_thread(cluster.processes["w"].stop) == 0
    assert not shared.exists()
