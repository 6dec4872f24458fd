"""One suite for the lookup cache, run against the compiled module and its pure-Python twin."""

from __future__ import annotations

import hashlib
import math
import random
from types import ModuleType
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.attestation import leaf_hash, private_digest, public_part
from resolver.cache import IMPLEMENTATION, IMPLEMENTATIONS, NEGATIVE, POSITIVE
from resolver.errors import IdisError
from resolver.handle_protocol import values_section
from resolver.identifier import Prefix, parse_identifier
from resolver.record import ADMIN_TYPE, AdminPermission, Permission, Record, Reference, TtlType, Value, admin_value
from resolver.wire import decode_record, encode_record, frame_batch_item, record_pb2, record_to_pb, resolution_pb2
from tests.identifier_inputs import (
    batch,
    batch_request,
    identifiers_near,
    malformed_under,
    one,
    parsed,
    resolve_request,
    well_formed_under,
)
from tests.stored_forms import URL, field

IMPLS = sorted(IMPLEMENTATIONS)


def test_the_compiled_module_is_built() -> None:
    # The build (pip install .) compiles it; running on the twin here would hide a broken build.
    assert IMPLEMENTATION == "cython"
    assert set(IMPLS) == {"cython", "python"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = IMPLEMENTATIONS[request.param]
    return module


def make(impl: ModuleType, clock: Clock | None = None, **kw: Any) -> Any:
    return impl.LookupCache(clock=clock or Clock(), **kw)


def test_set_get_lookup_and_negative_entries(impl: ModuleType) -> None:
    cache = make(impl)
    cache.set(b"88.1/A", b"record", 60)
    cache.set(b"88.1/B", b"not-found", 30, negative=True)
    assert cache.get(b"88.1/A") == b"record"
    assert cache.lookup(b"88.1/A") == (POSITIVE, b"record")
    assert cache.get(b"88.1/B") is None  # get() is for positive answers only
    assert cache.lookup(b"88.1/B") == (NEGATIVE, b"not-found")
    assert cache.get(b"88.1/C") is None
    assert len(cache) == 2 and cache.held_bytes == len(b"88.1/Arecord") + len(b"88.1/Bnot-found")
    cache.set(b"88.1/A", b"replaced", 60)
    assert cache.get(b"88.1/A") == b"replaced" and len(cache) == 2


def test_each_entry_expires_after_its_own_ttl(impl: ModuleType) -> None:
    clock = Clock()
    cache = make(impl, clock)
    cache.set(b"88.1/A", b"a", 10)
    cache.set(b"88.1/N", b"n", 3, negative=True)
    clock.now += 2.5
    assert cache.lookup(b"88.1/N") == (NEGATIVE, b"n")
    assert 7 <= cache.remaining_ttl(b"88.1/A") <= 8
    clock.now += 1
    assert cache.lookup(b"88.1/N") is None  # the negative TTL ran out first
    assert cache.get(b"88.1/A") == b"a"
    clock.now += 7
    assert cache.get(b"88.1/A") is None
    assert len(cache) == 0 and cache.stats()["expirations"] == 2


def test_periodic_expiry_is_incremental(impl: ModuleType) -> None:
    clock = Clock()
    cache = make(impl, clock)
    for n in range(100):
        cache.set(b"88.1/%d" % n, b"v", 5 if n % 2 else 500)
    clock.now += 10
    removed = 0
    for _ in range(10):
        removed += cache.expire(max_scan=20)
    assert removed == 50 and len(cache) == 50
    assert cache.expire() == 0


def test_zero_ttl_stores_nothing_and_removes(impl: ModuleType) -> None:
    cache = make(impl)
    cache.set(b"k", b"v", 60)
    cache.set(b"k", b"v", 0)
    assert cache.get(b"k") is None and len(cache) == 0


def test_bounded_by_entries_and_by_bytes(impl: ModuleType) -> None:
    cache = make(impl, max_entries=100, max_bytes=10**9)
    for n in range(1000):
        cache.set(b"88.1/%d" % n, b"v" * 10, 60)
        assert len(cache) <= 100
    assert cache.stats()["evictions"] == 900
    small = make(impl, max_entries=10**6, max_bytes=5000)
    for n in range(1000):
        small.set(b"88.1/%04d" % n, b"v" * 90, 60)
        assert small.held_bytes <= 5000
    assert len(small) == 5000 // (9 + 90)
    small.set(b"88.1/huge", b"x" * 6000, 60)  # larger than the whole cache: not stored
    assert small.get(b"88.1/huge") is None


def test_keys_must_fit(impl: ModuleType) -> None:
    cache = make(impl)
    with pytest.raises(ValueError, match="keys must be"):
        cache.set(b"", b"v", 1)
    with pytest.raises(ValueError, match="keys must be"):
        cache.set(b"k" * 256, b"v", 1)


def test_a_scan_does_not_flush_the_hot_set(impl: ModuleType) -> None:
    cache = make(impl, max_entries=1000)
    hot = [b"88.1/hot-%d" % n for n in range(500)]
    for _ in range(3):
        for key in hot:
            if cache.get(key) is None:
                cache.set(key, b"v", 600)
    for n in range(20000):  # a one-pass scan, 20x the cache size
        cache.set(b"88.1/scan-%d" % n, b"v", 600)
    kept = sum(1 for key in hot if cache.get(key) is not None)
    assert kept >= 450  # an LRU would keep none


def test_invalidation_by_key_and_prefix_advances_the_generation(impl: ModuleType) -> None:
    cache = make(impl)
    for key in [b"88.1/x", b"88.1/y", b"88.1.2/z", b"88.10/w", b"88.1", b"88/a"]:
        cache.set(key, b"v", 60)
    g = cache.generation
    assert cache.invalidate(b"88.1/x") and not cache.invalidate(b"88.1/x")
    assert cache.generation == g + 2  # even a miss advances it: an answer in flight is stale
    assert cache.invalidate_prefix(b"88.1") == 3  # 88.1/y, 88.1.2/z and 88.1 itself
    assert cache.get(b"88.10/w") == b"v" and cache.get(b"88/a") == b"v"
    cache.clear()
    assert len(cache) == 0 and cache.generation == g + 4
    assert cache.stats()["invalidations"] == 4


def test_get_many_agrees_with_get(impl: ModuleType) -> None:
    cache = make(impl)
    for n in range(0, 100, 2):
        cache.set(b"88.1/%d" % n, b"v%d" % n, 60)
    cache.set(b"88.1/neg", b"n", 60, negative=True)
    keys = [b"88.1/%d" % n for n in range(100)] + [b"88.1/neg"]
    assert cache.get_many(keys) == [cache.get(k) for k in keys]
    assert cache.stats()["hits"] == 2 * 51 and cache.stats()["misses"] == 2 * 50


@given(st.text(alphabet="abcXYZ019.-_", min_size=1, max_size=20), st.text(min_size=1, max_size=30))
def test_normalise_key_matches_the_grammar(prefix: str, suffix: str) -> None:
    text = f"{prefix}/{suffix}".encode("utf-8", "surrogatepass")
    for module in IMPLEMENTATIONS.values():
        key = module.normalise_key(text)
        try:
            expected = parse_identifier(text.decode("utf-8", "surrogatepass")).key.encode()
        except Exception:  # invalid identifiers have no canonical key to compare
            continue
        assert key == expected


# --- model-based: with no evictions both implementations behave exactly like a dict with TTLs --


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("set"),
            st.sampled_from(["88.1/a", "88.1/b", "88.1.2/c", "88.2/d"]),
            st.integers(1, 20),
            st.booleans(),
        ),
        st.tuples(st.just("get"), st.sampled_from(["88.1/a", "88.1/b", "88.1.2/c", "88.2/d"])),
        st.tuples(st.just("invalidate"), st.sampled_from(["88.1/a", "88.2/d"])),
        st.tuples(st.just("prefix"), st.sampled_from(["88.1", "88", "88.1.2"])),
        st.tuples(st.just("tick"), st.integers(0, 7)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_both_implementations_follow_the_model(operations: list[tuple[Any, ...]]) -> None:
    clocks = {name: Clock() for name in IMPLS}
    caches = {name: IMPLEMENTATIONS[name].LookupCache(clock=clocks[name]) for name in IMPLS}
    model: dict[bytes, tuple[int, bytes, bool]] = {}
    elapsed = 0.0
    for op in operations:
        if op[0] == "tick":
            elapsed += op[1]
            for c in clocks.values():
                c.now += op[1]
            continue
        key = op[1].encode()
        if op[0] == "set":
            value = b"v%d" % op[2]
            model[key] = (math.ceil(elapsed + op[2]), value, op[3])
            for c in caches.values():
                c.set(key, value, op[2], negative=op[3])
        elif op[0] == "invalidate":
            model.pop(key, None)
            for c in caches.values():
                c.invalidate(key)
        elif op[0] == "prefix":
            for k in [k for k in model if k == key or k.startswith((key + b"/", key + b"."))]:
                del model[k]
            for c in caches.values():
                c.invalidate_prefix(key)
        else:
            entry = model.get(key)
            expected = None
            if entry is not None and entry[0] > int(elapsed):
                expected = (NEGATIVE if entry[2] else POSITIVE, entry[1])
            for c in caches.values():
                assert c.lookup(key) == expected


# --- the wire fast path ------------------------------------------------------------------------


def record_response(identifier: str) -> bytes:
    record = record_pb2.Record(identifier=identifier, values=[record_pb2.Value(index=1, type="URL", data=b"u")])
    return resolution_pb2.ResolveResponse(record=record, ttl=86400).SerializeToString()


def not_found_item(identifier: str) -> bytes:
    return resolution_pb2.ResolveBatchItem(
        status=record_pb2.ItemStatus(code=5, message=f"identifier {identifier} not found"), negative_ttl=60
    ).SerializeToString()


REFERRAL = resolution_pb2.ResolveResponse(
    referral=record_pb2.Referral(prefix="88.100", site=record_pb2.Site(servers=[record_pb2.Server(address="h:1")])),
    ttl=600,
).SerializeToString()


@pytest.fixture
def filled(impl: ModuleType) -> Any:
    cache = make(impl)
    cache.set(b"88.7.X/SN-1", record_response("88.7.X/SN-1"), 60)
    cache.set(b"88.7/NONE", not_found_item("88.7/NONE"), 60, negative=True)
    cache.set(b"88.100", REFERRAL, 600)
    return cache


def test_answer_one(filled: Any) -> None:
    assert filled.answer_one(one("88.7.X/SN-1")) == (POSITIVE, record_response("88.7.X/SN-1"))
    assert filled.answer_one(one("88.7.x/SN-1")) == (POSITIVE, record_response("88.7.X/SN-1"))  # case-folded
    assert filled.answer_one(one("88.7.X/sn-1")) is None  # the suffix is case-sensitive
    assert filled.answer_one(one("88.7/NONE")) == (NEGATIVE, not_found_item("88.7/NONE"))
    assert filled.answer_one(one("88.100.1/anything")) == (POSITIVE, REFERRAL)
    assert filled.answer_one(one("88.100/direct")) == (POSITIVE, REFERRAL)
    assert filled.answer_one(one("88.1000/x")) is None  # 88.1000 is not under 88.100
    assert filled.answer_one(one("88.7.X/SN-1", types=["URL"])) is None  # filters: the slow path
    assert filled.answer_one(one("88.7.X/SN-1", recursive=True)) is None
    assert filled.answer_one(b"\xff\xff") is None


def test_a_negative_answer_is_served_only_for_the_exact_spelling(impl: ModuleType) -> None:
    cache = make(impl)
    cache.set(b"88.A/NONE", not_found_item("88.A/NONE"), 60, negative=True)
    assert cache.answer_one(one("88.A/NONE")) is not None
    assert cache.answer_one(one("88.a/NONE")) is None  # its message would quote "88.a/NONE"


def test_answer_batch_builds_the_exact_response_bytes(filled: Any) -> None:
    expected = resolution_pb2.ResolveBatchResponse(
        items=[
            resolution_pb2.ResolveBatchItem(
                status=record_pb2.ItemStatus(code=0),
                response=resolution_pb2.ResolveResponse.FromString(record_response("88.7.X/SN-1")),
            ),
            resolution_pb2.ResolveBatchItem.FromString(not_found_item("88.7/NONE")),
            resolution_pb2.ResolveBatchItem(
                status=record_pb2.ItemStatus(code=0), response=resolution_pb2.ResolveResponse.FromString(REFERRAL)
            ),
        ]
    ).SerializeToString()
    assert filled.answer_batch(batch("88.7.X/SN-1", "88.7/NONE", "88.100.5/z")) == expected
    assert filled.answer_batch(b"") == b""


def test_answer_batch_marks_misses_and_refuses_what_it_cannot_judge(filled: Any) -> None:
    parts = filled.answer_batch(batch("88.7.X/SN-1", "88.7/missing", "88.100.5/z"))
    assert isinstance(parts, list) and parts[1] is None and parts[0] is not None and parts[2] is not None
    assert filled.answer_batch(batch("88.7.X/SN-1", types=["URL"])) == [None]
    assert filled.answer_batch(b"\x12\x00") is None  # an unknown field
    assert filled.answer_batch(b"\x0a\x05ab") is None  # truncated
    assert filled.answer_batch(batch(*["88.7.X/SN-1"] * 11), max_items=10) is None


@pytest.mark.parametrize("raw", malformed_under("88.100"))
def test_an_identifier_breaking_the_grammar_is_left_to_the_slow_path(filled: Any, raw: bytes) -> None:
    # Under a cached referral the old fast path answered it with the referral; the slow path
    # refuses it (INVALID_ARGUMENT), and only the slow path may answer it.
    assert filled.answer_one(resolve_request(raw)) is None
    parts = filled.answer_batch(batch_request(b"88.7.X/SN-1", raw))
    assert isinstance(parts, list) and parts[0] is not None and parts[1] is None
    assert filled.stats()["hits"] == 1 and filled.stats()["misses"] == 0  # not a miss: not an identifier


@pytest.mark.parametrize("raw", well_formed_under("88.100"))
def test_identifiers_at_the_edges_of_the_grammar_are_still_answered(filled: Any, raw: bytes) -> None:
    assert filled.answer_one(resolve_request(raw)) == (POSITIVE, REFERRAL)
    assert filled.answer_batch(batch_request(raw)) == filled.answer_batch(batch("88.100/x"))


def test_a_record_or_negative_key_breaking_the_grammar_is_never_served(impl: ModuleType) -> None:
    # Entries can only be stored by their normalised, grammatical keys; the check also guards
    # against a caller (the resolver library) storing something else under such a key.
    cache = make(impl)
    cache.set(b"88.7/a\x01", record_response("88.7/a"), 60)
    cache.set(b"88.7/", not_found_item("88.7/"), 60, negative=True)
    assert cache.answer_one(resolve_request(b"88.7/a\x01")) is None
    assert cache.answer_one(resolve_request(b"88.7/")) is None


@settings(max_examples=1500, deadline=None, derandomize=True, database=None)
@given(identifiers_near("88.100", "88.7.X/SN-1", "88.7/NONE"))
def test_the_fast_path_answers_exactly_the_grammatical_identifiers(raw: bytes) -> None:
    identifier = parsed(raw)
    outcomes = []
    for name in IMPLS:
        cache = IMPLEMENTATIONS[name].LookupCache(clock=Clock())
        cache.set(b"88.7.X/SN-1", record_response("88.7.X/SN-1"), 60)
        cache.set(b"88.7/NONE", not_found_item("88.7/NONE"), 60, negative=True)
        cache.set(b"88.100", REFERRAL, 600)
        one_answer = cache.answer_one(resolve_request(raw))
        batch_answer = cache.answer_batch(batch_request(raw, b"88.7.X/SN-1"))
        outcomes.append((one_answer, batch_answer, cache.stats()))
        if identifier is None:
            assert one_answer is None and isinstance(batch_answer, list) and batch_answer[0] is None
        elif identifier.prefix.is_within(Prefix("88.100", "88.100")):
            assert one_answer == (POSITIVE, REFERRAL)  # the check refuses nothing the slow path takes
    assert all(o == outcomes[0] for o in outcomes), raw


def test_large_batches_and_large_values(impl: ModuleType) -> None:
    cache = make(impl)
    rng = random.Random(7)
    keys = [f"88.1/{rng.randrange(10**9)}" for _ in range(3000)]
    for k in keys:
        data = rng.randbytes(rng.choice([1, 200, 20000]))
        record = record_pb2.Record(identifier=k, values=[record_pb2.Value(index=1, type="BLOB", data=data)])
        cache.set(k.encode(), resolution_pb2.ResolveResponse(record=record).SerializeToString(), 60)
    answer = cache.answer_batch(batch(*keys), max_items=5000)
    decoded = resolution_pb2.ResolveBatchResponse.FromString(answer)
    assert len(decoded.items) == 3000
    assert all(
        item.response.SerializeToString() == cache.get(k.encode()) for item, k in zip(decoded.items, keys, strict=True)
    )


# --- the change log that keeps the caches of several workers coherent -------------------------


def test_changes_published_in_the_log_reach_every_attached_cache(impl: ModuleType, tmp_path: Any) -> None:
    writer = impl.ChangeLog(tmp_path / "changes", capacity=16, create=True)
    reader = impl.ChangeLog(tmp_path / "changes")
    mine, theirs = make(impl), make(impl)
    mine.attach(writer)
    theirs.attach(reader)
    for cache in (mine, theirs):
        for key in (b"88.1/a", b"88.1/b", b"88.1.2/c", b"88.9/d"):
            cache.set(key, b"v", 600)
    g = theirs.generation
    writer.append(impl.LOG_KEY, b"88.1/a")
    writer.append(impl.LOG_PREFIX, b"88.1.2")
    assert reader.sequence == 2
    assert theirs.get(b"88.1/a") is None and theirs.get(b"88.1.2/c") is None  # applied before the lookup
    assert theirs.get(b"88.1/b") == b"v" and theirs.generation > g
    assert theirs.answer_batch(b"") == b""
    for n in range(40):  # more than the ring holds, unseen: the reader must drop everything
        writer.append(impl.LOG_KEY, b"88.9/x%d" % n)
    assert theirs.get(b"88.9/d") is None and len(theirs) == 0
    writer.close()
    reader.close()


def test_an_answer_computed_across_an_invalidation_is_not_cached(impl: ModuleType, tmp_path: Any) -> None:
    log = impl.ChangeLog(tmp_path / "changes", create=True)
    cache = make(impl)
    cache.attach(impl.ChangeLog(tmp_path / "changes"))
    before = cache.generation
    log.append(impl.LOG_KEY, b"88.1/a")  # another worker changed it while this one read the store
    assert cache.set(b"88.1/a", b"stale", 600, if_generation=before) is False
    assert cache.get(b"88.1/a") is None
    assert cache.set(b"88.1/a", b"fresh", 600, if_generation=cache.generation) is True


# --- answers built from stored records (a node's miss path) ----------------------------------


def python_path_answer(stored: bytes) -> bytes | None:
    """What the Python path answers an anonymous reader for a record stored as ``stored``
    (decode, public values, encode), or None when it cannot read it or its answer changes with
    time (absolute TTLs)."""
    try:
        record = decode_record(stored)
    except (DecodeError, IdisError):
        return None
    if any(v.ttl_type is TtlType.ABSOLUTE for v in record.values):
        return None
    return resolution_pb2.ResolveResponse(
        record=record_to_pb(record.public_view()), ttl=record.cache_ttl(0)
    ).SerializeToString()


text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)
stored_values = st.builds(
    Value,
    index=st.integers(0, 2**32 - 1),
    type=text,
    data=st.binary(max_size=40),
    ttl=st.integers(0, 2**32 - 1),
    timestamp=st.integers(-(2**63), 2**63 - 1),
    permissions=st.integers(0, 15).map(Permission),
    references=st.lists(st.builds(Reference, text | st.just(""), st.integers(0, 2**32 - 1)), max_size=2).map(tuple),
)
stored_records = st.builds(
    Record,
    st.sampled_from(["88.100.1/SN-1", "88.a-b_C/x/y", "88/é\u4e2d😀", "88.1/" + "s" * 249]).map(parse_identifier),
    st.lists(stored_values, max_size=5).map(tuple),
    st.integers(0, 2**64 - 1),
)


@settings(max_examples=400, deadline=None)
@given(stored_records)
def test_anonymous_response_is_the_python_paths_answer_byte_for_byte(record: Record) -> None:
    stored = encode_record(record)
    expected = python_path_answer(stored)
    assert expected is not None
    for name in IMPLS:
        assert IMPLEMENTATIONS[name].anonymous_response(stored) == expected, name


def test_private_values_are_left_out_and_still_set_the_ttl(impl: ModuleType) -> None:
    private = Value(2, "EMAIL", b"secret", ttl=5, permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE)
    record = Record(parse_identifier("88.1/P"), (Value(1, "URL", b"u", ttl=600), private, Value(3, "X", b"x")), 4)
    answer = resolution_pb2.ResolveResponse.FromString(impl.anonymous_response(encode_record(record)))
    assert [v.index for v in answer.record.values] == [1, 3] and answer.record.version == 4
    assert answer.ttl == 5  # the record's TTL: the least of all its values', as the Python path says
    only_private = Record(parse_identifier("88.1/Q"), (private,), 1)
    assert impl.anonymous_response(encode_record(only_private)) == python_path_answer(encode_record(only_private))
    empty = encode_record(Record(parse_identifier("88.1/E"), ()))
    assert resolution_pb2.ResolveResponse.FromString(impl.anonymous_response(empty)).ttl == 86400


NAME = field(0x0A, b"88.1/X")


@pytest.mark.parametrize(
    ("stored", "why"),
    [
        (NAME + field(0x12, URL + field(0x20, 1)), "an absolute TTL: the answer changes with time"),
        (NAME + field(0x12, field(0x20, 2) + field(0x28, 5)), "an unknown TTL type (the Python path refuses it)"),
        (NAME + field(0x12, field(0x08, 1) + field(0x38, 0x12)), "unknown permission bits (refused)"),
        (NAME + field(0x12, URL) + field(0x18, 1) + field(0x20, 3), "an unknown field (dropped on re-encoding)"),
        (NAME + field(0x18, 1) + field(0x12, URL), "fields out of order"),
        (NAME + field(0x12, field(0x12, b"URL") + field(0x08, 1)), "value fields out of order"),
        (NAME + NAME, "a scalar field twice (the last one wins)"),
        (NAME + field(0x18, 0), "a zero the encoder would omit"),
        (NAME + field(0x12, field(0x12, b"")), "an empty string the encoder would omit"),
        (NAME + b"\x18\x81\x00", "a varint longer than needed"),
        (NAME + field(0x12, field(0x28, 2**32)), "a TTL past 32 bits (truncated by the decoder)"),
        (NAME + field(0x12, field(0x12, b"\xff")), "a type that is not UTF-8 (the decoder refuses it)"),
        (NAME + field(0x12, field(0x42, field(0x10, 0))), "a reference with an explicit zero index"),
        (field(0x0A, b"88.1/a\x01"), "an identifier breaking the grammar (the Python path refuses it)"),
        (field(0x0A, b"88.1"), "an identifier without suffix"),
        (field(0x12, URL), "no identifier"),
        (NAME + b"\x12\x05\x08", "truncated"),
        (b"", "empty"),
    ],
)
def test_what_only_the_python_path_may_answer_is_left_to_it(impl: ModuleType, stored: bytes, why: str) -> None:
    assert impl.anonymous_response(stored) is None, why


def reference_digests(stored: bytes, salt: bytes) -> tuple[bytes, bytes] | None:
    """resolver.attestation's digests of the values the Python path decodes from ``stored``."""
    try:
        values = decode_record(stored).values
    except (DecodeError, IdisError):
        return None
    return public_part(values), private_digest(values, salt)


@settings(max_examples=400, deadline=None)
@given(stored_records, st.binary(max_size=16))
def test_record_digests_are_the_attestations_digests_of_the_decoded_values(record: Record, salt: bytes) -> None:
    stored = encode_record(record)
    indexes = [v.index for v in record.values]
    plain = (
        all(indexes) and indexes == sorted(set(indexes)) and all(v.ttl_type is TtlType.RELATIVE for v in record.values)
    )
    for name in IMPLS:
        got = IMPLEMENTATIONS[name].record_digests(stored, salt)
        assert got is not None or not plain, name  # every record the node writes is taken
        assert got is None or got == reference_digests(stored, salt), name


def test_record_digests_are_salted_and_leave_out_order_they_cannot_take(impl: ModuleType) -> None:
    public = Record(parse_identifier("88.1/P"), (Value(1, "URL", b"u"),), 1)
    assert impl.record_digests(encode_record(public), b"s") == (public_part(public.values), private_digest([], b"s"))
    secret = Value(2, "EMAIL", b"e", permissions=Permission.ADMIN_READ)
    both = encode_record(Record(parse_identifier("88.1/P"), (Value(1, "URL", b"u"), secret), 1))
    assert impl.record_digests(both, b"s")[1] != impl.record_digests(both, b"t")[1]  # salted
    assert impl.record_digests(both, b"s")[0] == public_part(public.values)  # the secret not in it
    reversed_ = (
        field(0x0A, b"88.1/X")
        + field(0x12, field(0x08, 2) + field(0x12, b"A"))
        + field(0x12, field(0x08, 1) + field(0x12, b"B"))
    )
    assert impl.record_digests(reversed_, b"s") is None  # out of index order: the Python path's
    assert impl.record_digests(both, b"s" * 255)[1] == private_digest([secret], b"s" * 255)
    with pytest.raises(ValueError):  # a salt's length is one byte of what the digest hashes
        impl.record_digests(both, b"s" * 256)


@settings(max_examples=200, deadline=None)
@given(st.lists(stored_records, min_size=1, max_size=4), st.binary(min_size=1, max_size=32))
def test_record_leaves_are_the_attestations_leaves(records: list[Record], secret: bytes) -> None:
    """The leaves a signing node hashes in one call (salts included) are ``stored_leaf``'s, the
    reference made from decoded values; the same in both implementations."""
    keys = [r.identifier.key for r in records]
    versions = [r.version for r in records]
    stored = [encode_record(r) for r in records]
    salts = [IMPLEMENTATIONS[name].record_salt(secret, keys[0], versions[0]) for name in IMPLS]
    assert len(set(salts)) == 1 and len(salts[0]) == 16
    for name in IMPLS:
        leaves = IMPLEMENTATIONS[name].record_leaves(keys, versions, stored, secret)
        for key, version, data, leaf in zip(keys, versions, stored, leaves, strict=True):
            salt = IMPLEMENTATIONS[name].record_salt(secret, key, version)
            if leaf is None:  # left to the Python path exactly when record_digests leaves it
                assert IMPLEMENTATIONS[name].record_digests(data, salt) is None, name
                continue
            digests = reference_digests(data, salt)
            assert digests is not None and leaf == leaf_hash(key, version, *digests), name


def test_record_leaves_are_salted_per_record_and_version(impl: ModuleType) -> None:
    record = encode_record(Record(parse_identifier("88.1/P"), (Value(1, "URL", b"u"),), 1))
    a, b, c = impl.record_leaves(["88.1/P", "88.1/Q", "88.1/P"], [1, 1, 2], [record] * 3, b"secret")
    assert len({a, b, c}) == 3
    assert impl.record_leaves(["88.1/P"], [1], [record], b"other") != [a]
    with pytest.raises(ValueError, match="differ in length"):
        impl.record_leaves(["88.1/P"], [1, 2], [record], b"secret")


def rfc9162_root(leaves: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1's MTH over leaf hashes, written from the RFC: split at the largest
    power of two below the size."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + rfc9162_root(leaves[:k]) + rfc9162_root(leaves[k:])).digest()


def test_tree_levels_end_in_the_rfc_9162_root(impl: ModuleType) -> None:
    for size in [*range(1, 40), 64, 100, 2000]:
        leaves = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size)]
        levels = impl.tree_levels(leaves)
        assert levels[0] == b"".join(leaves) and levels[-1] == rfc9162_root(leaves), size
        assert [len(level) for level in levels][-1] == 32
    with pytest.raises(ValueError, match="at least one leaf"):
        impl.tree_levels([])
    with pytest.raises(ValueError, match="32-byte"):
        impl.tree_levels([b"short"])


@st.composite
def damaged_records(draw: st.DrawFn) -> bytes:
    """A stored record with a few bytes changed, inserted or removed, or bytes glued on."""
    data = bytearray(encode_record(draw(stored_records)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["set", "insert", "delete", "append"]))
        byte = draw(st.integers(0, 255))
        if how == "set" and at < len(data):
            data[at] = byte
        elif how == "insert":
            data.insert(at, byte)
        elif how == "delete" and at < len(data):
            del data[at]
        else:
            data += draw(st.binary(max_size=6))
    return bytes(data)


@settings(max_examples=1500, deadline=None)
@given(damaged_records() | st.binary(max_size=40))
def test_anything_it_answers_is_what_the_python_path_answers(stored: bytes) -> None:
    expected = python_path_answer(stored)
    answers = [IMPLEMENTATIONS[name].anonymous_response(stored) for name in IMPLS]
    assert all(a == answers[0] for a in answers)
    assert answers[0] is None or answers[0] == expected
    digests = [IMPLEMENTATIONS[name].record_digests(stored, b"salt") for name in IMPLS]
    assert all(d == digests[0] for d in digests)
    assert digests[0] is None or digests[0] == reference_digests(stored, b"salt")


@pytest.mark.parametrize("size", [0, 1, 110, 111, 125, 126, 20000])
def test_answer_item_frames_a_response_as_the_python_path_does(impl: ModuleType, size: int) -> None:
    record = record_pb2.Record(identifier="88.1/x", values=[record_pb2.Value(data=b"d" * size)])
    response = resolution_pb2.ResolveResponse(record=record)
    item = resolution_pb2.ResolveBatchItem(status=record_pb2.ItemStatus(code=0), response=response)
    assert impl.answer_item(response.SerializeToString()) == frame_batch_item(item.SerializeToString())


def test_identifier_of_picks_the_plain_requests(impl: ModuleType) -> None:
    assert impl.identifier_of(one("88.7.X/SN-1")) == (b"88.7.X/SN-1", b"88.7.X/SN-1")
    assert impl.identifier_of(one("88.7.x/sn-1")) == (b"88.7.X/sn-1", b"88.7.x/sn-1")  # the prefix folded
    assert impl.identifier_of(one("88.7/SN-1", types=["URL"])) is None  # filters: the Python path
    assert impl.identifier_of(one("88.7/SN-1", indexes=[1])) is None
    assert impl.identifier_of(one("88.7/SN-1", recursive=True)) is None
    assert impl.identifier_of(one("88.7/")) is None  # refused by the grammar
    assert impl.identifier_of(b"\xff") is None and impl.identifier_of(b"") is None
    many = batch("88.7/A", "88.7/B") + one("88.7/C", types=["URL"])  # not a batch item: malformed
    assert impl.identifiers_of(many) is None
    mixed = batch_request(b"88.7/A", b"88.7/\x00", b"88.a/B")
    assert impl.identifiers_of(mixed) == [(b"88.7/A", b"88.7/A"), None, (b"88.A/B", b"88.a/B")]
    assert impl.identifiers_of(b"") == [] and impl.identifiers_of(b"\x0a\x05ab") is None


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(identifiers_near("88.100", "88.7.X/SN-1"))
def test_identifier_of_takes_exactly_the_grammatical_identifiers(raw: bytes) -> None:
    identifier = parsed(raw)
    expected = None if identifier is None else (identifier.key.encode(), raw)
    for name in IMPLS:
        assert IMPLEMENTATIONS[name].identifier_of(resolve_request(raw)) == expected
        assert IMPLEMENTATIONS[name].identifiers_of(batch_request(raw, b"88.1/x")) == [expected, (b"88.1/x",) * 2]


# --- the Handle protocol's miss path: handle_values ---------------------------------------------


def python_path_handle_values(stored: bytes) -> bytes | None:
    """What nodes/handle/answers.py's Python path caches for a plain request: the values section
    of the public values (None where the compiled path must leave the record to it)."""
    try:
        record = decode_record(stored)
    except (DecodeError, IdisError):
        return None
    public = [v for v in record.values if v.publicly_readable]
    if not public or any(v.ttl_type is TtlType.ABSOLUTE for v in record.values):
        return None
    if any(v.type == ADMIN_TYPE for v in public):
        return None
    return values_section(public)


@settings(max_examples=400, deadline=None)
@given(stored_records)
def test_handle_values_is_the_python_paths_values_section_byte_for_byte(record: Record) -> None:
    stored = encode_record(record)
    expected = python_path_handle_values(stored)
    for name in IMPLS:
        assert IMPLEMENTATIONS[name].handle_values(stored) == expected, name


def test_handle_values_leaves_admin_values_and_private_only_records_to_the_python_path(impl: ModuleType) -> None:
    private = Value(2, "EMAIL", b"secret", permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE)
    url = Value(1, "URL", b"https://f1.example.com/p/1", timestamp=1795824000)
    record = Record(parse_identifier("88.100.1/SN-0001"), (url, private), 3)
    section = impl.handle_values(encode_record(record))
    # B.8's one URL value, the private one left out
    assert section == bytes.fromhex(
        "00000001 00000001 6b0a1980 00 00015180 0e 00000003 55524c 0000001a"
        "68747470733a2f2f66312e6578616d706c652e636f6d2f702f31 00000000".replace(" ", "")
    )
    assert impl.handle_values(encode_record(Record(record.identifier, (private,), 1))) is None
    admin = admin_value(100, "88.100.1/ADMIN", 300, AdminPermission.ADD_HANDLE)
    assert impl.handle_values(encode_record(Record(record.identifier, (url, admin), 1))) is None


@pytest.mark.parametrize(
    ("stored", "why"),
    [
        (NAME + field(0x12, URL + field(0x20, 1)), "an absolute TTL"),
        (NAME + field(0x18, 1) + field(0x12, URL), "fields out of order"),
        (NAME + b"\x12\x05\x08", "truncated"),
        (b"", "empty"),
    ],
)
def test_handle_values_leaves_what_anonymous_response_leaves(impl: ModuleType, stored: bytes, why: str) -> None:
    assert impl.handle_values(stored) is None, why


@settings(max_examples=1000, deadline=None)
@given(damaged_records())
def test_handle_values_of_damaged_records_agree_and_never_crash(stored: bytes) -> None:
    answers = {name: IMPLEMENTATIONS[name].handle_values(stored) for name in IMPLS}
    assert len(set(answers.values())) == 1, answers
    assert next(iter(answers.values())) in (None, python_path_handle_values(stored))
