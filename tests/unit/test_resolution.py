"""The resolution service in one process: cache misses of plain requests are answered from the
stored bytes (no Record decoded), byte for byte as a cache-less service on the same store answers
them; what only the Python path may answer still goes there.

The process-level twin of this test (real nodes, gRPC) is tests/integration/test_fast_path.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from nodes.authority import Authority
from nodes.resolution import ResolutionService
from nodes.storage import Store
from nodes.storage.sqlite import SqliteStore
from resolver.cache import LookupCache
from resolver.errors import IdisError
from resolver.identifier import parse_identifier, parse_prefix
from resolver.record import Limits, Record
from resolver.wire import decode_record, resolution_pb2
from tests.identifier_inputs import batch, one
from tests.stored_forms import APEX, asked, slow, write_database


class Services:
    def __init__(self, store: Store, authority: Authority, identifiers: list[str]) -> None:
        self.store = store
        self.cache = LookupCache(10_000)
        self.fast = ResolutionService(authority, Limits(), None, time.time, self.cache)
        self.plain = ResolutionService(authority, Limits(), None, time.time, None)
        self.identifiers = identifiers


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    identifiers = await write_database(tmp_path / "legacy.sqlite3")
    store = await SqliteStore.open(tmp_path / "legacy.sqlite3")
    authority = Authority(store, [parse_prefix(APEX)], 60)
    await authority.load()
    try:
        yield Services(store, authority, identifiers)
    finally:
        await store.close()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The identifiers of the records the authority decodes (the Python path), in order."""
    seen: list[str] = []

    def counting(data: bytes) -> Record:
        record = decode_record(data)
        seen.append(record.identifier.display)
        return record

    monkeypatch.setattr("nodes.authority.decode_record", counting)
    monkeypatch.setattr("nodes.resolution.decode_record", counting)  # the Python path decodes there
    return seen


async def outcome(call: Callable[[bytes], Any], request: bytes) -> Any:
    try:
        return await call(request)
    except IdisError as error:
        return type(error), str(error), getattr(error, "negative_ttl", None)


async def test_unary_misses_are_answered_from_the_stored_bytes(services: Services, decoded: list[str]) -> None:
    by_python_path = set()
    for identifier in asked(services.identifiers):
        for _ in range(2):  # a miss, then (when cacheable) a hit
            decoded.clear()
            fast = await outcome(services.fast.resolve_bytes, one(identifier))
            # No record decoded, except those only the Python path may answer.
            assert not decoded or slow(identifier), identifier
            by_python_path |= {identifier.upper()} if decoded else set()
            assert fast == await outcome(services.plain.resolve_bytes, one(identifier)), identifier
    assert by_python_path == {i.upper() for i in services.identifiers if slow(i)}


async def test_batch_misses_are_answered_from_the_stored_bytes(services: Services, decoded: list[str]) -> None:
    everything = asked(services.identifiers)
    request = batch(*everything, *everything[:5])  # duplicates too
    fast = await services.fast.resolve_batch_bytes(request)
    # No record decoded but those only the Python path may answer.
    assert {d.upper() for d in decoded} == {
        i.upper().replace("OLD-NAME", "TWICE") for i in services.identifiers if slow(i)
    }
    assert fast == await services.plain.resolve_batch_bytes(request)
    assert await services.fast.resolve_batch_bytes(request) == fast  # now from the cache
    items = resolution_pb2.ResolveBatchResponse.FromString(fast).items
    assert [i.status.code for i in items].count(5) == 2  # the two spellings of NONE
    for identifier in services.identifiers:
        key = parse_identifier(identifier).key.encode()
        cached = services.cache.get(key)
        assert (cached is None) == ("ABSOLUTE" in identifier), identifier  # absolute TTLs never cached


async def test_filters_and_private_values(services: Services, decoded: list[str]) -> None:
    for identifier in asked(services.identifiers):
        for request in (one(identifier, types=["URL"]), one(identifier, indexes=[2, 9]), one(identifier)):
            fast = await outcome(services.fast.resolve_bytes, request)
            assert fast == await outcome(services.plain.resolve_bytes, request), identifier
    response = resolution_pb2.ResolveResponse.FromString(await services.fast.resolve_bytes(one(f"{APEX}/B-PRIVATE")))
    assert [v.index for v in response.record.values] == [1, 9] and response.ttl == 30  # the private value's TTL
