"""Signed calls on real nodes: each is for one node and one use (reads too, across restarts and
worker processes); malformed numbers are refused, not crashes; prefix grants are shown only to
their administrators; look-alike identities never print like real ones."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import grpc
import grpc.aio
import pytest

from nodes.hierarchy import ensure_admin, key_path
from resolver.cli import main
from resolver.record import AdminPermission, Permission, Value, admin_value
from resolver.registrar import Registrar
from resolver.signing import Signer, generate_key, pubkey_value
from resolver.wire import prefix_pb2, record_pb2, registration_pb2, resolution_pb2
from tests.integration.conftest import Cluster
from tests.integration.test_trust import exists, raw_create, start_signed_node

Code = grpc.StatusCode
URL = Value(1, "URL", b"https://example.com")
SECRET = Value(2, "PRICE", b"1234.00 CNY", permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE)
CREATE = "/idis.v1.Registration/Create"
RESOLVE = "/idis.v1.Resolution/Resolve"
RAW: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}


def create_request(identifier: str) -> bytes:
    values = [record_pb2.Value(index=1, type="URL", data=b"x")]
    return registration_pb2.CreateRequest(identifier=identifier, values=values).SerializeToString()


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("idis-key-index", "idis-key-index is not a number (at most 10 decimal digits)"),
        ("idis-timestamp", "idis-timestamp is not a number of seconds (at most 12 decimal digits)"),
    ],
)
async def test_thousands_of_digits_are_refused_not_a_crash(cluster: Cluster, header: str, message: str) -> None:
    address, admin = await start_signed_node(cluster, "digits", "88.31", {})
    data = create_request("88.31/DIGITS")
    metadata = [(k, "9" * 5000 if k == header else v) for k, v in admin.metadata(CREATE, data, address)]
    answer = await raw_create(address, "88.31/DIGITS", metadata)
    assert isinstance(answer, grpc.aio.AioRpcError)
    assert (answer.code(), answer.details()) == (Code.UNAUTHENTICATED, message)  # INTERNAL before
    assert not await exists(address, "88.31/DIGITS")


async def test_a_write_signed_for_one_node_is_refused_by_another(cluster: Cluster) -> None:
    # Staging and production both host 88.32 and trust the same administrator's key.
    staging, admin = await start_signed_node(cluster, "staging", "88.32", {})
    production, _ = await start_signed_node(cluster, "production", "88.32", {})
    data = create_request("88.32/FOR-STAGING")
    for_staging = admin.metadata(CREATE, data, staging)
    replayed = await raw_create(production, "88.32/FOR-STAGING", for_staging)
    assert isinstance(replayed, grpc.aio.AioRpcError) and replayed.code() == Code.UNAUTHENTICATED
    assert f"signed for the audience '{staging}', which is not this node" in (replayed.details() or "")
    assert not await exists(production, "88.32/FOR-STAGING")  # accepted there before
    assert isinstance(await raw_create(staging, "88.32/FOR-STAGING", for_staging), bytes)


async def test_a_node_accepts_calls_signed_for_the_names_it_is_configured_with(cluster: Cluster) -> None:
    ensure_admin(cluster.state, "88.37/ADMIN")
    pub = key_path(cluster.state, "88.37/ADMIN").with_suffix(".pub").relative_to(cluster.state)
    auth: dict[str, object] = {
        "mode": "required",
        "trust": [f"88.37/ADMIN=file:{pub}"],
        "audiences": ["idis-prod.example.com:7001"],
    }
    address, admin = await start_signed_node(cluster, "named", "88.37", {"auth": auth})
    # Dialled by its address, signed for the public name a client would dial.
    by_name = admin.metadata(CREATE, create_request("88.37/BY-NAME"), "IDIS-PROD.example.com:7001")
    assert isinstance(await raw_create(address, "88.37/BY-NAME", by_name), bytes)
    elsewhere = admin.metadata(CREATE, create_request("88.37/ELSEWHERE"), "idis-test.example.com:7001")
    refused = await raw_create(address, "88.37/ELSEWHERE", elsewhere)
    assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == Code.UNAUTHENTICATED


async def signed_resolve(address: str, metadata: Any, identifier: str) -> resolution_pb2.ResolveResponse | Code:
    data = resolution_pb2.ResolveRequest(identifier=identifier).SerializeToString()
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            answer = await channel.unary_unary(RESOLVE, **RAW)(data, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return resolution_pb2.ResolveResponse.FromString(answer)


async def start_with_secret(cluster: Cluster, name: str, apex: str, extra: dict[str, Any]) -> tuple[str, Signer]:
    """A signed node holding ``APEX/PRIVATE``, whose value 2 only READ_VALUE holders may read."""
    address, admin = await start_signed_node(cluster, name, apex, extra)
    registrar = Registrar(node=address, signer=admin)
    try:
        await registrar.create(f"{apex}/PRIVATE", [URL, SECRET])
    finally:
        await registrar.close()
    return address, admin


async def test_a_captured_signed_read_cannot_be_replayed_after_a_restart(cluster: Cluster) -> None:
    address, admin = await start_with_secret(cluster, "reader", "88.33", {})
    data = resolution_pb2.ResolveRequest(identifier="88.33/PRIVATE").SerializeToString()
    captured = admin.metadata(RESOLVE, data, address)
    listing = prefix_pb2.ListIdentifiersRequest(prefix="88.33").SerializeToString()
    captured_listing = admin.metadata("/idis.v1.PrefixAdmin/ListIdentifiers", listing, address)
    first = await signed_resolve(address, captured, "88.33/PRIVATE")
    assert isinstance(first, resolution_pb2.ResolveResponse) and [v.index for v in first.record.values] == [1, 2]
    async with grpc.aio.insecure_channel(address) as channel:
        list_identifiers = channel.unary_unary("/idis.v1.PrefixAdmin/ListIdentifiers", **RAW)
        await list_identifiers(listing, metadata=captured_listing)
    await asyncio.to_thread(cluster.kill, "reader")  # a restart forgets whatever the process remembered
    await asyncio.to_thread(cluster.restart, "reader")
    assert await signed_resolve(address, captured, "88.33/PRIVATE") == Code.UNAUTHENTICATED  # private values before
    async with grpc.aio.insecure_channel(address) as channel:
        list_identifiers = channel.unary_unary("/idis.v1.PrefixAdmin/ListIdentifiers", **RAW)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await list_identifiers(listing, metadata=captured_listing)
    assert refused.value.code() == Code.UNAUTHENTICATED and "nonce already used" in (refused.value.details() or "")
    # A freshly signed read still works, and anonymous readers never see the private value.
    fresh = await signed_resolve(address, admin.metadata(RESOLVE, data, address), "88.33/PRIVATE")
    assert isinstance(fresh, resolution_pb2.ResolveResponse) and len(fresh.record.values) == 2
    anonymous = await signed_resolve(address, None, "88.33/PRIVATE")
    assert isinstance(anonymous, resolution_pb2.ResolveResponse) and len(anonymous.record.values) == 1


async def test_a_signed_read_is_good_once_on_all_workers(cluster: Cluster) -> None:
    address, admin = await start_with_secret(cluster, "workers", "88.34", {"node": {"workers": 2}})
    data = resolution_pb2.ResolveRequest(identifier="88.34/PRIVATE").SerializeToString()
    captured = admin.metadata(RESOLVE, data, address)
    outcomes = []
    for _ in range(10):  # fresh connections: SO_REUSEPORT spreads them over both workers
        answer = await signed_resolve(address, captured, "88.34/PRIVATE")
        outcomes.append("OK" if isinstance(answer, resolution_pb2.ResolveResponse) else answer.name)
    assert outcomes == ["OK"] + ["UNAUTHENTICATED"] * 9


async def list_prefixes(address: str, signer: Signer | None) -> dict[str, list[str]]:
    """Each prefix's administrators as the node shows them to ``signer`` (None: anonymous)."""
    data = prefix_pb2.ListPrefixesRequest().SerializeToString()
    path = "/idis.v1.PrefixAdmin/ListPrefixes"
    metadata = signer.metadata(path, data, address) if signer is not None else None
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await channel.unary_unary(path, **RAW)(data, metadata=metadata)
    prefixes = prefix_pb2.ListPrefixesResponse.FromString(answer).prefixes
    return {p.prefix: [v.data.decode() for v in p.admins] for p in prefixes}


async def test_prefix_grants_are_shown_only_to_those_who_may_list_the_prefix(cluster: Cluster) -> None:
    address, admin = await start_signed_node(cluster, "grants", "88.35", {})
    ops, auditor = Signer("88.35/OPS", generate_key()), Signer("88.35/AUDITOR", generate_key())
    registrar = Registrar(node=address, signer=admin)
    try:
        for who in (ops, auditor):
            await registrar.create(who.identity, [pubkey_value(who.key)])
        grants = [
            admin_value(100, ops.identity, 300, AdminPermission.ADD_HANDLE),
            admin_value(101, auditor.identity, 300, AdminPermission.LIST_HDLS),
        ]
        await registrar.create_prefix("88.35.1", admins=grants)
    finally:
        await registrar.close()
    anonymous = await list_prefixes(address, None)
    assert anonymous == {"88.35": [], "88.35.1": []}  # every grant, to anyone, before
    assert await list_prefixes(address, ops) == {"88.35": [], "88.35.1": []}  # ADD_HANDLE is not LIST_HDLS
    for reader in (auditor, admin):
        shown = await list_prefixes(address, reader)
        assert len(shown["88.35.1"]) == 2 and any('"admin": "88.35/OPS"' in g for g in shown["88.35.1"])


def idis(*argv: str) -> str:
    out = io.StringIO()
    main(list(argv), out=out)
    return out.getvalue()


def test_look_alike_identities_never_print_like_real_ones(cluster: Cluster) -> None:
    # Cyrillic A: prints exactly like 88.36/ADMIN unless escaped.
    look_alike = "88.36/\u0410DMIN"
    address, admin = asyncio.run(start_signed_node(cluster, "lookalike", "88.36", {}))
    # A grant to the look-alike, its JSON written in UTF-8 rather than escaped.
    grant = {"admin": look_alike, "index": 300, "permissions": int(AdminPermission.MODIFY_VALUE)}
    raw_grant = Value(100, "HS_ADMIN", json.dumps(grant, ensure_ascii=False).encode())

    async def set_up() -> list[Any]:
        registrar = Registrar(node=address, signer=admin)
        try:
            await registrar.create(look_alike, [pubkey_value(generate_key())])
            await registrar.create("88.36/VICTIM", [URL, raw_grant])
            await registrar.create(
                "88.36/VICTIM-2", [URL, admin_value(100, look_alike, 300, AdminPermission.MODIFY_VALUE)]
            )
            return await registrar.list_audit(prefix="88.36")
        finally:
            await registrar.close()

    entries = asyncio.run(set_up())
    assert [e.target for e in entries] == ["88.36/\\u0410DMIN", "88.36/VICTIM", "88.36/VICTIM-2"]  # raw, before
    key = str(key_path(cluster.state, "88.36/ADMIN"))
    audit = idis("audit", "--prefix", "88.36", "--node", address, "--identity", "88.36/ADMIN", "--key", key)
    assert "Create 88.36/\\u0410DMIN: OK" in audit and "\u0410" not in audit
    identity = idis("resolve", "--root", address, look_alike)
    assert identity.startswith("88.36/\\u0410DMIN  (version 1)") and "\u0410" not in identity
    for victim in ("88.36/VICTIM", "88.36/VICTIM-2"):  # the grant in UTF-8 JSON or escaped JSON: alike
        printed = idis("resolve", "--root", address, victim)
        assert '"admin": "88.36/\\u0410DMIN"' in printed and "\u0410" not in printed
