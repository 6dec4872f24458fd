"""The audit trail: every write, who made it, with which key, from where, when, and the result.

Accepted changes are recorded in the same SQLite transaction as the change itself (so the
trail and the data never disagree). Refused calls are recorded by the request pipeline through
a ``RefusalTrail``: buffered in memory (bounded), written in batches by one periodic task, at
most ``peer_rate`` a second per peer; the ones beyond are counted and recorded as one summary
row per prefix, so refusals cannot fill the disk. The trail is listed per prefix or per
identity (``PrefixAdmin.ListAudit``, ``idis audit``) and pruned by age and size in bounded steps.

What a row says is unambiguous and bounded: its text is shown as printable ASCII once, when
the row is made (``audit_row``, ``refusal_row``; ``resolver.identifier.shown``: a look-alike
identity never prints like the real one), and cut to ``FIELD_BYTES`` whenever it is stored or
listed (``bounded``). The identity column holds only verified identities; an unverified claim
is recorded as identity ``-`` with ``claimed "..." (not verified)`` in the detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace

from nodes.trust.quotas import TokenBuckets
from resolver.errors import IdisError
from resolver.identifier import Identifier, Prefix, parse_prefix, shown

log = logging.getLogger("idis.audit")

ANONYMOUS = "-"

FIELD_BYTES = {
    "identity": 800,
    "peer": 128,
    "method": 64,
    "target": 800,
    "prefix": 64,
    "result": 32,
    "detail": 1024,
}
"""The most bytes each text field of an audit row holds (after ``shown``): an identifier of 255
bytes shown escaped fits whole; a row is at most 3 KB."""

CLAIM_BYTES = 300
"""The most bytes of an unverified claimed identity recorded in a refusal's detail."""

CUT_MARK = "...(cut)"


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


def cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes, the cut marked. Text that is not printable ASCII
    yet (not made by ``audit_row`` or ``refusal_row``, or recorded before the trail was bounded)
    is ``shown`` first, so what comes out is always printable ASCII; what is already is left as
    it is (so cutting twice changes nothing)."""
    if not (text.isascii() and text.isprintable()):
        text = shown(text)
    return text if len(text) <= limit else text[: limit - len(CUT_MARK)] + CUT_MARK


def bounded(row: AuditRow) -> AuditRow:
    """``row`` with every text field printable ASCII and cut to its ``FIELD_BYTES``; a key index
    outside 0..2^32-1 becomes 0. Idempotent."""
    f = {name: cut(getattr(row, name), limit) for name, limit in FIELD_BYTES.items()}
    key_index = row.key_index if 0 <= row.key_index < 2**32 else 0
    return AuditRow(
        row.at, f["identity"], key_index, f["peer"], f["method"], f["target"], f["prefix"], f["result"], f["detail"]
    )


def audit_row(actor: Actor | None, target: Identifier | Prefix, detail: str, at: float, result: str = "OK") -> AuditRow:
    """The row of an accepted (or refused) change to ``target`` by ``actor`` (cut by the store)."""
    caller = actor.caller if actor is not None else None
    prefix = target.prefix if isinstance(target, Identifier) else target
    return AuditRow(
        at=at,
        identity=shown(str(caller.identity)) if caller is not None else ANONYMOUS,
        key_index=caller.key_index if caller is not None else 0,
        peer=shown(actor.peer) if actor is not None else "",
        method=actor.method if actor is not None else "",
        target=shown(str(target)),
        prefix=prefix.key,
        result=result,
        detail=shown(detail),
    )


@dataclass(frozen=True, slots=True)
class BatchAudit:
    """The rows of one change to many targets by one actor (a batch): ``common``, bounded, holds
    what they share (its target and prefix empty); ``targets`` is each row's (target, prefix),
    bounded. Stored in one statement (``Transaction.audit_batch``)."""

    common: AuditRow
    targets: list[tuple[str, str]]

    def rows(self) -> list[AuditRow]:
        return [replace(self.common, target=target, prefix=prefix) for target, prefix in self.targets]

    def only(self, chosen: Sequence[int]) -> BatchAudit:
        """The rows of the targets at the positions ``chosen``."""
        return BatchAudit(self.common, [self.targets[i] for i in chosen])


def batch_audit(
    actor: Actor | None, targets: Sequence[str], prefixes: Sequence[str], detail: str, at: float
) -> BatchAudit:
    """The rows of one change by ``actor`` to each of ``targets`` (identifiers as text, under the
    prefixes whose keys are ``prefixes``): the same rows as ``bounded(audit_row(...))`` for each,
    the fields they share made once."""
    common = bounded(audit_row(actor, Prefix("", ""), detail, at))
    limit, prefix_limit = FIELD_BYTES["target"], FIELD_BYTES["prefix"]
    joined = "".join(targets)
    if (
        joined.isascii()
        and joined.isprintable()
        and "\\" not in joined
        and max(map(len, targets), default=0) <= limit
        and max(map(len, prefixes), default=0) <= prefix_limit
    ):  # what a batch usually holds: every field already as it is shown, and within bounds
        return BatchAudit(common, list(zip(targets, prefixes, strict=True)))
    return BatchAudit(
        common, [(cut(shown(t), limit), cut(p, prefix_limit)) for t, p in zip(targets, prefixes, strict=True)]
    )


def prefix_of_target(target: str) -> str:
    """The normalised prefix a refused call's target (an identifier, valid or not, or a prefix)
    names before its first "/"; "" when that is no valid prefix (such rows are listed by
    identity only)."""
    try:
        return parse_prefix(target.split("/", 1)[0]).key
    except IdisError:
        return ""


def refusal_row(
    at: float,
    caller_identity: str | None,
    claimed: str | None,
    key_index: int,
    peer: str,
    method: str,
    target: str,
    result: str,
    message: str,
) -> AuditRow:
    """The bounded row of a refused call. ``caller_identity``: the verified caller (None when
    authentication failed or was not asked); ``claimed``: the identity the call's metadata
    claimed, recorded in the detail as not verified."""
    detail = shown(message)
    if caller_identity is None and claimed:
        detail = f'claimed "{cut(shown(claimed), CLAIM_BYTES)}" (not verified): {detail}'
    return bounded(
        AuditRow(
            at,
            shown(caller_identity) if caller_identity else ANONYMOUS,
            key_index if caller_identity else 0,
            shown(peer),
            shown(method),
            shown(target),
            prefix_of_target(target),
            shown(result),
            detail,
        )
    )


OTHER_PREFIXES = "(other prefixes)"


class RefusalTrail:
    """Refused calls on their way to the audit trail: at most ``capacity`` rows wait in memory,
    at most ``peer_rate`` a second (burst ``peer_burst``) per peer are kept; ``run`` writes what
    waits every ``interval`` seconds in one transaction (``write``), with one summary row per
    prefix counting the refusals that were not kept (``dropped``), and prunes the trail
    (``prune``) in bounded steps."""

    def __init__(
        self,
        write: Callable[[Sequence[AuditRow]], Awaitable[None]],
        *,
        capacity: int = 1000,
        peer_rate: float = 5.0,
        peer_burst: float = 20.0,
        max_summaries: int = 100,
        prune: Callable[[float], Awaitable[int]] | None = None,
        prune_step: int = 1000,
        prune_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``prune(now)``: removes at most ``prune_step`` rows past retention and returns how
        many; a full step means more are due, and the next step follows at the next write,
        else the next is ``prune_interval`` seconds later."""
        self.write = write
        self.capacity = capacity
        self.peers = TokenBuckets(peer_rate, peer_burst, monotonic, max_keys=10_000)
        self.max_summaries = max_summaries
        self.prune = prune
        self.prune_step = prune_step
        self.prune_interval = prune_interval
        self.clock = clock
        self.monotonic = monotonic
        self.dropped_total = 0
        """Refusals not recorded one by one, since the start (each is counted in a summary row)."""
        self._rows: list[AuditRow] = []
        self._dropped: dict[str, dict[str, int]] = {}
        self._next_prune = 0.0

    def add(self, row: AuditRow, peer: str) -> None:
        """Keeps ``row`` (bounded) for the next write, or counts it when its peer is over its
        rate or the buffer is full. Never blocks, never fails."""
        if len(self._rows) < self.capacity and self.peers.admits(peer):
            self._rows.append(bounded(row))
            return
        self.dropped_total += 1
        prefix = row.prefix if row.prefix in self._dropped or len(self._dropped) < self.max_summaries else ""
        by_peer = self._dropped.setdefault(prefix if prefix else OTHER_PREFIXES, {})
        if peer in by_peer or len(by_peer) < 5:
            by_peer[peer] = by_peer.get(peer, 0) + 1
        else:
            by_peer["(other peers)"] = by_peer.get("(other peers)", 0) + 1

    def pending(self) -> int:
        return len(self._rows)

    def _summaries(self) -> list[AuditRow]:
        now = self.clock()
        out = []
        for prefix, by_peer in self._dropped.items():
            total = sum(by_peer.values())
            peers = ", ".join(f"{p} {n}" for p, n in sorted(by_peer.items(), key=lambda item: -item[1]))
            out.append(
                bounded(
                    AuditRow(
                        now,
                        ANONYMOUS,
                        0,
                        "",
                        "(refusals)",
                        prefix,
                        "" if prefix == OTHER_PREFIXES else prefix,
                        "NOT_RECORDED",
                        f"{total} more refused calls not recorded one by one"
                        f" (over the audited-refusal rate per peer, or the buffer was full): {peers}",
                    )
                )
            )
        return out

    async def flush(self) -> int:
        """Writes what waits, summaries included, in one transaction; the number of rows. Rows
        that cannot be written are logged and dropped (a refusal never waits for the disk)."""
        rows = self._rows + self._summaries()
        self._rows = []
        self._dropped = {}
        if not rows:
            return 0
        try:
            await self.write(rows)
        except Exception:
            log.exception("could not record %d refused calls in the audit trail", len(rows))
            return 0
        return len(rows)

    async def prune_due(self) -> int:
        """One pruning step when one is due; the rows removed."""
        if self.prune is None or self.monotonic() < self._next_prune:
            return 0
        try:
            removed = await self.prune(self.clock())
        except Exception:
            log.exception("could not prune the audit trail")
            removed = 0
        self._next_prune = self.monotonic() + (0 if removed >= self.prune_step else self.prune_interval)
        return removed

    async def run(self, interval: float) -> None:
        """Writes and prunes every ``interval`` seconds until cancelled; then writes what waits."""
        try:
            while True:
                await asyncio.sleep(interval)
                await self.flush()
                await self.prune_due()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())
