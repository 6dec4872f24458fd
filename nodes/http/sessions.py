"""The Handle challenge-response scheme of the REST API (HANDLE-INTEROP.md A.10, 3).

``POST /api/sessions`` hands out a session: an id and a random nonce. The client signs
``nonce || cnonce || "\nidis-http-session:" || audience`` (``session_message``: cnonce is its own
random bytes, audience the ``host:port`` it dialled) with the private key behind one of its
HS_PUBKEY values and sends, on any later request (or ``PUT /api/sessions/this``)::

    Authorization: Handle version="0", sessionId="...", id="300%3A88.100.1%2FADMIN",
                   type="HS_PUBKEY", cnonce="<base64>", alg="Ed25519", audience="127.0.0.1:8643",
                   signature="<base64>"

Sessions are stateless, so every worker process of a node accepts every session: the id carries
its expiry and nonce under an HMAC with the node's session key (``<database>.sessions``, made
once, owner-only, shared by the workers). Nothing is remembered between requests: each carries
its full Authorization (HSJ's cookie sessions are not kept). The node's keys are Ed25519, the one
algorithm it supports, so ``alg`` is ``Ed25519``; HS_SECKEY-based HMAC answers cannot be checked
(a node stores only a seal of the secret) and are refused with a message saying so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

SESSION_SECONDS = 600
NONCE_BYTES = 16
_MAC_BYTES = 16
_PARAMETER = re.compile(r'\s*([A-Za-z]+)\s*=\s*(?:"([^"]*)"|([^\s,]*))\s*(?:,|$)')


@dataclass(frozen=True)
class Session:
    id: str
    nonce: bytes
    expires: float


class SessionIssuer:
    def __init__(self, key: bytes, clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.clock = clock

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self.key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self) -> Session:
        expires = int(self.clock()) + SESSION_SECONDS
        nonce = secrets.token_bytes(NONCE_BYTES)
        payload = struct.pack(">Q", expires) + nonce
        return Session(sealed(payload, self._mac), nonce, expires)

    def check(self, session_id: str) -> Session | None:
        """The session of a valid, unexpired id; None otherwise."""
        payload = unsealed(session_id, 128, self._mac)
        if payload is None or len(payload) != 8 + NONCE_BYTES:
            return None
        expires = struct.unpack(">Q", payload[:8])[0]
        if expires < self.clock():
            return None
        return Session(session_id, payload[8:], expires)


def sealed(payload: bytes, mac: Callable[[bytes], bytes]) -> str:
    """``payload`` and its MAC, as URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(payload + mac(payload)).decode().rstrip("=")


def unsealed(token: str, longest: int, mac: Callable[[bytes], bytes]) -> bytes | None:
    """The payload of a ``sealed`` token, None when it is longer than ``longest`` characters,
    does not decode, or its MAC does not match."""
    if len(token) > longest:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) <= _MAC_BYTES:
        return None
    payload, tag = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    return payload if hmac.compare_digest(tag, mac(payload)) else None


def session_message(nonce: bytes, cnonce: bytes, audience: str) -> bytes:
    """What the client signs: the session's nonce, its own cnonce and the ``host:port`` it
    dialled (HSJ signs nonce || cnonce only; naming the node stops a hostile node from relaying
    another node's challenge to its own clients)."""
    return nonce + cnonce + b"\nidis-http-session:" + audience.lower().encode()


def parameters(text: str) -> dict[str, str] | None:
    """The ``name="value"`` parameters of a Handle Authorization header (names lower-cased);
    None when it does not parse."""
    out: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _PARAMETER.match(text, position)
        if match is None or match.end() == position:
            return None
        name, quoted, bare = match.groups()
        out[name.lower()] = quoted if quoted is not None else bare
        position = match.end()
    return out


TOKEN_SECONDS = 3600
"""How long an SNMS bearer token is good for (``POST /identity/token``)."""
_STAMP_BYTES = 8


@dataclass(frozen=True)
class Bearer:
    """What an SNMS token says: who logged in, with which secret key, until when. ``stamp`` is a
    digest of the credential as stored when the token was issued: once that key is changed or
    removed, the token is worth nothing."""

    identity: str
    key_index: int
    stamp: bytes
    expires: float


class BearerTokens:
    """The SNMS API's bearer tokens, stateless like the sessions: the identity, key index,
    credential stamp and expiry under an HMAC with a key of the database (every server of a site
    and every worker accepts them)."""

    def __init__(self, key: bytes, clock: Callable[[], float] = time.time, seconds: int = TOKEN_SECONDS) -> None:
        self.key = key
        self.clock = clock
        self.seconds = seconds

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self.key, b"idis-snms-token\0" + payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def stamp_of(self, credential: bytes) -> bytes:
        """A digest of the credential under the token key: a token shown to someone tells
        nothing of the secret (a trust anchor's credential is its configured secret itself)."""
        return hmac.new(self.key, b"idis-snms-stamp\0" + credential, hashlib.sha256).digest()[:_STAMP_BYTES]

    def issue(self, identity: str, key_index: int, credential: bytes) -> Bearer:
        expires = int(self.clock()) + self.seconds
        stamp = self.stamp_of(credential)
        return Bearer(identity, key_index, stamp, expires)

    def token(self, bearer: Bearer) -> str:
        payload = struct.pack(">QI", int(bearer.expires), bearer.key_index) + bearer.stamp + bearer.identity.encode()
        return sealed(payload, self._mac)

    def check(self, token: str) -> Bearer | None:
        """What a valid, unexpired token says; None otherwise."""
        payload = unsealed(token, 1024, self._mac)
        head = 12 + _STAMP_BYTES
        if payload is None or len(payload) <= head:
            return None
        expires, index = struct.unpack(">QI", payload[:12])
        if expires < self.clock():
            return None
        try:
            identity = payload[head:].decode()
        except UnicodeDecodeError:
            return None
        return Bearer(identity, index, payload[12:head], expires)
