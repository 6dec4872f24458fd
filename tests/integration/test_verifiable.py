"""Verifiable resolution end to end: the README's hierarchy (three signing node processes, TLS,
signed writes), a resolver holding only the top-level key (``trust-anchor.json``), and, in the
path, servers of the test's own: a tampering relay (the resolver's root: authoritative for
anything as far as referrals go, so only the signatures stand between it and the resolver) and
a hostile node legitimately delegated ``88.100.9`` that holds its own zone key.

Each forgery is refused as Bogus with its reason, and the honest path still resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nodes.hierarchy import ADMINS, NodeProcess, NodeSpec, ensure_admin, zone_keys_of
from nodes.trust.certificates import ensure_ca, issue
from resolver.attestation import (
    PROOF_METADATA,
    Bogus,
    TrustAnchor,
    Validator,
    ZoneKey,
    batch_attestation,
    delegation,
    keys_json,
    leaf_hash,
    load_anchor,
    merkle_tree,
    private_digest,
    public_part,
)
from resolver.channels import ChannelPool, ClientTLS
from resolver.errors import NotFound
from resolver.identifier import parse_identifier, parse_prefix
from resolver.record import Record, Value
from resolver.registrar import Registrar
from resolver.resolver import Resolver, Trace
from resolver.site import Referral, make_site
from resolver.wire import (
    decode_answer,
    denial_from_bytes,
    proof_from_pb,
    record_to_pb,
    referral_to_pb,
    resolution_pb2,
)
from tests.integration.conftest import Local

Tamper = Callable[[str, bytes], bytes]
"""What the relay does to a real answer (serialised ResolveResponse) for an identifier."""

DAY = 86_400


def anchor_of(local: Local) -> TrustAnchor:
    return load_anchor(local.state / "trust-anchor.json")


def validating(local: Local, root: str, clock: Callable[[], float] = time.time) -> Resolver:
    return Resolver(
        [root], channels=ChannelPool(ClientTLS(local.ca_path)), validator=Validator(anchor_of(local)), clock=clock
    )


async def resolve(local: Local, root: str, identifier: str, clock: Callable[[], float] = time.time) -> Trace:
    """Resolves with validation; the trace (its chain) of the verified answer."""
    trace = Trace()
    async with validating(local, root, clock) as resolver:
        with contextlib.suppress(NotFound):  # a verified NOT_FOUND: its chain is in the trace
            await resolver.resolve(identifier, trace)
    return trace


async def chains_adopted(local: Local) -> None:
    """Waits until the secondary and the enterprise have fetched the chains down to their
    apexes (answers verify from then on): a node retries every 1, 2, 4, 8, then 10 s
    (nodes.attesting.RETRY), the enterprise only after the secondary succeeded, so 90 s is
    several times what it can take once the delegations are in place."""
    deadline = time.monotonic() + 90
    while True:
        try:
            await resolve(local, local.grpc("top-level"), "88.100.1/SN-0001")
            await resolve(local, local.grpc("top-level"), "88.100.2/PART-0001")
            return
        except Bogus:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@dataclass
class Relay:
    """A TLS gRPC server of the test's own that answers Resolve by asking a real node
    (``upstream``) and handing the resolver what ``tamper`` makes of the answer."""

    upstream: str
    channels: ChannelPool
    tamper: Tamper = lambda identifier, data: data
    fail: Callable[[str, NotFound], NotFound] = lambda identifier, error: error
    forge: Callable[[str], bytes] | None = None
    """Answers without asking upstream, when set."""
    address: str = ""
    asked: list[str] = field(default_factory=list)

    async def resolve(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        identifier = resolution_pb2.ResolveRequest.FromString(request).identifier
        self.asked.append(identifier)
        try:
            if self.forge is not None:
                return self.forge(identifier)
            return self.tamper(identifier, await raw_resolve(self.channels, self.upstream, identifier))
        except NotFound as error:
            error = self.fail(identifier, error)
            trailing = (("idis-denial-bin", error.denial),) if error.denial else ()
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error), trailing_metadata=trailing)
            raise


async def raw_resolve(channels: ChannelPool, address: str, identifier: str, proofs: bool = True) -> bytes:
    """The serialised answer of one node (NotFound with its denial when it has none), asked
    with proofs (``PROOF_METADATA``) unless ``proofs`` is False."""
    from resolver.status import error_from_rpc

    call = channels.get(address).unary_unary(
        "/idis.v1.Resolution/Resolve", request_serializer=None, response_deserializer=None
    )
    request = resolution_pb2.ResolveRequest(identifier=identifier).SerializeToString()
    try:
        data: bytes = await call(request, timeout=5, metadata=((PROOF_METADATA, "1"),) if proofs else None)
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc, address) from None
    return data


async def tls_server(local: Local, name: str, handler: Callable[..., object]) -> tuple[grpc.aio.Server, str]:
    ca, ca_key = ensure_ca(local.state / "tls")
    cert, key = issue(local.state / "tls", name, ca, ca_key)
    server = grpc.aio.server()
    method = grpc.unary_unary_rpc_method_handler(handler)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("idis.v1.Resolution", {"Resolve": method}),))
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def relay(local: Local) -> AsyncIterator[Relay]:
    await chains_adopted(local)
    channels = ChannelPool(ClientTLS(local.ca_path))
    relay = Relay(local.grpc("enterprise-1"), channels)
    server, relay.address = await tls_server(local, "relay", relay.resolve)
    try:
        yield relay
    finally:
        await server.stop(None)
        await channels.close()


def edited(data: bytes, change: Callable[[resolution_pb2.ResolveResponse], None]) -> bytes:
    response = resolution_pb2.ResolveResponse.FromString(data)
    change(response)
    return response.SerializeToString()


async def refused(local: Local, relay: Relay, identifier: str, reason: str, **kwargs: object) -> None:
    with pytest.raises(Bogus, match=reason):
        await resolve(local, relay.address, identifier, **kwargs)  # type: ignore[arg-type]


# --- the honest path -----------------------------------------------------------------------------


async def test_answers_chain_up_to_the_top_level_key_whoever_relays_them(local: Local, relay: Relay) -> None:
    direct = await resolve(local, local.grpc("top-level"), "88.100.1/SN-0001")
    assert [s.prefix for s in direct.chain] == ["88", "88.100", "88.100.1", "88.100.1/SN-0001"]
    assert direct.chain[1].by == "88 key 'k1'" and direct.chain[2].by == "88.100 key 'k1'"
    assert "public values only" in direct.chain[3].keys
    relayed = await resolve(local, relay.address, "88.100.1/SN-0001")
    assert [s.prefix for s in relayed.chain] == [s.prefix for s in direct.chain]
    assert relay.asked == ["88.100.1/SN-0001"]
    # A client that does not ask for proofs gets none: a node that does not sign answers the same.
    lean = resolution_pb2.ResolveResponse.FromString(
        await raw_resolve(relay.channels, relay.upstream, "88.100.1/SN-0001", proofs=False)
    )
    assert lean.HasField("record") and not lean.HasField("proof")
    with pytest.raises(NotFound) as unsigned:
        await raw_resolve(relay.channels, relay.upstream, "88.100.1/NO-SUCH", proofs=False)
    assert unsigned.value.denial == b""
    referral = decode_answer(
        await raw_resolve(relay.channels, local.grpc("top-level"), "88.100.1/SN-0001", proofs=False)
    )
    assert isinstance(referral, Referral) and referral.delegations == ()
    # A prefix the secondary hosts itself: its apex vouches for it with a delegation of its own.
    hosted = await resolve(local, local.grpc("top-level"), "88.100.2/PART-0001")
    assert [s.prefix for s in hosted.chain] == ["88", "88.100", "88.100.2", "88.100.2/PART-0001"]


async def test_not_found_is_proved_by_a_signed_denial(local: Local, relay: Relay) -> None:
    missing = await resolve(local, local.grpc("top-level"), "88.100.1/NO-SUCH")
    assert missing.chain[-1].prefix == "88.100.1/NO-SUCH" and missing.chain[-1].keys == ["not found"]
    # An unallocated prefix is denied by the hosted prefix above it.
    unallocated = await resolve(local, local.grpc("top-level"), "88.100.77/X")
    assert unallocated.chain[-1].by == "88.100 key 'k1'"
    # Batches carry the denial too, and a new registration is signed as it is written.
    registrar = Registrar(node=local.grpc(), signer=local.signer(), channels=ChannelPool(ClientTLS(local.ca_path)))
    try:
        batch = [(f"88.100.1/VERIFY-{n}", [Value(1, "URL", b"https://v.example")]) for n in range(5)]
        items = await registrar.batch_create(batch)
        assert all(item.error is None for item in items)
    finally:
        await registrar.close()
    fresh = await resolve(local, local.grpc("top-level"), "88.100.1/VERIFY-3")
    assert fresh.chain[-1].keys[:2] == ["v1", "leaf 3 of 5"]


# --- a tampering relay -------------------------------------------------------------------------------


async def test_altered_values_are_refused(local: Local, relay: Relay) -> None:
    def alter(response: resolution_pb2.ResolveResponse) -> None:
        response.record.values[0].data = b"https://attacker.example/phish"

    relay.tamper = lambda identifier, data: edited(data, alter)
    await refused(local, relay, "88.100.1/SN-0001", "values are not those 88.100.1 signed")

    def drop(response: resolution_pb2.ResolveResponse) -> None:
        del response.record.values[1]

    relay.tamper = lambda identifier, data: edited(data, drop)
    await refused(local, relay, "88.100.1/SN-0001", "values are not those")

    relay.tamper = lambda identifier, data: edited(data, lambda r: r.ClearField("proof"))
    await refused(local, relay, "88.100.1/SN-0001", "carries no proof")


async def test_another_records_proof_is_refused(local: Local, relay: Relay) -> None:
    other = await raw_resolve(relay.channels, relay.upstream, "88.100.1/SN-0002")

    def swap(response: resolution_pb2.ResolveResponse) -> None:
        response.proof.CopyFrom(resolution_pb2.ResolveResponse.FromString(other).proof)

    relay.tamper = lambda identifier, data: edited(data, swap)
    await refused(local, relay, "88.100.1/SN-0001", "values are not those")


async def test_a_record_moved_to_a_sibling_or_parent_prefix_is_refused(local: Local, relay: Relay) -> None:
    real = await raw_resolve(relay.channels, relay.upstream, "88.100.1/SN-0001")

    relay.forge = lambda identifier: edited(real, lambda r: setattr(r.record, "identifier", identifier))
    await refused(local, relay, "88.100.2/SN-0001", "outside the authority of 88.100.1")
    await refused(local, relay, "88.100/SN-0001", "outside the authority of 88.100.1")


async def test_an_expired_statement_replayed_is_refused(local: Local, relay: Relay) -> None:
    later = time.time() + 31 * DAY  # past the batch's statement (30 days) and the delegations'
    await refused(local, relay, "88.100.1/SN-0001", "expired|not valid now", clock=lambda: later)


async def test_unsigned_or_borrowed_denials_are_refused(local: Local, relay: Relay) -> None:
    def unsigned(identifier: str, error: NotFound) -> NotFound:
        return NotFound(str(error), error.negative_ttl)

    relay.fail = unsigned
    await refused(local, relay, "88.100.1/NO-SUCH", "not signed")
    with pytest.raises(NotFound) as real:
        await raw_resolve(relay.channels, relay.upstream, "88.100.1/NO-SUCH")
    borrowed = real.value.denial
    assert borrowed and denial_from_bytes(borrowed)[0]

    def deny_everything(identifier: str, data: bytes) -> bytes:
        raise NotFound(f"identifier {identifier} not found", 60, borrowed)

    relay.tamper = deny_everything
    relay.fail = lambda identifier, error: error
    await refused(local, relay, "88.100.1/SN-0001", "denial of '88.100.1/NO-SUCH', not of 88.100.1/SN-0001")


async def test_forged_referrals_are_refused(local: Local, relay: Relay) -> None:
    real = decode_answer(await raw_resolve(relay.channels, local.grpc("top-level"), "88.100.1/SN-0001"))
    assert isinstance(real, Referral) and real.delegations  # the top-level's, for 88.100

    def refer(delegations: tuple[str, ...]) -> Callable[[str], bytes]:
        def to_self(identifier: str) -> bytes:
            forged = Referral(parse_prefix("88.100.1"), make_site([relay.address]), 60, delegations)
            return resolution_pb2.ResolveResponse(referral=referral_to_pb(forged)).SerializeToString()

        return to_self

    relay.forge = refer(())
    await refused(local, relay, "88.100.1/SN-0001", "with no delegation")
    relay.forge = refer(real.delegations)  # a real chain, but down to 88.100, not 88.100.1
    await refused(local, relay, "88.100.1/SN-0001", "delegations reaching 88.100$")


def secondary_admin(local: Local) -> Registrar:
    """A registrar writing to the secondary node as its administrator."""
    signer = ensure_admin(local.state, ADMINS["secondary-100"])
    return Registrar(node=local.grpc("secondary-100"), signer=signer, channels=ChannelPool(ClientTLS(local.ca_path)))


# --- a hostile node, legitimately delegated 88.100.9 ---------------------------------------------------


@dataclass
class Hostile:
    key: Ed25519PrivateKey
    chain: list[str] = field(default_factory=list)
    """The delegations down to 88.100.9, as the secondary serves them."""

    def zone_key(self) -> ZoneKey:
        now = int(time.time())
        return ZoneKey("h1", self.key.public_key(), now - 60, now + DAY)

    def record(self, identifier: str, signer_prefix: str, chain: list[str]) -> bytes:
        """A record of ``identifier`` attested by this node's key in the name of ``signer_prefix``."""
        now = int(time.time())
        values = (Value(1, "URL", b"https://hostile.example/" + identifier.encode(), timestamp=now),)
        salt = bytes(16)
        leaf = leaf_hash(parse_identifier(identifier).key, 1, public_part(values), private_digest(values, salt))
        root, paths = merkle_tree([leaf])
        statement = batch_attestation(signer_prefix, self.key, "h1", root, 1, now, DAY)
        proof = resolution_pb2.Proof(
            attestation=statement,
            index=0,
            path=paths[0],
            delegations=chain,
            private_digest=private_digest(values, salt),
        )
        record = record_to_pb(Record(parse_identifier(identifier), values, 1))
        return resolution_pb2.ResolveResponse(record=record, ttl=60, proof=proof).SerializeToString()

    async def resolve(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        identifier = resolution_pb2.ResolveRequest.FromString(request).identifier
        ident = parse_identifier(identifier)
        if ident.key == "88.100.9/GOOD":
            return self.record(identifier, "88.100.9", self.chain)
        if ident.key == "88.100.9/AS-ENTERPRISE":  # signed with its own key, claimed as 88.100.1's
            return self.record(identifier, "88.100.1", self.chain)
        if ident.key.startswith("88.100.9.5/"):  # a delegation of its own, of its parent's prefix
            now = int(time.time())
            forged = delegation("88.100.9", self.key, "h1", "88.100", [self.zone_key()], now, DAY)
            referral = Referral(parse_prefix("88.100.9.5"), make_site(["127.0.0.1:9"]), 60, (*self.chain, forged))
            return resolution_pb2.ResolveResponse(referral=referral_to_pb(referral)).SerializeToString()
        await context.abort(grpc.StatusCode.NOT_FOUND, f"{identifier} not found")
        return b""


async def test_a_hostile_delegated_node_speaks_only_for_its_own_prefix(local: Local, relay: Relay) -> None:
    hostile = Hostile(Ed25519PrivateKey.generate())
    server, address = await tls_server(local, "hostile", hostile.resolve)
    secondary = secondary_admin(local)
    try:
        await secondary.delegate_prefix("88.100.9", [address], zone_keys=keys_json([hostile.zone_key()]))
        referral = decode_answer(await raw_resolve(relay.channels, local.grpc("secondary-100"), "88.100.9/GOOD"))
        assert isinstance(referral, Referral) and len(referral.delegations) == 2
        hostile.chain = list(referral.delegations)
        top = local.grpc("top-level")
        good = await resolve(local, top, "88.100.9/GOOD")  # its own names: it may sign them
        assert [s.prefix for s in good.chain] == ["88", "88.100", "88.100.9", "88.100.9/GOOD"]
        with pytest.raises(Bogus, match=r"attestation issued by '88\.100\.1' where the chain reaches 88\.100\.9"):
            await resolve(local, top, "88.100.9/AS-ENTERPRISE")
        with pytest.raises(Bogus, match=r"delegation by 88\.100\.9 of '88\.100', which is not below it"):
            await resolve(local, top, "88.100.9.5/X")
        # And the honest path still resolves.
        honest = (await resolve(local, top, "88.100.1/SN-0001")).chain[-1]
        assert honest.prefix == "88.100.1/SN-0001" and "not found" not in honest.keys
    finally:
        await secondary.remove_prefix("88.100.9")
        await secondary.close()
        await server.stop(None)


# --- a rolled-over key ------------------------------------------------------------------------------------


async def test_a_revoked_key_is_refused_once_the_new_delegation_is_seen(local: Local, relay: Relay) -> None:
    """The enterprise's key rolled with no overlap (a revocation): the secondary re-delegates
    with the new key only; an answer signed with the old key, replayed by the relay, is refused
    by a resolver that has seen the new delegation."""
    old = await raw_resolve(relay.channels, relay.upstream, "88.100.1/SN-0001")
    keys = zone_keys_of(local.state, "enterprise-1")
    keys.roll("88.100.1", int(time.time()), overlap=0)
    enterprise = local.processes["enterprise-1"]
    enterprise.stop()
    local.endpoints["enterprise-1"]["grpc"] = await asyncio.to_thread(enterprise.start)  # it signs with k2 now
    secondary = secondary_admin(local)
    try:
        published = keys_json(keys.published("88.100.1", int(time.time())))
        await secondary.delegate_prefix("88.100.1", [enterprise.server], zone_keys=published)
    finally:
        await secondary.close()
    await chains_adopted(local)
    relay.upstream = local.grpc("enterprise-1")
    async with validating(local, local.grpc("top-level")) as resolver:
        trace = Trace()
        await resolver.resolve("88.100.1/SN-0001", trace)
        assert trace.chain[2].keys == ["k2"]  # the new delegation lists the new key alone
        resolver.root_site = make_site([relay.address])
        resolver.cache.clear()
        relay.tamper = lambda identifier, data: old
        with pytest.raises(Bogus, match=r"superseded by one of \d+, which no longer lists some of its keys"):
            await resolver.resolve("88.100.1/SN-0001")


# --- a recursive node ---------------------------------------------------------------------------------------


def start_recursive(local: Local, name: str, roots: list[str]) -> NodeProcess:
    """A recursive node (no apex) that resolves through ``roots`` and validates what it gets
    against the local hierarchy's trust anchor; TLS like the others."""
    ca, ca_key = ensure_ca(local.state / "tls")
    cert, key = issue(local.state / "tls", name, ca, ca_key)
    spec = NodeSpec(
        name,
        "recursive",
        "",
        0,
        extra={
            "recursion": {"enabled": True, "roots": roots},
            "signing": {"anchor": str(local.state / "trust-anchor.json")},
            "tls": {"mode": "required", "cert": str(cert), "key": str(key), "ca": str(ca)},
        },
    )
    process = NodeProcess.of(spec, local.state)
    process.start()
    return process


async def recursive_answer(local: Local, address: str, identifier: str) -> bytes:
    channels = ChannelPool(ClientTLS(local.ca_path))
    try:
        call = channels.get(address).unary_unary(
            "/idis.v1.Resolution/Resolve", request_serializer=None, response_deserializer=None
        )
        request = resolution_pb2.ResolveRequest(identifier=identifier, recursive=True).SerializeToString()
        try:
            data: bytes = await call(request, timeout=10, metadata=((PROOF_METADATA, "1"),))
        except grpc.aio.AioRpcError as exc:
            from resolver.status import error_from_rpc

            raise error_from_rpc(exc, address) from None
        return data
    finally:
        await channels.close()


async def test_a_recursive_node_validates_and_relays_the_proofs(local: Local, relay: Relay) -> None:
    honest = await asyncio.to_thread(start_recursive, local, "recursive-honest", [local.grpc("top-level")])
    fooled = await asyncio.to_thread(start_recursive, local, "recursive-relayed", [relay.address])
    try:
        validator = Validator(anchor_of(local))
        now = int(time.time())
        response = resolution_pb2.ResolveResponse.FromString(
            await recursive_answer(local, honest.address, "88.100.1/SN-0001")
        )
        assert response.HasField("proof")  # relayed as the enterprise node proved it
        record = decode_answer(response.SerializeToString())
        assert isinstance(record, Record)
        steps = validator.verify("88.100.1/SN-0001", record.version, record.values, proof_from_pb(response.proof), now)
        assert [s.prefix for s in steps][-2:] == ["88.100.1", "88.100.1/SN-0001"]
        with pytest.raises(NotFound) as missing:
            await recursive_answer(local, honest.address, "88.100.1/NO-SUCH")
        statement, delegations = denial_from_bytes(missing.value.denial)
        assert validator.verify_denial("88.100.1/NO-SUCH", statement, delegations, now)[-1].keys == ["not found"]

        # Upstream of the second one, the relay alters the values: the node refuses the answer.
        def alter(response: resolution_pb2.ResolveResponse) -> None:
            response.record.values[0].data = b"https://attacker.example/phish"

        relay.tamper = lambda identifier, data: edited(data, alter)
        with pytest.raises(Bogus, match=r"values are not those 88\.100\.1 signed"):  # its reason, passed on
            await recursive_answer(local, fooled.address, "88.100.1/SN-0001")
    finally:
        honest.stop()
        fooled.stop()
