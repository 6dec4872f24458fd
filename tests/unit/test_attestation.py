"""The primitives of verifiable resolution (resolver.attestation): a record answered with its
batch's attestation, its inclusion proof and the delegations from the apex verifies, and each
way a hostile node or a tampering relay could lie is refused with its reason."""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.attestation import (
    CLOCK_SKEW,
    Bogus,
    Proof,
    TrustAnchor,
    Validator,
    ZoneKey,
    batch_attestation,
    chain_keys,
    delegation,
    leaf_hash,
    merkle_tree,
    private_digest,
    public_part,
    record_leaf,
    root_from_proof,
    stored_leaf,
    verify_record,
)
from resolver.identifier import parse_identifier
from resolver.record import Permission, Record, TtlType, Value
from resolver.wire import encode_record

NOW = 1_800_000_000
SALT = bytes(range(16))
DAY = 86_400
URL = Value(1, "URL", b"https://example.com/a", timestamp=NOW)
SECRET = Value(2, "EMAIL", b"owner@example.com", permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE)


class Zone:
    """A prefix with its signing key."""

    def __init__(self, prefix: str, kid: str = "k1", not_before: int = 0, expires: int = 2**62) -> None:
        self.prefix, self.kid = prefix, kid
        self.private = Ed25519PrivateKey.generate()
        self.key = ZoneKey(kid, self.private.public_key(), not_before, expires)

    def delegate(self, child: Zone, *keys: ZoneKey, now: int = NOW, lifetime: int = 30 * DAY) -> str:
        return delegation(self.prefix, self.private, self.kid, child.prefix, keys or (child.key,), now, lifetime)

    def attest(self, records: list[Record], salt: bytes = SALT, now: int = NOW, lifetime: int = 7 * DAY) -> list[Proof]:
        root, paths = merkle_tree([record_leaf(r, salt) for r in records])
        statement = batch_attestation(self.prefix, self.private, self.kid, root, len(records), now, lifetime)
        return [Proof(statement, i, path, salt=salt) for i, path in enumerate(paths)]


@pytest.fixture
def zones() -> dict[str, Zone]:
    return {p: Zone(p) for p in ("88", "88.100", "88.100.1", "88.100.2")}


def refused(reason: str) -> contextlib.AbstractContextManager[object]:
    return pytest.raises(Bogus, match=re.escape(reason))


def record(key: str, *values: Value, version: int = 1) -> Record:
    return Record(parse_identifier(key), values, version)


def chain(z: dict[str, Zone], leaf: str = "88.100.1") -> list[str]:
    """The delegations from the apex 88 down to ``leaf``."""
    out, parent = [], z["88"]
    for prefix in ("88.100", leaf):
        out.append(parent.delegate(z[prefix]))
        parent = z[prefix]
    return out


def anchor(z: dict[str, Zone]) -> TrustAnchor:
    return TrustAnchor("88", (z["88"].key,))


def test_an_honest_answer_verifies_and_shows_its_chain(zones: dict[str, Zone]) -> None:
    records = [record(f"88.100.1/SN-{n}", URL, version=n + 1) for n in range(5)]
    proofs = zones["88.100.1"].attest(records)
    for r, proof in zip(records, proofs, strict=True):
        proof.delegations = chain(zones)
        steps = verify_record(anchor(zones), r.identifier.key, r.version, r.values, proof, NOW + 60)
        assert [s.prefix for s in steps] == ["88", "88.100", "88.100.1", r.identifier.key]
        assert steps[1].by == "88 key 'k1'" and steps[-1].keys[1] == f"leaf {proof.index} of 5"


def test_a_reader_of_the_public_values_verifies_them_and_learns_nothing_of_the_rest(zones: dict[str, Zone]) -> None:
    r = record("88.100.1/P", URL, SECRET)
    [proof] = zones["88.100.1"].attest([r], salt=SALT)
    proof.delegations = chain(zones)
    # the admin reader sees every value and gets the salt; the public reader an opaque digest
    verify_record(anchor(zones), r.identifier.key, 1, r.values, proof, NOW)
    public = replace(proof, private=private_digest(r.values, SALT), salt=b"")
    verify_record(anchor(zones), r.identifier.key, 1, [URL], public, NOW)
    # the digest is salted: the guess "owner@example.com" cannot be checked against it
    assert private_digest([SECRET], b"") != public.private != private_digest([], SALT)
    with refused("not those 88.100.1 signed"):  # a value withheld is noticed
        verify_record(anchor(zones), r.identifier.key, 1, [], public, NOW)
    with refused("private values given"):
        verify_record(anchor(zones), r.identifier.key, 1, r.values, public, NOW)


@pytest.mark.parametrize(
    "tampered",
    [
        [replace(URL, data=b"https://evil.example/a")],  # altered value
        [replace(URL, ttl=1)],  # altered TTL
        [replace(URL, timestamp=NOW + 1)],  # altered timestamp
        [URL, Value(3, "URL", b"https://evil.example/b", timestamp=NOW)],  # value added
        [replace(URL, index=9)],  # moved
    ],
)
def test_altered_values_are_refused(zones: dict[str, Zone], tampered: list[Value]) -> None:
    r = record("88.100.1/A", URL)
    [proof] = zones["88.100.1"].attest([r, record("88.100.1/B", URL)])[:1]
    proof.delegations = chain(zones)
    with refused("not those 88.100.1 signed"):
        verify_record(anchor(zones), r.identifier.key, 1, tampered, proof, NOW)


def test_another_version_or_another_identifier_is_refused(zones: dict[str, Zone]) -> None:
    r = record("88.100.1/A", URL, version=3)
    [proof] = zones["88.100.1"].attest([r])
    proof.delegations = chain(zones)
    with refused("not those"):  # an old version replayed as the current one
        verify_record(anchor(zones), r.identifier.key, 4, r.values, proof, NOW)
    with refused("not those"):  # another identifier's answer passed off
        verify_record(anchor(zones), "88.100.1/B", 3, r.values, proof, NOW)


def test_an_expired_attestation_replayed_is_refused(zones: dict[str, Zone]) -> None:
    r = record("88.100.1/A", URL)
    [proof] = zones["88.100.1"].attest([r], now=NOW, lifetime=DAY)
    proof.delegations = chain(zones)
    verify_record(anchor(zones), r.identifier.key, 1, r.values, proof, NOW + DAY - 1)
    with refused("expired"):
        verify_record(anchor(zones), r.identifier.key, 1, r.values, proof, NOW + DAY)
    with refused("not valid yet"):
        verify_record(anchor(zones), r.identifier.key, 1, r.values, proof, NOW - CLOCK_SKEW - 1)
    verify_record(anchor(zones), r.identifier.key, 1, r.values, proof, NOW - CLOCK_SKEW)  # a clock behind


def test_a_record_signed_by_a_siblings_key_is_refused(zones: dict[str, Zone]) -> None:
    r = record("88.100.1/A", URL)
    [forged] = zones["88.100.2"].attest([r])  # the sibling signs a record of 88.100.1
    forged.delegations = chain(zones, "88.100.2")
    with refused("outside the authority of 88.100.2"):
        verify_record(anchor(zones), r.identifier.key, 1, r.values, forged, NOW)
    forged.delegations = chain(zones, "88.100.1")  # with the right chain, the wrong issuer
    with refused("issued by '88.100.2' where the chain reaches 88.100.1"):
        verify_record(anchor(zones), r.identifier.key, 1, r.values, forged, NOW)
    # the sibling's key passed off as 88.100.1's (same key id)
    impostor = Zone("88.100.1")
    impostor.private = zones["88.100.2"].private
    [forged] = impostor.attest([r])
    forged.delegations = chain(zones)
    with refused("bad signature by key 'k1' of 88.100.1"):
        verify_record(anchor(zones), r.identifier.key, 1, r.values, forged, NOW)


def test_a_child_cannot_vouch_for_its_parents_names_or_its_siblings(zones: dict[str, Zone]) -> None:
    rogue = Zone("88.100.2", kid="rogue")
    own = chain(zones)
    # 88.100.1 signs a delegation of its sibling to a key of its own choosing
    with refused("delegation by 88.100.1 of '88.100.2', which is not below it"):
        chain_keys(anchor(zones), [*own, zones["88.100.1"].delegate(rogue)], NOW)
    # a statement by 88.100.1 naming its parent as the child
    upward = delegation("88.100.1", zones["88.100.1"].private, "k1", "88.100", [rogue.key], NOW, DAY)
    with refused("delegation by 88.100.1 of '88.100', which is not below it"):
        chain_keys(anchor(zones), [*own, upward], NOW)
    # and a record of the parent's signed with the child's key
    r = record("88.100/X", URL)
    [proof] = zones["88.100.1"].attest([r])
    proof.delegations = own
    with refused("outside the authority of 88.100.1"):
        verify_record(anchor(zones), r.identifier.key, 1, r.values, proof, NOW)


def test_a_forged_referral_is_refused(zones: dict[str, Zone]) -> None:
    rogue = Zone("88.100.1", kid="k1")  # a relay's own key for 88.100.1
    forged = delegation("88.100", rogue.private, "k1", "88.100.1", [rogue.key], NOW, DAY)
    with refused("bad signature by key 'k1' of 88.100"):
        chain_keys(anchor(zones), [zones["88"].delegate(zones["88.100"]), forged], NOW)
    with refused("key 'k9' is not in the chain of 88"):
        chain_keys(anchor(zones), [delegation("88", rogue.private, "k9", "88.100", [rogue.key], NOW, DAY)], NOW)
    with refused("not a JWS"):
        chain_keys(anchor(zones), ["garbage"], NOW)
    with refused("not below it"):  # the apex naming a prefix outside itself
        chain_keys(anchor(zones), [delegation("88", zones["88"].private, "k1", "99.1", [rogue.key], NOW, DAY)], NOW)


def test_a_rolled_over_key_overlaps_then_the_old_one_ends(zones: dict[str, Zone]) -> None:
    old, new = zones["88.100.1"], Zone("88.100.1", kid="k2")
    retiring = replace(old.key, expires=NOW + DAY)
    r = record("88.100.1/A", URL)
    listed = zones["88.100"].delegate(old, retiring, new.key)  # both listed while the key rolls
    for signer in (old, new):
        [proof] = signer.attest([r])
        proof.delegations = [zones["88"].delegate(zones["88.100"]), listed]
        verify_record(anchor(zones), r.identifier.key, 1, r.values, proof, NOW + 60)
    [proof] = old.attest([r])
    proof.delegations = [zones["88"].delegate(zones["88.100"]), listed]
    with refused("key 'k1' of 88.100.1 is not valid now"):
        verify_record(anchor(zones), r.identifier.key, 1, r.values, proof, NOW + DAY)
    # revoked: the parent's next delegation lists the new key alone; the old key's records fail
    proof.delegations = [zones["88"].delegate(zones["88.100"]), zones["88.100"].delegate(new, new.key)]
    with refused("key 'k1' is not in the chain of 88.100.1"):
        verify_record(anchor(zones), r.identifier.key, 1, r.values, proof, NOW + 60)


def test_a_validator_checks_signatures_once_yet_refuses_what_expired_or_was_revoked(zones: dict[str, Zone]) -> None:
    old, new = zones["88.100.1"], Zone("88.100.1", kid="k2")
    validator = Validator(anchor(zones))
    records = [record(f"88.100.1/{n}", URL) for n in range(3)]
    proofs = old.attest(records, lifetime=DAY)
    top = zones["88"].delegate(zones["88.100"])
    for r, proof in zip(records, proofs, strict=True):
        proof.delegations = [top, zones["88.100"].delegate(old, old.key, new.key)]
        validator.verify(r.identifier.key, 1, r.values, proof, NOW)
    assert len(validator._batches) == 1  # the batch's signature was checked once for the three
    tampered = [replace(URL, data=b"x")]
    with refused("not those 88.100.1 signed"):  # what is remembered is the root, not a verdict
        validator.verify(records[0].identifier.key, 1, tampered, proofs[0], NOW)
    with refused("expired"):
        validator.verify(records[0].identifier.key, 1, records[0].values, proofs[0], NOW + DAY)
    proofs[1].delegations = [top, zones["88.100"].delegate(new, new.key)]  # k1 revoked
    with refused("key 'k1' is not in the chain of 88.100.1"):
        validator.verify(records[1].identifier.key, 1, records[1].values, proofs[1], NOW + 60)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 70), data=st.data())
def test_every_leaf_proves_its_root_and_no_other_place(size: int, data: st.DataObject) -> None:
    leaves = [leaf_hash(f"88.1/{n}", 1, bytes(32), bytes(32)) for n in range(size)]
    root, paths = merkle_tree(leaves)
    for index, path in enumerate(paths):
        assert root_from_proof(leaves[index], index, size, path) == root
        assert len(path) <= (size - 1).bit_length()
    index = data.draw(st.integers(0, size - 1))
    other = data.draw(st.integers(0, size - 1).filter(lambda i: leaves[i] != leaves[index]) if size > 1 else st.none())
    if other is not None:  # a leaf's proof, claimed for another place, proves nothing
        with contextlib.suppress(Bogus):
            assert root_from_proof(leaves[index], other, size, paths[index]) != root
    with pytest.raises(Bogus):
        root_from_proof(leaves[index], index, size, [*paths[index], bytes(32)])


def test_a_single_record_tree_and_the_known_rfc_shape() -> None:
    a, b, c = (leaf_hash(f"88.1/{n}", 1, bytes(32), bytes(32)) for n in "abc")
    root, paths = merkle_tree([a])
    assert root == a and paths == [[]]
    root, paths = merkle_tree([a, b, c])

    def h(*parts: bytes) -> bytes:
        return hashlib.sha256(b"".join(parts)).digest()

    assert root == h(b"\x01", h(b"\x01", a, b), c)  # RFC 9162: split at the largest power of two
    assert paths[2] == [h(b"\x01", a, b)] and paths[0] == [b, c]


def test_a_nodes_stored_record_gives_the_leaf_of_its_values() -> None:
    from bench.dataset import registrations

    for n, (text, values) in enumerate(registrations("88.100.1", 50, timestamp=NOW)):
        r = Record(parse_identifier(text), (*values, SECRET) if n % 2 else tuple(values), 3)
        assert stored_leaf(r.identifier.key, 3, encode_record(r), SALT) == record_leaf(r, SALT)
    odd = Record(parse_identifier("88.1/ABS"), (replace(URL, ttl_type=TtlType.ABSOLUTE, ttl=4_000_000_000),), 1)
    assert stored_leaf("88.1/ABS", 1, encode_record(odd), b"s") == record_leaf(odd, b"s")  # decoded instead


def test_digests_cover_what_a_reader_is_shown() -> None:
    assert public_part([URL]) != public_part([replace(URL, permissions=Permission.PUBLIC_READ)])
    assert public_part([URL, SECRET]) == public_part([URL])  # the private value is not in it
    assert private_digest([URL], b"s") == private_digest([], b"s") != private_digest([], b"t")  # salted even so
    assert private_digest([SECRET], b"s") != private_digest([SECRET], b"t")


def test_a_relay_cannot_fold_a_private_value_into_the_salt(zones: dict[str, Zone]) -> None:
    r = record("88.100.1/P", URL, replace(SECRET, index=2), replace(SECRET, index=3, data=b"other"))
    [proof] = zones["88.100.1"].attest([r])
    proof.delegations = chain(zones)
    verify_record(anchor(zones), r.identifier.key, 1, r.values, proof, NOW)
    from resolver.attestation import value_bytes

    dropped = r.values[1]
    folded = SALT + len(value_bytes(dropped)).to_bytes(4, "big") + value_bytes(dropped)
    for salt in (folded, folded[:16]):  # the value hidden in a longer salt, or cut to the length
        with pytest.raises(Bogus):
            verify_record(
                anchor(zones), r.identifier.key, 1, [r.values[0], r.values[2]], replace(proof, salt=salt), NOW
            )


def test_a_reader_is_told_when_it_was_shown_the_public_values_only(zones: dict[str, Zone]) -> None:
    r = record("88.100.1/P", URL, SECRET)
    [proof] = zones["88.100.1"].attest([r])
    proof.delegations = chain(zones)
    assert verify_record(anchor(zones), r.identifier.key, 1, r.values, proof, NOW)[-1].keys[2] == "every value"
    public = replace(proof, private=private_digest(r.values, SALT), salt=b"")
    assert verify_record(anchor(zones), r.identifier.key, 1, [URL], public, NOW)[-1].keys[2] == "public values only"
    # the identifier as a reader writes it (prefix in another case) is the same record
    verify_record(anchor(zones), "88.100.1/P", 1, r.values, proof, NOW)


def test_a_remembered_chain_ends_with_the_keys_that_signed_it(zones: dict[str, Zone]) -> None:
    retiring = Zone("88", kid="k1", expires=NOW + DAY)
    z = {**zones, "88": retiring}
    validator = Validator(TrustAnchor("88", (retiring.key,)))
    r = record("88.100.1/A", URL)
    [proof] = zones["88.100.1"].attest([r], lifetime=30 * DAY)
    proof.delegations = chain(z)
    validator.verify(r.identifier.key, 1, r.values, proof, NOW)
    with refused("key 'k1' of 88 is not valid now"):  # the apex key that signed the chain ended
        validator.verify(r.identifier.key, 1, r.values, proof, NOW + DAY)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"nbf": NOW, "exp": NOW + 400 * DAY}, "at most"),  # a lifetime past the bound
        ({"nbf": NOW, "exp": float(NOW + DAY)}, "not an integer"),
        ({"nbf": True, "exp": NOW + DAY}, "not an integer"),
        ({"nbf": NOW, "exp": 2**70}, "not an integer"),
    ],
)
def test_statements_with_bad_validity_are_refused(
    zones: dict[str, Zone], claims: dict[str, object], reason: str
) -> None:
    from resolver.attestation import DELEGATION, sign_statement

    statement = sign_statement(
        {"typ": DELEGATION, "iss": "88", "sub": "88.100", "keys": [zones["88.100"].key.claim()], **claims},
        zones["88"].private,
        "k1",
    )
    with pytest.raises(Bogus, match=reason):
        chain_keys(anchor(zones), [statement], NOW + 60)


def test_hostile_statements_are_refused_without_crashing(zones: dict[str, Zone]) -> None:
    import base64

    deep = base64.urlsafe_b64encode(b"[" * 20000).rstrip(b"=").decode()
    good = chain(zones)[0]
    header, payload, signature = good.split(".")
    for text in (
        f"{deep}.{payload}.{signature}",  # nested too deep for the JSON parser
        f"{header}.{payload}.{signature}!",  # a character outside base64url
        f"{header}.{payload[:-1]}+.{signature}",  # "+" for "-": the same bytes spelled otherwise
        "x" * 20000,  # too long
    ):
        with pytest.raises(Bogus):
            chain_keys(anchor(zones), [text], NOW)
    with refused("at most 8 are followed"):
        chain_keys(anchor(zones), [good] * 9, NOW)


def test_a_validator_refuses_a_delegation_older_than_one_it_has_seen(zones: dict[str, Zone]) -> None:
    old, new = zones["88.100.1"], Zone("88.100.1", kid="k2")
    top = zones["88"].delegate(zones["88.100"])
    both = zones["88.100"].delegate(old, old.key, new.key, now=NOW)
    revoking = zones["88.100"].delegate(new, new.key, now=NOW + 10)  # k1 dropped
    r = record("88.100.1/A", URL)
    [by_old] = old.attest([r])
    [by_new] = new.attest([r])
    validator = Validator(anchor(zones))
    validator.verify(r.identifier.key, 1, r.values, replace(by_old, delegations=[top, both]), NOW + 20)
    validator.verify(r.identifier.key, 1, r.values, replace(by_new, delegations=[top, revoking]), NOW + 20)
    replayed = replace(by_old, delegations=[top, both])  # unexpired, but superseded: refused now
    with refused("delegation of 88.100.1 issued at 1800000000 is superseded by one of 1800000010, which no"):
        validator.verify(r.identifier.key, 1, r.values, replayed, NOW + 30)
    # a verifier with no memory accepts it until it expires: what the bound on lifetimes is for
    verify_record(anchor(zones), r.identifier.key, 1, r.values, replayed, NOW + 30)


def test_an_older_delegation_listing_no_dropped_key_is_still_accepted(zones: dict[str, Zone]) -> None:
    """The same keys signed again later (a re-signing, another server of the site) must not
    make the earlier copy, still served elsewhere, look like a revoked one."""
    child = zones["88.100.1"]
    top = zones["88"].delegate(zones["88.100"])
    earlier = zones["88.100"].delegate(child, child.key, now=NOW)
    later = zones["88.100"].delegate(child, child.key, now=NOW + 10)
    r = record("88.100.1/A", URL)
    [proof] = child.attest([r])
    validator = Validator(anchor(zones))
    validator.verify(r.identifier.key, 1, r.values, replace(proof, delegations=[top, later]), NOW + 20)
    steps = validator.verify(r.identifier.key, 1, r.values, replace(proof, delegations=[top, earlier]), NOW + 20)
    assert steps[2].issued == NOW
