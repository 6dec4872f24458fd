"""Signed write calls: how a client proves who it is (the Handle System's public-key
authentication, carried in gRPC metadata instead of a challenge round trip).

An administrator is an identifier whose record holds an ``HS_PUBKEY`` value (conventionally at
index 300): the DER SubjectPublicKeyInfo of an **Ed25519** key (the one algorithm supported).
Every write call carries, in metadata:

    idis-identity    the administrator's identifier, e.g. 88.100.1/ADMIN
    idis-key-index   the index of its HS_PUBKEY value
    idis-timestamp   Unix seconds when the call was signed
    idis-nonce       16 random bytes, hex: a signature is good for one call only
    idis-audience    the ``host:port`` the client dialled: the node the call is meant for
    idis-signature   base64 Ed25519 signature of the canonical message below

    idis-v2 \\n METHOD \\n sha256(request bytes) hex \\n TIMESTAMP \\n NONCE \\n IDENTITY \\n KEY-INDEX
            \\n AUDIENCE

so a signature binds the call to its method, its exact request, a moment, one use and one
node: a node accepts only the audiences it is known by (its listen address and ``[auth]
audiences``), so a call signed for one node cannot be replayed to another where the same
identity also has rights.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from resolver.errors import InvalidArgument
from resolver.record import Value

PUBKEY_TYPE = "HS_PUBKEY"
DEFAULT_KEY_INDEX = 300
HEADERS = ("idis-identity", "idis-key-index", "idis-timestamp", "idis-nonce", "idis-audience", "idis-signature")

MAX_AUDIENCE_BYTES = 300
"""The longest ``idis-audience`` a node considers (a host name of 253 bytes and a port)."""


def canonical_message(
    method: str, request: bytes, timestamp: int, nonce: str, identity: str, key_index: int, audience: str
) -> bytes:
    digest = hashlib.sha256(request).hexdigest()
    fields = ["idis-v2", method, digest, str(timestamp), nonce, identity, str(key_index), audience]
    return "\n".join(fields).encode()


def audience_of(address: str) -> str:
    """The audience a call to ``address`` (``host:port``, as dialled) is signed for: the address
    with its host lower-cased (host names are case-insensitive; nothing else is rewritten)."""
    host, sep, port = address.strip().rpartition(":")
    return f"{host.lower()}{sep}{port}" if sep else address.strip().lower()


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Writes the key as unencrypted PKCS#8 PEM, readable by its owner only."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(path, data)


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Writes ``data`` to ``path``, readable by its owner only, and whole: a reader sees the old
    file or the new one, never part of it (a temporary file, then renamed, or with ``exclusive``
    linked: FileExistsError when ``path`` exists, and nothing is written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        if exclusive:
            os.link(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"{path} does not hold an Ed25519 private key (the one algorithm supported)")
    return key


def public_key_der(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def pubkey_value(key: Ed25519PrivateKey, index: int = DEFAULT_KEY_INDEX) -> Value:
    """The HS_PUBKEY value to register on the administrator's identifier."""
    return Value(index, PUBKEY_TYPE, public_key_der(key))


def parse_public_key(data: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_der_public_key(data)
    except ValueError as exc:
        raise InvalidArgument("HS_PUBKEY data is not a DER SubjectPublicKeyInfo") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidArgument("HS_PUBKEY is not an Ed25519 key (the one algorithm supported)")
    return key


def verify(public: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public.verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Signer:
    """Signs calls as ``identity`` with the private key behind its HS_PUBKEY at ``key_index``."""

    identity: str
    key: Ed25519PrivateKey
    key_index: int = DEFAULT_KEY_INDEX

    @classmethod
    def from_file(cls, identity: str, path: Path, key_index: int = DEFAULT_KEY_INDEX) -> Signer:
        return cls(identity, load_private_key(path), key_index)

    def metadata(
        self, method: str, request: bytes, audience: str, now: float | None = None
    ) -> tuple[tuple[str, str], ...]:
        """The headers of one call of ``method`` with these exact ``request`` bytes to the node
        dialled as ``audience`` (``host:port``)."""
        timestamp = int(time.time() if now is None else now)
        nonce = os.urandom(16).hex()
        audience = audience_of(audience)
        message = canonical_message(method, request, timestamp, nonce, self.identity, self.key_index, audience)
        signature = base64.b64encode(self.key.sign(message)).decode()
        values = (self.identity, str(self.key_index), str(timestamp), nonce, audience, signature)
        return tuple(zip(HEADERS, values, strict=True))
