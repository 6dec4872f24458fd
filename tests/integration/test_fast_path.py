"""The fast paths answer byte for byte what the Python path answers, and never serve stale data.

A second node on the same SQLite file, with its cache disabled, is the reference: every request
goes to both, and the answers (response bytes, or status, details and trailers) must be equal,
whatever the request holds: well-formed or not, cached or not. Both fast paths are held to it:
hits answered from the cache, and misses answered from the records' stored bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from hypothesis import given, settings

from nodes.hierarchy import NodeSpec
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.wire import resolution_pb2
from tests.identifier_inputs import batch, batch_request, identifiers_near, malformed_under, one, resolve_request
from tests.integration.conftest import Cluster
from tests.prometheus_text import scrape
from tests.stored_forms import APEX, asked, write_database


@dataclass
class Answer:
    data: bytes | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    trailers: tuple[Any, ...] = ()


def refused(exc: Any) -> Answer:
    """The answer a failed call (grpc.RpcError or grpc.aio.AioRpcError) carries."""
    trailers: Any = exc.trailing_metadata() or ()
    return Answer(None, exc.code(), exc.details() or "", tuple(trailers))


class Pair:
    """The same call to the cached node and to the reference node."""

    def __init__(self, fast: grpc.aio.Channel, plain: grpc.aio.Channel) -> None:
        self.channels = (fast, plain)

    async def call(self, method: str, request: bytes) -> tuple[Answer, Answer]:
        answers = []
        for channel in self.channels:
            rpc = channel.unary_unary(
                f"/idis.v1.Resolution/{method}", request_serializer=None, response_deserializer=None
            )
            try:
                answers.append(Answer(await rpc(request)))
            except grpc.aio.AioRpcError as exc:
                answers.append(refused(exc))
        return answers[0], answers[1]

    async def same(self, method: str, request: bytes, times: int = 3) -> Answer:
        """Asks ``times`` times (the first fills the cache); every answer must match the reference."""
        for _ in range(times):
            fast, plain = await self.call(method, request)
            assert fast == plain, (method, request)
        return fast


def twin(cluster: Cluster, name: str, apex: str) -> str:
    """A cache-less node serving the same database file as ``name``."""
    spec = NodeSpec(
        f"{name}-plain",
        "enterprise",
        apex,
        0,
        extra={"storage": {"path": f"{name}.sqlite3"}, "cache": {"enabled": False}},
    )
    return cluster.start(spec)


@contextlib.asynccontextmanager
async def paired(cluster: Cluster, name: str, apex: str) -> AsyncIterator[Pair]:
    """Node ``name`` and its cache-less twin."""
    plain = await asyncio.to_thread(twin, cluster, name, apex)
    async with grpc.aio.insecure_channel(cluster.address(name)) as f, grpc.aio.insecure_channel(plain) as p:
        yield Pair(f, p)


@pytest.fixture
async def enterprise(hierarchy: Cluster) -> AsyncIterator[Pair]:
    async with paired(hierarchy, "enterprise-1", "88.100.1") as pair:
        yield pair


@pytest.fixture
async def secondary(hierarchy: Cluster) -> AsyncIterator[Pair]:
    """The secondary node, which delegates 88.100.1 (referrals) and hosts 88.100.2 (records)."""
    async with paired(hierarchy, "secondary-100", "88.100") as pair:
        yield pair


CASES = [
    one("88.100.1/SN-0001"),  # a record
    one("88.100.1/SN-0002", types=["URL"]),  # filtered: always the Python path
    one("88.100.1/NONE"),  # NOT_FOUND, cached negatively
    one("88.100.1/none"),
    one("88.100.1.7/X"),  # an unallocated prefix
    one("88.100/X"),  # outside the authority
    one("88.100.1/"),  # malformed
    one("88.100.1/a\x01"),
    one("88.100.1/" + "x" * 300),
    b"\xff\xff\xff",  # not a protobuf message
    b"",
]


async def test_unary_answers_match_byte_for_byte(enterprise: Pair) -> None:
    for request in CASES:
        await enterprise.same("Resolve", request)
    hit = await enterprise.same("Resolve", one("88.100.1/SN-0001"))
    assert hit.data is not None and b"MOTOR-X200" in hit.data


async def test_batch_and_stream_answers_match_byte_for_byte(enterprise: Pair) -> None:
    mixed = batch("88.100.1/SN-0001", "88.100.1/NONE", "88.100.1/SN-0003", "88.100.1.7/X", "bad", "88.100/X")
    answer = await enterprise.same("ResolveBatch", mixed)
    assert answer.data is not None and len(resolution_pb2.ResolveBatchResponse.FromString(answer.data).items) == 6
    await enterprise.same("ResolveBatch", batch(*["88.100.1/SN-0001", "88.100.1/SN-0002"] * 50))
    await enterprise.same("ResolveBatch", batch(*["88.100.1/SN-0001"] * 2001))  # over the limit
    await enterprise.same("ResolveBatch", b"\x0a\x03\x0a\x01")
    fast, plain = enterprise.channels
    streams = []
    for channel in (fast, plain):
        rpc = channel.stream_stream(
            "/idis.v1.Resolution/ResolveStream", request_serializer=None, response_deserializer=None
        )
        streams.append([r async for r in rpc(iter([mixed] * 5))])
    assert streams[0] == streams[1] and len(streams[0]) == 5


async def test_writes_are_never_answered_stale(hierarchy: Cluster, enterprise: Pair) -> None:
    registrar = Registrar(node=hierarchy.address("enterprise-1"))
    try:
        # A cached NOT_FOUND gives way to the new record as soon as it is created.
        await enterprise.same("Resolve", one("88.100.1/LATE"))
        await registrar.create("88.100.1/LATE", [Value(1, "URL", b"v1")])
        answer = await enterprise.same("Resolve", one("88.100.1/LATE"))
        assert answer.data is not None and b"v1" in answer.data
        for change in (
            registrar.replace("88.100.1/LATE", [Value(1, "URL", b"v2")]),
            registrar.add_values("88.100.1/LATE", [Value(2, "EMAIL", b"e")]),
            registrar.modify_values("88.100.1/LATE", [Value(2, "EMAIL", b"f")]),
            registrar.remove_values("88.100.1/LATE", [1]),
        ):
            await change
            await enterprise.same("Resolve", one("88.100.1/LATE"))
            await enterprise.same("ResolveBatch", batch("88.100.1/LATE", "88.100.1/SN-0001"))
        await registrar.delete("88.100.1/LATE")
        gone = await enterprise.same("Resolve", one("88.100.1/LATE"))
        assert gone.code == grpc.StatusCode.NOT_FOUND
        # A batch registration invalidates too.
        await enterprise.same("ResolveBatch", batch("88.100.1/B-1", "88.100.1/B-2"))
        await registrar.batch_create([("88.100.1/B-1", [Value(1, "URL", b"b")])])
        answer = await enterprise.same("ResolveBatch", batch("88.100.1/B-1", "88.100.1/B-2"))
        items = resolution_pb2.ResolveBatchResponse.FromString(answer.data or b"").items
        assert [i.status.code for i in items] == [0, 5]
    finally:
        await registrar.close()


async def test_referrals_and_prefix_changes_on_the_secondary_node(hierarchy: Cluster, secondary: Pair) -> None:
    pair = secondary
    registrar = Registrar(node=hierarchy.address("secondary-100"))
    referral = await pair.same("Resolve", one("88.100.1/ANY"))
    assert referral.data is not None and b"88.100.1" in referral.data
    await pair.same("Resolve", one("88.100.1.9/deeper"))
    await pair.same("Resolve", one("88.100.9/X"))  # not allocated: NOT_FOUND, cached
    await pair.same("ResolveBatch", batch("88.100.1/A", "88.100.9/X", "88.100.2/PART-0001"))
    try:
        await registrar.create_prefix("88.100.9")
        await registrar.create("88.100.9/X", [Value(1, "URL", b"now")])
        await registrar.delegate_prefix("88.100.1", ["127.0.0.1:9"])  # re-pointed
    finally:
        await registrar.close()
    # The plain twin re-reads the prefix table only at start: restart it to compare.
    hierarchy.processes["secondary-100-plain"].stop()
    pair.channels = (
        pair.channels[0],
        grpc.aio.insecure_channel(await asyncio.to_thread(hierarchy.restart, "secondary-100-plain")),
    )
    created = await pair.same("Resolve", one("88.100.9/X"))
    assert created.data is not None and b"now" in created.data
    moved = await pair.same("Resolve", one("88.100.1/ANY"))
    assert moved.data is not None and b"127.0.0.1:9" in moved.data
    await pair.channels[1].close(grace=None)


async def test_malformed_identifiers_under_a_cached_referral_are_refused_as_on_a_cold_cache(secondary: Pair) -> None:
    # Once the referral for 88.100.1 was cached, the fast path used to answer it (OK) for
    # anything below 88.100.1, however malformed.
    referral = await secondary.same("Resolve", one("88.100.1/ANY"))
    assert referral.data is not None and b"88.100.1" in referral.data
    for raw in malformed_under("88.100.1"):
        answer = await secondary.same("Resolve", resolve_request(raw))
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, raw
        await secondary.same("ResolveBatch", batch_request(b"88.100.1/ANY", raw, b"88.100.1/ANY"))


def test_arbitrary_identifiers_get_the_same_answers_from_both_paths(hierarchy: Cluster) -> None:
    plain = twin(hierarchy, "secondary-100", "88.100")
    with grpc.insecure_channel(hierarchy.address("secondary-100")) as f, grpc.insecure_channel(plain) as p:

        def call(method: str, request: bytes) -> tuple[Answer, ...]:
            answers = []
            for channel in (f, p):
                rpc = channel.unary_unary(
                    f"/idis.v1.Resolution/{method}", request_serializer=None, response_deserializer=None
                )
                try:
                    answers.append(Answer(rpc(request)))
                except grpc.RpcError as exc:
                    answers.append(refused(exc))
            return tuple(answers)

        # Cached on the fast node: a referral (88.100.1 is delegated), a record, a NOT_FOUND.
        for identifier in ("88.100.1/ANY", "88.100.2/PART-0001", "88.100.2/NONE"):
            call("Resolve", one(identifier))
        fast, reference = call("Resolve", one("88.100.1/ANY"))
        assert fast == reference and fast.data is not None

        @settings(max_examples=500, deadline=None, derandomize=True, database=None)
        @given(identifiers_near("88.100.1", "88.100.2/PART-0001", "88.100.2/NONE", "88.100"))
        def both_paths_agree(raw: bytes) -> None:
            for method, request in (
                ("Resolve", resolve_request(raw)),
                ("ResolveBatch", batch_request(raw)),
                ("ResolveBatch", batch_request(b"88.100.1/ANY", raw, b"88.100.2/PART-0001")),
            ):
                fast, reference = call(method, request)
                assert fast == reference, (method, raw)

        both_paths_agree()


async def test_hits_are_counted_in_prometheus_metrics(tmp_path: Any, cluster: Cluster) -> None:
    address = await asyncio.to_thread(
        cluster.start, NodeSpec("m", "enterprise", "88.5", 0, extra={"node": {"metrics_listen": "127.0.0.1:0"}})
    )
    registrar = Registrar(node=address)
    try:
        await registrar.create("88.5/X", [Value(1, "URL", b"x")])
    finally:
        await registrar.close()
    async with grpc.aio.insecure_channel(address) as channel:
        rpc = channel.unary_unary("/idis.v1.Resolution/Resolve", request_serializer=None, response_deserializer=None)
        for _ in range(5):
            await rpc(one("88.5/X"))
    port = cluster.processes["m"].metrics_port
    metrics = await asyncio.to_thread(scrape, port)
    assert metrics.value("idis_cache_hits_total", implementation="cython", node="m") == 4
    assert metrics.value("idis_cache_misses_total", implementation="cython", node="m") == 1


async def test_misses_answered_from_the_stored_bytes_match_byte_for_byte(cluster: Cluster) -> None:
    """Cache misses of plain requests are built from the records' stored bytes. On a database
    written directly (records from before the compression dictionary and after it, private
    values, absolute TTLs, no values, forms another encoder wrote: ``tests/stored_forms.py``),
    every answer equals the cache-less twin's, on a cold cache (misses) and a warm one (hits):
    unary, batch, stream, and with filters."""
    identifiers = await write_database(cluster.state / "legacy.sqlite3")
    await asyncio.to_thread(cluster.start, NodeSpec("legacy", "enterprise", APEX, 0))
    everything = asked(identifiers)
    async with paired(cluster, "legacy", APEX) as pair:
        for identifier in everything:  # cold: each one's first answer is a miss
            await pair.same("Resolve", one(identifier), times=2)
        await asyncio.to_thread(cluster.processes["legacy"].stop)
        await asyncio.to_thread(cluster.restart, "legacy")  # cold again, for batches
        await pair.same("ResolveBatch", batch(*everything, *everything[:3]))
        for identifier in everything:
            for filtered in (one(identifier, types=["URL", "NOTE"]), one(identifier, indexes=[2])):
                await pair.same("Resolve", filtered, times=1)
        await asyncio.to_thread(cluster.processes["legacy"].stop)
        await asyncio.to_thread(cluster.restart, "legacy")
        streams = []
        for channel in pair.channels:
            rpc = channel.stream_stream(
                "/idis.v1.Resolution/ResolveStream", request_serializer=None, response_deserializer=None
            )
            streams.append([r async for r in rpc(iter([batch(*everything[i::3]) for i in range(3)] * 2))])
        assert streams[0] == streams[1] and len(streams[0]) == 6
        private = await pair.same("Resolve", one(f"{APEX}/B-PRIVATE"))
        assert private.data is not None and b"owner@example.com" not in private.data and "注意".encode() in private.data
