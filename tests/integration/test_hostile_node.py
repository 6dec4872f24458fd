"""A hostile node, legitimately delegated ``88.100.9``, against real nodes that require signatures.

The README's hierarchy (top-level 88, secondary 88.100, enterprise 88.100.1) runs as real node
processes; the secondary also delegates 88.100.9 to a gRPC server of this test's own, which
answers Resolve with poison: a referral for the ancestor 88.100 pointing at itself, the record
of another node's identity carrying its own key, TTLs of 2^32-1, a referral naming twenty
addresses. Whatever it answers, it must not be able to speak for anything outside 88.100.9.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nodes.hierarchy import NodeSpec, ensure_admin, key_path
from resolver.errors import ResolutionFailed, Unauthenticated
from resolver.identifier import parse_identifier, parse_prefix
from resolver.record import AdminPermission, Record, Value, admin_value
from resolver.registrar import Registrar
from resolver.resolver import Resolver, Trace
from resolver.signing import Signer, generate_key, pubkey_value, public_key_der
from resolver.site import Referral, make_site
from resolver.wire import decode_answer, record_to_pb, referral_to_pb, resolution_pb2, resolution_pb2_grpc
from tests.integration.conftest import Cluster
from tests.integration.test_trust import Trusted, start_signed_node, start_trusted

HUGE_TTL = 2**32 - 1
URL = Value(1, "URL", b"https://factory-1.example.com/shared")


@dataclass
class Hostile:
    """The rogue: one gRPC server listening on two ports (the one delegated to it, and another
    its poisoned referral names), answering from ``answer``; ``asked`` lists the questions."""

    key: Ed25519PrivateKey
    scan: list[str]
    """Addresses it names in a referral for 88.100.9.5 (listeners of the test's own)."""
    address: str = ""
    other: str = ""
    asked: list[str] = field(default_factory=list)

    def answer(self, identifier: str) -> bytes | None:
        """The serialised ResolveResponse for ``identifier`` (None: NOT_FOUND)."""
        ident = parse_identifier(identifier)
        if ident.prefix.is_within(parse_prefix("88.100.9.5")):
            return self._referral("88.100.9.5", self.scan)
        if ident.key == "88.100.9/POISON":
            return self._referral("88.100", [self.other])
        if ident.key == "88.100.9/OTHER":
            return self._key_record("88.100.2/PARTNER-B")
        if ident.key in ("88.100.2/PARTNER-B", "88.100.9/ADMIN"):
            return self._key_record(ident.key)
        return None

    def _referral(self, prefix: str, addresses: list[str]) -> bytes:
        referral = Referral(parse_prefix(prefix), make_site(addresses), HUGE_TTL)
        return resolution_pb2.ResolveResponse(referral=referral_to_pb(referral)).SerializeToString()

    def _key_record(self, identifier: str) -> bytes:
        value = Value(300, "HS_PUBKEY", public_key_der(self.key), ttl=HUGE_TTL)
        record = Record(parse_identifier(identifier), (value,), 1)
        return resolution_pb2.ResolveResponse(record=record_to_pb(record)).SerializeToString()

    async def resolve(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        identifier = resolution_pb2.ResolveRequest.FromString(request).identifier
        self.asked.append(identifier)
        answer = self.answer(identifier)
        if answer is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{identifier} does not exist")
        return answer or b""


@dataclass
class Scene:
    trusted: Trusted
    hostile: Hostile
    partner: Signer
    """The real 88.100.2/PARTNER-B, hosted by the secondary node, granted MODIFY_VALUE on
    88.100.1/SHARED (hosted by the enterprise node)."""
    contacted: set[int]
    """Ports of the scan listeners some node connected to."""

    def address(self, name: str) -> str:
        return self.trusted.address(name)


async def as_administrator(address: str, signer: Signer, step: Callable[[Registrar], Any]) -> Any:
    registrar = Registrar(node=address, signer=signer)
    try:
        return await step(registrar)
    finally:
        await registrar.close()


@pytest.fixture
async def scene(cluster: Cluster) -> AsyncIterator[Scene]:
    trusted = await asyncio.to_thread(start_trusted, cluster)
    contacted: set[int] = set()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        contacted.add(writer.get_extra_info("sockname")[1])
        writer.close()

    listeners = [await asyncio.start_server(refuse, "127.0.0.1", 0) for _ in range(20)]
    scan = [f"127.0.0.1:{listener.sockets[0].getsockname()[1]}" for listener in listeners]
    hostile = Hostile(generate_key(), scan)
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(hostile.resolve)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("idis.v1.Resolution", {"Resolve": handler}),))
    hostile.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    hostile.other = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    partner = Signer("88.100.2/PARTNER-B", generate_key())
    secondary, enterprise = trusted.address("secondary-100"), trusted.address("enterprise-1")
    secondary_admin, enterprise_admin = trusted.signers["secondary-100"], trusted.signers["enterprise-1"]
    await as_administrator(secondary, secondary_admin, lambda r: r.delegate_prefix("88.100.9", [hostile.address]))
    partner_key = pubkey_value(partner.key)
    await as_administrator(secondary, secondary_admin, lambda r: r.create(partner.identity, [partner_key]))
    grant = admin_value(100, partner.identity, 300, AdminPermission.MODIFY_VALUE)
    await as_administrator(enterprise, enterprise_admin, lambda r: r.create("88.100.1/SHARED", [URL, grant]))
    try:
        yield Scene(trusted, hostile, partner, contacted)
    finally:
        await server.stop(None)
        for listener in listeners:
            listener.close()


def real_key(scene: Scene) -> bytes:
    return public_key_der(scene.partner.key)


async def test_a_poisoned_referral_is_neither_cached_nor_followed(scene: Scene) -> None:
    top, secondary = scene.address("top-level"), scene.address("secondary-100")
    async with Resolver([top]) as resolver:
        with pytest.raises(ResolutionFailed, match=r"referred 88\.100\.9/POISON to 88\.100, outside its authority"):
            await resolver.resolve("88.100.9/POISON")
        with pytest.raises(ResolutionFailed, match=r"answered 88\.100\.9/OTHER with the record of 88\.100\.2/PARTNER"):
            await resolver.resolve("88.100.9/OTHER")
        assert resolver.cache.get(b"88.100.9/OTHER") is None and resolver.cache.get(b"88.100.2/PARTNER-B") is None
        # Within its delegation the rogue is believed, but not for longer than the cap.
        await resolver.resolve("88.100.9/ADMIN")
        assert resolver.cache.remaining_ttl(b"88.100.9/ADMIN") <= 86400 + 1  # whole seconds, rounded up
        # Every other 88.100 question still goes to the secondary node.
        cached = resolver.cache.get(b"88.100")
        referral = decode_answer(cached) if cached is not None else None
        assert isinstance(referral, Referral) and [s.address for s in referral.site.servers] == [secondary]
        trace = Trace()
        partner = await resolver.resolve("88.100.2/PARTNER-B", trace)
        assert partner.value(300) is not None and partner.value(300).data == real_key(scene)  # type: ignore[union-attr]
        assert [hop.server for hop in trace.hops] == ["cache", secondary]
    assert "88.100.2/PARTNER-B" not in scene.hostile.asked
    assert "88.100.9/POISON" in scene.hostile.asked  # the rogue was asked, and refused


async def test_a_recursive_node_is_not_poisoned_either(scene: Scene) -> None:
    top = scene.address("top-level")
    recursion = {"enabled": True, "roots": [top], "max_ttl": 600}
    recursive = await asyncio.to_thread(
        scene.trusted.cluster.start, NodeSpec("recursive", "recursive", "", 0, extra={"recursion": recursion})
    )
    async with grpc.aio.insecure_channel(recursive) as channel:
        stub = resolution_pb2_grpc.ResolutionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Resolve(resolution_pb2.ResolveRequest(identifier="88.100.9/POISON", recursive=True))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "referred 88.100.9/POISON to 88.100, outside its authority" in (info.value.details() or "")
        answer = await stub.Resolve(resolution_pb2.ResolveRequest(identifier="88.100.2/PARTNER-B", recursive=True))
        assert [v.data for v in answer.record.values if v.index == 300] == [real_key(scene)]
    assert "88.100.2/PARTNER-B" not in scene.hostile.asked


async def test_a_rogue_cannot_sign_for_an_identity_outside_its_delegation(scene: Scene) -> None:
    enterprise = scene.address("enterprise-1")
    # A call signed as one of its own identities makes the enterprise node look that key up,
    # through the rogue, which answers with its poisoned referral.
    poisoner = Signer("88.100.9/POISON", scene.hostile.key)
    with pytest.raises(Unauthenticated) as refused:
        await as_administrator(enterprise, poisoner, lambda r: r.create("88.100.1/BY-ROGUE", [URL]))
    assert str(refused.value) == "the key of 88.100.9/POISON could not be resolved"
    # Then it signs as another organisation's administrator, with its own key.
    forged = Signer(scene.partner.identity, scene.hostile.key)
    stolen = [Value(1, "URL", b"https://rogue.example.com")]
    with pytest.raises(Unauthenticated, match=r"signature does not verify with the key of 88\.100\.2/PARTNER-B"):
        await as_administrator(enterprise, forged, lambda r: r.modify_values("88.100.1/SHARED", stolen))
    assert "88.100.2/PARTNER-B" not in scene.hostile.asked
    async with Resolver([enterprise]) as resolver:
        unchanged = (await resolver.resolve("88.100.1/SHARED")).value(1)
        assert unchanged is not None and unchanged.data == URL.data
    # The grant is real: the real PARTNER-B may make that change.
    mine = [Value(1, "URL", b"https://partner-b.example.com")]
    await as_administrator(enterprise, scene.partner, lambda r: r.modify_values("88.100.1/SHARED", mine))


async def test_a_key_lookup_reaches_a_few_of_the_servers_a_referral_names_and_reveals_nothing(scene: Scene) -> None:
    enterprise = scene.address("enterprise-1")
    scanner = Signer("88.100.9.5/SCAN", generate_key())  # anyone can sign as anyone: no key needed
    for _ in range(3):
        with pytest.raises(Unauthenticated) as refused:
            await as_administrator(enterprise, scanner, lambda r: r.create("88.100.1/SCANNED", [URL]))
        assert str(refused.value) == "the key of 88.100.9.5/SCAN could not be resolved"
    # Of the twenty addresses, at most four were tried, and only once: the failure is remembered.
    assert 0 < len(scene.contacted) <= 4
    assert scene.hostile.asked.count("88.100.9.5/SCAN") == 1


async def test_a_key_deleted_on_its_home_node_is_refused_there_at_once_and_elsewhere_after_key_cache_ttl(
    cluster: Cluster,
) -> None:
    home, home_admin = await start_signed_node(cluster, "home", "88.7", {})
    admin = await asyncio.to_thread(ensure_admin, cluster.state, "88.8/ADMIN")
    pub = key_path(cluster.state, admin.identity).with_suffix(".pub").relative_to(cluster.state)
    auth = {"mode": "required", "trust": [f"{admin.identity}=file:{pub}"], "roots": [home], "key_cache_ttl": 1}
    elsewhere, _admin = await start_signed_node(cluster, "elsewhere", "88.8", {"auth": auth})
    ops = Signer("88.7/OPS", generate_key())
    ops_key = pubkey_value(ops.key)
    await as_administrator(home, home_admin, lambda r: r.create(ops.identity, [ops_key]))
    grant = admin_value(100, ops.identity, 300, AdminPermission.MODIFY_VALUE)
    await as_administrator(elsewhere, admin, lambda r: r.create("88.8/SHARED", [URL, grant]))
    change = [Value(1, "URL", b"https://ops.example.com")]
    await as_administrator(elsewhere, ops, lambda r: r.modify_values("88.8/SHARED", change))
    await as_administrator(home, home_admin, lambda r: r.delete(ops.identity))
    with pytest.raises(Unauthenticated, match=r"identity 88\.7/OPS is not registered"):
        await as_administrator(home, ops, lambda r: r.create("88.7/BY-OPS", [URL]))
    await asyncio.sleep(1.1)  # the configured revocation delay on other nodes, key_cache_ttl = 1
    with pytest.raises(Unauthenticated, match=r"identity 88\.7/OPS is not registered"):
        await as_administrator(elsewhere, ops, lambda r: r.modify_values("88.8/SHARED", change))
