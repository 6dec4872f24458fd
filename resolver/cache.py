"""The resolver's cache: a bounded mapping whose entries expire after their TTL.

``Cache`` is the interface the resolver and the nodes program against; ``TTLCache`` is the
reference implementation (LRU order, per-entry expiry). A faster implementation only has to
honour the same interface.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

V = TypeVar("V")


class Cache(Protocol[V]):
    """A mapping from normalised keys to values that expire."""

    def get(self, key: str) -> V | None:
        """The live value for ``key``, or None (missing or expired)."""

    def set(self, key: str, value: V, ttl: float) -> None:
        """Stores ``value`` for ``ttl`` seconds (a TTL of 0 or less stores nothing)."""

    def remaining_ttl(self, key: str) -> float:
        """Seconds before ``key`` expires (0 when it is not cached)."""

    def invalidate(self, key: str) -> bool:
        """Forgets ``key``; True when it was cached."""

    def invalidate_prefix(self, prefix_key: str) -> int:
        """Forgets every key under ``prefix_key`` (``P/...`` and ``P.sub...``); returns how many."""

    def clear(self) -> None: ...

    def __len__(self) -> int: ...


class TTLCache(Generic[V]):
    """LRU-ordered cache of at most ``max_entries``, each entry living for its own TTL."""

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def set(self, key: str, value: V, ttl: float) -> None:
        if ttl <= 0:
            self._data.pop(key, None)
            return
        self._data[key] = (self._clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def remaining_ttl(self, key: str) -> float:
        item = self._data.get(key)
        return max(0.0, item[0] - self._clock()) if item else 0.0

    def invalidate(self, key: str) -> bool:
        return self._data.pop(key, None) is not None

    def invalidate_prefix(self, prefix_key: str) -> int:
        doomed = [k for k in self._data if _under(k, prefix_key)]
        for k in doomed:
            del self._data[k]
        return len(doomed)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def _under(key: str, prefix_key: str) -> bool:
    return key == prefix_key or key.startswith((prefix_key + "/", prefix_key + "."))
