"""The one mapping between domain errors and gRPC status codes.

Nodes use ``status_code_of`` to answer; the resolver uses ``error_from_status`` to raise the
same domain exception a node raised. Keeping both directions in one table keeps them true to
each other.
"""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

from resolver import errors

# Most specific first: the first class an exception is an instance of wins.
_TABLE: tuple[tuple[type[errors.IdisError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Timeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
)

_ERROR_OF_CODE: dict[grpc.StatusCode, type[errors.IdisError]] = {code: cls for cls, code in _TABLE}

NEGATIVE_TTL_KEY = "idis-negative-ttl"
"""Trailing-metadata key carrying the negative-caching TTL of a NOT_FOUND answer."""


def status_code_of(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code a node answers with for ``error``."""
    for cls, code in _TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_status(code: grpc.StatusCode, message: str, negative_ttl: int = 0) -> errors.IdisError:
    """The domain exception for a status a node answered with."""
    if code == grpc.StatusCode.NOT_FOUND:
        return errors.NotFound(message, negative_ttl)
    cls = _ERROR_OF_CODE.get(code)
    if cls is None:
        return errors.InternalError(f"{code.name}: {message}")
    return cls(message)


def error_from_code_number(number: int, message: str, negative_ttl: int = 0) -> errors.IdisError:
    """As error_from_status, for the numeric codes carried per item in batch responses."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return error_from_status(code, message, negative_ttl)
    return errors.InternalError(f"unknown status {number}: {message}")


def error_from_rpc(exc: grpc.aio.AioRpcError, address: str) -> errors.IdisError:
    """The domain exception for a failed call to ``address`` (network failures name the address)."""
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return errors.Unavailable(f"{address}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.Timeout(f"{address}: no answer within the deadline")
    negative_ttl = 0
    metadata: Any = exc.trailing_metadata() or ()
    for key, value in metadata:
        if key == NEGATIVE_TTL_KEY and str(value).isdigit():
            negative_ttl = int(value)
    return error_from_status(code, details, negative_ttl)
