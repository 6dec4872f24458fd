"""Who is calling the REST API (HANDLE-INTEROP.md A.10).

* **HTTP Basic**, ``base64(percent-encoded "index:handle" ":" secret)``: the secret is checked
  against the sealed HS_SECKEY value at that index of that handle (index 0: any of its
  HS_SECKEY values), read from this node's store. Secret keys are verified only by the node that
  stores them, so an identity whose record lives on another node cannot use Basic here.
* **A TLS client certificate** (``Authorization: Handle clientCert="true"``, pyhandle's cert
  mode): the identity is the subject's UID, else CN, else O (``index:handle`` or ``handle``), and
  the certificate's public key must equal the identity's HS_PUBKEY at that index (0: any). No CA
  chain is needed: the record is the trust anchor. The server asks for a client certificate in
  the first handshake (TLS 1.3 has no renegotiation).

Credentials only count over TLS: on a plaintext listener (``[tls] mode = "off"``) every request
is anonymous, and one that offers credentials is refused with 403, as HSJ does. Wrong
credentials get 401 with ``WWW-Authenticate: Basic realm="handle"``. Failed attempts are limited
per peer (each costs a scrypt): beyond ``failures_per_second`` the answer is 503 rc 3 with
``Retry-After``, before any secret is checked.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import ssl
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from nodes.authority import Authority
from nodes.http.codes import RC, HandleFailure
from nodes.http.sessions import SessionIssuer, parameters, session_message
from nodes.trust.audit import Caller
from nodes.trust.quotas import RateLimited, TokenBuckets
from nodes.trust.secret_keys import SECKEY_TYPE, SecretVerifier
from resolver.errors import IdisError
from resolver.identifier import Identifier, parse_identifier
from resolver.record import DEFAULT_SECRET_INDEX, PUBKEY_TYPE, Record
from resolver.signing import DEFAULT_KEY_INDEX, parse_public_key, verify

log = logging.getLogger("idis.http")

MAX_AUTHORIZATION_BYTES = 4096
INDEX_ZERO_TRIES = 2
"""Secret keys tried for a Basic user without an index (each try is a scrypt)."""
SESSION_FIELDS = ("sessionid", "id", "type", "cnonce", "alg", "signature", "audience")


def split_identity(text: str) -> tuple[int, str]:
    """``"300:88.100.1/ADMIN"`` -> (300, "88.100.1/ADMIN"); a part before the first ``:`` that is
    not all digits means index 0 and the whole text is the handle."""
    head, sep, rest = text.partition(":")
    if sep and head.isascii() and head.isdigit():
        return int(head), rest
    return 0, text


def insecure() -> HandleFailure:
    """The answer to credentials, or a session asked for, on a plaintext listener (HSJ's)."""
    return HandleFailure(RC.AUTHENTICATION_FAILED, "no authentication allowed in insecure channels", status=403)


def _parsed(handle: str) -> Identifier:
    try:
        return parse_identifier(handle)
    except IdisError as exc:
        raise Unauthorized(f"identity {handle!r} cannot be verified here: {exc}") from None


class Unauthorized(HandleFailure):
    """Credentials were offered and are wrong: 401 with the Basic challenge (the body does not
    matter to clients; it says why)."""

    def __init__(self, message: str) -> None:
        super().__init__(RC.AUTHENTICATION_FAILED, message, status=401)


class RequestAuthenticator:
    def __init__(
        self,
        authority: Authority,
        secure: bool,
        verifier: SecretVerifier | None = None,
        checks: TokenBuckets | None = None,
        sessions: SessionIssuer | None = None,
        anchors: dict[str, bytes] | None = None,
        anchor_secrets: dict[str, Path] | None = None,
    ) -> None:
        """``checks``: scrypt checks of secrets each peer may cause (successes are remembered,
        so a client with the right secret pays once per ``verifier.cache_ttl``); ``anchors``
        and ``anchor_secrets``: the trust anchors' configured keys and secret files, the only
        credentials a trust anchor is recognised by (as over gRPC)."""
        self.authority = authority
        self.secure = secure
        self.sessions = sessions
        self.anchors = anchors or {}
        self.anchor_secrets = anchor_secrets or {}
        self.audiences: frozenset[str] = frozenset()
        """The ``host:port`` names of this HTTP interface: a session signature names one of
        them, so one relayed from another node (which handed out this node's nonce) fails."""
        self.verifier = verifier or SecretVerifier()
        self.checks = checks or TokenBuckets(rate=5.0, burst=20.0)

    async def __call__(self, request: web.Request) -> Caller | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return None
        if not self.secure:
            raise insecure()
        if len(header) > MAX_AUTHORIZATION_BYTES:
            raise Unauthorized("the Authorization header is too long")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "basic":
            return await self._basic(credentials.strip(), request.remote or "-")
        if scheme.lower() == "handle":
            return await self._handle_scheme(request, credentials)
        raise Unauthorized(f"authentication scheme {scheme!r} is not supported here (Basic, Handle)")

    async def _identity(self, handle: str) -> tuple[Identifier, Record | None]:
        """The identity named, and its record unless it is a trust anchor (whose keys are the
        configured ones)."""
        identity = _parsed(handle)
        if identity.key in self.anchors:
            return identity, None
        return identity, await self._record(identity)

    async def _record(self, identity: Identifier) -> Record:
        try:
            found = await self.authority.answer(identity)
        except IdisError as exc:
            raise Unauthorized(f"identity {identity} cannot be verified here: {exc}") from None
        if not isinstance(found, Record):
            raise Unauthorized(f"identity {identity} is not stored on this node")
        return found

    async def _basic(self, credentials: str, peer: str) -> Caller:
        try:
            decoded = base64.b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            raise Unauthorized("Basic credentials are not base64") from None
        user, sep, secret = decoded.partition(b":")
        if not sep:
            raise Unauthorized("Basic credentials need a user and a secret")
        try:
            user_text = unquote(user.decode("utf-8"), errors="strict")
        except UnicodeDecodeError:
            raise Unauthorized("the Basic user is not UTF-8") from None
        caller, _ = await self.secret_login(user_text, secret, peer)
        return caller

    async def secret_login(self, user: str, secret: bytes, peer: str) -> tuple[Caller, bytes]:
        """The caller whose secret key ``secret`` is (``user``: ``index:handle`` or ``handle``),
        and the credential it matched as stored (a sealed HS_SECKEY, or a trust anchor's
        configured secret); Unauthorized otherwise. Failed checks are limited per ``peer``."""
        index, handle = split_identity(user)
        identity = _parsed(handle)
        configured = self._anchor_secret(identity)
        if configured is not None:
            if configured and index in (0, DEFAULT_SECRET_INDEX) and hmac.compare_digest(secret, configured):
                return Caller(identity, DEFAULT_SECRET_INDEX), configured
            raise Unauthorized(f"the secret key of trust anchor {handle} does not match its configured one")
        record = await self._record(identity)
        candidates = [v for v in record.values_of_type(SECKEY_TYPE) if index in (0, v.index)]
        for value in candidates[:INDEX_ZERO_TRIES]:

            def admit() -> float:
                return self.checks.spend(peer)

            try:
                if await self.verifier.matches(value.data, secret, admit):
                    return Caller(identity, value.index), value.data
            except RateLimited as busy:
                raise HandleFailure(RC.SERVER_TOO_BUSY, str(busy), retry_after=busy.retry_after) from None
        raise Unauthorized(f"the secret key of {index}:{handle} does not match")

    async def credential(self, identity: Identifier, index: int) -> bytes | None:
        """The secret-key credential ``identity`` logs in with at ``index`` as stored now (what
        ``secret_login`` matched), None when it has none there any more."""
        configured = self._anchor_secret(identity)
        if configured is not None:
            return configured or None
        try:
            record = await self._record(identity)
        except Unauthorized:
            return None
        return next((v.data for v in record.values_of_type(SECKEY_TYPE) if v.index == index), None)

    def _anchor_secret(self, identity: Identifier) -> bytes | None:
        """For a trust anchor: its configured secret (b"" when it has none, so only its key may
        log it in); None for other identities."""
        if identity.key not in self.anchors and identity.key not in self.anchor_secrets:
            return None
        path = self.anchor_secrets.get(identity.key)
        try:
            return path.read_bytes().rstrip(b"\r\n") if path is not None else b""
        except OSError:
            log.warning("the secret file of trust anchor %s cannot be read: %s", identity, path)
            return b""

    def _keys_of(self, identity: Identifier, record: Record | None) -> list[tuple[int, bytes]]:
        """(index, DER public key) pairs that may log ``identity`` in: a trust anchor's
        configured key only; else its record's HS_PUBKEY values."""
        if identity.key in self.anchors:
            return [(DEFAULT_KEY_INDEX, self.anchors[identity.key])]
        return [(v.index, v.data) for v in record.values_of_type(PUBKEY_TYPE)] if record is not None else []

    async def _handle_scheme(self, request: web.Request, credentials: str) -> Caller:
        params = parameters(credentials)
        if params is None:
            raise Unauthorized("the Handle Authorization header does not parse")
        if params.get("clientcert", "").lower() == "true":
            return await self._client_certificate(request)
        return await self._session_signature(params)

    async def _session_signature(self, params: dict[str, str]) -> Caller:
        """A signature over the session's nonce and the client's cnonce (``nodes.http.sessions``)."""
        if any(name not in params for name in SESSION_FIELDS):
            raise Unauthorized("Missing fields in authentication data")
        if params.get("version", "0") != "0":
            raise Unauthorized(f"Handle authentication version {params['version']!r} is not supported")
        session = self.sessions.check(params["sessionid"]) if self.sessions is not None else None
        if session is None:
            raise Unauthorized("unknown or expired sessionId: POST /api/sessions for a new one")
        if params["type"].upper() != PUBKEY_TYPE:
            raise Unauthorized("only HS_PUBKEY answers are accepted: secret keys are stored sealed (use Basic)")
        if params["alg"].lower() != "ed25519":
            raise Unauthorized(f"alg {params['alg']!r} is not supported: this node's keys are Ed25519")
        audience = params["audience"].lower()
        if audience not in self.audiences:
            raise Unauthorized(f"the signature names {audience!r}, not this node ({', '.join(sorted(self.audiences))})")
        try:
            cnonce = base64.b64decode(params["cnonce"], validate=True)
            signature = base64.b64decode(params["signature"], validate=True)
            index, handle = split_identity(unquote(params["id"], errors="strict"))
        except (binascii.Error, ValueError):
            raise Unauthorized("cnonce and signature must be base64, id percent-encoded UTF-8") from None
        identity, record = await self._identity(handle)
        for key_index, der in self._keys_of(identity, record):
            if index not in (0, key_index):
                continue
            try:
                key = parse_public_key(der)
            except IdisError:
                continue
            if verify(key, signature, session_message(session.nonce, cnonce, audience)):
                return Caller(identity, key_index)
        raise Unauthorized(f"the signature does not verify with an HS_PUBKEY of {index}:{handle}")

    async def _client_certificate(self, request: web.Request) -> Caller:
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
        if not der:
            raise Unauthorized("no client certificate was presented")
        certificate = x509.load_der_x509_certificate(der)
        subject = certificate.subject
        names = [subject.get_attributes_for_oid(oid) for oid in (NameOID.USER_ID, NameOID.COMMON_NAME)]
        names.append(subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
        text = next((str(attrs[0].value) for attrs in names if attrs), "")
        if not text:
            raise Unauthorized("the client certificate names no identity (UID, CN or O)")
        index, handle = split_identity(text)
        identity, record = await self._identity(handle)
        offered = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for key_index, der in self._keys_of(identity, record):
            if index in (0, key_index) and hmac.compare_digest(der, offered):
                return Caller(identity, key_index)
        raise Unauthorized(f"the client certificate's key is not an HS_PUBKEY of {index}:{handle}")
