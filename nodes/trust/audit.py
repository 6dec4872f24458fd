"""The audit trail: every write, who made it, with which key, from where, when, and the result.

Accepted changes are recorded in the same SQLite transaction as the change itself (so the
trail and the data never disagree); refused writes are recorded by the request pipeline. The
trail is listed per prefix or per identity (``PrefixAdmin.ListAudit``, ``idis audit``).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from resolver.identifier import Identifier, Prefix

ANONYMOUS = "-"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: an administrator identifier and the index of the key it used."""

    identity: Identifier
    key_index: int
    nonce: str = ""


@dataclass(frozen=True)
class Actor:
    """Who is making the call being served: the authenticated caller (None when the node does
    not require signatures), the peer address, and the gRPC method."""

    caller: Caller | None
    peer: str
    method: str
    nonce: str = ""
    """The signed call's nonce: recorded in the write's transaction, so a replay is refused even
    by another worker process."""


def nonce_of(actor: Actor | None) -> str:
    """The nonce a write's transaction must record (empty for unsigned calls)."""
    return actor.caller.nonce if actor is not None and actor.caller is not None else ""


current_actor: ContextVar[Actor | None] = ContextVar("idis_actor", default=None)
"""Set by the request pipeline for the call it serves; servicers hand it to the domain."""


@dataclass(frozen=True)
class AuditRow:
    at: float
    identity: str
    key_index: int
    peer: str
    method: str
    target: str
    prefix: str
    result: str
    detail: str


def audit_row(actor: Actor | None, target: Identifier | Prefix, detail: str, at: float, result: str = "OK") -> AuditRow:
    caller = actor.caller if actor is not None else None
    prefix = target.prefix if isinstance(target, Identifier) else target
    return AuditRow(
        at=at,
        identity=str(caller.identity) if caller is not None else ANONYMOUS,
        key_index=caller.key_index if caller is not None else 0,
        peer=actor.peer if actor is not None else "",
        method=actor.method if actor is not None else "",
        target=str(target),
        prefix=prefix.key,
        result=result,
        detail=detail,
    )
