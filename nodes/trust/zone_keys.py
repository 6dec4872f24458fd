"""The keys a node signs its prefixes' records with (verifiable resolution: step 1 of the plan
in docs/verifiable-resolution.md; nothing signs with them yet).

Each prefix has a folder ``<directory>/<prefix key>/`` holding its keys, ``<kid>.pem`` (PKCS#8,
readable by the owner only), and ``keys.json``: each key's id and validity, oldest first. A
prefix's first key is made when it is first needed; ``roll`` adds the next key and ends the
current one ``overlap`` seconds later, so both are published while resolvers learn of the new
one (the parent's delegation lists every published key). Every file is written whole (a
temporary file renamed), so a crash leaves the old list or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from resolver.attestation import ZoneKey
from resolver.errors import FailedPrecondition, IdisError
from resolver.identifier import parse_prefix
from resolver.signing import load_private_key, save_private_key, write_private

DAY = 86_400
LIFETIME = 365 * DAY
"""How long a new key is valid unless rolled before."""
LISTING = "keys.json"
SECRET = "salt.key"
"""The node's secret from which each record's salt is derived (``Attester.salt``)."""


@dataclass(frozen=True)
class SigningKey:
    """One of a prefix's keys: its id, the private key, and its validity."""

    kid: str
    private: Ed25519PrivateKey
    not_before: int
    expires: int

    def public(self) -> ZoneKey:
        return ZoneKey(self.kid, self.private.public_key(), self.not_before, self.expires)

    def valid(self, now: int) -> bool:
        return self.not_before <= now < self.expires


class ZoneKeys:
    """The signing keys of the prefixes a node serves, kept in ``directory``."""

    def __init__(self, directory: Path, lifetime: int = LIFETIME) -> None:
        self.directory = directory
        self.lifetime = lifetime

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Excludes other processes (a node's workers) while keys are made or rolled, so two
        never make a prefix's first key each."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def secret(self) -> bytes:
        """The node's salt secret (32 bytes, 0600), made when first needed."""
        path = self.directory / SECRET
        with self._locked():
            if not path.exists():
                write_private(path, secrets.token_bytes(32))
            data = path.read_bytes()
        if len(data) != 32:
            raise FailedPrecondition(f"{path} holds {len(data)} bytes, not a 32-byte secret")
        return data

    def _folder(self, prefix: str) -> Path:
        return self.directory / parse_prefix(prefix).key

    def keys(self, prefix: str) -> list[SigningKey]:
        """Every key listed for ``prefix``, oldest first (none when it has none yet)."""
        folder = self._folder(prefix)
        listing = folder / LISTING
        if not listing.exists():
            return []
        try:
            entries = json.loads(listing.read_text())
            return [
                SigningKey(e["kid"], load_private_key(folder / f"{e['kid']}.pem"), int(e["nbf"]), int(e["exp"]))
                for e in entries
            ]
        except (OSError, ValueError, KeyError, TypeError, IdisError) as exc:
            raise FailedPrecondition(f"the zone keys of {prefix} cannot be read ({listing}): {exc}") from exc

    def _write(self, prefix: str, keys: list[SigningKey]) -> None:
        folder = self._folder(prefix)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for key in keys:
            pem = folder / f"{key.kid}.pem"
            if not pem.exists():
                save_private_key(key.private, pem)
        listing = [{"kid": k.kid, "nbf": k.not_before, "exp": k.expires} for k in keys]
        write_private(folder / LISTING, json.dumps(listing, indent=1).encode())

    def _new(self, keys: list[SigningKey], now: int) -> SigningKey:
        return SigningKey(f"k{len(keys) + 1}", Ed25519PrivateKey.generate(), now, now + self.lifetime)

    def signing(self, prefix: str, now: int) -> SigningKey:
        """The key to sign with now: the newest valid one, made when the prefix has none."""
        valid = [k for k in self.keys(prefix) if k.valid(now)]
        if valid:
            return valid[-1]
        with self._locked():
            keys = self.keys(prefix)  # another process may have made it meanwhile
            valid = [k for k in keys if k.valid(now)]
            if valid:
                return valid[-1]
            key = self._new(keys, now)
            self._write(prefix, [*keys, key])
        return key

    def published(self, prefix: str, now: int) -> list[ZoneKey]:
        """The public keys a delegation of ``prefix`` lists now: those not yet ended."""
        return [k.public() for k in self.keys(prefix) if now < k.expires]

    def roll(self, prefix: str, now: int, overlap: int) -> SigningKey:
        """Adds the next key, which signs from now on, and ends every earlier key ``overlap``
        seconds from now (at once with 0: a key revoked)."""
        with self._locked():
            keys = self.keys(prefix)
            key = self._new(keys, now)
            ended = [SigningKey(k.kid, k.private, k.not_before, min(k.expires, now + overlap)) for k in keys]
            self._write(prefix, [*ended, key])
        return key
