"""Deterministic synthetic registrations: the same seed gives the same identifiers and values.

``registrations`` yields one enterprise prefix's identifiers in key order (so bulk imports
append to the B-tree instead of splitting pages). ``wuhan_model`` describes the Wuhan national
top-level node as of July 2020: 7 secondary (industry) nodes, their enterprise prefixes, 25 of
them running enterprise nodes of their own, and a total number of registrations spread over
the enterprises with a Zipf-like skew (a few large manufacturers, many small ones).
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import hashlib
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from resolver.identifier import parse_prefix
from resolver.record import DEFAULT_PERMISSIONS, DEFAULT_TTL, Value
from resolver.wire import record_pb2

CLASSES = sorted(["BEARING", "CABLE", "GEAR", "MOTOR", "PANEL", "PUMP", "SENSOR", "VALVE"])
EPOCH = dt.date(2018, 1, 1)
SECONDARY_CODES = (100, 101, 102, 103, 104, 105, 106)


@functools.lru_cache(maxsize=4096)
def _day(days: int) -> str:
    return f"{EPOCH + dt.timedelta(days=days):%Y%m%d}"


def suffix(serial: int, count: int) -> str:
    """An electronics-industry style suffix, ``class.model.date.serial``, increasing with serial."""
    cls = CLASSES[serial * len(CLASSES) // count]
    model = 100 + serial * 899 // count
    return f"{cls}.{cls[0]}{model:03d}.{_day(serial * 3000 // count)}.{serial:09d}"


def registration_fields(
    prefix: str, count: int, seed: int = 1, start: int = 0, stop: int | None = None
) -> Iterator[tuple[str, list[tuple[int, str, bytes]]]]:
    """(suffix, [(index, type, data)]) of identifiers ``start``..``stop`` of the ``count`` under
    ``prefix``, in key order, 2-5 values each. Each one depends only on (seed, prefix, serial),
    so any range can be made alone."""
    salt = f"{seed}:{prefix}:".encode()
    email = f"quality@{prefix.replace('.', '-')}.example.com".encode()
    base = f"https://id.example.com/{prefix}/"
    for serial in range(start, count if stop is None else min(stop, count)):
        sfx = suffix(serial, count)
        _cls, model, date, _ = sfx.split(".")
        draw = int.from_bytes(hashlib.blake2b(salt + str(serial).encode(), digest_size=8).digest(), "big")
        fields = [(1, "URL", (base + sfx).encode())]
        extra = (
            ("PRODUCT_MODEL", model.encode()),
            ("MANUFACTURE_DATE", date.encode()),
            ("BATCH", f"B{(draw >> 8) % 10**6:06d}".encode()),
            ("EMAIL", email),
        )
        for index, (type_, data) in enumerate(extra[: 1 + draw % 4], start=2):
            fields.append((index, type_, data))
        yield sfx, fields


def registrations(
    prefix: str, count: int, seed: int = 1, start: int = 0, stop: int | None = None, timestamp: int = 0
) -> Iterator[tuple[str, list[Value]]]:
    """``registration_fields`` as (identifier, values) for clients and the registry.
    ``timestamp``: the values' (what a node stores; 0 for what a client sends)."""
    for sfx, fields in registration_fields(prefix, count, seed, start, stop):
        yield f"{prefix}/{sfx}", [Value(i, t, d, timestamp=timestamp) for i, t, d in fields]


def registration_wire(
    prefix: str, count: int, seed: int, start: int, stop: int, timestamp: int
) -> Iterator[tuple[str, bytes]]:
    """(key, wire form) of the same registrations as a node stores them at version 1: the bytes
    ``resolver.wire.encode_record`` gives (tested), built as protobuf messages directly, without
    the domain objects (the bulk importer's hot loop: about 40% cheaper)."""
    key_prefix = parse_prefix(prefix).key
    value, record = record_pb2.Value, record_pb2.Record
    ttl, permissions = DEFAULT_TTL, int(DEFAULT_PERMISSIONS)
    for sfx, fields in registration_fields(prefix, count, seed, start, stop):
        values = [
            value(index=i, type=t, data=d, ttl=ttl, timestamp=timestamp, permissions=permissions) for i, t, d in fields
        ]
        yield f"{key_prefix}/{sfx}", record(identifier=f"{prefix}/{sfx}", values=values, version=1).SerializeToString()


def _columns(pairs: Iterator[tuple[str, bytes]]) -> tuple[list[str], list[bytes]]:
    made = list(pairs)
    return [k for k, _ in made], [w for _, w in made]


def registration_columns(
    prefix: str, count: int, seed: int, start: int, stop: int, timestamp: int
) -> tuple[list[str], list[bytes]]:
    """``registration_wire`` as two lists (keys, wire forms), made by its compiled twin
    (bench/_registrations.pyx, about 6x cheaper) unless the package was built without it."""
    try:
        from bench._registrations import registration_wire_columns
    except ImportError:  # IDIS_PURE_PYTHON=1: the definition itself
        return _columns(registration_wire(prefix, count, seed, start, stop, timestamp))
    try:
        return registration_wire_columns(
            prefix, parse_prefix(prefix).key, count, seed, start, stop, timestamp, DEFAULT_TTL, int(DEFAULT_PERMISSIONS)
        )
    except (ValueError, OverflowError):  # what the compiled one does not make (see its checks)
        return _columns(registration_wire(prefix, count, seed, start, stop, timestamp))


@dataclass
class WuhanModel:
    total: int
    secondaries: list[str]
    counts: dict[str, int]
    """Registrations per enterprise prefix."""
    own_nodes: list[str] = field(default_factory=list)
    """Enterprise prefixes served by the enterprise's own node (delegated by the secondary)."""

    def prefixes_under(self, apex: str, own_nodes: bool = True) -> list[str]:
        """Enterprise prefixes at or below ``apex``, in key order; without those served by
        their own node (which a secondary node delegates) when ``own_nodes`` is False."""
        chosen = [p for p in self.counts if p == apex or p.startswith(apex + ".") or apex == "88"]
        if not own_nodes:
            chosen = [p for p in chosen if p not in self.own_nodes or p == apex]
        return sorted(chosen, key=lambda p: p + "/")

    def registrations_under(
        self, apex: str, seed: int = 1, own_nodes: bool = True
    ) -> Iterator[tuple[str, list[Value]]]:
        for prefix in self.prefixes_under(apex, own_nodes):
            yield from registrations(prefix, self.counts[prefix], seed)


def wuhan_model(total: int, enterprises_per_secondary: int = 40, own_nodes: int = 25, seed: int = 2020) -> WuhanModel:
    rng = random.Random(seed)
    secondaries = [f"88.{code}" for code in SECONDARY_CODES]
    enterprises = [f"{s}.{n}" for s in secondaries for n in range(1, enterprises_per_secondary + 1)]
    rng.shuffle(enterprises)
    weights = [1.0 / (rank + 1) for rank in range(len(enterprises))]
    scale = total / sum(weights)
    counts = {p: int(w * scale) for p, w in zip(enterprises, weights, strict=True)}
    counts[enterprises[0]] += total - sum(counts.values())  # exact total
    return WuhanModel(total, secondaries, {p: c for p, c in counts.items() if c}, sorted(enterprises[:own_nodes]))


class KeySpace:
    """Identifiers 0..n-1 over several prefixes, any one made on demand (no list held)."""

    def __init__(self, prefix_counts: list[tuple[str, int]]) -> None:
        self.prefixes = [p for p, c in prefix_counts if c]
        self.counts = [c for _, c in prefix_counts if c]
        self.starts = list(itertools.accumulate([0, *self.counts[:-1]]))
        self.total = sum(self.counts)

    def __len__(self) -> int:
        return self.total

    def identifier(self, i: int) -> str:
        j = bisect.bisect_right(self.starts, i) - 1
        return f"{self.prefixes[j]}/{suffix(i - self.starts[j], self.counts[j])}"
