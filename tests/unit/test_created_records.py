"""BatchCreate's wire fast path (``resolver.cache.created_records``, compiled and twin) against
the Python path it stands in for: every record it makes is byte for byte what the Python path
would store, every item it leaves is one the Python path must judge (and the plain items of a
real batch are all its own); and a Registry stores the same rows and answers the same whichever
path made an item."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.authority import Authority
from nodes.registry import BatchItemResult, EncodedBatch, EncodedCreate, Registry
from nodes.storage.sqlite import SqliteStore
from resolver.cache import IMPLEMENTATIONS
from resolver.errors import IdisError
from resolver.identifier import Prefix, grammatical_identifier, parse_identifier, parse_prefix
from resolver.record import ADMIN_DATA_TYPES, Limits, Record, Value, check_values
from resolver.wire import decode_record, encode_stamped, record_pb2, registration_pb2, values_from_pb
from tests.stored_forms import field

IMPLS = sorted(IMPLEMENTATIONS)
LIMITS = Limits(max_values=6, max_value_bytes=64, max_type_bytes=12, max_record_bytes=300)
NOW = 1_800_000_000


def made(
    impl: str, request: bytes, now: int = NOW, limits: Limits = LIMITS
) -> list[tuple[str, int, bytes] | None] | None:
    create: Callable[..., list[tuple[str, int, bytes] | None] | None] = IMPLEMENTATIONS[impl].created_records
    return create(
        request, now, limits.max_values, limits.max_value_bytes, limits.max_type_bytes, limits.max_record_bytes
    )


def python_path(item: registration_pb2.CreateRequest, now: int = NOW, limits: Limits = LIMITS) -> bytes | None:
    """What the Python path stores for an item (values_from_pb, check_values, encode_stamped),
    or None when it refuses it."""
    try:
        record = Record(
            parse_identifier(item.identifier), check_values(values_from_pb(item.values, for_write=True), limits), 1
        )
    except IdisError:
        return None
    return encode_stamped(record, now) if record.values else None


def plain(item: registration_pb2.CreateRequest) -> bool:
    """An item the fast path must take: its values in increasing index order, no HS_ type, no
    reference, and the Python path accepts it."""
    indexes = [v.index for v in item.values]
    return (
        python_path(item) is not None
        and indexes == sorted(set(indexes))
        and not any(v.type.startswith("HS_") or v.references for v in item.values)
    )


values = st.builds(
    record_pb2.Value,
    index=st.sampled_from([0, 1, 2, 3, 7, 2**32 - 1]),
    type=st.sampled_from(["URL", "名称", "HS_ADMIN", "HS_SECKEY", "HS_SITE", "", "A\x85", "T" * 13]),
    data=st.binary(max_size=12) | st.binary(min_size=60, max_size=70),
    ttl_type=st.sampled_from([0, 1]),
    ttl=st.sampled_from([0, 60, 2**32 - 1]),
    timestamp=st.sampled_from([0, 5, -1]),
    permissions=st.sampled_from([0, 2, 0xE, 0xF, 0x10]),
    references=st.sampled_from([[], [record_pb2.Reference(identifier="88.1/R", index=1)]]),
)
plain_values = st.builds(
    record_pb2.Value,
    index=st.just(0),  # numbered by create_request
    type=st.sampled_from(["URL", "EMAIL", "名称"]),
    data=st.binary(max_size=20),
    ttl_type=st.sampled_from([0, 1]),
    ttl=st.sampled_from([0, 60, 2**32 - 1]),
    timestamp=st.sampled_from([0, 5, -1]),
    permissions=st.sampled_from([0, 2, 0xE, 0xF]),
)
identifiers = st.sampled_from(["88.100.1/SN-1", "88.a-B_c/x/y", "88/é中😀", "88.1/" + "s" * 250])


def create_request(identifier: str, values: list[record_pb2.Value], renumber: bool) -> registration_pb2.CreateRequest:
    if renumber:  # most registrations number their values 1, 2, 3...
        for number, value in enumerate(values, 1):
            value.index = number
    return registration_pb2.CreateRequest(identifier=identifier, values=values)


items = st.builds(  # anything: mostly refused, or left to the Python path
    create_request,
    identifiers | st.sampled_from(["88..1/x", "88.1/", "88.1/a\x85"]),
    st.lists(values, max_size=3) | st.lists(values, min_size=6, max_size=7),
    st.booleans(),
) | st.builds(  # plain registrations: the fast path's own
    create_request, identifiers, st.lists(plain_values, min_size=1, max_size=4), st.just(True)
)


@settings(max_examples=500, deadline=None)
@given(st.lists(items, max_size=4), st.sampled_from([NOW, 0, 1]))
def test_what_the_fast_path_makes_is_what_the_python_path_stores(
    batch: list[registration_pb2.CreateRequest], now: int
) -> None:
    request = registration_pb2.BatchCreateRequest(items=batch).SerializeToString()
    outcomes = {impl: made(impl, request, now) for impl in IMPLS}
    assert outcomes["cython"] == outcomes["python"]  # the twin decides alike, byte for byte
    got = outcomes["cython"]
    assert got is not None and len(got) == len(batch)
    for item, outcome in zip(batch, got, strict=True):
        if outcome is None:
            assert not plain(item) or python_path(item, now) is None
            continue
        text, cut, record = outcome
        assert record == python_path(item, now)
        assert text == item.identifier and cut == item.identifier.index("/")
        assert grammatical_identifier(text, cut, {}) == parse_identifier(text)
        assert plain(item)


def test_the_items_it_leaves_to_the_python_path() -> None:
    url = field(0x08, 1) + field(0x12, b"URL") + field(0x1A, b"u")

    def item(*values: bytes, name: bytes = b"88.1/X") -> bytes:
        return field(0x0A, field(0x0A, name) + b"".join(field(0x12, v) for v in values))

    left = {
        "no values": item(),
        "bad identifier": item(url, name=b"88.1"),
        "admin data": item(field(0x08, 1) + field(0x12, b"HS_ADMIN") + field(0x1A, b"{}")),
        "a reference": item(url + field(0x42, field(0x0A, b"88.1/R") + field(0x10, 1))),
        "indexes out of order": item(field(0x08, 2) + field(0x12, b"URL"), url),
        "an index twice": item(url, url),
        "index 0": item(field(0x12, b"URL")),
        "no type": item(field(0x08, 1) + field(0x1A, b"u")),
        "ttl type 2": item(url + field(0x20, 2)),
        "permission bit 0x10": item(url + field(0x38, 0x10)),
        "a zero written out": item(url + field(0x28, 0)),
        "fields out of order": item(field(0x12, b"URL") + field(0x08, 1)),
        "an unknown field": item(url + field(0x48, 1)),
        "a long varint": item(field(0x08, 1) + field(0x12, b"URL") + b"\x28\x85\x80\x00"),
        "type too long": item(field(0x08, 1) + field(0x12, b"T" * 13)),
        "data too long": item(field(0x08, 1) + field(0x12, b"URL") + field(0x1A, b"d" * 65)),
        "too many values": item(*(field(0x08, i) + field(0x12, b"URL") for i in range(1, 8))),
        "record too large": item(*(field(0x08, i) + field(0x12, b"URL") + field(0x1A, b"d" * 60) for i in range(1, 6))),
    }
    ok = item(url)
    for impl in IMPLS:
        for why, request in left.items():
            got = made(impl, ok + request)
            assert got is not None and got[0] is not None and got[1] is None, (impl, why)
        assert made(impl, ok + field(0x10, 1)) is None, impl  # the request holds more than items
        assert made(impl, b"") == [], impl


def test_it_is_the_whole_of_a_real_batch() -> None:
    from bench.dataset import registrations
    from resolver.wire import value_to_pb

    batch = [
        registration_pb2.CreateRequest(identifier=i, values=[value_to_pb(v) for v in vs])
        for i, vs in registrations("88.100.1", 300)
    ]
    request = registration_pb2.BatchCreateRequest(items=batch).SerializeToString()
    for impl in IMPLS:
        got = made(impl, request, limits=Limits())
        assert got is not None and all(
            g is not None and g[2] == python_path(i, limits=Limits()) for g, i in zip(got, batch, strict=True)
        )


@pytest.fixture
async def registries(tmp_path: Path) -> AsyncIterator[list[Registry]]:
    """Two nodes alike: one is given encoded items, the other the same items as values."""
    made_: list[Registry] = []
    for name in ("encoded", "values"):
        store = await SqliteStore.open(tmp_path / f"{name}.sqlite3")
        authority = Authority(store, [parse_prefix("88.100")], negative_ttl=60)
        await authority.load()
        await authority.create_prefix("88.100.2")
        made_.append(Registry(authority, Limits(), clock=lambda: NOW))
    yield made_
    for registry in made_:
        await registry.authority.store.close()


async def test_a_registry_stores_and_answers_the_same_whichever_path_made_an_item(registries: list[Registry]) -> None:
    encoded, by_values = registries
    url = record_pb2.Value(index=1, type="URL", data=b"https://example.com/1")
    mail = record_pb2.Value(index=2, type="EMAIL", data=b"a@example.com", permissions=0xC)
    batch = [
        registration_pb2.CreateRequest(identifier="88.100.2/A", values=[url, mail]),
        registration_pb2.CreateRequest(identifier="88.100.2/B", values=[url]),
        registration_pb2.CreateRequest(identifier="88.100.2/a", values=[url]),  # suffixes are case-sensitive
        registration_pb2.CreateRequest(identifier="88.100.2/B", values=[url]),  # twice in the batch
        registration_pb2.CreateRequest(identifier="88.100.3/C", values=[url]),  # prefix not hosted
    ]
    request = registration_pb2.BatchCreateRequest(items=batch).SerializeToString()
    fast = made("cython", request, limits=Limits())
    assert fast is not None and all(f is not None for f in fast)
    prefixes: dict[str, Prefix] = {}
    as_encoded = [EncodedCreate(grammatical_identifier(t, c, prefixes), r) for f in fast if f for t, c, r in [f]]
    as_values = [(i.identifier, values_from_pb(i.values, for_write=True)) for i in batch]

    def outcome(results: list[BatchItemResult]) -> list[tuple[int, bool, str]]:
        return [(r.version, r.created, str(r.error)) for r in results]

    for _ in range(2):  # the second time every item exists already: the idempotent answer
        first = await encoded.batch_create(as_encoded, now=NOW)
        second = await by_values.batch_create(as_values, now=NOW)
        assert outcome(first) == outcome(second)
    assert [r.created for r in first] == [False, False, False, False, False]
    assert "appears twice" in str(first[3].error) and "not hosted" in str(first[4].error)
    for key in ("88.100.2/A", "88.100.2/B", "88.100.2/a"):
        rows = [await r.authority.store.get(key) for r in registries]
        assert rows[0] is not None and rows[1] is not None
        assert rows[0].record == rows[1].record and rows[0].version == rows[1].version == 1
        assert decode_record(rows[0].record).values[0].timestamp == NOW


def test_every_admin_data_type_is_left_to_the_python_path() -> None:
    assert all(t.startswith("HS_") for t in ADMIN_DATA_TYPES)  # what the fast path tells them by


def test_a_batch_requests_items_are_counted_without_decoding_them() -> None:
    url = record_pb2.Value(index=1, type="URL", data=b"u")
    request = registration_pb2.BatchCreateRequest(
        items=[registration_pb2.CreateRequest(identifier=f"88.1/{n}", values=[url]) for n in range(300)]
    ).SerializeToString()
    for impl in IMPLS:
        count = IMPLEMENTATIONS[impl].count_items
        assert count(request) == 300 and count(b"") == 0
        assert count(request + field(0x10, 1)) == -1  # another field: decoded to be counted
        assert count(request[:-1]) == -1  # truncated


@pytest.fixture
async def three(tmp_path: Path) -> AsyncIterator[list[tuple[Registry, list[str]]]]:
    """Three nodes alike, each with the keys it was told changed; quota 5 identifiers a prefix."""
    made_: list[tuple[Registry, list[str]]] = []
    for name in ("batch", "encoded", "values"):
        store = await SqliteStore.open(tmp_path / f"{name}.sqlite3")
        authority = Authority(store, [parse_prefix("88.100")], negative_ttl=60)
        await authority.load()
        for prefix in ("88.100.2", "88.100.Q"):
            await authority.create_prefix(prefix)
        changed: list[str] = []
        registry = Registry(authority, Limits(), changed.extend, lambda: NOW, identifiers_per_prefix=5)
        made_.append((registry, changed))
    yield made_
    for registry, _ in made_:
        await registry.authority.store.close()


State = tuple[list[tuple[str, int, bytes]], list[tuple[str, int]], list[tuple[str, str, str]]]


async def state(registry: Registry) -> State:
    """What a registry's store holds: every record row, each prefix's count, the audit trail."""
    store = registry.authority.store
    rows = await store._read("SELECT key, version, record FROM identifiers ORDER BY key", ())
    counts = await store._read("SELECT key, identifier_count FROM prefixes ORDER BY key", ())
    audit = [(row.target, row.prefix, row.detail) for _, row in await store.list_audit(limit=1000)]
    return [(r[0], r[1], r[2]) for r in rows], [(c[0], c[1]) for c in counts], audit


@pytest.mark.parametrize(
    "batches",
    [
        # all new: the batch is accepted whole; then a retry with some stored (the same and other
        # values) and some new: the stored ones are found item by item, the new ones created
        [["2/A", "2/B", "Q/a"], ["2/C", "2/B", "2/A=other", "Q/b"]],
        # past the quota: those past it are refused, in order
        [["2/A", "2/B", "2/C"], ["2/D", "2/E", "2/F", "2/G"]],
        # twice in the batch, a prefix not hosted: the items are checked one by one
        [["2/A", "2/B", "2/A"], ["3/X", "2/C"], ["2/c", "Q/A"]],
        # twice but for the prefix's case; then again in another case: ALREADY_EXISTS; empty
        [["Q/x", "q/x"], ["q/y"], ["Q/y"], []],
    ],
)
async def test_a_batch_as_columns_answers_and_stores_as_item_by_item(
    three: list[tuple[Registry, list[str]]], batches: list[list[str]]
) -> None:
    def item(spec: str) -> registration_pb2.CreateRequest:
        name, _, data = spec.partition("=")
        value = record_pb2.Value(index=1, type="URL", data=(data or name).encode())
        return registration_pb2.CreateRequest(identifier=f"88.100.{name}", values=[value])

    def outcome(results: list[BatchItemResult]) -> list[tuple[int, bool, str]]:
        return [(r.version, r.created, str(r.error)) for r in results]

    for specs in batches:
        batch = [item(s) for s in specs]
        fast = made("cython", registration_pb2.BatchCreateRequest(items=batch).SerializeToString(), limits=Limits())
        assert fast is not None and all(f is not None for f in fast)
        items = [f for f in fast if f is not None]
        prefixes: dict[str, Prefix] = {}
        forms: tuple[EncodedBatch, list[EncodedCreate], list[tuple[str, tuple[Value, ...]]]] = (
            EncodedBatch(items),
            [EncodedCreate(grammatical_identifier(t, c, prefixes), r) for t, c, r in items],
            [(i.identifier, values_from_pb(i.values, for_write=True)) for i in batch],
        )
        got = [
            outcome(await three[0][0].batch_create(forms[0], now=NOW)),
            outcome(await three[1][0].batch_create(forms[1], now=NOW)),
            outcome(await three[2][0].batch_create(forms[2], now=NOW)),
        ]
        assert got[0] == got[1] == got[2]
    states = [await state(r) for r, _ in three]
    assert states[0] == states[1] == states[2]
    rows, counts, audit = states[0]
    created = [target for target, _, detail in audit if detail == "created v1 (batch)"]
    assert sorted(parse_identifier(t).key for t in created) == [key for key, _, _ in rows]  # one trail row each
    held = {prefix: sum(1 for key, _, _ in rows if key.startswith(prefix + "/")) for prefix, _ in counts}
    assert dict(counts) == held  # no count from an insert that was rolled back
    assert three[0][1] == three[1][1] == three[2][1]  # caches told of the same changes, in the same order
    assert sorted(three[0][1]) == [key for key, _, _ in rows]  # each identifier created, once


async def test_a_whole_encoded_batch_is_accepted_without_a_step_per_item(
    three: list[tuple[Registry, list[str]]],
) -> None:
    registry = three[0][0]
    await registry.authority.sync()
    items = [(f"88.100.2/{n}", 8, b"r") for n in range(3)] + [("88.100.q/x", 8, b"r")]
    prepared = registry._prepare_encoded(EncodedBatch(items), None)
    assert prepared is not None and prepared.keys == ["88.100.2/0", "88.100.2/1", "88.100.2/2", "88.100.Q/x"]
    assert prepared.prefixes == ["88.100.2"] * 3 + ["88.100.Q"] and prepared.texts[3] == "88.100.q/x"
    assert registry._prepare_encoded(EncodedBatch([*items, items[0]]), None) is None  # twice
    assert registry._prepare_encoded(EncodedBatch([*items, ("88.100.3/x", 8, b"r")]), None) is None  # not hosted


async def test_registrations_are_counted_under_the_prefix_as_hosted(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "n.sqlite3")
    try:
        authority = Authority(store, [parse_prefix("88.100")], negative_ttl=60)
        await authority.load()
        await authority.create_prefix("88.100.q")
        counted: list[tuple[str, int]] = []
        registry = Registry(authority, Limits(), clock=lambda: NOW, on_created=lambda p, n: counted.append((p, n)))
        url = record_pb2.Value(index=1, type="URL", data=b"u")
        batch = [registration_pb2.CreateRequest(identifier=f"88.100.{c}/{c}", values=[url]) for c in "qQ"]
        fast = made("cython", registration_pb2.BatchCreateRequest(items=batch).SerializeToString(), limits=Limits())
        assert fast is not None
        await registry.batch_create(EncodedBatch([f for f in fast if f is not None]), now=NOW)
        await registry.create("88.100.Q/single", [Value(1, "URL", b"u")])
        assert counted == [("88.100.q", 2), ("88.100.q", 1)]  # one series, as the prefix was created
    finally:
        await store.close()
