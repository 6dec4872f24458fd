from __future__ import annotations

from resolver.cache import TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    cache: TTLCache[str] = TTLCache(10, clock=clock)
    cache.set("A/1", "one", 5)
    assert cache.get("A/1") == "one"
    assert cache.remaining_ttl("A/1") == 5
    clock.now += 5
    assert cache.get("A/1") is None
    assert len(cache) == 0


def test_zero_ttl_is_not_cached() -> None:
    cache: TTLCache[str] = TTLCache(10)
    cache.set("A/1", "one", 0)
    assert cache.get("A/1") is None


def test_least_recently_used_entry_is_evicted_first() -> None:
    cache: TTLCache[int] = TTLCache(2)
    cache.set("a", 1, 60)
    cache.set("b", 2, 60)
    assert cache.get("a") == 1  # a is now the most recent
    cache.set("c", 3, 60)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3


def test_invalidation_by_key_and_by_prefix() -> None:
    cache: TTLCache[int] = TTLCache(10)
    for key in ["88.1/x", "88.1/y", "88.1.2/z", "88.10/w", "88.1"]:
        cache.set(key, 1, 60)
    assert cache.invalidate("88.1/x") and not cache.invalidate("88.1/x")
    assert cache.invalidate_prefix("88.1") == 3  # 88.1/y, 88.1.2/z, 88.1 itself; not 88.10/w
    assert cache.get("88.10/w") == 1
