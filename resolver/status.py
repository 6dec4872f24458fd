"""The one mapping between domain errors and gRPC status codes.

Nodes use ``status_code_of`` to answer; the resolver uses ``error_from_status`` to raise the
same domain exception a node raised. Keeping both directions in one table keeps them true to
each other.

Errors travel in the standard rich error model (``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer, as ``grpcio-status`` writes and reads it), so any gRPC
client can read them:

* ``ErrorInfo`` on every error: ``reason`` (stable, e.g. ``INVALID_IDENTIFIER``,
  ``VERSION_CONFLICT``, ``RATE_LIMITED``), ``domain`` ``idis.v1``, metadata (``negative_ttl``);
* ``BadRequest`` with one field violation for invalid input (the field, the message);
* ``RetryInfo`` for quotas (how long to wait);
* ``PreconditionFailure`` for failed preconditions (a stale ``expected_version``...);
* ``ResourceInfo`` for NOT_FOUND and ALREADY_EXISTS (what kind of thing, named in the message).

A NOT_FOUND answer also keeps its ``idis-negative-ttl`` trailer (how long to cache it), which
every answer of this protocol carries, batch items included.
"""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from idis.v1 import resolution_pb2

from resolver import errors

DOMAIN = "idis.v1"

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
DENIAL_KEY = "idis-denial-bin"
"""Trailing-metadata key carrying a signed NOT_FOUND (a serialised ``idis.v1.Denial``)."""
MAX_DENIAL_BYTES = 65536
"""A denial trailer larger than this is ignored (a validating resolver then refuses the answer)."""


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


def error_from_item(number: int, message: str, reason: str) -> errors.IdisError:
    """A batch item's error from its code, message and reason (the exact class the node raised,
    when the reason names one of ours under that code)."""
    error = error_from_code_number(number, message)
    if reason:
        error = _precise(error, reason)
        error.reason = reason
    return error


def _details_of(error: errors.IdisError, code: grpc.StatusCode) -> list[Message]:
    metadata = {"negative_ttl": str(error.negative_ttl)} if isinstance(error, errors.NotFound) else {}
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)]
    message = str(error)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        faults = [(f"{error.field}[{item}]", why) for item, why in error.violations] or [
            (error.field or "request", message)
        ]
        bad = [error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in faults]
        details.append(error_details_pb2.BadRequest(field_violations=bad))
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after > 0:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    elif code == grpc.StatusCode.FAILED_PRECONDITION:
        failed = error_details_pb2.PreconditionFailure.Violation(
            type=error.reason, subject=error.field, description=message
        )
        details.append(error_details_pb2.PreconditionFailure(violations=[failed]))
    elif code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS):
        details.append(error_details_pb2.ResourceInfo(resource_type=error.field or "identifier", description=message))
    return details


def rich_status(error: errors.IdisError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """What a node answers ``error`` with: code, message, and trailing metadata holding the
    google.rpc details (and the negative-TTL trailer of a NOT_FOUND)."""
    code = status_code_of(error)
    packed = []
    for detail in _details_of(error, code):
        wrapped = any_pb2.Any()
        wrapped.Pack(detail)
        packed.append(wrapped)
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=str(error), details=packed))
    trailing: tuple[tuple[str, str | bytes], ...] = tuple(status.trailing_metadata)
    if isinstance(error, errors.NotFound) and error.negative_ttl:
        trailing += ((NEGATIVE_TTL_KEY, str(error.negative_ttl)),)
    if isinstance(error, errors.NotFound) and error.denial:
        trailing += ((DENIAL_KEY, error.denial),)
    return code, str(error), trailing


def _error_classes(base: type[errors.IdisError]) -> dict[str, type[errors.IdisError]]:
    found = {base.reason: base} if base.__module__ == errors.__name__ else {}
    for sub in base.__subclasses__():
        found.update(_error_classes(sub))
    return found


def _precise(error: errors.IdisError, reason: str) -> errors.IdisError:
    """The error as the exact class the node raised (VersionConflict rather than
    FailedPrecondition), when its reason names one of ours under the same status."""
    cls = _error_classes(errors.IdisError).get(reason)
    if cls is None or type(error) is cls or not issubclass(cls, type(error)):
        return error
    if issubclass(cls, errors.NotFound):
        return cls(str(error), error.negative_ttl, error.denial) if isinstance(error, errors.NotFound) else error
    return cls(str(error))


def _read_details(error: errors.IdisError, exc: grpc.aio.AioRpcError) -> errors.IdisError:
    """Fills in what the rich status says (reason, field, retry delay); a node that sends no
    details (or details that do not parse) leaves the error as its code and message made it."""
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]  # AioRpcError is call-shaped
    except (ValueError, DecodeError):
        return error
    for wrapped in status.details if status is not None else ():
        if wrapped.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            wrapped.Unpack(info)
            if info.domain == DOMAIN and info.reason:
                error = _precise(error, info.reason)
                error.reason = info.reason
        elif wrapped.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            wrapped.Unpack(bad)
            if bad.field_violations:
                error.field = bad.field_violations[0].field
            if isinstance(error, errors.TemplateViolation):  # each item's fault: values[<item>]
                error.field = "values"
                error.violations = tuple(
                    (v.field.removeprefix("values[").removesuffix("]"), v.description) for v in bad.field_violations
                )
        elif wrapped.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            wrapped.Unpack(retry)
            error.retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return error


def _is_denial(data: bytes) -> bool:
    """True when ``data`` parses as an ``idis.v1.Denial`` (a malformed trailer is dropped: the
    answer is then an unsigned NOT_FOUND, which a validating resolver refuses)."""
    try:
        resolution_pb2.Denial.FromString(data)
    except DecodeError:
        return False
    return True


def error_from_rpc(exc: grpc.aio.AioRpcError, address: str) -> errors.IdisError:
    """The domain exception for a failed call to ``address`` (network failures name the address)."""
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return errors.Unavailable(f"{address}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.Timeout(f"{address}: no answer within the deadline")
    negative_ttl, denial = 0, b""
    metadata: Any = exc.trailing_metadata() or ()
    for key, value in metadata:
        if key == NEGATIVE_TTL_KEY and str(value).isdigit():
            negative_ttl = int(value)
        elif key == DENIAL_KEY and isinstance(value, bytes) and len(value) <= MAX_DENIAL_BYTES:
            denial = value if _is_denial(value) else b""
    error = _read_details(error_from_status(code, details, negative_ttl), exc)
    if isinstance(error, errors.NotFound):
        error.denial = denial
    return error
