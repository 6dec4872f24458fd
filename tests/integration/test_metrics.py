"""Prometheus metrics and lifecycle of a real node process."""

from __future__ import annotations

import asyncio
import re
import signal
import urllib.request

import grpc
import grpc.aio
import pytest

from nodes.hierarchy import NodeSpec
from resolver.errors import NotFound
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.resolver import Resolver
from resolver.wire import resolution_pb2, resolution_pb2_grpc
from tests.integration.conftest import Cluster


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


async def test_requests_registrations_referrals_and_prefixes_are_counted(hierarchy: Cluster) -> None:
    spec = NodeSpec("observed", "secondary", "88.200", 0, extra={"node": {"metrics_listen": "127.0.0.1:0"}})
    address = await asyncio.to_thread(hierarchy.start, spec)
    registrar = Registrar(node=address)
    try:
        await registrar.create_prefix("88.200.1")
        await registrar.delegate_prefix("88.200.2", ["127.0.0.1:9"])
        await registrar.create("88.200.1/A", [Value(1, "URL", b"a")])
        await registrar.batch_create([(f"88.200.1/B-{n}", [Value(1, "URL", b"b")]) for n in range(5)])
    finally:
        await registrar.close()
    async with Resolver([address]) as resolver:
        await resolver.resolve("88.200.1/A")
        with pytest.raises(NotFound):
            await resolver.resolve("88.200.1/none")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = resolution_pb2_grpc.ResolutionStub(channel)
        answer = await stub.Resolve(resolution_pb2.ResolveRequest(identifier="88.200.2/x"))
        assert answer.HasField("referral")
    samples = await asyncio.to_thread(scrape, hierarchy.processes["observed"].metrics_port)
    assert samples['idis_requests_total{code="OK",method="Resolve"}'] >= 2
    assert samples['idis_requests_total{code="NOT_FOUND",method="Resolve"}'] == 1
    assert samples['idis_requests_total{code="OK",method="BatchCreate"}'] == 1
    assert samples['idis_request_duration_seconds_count{method="Resolve"}'] >= 3
    assert samples['idis_store_operation_duration_seconds_count{operation="write_transaction"}'] >= 4
    assert samples['idis_registrations_total{prefix="88.200.1"}'] == 6
    assert samples["idis_referrals_total"] == 1
    assert samples['idis_identifiers{prefix="88.200.1"}'] == 6
    assert samples['idis_node_info{cache="cython",name="observed",role="secondary"}'] == 1


async def test_health_serving_and_graceful_stop(cluster: Cluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = await asyncio.to_thread(cluster.start, NodeSpec("h", "enterprise", "88.9", 0))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service="idis.v1.Resolution"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    process = cluster.processes["h"]
    process.signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait) == 0  # drained and closed the store cleanly
