"""The rich error model: every domain error crosses the wire with its google.rpc details, and
comes back out as the same exception with the same reason, field and retry delay."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nodes.trust.quotas import RateLimited
from resolver import errors
from resolver.status import DOMAIN, error_from_rpc, rich_status

CASES: list[errors.IdisError] = [
    errors.InvalidIdentifier("identifier '88.100.1/' has an empty suffix"),
    errors.InvalidValue("value index 1 appears more than once"),
    errors.NotFound("identifier 88.100.1/X not found", 300),
    errors.AlreadyExists("identifier 88.100.1/X already exists with other values"),
    errors.VersionConflict("identifier 88.100.1/X is at version 3, not the expected 2"),
    errors.PermissionDenied("88.100.2/ADMIN does not hold ADD_HANDLE on prefix 88.100.1"),
    errors.Unauthenticated("no signature"),
    RateLimited("peer 127.0.0.1 is over its limit", 2.5),
]


def over_the_wire(error: errors.IdisError) -> grpc.aio.AioRpcError:
    code, message, trailing = rich_status(error)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), message, "")


@pytest.mark.parametrize("error", CASES, ids=lambda e: type(e).__name__)
def test_an_error_comes_back_as_itself_with_its_details(error: errors.IdisError) -> None:
    back = error_from_rpc(over_the_wire(error), "127.0.0.1:2641")
    assert isinstance(back, type(error) if not isinstance(error, RateLimited) else errors.LimitExceeded)
    assert str(back) == str(error)
    assert back.reason == error.reason
    assert back.field == error.field
    if isinstance(error, errors.NotFound):
        assert isinstance(back, errors.NotFound) and back.negative_ttl == 300


def test_reasons_are_stable_upper_snake_names() -> None:
    assert errors.InvalidIdentifier.reason == "INVALID_IDENTIFIER"
    assert errors.VersionConflict.reason == "VERSION_CONFLICT"
    assert RateLimited.reason == "RATE_LIMITED"


def test_any_grpc_client_reads_the_standard_details() -> None:
    status = rpc_status.from_call(over_the_wire(CASES[0]))  # type: ignore[arg-type]
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(bad)
    assert (info.reason, info.domain) == ("INVALID_IDENTIFIER", DOMAIN)
    assert bad.field_violations[0].field == "identifier"
    assert "empty suffix" in bad.field_violations[0].description


def test_a_quota_says_when_to_retry_in_retry_info() -> None:
    status = rpc_status.from_call(over_the_wire(CASES[-1]))  # type: ignore[arg-type]
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == 2_500_000_000
    assert error_from_rpc(over_the_wire(CASES[-1]), "x").retry_after == 2.5


def test_a_status_without_details_still_maps_to_its_exception() -> None:
    plain = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone", "")
    back = error_from_rpc(plain, "x")
    assert isinstance(back, errors.NotFound) and back.reason == "NOT_FOUND" and str(back) == "gone"
