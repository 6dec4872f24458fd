"""The referral-chasing resolver: from the top-level node down to the node that holds an identifier.

Resolution of ``88.100.1/SN-1``:

1. A cached answer (record or NOT_FOUND) for the identifier ends it with no network hop.
2. Otherwise start at the closest cached referral for the identifier's prefix (``88.100.1``,
   then ``88.100``, ...) or, with none cached, at the configured top-level (root) servers.
3. Ask one server of that site (picked by the Handle hash of the identifier; the next one on
   failure). A referral names a more specific site: cache it for its TTL and go on there. A
   record or NOT_FOUND is the answer: cache it (records for their smallest value TTL,
   NOT_FOUND for the node's negative TTL).
4. A server asked twice for the same identifier means the nodes refer to each other
   (``ReferralLoop``); more than ``max_hops`` referrals is ``HopLimitExceeded``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from resolver.cache import NEGATIVE, LookupCache
from resolver.channels import ChannelPool
from resolver.errors import (
    HopLimitExceeded,
    IdisError,
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
from resolver.wire import decode_answer, not_found_from_item, not_found_item, resolution_pb2

RESOLVE_METHOD = "/idis.v1.Resolution/Resolve"

MAX_HOPS = 40
"""The national SDKs give up after 40 referrals; so do we."""


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

    def add(self, server: str, question: str, outcome: str, started: float) -> None:
        self.hops.append(Hop(server, question, outcome, time.perf_counter() - started))

    @property
    def network_hops(self) -> int:
        return sum(1 for h in self.hops if h.server != "cache")


class Resolver:
    """Resolves identifiers through a hierarchy of nodes, caching what it learns.

    ``roots`` are the addresses (``host:port``) of the top-level node's servers. Answers are
    cached in their wire form in one ``LookupCache``: records and NOT_FOUND answers under the
    identifier's key, referrals under the delegated prefix.
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
    ) -> None:
        """``on_resolved`` is told the number of network hops of every resolution that left the
        cache (for metrics)."""
        self.root_site: Site = make_site(list(roots))
        self.cache: LookupCache = cache if cache is not None else LookupCache(100_000, 64 * 1024 * 1024)
        self.max_hops = min(max_hops, MAX_HOPS)
        self.timeout = timeout
        self._channels = channels or ChannelPool()
        self._on_resolved = on_resolved or (lambda hops: None)
        self.signer = signer
        """Signs every query, so the nodes show this reader the private values it may read."""

    async def close(self) -> None:
        await self._channels.close()

    async def __aenter__(self) -> Resolver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def resolve(self, identifier: str | Identifier, trace: Trace | None = None) -> Record:
        """The record of ``identifier``; raises NotFound, InvalidIdentifier, ResolutionFailed, ..."""
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
                message, negative_ttl = not_found_from_item(data)
                raise NotFound(message, negative_ttl)
            record = decode_answer(data)
            if isinstance(record, Record):
                return record
        hops = Trace() if trace is None else trace
        before = hops.network_hops
        answer, _site = await self._chase(ident, hops)
        self._on_resolved(hops.network_hops - before)
        if isinstance(answer, NotFound):
            raise answer
        return answer

    async def authority_for(self, identifier: str | Identifier, trace: Trace | None = None) -> Site:
        """The site of the node(s) that host ``identifier``'s prefix: where to register it."""
        ident = parse_identifier(identifier) if isinstance(identifier, str) else identifier
        _answer, site = await self._chase(ident, trace)
        return site

    def _start(self, prefix: Prefix, trace: Trace | None) -> tuple[Site, str]:
        for candidate in prefix.ancestors():
            data = self.cache.get(candidate.key.encode())
            referral = decode_answer(data) if data is not None else None
            if isinstance(referral, Referral):
                if trace is not None:
                    ttl = int(self.cache.remaining_ttl(candidate.key.encode()))
                    trace.add(
                        "cache", str(prefix), f"referral {referral.prefix} (cached, {ttl}s left)", time.perf_counter()
                    )
                return referral.site, str(referral.prefix)
        return self.root_site, "root"

    async def _chase(self, ident: Identifier, trace: Trace | None) -> tuple[Record | NotFound, Site]:
        """Follows referrals to the authoritative site; its answer (NOT_FOUND included) and the site."""
        site, label = self._start(ident.prefix, trace)
        asked: list[str] = []
        for _ in range(self.max_hops + 1):
            try:
                answer, data, server = await self._ask_site(site, label, ident, asked, trace)
            except NotFound as exc:
                self.cache.set(ident.key.encode(), not_found_item(str(exc), exc.negative_ttl), exc.negative_ttl, True)
                return exc, site
            if isinstance(answer, Record):
                self.cache.set(ident.key.encode(), data, answer.cache_ttl(int(time.time())))
                return answer, site
            if not ident.prefix.is_within(answer.prefix):
                raise ResolutionFailed(f"{server} referred {ident} to {answer.prefix}, which does not cover its prefix")
            self.cache.set(answer.prefix.key.encode(), data, answer.ttl)
            site, label = answer.site, str(answer.prefix)
        raise HopLimitExceeded(f"more than {self.max_hops} referrals resolving {ident}: {' -> '.join(asked)}")

    async def _ask_site(
        self, site: Site, label: str, ident: Identifier, asked: list[str], trace: Trace | None
    ) -> tuple[Record | Referral, bytes, str]:
        failures: list[str] = []
        for server in site.ordered_for(ident.key):
            if server.address in asked:
                raise ReferralLoop(f"referral loop resolving {ident}: {' -> '.join([*asked, server.address])}")
            started = time.perf_counter()
            try:
                data = await self._ask(server.address, ident)
                answer = decode_answer(data)
            except IdisError as exc:
                if trace is not None:
                    trace.add(server.address, str(ident), f"{type(exc).__name__}: {exc}", started)
                if isinstance(exc, (Unavailable, Timeout)):
                    failures.append(f"{server.address} ({exc})")
                    continue
                asked.append(server.address)
                raise
            asked.append(server.address)
            if trace is not None:
                outcome = (
                    f"record v{answer.version}, {len(answer.values)} values"
                    if isinstance(answer, Record)
                    else f"referral {answer.prefix} -> {', '.join(s.address for s in answer.site.servers)}"
                )
                trace.add(server.address, str(ident), outcome, started)
            return answer, data, server.address
        raise Unavailable(f"no server for {label} answered: {'; '.join(failures)}")

    async def _ask(self, address: str, ident: Identifier) -> bytes:
        """The serialised ResolveResponse of one node (kept as bytes: that is what is cached)."""
        call = self._channels.get(address).unary_unary(
            RESOLVE_METHOD, request_serializer=None, response_deserializer=None
        )
        request = resolution_pb2.ResolveRequest(identifier=str(ident)).SerializeToString()
        metadata = self.signer.metadata(RESOLVE_METHOD, request) if self.signer is not None else None
        try:
            data: bytes = await call(request, timeout=self.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, address) from None
        return data


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
