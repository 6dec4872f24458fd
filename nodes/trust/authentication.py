"""Who is calling: verifying signed calls (see ``resolver.signing`` for the scheme).

Checks, in order, each failing with UNAUTHENTICATED and a message naming the check: all six
headers present; identity a valid identifier; key index and timestamp short decimal numbers;
timestamp within ``max_clock_skew`` seconds of the node's clock; nonce 32 hex digits not seen in
that window; audience one of the addresses this node is known by (``audiences``: a call signed
for another node is not for this one); signature base64 -- all of them before anything costs a
lookup. Then the
identity's HS_PUBKEY at that index: a trust anchor from the config; else a record this node
hosts, read fresh every time (deleting an identity or its key on its home node revokes it
there at once); else the record resolved through the hierarchy from the configured roots.

Keys resolved from elsewhere are the one thing a caller can make this node fetch, so that path
is bounded: answers are kept ``key_cache_ttl`` seconds (the revocation delay for identities
of other nodes; the caller's resolver must not keep them longer), a failed lookup is
remembered ``negative_ttl`` seconds, a lookup has ``lookup_timeout`` seconds, lookups are
rate-limited per peer (``lookup_limit``), and a caller learns only that the key "could not be
resolved" (the reason goes to the log). Last, the signature verifies and the nonce is spent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from nodes.trust.audit import Caller
from nodes.trust.quotas import RateLimited, TokenBuckets
from resolver.errors import IdisError, InvalidArgument, NotFound, Unauthenticated
from resolver.identifier import Identifier, parse_identifier, shown
from resolver.record import Record
from resolver.signing import (
    HEADERS,
    MAX_AUDIENCE_BYTES,
    PUBKEY_TYPE,
    audience_of,
    canonical_message,
    parse_public_key,
    verify,
)
from resolver.site import Referral

log = logging.getLogger("idis.auth")

_KEY_INDEX = re.compile(r"[0-9]{1,10}")
_TIMESTAMP = re.compile(r"-?[0-9]{1,12}")
_NONCE = re.compile(r"[0-9a-f]{32}")

ALL_PEERS = "(all peers)"
"""The rate-limit key of lookups whose caller's address is not known."""

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def audiences_of(listen: str, configured: Iterable[str] = ()) -> frozenset[str]:
    """The audiences a node listening on ``listen`` (``host:port``, the port actually bound)
    accepts: ``configured`` (``[auth] audiences``), its listen address, and the loopback names
    with its port when it listens on a loopback or wildcard address. A node listening on every
    interface cannot know the names clients reach it by: they go in ``[auth] audiences``."""
    host, _, port = listen.rpartition(":")
    host = host.lower()
    out = {audience_of(a) for a in configured}
    if host in LOOPBACK_HOSTS or host in WILDCARD_HOSTS:
        out.update(f"{h}:{port}" for h in LOOPBACK_HOSTS)
    if host not in WILDCARD_HOSTS:
        out.add(audience_of(listen))
    return frozenset(out)


class ReplayGuard:
    """Nonces seen within the clock-skew window (bounded: the oldest go first)."""

    def __init__(self, window: float, capacity: int = 1_000_000) -> None:
        self.window = window
        self.capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()

    def seen(self, nonce: str, now: float) -> bool:
        """True when ``nonce`` was used within the window (remembers nothing: a cheap pre-check)."""
        expires = self._seen.get(nonce)
        return expires is not None and expires >= now

    def fresh(self, nonce: str, now: float) -> bool:
        """True the first time ``nonce`` is seen; remembers it."""
        while self._seen and (next(iter(self._seen.values())) < now or len(self._seen) >= self.capacity):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now + 2 * self.window
        return True


class RemoteKeys:
    """Records of identities that live on other nodes, or why they could not be had, each until
    its own expiry (a monotonic time); at most ``capacity`` identities, the oldest go first."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[float, Record | str]] = OrderedDict()

    def get(self, key: str, now: float) -> Record | str | None:
        """The record, or the refusal message, cached for identity ``key``; None when there is none."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: str, value: Record | str, expires: float) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (expires, value)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class Authenticator:
    def __init__(
        self,
        local_answer: Callable[[Identifier], Awaitable[Record | Referral]],
        anchors: dict[str, bytes],
        resolve_remote: Callable[[Identifier], Awaitable[Record]] | None = None,
        max_clock_skew: float = 300.0,
        clock: Callable[[], float] = time.time,
        *,
        key_cache_ttl: float = 30.0,
        negative_ttl: float = 15.0,
        lookup_timeout: float = 2.0,
        lookup_limit: TokenBuckets | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        audiences: Iterable[str] = (),
    ) -> None:
        """``local_answer``: this node's own answer for an identifier (the authority's; raises
        NotFound, or another IdisError outside its authority); ``anchors`` maps identifier keys
        to DER public keys trusted from the config; ``resolve_remote``: the record of an
        identity hosted elsewhere, resolved from the configured roots (None: no [auth] roots).
        ``clock`` is the wall clock signatures are dated by; ``monotonic`` times the caches;
        ``audiences``: the addresses this node is known by (``audiences_of``; the node adds its
        own once it has bound its port, with ``known_as``)."""
        self.local_answer = local_answer
        self.anchors = {k: parse_public_key(v) for k, v in anchors.items()}
        self.resolve_remote = resolve_remote
        self.max_clock_skew = max_clock_skew
        self.clock = clock
        self.replays = ReplayGuard(max_clock_skew)
        self.key_cache_ttl = key_cache_ttl
        self.negative_ttl = negative_ttl
        self.lookup_timeout = lookup_timeout
        self.lookup_limit = lookup_limit
        self.monotonic = monotonic
        self.remote_keys = RemoteKeys()
        self.audiences = frozenset(audience_of(a) for a in audiences)

    def known_as(self, audiences: Iterable[str]) -> None:
        """Accepts calls signed for these audiences too."""
        self.audiences = self.audiences | {audience_of(a) for a in audiences}

    async def authenticate(
        self, method: str, request: bytes, metadata: Sequence[tuple[str, str]], peer: str = ""
    ) -> Caller:
        """The verified caller of a signed call; ``peer`` (the caller's address) keys the rate
        of the key lookups it may cause."""
        headers = {k: v for k, v in metadata if k in HEADERS}
        missing = [h for h in HEADERS if h not in headers]
        if missing:
            raise Unauthenticated(f"no signature: write calls need the metadata {', '.join(missing)}")
        try:
            identity = parse_identifier(headers["idis-identity"])
        except IdisError as exc:
            raise Unauthenticated(f"idis-identity is not an identifier: {exc}") from exc
        if _KEY_INDEX.fullmatch(headers["idis-key-index"]) is None:
            raise Unauthenticated("idis-key-index is not a number (at most 10 decimal digits)")
        key_index = int(headers["idis-key-index"])
        if _TIMESTAMP.fullmatch(headers["idis-timestamp"]) is None:
            raise Unauthenticated("idis-timestamp is not a number of seconds (at most 12 decimal digits)")
        timestamp = int(headers["idis-timestamp"])
        now = self.clock()
        if abs(now - timestamp) > self.max_clock_skew:
            raise Unauthenticated(
                f"timestamp is {int(now - timestamp)} s off the node's clock (at most {int(self.max_clock_skew)} s)"
            )
        nonce = headers["idis-nonce"]
        if _NONCE.fullmatch(nonce) is None:
            raise Unauthenticated("idis-nonce is not 16 bytes of lower-case hex")
        if self.replays.seen(nonce, now):
            raise Unauthenticated("nonce already used: a signed call is good for one use")
        audience = headers["idis-audience"]
        if len(audience) > MAX_AUDIENCE_BYTES or audience not in self.audiences:
            raise Unauthenticated(
                f"signed for the audience {shown(audience[:MAX_AUDIENCE_BYTES])!r}, which is not this node"
                " (a signature names the host:port it was made for; see [auth] audiences)"
            )
        try:
            signature = base64.b64decode(headers["idis-signature"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Unauthenticated("idis-signature is not base64") from exc
        public = await self.public_key(identity, key_index, peer)
        message = canonical_message(method, request, timestamp, nonce, headers["idis-identity"], key_index, audience)
        if not verify(public, signature, message):
            raise Unauthenticated(f"signature does not verify with the key of {identity} at index {key_index}")
        if not self.replays.fresh(nonce, now):
            raise Unauthenticated("nonce already used: a signed call is good for one use")
        return Caller(identity, key_index, nonce)

    async def public_key(self, identity: Identifier, index: int, peer: str = "") -> Ed25519PublicKey:
        anchor = self.anchors.get(identity.key)
        if anchor is not None:
            return anchor
        record = await self._record_of(identity, peer)
        value = record.value(index)
        if value is None or value.type != PUBKEY_TYPE:
            raise Unauthenticated(f"identity {identity} has no {PUBKEY_TYPE} value at index {index}")
        try:
            return parse_public_key(value.data)
        except InvalidArgument as exc:
            raise Unauthenticated(f"identity {identity}: {exc}") from exc

    async def _record_of(self, identity: Identifier, peer: str) -> Record:
        try:
            local: Record | Referral | None = await self.local_answer(identity)
        except NotFound as exc:
            raise Unauthenticated(f"identity {identity} is not registered") from exc
        except IdisError:
            local = None  # outside this node's authority
        if isinstance(local, Record):
            return local  # hosted here: never cached, so a deletion revokes at once
        if self.resolve_remote is None:
            raise Unauthenticated(f"identity {identity} lives outside this node and no [auth] roots are configured")
        return await self._remote_record(identity, self.resolve_remote, peer)

    async def _remote_record(
        self, identity: Identifier, resolve: Callable[[Identifier], Awaitable[Record]], peer: str
    ) -> Record:
        """The record of an identity hosted elsewhere: cached, or resolved (rate-limited, with a
        deadline); a failure is remembered for ``negative_ttl`` seconds."""
        now = self.monotonic()
        cached = self.remote_keys.get(identity.key, now)
        if isinstance(cached, Record):
            return cached
        if cached is not None:
            raise Unauthenticated(cached)
        if self.lookup_limit is not None:
            try:
                self.lookup_limit.take(peer or ALL_PEERS, "peer")
            except RateLimited as exc:
                raise RateLimited(
                    f"too many key lookups for identities of other nodes (at most {self.lookup_limit.rate:g}/s);"
                    f" retry in {int(exc.retry_after * 1000) + 1} ms",
                    exc.retry_after,
                ) from None
        try:
            record = await asyncio.wait_for(resolve(identity), self.lookup_timeout)
        except NotFound:
            refusal = f"identity {identity} is not registered"
        except (IdisError, TimeoutError) as exc:
            # The reason (an address, a connection error) is for the operator, not the caller.
            log.warning("the key of %s could not be resolved: %s", identity, str(exc) or "no answer in time")
            refusal = f"the key of {identity} could not be resolved"
        else:
            self.remote_keys.put(identity.key, record, now + self.key_cache_ttl)
            return record
        if self.negative_ttl > 0:
            self.remote_keys.put(identity.key, refusal, now + self.negative_ttl)
        raise Unauthenticated(refusal)
