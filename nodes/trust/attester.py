"""What a node signs so that its answers verify whoever relays them (verifiable resolution,
docs/verifiable-resolution.md): the Merkle tree of each write batch, the delegations of the
prefixes below its apexes, and denials.

A node holds keys for each prefix it hosts (``ZoneKeys``). Records under a hosted prefix are
attested by that prefix's key; the node's apex vouches for a hosted prefix below it with a
delegation it signs itself, and the apex's own delegation comes from the parent node (fetched
and checked against the trust anchor: ``set_upstream``), so every answer carries the whole chain
from the anchor down. Each record has a salt (the keyed BLAKE2b, under the node's secret, of its key and
version: nothing more to store) under which the digest of its non-public values is hidden.

Everything here is computation on data handed in; the store, the registry and the resolution
service decide when to call it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nodes.trust.quotas import TokenBuckets
from nodes.trust.zone_keys import SigningKey, ZoneKeys
from resolver.attestation import (
    MAX_LIFETIME,
    Bogus,
    Proof,
    TrustAnchor,
    ZoneKey,
    batch_attestation,
    chain_keys,
    delegation,
    denial,
    inclusion_path,
    merkle_levels,
    stored_digests,
    stored_leaves,
    tree_blob,
    tree_root,
)
from resolver.cache import record_salt

KEY_REFRESH = 60.0
"""Seconds a prefix's signing key is used before its key file is read again (a roll by another
process or by the operator's command is picked up within this)."""


@dataclass(frozen=True, slots=True)
class SignedTree:
    """A batch's tree, signed: its prefix (key), the key that signed it, the statement, every
    level's hashes, its number of leaves, and when the statement ends."""

    prefix: str
    kid: str
    statement: str
    tree: bytes
    size: int
    expires: int


class Attester:
    """Signs with the node's zone keys. ``anchor``: the trust anchor (None: this node's apex is
    the anchor itself, or chains are not checked). ``lifetime``: seconds a batch's statement
    and a delegation are valid (re-signed in the last quarter)."""

    def __init__(
        self,
        keys: ZoneKeys,
        apexes: Sequence[str],
        anchor: TrustAnchor | None,
        lifetime: int = 30 * 86_400,
        denials_per_second: float = 1000.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 60 <= lifetime <= MAX_LIFETIME:
            raise ValueError(f"a statement's lifetime must be between 60 and {MAX_LIFETIME} seconds")
        self.keys = keys
        self.apexes = sorted(apexes, key=len, reverse=True)
        self.anchor = anchor
        self.lifetime = lifetime
        self.clock = clock
        self._secret = keys.secret()
        self._signing: dict[str, tuple[SigningKey, float]] = {}
        self._upstream: dict[str, tuple[list[str], int]] = {}
        """Apex key -> the delegations from the anchor down to it, and until when they hold."""
        self._own: dict[tuple[str, str], tuple[str, int]] = {}
        """(issuer, child) -> a delegation this node signed, and when to sign it again."""
        self._own_keys: dict[tuple[str, str], tuple[str, ...]] = {}
        """(issuer, child) -> the keys that delegation lists (signed again when they change)."""
        self._denials = TokenBuckets(denials_per_second, denials_per_second)
        self._listed: dict[str, dict[str, ZoneKey]] = {}
        """Apex key -> the keys its adopted chain lists for it."""
        self._published: dict[str, list[ZoneKey]] = {}

    def now(self) -> int:
        return int(self.clock())

    # --- keys ------------------------------------------------------------------------------------

    def signing_key(self, prefix: str) -> SigningKey:
        """The key ``prefix`` signs with now (made when it has none), read from disk at most
        every KEY_REFRESH seconds: the newest valid key, or for an apex whose chain came from
        its parent, the newest valid key that chain lists (a key rolled in signs only once the
        parent's delegation publishes it)."""
        now = self.clock()
        known = self._signing.get(prefix)
        if known is not None and now - known[1] < KEY_REFRESH and known[0].valid(int(now)):
            return known[0]
        key = self.keys.signing(prefix, int(now))
        all_keys = self.keys.keys(prefix)
        listed = self._listed.get(prefix)
        if listed is not None:
            published = [k for k in all_keys if k.valid(int(now)) and _same_key(listed.get(k.kid), k.public())]
            key = published[-1] if published else key
        self._signing[prefix] = (key, now)
        self._published[prefix] = [k.public() for k in all_keys if int(now) < k.expires]
        return key

    def published(self, prefix: str) -> list[ZoneKey]:
        """The public keys of ``prefix`` a delegation lists: those not yet ended (its first key
        made if needed; read from disk with the signing key, at most every KEY_REFRESH s)."""
        self.signing_key(prefix)
        return [k for k in self._published[prefix] if self.now() < k.expires]

    def apex_of(self, prefix: str) -> str | None:
        """The apex (key) ``prefix`` (a key) is at or below, the longest first."""
        for apex in self.apexes:
            if prefix == apex or prefix.startswith(apex + "."):
                return apex
        return None

    # --- chains ----------------------------------------------------------------------------------

    def set_upstream(self, apex: str, delegations: Sequence[str]) -> int:
        """Adopts the delegations from the anchor down to ``apex`` (fetched from the parent),
        once they verify against the anchor and list the key this node signs ``apex`` with;
        until when they hold. Raises Bogus otherwise (the node keeps what it had)."""
        if self.anchor is None:
            raise Bogus("no trust anchor is configured: the chain cannot be checked")
        reached, keys, _steps, until = chain_keys(self.anchor, delegations, self.now())
        if reached != apex:
            raise Bogus(f"the delegations reach {reached}, not this node's apex {apex}")
        now = self.now()
        ours = [k.public() for k in self.keys.keys(apex) if k.valid(now)]
        if not any(_same_key(keys.get(k.kid), k) for k in ours):
            kids = ", ".join(repr(k.kid) for k in ours)
            raise Bogus(f"the parent's delegation of {apex} lists none of its signing keys ({kids})")
        self._upstream[apex] = (list(delegations), until)
        if self._listed.get(apex) != keys:
            self._listed[apex] = keys
            self._signing.pop(apex, None)  # the key to sign with may change
        return until

    def upstream_until(self, apex: str) -> int:
        """Until when the adopted chain of ``apex`` holds (0: none adopted)."""
        known = self._upstream.get(apex)
        return known[1] if known is not None else 0

    def needs_upstream(self, apex: str) -> bool:
        """True when ``apex``'s chain must come from a parent (the anchor is above it)."""
        return self.anchor is None or apex != self.anchor.prefix

    def chain(self, prefix: str) -> list[str]:
        """The delegations from the anchor down to ``prefix`` (a key this node signs for), as
        far as known: a chain not yet fetched is left out, and validators refuse the answer."""
        apex = self.apex_of(prefix)
        if apex is None:
            return []
        known = self._upstream.get(apex)
        chain = list(known[0]) if known is not None else []
        if prefix != apex:
            chain.append(self.delegate(apex, prefix, self.published(prefix)))
        return chain

    def delegate(self, issuer: str, child: str, keys: Sequence[ZoneKey]) -> str:
        """``issuer``'s delegation of ``child`` listing ``keys``, signed once and re-signed in
        the last quarter of its life (or when the keys change)."""
        now = self.now()
        entry = (issuer, child)
        known = self._own.get(entry)
        listed = tuple(k.claim()["jwk"]["x"] + str(k.expires) for k in keys)
        if known is not None and now < known[1] and self._own_keys.get(entry) == listed:
            return known[0]
        key = self.signing_key(issuer)
        lifetime = min(self.lifetime, key.expires - now)
        statement = delegation(issuer, key.private, key.kid, child, keys, now, lifetime)
        self._own[entry] = (statement, now + lifetime - lifetime // 4)
        self._own_keys[entry] = listed
        return statement

    def referral_chain(self, child: str, keys: Sequence[ZoneKey]) -> list[str]:
        """The delegations a referral to ``child`` carries: the chain down to the prefix this
        node signs for above it, then this node's delegation of ``child``'s keys (none known: the
        chain down to this node only, which a validator refuses for the child)."""
        apex = self.apex_of(child)
        if apex is None:
            return []
        chain = self.chain(apex)
        if keys:
            chain.append(self.delegate(apex, child, keys))
        return chain

    # --- records ---------------------------------------------------------------------------------

    def salt(self, key: str, version: int) -> bytes:
        """The record's salt: the keyed BLAKE2b of its key and version under the node's secret
        (16 bytes; ``resolver.cache.record_salt``)."""
        salt: bytes = record_salt(self._secret, key, version)
        return salt

    def leaves(self, keys: Sequence[str], versions: Sequence[int], records: Sequence[bytes]) -> list[bytes]:
        """The leaves of records in wire form (``stored_leaves``, each with its salt)."""
        return stored_leaves(keys, versions, records, self._secret)

    def sign_tree(self, prefix: str, leaves: Sequence[bytes]) -> SignedTree:
        """The tree over ``leaves``, its root signed by ``prefix``'s key."""
        levels = merkle_levels(leaves)
        tree = tree_blob(levels)
        return self.resign(prefix, tree, len(leaves))

    def resign(self, prefix: str, tree: bytes, size: int) -> SignedTree:
        """A fresh statement over a stored tree's root."""
        now = self.now()
        key = self.signing_key(prefix)
        lifetime = min(self.lifetime, key.expires - now)
        statement = batch_attestation(prefix, key.private, key.kid, tree_root(tree), size, now, lifetime)
        return SignedTree(prefix, key.kid, statement, tree, size, now + lifetime)

    def due(self, expires: int) -> bool:
        """True when a statement ending at ``expires`` is in its last quarter: re-sign it."""
        return expires - self.now() < self.lifetime // 4

    def proof(
        self,
        prefix: str,
        statement: str,
        tree: bytes,
        size: int,
        leaf: int,
        key: str,
        version: int,
        record: bytes,
        everything: bool,
    ) -> Proof:
        """The proof of a stored record (wire form ``record``) for a reader shown every value
        (``everything``: it gets the salt) or the public ones only (it gets the private digest)."""
        salt = self.salt(key, version)
        proof = Proof(statement, leaf, inclusion_path(tree, size, leaf), self.chain(prefix))
        if everything:
            proof.salt = salt
        else:
            proof.private = stored_digests(record, salt)[1]
        return proof

    def denial(self, prefix: str, identifier: str, lifetime: int) -> tuple[str, list[str]] | None:
        """``prefix``'s signed statement that it holds no ``identifier``, valid ``lifetime``
        seconds (at least 60), with its chain; None beyond the node's rate of denials (the
        answer then goes unsigned, and a validating resolver refuses it)."""
        if not self._denials.admits("node"):
            return None
        key = self.signing_key(prefix)
        now = self.now()
        statement = denial(prefix, key.private, key.kid, identifier, now, max(60, min(lifetime, key.expires - now)))
        return statement, self.chain(prefix)


def _same_key(listed: ZoneKey | None, own: ZoneKey) -> bool:
    """True when a delegation's ``listed`` key is ``own`` (the same id and public key; their
    validity may differ: a roll ends a key earlier than its delegation says, which is the
    stricter of the two for a verifier)."""
    return listed is not None and listed.kid == own.kid and listed.public == own.public
