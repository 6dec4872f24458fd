"""Prometheus metrics and lifecycle of a real node process (one process; a node of several
workers is in test_workers)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

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
from tests.prometheus_text import scrape

STANDARD = (
    "process_cpu_seconds",
    "process_resident_memory_bytes",
    "process_open_fds",
    "python_info",
    "python_gc_collections",
)
"""Some of prometheus_client's process, platform and GC metrics, which every node exports."""


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
    metrics = await asyncio.to_thread(scrape, hierarchy.processes["observed"].metrics_port)
    assert metrics.value("idis_requests_total", method="Resolve", code="OK") >= 2
    assert metrics.value("idis_requests_total", method="Resolve", code="NOT_FOUND") == 1
    assert metrics.value("idis_requests_total", method="BatchCreate", code="OK") == 1
    assert metrics.value("idis_request_duration_seconds_count", method="Resolve") >= 3
    assert metrics.value("idis_store_operation_duration_seconds_count", operation="write_transaction") >= 4
    assert metrics.value("idis_registrations_total", prefix="88.200.1") == 6
    assert metrics.value("idis_referrals_total") == 1
    assert metrics.value("idis_identifiers", prefix="88.200.1") == 6
    assert metrics.value("idis_node_info", cache="cython", name="observed", role="secondary") == 1
    assert set(STANDARD) <= metrics.families
    assert metrics.value("process_cpu_seconds_total") > 0
    assert metrics.value("process_resident_memory_bytes") > 0


async def test_per_prefix_series_are_bounded_by_top_prefixes(cluster: Cluster) -> None:
    """With [metrics] top_prefixes = 2, the two largest prefixes have series of their own and
    the others are summed under prefix="(other)"; registrations keep the series they started with."""
    extra: dict[str, dict[str, Any]] = {"node": {"metrics_listen": "127.0.0.1:0"}, "metrics": {"top_prefixes": 2}}
    address = await asyncio.to_thread(cluster.start, NodeSpec("bounded", "secondary", "88.300", 0, extra=extra))
    sizes = {"88.300.1": 1, "88.300.2": 4, "88.300.3": 3, "88.300.4": 2}  # registered in this order
    registrar = Registrar(node=address)
    try:
        for prefix, size in sizes.items():
            await registrar.create_prefix(prefix)
            await registrar.batch_create([(f"{prefix}/N-{n}", [Value(1, "URL", b"n")]) for n in range(size)])
    finally:
        await registrar.close()
    metrics = await asyncio.to_thread(scrape, cluster.processes["bounded"].metrics_port)
    assert sorted(metrics.label_values("idis_identifiers", "prefix")) == ["(other)", "88.300.2", "88.300.3"]
    assert metrics.value("idis_identifiers", prefix="(other)") == 1 + 2
    # the first two prefixes registered into took the two places; the rest are "(other)"
    assert sorted(metrics.label_values("idis_registrations_total", "prefix")) == ["(other)", "88.300.1", "88.300.2"]
    assert metrics.value("idis_registrations_total", prefix="(other)") == 3 + 2
    assert metrics.total("idis_registrations_total") == sum(sizes.values())

    # Restarted, the node gives the places to the largest prefixes it holds.
    await asyncio.to_thread(cluster.processes["bounded"].stop)
    address = await asyncio.to_thread(cluster.restart, "bounded")
    registrar = Registrar(node=address)
    try:
        for prefix in sizes:
            await registrar.create(f"{prefix}/AFTER", [Value(1, "URL", b"n")])
    finally:
        await registrar.close()
    metrics = await asyncio.to_thread(scrape, cluster.processes["bounded"].metrics_port)
    assert sorted(metrics.label_values("idis_registrations_total", "prefix")) == ["(other)", "88.300.2", "88.300.3"]
    assert metrics.value("idis_registrations_total", prefix="(other)") == 2


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
