"""Authority and registration rules, exercised without gRPC on a real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from nodes.authority import Authority, PrefixKind
from nodes.registry import Registry
from nodes.storage import Store
from nodes.trust.audit import Actor, Caller
from nodes.trust.permissions import Permissions
from resolver.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    InvalidIdentifier,
    InvalidValue,
    LimitExceeded,
    NotAuthoritative,
    NotFound,
    PermissionDenied,
    PrefixNotHosted,
    Unauthenticated,
    VersionConflict,
)
from resolver.identifier import parse_identifier, parse_prefix
from resolver.record import AdminGrant, AdminPermission, Limits, Record, Value
from resolver.site import Referral, make_site
from resolver.wire import record_pb2, registration_pb2, value_to_pb
from tests.engines import Opener


class Node:
    def __init__(self, store: Store, authority: Authority, registry: Registry, changed: list[str]) -> None:
        self.store, self.authority, self.registry, self.changed = store, authority, registry, changed


@pytest.fixture
async def node(open_store: Opener) -> AsyncIterator[Node]:
    store = await open_store()
    authority = Authority(store, [parse_prefix("88.100")], negative_ttl=60)
    await authority.load()
    changed: list[str] = []
    registry = Registry(authority, Limits(max_batch=10), on_change=changed.extend, clock=lambda: 1_800_000_000)
    await authority.create_prefix("88.100.2")
    await authority.delegate_prefix("88.100.1", make_site(["127.0.0.1:2643"]), 600)
    node = Node(store, authority, registry, changed)
    yield node
    await node.store.close()  # a test may have reopened it


URL = Value(1, "URL", b"https://example.com/1")
EMAIL = Value(2, "EMAIL", b"ops@example.com")


async def test_answers_follow_the_longest_known_prefix(node: Node) -> None:
    await node.registry.create("88.100.2/P-1", [URL])
    answer = await node.authority.answer(parse_identifier("88.100.2/P-1"))
    assert isinstance(answer, Record) and answer.values[0].data == URL.data
    referral = await node.authority.answer(parse_identifier("88.100.1.7/anything"))
    assert isinstance(referral, Referral) and str(referral.prefix) == "88.100.1" and referral.ttl == 600
    with pytest.raises(NotFound, match=r"identifier 88\.100\.2/P-2 not found") as info:
        await node.authority.answer(parse_identifier("88.100.2/P-2"))
    assert info.value.negative_ttl == 60
    with pytest.raises(NotFound, match=r"prefix 88\.100\.9 is not allocated under 88\.100"):
        await node.authority.answer(parse_identifier("88.100.9/x"))
    with pytest.raises(NotAuthoritative, match=r"outside this node's authority \(88.100\)"):
        await node.authority.answer(parse_identifier("88.200/x"))


async def test_create_is_idempotent_for_identical_values(node: Node) -> None:
    first = await node.registry.create("88.100.2/P-1", [URL, EMAIL])
    again = await node.registry.create("88.100.2/P-1", [EMAIL, URL])
    assert first.created and not again.created
    assert again.record.version == 1
    with pytest.raises(AlreadyExists, match="already exists with other values"):
        await node.registry.create("88.100.2/P-1", [URL])


async def test_case_variant_of_the_prefix_is_the_same_identifier(open_store: Opener) -> None:
    store = await open_store()
    try:
        authority = Authority(store, [parse_prefix("88.A")], 60)
        await authority.load()
        registry = Registry(authority, Limits())
        await registry.create("88.A/x", [URL])
        with pytest.raises(AlreadyExists, match=r"88\.A/x already exists"):
            await registry.create("88.a/x", [URL])
        found = await authority.answer(parse_identifier("88.a/x"))
        assert isinstance(found, Record) and str(found.identifier) == "88.A/x"
    finally:
        await store.close()


async def test_versions_guard_concurrent_writers(node: Node) -> None:
    await node.registry.create("88.100.2/P-1", [URL])
    replaced = await node.registry.replace("88.100.2/P-1", [URL, EMAIL], expected_version=1)
    assert replaced.record.version == 2
    with pytest.raises(VersionConflict, match="is at version 2, not the expected 1"):
        await node.registry.replace("88.100.2/P-1", [URL], expected_version=1)
    stored = await node.authority.answer(parse_identifier("88.100.2/P-1"))
    assert isinstance(stored, Record) and len(stored.values) == 2


async def test_concurrent_replaces_all_land_with_distinct_versions(node: Node) -> None:
    await node.registry.create("88.100.2/P-1", [URL])
    results = await asyncio.gather(
        *(node.registry.replace("88.100.2/P-1", [Value(1, "URL", f"u{i}".encode())]) for i in range(20))
    )
    assert sorted(r.record.version for r in results) == list(range(2, 22))
    stored = await node.authority.answer(parse_identifier("88.100.2/P-1"))
    assert isinstance(stored, Record) and stored.version == 21


async def test_value_operations(node: Node) -> None:
    await node.registry.create("88.100.2/P-1", [URL])
    added = await node.registry.add_values("88.100.2/P-1", [EMAIL])
    assert [v.index for v in added.record.values] == [1, 2]
    with pytest.raises(AlreadyExists, match="already has a value at index 2"):
        await node.registry.add_values("88.100.2/P-1", [EMAIL])
    modified = await node.registry.modify_values("88.100.2/P-1", [Value(2, "EMAIL", b"new@example.com")])
    assert modified.record.value(2) == Value(2, "EMAIL", b"new@example.com", timestamp=1_800_000_000)
    with pytest.raises(NotFound, match="no value at index 9"):
        await node.registry.modify_values("88.100.2/P-1", [Value(9, "X", b"")])
    removed = await node.registry.remove_values("88.100.2/P-1", [2])
    assert [v.index for v in removed.record.values] == [1]
    with pytest.raises(InvalidValue, match="empty record; delete it instead"):
        await node.registry.remove_values("88.100.2/P-1", [1])
    assert removed.record.version == 4


async def test_rejected_writes_change_nothing(node: Node) -> None:
    bad = [
        ("88.100.2/", [URL], InvalidIdentifier),
        ("88.100.2/P-1", [URL, URL], InvalidValue),
        ("88.100.2/P-1", [Value(1, "URL", b"x" * 70000)], InvalidValue),
        ("88.100.2/P-1", [], InvalidValue),
        ("88.100.7/P-1", [URL], PrefixNotHosted),
        ("88.100.1/P-1", [URL], NotAuthoritative),
        ("88.200/P-1", [URL], NotAuthoritative),
    ]
    for identifier, values, error in bad:
        with pytest.raises(error):
            await node.registry.create(identifier, values)
    assert await node.store.list_keys("88.100.2", "", 10) == []
    assert node.changed == []


async def test_delete(node: Node) -> None:
    await node.registry.create("88.100.2/P-1", [URL])
    with pytest.raises(VersionConflict):
        await node.registry.delete("88.100.2/P-1", expected_version=5)
    assert await node.registry.delete("88.100.2/P-1") == 1
    with pytest.raises(NotFound):
        await node.registry.delete("88.100.2/P-1")
    assert node.changed == ["88.100.2/P-1", "88.100.2/P-1"]


async def test_batch_items_succeed_or_fail_on_their_own(node: Node) -> None:
    await node.registry.create("88.100.2/EXISTS", [URL])
    results = await node.registry.batch_create(
        [
            ("88.100.2/NEW-1", [URL]),
            ("88.100.2/EXISTS", [URL]),  # identical: success, not created
            ("88.100.2/EXISTS", [EMAIL]),  # duplicate within the batch
            ("88.100.2/", [URL]),
            ("88.100.7/X", [URL]),
            ("88.100.2/NEW-2", [URL, EMAIL]),
        ]
    )
    assert [(r.created, type(r.error).__name__ if r.error else None) for r in results] == [
        (True, None),
        (False, None),
        (False, "InvalidValue"),
        (False, "InvalidIdentifier"),
        (False, "PrefixNotHosted"),
        (True, None),
    ]
    assert await node.store.list_keys("88.100.2", "", 10) == ["88.100.2/EXISTS", "88.100.2/NEW-1", "88.100.2/NEW-2"]
    with pytest.raises(LimitExceeded, match="batch of 11 items; the limit is 10"):
        await node.registry.batch_create([(f"88.100.2/B-{i}", [URL]) for i in range(11)])
    assert len(await node.store.list_keys("88.100.2", "", 100)) == 3


async def test_batch_replace_and_delete_give_a_result_per_item_in_one_transaction(node: Node) -> None:
    for n in range(3):
        await node.registry.create(f"88.100.2/R-{n}", [URL])
    node.changed.clear()
    results = await node.registry.batch_replace(
        [
            ("88.100.2/R-0", [EMAIL]),
            ("88.100.2/MISSING", [EMAIL]),
            ("88.100.2/R-1", []),  # no values: refused, as Replace refuses it
            ("88.100.7/X", [EMAIL]),
            ("88.100.2/R-2", [URL, EMAIL]),
        ]
    )
    assert [(r.version, type(r.error).__name__ if r.error else None) for r in results] == [
        (2, None),
        (0, "NotFound"),
        (0, "InvalidValue"),
        (0, "PrefixNotHosted"),
        (2, None),
    ]
    assert node.changed == ["88.100.2/R-0", "88.100.2/R-2"]
    stored = await node.authority.answer(parse_identifier("88.100.2/R-1"))
    assert isinstance(stored, Record) and stored.version == 1 and stored.values[0].data == URL.data
    deleted = await node.registry.batch_delete(["88.100.2/R-0", "88.100.2/R-0", "88.100.2/", "88.100.2/R-1"])
    assert [(r.version, type(r.error).__name__ if r.error else None) for r in deleted] == [
        (2, None),
        (0, "NotFound"),  # deleted by the item before it, in the same transaction
        (0, "InvalidIdentifier"),
        (1, None),
    ]
    assert await node.store.list_keys("88.100.2", "", 10) == ["88.100.2/R-2"]
    with pytest.raises(LimitExceeded, match="batch of 11 items"):
        await node.registry.batch_delete([f"88.100.2/R-{i}" for i in range(11)])
    with pytest.raises(LimitExceeded, match="batch of 11 items"):
        await node.registry.batch_replace([(f"88.100.2/R-{i}", [URL]) for i in range(11)])
    assert await node.store.list_keys("88.100.2", "", 10) == ["88.100.2/R-2"]


async def test_batch_requests_keep_an_undecodable_items_error_in_its_place(node: Node) -> None:
    """A client sending values that do not decode (an unknown ttl_type, unknown permission bits)
    gets that item's error where the item was; the items around it are created or replaced."""
    await node.registry.create("88.100.2/Q-1", [URL])

    def request(*items: tuple[str, list[record_pb2.Value]]) -> registration_pb2.BatchCreateRequest:
        return registration_pb2.BatchCreateRequest(
            items=[registration_pb2.CreateRequest(identifier=i, values=v) for i, v in items]
        )

    good = [value_to_pb(EMAIL)]
    bad_ttl = [record_pb2.Value(index=1, type="URL", data=b"u", ttl_type=cast(Any, 7))]  # not a TtlType
    bad_bits = [record_pb2.Value(index=1, type="URL", data=b"u", permissions=0x30)]
    created = await node.registry.batch_create_request(
        request(("88.100.2/Q-2", good), ("88.100.2/Q-3", bad_ttl), ("88.100.2/Q-4", good))
    )
    assert [(r.version, r.created, type(r.error).__name__ if r.error else None) for r in created] == [
        (1, True, None),
        (0, False, "InvalidValue"),
        (1, True, None),
    ]
    assert created[1].error is not None and "unknown ttl_type 7" in str(created[1].error)
    replaced = await node.registry.batch_replace_request(
        request(("88.100.2/Q-1", bad_bits), ("88.100.2/Q-2", [value_to_pb(URL)]))
    )
    assert [(r.version, type(r.error).__name__ if r.error else None) for r in replaced] == [
        (0, "InvalidValue"),
        (2, None),
    ]
    assert await node.store.list_keys("88.100.2", "", 10) == ["88.100.2/Q-1", "88.100.2/Q-2", "88.100.2/Q-4"]
    kept = await node.authority.answer(parse_identifier("88.100.2/Q-1"))
    assert isinstance(kept, Record) and kept.version == 1  # the refused replacement changed nothing
    with pytest.raises(LimitExceeded, match="batch of 11 items"):
        await node.registry.batch_replace_request(request(*[(f"88.100.2/Q-{i}", good) for i in range(11)]))


async def test_prefix_administration_rules(node: Node) -> None:
    with pytest.raises(InvalidArgument, match="is this node's apex"):  # issue 9, item 5
        await node.authority.create_prefix("88.100")
    with pytest.raises(InvalidArgument, match="is this node's apex"):
        await node.authority.delegate_prefix("88.100", make_site(["127.0.0.1:1"]), 0)
    with pytest.raises(NotAuthoritative):
        await node.authority.create_prefix("88.200.1")
    with pytest.raises(NotAuthoritative, match="delegated elsewhere"):
        await node.authority.create_prefix("88.100.1.5")
    with pytest.raises(AlreadyExists, match="is delegated"):
        await node.authority.create_prefix("88.100.1")
    assert (await node.authority.create_prefix("88.100.2")).kind is PrefixKind.HOSTED  # idempotent
    await node.registry.create("88.100.2/P-1", [URL])
    with pytest.raises(FailedPrecondition, match="hosts 1 identifiers"):
        await node.authority.delegate_prefix("88.100.2", make_site(["127.0.0.1:1"]), 0)
    moved = await node.authority.delegate_prefix("88.100.1", make_site(["127.0.0.1:9"]), 0)
    assert moved.ttl == 86400 and moved.site is not None and moved.site.servers[0].address == "127.0.0.1:9"


async def test_prefix_table_survives_a_reopen(node: Node, open_store: Opener) -> None:
    await node.store.close()
    store = await open_store()
    try:
        authority = Authority(store, [parse_prefix("88.100")], 60)
        await authority.load()
        kinds = {str(e.prefix): e.kind for e in authority.entries()}
        assert kinds == {"88.100": PrefixKind.HOSTED, "88.100.1": PrefixKind.DELEGATED, "88.100.2": PrefixKind.HOSTED}
    finally:
        await store.close()
        node.store = await open_store()


class Administered:
    """A node enforcing permissions: 88.100.5 (ADD_NA granted to ADDER) hosting 88.100.5.1 with
    one identifier, and 88.100.6 delegated; every prefix change it tells is in ``changed``."""

    def __init__(self, store: Store, authority: Authority, registry: Registry, changed: list[str]) -> None:
        self.store, self.authority, self.registry, self.changed = store, authority, registry, changed
        self.anchor = Actor(Caller(parse_identifier("88.100/ADMIN"), 300), "test", "RemovePrefix")
        self.adder = Actor(Caller(parse_identifier("88.100/ADDER"), 300), "test", "RemovePrefix")

    def table(self) -> list[tuple[str, PrefixKind]]:
        return [(e.prefix.key, e.kind) for e in self.authority.entries()]


@pytest.fixture
async def administered(open_store: Opener) -> AsyncIterator[Administered]:
    store = await open_store()
    apex = parse_prefix("88.100")
    changed: list[str] = []
    authority = Authority(store, [apex], 60, on_prefix_change=changed.append)
    await authority.load()
    authority.permissions = Permissions(authority.grants_on, [apex], ["88.100/ADMIN"], enforce=True)
    node = Administered(store, authority, Registry(authority, Limits(max_batch=10)), changed)
    grants = [AdminGrant("88.100/ADDER", 300, AdminPermission.ADD_NA)]
    await authority.create_prefix("88.100.5", node.anchor, grants)
    await authority.create_prefix("88.100.5.1", node.adder)  # ADD_NA on 88.100.5
    await authority.delegate_prefix("88.100.6", make_site(["127.0.0.1:9"]), 0, node.anchor)
    await node.registry.create("88.100.5.1/P-1", [URL], node.anchor)
    changed.clear()
    yield node
    await store.close()


async def test_remove_prefix_refusals_change_nothing(administered: Administered) -> None:
    """An apex, an unknown prefix, one with sub-prefixes or identifiers, a caller without
    DELETE_NA on the parent (ADD_NA is not enough), an unsigned caller: refused, nothing changes."""
    node, anchor = administered, administered.anchor
    before = node.table()
    with pytest.raises(InvalidArgument, match="is this node's apex"):
        await node.authority.remove_prefix("88.100", anchor)
    with pytest.raises(NotFound, match=r"prefix 88\.100\.7 is neither hosted nor delegated"):
        await node.authority.remove_prefix("88.100.7", anchor)
    with pytest.raises(NotAuthoritative, match="outside this node's authority"):
        await node.authority.remove_prefix("88.200.1", anchor)
    with pytest.raises(FailedPrecondition, match=r"88\.100\.5 has 1 sub-prefixes on this node \(88\.100\.5\.1\)"):
        await node.authority.remove_prefix("88.100.5", anchor)
    with pytest.raises(FailedPrecondition, match=r"88\.100\.5\.1 hosts 1 identifiers"):
        await node.authority.remove_prefix("88.100.5.1", anchor)
    with pytest.raises(PermissionDenied, match=r"does not hold DELETE_NA on prefix 88\.100\.5"):
        await node.authority.remove_prefix("88.100.5.1", node.adder)
    with pytest.raises(Unauthenticated):
        await node.authority.remove_prefix("88.100.6")
    assert node.table() == before and node.changed == []
    await node.authority.refresh_counts()  # the store too
    assert node.table() == before


async def test_remove_prefix(administered: Administered) -> None:
    """A delegated prefix goes with its referral; a hosted one once it is empty; the caches are
    told, the removal is audited, and the store agrees with the table in memory."""
    node, anchor = administered, administered.anchor
    removed = await node.authority.remove_prefix("88.100.6", anchor)
    assert removed.kind is PrefixKind.DELEGATED and removed.site is not None
    assert node.changed == ["88.100.6"] and node.authority.entry(parse_prefix("88.100.6")) is None
    with pytest.raises(NotFound, match=r"prefix 88\.100\.6 is not allocated"):
        await node.authority.answer(parse_identifier("88.100.6/x"))  # no referral any more
    await node.registry.delete("88.100.5.1/P-1", 0, anchor)
    assert (await node.authority.remove_prefix("88.100.5.1", anchor)).kind is PrefixKind.HOSTED
    assert (await node.authority.remove_prefix("88.100.5", anchor)).prefix.key == "88.100.5"
    await node.authority.refresh_counts()
    assert node.table() == [("88.100", PrefixKind.HOSTED)]
    audit = [(r.target, r.detail) for _, r in await node.store.list_audit("88.100", limit=100)]
    assert ("88.100.6", "removed (delegated)") in audit and ("88.100.5", "removed (hosted)") in audit
