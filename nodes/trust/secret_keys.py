"""Secret keys (``HS_SECKEY`` values): stored sealed, verified on the node, never served.

The Handle System lets an administrator prove its identity with a shared secret instead of a key
pair: HTTP Basic on the REST API (``nodes.http``) checks the password against the HS_SECKEY value
at the named index of the named identifier. A node never stores such a secret in the clear: every
write path seals it (``seal_secret_values``, called by the registry) into a salted scrypt hash,

    idis-scrypt$<log2 N>$<r>$<p>$<salt, base64>$<hash, base64>

with the value's permissions cut to ADMIN_WRITE (no one may read it, not even administrators:
``nodes.trust.permissions.readable_part`` leaves HS_SECKEY values out of every answer). Data that
is already in that form is kept as it is (a migration, a copy between nodes).

Verifying costs one scrypt (tens of milliseconds, on purpose): ``SecretVerifier`` runs it off the
event loop, at most ``concurrency`` at a time, and remembers successes for ``cache_ttl`` seconds,
keyed by the stored seal and a digest of the offered secret, so a client sending Basic
credentials with every request pays it once, and a changed secret is never accepted from the
memory of the old one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from nodes.trust.quotas import RateLimited
from resolver.errors import InvalidValue, LimitExceeded
from resolver.record import SECKEY_TYPE, Permission, Value

__all__ = ["SECKEY_TYPE", "SecretSealer", "SecretVerifier", "is_sealed", "matches", "seal", "seal_secret_values"]
SEAL_SCHEME = b"idis-scrypt"
SCRYPT_LOG2_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_SECRETS_PER_CALL = 4
"""Secrets one write call may set (each costs a scrypt of tens of milliseconds)."""
MAX_SECRET_BYTES = 1024
"""Longer secrets are refused on write and never verified (scrypt's cost grows with the input)."""


def _scrypt(secret: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret, salt=salt, n=1 << log2_n, r=r, p=p, maxmem=256 << 20, dklen=HASH_BYTES)


def seal(secret: bytes) -> bytes:
    """The stored form of ``secret``."""
    if not secret:
        raise InvalidValue("an HS_SECKEY secret must not be empty")
    if len(secret) > MAX_SECRET_BYTES:
        raise InvalidValue(f"an HS_SECKEY secret is at most {MAX_SECRET_BYTES} bytes")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(secret, salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
    fields = [SEAL_SCHEME, b"%d" % SCRYPT_LOG2_N, b"%d" % SCRYPT_R, b"%d" % SCRYPT_P]
    return b"$".join([*fields, base64.b64encode(salt), base64.b64encode(digest)])


def _parsed(stored: bytes) -> tuple[int, int, int, bytes, bytes] | None:
    """The parameters, salt and hash of a sealed secret; None when ``stored`` is not one (or
    asks for more work than a node will do)."""
    parts = stored.split(b"$")
    if len(parts) != 6 or parts[0] != SEAL_SCHEME:
        return None
    try:
        log2_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        return None
    # Only this node's own parameters: a seal asking for more work would make every check of it
    # (and every index-0 login trying it) cost that much.
    if (log2_n, r, p) != (SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P) or not salt or len(digest) != HASH_BYTES:
        return None
    return log2_n, r, p, salt, digest


def is_sealed(data: bytes) -> bool:
    return _parsed(data) is not None


def matches(stored: bytes, offered: bytes) -> bool:
    """Whether ``offered`` is the secret sealed in ``stored`` (constant time in the hash)."""
    parsed = _parsed(stored)
    if parsed is None or not offered or len(offered) > MAX_SECRET_BYTES:
        return False
    log2_n, r, p, salt, digest = parsed
    return hmac.compare_digest(_scrypt(offered, salt, log2_n, r, p), digest)


def seal_secret_values(values: Iterable[Value]) -> tuple[Value, ...]:
    """``values`` with every HS_SECKEY value sealed and made unreadable (ADMIN_WRITE only)."""
    out = []
    for v in values:
        if v.type == SECKEY_TYPE:
            data = v.data if is_sealed(v.data) else seal(v.data)
            v = Value(v.index, v.type, data, v.ttl, v.ttl_type, v.timestamp, Permission.ADMIN_WRITE, v.references)
        out.append(v)
    return tuple(out)


class SecretSealer:
    """Seals the secrets of write requests off the event loop: at most ``MAX_SECRETS_PER_CALL``
    per call (LimitExceeded beyond), at most ``concurrency`` calls sealing at a time."""

    def __init__(self, concurrency: int = 2) -> None:
        self._slots = asyncio.Semaphore(concurrency)

    async def sealed(self, groups: Sequence[tuple[Value, ...]]) -> list[tuple[Value, ...]]:
        """Each group of values with its secrets sealed (one thread hop for all of them)."""
        secret = [v for group in groups for v in group if v.type == SECKEY_TYPE]
        if not secret:
            return list(groups)  # the common case: nothing to do, nothing copied
        clear = sum(1 for v in secret if not is_sealed(v.data))
        if not clear:
            return [seal_secret_values(group) for group in groups]  # only their permissions change
        if clear > MAX_SECRETS_PER_CALL:
            raise LimitExceeded(f"{clear} HS_SECKEY secrets in one call; the limit is {MAX_SECRETS_PER_CALL}")
        async with self._slots:
            return await asyncio.to_thread(lambda: [seal_secret_values(group) for group in groups])


class SecretVerifier:
    """Checks offered secrets against sealed ones: off the event loop, bounded, remembered."""

    def __init__(
        self, cache_ttl: float = 30.0, concurrency: int = 2, max_entries: int = 10_000, max_waiting: int = 32
    ) -> None:
        self.cache_ttl = cache_ttl
        self.max_waiting = max_waiting
        self._waiting = 0
        self._slots = asyncio.Semaphore(concurrency)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._max_entries = max_entries

    async def matches(self, stored: bytes, offered: bytes, admit: Callable[[], float] = lambda: 0.0) -> bool:
        """Whether ``offered`` is the secret sealed in ``stored``. A check that needs a scrypt
        first asks ``admit`` (the caller's budget: seconds to wait, 0 when admitted) and raises
        RateLimited when refused, or when ``max_waiting`` checks already wait for a slot."""
        memo = hashlib.sha256(stored + b"\0" + offered).digest()
        now = time.monotonic()
        expires = self._verified.get(memo)
        if expires is not None and expires > now:
            return True
        wait = admit()
        if wait:
            raise RateLimited("too many secret-key checks from this peer", wait)
        if self._waiting >= self.max_waiting:
            raise RateLimited("too many secret-key checks waiting", 1.0)
        self._waiting += 1
        try:
            async with self._slots:
                ok = await asyncio.to_thread(matches, stored, offered)
        finally:
            self._waiting -= 1
        if ok:
            self._verified[memo] = now + self.cache_ttl
            self._verified.move_to_end(memo)
            while len(self._verified) > self._max_entries:
                self._verified.popitem(last=False)
        return ok
