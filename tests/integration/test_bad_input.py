"""Bad input gets the right gRPC status, a message naming the problem, and changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from resolver.wire import (
    prefix_pb2,
    prefix_pb2_grpc,
    record_pb2,
    registration_pb2,
    registration_pb2_grpc,
    resolution_pb2,
    resolution_pb2_grpc,
)
from tests.integration.conftest import Cluster

Code = grpc.StatusCode
URL = record_pb2.Value(index=1, type="URL", data=b"https://example.com")


@pytest.fixture
async def enterprise(hierarchy: Cluster) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(hierarchy.address("enterprise-1")) as channel:
        yield channel


async def stored_identifiers(channel: grpc.aio.Channel) -> list[str]:
    stub = prefix_pb2_grpc.PrefixAdminStub(channel)
    response = await stub.ListIdentifiers(prefix_pb2.ListIdentifiersRequest(prefix="88.100.1", page_size=1000))
    return list(response.identifiers)


CREATE_CASES = [
    ("", [URL], Code.INVALID_ARGUMENT, "identifier is empty"),
    ("88.100.1/", [URL], Code.INVALID_ARGUMENT, "empty suffix"),
    ("88.100.1", [URL], Code.INVALID_ARGUMENT, "no '/'"),
    ("88.100.1/SN\x07", [URL], Code.INVALID_ARGUMENT, "control character U+0007"),
    ("88.100.1/" + "x" * 300, [URL], Code.INVALID_ARGUMENT, "the limit is 255"),
    ("88..1/x", [URL], Code.INVALID_ARGUMENT, "empty segment"),
    ("88.100.1/x", [URL, URL], Code.INVALID_ARGUMENT, "value index 1 appears more than once"),
    (
        "88.100.1/x",
        [record_pb2.Value(index=1, type="URL", data=b"x" * 70000)],
        Code.INVALID_ARGUMENT,
        "data is 70000 bytes long; the limit is 65536",
    ),
    ("88.100.1/x", [record_pb2.Value(index=0, type="URL")], Code.INVALID_ARGUMENT, "index 0 is out of range"),
    ("88.100.1/x", [record_pb2.Value(index=1, type="")], Code.INVALID_ARGUMENT, "empty type"),
    ("88.100.1/x", [record_pb2.Value(index=1, type="URL", permissions=0x30)], Code.INVALID_ARGUMENT, "unknown bits"),
    ("88.100.1/x", [], Code.INVALID_ARGUMENT, "needs at least one value"),
    ("88.100.2/x", [URL], Code.FAILED_PRECONDITION, "outside this node's authority"),
    ("88.100.1.5/x", [URL], Code.FAILED_PRECONDITION, "prefix 88.100.1.5 is not hosted by this node"),
    ("99/x", [URL], Code.FAILED_PRECONDITION, "outside this node's authority (88.100.1)"),
]


@pytest.mark.parametrize(("identifier", "values", "code", "message"), CREATE_CASES)
async def test_bad_creates_are_refused_and_store_nothing(
    enterprise: grpc.aio.Channel, identifier: str, values: list[record_pb2.Value], code: Code, message: str
) -> None:
    before = await stored_identifiers(enterprise)
    stub = registration_pb2_grpc.RegistrationStub(enterprise)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Create(registration_pb2.CreateRequest(identifier=identifier, values=values))
    assert info.value.code() == code
    assert message in (info.value.details() or "")
    assert await stored_identifiers(enterprise) == before


async def test_create_with_other_values_is_already_exists_and_keeps_the_original(enterprise: grpc.aio.Channel) -> None:
    stub = registration_pb2_grpc.RegistrationStub(enterprise)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Create(registration_pb2.CreateRequest(identifier="88.100.1/SN-0001", values=[URL]))
    assert info.value.code() == Code.ALREADY_EXISTS
    record = await resolution_pb2_grpc.ResolutionStub(enterprise).Resolve(
        resolution_pb2.ResolveRequest(identifier="88.100.1/SN-0001")
    )
    assert len(record.record.values) == 3


async def test_stale_replace_is_failed_precondition(enterprise: grpc.aio.Channel) -> None:
    stub = registration_pb2_grpc.RegistrationStub(enterprise)
    await stub.Replace(registration_pb2.ReplaceRequest(identifier="88.100.1/SN-0002", values=[URL], expected_version=1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Replace(
            registration_pb2.ReplaceRequest(identifier="88.100.1/SN-0002", values=[URL], expected_version=1)
        )
    assert info.value.code() == Code.FAILED_PRECONDITION
    assert "at version 2, not the expected 1" in (info.value.details() or "")


async def test_a_batch_over_the_limit_is_refused_whole(enterprise: grpc.aio.Channel) -> None:
    before = await stored_identifiers(enterprise)
    items = [registration_pb2.CreateRequest(identifier=f"88.100.1/L-{n}", values=[URL]) for n in range(2001)]
    stub = registration_pb2_grpc.RegistrationStub(enterprise)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.BatchCreate(registration_pb2.BatchCreateRequest(items=items))
    assert info.value.code() == Code.RESOURCE_EXHAUSTED
    assert "batch of 2001 items; the limit is 2000" in (info.value.details() or "")
    assert await stored_identifiers(enterprise) == before
    response = await stub.BatchCreate(registration_pb2.BatchCreateRequest(items=items[:2000]))
    assert all(item.status.code == 0 and item.created for item in response.items)


async def test_batch_items_with_bad_values_fail_alone(enterprise: grpc.aio.Channel) -> None:
    stub = registration_pb2_grpc.RegistrationStub(enterprise)
    response = await stub.BatchCreate(
        registration_pb2.BatchCreateRequest(
            items=[
                registration_pb2.CreateRequest(identifier="88.100.1/OK-1", values=[URL]),
                registration_pb2.CreateRequest(
                    identifier="88.100.1/BAD-1",
                    values=[record_pb2.Value(index=1, type="URL", ttl_type=7)],  # type: ignore[arg-type]
                ),
                registration_pb2.CreateRequest(identifier="88.100.1/OK-2", values=[URL]),
            ]
        )
    )
    assert [i.status.code for i in response.items] == [0, Code.INVALID_ARGUMENT.value[0], 0]
    assert "unknown ttl_type 7" in response.items[1].status.message
    assert "88.100.1/BAD-1" not in await stored_identifiers(enterprise)


async def test_resolving_outside_the_authority_is_an_error_not_a_miss(enterprise: grpc.aio.Channel) -> None:
    stub = resolution_pb2_grpc.ResolutionStub(enterprise)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Resolve(resolution_pb2.ResolveRequest(identifier="88.200/x"))
    assert info.value.code() == Code.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Resolve(resolution_pb2.ResolveRequest(identifier="88.100.1/none"))
    assert missing.value.code() == Code.NOT_FOUND
    trailers: Any = missing.value.trailing_metadata() or ()
    assert ("idis-negative-ttl", "300") in tuple(trailers)
    with pytest.raises(grpc.aio.AioRpcError) as recursive:
        await stub.Resolve(resolution_pb2.ResolveRequest(identifier="88.100.1/x", recursive=True))
    assert recursive.value.code() == Code.FAILED_PRECONDITION
    assert "recursion is not enabled" in (recursive.value.details() or "")


async def test_bad_prefix_administration(hierarchy: Cluster) -> None:
    async with grpc.aio.insecure_channel(hierarchy.address("secondary-100")) as channel:
        stub = prefix_pb2_grpc.PrefixAdminStub(channel)
        cases: list[tuple[Any, Code]] = [
            (stub.CreatePrefix(prefix_pb2.CreatePrefixRequest(prefix="88.200.1")), Code.FAILED_PRECONDITION),
            (stub.CreatePrefix(prefix_pb2.CreatePrefixRequest(prefix="88..1")), Code.INVALID_ARGUMENT),
            (stub.DelegatePrefix(prefix_pb2.DelegatePrefixRequest(prefix="88.100.3")), Code.INVALID_ARGUMENT),
            (
                stub.DelegatePrefix(
                    prefix_pb2.DelegatePrefixRequest(
                        prefix="88.100.2", site=record_pb2.Site(servers=[record_pb2.Server(address="127.0.0.1:1")])
                    )
                ),
                Code.FAILED_PRECONDITION,
            ),  # it hosts identifiers
            (
                stub.DelegatePrefix(
                    prefix_pb2.DelegatePrefixRequest(
                        prefix="88.100.4", site=record_pb2.Site(servers=[record_pb2.Server(address="nowhere")])
                    )
                ),
                Code.INVALID_ARGUMENT,
            ),
            (stub.ListIdentifiers(prefix_pb2.ListIdentifiersRequest(prefix="88.100.1")), Code.NOT_FOUND),
            (
                stub.ListIdentifiers(prefix_pb2.ListIdentifiersRequest(prefix="88.100.2", page_size=5000)),
                Code.INVALID_ARGUMENT,
            ),
        ]
        for number, (call, code) in enumerate(cases):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == code, (number, info.value.details())
        listed = await stub.ListPrefixes(prefix_pb2.ListPrefixesRequest())
        assert [p.prefix for p in listed.prefixes] == ["88.100", "88.100.1", "88.100.2"]


async def test_errors_carry_the_standard_rich_details_from_a_real_node(enterprise: grpc.aio.Channel) -> None:
    """Any gRPC client reads google.rpc details: ErrorInfo with a stable reason, BadRequest naming
    the field; the resolver library turns them back into the precise exception."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from resolver.errors import InvalidIdentifier
    from resolver.status import error_from_rpc

    stub = registration_pb2_grpc.RegistrationStub(enterprise)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Create(registration_pb2.CreateRequest(identifier="88.100.1/", values=[URL]))
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(bad)
    assert (info.reason, info.domain) == ("INVALID_IDENTIFIER", "idis.v1")
    assert bad.field_violations[0].field == "identifier"
    assert "empty suffix" in bad.field_violations[0].description
    error = error_from_rpc(refused.value, "enterprise")
    assert isinstance(error, InvalidIdentifier) and error.field == "identifier"
