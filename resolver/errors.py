"""The exceptions of the identifier system, small and precise so callers can catch what they mean.

Every exception maps to exactly one gRPC status code (see ``resolver.status``): a node raises
them from its domain logic and the service layer turns them into statuses; the resolver turns
statuses it receives back into the same exceptions.
"""

from __future__ import annotations

import re


class IdisError(Exception):
    """Base class of every error this package raises on purpose.

    Besides its message, an error carries what the standard gRPC error model (``google.rpc``
    details, see ``resolver.status``) says about it: a stable ``reason`` (the class name in
    UPPER_SNAKE_CASE: scripts may rely on it), for invalid input the request ``field`` at
    fault, and for quotas ``retry_after`` (seconds). A client that receives an error gets them
    back from the node's details."""

    reason: str = "IDIS_ERROR"
    field: str = ""
    """The request field at fault (invalid input), when known."""
    retry_after: float = 0.0
    """Seconds until a retry may succeed (quotas), when known."""
    violations: tuple[tuple[str, str], ...] = ()
    """For invalid input with several faults (a template's items): (field, why) of each; a
    client gets them back from the node's ``BadRequest`` details."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.reason = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper()


# --- bad input: INVALID_ARGUMENT -------------------------------------------------------------
class InvalidArgument(IdisError):
    """A request is malformed; nothing was changed."""


class InvalidIdentifier(InvalidArgument):
    """An identifier or prefix breaks the grammar or a length limit."""

    field = "identifier"


class InvalidValue(InvalidArgument):
    """A value is malformed: bad index, duplicate index, empty type, oversized data..."""

    field = "values"


class TemplateViolation(InvalidValue):
    """A registration breaks the metadata template it names (``resolver.template``): its
    ``violations`` list every fault, each naming the template item at fault."""

    @classmethod
    def of(cls, violations: list[tuple[str, str]], subject: str = "") -> TemplateViolation:
        shown = "; ".join(f"{item}: {why}" for item, why in violations[:10])
        more = f" (and {len(violations) - 10} more)" if len(violations) > 10 else ""
        error = cls(f"{subject + ' ' if subject else ''}breaks its template: {shown}{more}")
        error.violations = tuple(violations)
        return error


class BadTemplate(InvalidArgument):
    """A template definition is malformed (the message names the part at fault)."""

    field = "template"


# --- state: NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION -------------------------------------
class NotFound(IdisError):
    """The identifier (or the value, or the prefix) does not exist.

    ``negative_ttl`` is how long a resolver may cache the fact, in seconds.
    """

    def __init__(self, message: str, negative_ttl: int = 0, denial: bytes = b"") -> None:
        super().__init__(message)
        self.negative_ttl = negative_ttl
        self.denial = denial
        """From a node that signs: the serialised ``idis.v1.Denial`` proving the fact."""


class ValueNotFound(NotFound):
    """The identifier exists but has no value at an index the request names."""


class AlreadyExists(IdisError):
    """The identifier, value index or prefix exists already (and differs from the request)."""


class ValueExists(AlreadyExists):
    """The identifier already has a value at an index the request would add."""


class FailedPrecondition(IdisError):
    """The request is well-formed but the system is not in a state that allows it."""


class VersionConflict(FailedPrecondition):
    """A write named an expected version that is no longer the stored one."""


class NotAuthoritative(FailedPrecondition):
    """The identifier's prefix is outside this node's authority, or is delegated elsewhere."""


class PrefixNotHosted(FailedPrecondition):
    """A write names a prefix that exists within the authority but is not hosted here."""


class ResolutionFailed(FailedPrecondition):
    """Following referrals did not lead to an answer (a loop, or too many hops)."""


class Bogus(ResolutionFailed):
    """An answer that does not verify (verifiable resolution): a bad signature, an expired
    statement, a key not in the chain, or an answer outside its signer's authority. The
    message says which; a recursive node passes it on with its reason, BOGUS."""


class ReferralLoop(ResolutionFailed):
    """Two or more nodes refer to each other for the same prefix."""


class HopLimitExceeded(ResolutionFailed):
    """The referral chain is longer than the resolver's hop limit."""


# --- trust: UNAUTHENTICATED, PERMISSION_DENIED ---------------------------------------------
class Unauthenticated(IdisError):
    """A write call's signature is missing, malformed, stale, replayed or does not verify."""


class PermissionDenied(IdisError):
    """The authenticated identity may not make this change."""


# --- limits: RESOURCE_EXHAUSTED ----------------------------------------------------------------
class LimitExceeded(IdisError):
    """A request exceeds a size or count limit (batch size, values per record...)."""


# --- the network: UNAVAILABLE, DEADLINE_EXCEEDED -----------------------------------------------
class Unavailable(IdisError):
    """No server of a site could be reached."""


class Timeout(IdisError):
    """A call did not finish within its deadline."""


class InternalError(IdisError):
    """A bug or an unexpected condition on the serving side."""
