"""Keeping caches true to the store: what happens to cached answers when a write lands.

A node that runs one process only invalidates its own cache. A node that runs several worker
processes on one port (SO_REUSEPORT) also publishes every change in the shared change log
(``resolver.cache.ChangeLog``) before the write is acknowledged; every worker's cache applies
the log before each lookup, and every worker's authority reloads its prefix table when a prefix
change shows up there. Hence no worker answers from a state older than an acknowledged write.
"""

from __future__ import annotations

from collections.abc import Sequence

from resolver.cache import LOG_KEY, LOG_PREFIX, ChangeLog, LookupCache
from resolver.handle_protocol import NA_PREFIX


class Coherence:
    """Told of every committed change (before it is acknowledged); keeps caches coherent."""

    def __init__(self, cache: LookupCache | None, log: ChangeLog | None) -> None:
        self.caches: list[LookupCache] = []
        self.log = log
        if cache is not None:
            self.add(cache)

    def add(self, cache: LookupCache) -> None:
        """Keeps one more cache of answers by identifier key coherent (the gRPC answers, the
        HTTP API's JSON answers, the Handle protocol's answers)."""
        self.caches.append(cache)
        if self.log is not None:
            cache.attach(self.log)

    def identifiers_changed(self, keys: Sequence[str]) -> None:
        changed = [key.encode() for key in keys]
        for cache in self.caches:
            for data in changed:
                cache.invalidate(data)
        if self.log is not None:
            for data in changed:
                self.log.append(LOG_KEY, data)

    def forget_all(self) -> None:
        """Forgets every cached answer of this process (changes may have been missed; each
        worker process of a node hears of that by itself)."""
        for cache in self.caches:
            cache.clear()

    def prefix_changed(self, key: str) -> None:
        """Forgets the prefix's subtree, and the answers about the prefixes in it: their prefix
        handles ``0.NA/<prefix>`` (the Handle protocol's HS_SITE answers)."""
        for data in (key.encode(), (NA_PREFIX + key).encode()):
            for cache in self.caches:
                cache.invalidate_prefix(data)
            if self.log is not None:
                self.log.append(LOG_PREFIX, data)


class PrefixWatch:
    """Tells an authority when another worker changed the prefix table."""

    def __init__(self, log: ChangeLog) -> None:
        self.log = log
        self.seen = log.sequence

    def prefixes_changed(self) -> bool:
        if self.log.sequence == self.seen:
            return False
        self.seen, changes = self.log.entries_after(self.seen)
        return changes is None or any(kind == LOG_PREFIX for kind, _ in changes)
