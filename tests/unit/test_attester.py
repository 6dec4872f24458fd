"""A signing node's side of verifiable resolution, on real SQLite files: the registry signs
every write, the proofs it serves verify against the trust anchor (for anonymous readers and for
readers shown every value), hosted prefixes chain through the apex's own delegation, chains from
a parent are adopted only when they verify and list the node's key, and the background upkeep
re-signs, rebuilds (retiring changed records' leaves) and signs records written unsigned."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nodes.attesting import Attesting
from nodes.authority import Authority
from nodes.proofs import Proofs
from nodes.registry import Registry
from nodes.storage import RecordRow, Store
from nodes.trust.attester import Attester
from nodes.trust.zone_keys import ZoneKeys
from resolver.attestation import (
    Bogus,
    TrustAnchor,
    ZoneKey,
    delegation,
    inclusion_path,
    keys_from_json,
    keys_json,
    merkle_levels,
    merkle_tree,
    tree_blob,
    verify_record,
)
from resolver.errors import InvalidArgument
from resolver.identifier import parse_prefix
from resolver.record import Limits, Permission, Value
from resolver.wire import decode_record, encode_record
from tests.engines import Opener

APEX = "88.100"
DAY = 86_400


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_stored_trees_give_rfc9162_paths() -> None:
    for size in range(1, 70):
        leaves = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size)]
        root, paths = merkle_tree(leaves)
        tree = tree_blob(merkle_levels(leaves))
        assert tree[-32:] == root, size
        assert len(tree) <= 32 * (2 * size + size.bit_length())  # about 64 bytes a record
        assert [inclusion_path(tree, size, i) for i in range(size)] == paths, size


def test_zone_keys_in_a_delegation_request_are_checked() -> None:
    key = ZoneKey("k1", Ed25519PrivateKey.generate().public_key(), 0, 10)
    assert keys_from_json(keys_json([key])) == (key,)
    assert keys_from_json("") == ()
    for bad, reason in (
        ("not json", "zone keys"),
        ('{"jwk": 1}', "JSON list"),
        (keys_json([key] * 2), "share a key id"),
        (keys_json([ZoneKey(f"k{i}", key.public, 0, 10) for i in range(9)]), "at most 8"),
        ('[{"jwk": {"kty": "RSA", "kid": "r"}, "nbf": 0, "exp": 1}]', "Ed25519"),
    ):
        with pytest.raises(InvalidArgument, match=reason):
            keys_from_json(bad)


@dataclass
class Node:
    store: Store
    registry: Registry
    attester: Attester
    proofs: Proofs
    anchor: TrustAnchor
    clock: Clock
    changed: list[str]

    def upkeep(self) -> Attesting:
        return Attesting(
            self.attester,
            self.store,
            None,
            lambda: None,
            3600.0,
            lambda: [APEX, "88.100.2"],
            self.changed.extend,
            self.proofs.forget,
        )


@pytest.fixture
async def node(tmp_path: Path, open_store: Opener) -> AsyncIterator[Node]:
    clock = Clock()
    store = await open_store()
    authority = Authority(store, [parse_prefix(APEX)], 60)
    await authority.load()
    registry = Registry(authority, Limits(), clock=clock)
    await authority.create_prefix("88.100.2")
    attester = Attester(ZoneKeys(tmp_path / "keys"), [APEX], None, lifetime=30 * DAY, clock=clock)
    registry.attester = attester
    anchor = TrustAnchor(APEX, tuple(attester.published(APEX)))  # the apex is the anchor here
    try:
        yield Node(store, registry, attester, Proofs(store, attester), anchor, clock, [])
    finally:
        await store.close()


PUBLIC = Value(1, "URL", b"https://f.example/1")
PRIVATE = Value(2, "EMAIL", b"ops@f.example", permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE)


async def proved(node: Node, key: str, everything: bool = False) -> list[str]:
    """The chain that vouches for the stored record ``key`` as a reader sees it."""
    row = await node.store.get(key)
    assert row is not None
    [proof] = await node.proofs.of_rows([row], [everything])
    assert proof is not None
    record = decode_record(row.record)
    values = record.values if everything else tuple(v for v in record.values if v.publicly_readable)
    steps = verify_record(node.anchor, key, row.version, values, proof, int(node.clock()))
    return [s.prefix for s in steps]


async def test_every_write_is_signed_and_proved(node: Node) -> None:
    items = [(f"{APEX}/B-{i}", [PUBLIC, PRIVATE]) for i in range(5)] + [("88.100.2/P-1", [PUBLIC])]
    results = await node.registry.batch_create(items)
    assert all(r.error is None for r in results)
    assert await proved(node, f"{APEX}/B-3") == [APEX, f"{APEX}/B-3"]
    assert await proved(node, f"{APEX}/B-3", everything=True) == [APEX, f"{APEX}/B-3"]
    # A prefix hosted below the apex: the apex's delegation of it, signed by this node.
    assert await proved(node, "88.100.2/P-1") == [APEX, "88.100.2", "88.100.2/P-1"]
    # Single writes, and a new version: signed too, the old proof no longer the row's.
    await node.registry.create(f"{APEX}/ONE", [PUBLIC])
    await node.registry.add_values(f"{APEX}/B-3", [Value(3, "DESC", b"v2")])
    assert await proved(node, f"{APEX}/ONE") == [APEX, f"{APEX}/ONE"]
    row = await node.store.get(f"{APEX}/B-3")
    assert row is not None and row.version == 2 and row.leaf == 0
    assert await proved(node, f"{APEX}/B-3") == [APEX, f"{APEX}/B-3"]


async def test_a_retry_signs_only_the_items_created(node: Node) -> None:
    await node.registry.batch_create([(f"{APEX}/R-1", [PUBLIC])])
    results = await node.registry.batch_create([(f"{APEX}/R-{i}", [PUBLIC]) for i in range(3)])
    assert [r.created for r in results] == [True, False, True]
    for key in (f"{APEX}/R-0", f"{APEX}/R-1", f"{APEX}/R-2"):
        assert await proved(node, key) == [APEX, key]
    row = await node.store.get(f"{APEX}/R-2")
    assert row is not None and row.leaf == 1  # the new tree holds the two created, not the retry


async def test_trees_are_re_signed_before_they_expire_and_rebuilt_without_changed_records(node: Node) -> None:
    await node.registry.batch_create([(f"{APEX}/E-{i}", [PUBLIC]) for i in range(4)])
    old = await node.store.get(f"{APEX}/E-1")
    assert old is not None
    await node.registry.replace(f"{APEX}/E-2", [Value(1, "URL", b"https://f.example/v2")])
    node.clock.now += 25 * DAY  # within the last quarter of 30 days
    upkeep = node.upkeep()
    assert len(await upkeep.resign_due()) >= 1
    node.clock.now += 10 * DAY  # past the first statements: only re-signed ones verify
    assert await proved(node, f"{APEX}/E-1") == [APEX, f"{APEX}/E-1"]
    assert await proved(node, f"{APEX}/E-3") == [APEX, f"{APEX}/E-3"]
    assert await proved(node, f"{APEX}/E-2") == [APEX, f"{APEX}/E-2"]  # its own tree, re-signed too
    # The rebuilt tree no longer proves E-2's first version.
    tree = (await node.proofs.trees([old.attestation or 0]))[old.attestation or 0].signed
    first = encode_record(decode_record(old.record))
    stale = RecordRow(f"{APEX}/E-2", 1, first, old.attestation, 2)
    [proof] = await node.proofs.of_rows([stale], [False])
    assert proof is not None and tree.size == 4
    values = tuple(v for v in decode_record(first).values if v.publicly_readable)
    with pytest.raises(Bogus, match="values are not those"):
        verify_record(node.anchor, stale.key, 1, values, proof, int(node.clock()))


async def test_records_written_unsigned_are_signed_in_the_background(node: Node) -> None:
    node.registry.attester = None
    await node.registry.batch_create([(f"{APEX}/U-{i}", [PUBLIC]) for i in range(5)])
    node.registry.attester = node.attester
    row = await node.store.get(f"{APEX}/U-0")
    assert row is not None and row.attestation is None
    upkeep = node.upkeep()
    assert await upkeep.attest_unsigned(APEX, batch=2) == 5
    assert sorted(node.changed) == [f"{APEX}/U-{i}" for i in range(5)]  # cached answers forgotten
    for i in range(5):
        assert await proved(node, f"{APEX}/U-{i}") == [APEX, f"{APEX}/U-{i}"]
    assert await upkeep.attest_unsigned(APEX) == 0


async def test_a_rolled_key_re_signs_what_the_old_one_signed(node: Node) -> None:
    await node.registry.batch_create([(f"{APEX}/K-{i}", [PUBLIC]) for i in range(3)])
    node.attester.keys.roll(APEX, int(node.clock()), overlap=0)
    node.clock.now += 61  # the attester reads the key files again
    anchor = TrustAnchor(APEX, tuple(node.attester.published(APEX)))
    assert [k.kid for k in anchor.keys] == ["k2"]
    node.anchor = anchor
    with pytest.raises(Bogus, match="'k1' is not in the chain"):
        await proved(node, f"{APEX}/K-0")
    assert len(await node.upkeep().resign_due()) == 1
    assert await proved(node, f"{APEX}/K-0") == [APEX, f"{APEX}/K-0"]


def test_a_parents_chain_is_adopted_only_when_it_verifies_and_lists_the_key(tmp_path: Path) -> None:
    clock = Clock()
    now = int(clock())
    top_key = Ed25519PrivateKey.generate()
    anchor = TrustAnchor("88", (ZoneKey("t1", top_key.public_key(), now - 10, now + DAY),))
    attester = Attester(ZoneKeys(tmp_path / "keys"), [APEX], anchor, clock=clock)
    ours = attester.published(APEX)
    stranger = [ZoneKey("k1", Ed25519PrivateKey.generate().public_key(), now - 10, now + DAY)]
    with pytest.raises(Bogus, match="lists none of its signing keys"):
        attester.set_upstream(APEX, [delegation("88", top_key, "t1", APEX, stranger, now, DAY)])
    with pytest.raises(Bogus, match=r"reach 88\.200"):
        attester.set_upstream(APEX, [delegation("88", top_key, "t1", "88.200", ours, now, DAY)])
    forged = Ed25519PrivateKey.generate()
    with pytest.raises(Bogus, match="bad signature"):
        attester.set_upstream(APEX, [delegation("88", forged, "t1", APEX, ours, now, DAY)])
    assert attester.chain(APEX) == []  # nothing adopted
    good = [delegation("88", top_key, "t1", APEX, ours, now, DAY)]
    assert attester.set_upstream(APEX, good) == now + DAY
    assert attester.chain(APEX) == good
    assert attester.chain("88.100.7")[:1] == good  # hosted below: the apex's chain, then its own
    # A key rolled in signs only once the parent's delegation lists it.
    attester.keys.roll(APEX, now, overlap=DAY)
    clock.now += 61
    assert attester.signing_key(APEX).kid == "k1"
    both = attester.published(APEX)
    assert [k.kid for k in both] == ["k1", "k2"]
    attester.set_upstream(APEX, [delegation("88", top_key, "t1", APEX, both, now + 61, DAY)])
    assert attester.signing_key(APEX).kid == "k2"


def test_delegations_are_signed_again_when_the_keys_change_and_denials_are_bounded(tmp_path: Path) -> None:
    clock = Clock()
    attester = Attester(ZoneKeys(tmp_path / "keys"), [APEX], None, denials_per_second=1, clock=clock)
    now = int(clock())
    one = [ZoneKey("a", Ed25519PrivateKey.generate().public_key(), now, now + DAY)]
    two = [*one, ZoneKey("b", Ed25519PrivateKey.generate().public_key(), now, now + DAY)]
    first = attester.delegate(APEX, "88.100.1", one)
    assert attester.delegate(APEX, "88.100.1", one) == first  # signed once
    assert attester.delegate(APEX, "88.100.1", two) != first
    assert attester.denial(APEX, f"{APEX}/X", 60) is not None
    assert attester.denial(APEX, f"{APEX}/Y", 60) is None  # over the node's rate: unsigned
    assert attester.salt(f"{APEX}/X", 1) == attester.salt(f"{APEX}/X", 1) != attester.salt(f"{APEX}/X", 2)
