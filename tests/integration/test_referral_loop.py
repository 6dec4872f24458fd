"""Misconfigured delegations: two nodes that refer to each other, and a recursive node in front."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from nodes.hierarchy import NodeSpec
from resolver.errors import ReferralLoop
from resolver.registrar import Registrar
from resolver.resolver import Resolver, Trace
from resolver.wire import resolution_pb2, resolution_pb2_grpc
from tests.integration.conftest import Cluster


def loop(cluster: Cluster) -> tuple[str, str]:
    """Node A (apex 88) delegates 88.100 to B; B, wrongly also configured with apex 88,
    delegates 88.100 back to A."""
    a = cluster.start(NodeSpec("a", "top-level", "88", 0))
    b = cluster.start(NodeSpec("b", "top-level", "88", 0))

    async def wire() -> None:
        for node, target in ((a, b), (b, a)):
            registrar = Registrar(node=node)
            try:
                await registrar.delegate_prefix("88.100", [target])
            finally:
                await registrar.close()

    asyncio.run(wire())
    return a, b


async def test_the_resolver_detects_a_referral_loop(cluster: Cluster) -> None:
    a, b = await asyncio.to_thread(loop, cluster)
    async with Resolver([a]) as resolver:
        trace = Trace()
        with pytest.raises(ReferralLoop, match=f"referral loop resolving 88.100.1/x: {a} -> {b} -> {a}"):
            await resolver.resolve("88.100.1/x", trace)
        assert [h.server for h in trace.hops] == [a, b]


async def test_a_recursive_node_answers_a_loop_with_failed_precondition(cluster: Cluster) -> None:
    a, _b = await asyncio.to_thread(loop, cluster)
    recursive = await asyncio.to_thread(
        cluster.start,
        NodeSpec("recursive", "recursive", "", 0, extra={"recursion": {"enabled": True, "roots": [a]}}),
    )
    async with grpc.aio.insecure_channel(recursive) as channel:
        stub = resolution_pb2_grpc.ResolutionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Resolve(resolution_pb2.ResolveRequest(identifier="88.100.1/x", recursive=True))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "referral loop" in (info.value.details() or "")


async def test_a_recursive_node_resolves_through_the_hierarchy(hierarchy: Cluster) -> None:
    top = hierarchy.address("top-level")
    recursive = await asyncio.to_thread(
        hierarchy.start,
        NodeSpec("recursive", "recursive", "", 0, extra={"recursion": {"enabled": True, "roots": [top]}}),
    )
    async with grpc.aio.insecure_channel(recursive) as channel:
        stub = resolution_pb2_grpc.ResolutionStub(channel)
        answer = await stub.Resolve(resolution_pb2.ResolveRequest(identifier="88.100.1/SN-0002", recursive=True))
        assert answer.record.identifier == "88.100.1/SN-0002" and len(answer.record.values) == 3
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Resolve(resolution_pb2.ResolveRequest(identifier="88.100.1/none", recursive=True))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
