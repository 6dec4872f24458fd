"""Who may change and read what, through the registry and the authority, without gRPC: admin data
(HS_ADMIN and every credential type) needs the *_ADMIN rights, write answers and idempotent
creates say nothing a caller may not read, rights are checked before anything that depends on
the record, and every stored value is one the node can read back (issue 8 items 3 and 5, issue 9
items 3 and 5)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodes.authority import Authority
from nodes.registry import Registry
from nodes.storage import RecordRow, Store
from nodes.trust.audit import Actor, Caller
from nodes.trust.authentication import Authenticator
from nodes.trust.permissions import Permissions, readable_part
from resolver.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidValue,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    VersionConflict,
)
from resolver.identifier import parse_identifier, parse_prefix
from resolver.record import (
    ADMIN_DATA_TYPES,
    ADMIN_TYPE,
    CREDENTIAL_TYPES,
    PUBKEY_TYPE,
    AdminGrant,
    AdminPermission,
    Limits,
    Permission,
    Record,
    Value,
    admin_value,
)
from resolver.signing import PUBKEY_TYPE as SIGNING_PUBKEY_TYPE
from resolver.signing import generate_key, pubkey_value
from resolver.wire import encode_record
from tests.engines import Opener

P = AdminPermission
URL = Value(1, "URL", b"https://example.com/1")
SECRET = Value(2, "PRICE", b"1234.00 CNY", permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE)
VALUE_RIGHTS = P.ADD_HANDLE | P.DELETE_HANDLE | P.ADD_VALUE | P.MODIFY_VALUE | P.REMOVE_VALUE
"""Every value right, and no admin right."""


def actor(identity: str) -> Actor:
    return Actor(Caller(parse_identifier(identity), 300), "ipv4:127.0.0.1:1", "Test")


ANCHOR = actor("88.100/ADMIN")  # the trust anchor: every right on the apex
CLERK = actor("88.100.2/CLERK")  # every value right on 88.100.2
KEEPER = actor("88.100.2/KEEPER")  # the clerk's rights and ADD_ADMIN
READER = actor("88.100.2/READER")  # ADD_HANDLE and READ_VALUE
NOBODY = actor("88.100.2/NOBODY")  # nothing
ADMIN = "88.100.2/ADMIN"  # every right on 88.100.2, granted before the identity exists


def unstamped(record: Record) -> list[Value]:
    """The values as the registrant wrote them (the node sets the timestamps)."""
    return [replace(v, timestamp=0) for v in record.values]


class Node:
    def __init__(self, store: Store, authority: Authority, registry: Registry) -> None:
        self.store, self.authority, self.registry = store, authority, registry

    async def stored(self, identifier: str) -> Record | None:
        try:
            answer = await self.authority.answer(parse_identifier(identifier))
        except NotFound:
            return None
        assert isinstance(answer, Record)
        return answer


@pytest.fixture
async def node(open_store: Opener) -> AsyncIterator[Node]:
    store = await open_store()
    apex = parse_prefix("88.100")
    authority = Authority(store, [apex], negative_ttl=60)
    await authority.load()
    authority.permissions = Permissions(authority.grants_on, [apex], ["88.100/ADMIN"], enforce=True)
    registry = Registry(authority, Limits(max_batch=10), clock=lambda: 1_800_000_000)
    grants = [
        AdminGrant("88.100.2/CLERK", 300, VALUE_RIGHTS),
        AdminGrant("88.100.2/KEEPER", 300, VALUE_RIGHTS | P.ADD_ADMIN),
        AdminGrant("88.100.2/READER", 300, P.ADD_HANDLE | P.READ_VALUE),
        AdminGrant(ADMIN, 0, P(0xFFF)),
    ]
    await authority.create_prefix("88.100.2", ANCHOR, grants)
    yield Node(store, authority, registry)
    await store.close()


def test_credential_types_are_one_set_and_admin_data() -> None:
    assert SIGNING_PUBKEY_TYPE == PUBKEY_TYPE
    assert {"HS_PUBKEY", "HS_SECKEY", "HS_CERT", "HS_SIGNATURE"} <= CREDENTIAL_TYPES
    assert CREDENTIAL_TYPES | {ADMIN_TYPE} == ADMIN_DATA_TYPES


async def test_value_rights_cannot_add_change_or_remove_an_administrators_key(node: Node) -> None:
    key = pubkey_value(generate_key())
    await node.registry.create(ADMIN, [URL, key], ANCHOR)
    mine = generate_key()
    refused = [
        (node.registry.add_values(ADMIN, [pubkey_value(mine, 301)], actor=CLERK), "ADD_VALUE|ADD_ADMIN"),
        (node.registry.modify_values(ADMIN, [pubkey_value(mine)], actor=CLERK), "MODIFY_VALUE|MODIFY_ADMIN"),
        (node.registry.modify_values(ADMIN, [pubkey_value(mine, 1)], actor=CLERK), "MODIFY_VALUE|ADD_ADMIN"),
        (node.registry.remove_values(ADMIN, [300], actor=CLERK), "REMOVE_VALUE|REMOVE_ADMIN"),
        (node.registry.delete(ADMIN, actor=CLERK), "DELETE_HANDLE|REMOVE_ADMIN"),
        # Kept as it is, a key is still touched: success would confirm a guess of it.
        (
            node.registry.replace(ADMIN, [Value(1, "URL", b"x"), key], actor=CLERK),
            "MODIFY_VALUE|REMOVE_VALUE|ADD_VALUE|MODIFY_ADMIN",
        ),
    ]
    for call, needed in refused:
        with pytest.raises(PermissionDenied, match=re.escape(f"88.100.2/CLERK does not hold {needed} on identifier")):
            await call
    stored = await node.stored(ADMIN)
    assert stored is not None and stored.version == 1 and unstamped(stored) == [URL, key]
    # Values that are not admin data stay the clerk's business.
    assert (await node.registry.add_values(ADMIN, [Value(2, "EMAIL", b"a@b")], actor=CLERK)).record.version == 2


@pytest.mark.parametrize("type_", sorted(ADMIN_DATA_TYPES))
async def test_creating_an_identifier_that_carries_admin_data_needs_add_admin(node: Node, type_: str) -> None:
    data = {
        PUBKEY_TYPE: pubkey_value(generate_key()).data,
        ADMIN_TYPE: admin_value(0, "88.100.2/CLERK", 300, P(0xFFF)).data,
    }.get(type_, b"credential")
    values = [URL, Value(300, type_, data)]
    with pytest.raises(PermissionDenied, match=re.escape("does not hold ADD_HANDLE|ADD_ADMIN on prefix 88.100.2")):
        await node.registry.create(ADMIN, values, CLERK)
    [item] = await node.registry.batch_create([(ADMIN, values)], CLERK)
    assert isinstance(item.error, PermissionDenied) and "ADD_ADMIN" in str(item.error)
    assert await node.stored(ADMIN) is None
    assert (await node.registry.create(ADMIN, values, KEEPER)).created


async def test_a_grant_to_an_identity_that_does_not_exist_gives_nothing(node: Node) -> None:
    # ADMIN holds every right on 88.100.2 by a grant, and is not registered: no one can sign as it.
    authenticator = Authenticator(node.authority.answer, {})
    with pytest.raises(Unauthenticated, match=r"identity 88\.100\.2/ADMIN is not registered"):
        await authenticator.public_key(parse_identifier(ADMIN), 300)
    # Creating it with ADD_HANDLE gives an identity without a key: still no one can sign as it...
    assert (await node.registry.create(ADMIN, [URL], CLERK)).created
    with pytest.raises(Unauthenticated, match="has no HS_PUBKEY value at index 300"):
        await authenticator.public_key(parse_identifier(ADMIN), 300)
    # ...and giving it one's own key is admin data.
    with pytest.raises(PermissionDenied, match="ADD_ADMIN"):
        await node.registry.add_values(ADMIN, [pubkey_value(generate_key())], actor=CLERK)
    with pytest.raises(Unauthenticated):
        await authenticator.public_key(parse_identifier(ADMIN), 300)


async def test_write_answers_hold_only_what_the_caller_may_read(node: Node) -> None:
    hidden = Value(3, "COST", b"99", permissions=Permission.ADMIN_READ)
    answers = [
        await node.registry.create("88.100.2/P-1", [URL, SECRET], CLERK),
        await node.registry.add_values("88.100.2/P-1", [hidden], actor=CLERK),
        await node.registry.modify_values(
            "88.100.2/P-1", [Value(3, "COST", b"98", permissions=Permission(0))], 0, CLERK
        ),
        await node.registry.replace("88.100.2/P-1", [URL, SECRET, hidden], actor=CLERK),
        await node.registry.remove_values("88.100.2/P-1", [3], actor=CLERK),
    ]
    assert [[v.index for v in a.record.values] for a in answers] == [[1]] * 5
    assert [a.record.version for a in answers] == [1, 2, 3, 4, 5]
    stored = await node.stored("88.100.2/P-1")
    assert stored is not None and [v.index for v in stored.values] == [1, 2]
    # READ_VALUE: the whole record, as a signed resolve would answer it.
    written = await node.registry.create("88.100.2/P-2", [URL, SECRET], READER)
    assert [v.index for v in written.record.values] == [1, 2]
    assert readable_part(written.record, READER.caller, node.authority.permissions) == written.record
    assert unstamped(readable_part(written.record, CLERK.caller, node.authority.permissions)) == [URL]
    assert unstamped(readable_part(written.record, None, node.authority.permissions)) == [URL]


async def test_an_idempotent_create_does_not_confirm_a_private_value(node: Node) -> None:
    await node.registry.create("88.100.2/P-1", [URL, SECRET], ANCHOR)
    guess = Value(2, "PRICE", b"9999.00 CNY", permissions=SECRET.permissions)
    # Without READ_VALUE: the right guess and a wrong one get the same answer.
    outcomes = []
    for values in ([URL, SECRET], [URL, guess]):
        with pytest.raises(AlreadyExists) as info:
            await node.registry.create("88.100.2/P-1", values, CLERK)
        outcomes.append(str(info.value))
        [item] = await node.registry.batch_create([("88.100.2/P-1", values)], CLERK)
        outcomes.append(str(item.error))
    assert len(set(outcomes)) == 1 and "already exists with other values" in outcomes[0]
    # What it may read is compared: its public values are the record's public values.
    same = await node.registry.create("88.100.2/P-1", [URL], CLERK)
    assert not same.created and unstamped(same.record) == [URL]
    # With READ_VALUE: the whole record is compared, and answered.
    again = await node.registry.create("88.100.2/P-1", [SECRET, URL], READER)
    assert not again.created and [v.index for v in again.record.values] == [1, 2]
    for values in ([URL, guess], [URL]):
        with pytest.raises(AlreadyExists):
            await node.registry.create("88.100.2/P-1", values, READER)


async def test_rights_are_checked_before_anything_that_depends_on_the_record(node: Node) -> None:
    await node.registry.create("88.100.2/P-1", [URL, SECRET], ANCHOR)
    missing = "88.100.2/MISSING"
    calls: list[tuple[Callable[[Actor], Awaitable[object]], type[Exception] | None]] = [
        (lambda who: node.registry.modify_values("88.100.2/P-1", [Value(7, "X", b"")], 0, who), NotFound),
        (lambda who: node.registry.modify_values("88.100.2/P-1", [Value(2, "X", b"")], 0, who), None),
        (lambda who: node.registry.remove_values("88.100.2/P-1", [7], 0, who), NotFound),
        (lambda who: node.registry.add_values("88.100.2/P-1", [Value(2, "X", b"")], 0, who), AlreadyExists),
        (lambda who: node.registry.replace("88.100.2/P-1", [URL], 9, who), VersionConflict),
        (lambda who: node.registry.modify_values(missing, [URL], 0, who), NotFound),
        (lambda who: node.registry.delete(missing, 0, who), NotFound),
    ]
    refusals = set()
    for call, with_rights in calls:
        with pytest.raises(PermissionDenied) as info:
            await call(NOBODY)
        refusals.add(str(info.value).split(" on ")[0])
        if with_rights is not None:  # the clerk holds the right: now the record may speak
            with pytest.raises(with_rights):
                await call(CLERK)
    assert refusals == {
        f"88.100.2/NOBODY does not hold {r}"
        for r in ("MODIFY_VALUE", "REMOVE_VALUE", "ADD_VALUE", "MODIFY_VALUE|REMOVE_VALUE|ADD_VALUE", "DELETE_HANDLE")
    }
    stored = await node.stored("88.100.2/P-1")
    assert stored is not None and stored.version == 1


def _p256_key_der() -> bytes:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


UNREADABLE = [
    (Value(100, ADMIN_TYPE, b"not json"), "HS_ADMIN data must be JSON"),
    (Value(100, ADMIN_TYPE, b'{"admin": "88.100.2/X", "index": 300}'), "HS_ADMIN data must be JSON"),
    (Value(100, ADMIN_TYPE, b"[" * 5000), "HS_ADMIN data must be JSON"),
    (Value(100, ADMIN_TYPE, b'{"admin": "no-slash", "index": 300, "permissions": 1}'), "HS_ADMIN admin"),
    (Value(100, ADMIN_TYPE, b'{"admin": "88.100.2/X", "index": -1, "permissions": 1}'), "out of range"),
    (Value(300, PUBKEY_TYPE, b"\x30\x03garbage"), "not a DER SubjectPublicKeyInfo"),
    (Value(300, PUBKEY_TYPE, _p256_key_der()), "not an Ed25519 key"),
]


@pytest.mark.parametrize(("bad", "message"), UNREADABLE)
async def test_every_write_path_refuses_a_value_the_node_could_not_read(node: Node, bad: Value, message: str) -> None:
    await node.registry.create("88.100.2/P-1", [URL, Value(bad.index, "NOTE", b"x")], ANCHOR)
    writes = [
        node.registry.create("88.100.2/P-2", [URL, bad], ANCHOR),
        node.registry.add_values("88.100.2/P-1", [Value(bad.index + 1, bad.type, bad.data)], actor=ANCHOR),
        node.registry.modify_values("88.100.2/P-1", [bad], actor=ANCHOR),
        node.registry.replace("88.100.2/P-1", [URL, bad], actor=ANCHOR),
    ]
    for write in writes:
        with pytest.raises(InvalidValue, match=message):
            await write
    [item] = await node.registry.batch_create([("88.100.2/P-3", [URL, bad])], ANCHOR)
    assert isinstance(item.error, InvalidValue) and message in str(item.error)
    assert await node.store.list_keys("88.100.2", "", 10) == ["88.100.2/P-1"]
    stored = await node.stored("88.100.2/P-1")
    assert stored is not None and stored.version == 1


async def test_a_stored_grant_that_cannot_be_read_grants_nothing_and_can_be_repaired(node: Node) -> None:
    # As a node that did not validate values could have stored it.
    broken = Record(parse_identifier("88.100.2/OLD"), (URL, Value(100, ADMIN_TYPE, b"garbage")), 1)
    await node.store.insert_many([RecordRow("88.100.2/OLD", 1, encode_record(broken))])
    assert readable_part(broken, READER.caller, node.authority.permissions) == broken  # a signed read
    with pytest.raises(InvalidValue, match="value 100: HS_ADMIN data must be JSON"):  # names the fix
        await node.registry.add_values("88.100.2/OLD", [Value(2, "EMAIL", b"a@b")], actor=ANCHOR)
    repaired = await node.registry.remove_values("88.100.2/OLD", [100], actor=ANCHOR)
    assert unstamped(repaired.record) == [URL] and repaired.record.version == 2
    await node.store.insert_many([RecordRow("88.100.2/OLD-2", 1, encode_record(broken))])
    assert await node.registry.delete("88.100.2/OLD-2", actor=ANCHOR) == 1


async def test_indexes_are_checked_before_anything_else(node: Node) -> None:
    await node.registry.create("88.100.2/P-1", [URL, SECRET], ANCHOR)
    for who in (ANCHOR, NOBODY):
        with pytest.raises(InvalidValue, match="value index 0 is out of range") as info:
            await node.registry.remove_values("88.100.2/P-1", [0], actor=who)
        assert info.value.field == "indexes"
        with pytest.raises(InvalidValue, match="value index 2 appears more than once"):
            await node.registry.remove_values("88.100.2/P-1", [2, 2], actor=who)
        with pytest.raises(InvalidValue, match="value index 0 is out of range"):
            await node.registry.modify_values("88.100.2/P-1", [Value(0, "URL", b"x")], actor=who)
        with pytest.raises(InvalidValue, match="no value indexes to remove"):
            await node.registry.remove_values("88.100.2/P-1", [], actor=who)
    stored = await node.stored("88.100.2/P-1")
    assert stored is not None and stored.version == 1


async def test_the_apex_is_invalid_to_create_whoever_asks(node: Node) -> None:
    for who in (ANCHOR, NOBODY, None):
        with pytest.raises(InvalidArgument, match=r"prefix 88\.100 is this node's apex"):
            await node.authority.create_prefix("88.100", who)
