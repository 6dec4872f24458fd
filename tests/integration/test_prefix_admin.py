"""Prefix administration on real nodes that require signatures: RemovePrefix (DELETE_NA, its
refusals, the referral gone from every cache) and the one way every list pages."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import grpc
import grpc.aio
import pytest

from resolver.errors import FailedPrecondition, IdisError, InvalidArgument, NotFound, PermissionDenied
from resolver.record import AdminPermission, admin_value
from resolver.signing import Signer, generate_key, pubkey_value
from resolver.status import error_from_rpc
from resolver.wire import prefix_pb2, resolution_pb2
from tests.integration.conftest import Cluster
from tests.integration.test_trust import URL, Trusted, start_trusted


@pytest.fixture
async def signed(cluster: Cluster) -> Trusted:
    """The local hierarchy, every node requiring signatures (tests/integration/test_trust.py)."""
    return await asyncio.to_thread(start_trusted, cluster)


async def call(address: str, signer: Signer | None, method: str, request: Any, answer: Any) -> Any:
    """One raw call (signed when a signer is given); a refusal raises the library's exception."""
    data = request.SerializeToString()
    path = f"/idis.v1.{method}"
    async with grpc.aio.insecure_channel(address) as channel:
        rpc = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        metadata = signer.metadata(path, data, address) if signer is not None else None
        try:
            return answer.FromString(await rpc(data, metadata=metadata))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, address) from None


async def resolve_on(address: str, identifier: str) -> resolution_pb2.ResolveResponse:
    request = resolution_pb2.ResolveRequest(identifier=identifier)
    answer: resolution_pb2.ResolveResponse = await call(
        address, None, "Resolution/Resolve", request, resolution_pb2.ResolveResponse
    )
    return answer


async def test_remove_prefix_needs_delete_na_and_refuses_what_is_not_removable(signed: Trusted) -> None:
    admin = signed.registrar("secondary-100", signed.signers["secondary-100"])
    ops_key = generate_key()
    ops = Signer("88.100.2/OPS", ops_key)
    try:
        await admin.create(ops.identity, [pubkey_value(ops_key)])
        adds_only = admin_value(100, ops.identity, 300, AdminPermission.ADD_NA)
        await admin.create_prefix("88.100.3", admins=[adds_only])
        by_ops = signed.registrar("secondary-100", ops)
        try:
            await by_ops.create_prefix("88.100.3.1")  # ADD_NA on 88.100.3
            with pytest.raises(PermissionDenied, match=r"does not hold DELETE_NA on prefix 88\.100\.3"):
                await by_ops.remove_prefix("88.100.3.1")
        finally:
            await by_ops.close()
        refusals: list[tuple[str, type[IdisError], str]] = [
            ("88.100", InvalidArgument, "88.100 is this node's apex"),
            ("88.100.3", FailedPrecondition, r"has 1 sub-prefixes on this node \(88\.100\.3\.1\)"),
            ("88.100.2", FailedPrecondition, r"88\.100\.2 hosts \d+ identifiers"),
            ("88.100.9", NotFound, r"88\.100\.9 is neither hosted nor delegated"),
        ]
        for prefix, error, message in refusals:
            with pytest.raises(error, match=message):
                await admin.remove_prefix(prefix)
        kept = {p.prefix for p in await admin.list_prefixes("88.100")}
        assert {"88.100.1", "88.100.2", "88.100.3", "88.100.3.1"} <= kept  # refusals changed nothing
        assert (await admin.remove_prefix("88.100.3.1")).kind == "hosted"
        assert (await admin.remove_prefix("88.100.3")).kind == "hosted"
        assert not {"88.100.3", "88.100.3.1"} & {p.prefix for p in await admin.list_prefixes("88.100")}
    finally:
        await admin.close()


async def test_a_removed_delegation_is_no_longer_referred_to_even_from_the_cache(signed: Trusted) -> None:
    secondary = signed.address("secondary-100")
    for _ in range(3):  # the first answer is computed and cached, the next ones are cache hits
        referral = (await resolve_on(secondary, "88.100.1/SN-0001")).referral
        assert referral.prefix == "88.100.1"
    admin = signed.registrar("secondary-100", signed.signers["secondary-100"])
    try:
        removed = await admin.remove_prefix("88.100.1")
        assert removed.kind == "delegated" and removed.servers == (signed.address("enterprise-1"),)
    finally:
        await admin.close()
    for _ in range(2):
        with pytest.raises(NotFound, match=r"prefix 88\.100\.1 is not allocated under 88\.100"):
            await resolve_on(secondary, "88.100.1/SN-0001")


def token_of(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


async def pages(address: str, signer: Signer, method: str, request: Any, answer: Any, items: str) -> list[list[Any]]:
    """Every page of a listing, following next_page_token to its end."""
    out: list[list[Any]] = []
    while True:
        response = await call(address, signer, f"PrefixAdmin/{method}", request, answer)
        out.append(list(getattr(response, items)))
        if not response.next_page_token:
            return out
        request.page_token = response.next_page_token


async def test_every_list_pages_the_same_way(signed: Trusted) -> None:
    secondary, signer = signed.address("secondary-100"), signed.signers["secondary-100"]
    admin = signed.registrar("secondary-100", signer)
    try:
        for number in range(10, 15):
            await admin.create_prefix(f"88.100.{number}")
            await admin.create(f"88.100.2/PAGE-{number}", [URL])
    finally:
        await admin.close()
    listings: list[tuple[str, Any, Any, str, dict[str, str]]] = [
        ("ListPrefixes", prefix_pb2.ListPrefixesRequest, prefix_pb2.ListPrefixesResponse, "prefixes", {}),
        (
            "ListIdentifiers",
            prefix_pb2.ListIdentifiersRequest,
            prefix_pb2.ListIdentifiersResponse,
            "identifiers",
            {"prefix": "88.100.2"},
        ),
        ("ListAudit", prefix_pb2.ListAuditRequest, prefix_pb2.ListAuditResponse, "entries", {"prefix": "88.100"}),
    ]
    for method, request_type, answer, items, fields in listings:
        whole = await pages(secondary, signer, method, request_type(**fields), answer, items)
        paged = await pages(secondary, signer, method, request_type(page_size=2, **fields), answer, items)
        assert len(whole) == 1 and len(whole[0]) >= 6, method  # one page of the default size
        assert len(paged) > 2 and all(len(page) == 2 for page in paged[:-1]) and 1 <= len(paged[-1]) <= 2, method
        assert [x for page in paged for x in page] == whole[0], method  # the same items, in order
        elsewhere = b"audit:1" if method == "ListPrefixes" else b"prefixes:88.100"  # another list's token
        for token in ("not a token", token_of(b"not-a-token"), token_of(elsewhere), token_of(b"\xff:88.100")):
            with pytest.raises(InvalidArgument, match="page_token") as info:
                await call(secondary, signer, f"PrefixAdmin/{method}", request_type(page_token=token, **fields), answer)
            assert info.value.field == "page_token", method
        with pytest.raises(InvalidArgument, match="page_size 5000 is over the limit of 1000") as info:
            await call(secondary, signer, f"PrefixAdmin/{method}", request_type(page_size=5000, **fields), answer)
        assert info.value.field == "page_size"
    anonymous = signed.registrar("secondary-100", None)
    try:
        names = [p.prefix for p in await anonymous.list_prefixes("88.100", page_size=2)]
    finally:
        await anonymous.close()
    assert names[:3] == ["88.100", "88.100.1", "88.100.10"] and "88.100.14" in names
