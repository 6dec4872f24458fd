"""A node as two worker processes on one port: both serve, and no worker answers stale."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import grpc
import grpc.aio

from bench.idis_bench import process_cpu_seconds
from nodes.hierarchy import NodeSpec
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.wire import resolution_pb2
from tests.integration.conftest import Cluster


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
