"""The request pipeline's trust hooks with fakes: the peer handed to authentication, costs per
item and per stream message, signed reads spending their nonce, refusals handed to the trail."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from nodes.pipeline import RequestPipeline, _charged, _cost
from nodes.trust.audit import AuditRow, Caller
from nodes.trust.quotas import Charge, RateLimited, TokenBuckets, current_charge
from resolver.errors import Unauthenticated
from resolver.identifier import parse_identifier
from resolver.wire import resolution_pb2

BATCH = "/idis.v1.Resolution/ResolveBatch"
STREAM = "/idis.v1.Resolution/ResolveStream"


def batch(n: int) -> bytes:
    items = [resolution_pb2.ResolveRequest(identifier=f"88.1/{i}") for i in range(n)]
    return resolution_pb2.ResolveBatchRequest(requests=items).SerializeToString()


class Context:
    def __init__(self, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.metadata = tuple(metadata)

    def peer(self) -> str:
        return "ipv4:10.1.2.3:40000"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


class Authenticator:
    """Accepts every call as 88.1/ADMIN; remembers the peer it was told."""

    def __init__(self) -> None:
        self.peers: list[str] = []

    async def authenticate(
        self, method: str, request: bytes, metadata: Sequence[tuple[str, str]], peer: str = ""
    ) -> Caller:
        self.peers.append(peer)
        return Caller(parse_identifier("88.1/ADMIN"), 300, "ab" * 16)


def test_a_batch_costs_its_items_other_calls_one() -> None:
    assert _cost(BATCH, batch(300)) == 300
    assert _cost("/idis.v1.Resolution/Resolve", batch(300)) == 1
    assert _cost(BATCH, None) == 1
    assert _cost(BATCH, batch(300) + b"\x10\x01") == 300  # an unknown field: counted by decoding it


async def test_every_message_of_a_stream_is_charged_as_it_is_read() -> None:
    buckets = TokenBuckets(rate=0.001, burst=10, clock=lambda: 0.0)

    async def messages() -> AsyncIterator[bytes]:
        for _ in range(200):
            yield batch(3)

    read: list[bytes] = []

    async def read_all() -> None:
        async for message in _charged(STREAM, messages()):
            read.append(message)

    token = current_charge.set(Charge(buckets, "10.1.2.3"))
    try:
        with pytest.raises(RateLimited, match=r"peer 10\.1\.2\.3 is over its limit"):
            await read_all()
    finally:
        current_charge.reset(token)
    assert len(read) == 3  # 3 + 3 + 3 tokens of 10; the fourth message is refused


async def test_signed_calls_name_their_peer_pay_per_item_and_reads_spend_their_nonce() -> None:
    auth = Authenticator()
    spent: list[str] = []

    async def spend(nonce: str) -> None:
        if nonce in spent:
            raise Unauthenticated("nonce already used: a signed call is good for one use")
        spent.append(nonce)

    identity = TokenBuckets(rate=0.001, burst=400, clock=lambda: 0.0)
    pipeline = RequestPipeline(authenticator=auth, identity_limit=identity, spend_nonce=spend)  # type: ignore[arg-type]
    caller = await pipeline._authenticated(BATCH, batch(300), (), Context())
    assert caller.identity.key == "88.1/ADMIN" and auth.peers == ["10.1.2.3"]
    assert spent == ["ab" * 16]
    with pytest.raises(Unauthenticated, match="nonce already used"):  # the same nonce again: another worker's view
        await pipeline._authenticated(BATCH, batch(1), (), Context())
    # 300 + 1 of 400 spent: a batch of 100 more is over the identity's limit.
    with pytest.raises(RateLimited, match=r"identity 88\.1/ADMIN is over its limit"):
        await pipeline._authenticated(BATCH, batch(100), (), Context())
    # A write spends its nonce in its own transaction, not here.
    await pipeline._authenticated("/idis.v1.Registration/Create", b"", (), Context())
    assert spent == ["ab" * 16]


def test_a_refusal_reaches_the_trail_as_an_unverified_claim() -> None:
    rows: list[tuple[AuditRow, str]] = []
    pipeline = RequestPipeline(audit=lambda row, peer: rows.append((row, peer)))
    from resolver.wire import registration_pb2

    request: Any = registration_pb2.CreateRequest(identifier="88.1/" + "x" * 100_000)
    metadata = (("idis-identity", "88.1/\u0410DMIN"),)
    pipeline._audit_refusal(Unauthenticated("no signature"), None, metadata, Context(metadata), "Create", request)
    ((row, peer),) = rows
    assert peer == "10.1.2.3" and row.identity == "-" and row.prefix == "88.1"
    assert row.detail == 'claimed "88.1/\\u0410DMIN" (not verified): no signature'
    assert len(row.target) <= 800
