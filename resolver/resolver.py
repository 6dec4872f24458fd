"""The referral-chasing resolver: from the top-level node down to the node that holds an identifier.

Resolution of ``88.100.1/SN-1``:

1. A cached answer (record or NOT_FOUND) for the identifier ends it with no network hop.
2. Otherwise start at the closest cached referral for the identifier's prefix (``88.100.1``,
   then ``88.100``, ...) or, with none cached, at the configured top-level (root) servers.
3. Ask one server of that site (picked by the Handle hash of the identifier; the next one on
   failure, at most ``max_servers_per_site`` of them). A referral names a more specific site:
   cache it for its TTL and go on there. A record or NOT_FOUND is the answer: cache it (records
   for their smallest value TTL, NOT_FOUND for the node's negative TTL). Every TTL is capped
   at ``max_ttl``.
4. A server asked twice for the same identifier means the nodes refer to each other
   (``ReferralLoop``); more than ``max_hops`` referrals is ``HopLimitExceeded``.

An answer is accepted only within the authority of the server that gave it. A server was
reached through a delegation (a referral for prefix ``D``, or the configured roots, whose
delegation is the whole namespace): it may refer only to a prefix strictly below ``D`` that
covers the identifier asked, and answer only for the identifier asked. Anything else is
``ResolutionFailed`` and nothing of that answer is cached, so a node delegated ``88.100.9``
cannot make a resolver send ``88.100.*`` questions to it, nor plant a record for another
identifier.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from resolver.attestation import PROOF_METADATA, Bogus, ChainStep, Validator
from resolver.cache import NEGATIVE, LookupCache
from resolver.channels import ChannelPool
from resolver.errors import (
    HopLimitExceeded,
    IdisError,
    InvalidArgument,
    NotFound,
    ReferralLoop,
    ResolutionFailed,
    Timeout,
    Unavailable,
)
from resolver.identifier import Identifier, Prefix, parse_identifier
from resolver.record import Record
from resolver.signing import Signer
from resolver.site import Referral, Site, make_site
from resolver.status import error_from_rpc
from resolver.wire import (
    decode_answer,
    denial_from_bytes,
    not_found_from_item,
    not_found_item,
    proof_from_pb,
    resolution_pb2,
)

RESOLVE_METHOD = "/idis.v1.Resolution/Resolve"

MAX_HOPS = 40
"""The national SDKs give up after 40 referrals; so do we."""

MAX_TTL = 86400
"""Default cap on every TTL the resolver caches (a day), whatever a node says."""

MAX_SERVERS_PER_SITE = 4
"""Default number of a site's servers tried for one question before giving up on the site."""


@dataclass(frozen=True, slots=True)
class Hop:
    """One step of a resolution, for ``--trace``."""

    server: str
    """The server asked, or "cache"."""
    question: str
    outcome: str
    elapsed: float
    """Seconds."""


@dataclass(slots=True)
class Trace:
    hops: list[Hop] = field(default_factory=list)
    chain: list[ChainStep] = field(default_factory=list)
    """With validation: what vouched for the answer, from the trust anchor down."""

    def add(self, server: str, question: str, outcome: str, started: float) -> None:
        self.hops.append(Hop(server, question, outcome, time.perf_counter() - started))

    @property
    def network_hops(self) -> int:
        return sum(1 for h in self.hops if h.server != "cache")


class Resolver:
    """Resolves identifiers through a hierarchy of nodes, caching what it learns.

    ``roots`` are the addresses (``host:port``) of the top-level node's servers. Answers are
    cached in their wire form in one ``LookupCache``: records and NOT_FOUND answers under the
    identifier's key, referrals under the delegated prefix, each for at most ``max_ttl``
    seconds. With ``cache_answers=False`` only referrals are cached (for callers that keep
    their own, shorter-lived cache of answers, such as a node's key lookups).
    """

    def __init__(
        self,
        roots: Sequence[str],
        *,
        cache: LookupCache | None = None,
        max_hops: int = MAX_HOPS,
        timeout: float = 5.0,
        channels: ChannelPool | None = None,
        on_resolved: Callable[[int], None] | None = None,
        signer: Signer | None = None,
        max_ttl: int = MAX_TTL,
        max_servers_per_site: int = MAX_SERVERS_PER_SITE,
        cache_answers: bool = True,
        validator: Validator | None = None,
        clock: Callable[[], float] = time.time,
        proofs: bool = False,
    ) -> None:
        """``on_resolved`` is told the number of network hops of every resolution that left the
        cache (for metrics). With a ``validator`` (verifiable resolution) every record, referral
        and NOT_FOUND must chain up to its trust anchor, or it is refused as ``Bogus`` and
        nothing of it is cached. Nodes send proofs, denials and delegations only to callers that
        ask: a validating resolver asks, and so does one made with ``proofs`` (a node fetching
        the chain down to its apex)."""
        if max_ttl < 1 or max_servers_per_site < 1:
            raise ValueError("max_ttl and max_servers_per_site must be at least 1")
        self.root_site: Site = make_site(list(roots))
        self.cache: LookupCache = cache if cache is not None else LookupCache(100_000, 64 * 1024 * 1024)
        self.max_hops = min(max_hops, MAX_HOPS)
        self.timeout = timeout
        self.max_ttl = max_ttl
        self.max_servers_per_site = max_servers_per_site
        self.cache_answers = cache_answers
        self._channels = channels if channels is not None else ChannelPool()  # an empty pool is falsy
        self._on_resolved = on_resolved or (lambda hops: None)
        self.signer = signer
        """Signs every query, so the nodes show this reader the private values it may read."""
        self.validator = validator
        self.clock = clock
        self.proofs = proofs or validator is not None

    async def close(self) -> None:
        await self._channels.close()

    async def __aenter__(self) -> Resolver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def resolve(self, identifier: str | Identifier, trace: Trace | None = None) -> Record:
        """The record of ``identifier``; raises NotFound, InvalidIdentifier, ResolutionFailed, ..."""
        record, _ = await self.resolve_answer(identifier, trace)
        return record

    async def resolve_answer(self, identifier: str | Identifier, trace: Trace | None = None) -> tuple[Record, bytes]:
        """``resolve``, with the serialised ResolveResponse the record came in (its proof
        included: what a recursive node relays so its clients can validate too)."""
        ident = parse_identifier(identifier) if isinstance(identifier, str) else identifier
        started = time.perf_counter()
        key = ident.key.encode()
        cached = self.cache.lookup(key)
        if cached is not None:
            kind, data = cached
            if trace is not None:
                ttl = int(self.cache.remaining_ttl(key))
                label = "NOT_FOUND" if kind == NEGATIVE else "record"
                trace.add("cache", str(ident), f"{label} (cached, {ttl}s left)", started)
            if kind == NEGATIVE:
                raise NotFound(*not_found_from_item(data))
            record = decode_answer(data)
            if isinstance(record, Record):
                return record, data
        hops = Trace() if trace is None else trace
        before = hops.network_hops
        answer, _site, data = await self._chase(ident, hops)
        self._on_resolved(hops.network_hops - before)
        if isinstance(answer, NotFound):
            raise answer
        return answer, data

    async def authority_for(self, identifier: str | Identifier, trace: Trace | None = None) -> Site:
        """The site of the node(s) that host ``identifier``'s prefix: where to register it."""
        ident = parse_identifier(identifier) if isinstance(identifier, str) else identifier
        _answer, site, _data = await self._chase(ident, trace)
        return site

    def _start(self, prefix: Prefix, trace: Trace | None) -> tuple[Site, Prefix | None]:
        """The closest cached referral's site and prefix, else the roots (delegated everything: None)."""
        for candidate in prefix.ancestors():
            data = self.cache.get(candidate.key.encode())
            referral = decode_answer(data) if data is not None else None
            if isinstance(referral, Referral):
                if trace is not None:
                    ttl = int(self.cache.remaining_ttl(candidate.key.encode()))
                    trace.add(
                        "cache", str(prefix), f"referral {referral.prefix} (cached, {ttl}s left)", time.perf_counter()
                    )
                return referral.site, referral.prefix
        return self.root_site, None

    async def _chase(self, ident: Identifier, trace: Trace | None) -> tuple[Record | NotFound, Site, bytes]:
        """Follows referrals to the authoritative site; its answer (NOT_FOUND included), the site,
        and the answer's bytes (a record's serialised ResolveResponse; empty for NOT_FOUND)."""
        site, delegation = self._start(ident.prefix, trace)
        asked: list[str] = []
        for _ in range(self.max_hops + 1):
            try:
                answer, data = await self._ask_site(site, delegation, ident, asked, trace)
            except NotFound as exc:
                self._validate_denial(exc, ident, trace)
                exc.negative_ttl = min(exc.negative_ttl, self.max_ttl)
                if self.cache_answers:
                    key = ident.key.encode()
                    self.cache.set(key, not_found_item(str(exc), exc.negative_ttl, exc.denial), exc.negative_ttl, True)
                return exc, site, b""
            if isinstance(answer, Record):
                if self.cache_answers:
                    ttl = min(answer.cache_ttl(int(time.time())), self.max_ttl)
                    self.cache.set(ident.key.encode(), data, ttl)
                return answer, site, data
            self.cache.set(answer.prefix.key.encode(), data, min(answer.ttl, self.max_ttl))
            site, delegation = answer.site, answer.prefix
        raise HopLimitExceeded(f"more than {self.max_hops} referrals resolving {ident}: {' -> '.join(asked)}")

    async def _ask_site(
        self, site: Site, delegation: Prefix | None, ident: Identifier, asked: list[str], trace: Trace | None
    ) -> tuple[Record | Referral, bytes]:
        """The first answer of up to ``max_servers_per_site`` servers of ``site`` (reached
        through a referral for ``delegation``), checked to be within their authority."""
        failures: list[str] = []
        for server in site.ordered_for(ident.key)[: self.max_servers_per_site]:
            if server.address in asked:
                raise ReferralLoop(f"referral loop resolving {ident}: {' -> '.join([*asked, server.address])}")
            started = time.perf_counter()
            try:
                answer, data = await self._ask_checked(server.address, delegation, ident, asked, trace)
            except IdisError as exc:
                if trace is not None:
                    trace.add(server.address, str(ident), f"{type(exc).__name__}: {exc}", started)
                if isinstance(exc, (Unavailable, Timeout)):
                    failures.append(f"{server.address} ({exc})")
                    continue
                raise
            if trace is not None:
                outcome = (
                    f"record v{answer.version}, {len(answer.values)} values"
                    if isinstance(answer, Record)
                    else f"referral {answer.prefix} -> {', '.join(s.address for s in answer.site.servers)}"
                )
                trace.add(server.address, str(ident), outcome, started)
            return answer, data
        label = "root" if delegation is None else str(delegation)
        raise Unavailable(f"no server for {label} answered: {'; '.join(failures)}")

    async def _ask_checked(
        self, address: str, delegation: Prefix | None, ident: Identifier, asked: list[str], trace: Trace | None = None
    ) -> tuple[Record | Referral, bytes]:
        """One server's answer, accepted only within its authority (``accepted_answer``);
        the server joins ``asked`` once it has answered (an error answer too)."""
        try:
            data = await self._ask(address, ident)
        except IdisError as exc:
            if not isinstance(exc, (Unavailable, Timeout)):
                asked.append(address)
            raise
        asked.append(address)
        answer = accepted_answer(data, address, delegation, ident, asked)
        steps = self._validate(answer, data, ident, address)
        if trace is not None and steps:
            trace.chain = steps
        return answer, data

    def _validate(self, answer: Record | Referral, data: bytes, ident: Identifier, address: str) -> list[ChainStep]:
        """With a validator: raises Bogus unless ``answer`` (``data``) chains up to the anchor;
        the chain that vouched for it."""
        if self.validator is None:
            return []
        now = int(self.clock())
        if isinstance(answer, Referral):
            if not answer.delegations:
                raise Bogus(f"{address} referred {ident} to {answer.prefix} with no delegation")
            return self.validator.verify_referral(answer.prefix.key, answer.delegations, now)
        response = resolution_pb2.ResolveResponse.FromString(data)
        if not response.HasField("proof"):
            raise Bogus(f"{address} answered {ident} with a record that carries no proof")
        proof = proof_from_pb(response.proof)
        return self.validator.verify(ident.key, answer.version, answer.values, proof, now)

    def _validate_denial(self, error: NotFound, ident: Identifier, trace: Trace | None) -> None:
        """With a validator: raises Bogus unless the NOT_FOUND carries a valid denial."""
        if self.validator is None:
            return
        if not error.denial:
            raise Bogus(f"NOT_FOUND for {ident} is not signed: {error}")
        try:
            statement, delegations = denial_from_bytes(error.denial)
        except IdisError as exc:
            raise Bogus(str(exc)) from exc
        steps = self.validator.verify_denial(ident.key, statement, delegations, int(self.clock()))
        if trace is not None:
            trace.chain = steps

    async def _ask(self, address: str, ident: Identifier) -> bytes:
        """The serialised ResolveResponse of one node (kept as bytes: that is what is cached)."""
        call = self._channels.get(address).unary_unary(
            RESOLVE_METHOD, request_serializer=None, response_deserializer=None
        )
        request = resolution_pb2.ResolveRequest(identifier=str(ident)).SerializeToString()
        metadata = tuple(self.signer.metadata(RESOLVE_METHOD, request, address)) if self.signer is not None else ()
        if self.proofs:
            metadata += ((PROOF_METADATA, "1"),)  # nodes send proofs only to those who ask
        try:
            data: bytes = await call(request, timeout=self.timeout, metadata=metadata or None)
        except grpc.aio.AioRpcError as exc:
            try:
                error = error_from_rpc(exc, address)
            except ValueError:  # e.g. a negative TTL of thousands of digits
                error = ResolutionFailed(f"{address} answered with malformed metadata")
            raise error from None
        return data


def accepted_answer(
    data: bytes, server: str, delegation: Prefix | None, ident: Identifier, asked: Sequence[str]
) -> Record | Referral:
    """The record or referral in ``data``, the answer of ``server`` (reached through a referral
    for ``delegation``; None: a configured root, authoritative for anything) to ``ident``;
    ResolutionFailed when it is malformed or beyond that server's authority (``asked``: the
    servers asked so far, to name a loop).

    A referral must be for a prefix strictly below the delegation and cover ``ident``; a
    record must be ``ident``'s (normalised keys compared).
    """
    try:
        answer = decode_answer(data)
    except (DecodeError, InvalidArgument) as exc:
        raise ResolutionFailed(f"{server} gave a malformed answer for {ident}: {exc}") from None
    if isinstance(answer, Record):
        if answer.identifier.key != ident.key:
            raise ResolutionFailed(f"{server} answered {ident} with the record of {answer.identifier}")
        return answer
    if not ident.prefix.is_within(answer.prefix):
        raise ResolutionFailed(f"{server} referred {ident} to {answer.prefix}, which does not cover its prefix")
    if delegation is not None and (answer.prefix == delegation or not answer.prefix.is_within(delegation)):
        back = [s.address for s in answer.site.servers if s.address in asked]
        if back:
            raise ReferralLoop(f"referral loop resolving {ident}: {' -> '.join([*asked, back[0]])}")
        raise ResolutionFailed(
            f"{server} referred {ident} to {answer.prefix}, outside its authority"
            f" (it was delegated {delegation}; a referral must be for a prefix below that)"
        )
    return answer


class SyncResolver:
    """A blocking front to Resolver, for scripts: runs its own event loop."""

    def __init__(self, roots: Sequence[str], **kwargs: object) -> None:
        self._loop = asyncio.new_event_loop()
        self._resolver = self._loop.run_until_complete(_make(roots, kwargs))

    def resolve(self, identifier: str, trace: Trace | None = None) -> Record:
        return self._loop.run_until_complete(self._resolver.resolve(identifier, trace))

    def close(self) -> None:
        self._loop.run_until_complete(self._resolver.close())
        self._loop.close()

    def __enter__(self) -> SyncResolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _make(roots: Sequence[str], kwargs: dict[str, object]) -> Resolver:
    return Resolver(roots, **kwargs)  # type: ignore[arg-type]
