"""The pure-Python twin of ``resolver._cache``: the same interface and the same behaviour, used
when the compiled module is missing (and as the baseline the compiled one is measured against).

S3-FIFO as in the compiled module, except that the ghost queue is an exact bounded FIFO of keys
rather than a table of hash fingerprints.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import re
import socket
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, cast

from resolver.handle_protocol import values_section
from resolver.identifier import MAX_IDENTIFIER_BYTES, MAX_PREFIX_BYTES
from resolver.record import ADMIN_TYPE, DEFAULT_PERMISSIONS, DEFAULT_TTL
from resolver.template import REFERENCE_TYPE, Template, check_fields, exposed, fields_of
from resolver.wire import decode_record
from resolver.wire import varint as _varint

POSITIVE = 1
NEGATIVE = 2
MAX_KEY = 255
_MAX_IDENTIFIER = min(MAX_IDENTIFIER_BYTES, MAX_KEY)
_BE32 = struct.Struct(">I")
# Handle protocol op flags (resolver/handle_protocol.py Flag).
_HANDLE_AT = 0x80000000
_HANDLE_ENC = 0x20000000
_HANDLE_REC = 0x10000000
_HANDLE_RD = 0x00800000
_HANDLE_ECHOED = 0xE9900000  # AT, CT, ENC, CA, PO, RD, DNRF


def normalise_key(identifier: bytes) -> bytes:
    """The cache key of an identifier given as UTF-8: the prefix upper-cased (ASCII only)."""
    cut = identifier.find(b"/")
    if cut < 0:
        return identifier.upper()
    return identifier[:cut].upper() + identifier[cut:]


# The grammar of resolver/identifier.py over UTF-8 bytes, checked with C-speed scans (a regular
# expression walking every byte of the suffix would cost several times more).
_PREFIX_RE = re.compile(rb"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*/")
_ASCII_CONTROLS = bytes(range(0x20)) + b"\x7f"
_C1_CONTROL_RE = re.compile(rb"\xc2[\x80-\x9f]")  # U+0080-U+009F, in valid UTF-8


def _valid_text(data: bytes) -> bool:
    """True when ``data`` is UTF-8 without the control characters U+0000-U+001F and
    U+007F-U+009F (the suffix-char of the grammar)."""
    if len(data.translate(None, _ASCII_CONTROLS)) != len(data):
        return False
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _C1_CONTROL_RE.search(data) is None


def _identifier_key(identifier: bytes) -> bytes | None:
    """The cache key of an identifier given as UTF-8, or None when it breaks the grammar (the
    compiled module makes the same checks in one pass over the bytes)."""
    prefix = _PREFIX_RE.match(identifier)
    if prefix is None:
        return None
    cut = prefix.end() - 1
    if cut > MAX_PREFIX_BYTES or not cut + 1 < len(identifier) <= MAX_IDENTIFIER_BYTES:
        return None
    if not _valid_text(identifier):
        return None
    return identifier[:cut].upper() + identifier[cut:]


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("bad varint")


LOG_HEADER = 64
LOG_ENTRY = 272
LOG_KEY = 1
LOG_PREFIX = 2


class ChangeLog:
    """Invalidations published by the worker that took a write, for every worker to apply
    (the layout of ``resolver._cache.ChangeLog``, without its atomic loads and stores)."""

    def __init__(self, path: str | os.PathLike[str], capacity: int = 8192, create: bool = False) -> None:
        if create:
            with open(path, "wb") as fh:
                fh.truncate(LOG_HEADER + capacity * LOG_ENTRY)
        self._file = open(path, "r+b")  # noqa: SIM115 - closed in close()
        size = os.fstat(self._file.fileno()).st_size
        self.capacity = (size - LOG_HEADER) // LOG_ENTRY
        if self.capacity <= 0:
            raise ValueError(f"{path} is not a change log")
        self._map = mmap.mmap(self._file.fileno(), size)

    @property
    def sequence(self) -> int:
        return int(struct.unpack_from("<Q", self._map, 0)[0])

    def append(self, kind: int, key: bytes) -> int:
        if len(key) > 256:
            raise ValueError("key too long for the change log")
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        try:
            seq = self.sequence + 1
            at = LOG_HEADER + (seq % self.capacity) * LOG_ENTRY
            struct.pack_into("<II", self._map, at + 8, kind, len(key))
            self._map[at + 16 : at + 16 + len(key)] = key
            struct.pack_into("<Q", self._map, at, seq)
            struct.pack_into("<Q", self._map, 0, seq)
        finally:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        return seq

    def entries_after(self, seen: int) -> tuple[int, list[tuple[int, bytes]] | None]:
        last = self.sequence
        if last - seen > self.capacity:
            return last, None
        out = []
        for s in range(seen + 1, last + 1):
            at = LOG_HEADER + (s % self.capacity) * LOG_ENTRY
            seq, kind, n = struct.unpack_from("<QII", self._map, at)
            if seq != s:
                return last, None
            out.append((kind, bytes(self._map[at + 16 : at + 16 + n])))
        return last, out

    def close(self) -> None:
        self._map.close()
        self._file.close()


def _kind_and_value(entry: _Entry | None) -> tuple[int, bytes] | None:
    return None if entry is None else (NEGATIVE if entry.negative else POSITIVE, entry.value)


class _Entry:
    __slots__ = ("expires", "freq", "key", "live", "main", "negative", "value")

    def __init__(self, key: bytes, value: bytes, expires: int, negative: bool) -> None:
        self.key = key
        self.value = value
        self.expires = expires
        self.negative = negative
        self.freq = 0
        self.main = False
        self.live = True


class LookupCache:
    """Bytes keys to bytes values, bounded by entries and bytes, with per-entry TTLs."""

    def __init__(
        self, max_entries: int = 100000, max_bytes: int = 256 * 1024 * 1024, clock: Callable[[], float] | None = None
    ) -> None:
        if not 0 < max_entries <= 0x7FFFFFF0:
            raise ValueError("max_entries must be in 1..2147483632")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock or time.monotonic
        self._epoch = self._clock()
        self._map: dict[bytes, _Entry] = {}
        self._small: deque[_Entry] = deque()
        self._main: deque[_Entry] = deque()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._nbytes = 0
        self._expire_cursor = 0
        self.hits = self.misses = self.insertions = self.evictions = 0
        self.expirations = self.invalidations = self._generation = 0
        self._log: ChangeLog | None = None
        self._log_seen = 0

    # --- the shared change log ---------------------------------------------------------------

    def attach(self, log: ChangeLog) -> None:
        """Follow ``log``: changes published there are applied before every lookup."""
        self._log = log
        self._log_seen = log.sequence

    def sync(self) -> None:
        """Applies the changes other workers published (lookups do this by themselves)."""
        if self._log is None or self._log.sequence == self._log_seen:
            return
        self._log_seen, changes = self._log.entries_after(self._log_seen)
        if changes is None:
            self.clear()
            return
        for kind, key in changes:
            if kind == LOG_PREFIX:
                self.invalidate_prefix(key)
            else:
                self.invalidate(key)

    @property
    def generation(self) -> int:
        """Advances with every invalidation, here or published by another worker."""
        self.sync()
        return self._generation

    def _now(self) -> int:
        return max(0, int(self._clock() - self._epoch))

    def _drop(self, entry: _Entry) -> None:
        del self._map[entry.key]
        entry.live = False
        self._nbytes -= len(entry.key) + len(entry.value)

    def _release(self, entry: _Entry, expired: bool) -> None:
        """Drops an entry just popped from its queue, counting why."""
        self._drop(entry)
        if expired:
            self.expirations += 1
        else:
            self.evictions += 1

    def _evict_one(self, now: int) -> bool:
        while self._map:
            if self._small and (len(self._small) * 10 >= len(self._map) or not self._main):
                entry = self._small.popleft()
                if not entry.live:
                    continue
                if entry.expires <= now:
                    self._release(entry, expired=True)
                    return True
                if entry.freq:
                    entry.freq = 0
                    entry.main = True
                    self._main.append(entry)
                    continue
                self._ghost[entry.key] = None
                while len(self._ghost) > self.max_entries:
                    self._ghost.popitem(last=False)
                self._release(entry, expired=False)
                return True
            if not self._main:
                continue
            entry = self._main.popleft()
            if not entry.live:
                continue
            if entry.expires <= now or not entry.freq:
                self._release(entry, expired=entry.expires <= now)
                return True
            entry.freq -= 1  # read since it was last here: one more round, one count less
            self._main.append(entry)
        return False

    def _probe(self, key: bytes, now: int) -> _Entry | None:
        entry = self._map.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            self._drop(entry)
            self.expirations += 1
            return None
        if entry.freq < 3:
            entry.freq += 1
        return entry

    def _lookup(self, key: bytes, now: int) -> _Entry | None:
        entry = self._probe(key, now)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def lookup(self, key: bytes) -> tuple[int, bytes] | None:
        """``(POSITIVE or NEGATIVE, value)`` for a live entry, else None."""
        self.sync()
        return _kind_and_value(self._lookup(key, self._now()))

    def get(self, key: bytes) -> bytes | None:
        """The value of a live positive entry, else None."""
        self.sync()
        entry = self._lookup(key, self._now())
        return None if entry is None or entry.negative else entry.value

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        self.sync()
        now = self._now()
        out: list[bytes | None] = []
        for key in keys:
            entry = self._lookup(key, now)
            out.append(None if entry is None or entry.negative else entry.value)
        return out

    def remaining_ttl(self, key: bytes) -> float:
        entry = self._map.get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry.expires - (self._clock() - self._epoch))

    def set(self, key: bytes, value: bytes, ttl: float, negative: bool = False, if_generation: int = -1) -> bool:
        """Stores ``value`` for ``ttl`` seconds (whole seconds, rounded up); ttl <= 0 removes.

        With ``if_generation``, stores only if no invalidation happened since the generation
        was read (the value may be stale otherwise); returns whether it stored.
        """
        if not 0 < len(key) <= MAX_KEY:
            raise ValueError("keys must be 1..255 bytes")
        self.sync()
        if if_generation >= 0 and if_generation != self._generation:
            return False
        now = self._now()
        size = len(key) + len(value)
        existing = self._map.get(key)
        if ttl <= 0 or size > self.max_bytes:
            if existing is not None:
                self._drop(existing)
            return False
        expires = min(math.ceil((self._clock() - self._epoch) + ttl), 4_000_000_000)
        if existing is not None:
            self._nbytes += len(value) - len(existing.value)
            existing.value, existing.expires, existing.negative = value, expires, negative
            self.insertions += 1
            while self._nbytes > self.max_bytes and self._evict_one(now):
                pass
            return True
        while self._map and (len(self._map) >= self.max_entries or self._nbytes + size > self.max_bytes):
            if not self._evict_one(now):
                break
        if len(self._small) + len(self._main) > 2 * len(self._map) + 1024:
            self._small = deque(e for e in self._small if e.live)
            self._main = deque(e for e in self._main if e.live)
        entry = _Entry(key, value, expires, negative)
        if key in self._ghost:  # evicted from the small queue recently: straight to main
            del self._ghost[key]
            entry.main = True
            self._main.append(entry)
        else:
            self._small.append(entry)
        self._map[key] = entry
        self._nbytes += size
        self.insertions += 1
        return True

    def invalidate(self, key: bytes) -> bool:
        self._generation += 1
        entry = self._map.get(key)
        if entry is None:
            return False
        self._drop(entry)
        self.invalidations += 1
        return True

    def invalidate_prefix(self, prefix: bytes) -> int:
        self._generation += 1
        doomed = [
            e for k, e in self._map.items() if k == prefix or k.startswith(prefix + b"/") or k.startswith(prefix + b".")
        ]
        for entry in doomed:
            self._drop(entry)
        self.invalidations += len(doomed)
        return len(doomed)

    def clear(self) -> None:
        self._generation += 1
        for entry in list(self._map.values()):
            self._drop(entry)

    def expire(self, max_scan: int = 0) -> int:
        """Removes expired entries, scanning up to ``max_scan`` entries (0: all) from where the
        previous call stopped; returns how many it removed."""
        now = self._now()
        entries = list(self._map.values())
        if not entries:
            return 0
        limit = len(entries) if not max_scan or max_scan > len(entries) else max_scan
        start = self._expire_cursor % len(entries)
        entries = (entries[start:] + entries[:start])[:limit]
        self._expire_cursor = start + limit
        removed = 0
        for entry in entries:
            if entry.expires <= now:
                self._drop(entry)
                removed += 1
        self.expirations += removed
        return removed

    def __len__(self) -> int:
        return len(self._map)

    @property
    def held_bytes(self) -> int:
        return self._nbytes

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "insertions": self.insertions,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "invalidations": self.invalidations,
            "entries": len(self._map),
            "bytes": self._nbytes,
        }

    # --- the wire fast path ------------------------------------------------------------------

    def _resolve_item(self, item: bytes, now: int) -> _Entry | None:
        # The grammar first: an identifier the slow path refuses must reach it, to be refused there.
        plain = identifier_of(item)
        if plain is None:
            return None
        key, raw = plain
        entry = self._probe(key, now)
        if entry is not None:
            if entry.negative and key != raw:
                self.misses += 1
                return None
            self.hits += 1
            return entry
        cut = key.find(b"/")
        while cut > 0:
            entry = self._probe(key[:cut], now)
            if entry is not None and not entry.negative:
                self.hits += 1
                return entry
            cut = key.rfind(b".", 0, cut)
        self.misses += 1
        return None

    def answer_one(self, request: bytes) -> tuple[int, bytes] | None:
        self.sync()
        return _kind_and_value(self._resolve_item(request, self._now()))

    @staticmethod
    def _frame(entry: _Entry) -> bytes:
        if not entry.negative:
            return answer_item(entry.value)
        return b"\x0a" + _varint(len(entry.value)) + entry.value

    def answer_batch(self, request: bytes, max_items: int = 2000) -> bytes | list[bytes | None] | None:
        self.sync()
        now = self._now()
        found: list[_Entry | None] = []
        pos = 0
        while pos < len(request):
            if request[pos] != 0x0A or len(found) >= max_items:
                return None
            try:
                length, pos = _read_varint(request, pos + 1)
            except ValueError:
                return None
            if pos + length > len(request):
                return None
            found.append(self._resolve_item(request[pos : pos + length], now))
            pos += length
        parts = [None if e is None else self._frame(e) for e in found]
        if all(p is not None for p in parts):
            return b"".join(parts)  # type: ignore[arg-type]
        return parts

    # --- the Handle protocol (see resolver/_cache.pyx) ------------------------------------------

    def _handle_lookup(self, request: bytes, now: int) -> tuple[_Entry, int, int, int] | None:
        """The entry answering a Handle request, with the response's version and flags."""
        n = len(request)
        if n < 60 or n > 20 + 24 + 12 + _MAX_IDENTIFIER + 4:
            return None
        flags_byte = request[2]
        if flags_byte & 0xE0 or _BE32.unpack_from(request, 12)[0] != 0 or _BE32.unpack_from(request, 16)[0] != n - 20:
            return None
        major, minor = (flags_byte & 0x03, request[3]) if flags_byte & 0x03 else (request[0], request[1])
        if major < 2 or (major == 2 and minor < 1):
            return None
        if major > 2 or minor > 11:
            major, minor = 2, 11
        opcode, rc, flags = struct.unpack_from(">III", request, 20)
        if opcode != 1 or rc != 0 or flags & (_HANDLE_ENC | _HANDLE_RD):
            return None
        hl = _BE32.unpack_from(request, 44)[0]
        if not 1 <= hl <= _MAX_IDENTIFIER or 60 + hl != n or _BE32.unpack_from(request, 40)[0] != hl + 12:
            return None
        if request[48 + hl : 60 + hl] != bytes(12):
            return None
        key = _identifier_key(request[48 : 48 + hl])
        if key is None:
            return None
        entry = self._probe(key, now)
        if entry is None or (entry.negative and len(entry.value) < 8):
            self.misses += 1
            return None
        self.hits += 1
        return entry, major, minor, (flags & _HANDLE_ECHOED) | _HANDLE_REC | _HANDLE_AT

    @staticmethod
    def _handle_write(request: bytes, found: tuple[_Entry, int, int, int], wall: int, serial: int) -> bytes:
        entry, major, minor, flags = found
        hl = _BE32.unpack_from(request, 44)[0]
        if entry.negative:
            rc, body = _BE32.unpack_from(entry.value)[0], entry.value[4:]
        else:
            rc, body = 1, request[44 : 48 + hl] + entry.value
        envelope = struct.pack(">BBBB", major, minor, 2, 11) + request[4:12] + struct.pack(">II", 0, 24 + len(body) + 4)
        header = struct.pack(">IIIHBBII", 1, rc, flags, serial & 0xFFFF, request[34], 0, (wall + 43200) & 0xFFFFFFFF,
                             len(body))  # fmt: skip
        return envelope + header + body + bytes(4)

    def handle_answer(self, request: bytes, wall: int, serial: int) -> bytes | None:
        self.sync()
        found = self._handle_lookup(request, self._now())
        return None if found is None else self._handle_write(request, found, wall, serial)


# --- answers from stored records (the miss path; see resolver/_cache.pyx) --------------------

_UINT32_LIMIT = 0xFFFFFFFF


def _canonical_varint(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """(value, position after it) of a varint written as the encoder writes it (the shortest
    form, no bit past 64), else None."""
    value = shift = 0
    first = pos
    while pos < end:
        byte = data[pos]
        pos += 1
        if shift == 63 and byte > 1:
            return None
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value, pos) if byte or pos - first == 1 else None
        shift += 7
    return None


def _canonical_length(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """(length, position after it) of a length-delimited field that fits before ``end``."""
    read = _canonical_varint(data, pos, end)
    if read is None or read[0] > end - read[1]:
        return None
    return read


def _reference_ok(data: bytes, pos: int, end: int) -> bool:
    last = 0
    while pos < end:
        tag = data[pos]
        pos += 1
        if tag >> 3 <= last:
            return False
        if tag == 0x0A:  # identifier
            read = _canonical_length(data, pos, end)
            if read is None or read[0] == 0 or not _valid_text(data[read[1] : read[1] + read[0]]):
                return False
            pos = read[1] + read[0]
        elif tag == 0x10:  # index
            read = _canonical_varint(data, pos, end)
            if read is None or not 0 < read[0] <= _UINT32_LIMIT:
                return False
            pos = read[1]
        else:
            return False
        last = tag >> 3
    return True


def _scan_value(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(1 publicly readable / 0 not / -1 for the Python path, relative TTL) of a Value."""
    last = permissions = ttl = 0
    while pos < end:
        tag = data[pos]
        pos += 1
        field = tag >> 3
        if field < last or (field == last and field != 8):  # only references repeat
            return -1, 0
        if tag in (0x12, 0x1A, 0x42):  # type, data, a reference
            read = _canonical_length(data, pos, end)
            if read is None:
                return -1, 0
            n, pos = read
            if tag == 0x12 and (n == 0 or not _valid_text(data[pos : pos + n])):
                return -1, 0
            if (tag == 0x1A and n == 0) or (tag == 0x42 and not _reference_ok(data, pos, pos + n)):
                return -1, 0
            pos += n
        elif tag in (0x08, 0x28, 0x30, 0x38):  # index, ttl, timestamp, permissions
            read = _canonical_varint(data, pos, end)
            if read is None or read[0] == 0:
                return -1, 0
            value, pos = read
            if tag == 0x38:
                if value > 0xF:
                    return -1, 0
                permissions = value
            elif tag != 0x30 and value > _UINT32_LIMIT:
                return -1, 0
            elif tag == 0x28:
                ttl = value
        else:  # 0x20, ttl_type: an absolute TTL (or an unknown type); anything else is unknown
            return -1, 0
        last = field
    return (1 if permissions & 0x2 else 0), ttl


def record_digests(record: bytes, salt: bytes) -> tuple[bytes, bytes] | None:
    """(public part, private digest) of a record in wire form, from the values' wire
    forms as they lie in it; None when only the Python path may make them (see the compiled
    module)."""
    if anonymous_response(record) is None:  # the same record forms as the compiled scan_record
        return None
    public = bytearray()
    hidden = hashlib.sha256(b"idis-private" + bytes([len(salt)]) + salt)
    pos, end, last_index = 0, len(record), 0
    while pos < end:
        tag = record[pos]
        pos += 1
        if tag == 0x18:
            pos = cast(tuple[int, int], _canonical_varint(record, pos, end))[1]
            continue
        n, pos = cast(tuple[int, int], _canonical_length(record, pos, end))
        if tag == 0x12:
            index = _canonical_varint(record, pos + 1, pos + n) if n and record[pos] == 0x08 else None
            if index is None or index[0] <= last_index:
                return None
            last_index = index[0]
            chunk = n.to_bytes(4, "big") + record[pos : pos + n]
            if _scan_value(record, pos, pos + n)[0] == 1:
                public += chunk
            else:
                hidden.update(chunk)
        pos += n
    return bytes(public), hidden.digest()


LEAF_PREFIX = b"\x00idis-record-v1"
"""What a record's leaf hash begins with (resolver.attestation.leaf_hash: LEAF, RECORD_LEAF)."""


def tree_levels(leaves: list[bytes]) -> list[bytes]:
    """A Merkle tree over ``leaves`` (32-byte hashes) level by level, bottom up, each level's
    hashes concatenated: resolver.attestation.merkle_levels (RFC 9162's tree; a level's last
    node without a sibling moves up unhashed)."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    if any(len(leaf) != 32 for leaf in leaves):
        raise ValueError("a leaf is a 32-byte hash")
    level = list(leaves)
    levels = [b"".join(level)]
    while len(level) > 1:
        paired = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
        levels.append(b"".join(level))
    return levels


def record_salt(secret: bytes, key: str, version: int) -> bytes:
    """A record's salt: the keyed BLAKE2b (16 bytes) of its key and version under the node's secret."""
    return hashlib.blake2b(key.encode() + b"\x00" + version.to_bytes(8, "big"), key=secret, digest_size=16).digest()


def record_leaves(keys: list[str], versions: list[int], records: list[bytes], secret: bytes) -> list[bytes | None]:
    """The Merkle leaves (resolver.attestation.leaf_hash) of records in wire form, each salted
    with ``record_salt(secret, key, version)``; None for a record only the Python path may hash
    (see ``record_digests``)."""
    if not len(keys) == len(versions) == len(records):
        raise ValueError("keys, versions and records differ in length")
    leaves: list[bytes | None] = []
    for key, version, record in zip(keys, versions, records, strict=True):
        digests = record_digests(record, record_salt(secret, key, version))
        if digests is None:
            leaves.append(None)
            continue
        name = key.encode()
        data = LEAF_PREFIX + len(name).to_bytes(2, "big") + name + version.to_bytes(8, "big") + digests[1] + digests[0]
        leaves.append(hashlib.sha256(data).digest())
    return leaves


def anonymous_response(record: bytes) -> bytes | None:
    """The serialised ResolveResponse an anonymous reader gets for a record given in its wire
    form: the record with its publicly readable values only, and the record's TTL (the least of
    its values' TTLs); None when only the Python path may build it."""
    pos = last = 0
    end = len(record)
    kept: list[bytes] = []
    ttls: list[int] = []
    named = False
    while pos < end:
        start = pos
        tag = record[pos]
        pos += 1
        field = tag >> 3
        if field < last or (field == last and field != 2):  # only values repeat
            return None
        if tag in (0x0A, 0x12):  # identifier, a value
            read = _canonical_length(record, pos, end)
            if read is None:
                return None
            n, pos = read
            if tag == 0x0A:
                if n == 0 or n > MAX_KEY or _identifier_key(record[pos : pos + n]) is None:
                    return None
                named = True
                kept.append(record[start : pos + n])
            else:
                readable, ttl = _scan_value(record, pos, pos + n)
                if readable < 0:
                    return None
                ttls.append(ttl)
                if readable:
                    kept.append(record[start : pos + n])
            pos += n
        elif tag == 0x18:  # version
            read = _canonical_varint(record, pos, end)
            if read is None or read[0] == 0:
                return None
            pos = read[1]
            kept.append(record[start:pos])
        else:
            return None
        last = field
    if not named:
        return None
    body = b"".join(kept)
    ttl = min(ttls) if ttls else DEFAULT_TTL
    return b"\x0a" + _varint(len(body)) + body + (b"\x18" + _varint(ttl) if ttl else b"")


# --- registrations from the wire (BatchCreate's fast path; see resolver/_cache.pyx) ---------

_PlainValue = tuple[int, bytes, bytes, int, int, int]
"""index, type, data, TTL type, TTL, permissions (the write's defaults applied)."""


def _plain_value(data: bytes, pos: int, end: int, limits: tuple[int, int, int, int]) -> _PlainValue | None:
    """A Value the fast path takes, or None when the Python path must read it."""
    _, max_value_bytes, max_type_bytes, _ = limits
    last = 0
    numbers = {0x08: 0, 0x20: 0, 0x28: 0, 0x30: 0, 0x38: 0}  # index, ttl_type, ttl, timestamp, permissions
    texts = {0x12: b"", 0x1A: b""}  # type, data
    while pos < end:
        tag = data[pos]
        pos += 1
        field = tag >> 3
        if field <= last:
            return None
        if tag in texts:
            read = _canonical_length(data, pos, end)
            if read is None or read[0] == 0:
                return None
            n, pos = read
            texts[tag] = data[pos : pos + n]
            pos += n
        elif tag in numbers:
            read = _canonical_varint(data, pos, end)
            if read is None or read[0] == 0:
                return None
            numbers[tag], pos = read
        else:  # references (0x42) and unknown fields
            return None
        last = field
    index, ttl_type, ttl, _, permissions = numbers.values()
    type_, value = texts.values()
    if not 0 < index <= _UINT32_LIMIT or ttl_type > 1 or ttl > _UINT32_LIMIT or permissions > 0xF:
        return None
    if not type_ or len(type_) > max_type_bytes or not _valid_text(type_) or type_.startswith(b"HS_"):
        return None
    if len(value) > max_value_bytes:
        return None
    return index, type_, value, ttl_type, ttl or DEFAULT_TTL, permissions or int(DEFAULT_PERMISSIONS)


def _stored_value(v: _PlainValue, now: int) -> bytes:
    index, type_, value, ttl_type, ttl, permissions = v
    body = b"\x08" + _varint(index) + b"\x12" + _varint(len(type_)) + type_
    if value:
        body += b"\x1a" + _varint(len(value)) + value
    if ttl_type:
        body += b"\x20\x01"
    body += b"\x28" + _varint(ttl)
    if now:
        body += b"\x30" + _varint(now & 0xFFFFFFFFFFFFFFFF)
    body += b"\x38" + bytes([permissions])
    return b"\x12" + _varint(len(body)) + body


def _created_record(
    data: bytes, pos: int, end: int, limits: tuple[int, int, int, int], now: int
) -> tuple[str, int, bytes] | None:
    max_values, _, _, max_record_bytes = limits
    if pos >= end or data[pos] != 0x0A:
        return None
    read = _canonical_length(data, pos + 1, end)
    if read is None or not 0 < read[0] <= _MAX_IDENTIFIER:
        return None
    n, pos = read
    identifier = data[pos : pos + n]
    if _identifier_key(identifier) is None:
        return None
    pos += n
    values: list[_PlainValue] = []
    total = 0
    fields = _repeated(data, pos, end, 0x12)
    for start, stop in fields or ():
        plain = _plain_value(data, start, stop, limits)
        if plain is None or (values and plain[0] <= values[-1][0]):
            return None
        values.append(plain)
        total += len(plain[1]) + len(plain[2]) + 32
        if len(values) > max_values or total > max_record_bytes:
            return None
    if not values:
        return None
    record = b"\x0a" + _varint(n) + identifier + b"".join(_stored_value(v, now) for v in values) + b"\x18\x01"
    return identifier.decode("utf-8"), identifier.index(b"/"), record


def created_records(
    request: bytes, now: int, max_values: int, max_value_bytes: int, max_type_bytes: int, max_record_bytes: int
) -> list[tuple[str, int, bytes] | None] | None:
    """For each item of a BatchCreateRequest in wire form, the record as stored at version 1
    (see resolver/_cache.pyx), or None for the Python path; None when it holds anything but items."""
    limits = (max_values, max_value_bytes, max_type_bytes, max_record_bytes)
    items = _repeated(request, 0, len(request), 0x0A)
    if items is None:
        return None
    return [_created_record(request, start, stop, limits, now) for start, stop in items]


def count_items(request: bytes) -> int:
    """How many items a batch request in wire form holds, without decoding them; -1 when it
    holds anything else (see resolver/_cache.pyx)."""
    items = _repeated(request, 0, len(request), 0x0A)
    return -1 if items is None else len(items)


class TemplateCheck:
    """A template for ``fits``: the Python check itself (see resolver/_cache.pyx)."""

    def __init__(self, template: Template) -> None:
        self.template = template

    def fits(self, record: bytes) -> bool:
        """True when resolver.template finds no fault in ``record`` (stored wire form)."""
        try:
            values = decode_record(record).values
        except Exception:
            return False
        return not check_fields(self.template, fields_of(values)) and not exposed(self.template, values)


def template_reference(record: bytes) -> bytes | None:
    """The data of ``record``'s one TEMPLATE value; None when it has none or several, or does not
    decode (see resolver/_cache.pyx)."""
    try:
        named = [v.data for v in decode_record(record).values if v.type == REFERENCE_TYPE]
    except Exception:
        return None
    return named[0] if len(named) == 1 else None


def _repeated(data: bytes, pos: int, end: int, tag: int) -> list[tuple[int, int]] | None:
    """Where each of the length-delimited fields ``tag`` that fill data[pos:end] lies, or None
    when anything else is there."""
    out = []
    while pos < end:
        if data[pos] != tag:
            return None
        read = _canonical_length(data, pos + 1, end)
        if read is None:
            return None
        length, pos = read
        out.append((pos, pos + length))
        pos += length
    return out


def handle_values(record: bytes) -> bytes | None:
    """The values section of the Handle answer an anonymous reader gets (see resolver/_cache.pyx),
    or None when only the Python path may build it."""
    if anonymous_response(record) is None:
        return None
    public = [v for v in decode_record(record).values if v.publicly_readable]
    if not public or any(v.type == ADMIN_TYPE for v in public):
        return None
    return values_section(public)


def identifier_of(request: bytes) -> tuple[bytes, bytes] | None:
    """``(key, identifier as written)`` of a serialised ResolveRequest that asks for nothing but
    an identifier following the grammar (no filters, not recursive), else None."""
    if not request or request[0] != 0x0A:
        return None
    try:
        length, pos = _read_varint(request, 1)
    except ValueError:
        return None
    if length == 0 or length > MAX_KEY or pos + length != len(request):
        return None
    written = request[pos:]
    key = _identifier_key(written)
    return None if key is None else (key, written)


def identifiers_of(request: bytes) -> list[tuple[bytes, bytes] | None] | None:
    """``identifier_of`` each request of a serialised ResolveBatchRequest (None for those asking
    for more), or None when the batch is malformed."""
    out: list[tuple[bytes, bytes] | None] = []
    pos = 0
    while pos < len(request):
        if request[pos] != 0x0A:
            return None
        try:
            length, pos = _read_varint(request, pos + 1)
        except ValueError:
            return None
        if length > len(request) - pos:
            return None
        out.append(identifier_of(request[pos : pos + length]))
        pos += length
    return out


def answer_item(response: bytes) -> bytes:
    """A serialised ResolveResponse as one framed ResolveBatchResponse.items entry with status
    OK: the bytes the Python path and the fast path produce for a successful item."""
    inner = b"\x0a\x00\x12" + _varint(len(response)) + response
    return b"\x0a" + _varint(len(inner)) + inner


# --- the Handle protocol over UDP (see resolver/_cache.pyx) ------------------------------------

_UDP_BATCH = 64
_UDP_ANSWER = 512


class UdpEndpoint:
    """The twin of the compiled receive-and-answer loop: one ``recvfrom``/``sendto`` per
    datagram instead of ``recvmmsg``/``sendmmsg``; the same rules and counters."""

    def __init__(self, fd: int, rate: float = 0, burst: float = 0, buckets: int = 65536, own_port: int = 0) -> None:
        self._sock = socket.socket(fileno=os.dup(fd))
        self._sock.setblocking(False)
        self.own_port = own_port
        self.rate = rate
        self.burst = burst if burst > 0 else (rate if rate > 0 else 1)
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self._max_buckets = buckets
        self.received = self.answered = self.passed = self.limited = self.ignored = self.send_failures = 0

    def _admit(self, source: tuple[object, ...], now: float) -> bool:
        if self.rate <= 0:
            return True
        host = str(source[0]).removeprefix("::ffff:")  # an IPv4 client of a dual-stack socket
        tag = host.encode() if ":" not in host else socket.inet_pton(socket.AF_INET6, host.split("%")[0])[:8]
        tokens, stamp = self._buckets.pop(tag, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        admitted = tokens >= 1
        self._buckets[tag] = (tokens - 1 if admitted else tokens, now)
        if len(self._buckets) > self._max_buckets:
            self._buckets.popitem(last=False)
        return admitted

    def serve(self, cache: LookupCache | None, wall: int, serial: int) -> list[tuple[bytes, object]] | None:
        rest: list[tuple[bytes, object]] = []
        clock = time.monotonic()
        received = 0
        for _ in range(_UDP_BATCH):
            try:
                data, source = self._sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                break
            received += 1
            if source[1] in (0, self.own_port) or (len(data) >= 28 and _BE32.unpack_from(data, 24)[0] != 0):
                self.ignored += 1
                continue
            if not self._admit(source, clock):
                self.limited += 1
                continue
            answer = cache.handle_answer(data, wall, serial) if cache is not None else None
            if answer is not None and len(answer) <= _UDP_ANSWER:
                self.answered += 1
                self._sendto(answer, source)
                continue
            self.passed += 1
            rest.append((data, source))
        if not received:
            return None
        self.received += received
        return rest

    def _sendto(self, datagram: bytes, source: Any) -> None:
        try:
            self._sock.sendto(datagram, source)
        except OSError:
            self.send_failures += 1

    def send(self, source: object, datagrams: list[bytes]) -> None:
        if len(datagrams) > _UDP_BATCH:
            raise ValueError(f"at most {_UDP_BATCH} datagrams at once")
        for d in datagrams:
            self._sendto(d, source)

    def close(self) -> None:
        self._sock.close()
