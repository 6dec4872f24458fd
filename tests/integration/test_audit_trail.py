"""The audit trail on real nodes: refused calls recorded as what they are (an unverified claim is
not an identity), bounded in size and rate, always listable, pruned to its retention."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio

from resolver.record import Value
from resolver.registrar import Registrar
from resolver.wire import prefix_pb2
from tests.integration.conftest import Cluster
from tests.integration.test_trust import audit_until, raw_create, start_signed_node

Code = grpc.StatusCode
URL = Value(1, "URL", b"https://example.com")


def database_bytes(cluster: Cluster, name: str) -> int:
    """The node's database file and its write-ahead log, in bytes."""
    files = [cluster.state / f"{name}.sqlite3", cluster.state / f"{name}.sqlite3-wal"]
    return sum(f.stat().st_size for f in files if f.exists())


async def test_an_unsigned_write_is_recorded_under_its_claim_not_as_that_identity(cluster: Cluster) -> None:
    address, admin = await start_signed_node(cluster, "claims", "88.11", {})
    refused = await raw_create(address, "88.11/CLAIMED", (("idis-identity", "88.11/ADMIN"),))
    assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == Code.UNAUTHENTICATED
    registrar = Registrar(node=address, signer=admin)
    try:
        entries = await audit_until(registrar, "88.11", lambda e: e.target == "88.11/CLAIMED")
        (entry,) = [e for e in entries if e.target == "88.11/CLAIMED"]
        assert entry.identity == "-" and entry.key_index == 0 and entry.result == "UNAUTHENTICATED"
        assert entry.detail.startswith('claimed "88.11/ADMIN" (not verified): no signature')
        # Nothing is filed under the identity it claimed.
        assert await registrar.list_audit(identity="88.11/ADMIN") == []
    finally:
        await registrar.close()


async def test_refused_calls_cannot_fill_the_disk_and_the_trail_stays_listable(cluster: Cluster) -> None:
    address, admin = await start_signed_node(cluster, "flooded", "88.12", {})
    registrar = Registrar(node=address, signer=admin)
    try:
        await registrar.create("88.12/FIRST", [URL])
        before = database_bytes(cluster, "flooded")
        huge = "88.12/" + "x" * (1024 * 1024)
        for _ in range(12):
            refused = await raw_create(address, huge, None)
            assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == Code.UNAUTHENTICATED
        entries = await audit_until(registrar, "88.12", lambda e: e.result == "UNAUTHENTICATED", limit=100)
        for _ in range(100):  # all twelve written (bounded polling)
            if sum(e.result == "UNAUTHENTICATED" for e in entries) == 12:
                break
            await asyncio.sleep(0.1)
            entries = await registrar.list_audit(prefix="88.12")
        refusals = [e for e in entries if e.result == "UNAUTHENTICATED"]
        assert len(refusals) == 12
        assert all(e.target.startswith("88.12/xxx") and e.target.endswith("...(cut)") for e in refusals)
        assert all(len(e.SerializeToString()) < 3 * 1024 for e in entries)
        assert database_bytes(cluster, "flooded") - before < 1024 * 1024  # 12 MiB before the fix
    finally:
        await registrar.close()
    # A page of 10 is well within any message limit.
    async with grpc.aio.insecure_channel(address) as channel:
        rpc = channel.unary_unary("/idis.v1.PrefixAdmin/ListAudit", request_serializer=None, response_deserializer=None)
        data = prefix_pb2.ListAuditRequest(prefix="88.12", page_size=10).SerializeToString()
        page = prefix_pb2.ListAuditResponse.FromString(
            await rpc(data, metadata=admin.metadata("/idis.v1.PrefixAdmin/ListAudit", data, address))
        )
    assert len(page.entries) == 10


def refusals_counted(entries: list[Any]) -> int:
    """Refused calls the summary rows count ("N more refused calls not recorded one by one ...")."""
    return sum(int(e.detail.split(" ", 1)[0]) for e in entries if e.result == "NOT_RECORDED")


async def test_a_flood_of_refusals_is_recorded_as_a_count(cluster: Cluster) -> None:
    audit: dict[str, object] = {"refusals_per_peer_per_second": 0.001, "refusal_burst": 5, "flush_interval": 0.2}
    address, admin = await start_signed_node(cluster, "counted", "88.13", {"audit": audit})
    for n in range(200):
        refused = await raw_create(address, f"88.13/FLOOD-{n}", None)
        assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == Code.UNAUTHENTICATED
    registrar = Registrar(node=address, signer=admin)
    try:
        for _ in range(100):  # bounded polling: the trail is written every flush_interval
            entries = await registrar.list_audit(prefix="88.13", limit=1000)
            if refusals_counted(entries) == 195:
                break
            await asyncio.sleep(0.1)
    finally:
        await registrar.close()
    one_by_one = [e.target for e in entries if e.result == "UNAUTHENTICATED"]
    assert one_by_one == [f"88.13/FLOOD-{n}" for n in range(5)]
    assert refusals_counted(entries) == 195
    summary = next(e for e in entries if e.result == "NOT_RECORDED")
    assert summary.identity == "-" and "over the audited-refusal rate per peer" in summary.detail
    assert "127.0.0.1" in summary.detail


async def test_the_trail_is_pruned_to_its_retention(cluster: Cluster) -> None:
    audit: dict[str, object] = {"max_rows": 10, "prune_step": 3, "prune_interval": 0.2, "flush_interval": 0.1}
    address, admin = await start_signed_node(cluster, "pruned", "88.14", {"audit": audit})
    registrar = Registrar(node=address, signer=admin)
    try:
        for n in range(30):
            await registrar.create(f"88.14/P-{n:02d}", [URL])
        for _ in range(100):  # bounded polling: pruned 3 rows a step
            targets = [e.target for e in await registrar.list_audit(prefix="88.14", limit=1000)]
            if len(targets) <= 10:
                break
            await asyncio.sleep(0.1)
    finally:
        await registrar.close()
    assert targets == [f"88.14/P-{n:02d}" for n in range(20, 30)]
