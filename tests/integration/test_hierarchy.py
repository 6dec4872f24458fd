"""Three real nodes: delegations through the API, registration at two tiers, resolution by referral."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from resolver.errors import NotFound
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.resolver import Resolver, Trace
from resolver.wire import resolution_pb2, resolution_pb2_grpc
from tests.engines import ENGINES
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.parametrize("store_engine", ENGINES)


async def test_resolution_follows_referrals_top_to_enterprise_then_hits_the_cache(hierarchy: Cluster) -> None:
    top, secondary, enterprise = (hierarchy.address(n) for n in ("top-level", "secondary-100", "enterprise-1"))
    async with Resolver([top]) as resolver:
        trace = Trace()
        record = await resolver.resolve("88.100.1/SN-0001", trace)
        assert record.value(2) is not None and record.value(2).data == b"MOTOR-X200"  # type: ignore[union-attr]
        assert [h.server for h in trace.hops] == [top, secondary, enterprise]
        assert trace.hops[0].outcome.startswith("referral 88.100 ->")
        assert trace.hops[1].outcome.startswith("referral 88.100.1 ->")

        again = Trace()
        assert await resolver.resolve("88.100.1/SN-0001", again) == record
        assert again.network_hops == 0 and again.hops[0].server == "cache"

        # A sibling under the same enterprise prefix starts at the cached referral: one hop.
        sibling = Trace()
        await resolver.resolve("88.100.1/SN-0002", sibling)
        assert sibling.network_hops == 1 and sibling.hops[-1].server == enterprise

        # The secondary node hosts 88.100.2 itself: two hops from the top.
        hosted = Trace()
        part = await resolver.resolve("88.100.2/PART-0001", hosted)
        assert [h.server for h in hosted.hops if h.server != "cache"] == [secondary]  # 88.100 referral cached
        assert part.value(2) is not None


async def test_registration_through_enterprise_and_secondary_nodes(hierarchy: Cluster) -> None:
    top, secondary, enterprise = (hierarchy.address(n) for n in ("top-level", "secondary-100", "enterprise-1"))
    values = [Value(1, "URL", b"https://f1.example.com/new"), Value(2, "EMAIL", b"ops@f1.example.com")]
    registrar = Registrar(Resolver([top]))
    try:
        # Located by following referrals: the enterprise node for 88.100.1, the secondary for 88.100.2.
        assert [s.address for s in (await registrar.site_for("88.100.1/NEW-1")).servers] == [enterprise]
        assert [s.address for s in (await registrar.site_for("88.100.2/NEW-2")).servers] == [secondary]
        first = await registrar.create("88.100.1/NEW-1", values)
        assert first.created and first.record.version == 1
        assert not (await registrar.create("88.100.1/NEW-1", values)).created  # a retry is a success
        await registrar.create("88.100.2/NEW-2", values[:1])
    finally:
        await registrar.close()
    # Each record lives on its own node only.
    async with Resolver([enterprise]) as at_enterprise:
        assert (await at_enterprise.resolve("88.100.1/NEW-1")).version == 1
    async with Resolver([secondary]) as at_secondary:
        assert len((await at_secondary.resolve("88.100.2/NEW-2")).values) == 1
    async with Resolver([top]) as resolver:
        assert (await resolver.resolve("88.100.1/NEW-1")).value(1).data == values[0].data  # type: ignore[union-attr]
        with pytest.raises(NotFound):
            await resolver.resolve("88.100.1/NEW-3")


async def test_updates_and_deletes_are_visible_to_a_fresh_resolver(hierarchy: Cluster) -> None:
    top = hierarchy.address("top-level")
    registrar = Registrar(Resolver([top]))
    try:
        await registrar.create("88.100.1/U-1", [Value(1, "URL", b"v1")])
        await registrar.replace("88.100.1/U-1", [Value(1, "URL", b"v2")], expected_version=1)
        async with Resolver([top]) as resolver:
            assert (await resolver.resolve("88.100.1/U-1")).value(1).data == b"v2"  # type: ignore[union-attr]
        assert await registrar.delete("88.100.1/U-1") == 2
        async with Resolver([top]) as resolver:
            with pytest.raises(NotFound):
                await resolver.resolve("88.100.1/U-1")
    finally:
        await registrar.close()


async def test_batch_and_stream_resolution_report_each_item(hierarchy: Cluster) -> None:
    enterprise = hierarchy.address("enterprise-1")
    async with grpc.aio.insecure_channel(enterprise) as channel:
        stub = resolution_pb2_grpc.ResolutionStub(channel)
        request = resolution_pb2.ResolveBatchRequest(
            requests=[
                resolution_pb2.ResolveRequest(identifier="88.100.1/SN-0001", types=["URL"]),
                resolution_pb2.ResolveRequest(identifier="88.100.1/missing"),
                resolution_pb2.ResolveRequest(identifier="bad"),
            ]
        )
        response = await stub.ResolveBatch(request)
        codes = [item.status.code for item in response.items]
        assert codes == [
            grpc.StatusCode.OK.value[0],
            grpc.StatusCode.NOT_FOUND.value[0],
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
        ]
        assert [v.type for v in response.items[0].response.record.values] == ["URL"]
        assert response.items[1].negative_ttl == 300

        async def requests() -> AsyncIterator[resolution_pb2.ResolveBatchRequest]:
            for _ in range(3):
                yield request

        answers = [r async for r in stub.ResolveStream(requests())]
        assert len(answers) == 3 and all(a == response for a in answers)


async def test_health_and_reflection(hierarchy: Cluster) -> None:
    async with grpc.aio.insecure_channel(hierarchy.address("top-level")) as channel:
        status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for answer in stub.ServerReflectionInfo(ask()):
            names = {s.name for s in answer.list_services_response.service}
            assert {"idis.v1.Resolution", "idis.v1.Registration", "idis.v1.PrefixAdmin"} <= names
