"""Signed writes, permissions and the audit trail on real nodes that require signatures."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from nodes.hierarchy import ADMINS, NodeSpec, ensure_admin, key_path, wire_and_seed
from resolver.errors import LimitExceeded, PermissionDenied, Unauthenticated
from resolver.record import AdminPermission, Value, admin_value
from resolver.registrar import Registrar
from resolver.resolver import Resolver
from resolver.signing import Signer, generate_key, pubkey_value
from resolver.status import error_from_rpc
from resolver.wire import record_pb2, registration_pb2
from tests.engines import ENGINES
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.parametrize("store_engine", ENGINES)

Code = grpc.StatusCode
URL = Value(1, "URL", b"https://example.com")


@dataclass
class Trusted:
    cluster: Cluster
    signers: dict[str, Signer]

    def address(self, name: str) -> str:
        return self.cluster.address(name)

    def registrar(self, name: str, signer: Signer | None) -> Registrar:
        return Registrar(node=self.address(name), signer=signer)


def start_trusted(cluster: Cluster) -> Trusted:
    state = cluster.state
    signers = {name: ensure_admin(state, identity) for name, identity in ADMINS.items()}

    def spec(name: str, role: str, apex: str, roots: list[str]) -> NodeSpec:
        pub = key_path(state, ADMINS[name]).with_suffix(".pub").relative_to(state)
        return NodeSpec(
            name,
            role,
            apex,
            0,
            extra={"auth": {"mode": "required", "trust": [f"{ADMINS[name]}=file:{pub}"], "roots": roots}},
        )

    top = cluster.start(spec("top-level", "top-level", "88", []))
    cluster.start(spec("secondary-100", "secondary", "88.100", [top]))
    cluster.start(spec("enterprise-1", "enterprise", "88.100.1", [top]))
    asyncio.run(wire_and_seed({n: cluster.address(n) for n in ADMINS}, signers))
    return Trusted(cluster, signers)


@pytest.fixture
async def trusted(cluster: Cluster) -> Trusted:
    return await asyncio.to_thread(start_trusted, cluster)


async def raw_create(address: str, identifier: str, metadata: Any) -> grpc.aio.AioRpcError | bytes:
    request = registration_pb2.CreateRequest(
        identifier=identifier, values=[record_pb2.Value(index=1, type="URL", data=b"x")]
    )
    data = request.SerializeToString()
    async with grpc.aio.insecure_channel(address) as channel:
        rpc = channel.unary_unary("/idis.v1.Registration/Create", request_serializer=None, response_deserializer=None)
        try:
            answer: bytes = await rpc(data, metadata=metadata(data) if callable(metadata) else metadata)
            return answer
        except grpc.aio.AioRpcError as exc:
            return exc


async def exists(address: str, identifier: str) -> bool:
    async with Resolver([address]) as resolver:
        try:
            await resolver.resolve(identifier)
            return True
        except Exception:
            return False


async def audit_until(registrar: Registrar, prefix: str, wanted: Any, limit: int = 1000) -> list[Any]:
    """The audit trail of ``prefix`` once it holds an entry ``wanted`` accepts (bounded polling:
    refused calls are written by a periodic task)."""
    for _ in range(100):
        entries = await registrar.list_audit(prefix=prefix, limit=limit)
        if any(wanted(e) for e in entries):
            return entries
        await asyncio.sleep(0.1)
    raise AssertionError(f"no such audit entry for {prefix} after 10 s")


async def test_signed_writes_by_the_right_administrator_succeed(trusted: Trusted) -> None:
    registrar = trusted.registrar("enterprise-1", trusted.signers["enterprise-1"])
    try:
        written = await registrar.create("88.100.1/SIGNED-1", [URL])
        assert written.created
        await registrar.add_values("88.100.1/SIGNED-1", [Value(2, "EMAIL", b"a@b")])
        assert await registrar.delete("88.100.1/SIGNED-1") == 2
    finally:
        await registrar.close()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("none", "no signature: write calls need the metadata idis-identity"),
        ("tampered", "signature does not verify with the key of 88.100.1/ADMIN at index 300"),
        ("wrong-key", "signature does not verify with the key of 88.100.1/ADMIN at index 300"),
        ("expired", "s off the node's clock"),
        ("unknown-identity", "identity 88.100.1/NOBODY is not registered"),
        ("no-such-key-index", "has no HS_PUBKEY value at index 7"),
    ],
)
async def test_bad_signatures_are_unauthenticated_and_change_nothing(trusted: Trusted, case: str, message: str) -> None:
    admin = trusted.signers["enterprise-1"]
    path = "/idis.v1.Registration/Create"
    node = trusted.address("enterprise-1")

    def metadata(data: bytes) -> Any:
        if case == "none":
            return None
        if case == "tampered":
            return admin.metadata(path, data + b"x", node)  # signed other bytes than were sent
        if case == "wrong-key":
            return Signer(admin.identity, generate_key()).metadata(path, data, node)
        if case == "expired":
            return admin.metadata(path, data, node, now=0)
        if case == "unknown-identity":
            return Signer("88.100.1/NOBODY", admin.key).metadata(path, data, node)
        return Signer("88.100/ADMIN", admin.key, key_index=7).metadata(path, data, node)

    answer = await raw_create(trusted.address("enterprise-1"), "88.100.1/REFUSED", metadata)
    assert isinstance(answer, grpc.aio.AioRpcError)
    assert answer.code() == Code.UNAUTHENTICATED
    assert message in (answer.details() or "")
    assert not await exists(trusted.address("enterprise-1"), "88.100.1/REFUSED")


async def test_a_replayed_call_is_refused(trusted: Trusted) -> None:
    admin = trusted.signers["enterprise-1"]
    data = registration_pb2.CreateRequest(
        identifier="88.100.1/ONCE", values=[record_pb2.Value(index=1, type="URL", data=b"x")]
    ).SerializeToString()
    metadata = admin.metadata("/idis.v1.Registration/Create", data, trusted.address("enterprise-1"))
    assert isinstance(await raw_create(trusted.address("enterprise-1"), "88.100.1/ONCE", metadata), bytes)
    await Registrar(node=trusted.address("enterprise-1"), signer=admin).delete("88.100.1/ONCE")
    again = await raw_create(trusted.address("enterprise-1"), "88.100.1/ONCE", metadata)
    assert isinstance(again, grpc.aio.AioRpcError) and again.code() == Code.UNAUTHENTICATED
    assert "nonce already used" in (again.details() or "")
    assert not await exists(trusted.address("enterprise-1"), "88.100.1/ONCE")


async def test_administrators_write_only_where_they_are_granted(trusted: Trusted) -> None:
    enterprise_admin = trusted.signers["enterprise-1"]
    at_secondary = trusted.registrar("secondary-100", enterprise_admin)
    try:
        # Another enterprise's prefix, hosted by the secondary node.
        with pytest.raises(PermissionDenied, match=r"does not hold ADD_HANDLE on prefix 88\.100\.2"):
            await at_secondary.create("88.100.2/INTRUDER", [URL])
        # A sibling prefix of its own.
        with pytest.raises(PermissionDenied, match=r"does not hold ADD_NA on prefix 88\.100"):
            await at_secondary.create_prefix("88.100.3")
    finally:
        await at_secondary.close()
    assert not await exists(trusted.address("secondary-100"), "88.100.2/INTRUDER")
    listed = await trusted.registrar("secondary-100", None).list_prefixes()
    assert "88.100.3" not in [p.prefix for p in listed]


async def test_grants_on_a_prefix_and_on_an_identifier(trusted: Trusted) -> None:
    secondary_admin = trusted.signers["secondary-100"]
    ops_key = generate_key()
    ops = Signer("88.100.2/OPS", ops_key)
    admin = trusted.registrar("secondary-100", secondary_admin)
    try:
        # The secondary's admin registers OPS's key and lets it add identifiers under 88.100.2.
        await admin.create(ops.identity, [pubkey_value(ops_key)])
        grant = admin_value(100, ops.identity, 300, AdminPermission.ADD_HANDLE | AdminPermission.MODIFY_VALUE)
        await admin.create_prefix("88.100.2", admins=[grant])
        await admin.create("88.100.2/GUARDED", [URL, admin_value(100, ops.identity, 300, AdminPermission.MODIFY_VALUE)])
    finally:
        await admin.close()
    by_ops = trusted.registrar("secondary-100", ops)
    try:
        assert (await by_ops.create("88.100.2/BY-OPS", [URL])).created
        await by_ops.modify_values("88.100.2/GUARDED", [Value(1, "URL", b"https://new")])
        # Without REMOVE_VALUE, refused before the record is looked at (so before saying that
        # index 100 is admin data, which would need REMOVE_ADMIN too: tests/unit/test_permissions.py).
        with pytest.raises(PermissionDenied, match=r"does not hold REMOVE_VALUE on identifier 88\.100\.2/GUARDED"):
            await by_ops.remove_values("88.100.2/GUARDED", [100])
        with pytest.raises(PermissionDenied, match="DELETE_HANDLE"):
            await by_ops.delete("88.100.2/BY-OPS")
        with pytest.raises(PermissionDenied):
            await by_ops.create("88.100/ELSEWHERE", [URL])  # the apex: only its anchors may
    finally:
        await by_ops.close()
    async with Resolver([trusted.address("secondary-100")]) as resolver:
        guarded = await resolver.resolve("88.100.2/GUARDED")
        assert guarded.value(100) is not None and guarded.value(1).data == b"https://new"  # type: ignore[union-attr]


async def test_every_write_is_in_the_audit_trail(trusted: Trusted) -> None:
    admin = trusted.signers["enterprise-1"]
    registrar = trusted.registrar("enterprise-1", admin)
    try:
        await registrar.create("88.100.1/AUDITED", [URL])
        await registrar.replace("88.100.1/AUDITED", [Value(1, "URL", b"v2")])
    finally:
        await registrar.close()
    await raw_create(trusted.address("enterprise-1"), "88.100.1/NO-SIG", None)
    registrar = trusted.registrar("enterprise-1", admin)
    try:
        # Refusals reach the trail with the refusal trail's next write ([audit] flush_interval).
        entries = await audit_until(registrar, "88.100.1", lambda e: e.target == "88.100.1/NO-SIG")
        mine = [e for e in entries if e.target in ("88.100.1/AUDITED", "88.100.1/NO-SIG")]
        assert [(e.method, e.result) for e in mine] == [
            ("Create", "OK"),
            ("Replace", "OK"),
            ("Create", "UNAUTHENTICATED"),
        ]
        assert mine[0].identity == "88.100.1/ADMIN" and mine[0].key_index == 300
        assert mine[0].peer.startswith("ipv4:127.0.0.1:") and "created v1" in mine[0].detail
        assert "v1 -> v2" in mine[1].detail and mine[2].identity == "-"
        by_identity = await registrar.list_audit(identity="88.100.1/ADMIN")
        assert {e.target for e in by_identity} >= {"88.100.1/AUDITED"}
    finally:
        await registrar.close()
    anonymous = trusted.registrar("enterprise-1", None)
    try:
        with pytest.raises(Unauthenticated):
            await anonymous.list_audit(prefix="88.100.1")
    finally:
        await anonymous.close()


def test_keys_are_private_files(trusted: Trusted) -> None:
    path: Path = key_path(trusted.cluster.state, "88.100.1/ADMIN")
    assert path.stat().st_mode & 0o077 == 0


async def test_private_values_reach_authorised_readers_only(trusted: Trusted, cluster: Cluster) -> None:
    from resolver.record import Permission

    admin = trusted.signers["enterprise-1"]
    secret = Value(2, "PRICE", b"1234.00 CNY", permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE)
    registrar = trusted.registrar("enterprise-1", admin)
    try:
        await registrar.create("88.100.1/PRIVATE-1", [URL, secret])
    finally:
        await registrar.close()
    enterprise, top = trusted.address("enterprise-1"), trusted.address("top-level")
    for _ in range(3):  # repeated, so any cache on the way is warm
        async with Resolver([top]) as anonymous:
            record = await anonymous.resolve("88.100.1/PRIVATE-1")
            assert [v.index for v in record.values] == [1]
    async with Resolver([enterprise], signer=admin) as authorised:
        record = await authorised.resolve("88.100.1/PRIVATE-1")
        assert record.value(2) is not None and record.value(2).data == b"1234.00 CNY"  # type: ignore[union-attr]
    # A signed reader without READ_VALUE sees the public values only.
    stranger = Signer("88.100/ADMIN", trusted.signers["secondary-100"].key)
    async with Resolver([enterprise], signer=stranger) as other:
        assert [v.index for v in (await other.resolve("88.100.1/PRIVATE-1")).values] == [1]
    # After the authorised read, the node's cache still answers anonymous readers without it.
    async with Resolver([enterprise]) as anonymous:
        assert [v.index for v in (await anonymous.resolve("88.100.1/PRIVATE-1")).values] == [1]
    # Nor does a recursive resolver's cache ever get it.
    recursive = await asyncio.to_thread(
        cluster.start, NodeSpec("recursive", "recursive", "", 0, extra={"recursion": {"enabled": True, "roots": [top]}})
    )
    async with grpc.aio.insecure_channel(recursive) as channel:
        from resolver.wire import resolution_pb2, resolution_pb2_grpc

        stub = resolution_pb2_grpc.ResolutionStub(channel)
        for _ in range(2):
            answer = await stub.Resolve(resolution_pb2.ResolveRequest(identifier="88.100.1/PRIVATE-1", recursive=True))
            assert [v.index for v in answer.record.values] == [1]


async def start_signed_node(
    cluster: Cluster, name: str, apex: str, extra: dict[str, dict[str, object]]
) -> tuple[str, Signer]:
    """One node that trusts ``APEX/ADMIN`` (its key made here); returns its address and signer."""
    identity = f"{apex}/ADMIN"
    admin = await asyncio.to_thread(ensure_admin, cluster.state, identity)
    pub = key_path(cluster.state, identity).with_suffix(".pub").relative_to(cluster.state)
    sections: dict[str, dict[str, object]] = {"auth": {"mode": "required", "trust": [f"{identity}=file:{pub}"]}}
    sections.update(extra)
    address = await asyncio.to_thread(cluster.start, NodeSpec(name, "enterprise", apex, 0, extra=sections))
    return address, admin


async def test_quotas_trip_and_recover(cluster: Cluster) -> None:
    quotas: dict[str, object] = {
        "peer_calls_per_second": 20,
        "peer_burst": 20,
        "identity_writes_per_second": 2,
        "identity_burst": 3,
        "identifiers_per_prefix": 4,
        "streams_per_peer": 1,
    }
    address, admin = await start_signed_node(cluster, "limited", "88.5", {"quotas": quotas})
    registrar = Registrar(node=address, signer=admin)
    try:
        # Identity write rate: a burst of 3, then refused with a retry hint, then accepted again.
        for n in range(3):
            await registrar.create(f"88.5/Q-{n}", [URL])
        with pytest.raises(LimitExceeded, match=r"identity 88\.5/ADMIN is over its limit of 2 calls/s"):
            await registrar.create("88.5/Q-3", [URL])
        await asyncio.sleep(0.6)
        await registrar.create("88.5/Q-3", [URL])
        # Registration quota: 4 identifiers under 88.5.
        await asyncio.sleep(1.0)
        with pytest.raises(LimitExceeded, match=r"prefix 88\.5 holds its quota of 4 identifiers"):
            await registrar.create("88.5/Q-4", [URL])
        await asyncio.sleep(0.6)
        outcomes = await registrar.batch_create([("88.5/Q-5", [URL])])
        assert outcomes[0].error is not None and "quota" in str(outcomes[0].error)
    finally:
        await registrar.close()
    async with grpc.aio.insecure_channel(address) as channel:
        ping = channel.unary_unary("/idis.v1.Resolution/Ping", request_serializer=None, response_deserializer=None)
        await asyncio.sleep(1.1)  # a full bucket
        codes = []
        retry_after = 0.0
        for _ in range(30):
            try:
                await ping(b"")
                codes.append("OK")
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code().name)
                retry_after = error_from_rpc(exc, "node").retry_after
        assert codes.count("RESOURCE_EXHAUSTED") >= 5 and codes[:15] == ["OK"] * 15
        assert retry_after > 0  # google.rpc.RetryInfo
        await asyncio.sleep(1.1)
        await ping(b"")  # recovered
        # One stream per peer.
        stream: Any = channel.stream_stream(
            "/idis.v1.Resolution/ResolveStream", request_serializer=None, response_deserializer=None
        )
        first = stream()
        await first.write(b"")
        assert await first.read() == b""
        second = stream()

        async def use_second() -> None:
            await second.write(b"")
            await second.read()

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await use_second()
        assert refused.value.code() == Code.RESOURCE_EXHAUSTED
        await first.done_writing()


async def test_a_replay_to_another_worker_is_refused_too(cluster: Cluster) -> None:
    address, admin = await start_signed_node(cluster, "workers", "88.6", {"node": {"workers": 2}})
    data = registration_pb2.CreateRequest(
        identifier="88.6/ONCE", values=[record_pb2.Value(index=1, type="URL", data=b"x")]
    ).SerializeToString()
    metadata = admin.metadata("/idis.v1.Registration/Create", data, address)
    outcomes = []
    for _ in range(10):  # fresh connections: SO_REUSEPORT spreads them over both workers
        answer = await raw_create(address, "88.6/ONCE", metadata)
        outcomes.append("OK" if isinstance(answer, bytes) else answer.code().name)
    assert outcomes.count("OK") == 1 and outcomes.count("UNAUTHENTICATED") == 9


async def test_listing_identifiers_needs_the_list_right(trusted: Trusted) -> None:
    own = trusted.registrar("enterprise-1", trusted.signers["enterprise-1"])
    anonymous = trusted.registrar("enterprise-1", None)
    elsewhere = trusted.registrar("secondary-100", trusted.signers["enterprise-1"])
    try:
        assert "88.100.1/SN-0001" in await own.list_identifiers("88.100.1")
        with pytest.raises(Unauthenticated):
            await anonymous.list_identifiers("88.100.1")
        with pytest.raises(PermissionDenied, match="LIST_HDLS"):
            await elsewhere.list_identifiers("88.100.2")
    finally:
        for r in (own, anonymous, elsewhere):
            await r.close()
