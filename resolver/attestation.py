"""Verifiable resolution, the primitives (issue 14; the design: docs/verifiable-resolution.md).

An answer is accepted because what it says chains up to a key the resolver already trusts (the
apex's, its *trust anchor*), not because of who relayed it. Three signed things make the chain:

* a **delegation** (like a DNS DS record or a Handle ``HS_CERT``): a prefix's key signs, for a
  child prefix strictly below it, the child's keys, each with its own validity (old and new
  valid together while a key rolls over);
* a **batch attestation** (like ``HS_SIGNATURE``, made once per write batch rather than per
  record): a prefix's key signs the root of a Merkle tree (RFC 9162 §2.1) whose leaves are the
  batch's records under that prefix, with a validity period; re-signing a batch before it
  expires is one signature, whatever its size;
* the record's **leaf** and its **inclusion proof** (the audit path from the leaf to the root).

A leaf binds the record's key and version to two digests: one of its publicly readable values,
one of the others salted with a per-record secret. A reader who may see only the public values
gets the second digest as an opaque 32 bytes: it verifies what it sees and learns nothing of
what it may not see (not even a guessable value: the salt is never shown to it).

Statements are JWS compact serialisations (RFC 7515) signed with Ed25519 (``alg`` ``EdDSA``,
RFC 8037), their claims JSON with sorted keys. A failed check raises ``Bogus`` naming why.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from resolver.cache import record_digests, record_leaves, record_salt, tree_levels
from resolver.errors import Bogus as Bogus  # re-exported: what every check here raises
from resolver.errors import IdisError, InvalidArgument
from resolver.identifier import parse_identifier, parse_prefix
from resolver.record import Record, Value
from resolver.wire import decode_record, value_to_pb

LEAF, NODE = b"\x00", b"\x01"  # RFC 9162 domain separation of leaf and interior hashes
RECORD_LEAF = b"idis-record-v1"
RETIRED_LEAF = bytes(32)
"""The leaf that takes the place of a record no longer current when its tree is rebuilt: no
record's leaf hash is 32 zero bytes, so it proves nothing."""
SALT_BYTES = 16
"""A record's salt: what a reader allowed to see its private values is given with them."""
MAX_DELEGATIONS = 8
"""The longest chain considered (the hierarchy is apex, secondary, enterprise, and below)."""
MAX_KEYS = 8
"""The most keys a delegation may list (a rollover needs two)."""
MAX_LIFETIME = 90 * 86_400
"""The longest validity a statement may claim: a leaked key's statements end within it."""

BATCH, DELEGATION, DENIAL = "idis-batch", "idis-delegation", "idis-denial"
MAX_PATH = 64
"""The longest inclusion proof considered (a tree of 2^64 leaves): bounds a hostile proof."""
PROOF_METADATA = "idis-proof"
"""Request metadata (value "1") asking a node for proofs, denials and delegations with its
answers, like DNS's DO bit: a validating resolver sends it, and other clients get the bytes of
a node that does not sign."""
CLOCK_SKEW = 300
"""Seconds a statement is valid before it was signed (its ``nbf``): readers whose clocks are
behind the signer's still accept it."""
MAX_STATEMENT_BYTES = 16384
"""The largest statement considered: bounds what a hostile node can make a resolver parse."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(text: object) -> bytes:
    """Strict base64url without padding: one text for one byte string (a statement re-spelled
    differently is not a different statement to the caches)."""
    if not isinstance(text, str) or _B64URL.fullmatch(text) is None or len(text) % 4 == 1:
        raise Bogus("a statement holds malformed base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise Bogus("a statement holds base64url with stray bits")
    return data


def _int(value: object, what: str) -> int:
    """A JSON integer claim (not a float, a string or a boolean; within 64 bits)."""
    if type(value) is not int or not -(2**63) <= value < 2**63:
        raise Bogus(f"a statement's {what} is not an integer")
    return value


def _hash(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


# --- leaves -------------------------------------------------------------------------------------


def value_bytes(value: Value) -> bytes:
    """What a value's digest covers: its ``idis.v1.Value`` wire form, fields in number order,
    defaults omitted (every field a reader is shown: type, data, TTL, timestamp, permissions,
    references)."""
    return value_to_pb(value).SerializeToString(deterministic=True)


def _encoded(values: Sequence[Value]) -> bytes:
    """``values`` in index order, each its length (4 bytes) and ``value_bytes``."""
    parts = []
    for value in sorted(values, key=lambda v: v.index):
        data = value_bytes(value)
        parts += [len(data).to_bytes(4, "big"), data]
    return b"".join(parts)


def _digest_of(values: Sequence[Value], salt: bytes = b"") -> bytes:
    return hashlib.sha256(salt + _encoded(values)).digest()


def public_part(values: Sequence[Value]) -> bytes:
    """What a leaf holds of the publicly readable ones of ``values``: their encoding itself
    (``_encoded``), hashed with the rest of the leaf, not on its own (one hash less a record)."""
    return _encoded([v for v in values if v.publicly_readable])


def private_digest(values: Sequence[Value], salt: bytes) -> bytes:
    """The salted digest of the values that are not publicly readable (salted even when there
    are none, so the digest does not tell whether a record has private values). The salt's
    length is hashed before it, so no value's bytes can pass for part of a longer salt."""
    private = [v for v in values if not v.publicly_readable]
    return _digest_of(private, b"idis-private" + bytes([len(salt)]) + salt)


def leaf_hash(key: str, version: int, public: bytes, private: bytes) -> bytes:
    """The Merkle leaf of the record ``key`` at ``version`` with its public values (their
    ``public_part``) and the digest of the others: the fixed-size fields first, the public part
    last, so no two records share a leaf's input."""
    name = key.encode()
    return _hash(LEAF, RECORD_LEAF, len(name).to_bytes(2, "big"), name, version.to_bytes(8, "big"), private, public)


def record_leaf(record: Record, salt: bytes) -> bytes:
    """The leaf of a whole record (what its node computes when it signs)."""
    return leaf_hash(
        record.identifier.key, record.version, public_part(record.values), private_digest(record.values, salt)
    )


def stored_digests(record: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """The public part and the private digest of a record in wire form, as a node holds it: from
    the values' wire forms in the compiled module (``resolver.cache.record_digests``), the record
    decoded only for a form that module leaves to Python."""
    digests: tuple[bytes, bytes] | None = record_digests(record, salt)
    if digests is None:
        values = decode_record(record).values
        digests = public_part(values), private_digest(values, salt)
    return digests


def stored_leaf(key: str, version: int, record: bytes, salt: bytes) -> bytes:
    """``record_leaf`` of a record in wire form (``stored_digests``)."""
    return leaf_hash(key, version, *stored_digests(record, salt))


def stored_leaves(keys: Sequence[str], versions: Sequence[int], records: Sequence[bytes], secret: bytes) -> list[bytes]:
    """``stored_leaf`` of many records in wire form, each salted with ``record_salt(secret, key,
    version)``: in the compiled module (``resolver.cache.record_leaves``), a record it leaves to
    Python decoded here."""
    leaves: list[bytes | None] = record_leaves(list(keys), list(versions), list(records), secret)
    for i, leaf in enumerate(leaves):
        if leaf is None:
            leaves[i] = stored_leaf(keys[i], versions[i], records[i], record_salt(secret, keys[i], versions[i]))
    return cast(list[bytes], leaves)


# --- Merkle trees (RFC 9162 §2.1) -------------------------------------------------------------


def merkle_tree(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root of the tree over ``leaves`` (leaf hashes) and each leaf's inclusion proof."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    paths: list[list[bytes]] = [[] for _ in leaves]

    def subtree(lo: int, hi: int) -> bytes:
        if hi - lo == 1:
            return leaves[lo]
        k = 1 << ((hi - lo - 1).bit_length() - 1)  # the largest power of two below the size
        left, right = subtree(lo, lo + k), subtree(lo + k, hi)
        for i in range(lo, lo + k):
            paths[i].append(right)
        for i in range(lo + k, hi):
            paths[i].append(left)
        return _hash(NODE, left, right)

    return subtree(0, len(leaves)), paths


def merkle_levels(leaves: Sequence[bytes]) -> list[bytes]:
    """The tree over ``leaves`` level by level, bottom up, each level's hashes concatenated (the
    last level is the root): what a node stores per batch (about 64 bytes a record), from which
    ``inclusion_path`` takes any leaf's path without hashing. A level's last node without a
    sibling moves up unhashed, which builds exactly RFC 9162's tree (its split at the largest
    power of two below the size). Built in the compiled module (``resolver.cache.tree_levels``)."""
    levels: list[bytes] = tree_levels(list(leaves))
    return levels


def tree_blob(levels: Sequence[bytes]) -> bytes:
    """``merkle_levels`` as one stored value."""
    return b"".join(levels)


def inclusion_path(tree: bytes, size: int, index: int) -> list[bytes]:
    """The inclusion proof of leaf ``index`` in a stored tree (``tree_blob``) of ``size`` leaves."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} of a tree of {size}")
    path, start, width = [], 0, size
    while width > 1:
        sibling = index ^ 1
        if sibling < width:
            at = start + 32 * sibling
            path.append(tree[at : at + 32])
        start += 32 * width
        width, index = (width + 1) // 2, index // 2
    return path


def tree_root(tree: bytes) -> bytes:
    """The root of a stored tree: its last hash."""
    return tree[-32:]


def root_from_proof(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes:
    """The root that ``path`` proves ``leaf`` at ``index`` of a tree of ``size`` leaves
    belongs to (RFC 9162 §2.1.3.2); Bogus when the path cannot belong to such a tree."""
    if not 0 <= index < size or len(path) > MAX_PATH or any(len(p) != 32 for p in path):
        raise Bogus(f"inclusion proof malformed (leaf {index} of {size}, {len(path)} hashes)")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise Bogus("inclusion proof longer than its tree")
        if fn & 1 or fn == sn:
            r = _hash(NODE, p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _hash(NODE, r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise Bogus("inclusion proof shorter than its tree")
    return r


# --- keys and statements ------------------------------------------------------------------------


@dataclass(frozen=True)
class ZoneKey:
    """A key a prefix signs with: ``kid`` names it within the prefix."""

    kid: str
    public: Ed25519PublicKey
    not_before: int = 0
    expires: int = 2**62

    def jwk(self) -> dict[str, Any]:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw), "kid": self.kid}

    def claim(self) -> dict[str, Any]:
        return {"jwk": self.jwk(), "nbf": self.not_before, "exp": self.expires}

    @staticmethod
    def from_claim(claim: Any) -> ZoneKey:
        try:
            jwk, nbf, exp = claim["jwk"], _int(claim["nbf"], "nbf"), _int(claim["exp"], "exp")
            if jwk["kty"] != "OKP" or jwk["crv"] != "Ed25519":
                raise Bogus(f"key {jwk.get('kid')!r} is not an Ed25519 key (the one algorithm supported)")
            raw = _unb64(jwk["x"])
            return ZoneKey(str(jwk["kid"]), Ed25519PublicKey.from_public_bytes(raw), nbf, exp)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise Bogus("a delegation lists a malformed key") from exc


def sign_statement(claims: dict[str, Any], key: Ed25519PrivateKey, kid: str) -> str:
    """``claims`` as a JWS compact serialisation signed with ``key`` (named ``kid``)."""
    header = _b64(json.dumps({"alg": "EdDSA", "kid": kid}, sort_keys=True, separators=(",", ":")).encode())
    payload = _b64(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
    signature = key.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


@dataclass(frozen=True)
class Statement:
    """A parsed, not yet verified, JWS: its key id, claims, and what its signature covers."""

    kid: str
    claims: dict[str, Any]
    signed: bytes
    signature: bytes

    @staticmethod
    def parse(text: str, kind: str) -> Statement:
        if len(text) > MAX_STATEMENT_BYTES:
            raise Bogus(f"{kind} statement of {len(text)} bytes; the limit is {MAX_STATEMENT_BYTES}")
        parts = text.split(".")
        if len(parts) != 3:
            raise Bogus(f"{kind} statement is not a JWS compact serialisation")
        try:
            header, claims = json.loads(_unb64(parts[0])), json.loads(_unb64(parts[1]))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise Bogus(f"{kind} statement holds malformed JSON") from exc
        if not isinstance(header, dict) or header.get("alg") != "EdDSA" or not isinstance(header.get("kid"), str):
            raise Bogus(f"{kind} statement is not signed with EdDSA under a key id")
        if not isinstance(claims, dict) or claims.get("typ") != kind:
            raise Bogus(f"statement is not a {kind} statement")
        return Statement(header["kid"], claims, f"{parts[0]}.{parts[1]}".encode(), _unb64(parts[2]))

    def verify(self, keys: dict[str, ZoneKey], issuer: str, now: int) -> None:
        """Raises Bogus unless the issuer's key ``kid`` (valid now) signed it and it is valid now."""
        key = keys.get(self.kid)
        if key is None:
            raise Bogus(f"key {self.kid!r} is not in the chain of {issuer}")
        if not key.not_before <= now < key.expires:
            raise Bogus(f"key {self.kid!r} of {issuer} is not valid now")
        try:
            key.public.verify(self.signature, self.signed)
        except InvalidSignature as exc:
            raise Bogus(f"bad signature by key {self.kid!r} of {issuer}") from exc
        nbf, exp = _int(self.claims.get("nbf"), "nbf"), _int(self.claims.get("exp"), "exp")
        if exp - nbf > MAX_LIFETIME + CLOCK_SKEW:
            raise Bogus(f"statement by {issuer} claims {exp - nbf} s of validity; at most {MAX_LIFETIME} are accepted")
        if now < nbf:
            raise Bogus(f"statement by {issuer} is not valid yet (from {nbf})")
        if now >= exp:
            raise Bogus(f"statement by {issuer} expired at {exp}")


def _statement(kind: str, issuer: str, key: Ed25519PrivateKey, kid: str, now: int, lifetime: int, **claims: Any) -> str:
    """A statement of ``kind`` by prefix ``issuer`` with ``claims``, issued ``now`` and valid from
    ``CLOCK_SKEW`` seconds before it for ``lifetime`` seconds after, signed with ``key``."""
    validity = {
        "typ": kind,
        "iss": parse_prefix(issuer).key,
        "iat": now,
        "nbf": now - CLOCK_SKEW,
        "exp": now + lifetime,
    }
    return sign_statement({**claims, **validity}, key, kid)


def delegation(
    parent: str, key: Ed25519PrivateKey, kid: str, child: str, keys: Sequence[ZoneKey], now: int, lifetime: int
) -> str:
    """The parent prefix's statement of the child prefix's keys, valid from ``now`` for
    ``lifetime`` seconds."""
    sub, listed = parse_prefix(child).key, [k.claim() for k in keys]
    return _statement(DELEGATION, parent, key, kid, now, lifetime, sub=sub, keys=listed)


def batch_attestation(
    prefix: str, key: Ed25519PrivateKey, kid: str, root: bytes, size: int, now: int, lifetime: int
) -> str:
    """The prefix's statement that the tree of ``size`` records with ``root`` is its own."""
    return _statement(BATCH, prefix, key, kid, now, lifetime, root=_b64(root), size=size)


def denial(prefix: str, key: Ed25519PrivateKey, kid: str, identifier: str, now: int, lifetime: int) -> str:
    """The prefix's statement that it holds no record ``identifier`` (a key at or below it)."""
    return _statement(DENIAL, prefix, key, kid, now, lifetime, sub=parse_identifier(identifier).key)


# --- verification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustAnchor:
    """What a resolver trusts to begin with: the apex prefix and its keys."""

    prefix: str
    keys: tuple[ZoneKey, ...]


@dataclass
class ChainStep:
    """One step of a verified chain, for ``--trace``: who vouched for which keys."""

    prefix: str
    keys: list[str]
    by: str
    issued: int = 0
    """When the delegation of this step was issued (its ``iat``; 0 for the anchor and records)."""
    listed: frozenset[str] = frozenset()
    """The keys the delegation lists, each as ``kid:public key`` (empty for the anchor and records)."""


@dataclass
class Proof:
    """What comes with an answer so a reader can check it: the batch's attestation, the
    record's place in the batch and inclusion proof, the private digest a reader who may not see
    the private values gets instead of them (None for one who sees them all, who then needs the
    salt), and the delegations from the anchor down to the signing prefix."""

    attestation: str
    index: int
    path: list[bytes]
    delegations: list[str] = field(default_factory=list)
    private: bytes | None = None
    salt: bytes = b""


def _within(child: str, parent: str) -> bool:
    """True when prefix ``child`` is strictly below prefix ``parent`` (both keys)."""
    return child.startswith(parent + ".")


def chain_keys(
    anchor: TrustAnchor, delegations: Sequence[str], now: int
) -> tuple[str, dict[str, ZoneKey], list[ChainStep], int]:
    """Follows ``delegations`` down from ``anchor``: the last prefix reached, its keys, the
    steps, and until when all of it holds (the first end of a delegation or of a key that
    signed one or is listed last). Each delegation must be signed by a key of the prefix reached
    so far, valid now, and name a child strictly below it: a child cannot vouch for its
    parent's names or a sibling's."""
    if len(delegations) > MAX_DELEGATIONS:
        raise Bogus(f"a chain of {len(delegations)} delegations; at most {MAX_DELEGATIONS} are followed")
    prefix = parse_prefix(anchor.prefix).key
    keys = {k.kid: k for k in anchor.keys}
    steps = [ChainStep(prefix, sorted(keys), "trust anchor")]
    until = 2**63
    for text in delegations:
        statement = Statement.parse(text, DELEGATION)
        issuer, child = statement.claims.get("iss"), statement.claims.get("sub")
        if issuer != prefix:
            raise Bogus(f"delegation issued by {issuer!r} where the chain has reached {prefix}")
        statement.verify(keys, prefix, now)
        until = min(until, _until(statement, keys))
        if not isinstance(child, str) or not _within(child, prefix) or _prefix_key(child) != child:
            raise Bogus(f"delegation by {prefix} of {child!r}, which is not below it")
        listed = statement.claims.get("keys")
        if not isinstance(listed, list) or not listed or len(listed) > MAX_KEYS:
            raise Bogus(f"delegation of {child} lists no key, or more than {MAX_KEYS}")
        keys = {k.kid: k for k in map(ZoneKey.from_claim, listed)}
        issued = _int(statement.claims.get("iat"), "iat")
        listed_keys = frozenset(f"{k.kid}:{k.jwk()['x']}" for k in keys.values())
        steps.append(ChainStep(child, sorted(keys), f"{prefix} key {statement.kid!r}", issued, listed_keys))
        prefix = child
    return prefix, keys, steps, min([until, *(k.expires for k in keys.values())])


def _prefix_key(text: str) -> str:
    """The normalised form of a prefix named in a statement (Bogus when it is no prefix)."""
    try:
        return parse_prefix(text).key
    except IdisError as exc:
        raise Bogus(f"a statement names {text!r}, which is not a prefix") from exc


def _batch(statement: Statement, prefix: str, keys: dict[str, ZoneKey], now: int) -> tuple[bytes, int]:
    """The root and size a batch attestation states, once verified against ``prefix``'s keys."""
    issuer = statement.claims.get("iss")
    if issuer != prefix:
        raise Bogus(f"attestation issued by {issuer!r} where the chain reaches {prefix}")
    statement.verify(keys, prefix, now)
    root, size = _unb64(statement.claims.get("root")), _int(statement.claims.get("size"), "size")
    if len(root) != 32 or size < 1:
        raise Bogus("attestation without a root and size")
    return root, size


def _leaf_of(key: str, version: int, values: Sequence[Value], proof: Proof) -> bytes:
    if proof.private is not None:
        if any(not v.publicly_readable for v in values):
            raise Bogus("private values given with a digest standing for them")
        private = proof.private
    else:
        if len(proof.salt) != SALT_BYTES:
            raise Bogus(f"a record's salt is {len(proof.salt)} bytes, not {SALT_BYTES}")
        private = private_digest(values, proof.salt)
    return leaf_hash(key, version, public_part(values), private)


def _until(statement: Statement, keys: dict[str, ZoneKey]) -> int:
    """Until when a verified statement stays good: its own end, and its signing key's."""
    return min(_int(statement.claims["exp"], "exp"), keys[statement.kid].expires)


def verify_record(
    anchor: TrustAnchor, key: str, version: int, values: Sequence[Value], proof: Proof, now: int
) -> list[ChainStep]:
    """Checks that the record ``key`` at ``version`` holds ``values`` (all of them, or the
    publicly readable ones when ``proof.private`` stands for the rest), as its prefix's keys
    attest through the chain from ``anchor``. Returns the chain; raises Bogus naming the fault.
    Everything is checked afresh: ``Validator`` remembers what it has verified."""
    return Validator(anchor, max_entries=0).verify(key, version, values, proof, now)


class Validator:
    """``verify_record`` for one trust anchor, remembering the delegation chains and batch
    attestations it has verified until they (or a key they rest on) expire: a resolver checks
    the signatures of a batch once, then only each answer's leaf and path (a dozen hashes).
    At most ``max_entries`` of each are remembered, the oldest forgotten first (bounded memory
    whatever a hostile node sends: a statement is at most MAX_STATEMENT_BYTES, a chain at most
    MAX_DELEGATIONS of them)."""

    def __init__(self, anchor: TrustAnchor, max_entries: int = 10_000) -> None:
        self.anchor = anchor
        self.max_entries = max_entries
        self._chains: OrderedDict[tuple[str, ...], tuple[int, str, dict[str, ZoneKey], list[ChainStep]]] = OrderedDict()
        self._batches: OrderedDict[tuple[str, str], tuple[int, bytes, int, ZoneKey]] = OrderedDict()
        self._newest: OrderedDict[str, tuple[int, frozenset[str]]] = OrderedDict()

    def _remember(self, table: OrderedDict[Any, Any], entry: Any, value: Any) -> None:
        if self.max_entries <= 0:
            return
        table[entry] = value
        while len(table) > self.max_entries:
            table.popitem(last=False)  # the oldest verified first

    def chain(self, delegations: Sequence[str], now: int) -> tuple[str, dict[str, ZoneKey], list[ChainStep]]:
        entry = tuple(delegations)
        known = self._chains.get(entry)
        if known is not None and now < known[0]:
            prefix, keys, steps = known[1], known[2], known[3]
        else:
            prefix, keys, steps, until = chain_keys(self.anchor, delegations, now)
            self._remember(self._chains, entry, (until, prefix, keys, steps))
        self._newest_only(steps)
        return prefix, keys, list(steps)

    def _newest_only(self, steps: Sequence[ChainStep]) -> None:
        """Refuses a delegation older than one already verified for the same prefix when it
        lists a key the newer one dropped: once a resolver has seen the delegation that drops a
        key (a revocation), a relay replaying the earlier one, unexpired yet, is refused. An
        older delegation listing no dropped key is the same statement re-signed later (each
        server of a site, each re-signing, signs its own): accepted. Remembered for
        ``max_entries`` prefixes."""
        for step in steps[1:]:
            issued, listed = self._newest.get(step.prefix, (0, frozenset()))
            if step.issued < issued and step.listed - listed:
                raise Bogus(
                    f"delegation of {step.prefix} issued at {step.issued} is superseded by one of {issued},"
                    " which no longer lists some of its keys"
                )
        for step in steps[1:]:
            if step.issued >= self._newest.get(step.prefix, (0, frozenset()))[0]:
                self._remember(self._newest, step.prefix, (step.issued, step.listed))

    def verify(self, key: str, version: int, values: Sequence[Value], proof: Proof, now: int) -> list[ChainStep]:
        """Raises Bogus unless the answer verifies; the chain of what vouched for it."""
        prefix, keys, steps = self.chain(proof.delegations, now)
        try:
            identifier = parse_identifier(key)
        except IdisError as exc:
            raise Bogus(f"{key!r} is not an identifier") from exc
        key, record_prefix = identifier.key, identifier.prefix.key
        known = self._batches.get((prefix, proof.attestation))
        if known is not None and now < known[0] and keys.get(known[3].kid) == known[3]:
            _, root, size, signer = known  # verified before, by a key this chain still lists
        else:
            statement = Statement.parse(proof.attestation, BATCH)
            root, size = _batch(statement, prefix, keys, now)
            signer = keys[statement.kid]
            self._remember(self._batches, (prefix, proof.attestation), (_until(statement, keys), root, size, signer))
        kid = signer.kid
        if record_prefix != prefix:
            raise Bogus(f"{key} is outside the authority of {prefix}, which signed it")
        if root_from_proof(_leaf_of(key, version, values, proof), proof.index, size, proof.path) != root:
            raise Bogus(f"{key} v{version}: the values are not those {prefix} signed")
        seen = "public values only" if proof.private is not None else "every value"
        steps.append(ChainStep(key, [f"v{version}", f"leaf {proof.index} of {size}", seen], f"{prefix} key {kid!r}"))
        return steps

    def verify_denial(self, identifier: str, statement: str, delegations: Sequence[str], now: int) -> list[ChainStep]:
        """Raises Bogus unless ``statement`` is a valid denial of ``identifier`` by its prefix or
        an ancestor of it (an unallocated prefix is denied by the prefix above it), chaining up
        to the anchor through ``delegations``; the chain of what vouched for it."""
        prefix, keys, steps = self.chain(delegations, now)
        try:
            ident = parse_identifier(identifier)
        except IdisError as exc:
            raise Bogus(f"{identifier!r} is not an identifier") from exc
        parsed = Statement.parse(statement, DENIAL)
        issuer = parsed.claims.get("iss")
        if issuer != prefix:
            raise Bogus(f"denial issued by {issuer!r} where the chain reaches {prefix}")
        parsed.verify(keys, prefix, now)
        if parsed.claims.get("sub") != ident.key:
            raise Bogus(f"denial of {parsed.claims.get('sub')!r}, not of {ident.key}")
        if ident.prefix.key != prefix and not _within(ident.prefix.key, prefix):
            raise Bogus(f"{ident.key} is outside the authority of {prefix}, which denied it")
        steps.append(ChainStep(ident.key, ["not found"], f"{prefix} key {parsed.kid!r}"))
        return steps

    def verify_referral(self, prefix: str, delegations: Sequence[str], now: int) -> list[ChainStep]:
        """Raises Bogus unless ``delegations`` chain from the anchor down to exactly ``prefix``
        (the prefix a referral sends the resolver to): the chain of what vouched for it."""
        reached, _, steps = self.chain(delegations, now)
        if reached != _prefix_key(prefix):
            raise Bogus(f"a referral to {prefix} carries delegations reaching {reached}")
        return steps


# --- trust anchors on disk ------------------------------------------------------------------------


def anchor_text(prefix: str, keys: Sequence[ZoneKey]) -> str:
    """A trust anchor as a file holds it: ``{"prefix": ..., "keys": [key claims]}``."""
    return json.dumps({"prefix": parse_prefix(prefix).key, "keys": [k.claim() for k in keys]}, indent=1)


def load_anchor(path: str | Path) -> TrustAnchor:
    """The trust anchor in a file written by ``anchor_text``; InvalidArgument naming the file
    when it cannot be read or holds no anchor."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        keys = tuple(ZoneKey.from_claim(claim) for claim in data["keys"])
        if not keys or len(keys) > MAX_KEYS:
            raise ValueError(f"an anchor lists 1 to {MAX_KEYS} keys")
        return TrustAnchor(parse_prefix(data["prefix"]).key, keys)
    except (OSError, ValueError, KeyError, TypeError, IdisError) as exc:
        raise InvalidArgument(f"trust anchor {path}: {exc}") from exc


def keys_json(keys: Sequence[ZoneKey]) -> str:
    """Keys as a delegation request names them: a JSON list of key claims (``ZoneKey.claim``)."""
    return json.dumps([k.claim() for k in keys], sort_keys=True)


def keys_from_json(text: str) -> tuple[ZoneKey, ...]:
    """The keys of ``keys_json``'s text (empty text: none); InvalidArgument naming what is wrong."""
    if not text.strip():
        return ()
    try:
        claims = json.loads(text)
        if not isinstance(claims, list) or len(claims) > MAX_KEYS:
            raise InvalidArgument(f"zone keys must be a JSON list of at most {MAX_KEYS} keys")
        keys = tuple(ZoneKey.from_claim(claim) for claim in claims)
    except (ValueError, RecursionError, Bogus) as exc:
        raise InvalidArgument(f"zone keys: {exc}") from exc
    if len({k.kid for k in keys}) != len(keys):
        raise InvalidArgument("zone keys: two keys share a key id")
    return keys
