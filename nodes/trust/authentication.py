"""Who is calling: verifying signed write calls (see ``resolver.signing`` for the scheme).

Checks, in order, each failing with UNAUTHENTICATED and a message naming the check: all five
headers present; identity a valid identifier; key index a number; timestamp within
``max_clock_skew`` seconds of the node's clock; nonce 32 hex digits never seen in that window;
signature base64; the identity's HS_PUBKEY at that index found (a trust anchor from the config,
a record this node hosts, or one resolved through the hierarchy, cached); signature verifies.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from nodes.trust.audit import Caller
from resolver.errors import IdisError, InvalidArgument, NotFound, Unauthenticated
from resolver.identifier import Identifier, parse_identifier
from resolver.record import Record
from resolver.resolver import Resolver
from resolver.signing import HEADERS, PUBKEY_TYPE, canonical_message, parse_public_key, verify
from resolver.site import Referral


class ReplayGuard:
    """Nonces seen within the clock-skew window (bounded: the oldest go first)."""

    def __init__(self, window: float, capacity: int = 1_000_000) -> None:
        self.window = window
        self.capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()

    def fresh(self, nonce: str, now: float) -> bool:
        """True the first time ``nonce`` is seen; remembers it."""
        while self._seen and (next(iter(self._seen.values())) < now or len(self._seen) >= self.capacity):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now + 2 * self.window
        return True


class Authenticator:
    def __init__(
        self,
        local_answer: Callable[[Identifier], Awaitable[Record | Referral]],
        anchors: dict[str, bytes],
        resolver: Resolver | None = None,
        max_clock_skew: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``local_answer``: this node's own answer for an identifier (the authority's; raises
        NotFound, or another IdisError outside its authority); ``anchors`` maps identifier keys
        to DER public keys trusted from the config."""
        self.local_answer = local_answer
        self.anchors = {k: parse_public_key(v) for k, v in anchors.items()}
        self.resolver = resolver
        self.max_clock_skew = max_clock_skew
        self.clock = clock
        self.replays = ReplayGuard(max_clock_skew)

    async def authenticate(self, method: str, request: bytes, metadata: Sequence[tuple[str, str]]) -> Caller:
        headers = {k: v for k, v in metadata if k in HEADERS}
        missing = [h for h in HEADERS if h not in headers]
        if missing:
            raise Unauthenticated(f"no signature: write calls need the metadata {', '.join(missing)}")
        try:
            identity = parse_identifier(headers["idis-identity"])
        except IdisError as exc:
            raise Unauthenticated(f"idis-identity is not an identifier: {exc}") from exc
        if not headers["idis-key-index"].isdigit():
            raise Unauthenticated("idis-key-index is not a number")
        key_index = int(headers["idis-key-index"])
        if not headers["idis-timestamp"].lstrip("-").isdigit():
            raise Unauthenticated("idis-timestamp is not a number of seconds")
        timestamp = int(headers["idis-timestamp"])
        now = self.clock()
        if abs(now - timestamp) > self.max_clock_skew:
            raise Unauthenticated(
                f"timestamp is {int(now - timestamp)} s off the node's clock (at most {int(self.max_clock_skew)} s)"
            )
        nonce = headers["idis-nonce"]
        if len(nonce) != 32 or any(c not in "0123456789abcdef" for c in nonce):
            raise Unauthenticated("idis-nonce is not 16 bytes of lower-case hex")
        try:
            signature = base64.b64decode(headers["idis-signature"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Unauthenticated("idis-signature is not base64") from exc
        public = await self.public_key(identity, key_index)
        message = canonical_message(method, request, timestamp, nonce, headers["idis-identity"], key_index)
        if not verify(public, signature, message):
            raise Unauthenticated(f"signature does not verify with the key of {identity} at index {key_index}")
        if not self.replays.fresh(nonce, now):
            raise Unauthenticated("nonce already used: a signed call is good for one use")
        return Caller(identity, key_index, nonce)

    async def public_key(self, identity: Identifier, index: int) -> Ed25519PublicKey:
        anchor = self.anchors.get(identity.key)
        if anchor is not None:
            return anchor
        record = await self._record_of(identity)
        value = record.value(index)
        if value is None or value.type != PUBKEY_TYPE:
            raise Unauthenticated(f"identity {identity} has no {PUBKEY_TYPE} value at index {index}")
        try:
            return parse_public_key(value.data)
        except InvalidArgument as exc:
            raise Unauthenticated(f"identity {identity}: {exc}") from exc

    async def _record_of(self, identity: Identifier) -> Record:
        try:
            local: Record | Referral | None = await self.local_answer(identity)
        except NotFound as exc:
            raise Unauthenticated(f"identity {identity} is not registered") from exc
        except IdisError:
            local = None  # outside this node's authority
        if isinstance(local, Record):
            return local
        if self.resolver is None:
            raise Unauthenticated(f"identity {identity} lives outside this node and no [auth] roots are configured")
        try:
            return await self.resolver.resolve(identity)
        except NotFound as exc:
            raise Unauthenticated(f"identity {identity} is not registered") from exc
        except IdisError as exc:
            raise Unauthenticated(f"the key of {identity} could not be resolved: {exc}") from exc
