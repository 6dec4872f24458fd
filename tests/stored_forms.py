"""Records in the forms a node's database may hold them in, for the tests that hold the miss path
(answers built from the stored bytes, ``resolver.cache.anonymous_response``) to the Python path.

The miss path keeps no flag or column of its own: it decides from the stored bytes alone, so a
database written before it existed is served as it is. ``write_database`` writes such a file
directly, the way the code before it did: records stored before the database had a compression
dictionary (as they are) and after (compressed); public and private values, an absolute TTL, no
values, a prefix spelt in lower case; and forms another encoder may have written (fields out of
order, explicit zeros, unknown fields, long varints, a field twice), which decode fine but which
only the Python path may answer, since re-encoding changes their bytes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from nodes.storage import RecordRow
from nodes.storage.sqlite import SqliteStore
from resolver.identifier import parse_identifier
from resolver.record import Permission, Record, TtlType, Value
from resolver.wire import encode_record, varint

APEX = "88.EX"

PUBLIC = Value(1, "URL", b"https://example.com/x", ttl=600, timestamp=1_700_000_000)
PRIVATE = Value(2, "EMAIL", b"owner@example.com", ttl=30, permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE)
ABSOLUTE = Value(3, "EXPIRES", b"2096", ttl=4_000_000_000, ttl_type=TtlType.ABSOLUTE)


def field(tag: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint when ``payload`` is an int, else length-delimited."""
    if isinstance(payload, int):
        return bytes([tag]) + varint(payload)
    return bytes([tag]) + varint(len(payload)) + payload


URL = field(0x08, 1) + field(0x12, b"URL") + field(0x1A, b"https://example.com/y") + field(0x28, 60) + field(0x38, 0xE)
"""A value in the encoder's form, publicly readable."""


def foreign_forms(tag: str) -> dict[str, bytes]:
    """Decodable records whose bytes re-encoding changes (only the Python path answers them), by key."""

    def name(suffix: str) -> bytes:
        return field(0x0A, f"{APEX}/{tag}{suffix}".encode())

    return {
        f"{APEX}/{tag}REVERSED": field(0x18, 3) + field(0x12, URL) + name("REVERSED"),
        f"{APEX}/{tag}ZERO": name("ZERO") + field(0x12, URL + field(0x20, 0)),
        f"{APEX}/{tag}UNKNOWN": name("UNKNOWN") + field(0x12, URL) + field(0x78, 7),
        f"{APEX}/{tag}LONG": name("LONG") + field(0x12, URL) + b"\x18\x85\x80\x00",
        f"{APEX}/{tag}TWICE": name("OLD-NAME") + field(0x12, URL) + name("TWICE"),
    }


def records(tag: str) -> list[Record]:
    """The records written in the encoder's own form (``tag`` tells two generations apart)."""

    def record(suffix: str, *values: Value, display: str = APEX) -> Record:
        return Record(parse_identifier(f"{display}/{tag}{suffix}"), values, 1)

    return [
        record("PUBLIC", PUBLIC),
        record("PRIVATE", PUBLIC, PRIVATE, Value(9, "NOTE", "注意".encode(), ttl=90)),
        record("ONLY-PRIVATE", PRIVATE),
        record("ABSOLUTE", PUBLIC, ABSOLUTE),
        record("EMPTY"),
        record("Mixed", PUBLIC, display="88.ex"),
    ]


SLOW = {"ABSOLUTE", "REVERSED", "ZERO", "UNKNOWN", "LONG", "TWICE"}
"""Suffixes (after the generation tag) that only the Python path answers."""


def slow(identifier: str) -> bool:
    """True for the identifiers of ``write_database`` that only the Python path answers."""
    return identifier.partition("/")[2][2:] in SLOW


def asked(identifiers: list[str]) -> list[str]:
    """Every identifier, also with its prefix in the other case, and identifiers without records."""
    spellings = [i.partition("/")[0].swapcase() + "/" + i.partition("/")[2] for i in identifiers]
    return [*identifiers, *spellings, f"{APEX}/NONE", f"{APEX.lower()}/NONE"]


async def write_database(path: Path) -> list[str]:
    """Writes the records into a new database at ``path``: the first generation stored as they
    are (no dictionary yet), then, once a dictionary is trained, a compressed one; each foreign
    form both ways. Returns every identifier, as its record spells it."""
    samples = [
        encode_record(Record(parse_identifier(f"{APEX}/SAMPLE-{n}"), (PUBLIC, Value(2, "N", b"%d" % n)), 1))
        for n in range(2000)
    ]
    written: list[tuple[str, int, bytes]] = []
    store = await SqliteStore.open(path)
    try:
        await store.insert_many([RecordRow(r.identifier.key, 1, encode_record(r)) for r in records("A-")])
        written += [(key, 1, raw) for key, raw in foreign_forms("A-").items()]
        await store.train_dictionary(samples)
        await store.insert_many([RecordRow(r.identifier.key, 1, encode_record(r)) for r in records("B-")])
        written += [(key, 1, store.compression.encode(raw)) for key, raw in foreign_forms("B-").items()]
    finally:
        await store.close()
    with sqlite3.connect(path) as db:  # as another encoder left them: bytes the Store never made
        db.executemany("INSERT INTO identifiers (key, version, record) VALUES (?, ?, ?)", written)
    identifiers = [r.identifier.display for tag in ("A-", "B-") for r in records(tag)]
    return identifiers + [key for key, _, _ in written]
