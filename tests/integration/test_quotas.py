"""Quotas on real nodes: every stream message and every batch item is paid for, and recursive
resolution is bounded per call and paid for by the caller."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest

from nodes.hierarchy import NodeSpec
from resolver.status import error_from_rpc
from resolver.wire import resolution_pb2
from tests.integration.conftest import Cluster
from tests.prometheus_text import scrape

Code = grpc.StatusCode
RAW: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}


def batch(identifiers: list[str], recursive: bool = False) -> bytes:
    requests = [resolution_pb2.ResolveRequest(identifier=i, recursive=recursive) for i in identifiers]
    return resolution_pb2.ResolveBatchRequest(requests=requests).SerializeToString()


def items(answer: bytes) -> list[Any]:
    return list(resolution_pb2.ResolveBatchResponse.FromString(answer).items)


async def start_limited(cluster: Cluster, quotas: dict[str, Any]) -> str:
    spec = NodeSpec("limited", "enterprise", "88.21", 0, extra={"quotas": quotas})
    return await asyncio.to_thread(cluster.start, spec)


async def test_every_message_of_a_stream_is_charged(cluster: Cluster) -> None:
    # A tiny rate: in any time this test takes, the bucket refills by less than one token.
    address = await start_limited(cluster, {"peer_calls_per_second": 0.01, "peer_burst": 10})
    answered = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stream: Any = channel.stream_stream("/idis.v1.Resolution/ResolveStream", **RAW)
        call = stream()

        async def send_200() -> None:
            nonlocal answered
            for _ in range(200):  # one batch at a time, as a client reading its answers does
                await call.write(batch(["88.21/X"]))
                await call.read()
                answered += 1

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send_200()
    assert refused.value.code() == Code.RESOURCE_EXHAUSTED
    assert "peer 127.0.0.1 is over its limit of 0.01 calls/s" in (refused.value.details() or "")
    assert answered == 9  # the stream costs 1, each message 1: 200 of 200 before


async def test_a_batch_costs_one_token_per_item(cluster: Cluster) -> None:
    address = await start_limited(cluster, {"peer_calls_per_second": 0.01, "peer_burst": 100})
    async with grpc.aio.insecure_channel(address) as channel:
        resolve_batch = channel.unary_unary("/idis.v1.Resolution/ResolveBatch", **RAW)
        ping = channel.unary_unary("/idis.v1.Resolution/Ping", **RAW)
        answer = await resolve_batch(batch([f"88.21/B-{n}" for n in range(300)]))
        assert len(items(answer)) == 300  # more than the burst: admitted from a full bucket, 200 owed
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ping(b"")
    assert refused.value.code() == Code.RESOURCE_EXHAUSTED
    error = error_from_rpc(refused.value, address)
    assert error.reason == "RATE_LIMITED"
    assert error.retry_after > 20_000  # 201 tokens at 0.01/s, in google.rpc.RetryInfo


def resolutions_upstream(metrics_port: int) -> float:
    """Recursive resolutions a node made upstream (its idis_resolver_hops histogram's count)."""
    return scrape(metrics_port).total("idis_resolver_hops_count")


async def start_recursive(hierarchy: Cluster, quotas: dict[str, Any]) -> tuple[str, int]:
    extra: dict[str, dict[str, Any]] = {
        "recursion": {"enabled": True, "roots": [hierarchy.address("top-level")]},
        "node": {"metrics_listen": "127.0.0.1:0"},
        "quotas": quotas,
    }
    address = await asyncio.to_thread(hierarchy.start, NodeSpec("recursive", "recursive", "", 0, extra=extra))
    return address, hierarchy.processes["recursive"].metrics_port


async def test_a_recursive_batch_makes_a_bounded_number_of_upstream_resolutions(hierarchy: Cluster) -> None:
    address, metrics_port = await start_recursive(hierarchy, {})  # the defaults: 16 per call
    wanted = [f"88.100.1/SN-{n:04d}" for n in range(1, 301)]
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await channel.unary_unary("/idis.v1.Resolution/ResolveBatch", **RAW)(batch(wanted, recursive=True))
    statuses = [item.status.code for item in items(answer)]
    exhausted = [i for i, code in enumerate(statuses) if code == Code.RESOURCE_EXHAUSTED.value[0]]
    assert exhausted == list(range(16, 300))
    assert statuses[:3] == [Code.OK.value[0]] * 3  # SN-0001..3 exist, the rest of the 16 are NOT_FOUND
    message = items(answer)[16].status.message
    assert "at most 16 identifiers are resolved recursively per call" in message
    assert resolutions_upstream(metrics_port) == 16  # 300 before


async def test_recursive_resolutions_are_paid_for_by_the_caller(hierarchy: Cluster) -> None:
    quotas: dict[str, Any] = {"peer_calls_per_second": 0.01, "peer_burst": 350, "recursive_cost": 100}
    address, metrics_port = await start_recursive(hierarchy, quotas)
    identifiers = ["88.100.1/SN-0001", "88.100.1/SN-0002", "88.100.1/SN-0003"]
    async with grpc.aio.insecure_channel(address) as channel:
        resolve_batch = channel.unary_unary("/idis.v1.Resolution/ResolveBatch", **RAW)
        first = items(await resolve_batch(batch(identifiers, recursive=True)))  # 3 items + 3 x 100
        assert [item.status.code for item in first] == [Code.OK.value[0]] * 3
        again = items(await resolve_batch(batch(identifiers[:1], recursive=True)))  # 1 + 100 > 47 left
        resolve = channel.unary_unary("/idis.v1.Resolution/Resolve", **RAW)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await resolve(resolution_pb2.ResolveRequest(identifier=identifiers[0], recursive=True).SerializeToString())
    assert again[0].status.code == Code.RESOURCE_EXHAUSTED.value[0]
    assert "peer 127.0.0.1 is over its limit" in again[0].status.message
    assert refused.value.code() == Code.RESOURCE_EXHAUSTED
    assert resolutions_upstream(metrics_port) == 3


async def test_http_and_grpc_calls_spend_one_budget_per_peer(cluster: Cluster) -> None:
    # A tiny rate: in any time this test takes, the bucket refills by less than one token.
    spec = NodeSpec(
        "limited",
        "enterprise",
        "88.21",
        0,
        extra={"quotas": {"peer_calls_per_second": 0.01, "peer_burst": 3}, "node": {"http_listen": "127.0.0.1:0"}},
    )
    address = await asyncio.to_thread(cluster.start, spec)
    base = f"http://127.0.0.1:{cluster.processes['limited'].http_port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # two tokens over HTTP
            async with session.get(base + "/api/handles/88.21/NONE") as response:
                assert response.status == 404
        async with grpc.aio.insecure_channel(address) as channel:  # the third over gRPC
            ping = channel.unary_unary("/idis.v1.Resolution/Ping", **RAW)
            await ping(resolution_pb2.PingRequest().SerializeToString())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ping(resolution_pb2.PingRequest().SerializeToString())
            assert refused.value.code() == Code.RESOURCE_EXHAUSTED
        async with session.get(base + "/api/handles/88.21/NONE") as response:
            assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
            assert (await response.json())["responseCode"] == 3
