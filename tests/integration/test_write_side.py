"""The write side of a real node that requires signatures: value rights cannot make anyone an
administrator, writes say nothing of values the writer may not read, nothing is stored that the
node could not read back, and bad requests get INVALID_ARGUMENT (issue 8 items 3 and 5, issue 9
items 3 and 5). Each test failed on the code before its fix."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from resolver.errors import AlreadyExists, InvalidArgument, PermissionDenied, Unauthenticated
from resolver.record import AdminPermission, Permission, Value, admin_value
from resolver.registrar import Registrar
from resolver.resolver import Resolver
from resolver.signing import Signer, generate_key, pubkey_value
from tests.engines import ENGINES
from tests.integration.conftest import Cluster
from tests.integration.test_trust import start_signed_node

pytestmark = pytest.mark.parametrize("store_engine", ENGINES)

P = AdminPermission
URL = Value(1, "URL", b"https://example.com")
SECRET = Value(2, "PRICE", b"1234.00 CNY", permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE)
VALUE_RIGHTS = P.ADD_HANDLE | P.DELETE_HANDLE | P.ADD_VALUE | P.MODIFY_VALUE | P.REMOVE_VALUE
ADMIN, GHOST = "88.7.1/ADMIN", "88.7.1/GHOST"  # both hold every right on 88.7.1; GHOST is not registered


@dataclass
class Node:
    address: str
    anchor: Registrar  # 88.7/ADMIN, the node's trust anchor
    clerk: Registrar  # 88.7.1/CLERK: every value right on 88.7.1, no admin right
    nobody: Registrar  # 88.7.1/NOBODY: registered, no right at all

    def signed_by(self, signer: Signer) -> Registrar:
        return Registrar(node=self.address, signer=signer)


@pytest.fixture
async def node(cluster: Cluster) -> AsyncIterator[Node]:
    address, anchor_signer = await start_signed_node(cluster, "write-side", "88.7", {})
    anchor = Registrar(node=address, signer=anchor_signer)
    clerk, nobody = Signer("88.7.1/CLERK", generate_key()), Signer("88.7.1/NOBODY", generate_key())
    grants = [
        admin_value(1, clerk.identity, 300, VALUE_RIGHTS),
        admin_value(2, ADMIN, 300, P(0xFFF)),
        admin_value(3, GHOST, 300, P(0xFFF)),
    ]
    await anchor.create_prefix("88.7.1", admins=grants)
    for signer in (clerk, nobody):
        await anchor.create(signer.identity, [pubkey_value(signer.key)])
    await anchor.create(ADMIN, [URL, pubkey_value(generate_key())])
    registrars = Node(address, anchor, Registrar(node=address, signer=clerk), Registrar(node=address, signer=nobody))
    try:
        yield registrars
    finally:
        for r in (registrars.anchor, registrars.clerk, registrars.nobody):
            await r.close()


async def test_value_rights_cannot_make_anyone_an_administrator(node: Node) -> None:
    mine = generate_key()
    with pytest.raises(PermissionDenied, match="ADD_ADMIN"):  # one's own key on ADMIN's record
        await node.clerk.add_values(ADMIN, [pubkey_value(mine, 301)])
    with pytest.raises(PermissionDenied, match="MODIFY_ADMIN"):  # ADMIN's key replaced by one's own
        await node.clerk.modify_values(ADMIN, [pubkey_value(mine)])
    with pytest.raises(PermissionDenied, match="ADD_ADMIN"):  # GHOST created, with one's own key
        await node.clerk.create(GHOST, [pubkey_value(mine)])
    for identity, index in ((ADMIN, 301), (ADMIN, 300), (GHOST, 300)):
        posing = node.signed_by(Signer(identity, mine, index))
        try:
            with pytest.raises(Unauthenticated):
                await posing.create("88.7.1/TAKEN", [URL])
        finally:
            await posing.close()
    async with Resolver([node.address]) as resolver:
        admin = await resolver.resolve(ADMIN)
        assert admin.version == 1 and [v.index for v in admin.values] == [1, 300]


async def test_writes_say_nothing_of_values_the_writer_may_not_read(node: Node) -> None:
    await node.anchor.create("88.7.1/PRIVATE", [URL, SECRET])
    # Create-if-identical is no oracle: the right guess and a wrong one get the same answer.
    guess = Value(2, "PRICE", b"1.00 CNY", permissions=SECRET.permissions)
    messages = []
    for values in ([URL, SECRET], [URL, guess]):
        with pytest.raises(AlreadyExists) as info:
            await node.clerk.create("88.7.1/PRIVATE", values)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    # Write answers hold what the writer may read: not the private values it wrote.
    written = await node.clerk.create("88.7.1/MINE", [URL, SECRET])
    assert [v.index for v in written.record.values] == [1]
    added = await node.clerk.add_values("88.7.1/MINE", [Value(3, "COST", b"7", permissions=Permission.ADMIN_READ)])
    assert [v.index for v in added.record.values] == [1] and added.record.version == 2
    # Without a right, nothing of the record: not which indexes exist.
    for call in (
        node.nobody.modify_values("88.7.1/PRIVATE", [Value(9, "URL", b"x")]),
        node.nobody.modify_values("88.7.1/PRIVATE", [Value(2, "URL", b"x")]),
        node.nobody.remove_values("88.7.1/PRIVATE", [9]),
    ):
        with pytest.raises(PermissionDenied):
            await call
    # A writer that may read everything retries safely and sees everything.
    again = await node.anchor.create("88.7.1/PRIVATE", [URL, SECRET])
    assert not again.created and [v.index for v in again.record.values] == [1, 2]


BAD_VALUES = [
    (Value(100, "HS_ADMIN", b"not a grant"), "HS_ADMIN data must be JSON"),
    (Value(100, "HS_ADMIN", b'{"admin": "88.7.1/X", "index": 300}'), "HS_ADMIN data must be JSON"),
    (Value(300, "HS_PUBKEY", b"not a key"), "HS_PUBKEY data is not a DER SubjectPublicKeyInfo"),
]


async def test_values_the_node_could_not_read_are_refused_on_every_write_path(node: Node) -> None:
    await node.anchor.create("88.7.1/HELD", [URL])
    for bad, message in BAD_VALUES:
        with pytest.raises(InvalidArgument, match=message):
            await node.anchor.create("88.7.1/STUCK", [URL, bad])
        with pytest.raises(InvalidArgument, match=message):
            await node.anchor.add_values("88.7.1/HELD", [bad])
        [outcome] = await node.anchor.batch_create([("88.7.1/STUCK-2", [URL, bad])])
        assert isinstance(outcome.error, InvalidArgument) and message in str(outcome.error)
    assert sorted(await node.anchor.list_identifiers("88.7.1")) == [
        "88.7.1/ADMIN",
        "88.7.1/CLERK",
        "88.7.1/HELD",
        "88.7.1/NOBODY",
    ]
    async with Resolver([node.address]) as resolver:
        assert (await resolver.resolve("88.7.1/HELD")).version == 1


async def test_the_apex_and_index_zero_are_invalid_arguments(node: Node) -> None:
    with pytest.raises(InvalidArgument, match=r"prefix 88\.7 is this node's apex"):
        await node.anchor.create_prefix("88.7")
    with pytest.raises(InvalidArgument, match="value index 0 is out of range") as info:
        await node.anchor.remove_values(ADMIN, [0])
    assert info.value.field == "indexes"
    async with Resolver([node.address]) as resolver:
        assert (await resolver.resolve(ADMIN)).version == 1
