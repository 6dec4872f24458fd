"""Handle response codes and their HTTP statuses: the one place where the domain's errors become
what the HANDLE.NET REST API answers (HANDLE-INTEROP.md A.4.2, A.6). ``resolver.status`` is the
same place for gRPC."""

from __future__ import annotations

from resolver import errors
from resolver.handle_protocol import RC as RC  # re-exported: the REST API speaks the same codes

_HTTP = {
    RC.VALUES_NOT_FOUND: 400,
    RC.SERVICE_REFERRAL: 300,
    RC.PREFIX_REFERRAL: 300,
    RC.HANDLE_NOT_FOUND: 404,
    RC.HANDLE_ALREADY_EXISTS: 409,
    RC.VALUE_ALREADY_EXISTS: 409,
    RC.PROTOCOL_ERROR: 400,
    RC.INVALID_HANDLE: 400,
    RC.INVALID_VALUE: 400,
    RC.SERVER_NOT_RESP: 400,
    RC.OPERATION_NOT_SUPPORTED: 501,
    RC.SERVER_TOO_BUSY: 503,
    RC.AUTHENTICATION_NEEDED: 401,
    RC.INVALID_ADMIN: 403,
    RC.INSUFFICIENT_PERMISSIONS: 403,
    RC.AUTHENTICATION_FAILED: 403,
    RC.INVALID_CREDENTIAL: 403,
}


def http_status(rc: RC, *, created: bool = False, resolution: bool = False) -> int:
    """The HTTP status of an answer with response code ``rc`` (HSJ's
    ``statusCodeFromResponse``): 201 for a write where nothing existed before, 200 for other
    successes and for "no matching values" on a resolution."""
    if rc is RC.SUCCESS:
        return 201 if created else 200
    if rc is RC.VALUES_NOT_FOUND and resolution:
        return 200
    return _HTTP.get(rc, 500)


class HandleFailure(Exception):
    """An answer other than success: its response code and message (the JSON body)."""

    def __init__(self, rc: RC, message: str = "", retry_after: float = 0.0, status: int = 0) -> None:
        super().__init__(message)
        self.rc = rc
        self.message = message
        self.retry_after = retry_after
        self._status = status
        """An HTTP status other than the response code's (404 for an unknown endpoint, 501 for
        an unknown method)."""

    @property
    def status(self) -> int:
        return self._status or http_status(self.rc)


_RC_OF: tuple[tuple[type[errors.IdisError], RC], ...] = (
    # the first class the error is an instance of decides (subclasses before their bases)
    (errors.InvalidIdentifier, RC.INVALID_HANDLE),
    (errors.InvalidValue, RC.INVALID_VALUE),
    (errors.InvalidArgument, RC.PROTOCOL_ERROR),
    (errors.ValueNotFound, RC.VALUES_NOT_FOUND),
    (errors.NotFound, RC.HANDLE_NOT_FOUND),
    (errors.ValueExists, RC.VALUE_ALREADY_EXISTS),
    (errors.AlreadyExists, RC.HANDLE_ALREADY_EXISTS),
    (errors.NotAuthoritative, RC.SERVER_NOT_RESP),
    (errors.PrefixNotHosted, RC.SERVER_NOT_RESP),
    (errors.FailedPrecondition, RC.PROTOCOL_ERROR),
    (errors.Unauthenticated, RC.AUTHENTICATION_NEEDED),
    (errors.PermissionDenied, RC.INSUFFICIENT_PERMISSIONS),
    (errors.Unavailable, RC.SERVER_TOO_BUSY),
)


def failure_of(error: errors.IdisError) -> HandleFailure:
    """The Handle answer to a domain error (HANDLE-INTEROP.md A.6, "Mapping from the node's errors")."""
    if isinstance(error, errors.LimitExceeded):  # a quota (retry later) or a size limit (never)
        rc = RC.SERVER_TOO_BUSY if error.retry_after else RC.INVALID_VALUE
        return HandleFailure(rc, str(error), error.retry_after)
    rc = next((rc for cls, rc in _RC_OF if isinstance(error, cls)), RC.ERROR)
    if rc is RC.HANDLE_NOT_FOUND:
        return HandleFailure(rc)  # exactly {"responseCode":100,"handle":...}: no message
    return HandleFailure(rc, str(error), error.retry_after)
