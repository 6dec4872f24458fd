"""nodes/handle/answers.py in-process, on a real store and authority: the batched miss path
(``respond_many``) answers as one request at a time does, and a write that lands while a
batch's records are being read never leaves a stale answer in the Handle cache."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from nodes.authority import Authority
from nodes.coherence import Coherence
from nodes.handle.answers import HandleAnswers, own_handle_site
from nodes.registry import Registry
from nodes.storage import Store
from nodes.storage.sqlite import SqliteStore
from resolver.cache import IMPLEMENTATIONS
from resolver.handle_protocol import (
    RC,
    Op,
    ResolutionRequest,
    decode_message,
    decode_response,
    encode_resolution_request,
    request_message,
)
from resolver.identifier import parse_prefix
from resolver.record import Limits, Permission, Value


class Setup:
    def __init__(self, store: Store, authority: Authority, registry: Registry, answers: HandleAnswers) -> None:
        self.store = store
        self.authority = authority
        self.registry = registry
        self.answers = answers


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    store = await SqliteStore.open(tmp_path / "enterprise.sqlite3")
    cache = IMPLEMENTATIONS[request.param].LookupCache(1000, 10**7)
    coherence = Coherence(cache, None)
    authority = Authority(store, [parse_prefix("88.100.1")], 60, on_prefix_change=coherence.prefix_changed)
    await authority.load()
    registry = Registry(authority, Limits(), on_change=coherence.identifiers_changed)
    site = lambda: own_handle_site("127.0.0.1", 2651, 0, 1, "test")  # noqa: E731
    answers = HandleAnswers(authority, site, time.time, cache)
    try:
        yield Setup(store, authority, registry, answers)
    finally:
        await store.close()


def ask(handle: str, request_id: int = 7, indexes: tuple[int, ...] = ()) -> bytes:
    body = encode_resolution_request(ResolutionRequest(handle.encode(), indexes))
    return request_message(Op.RESOLUTION, body, request_id)


def values_of(answer: bytes | None) -> tuple[int, list[tuple[int, bytes]]]:
    assert answer is not None
    response = decode_response(decode_message(answer))
    return response.rc, [(v.index, v.data) for v in response.values]


PRIVATE = Permission.ADMIN_READ | Permission.ADMIN_WRITE


def without_expiration(answer: bytes | None) -> bytes | None:
    """An answer without its header's expiration (now + 43200: it may tick between two)."""
    return None if answer is None else answer[:36] + answer[40:]


async def test_a_batch_answers_as_single_requests_do(setup: Setup) -> None:
    await setup.registry.create(
        "88.100.1/A", [Value(1, "URL", b"https://a"), Value(2, "NOTE", b"x", permissions=PRIVATE)]
    )
    await setup.registry.create("88.100.1/B", [Value(1, "URL", b"https://b")])
    await setup.registry.create("88.100.1/P", [Value(1, "NOTE", b"private", permissions=PRIVATE)])
    messages = [
        ask("88.100.1/A", 1),
        ask("88.100.1/B", 2),
        ask("88.100.1/NONE", 3),
        ask("88.100.1/P", 4),
        ask("88.100.1/A", 5, indexes=(2,)),
        ask("99/X", 6),
        ask("0.NA/88.100.1", 7),
        b"\x00" * 30,
    ]
    batch = await setup.answers.respond_many(messages)
    one_by_one = [await setup.answers.respond(m) for m in messages]
    assert [without_expiration(a) for a in batch] == [without_expiration(a) for a in one_by_one]
    assert values_of(batch[0]) == (RC.SUCCESS, [(1, b"https://a")])
    assert values_of(batch[2])[0] == RC.HANDLE_NOT_FOUND
    assert values_of(batch[3])[0] == RC.VALUES_NOT_FOUND  # only a private value: nothing to show
    assert values_of(batch[4])[0] == RC.VALUES_NOT_FOUND  # index 2 is private
    assert values_of(batch[5])[0] == RC.SERVER_NOT_RESP


async def test_a_write_during_the_batch_read_leaves_no_stale_answer_cached(setup: Setup) -> None:
    await setup.registry.create("88.100.1/R", [Value(1, "URL", b"https://old")])
    authority = setup.authority
    read = authority.stored_records

    async def read_then_write(keys: Sequence[str]) -> dict[str, bytes | None]:
        records = await read(keys)  # the old record ...
        await setup.registry.replace("88.100.1/R", [Value(1, "URL", b"https://new")])  # ... then a write lands
        return records

    authority.stored_records = read_then_write  # type: ignore[method-assign]
    try:
        (answer,) = await setup.answers.respond_many([ask("88.100.1/R")])
    finally:
        authority.stored_records = read  # type: ignore[method-assign]
    assert values_of(answer) == (RC.SUCCESS, [(1, b"https://old")])  # answered as read: fine once
    # ... but not cached: the next answer, from the cache or not, is the new one.
    assert setup.answers.cache is not None
    hit = setup.answers.cache.handle_answer(ask("88.100.1/R"), 0, 1)
    assert hit is None or values_of(hit) == (RC.SUCCESS, [(1, b"https://new")])
    assert values_of(await setup.answers.respond(ask("88.100.1/R"))) == (RC.SUCCESS, [(1, b"https://new")])


async def test_an_answer_too_large_for_a_message_is_refused_and_never_cached(setup: Setup) -> None:
    """A record within the write limits whose Handle answer exceeds 262,144 bytes gets rc 2, and
    the cache (which answers without checking sizes) never holds it."""
    big = [Value(i, "URL", bytes([65 + i]) * 65_500) for i in range(1, 5)]
    await setup.registry.create("88.100.1/BIG", big)
    for _ in range(2):
        answer = await setup.answers.respond(ask("88.100.1/BIG"))
        assert answer is not None and len(answer) < 300
        response = decode_response(decode_message(answer))
        assert response.rc == RC.ERROR and "262144" in response.message
        assert setup.answers.cache is not None
        assert setup.answers.cache.handle_answer(ask("88.100.1/BIG"), 0, 1) is None
