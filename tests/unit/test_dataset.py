"""The synthetic dataset's compiled record maker (bench/_registrations.pyx) against its
definition (``bench.dataset.registration_wire``, itself held to the node's encoder in
test_load_tester.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.dataset import registration_columns, registration_wire, wuhan_model
from resolver.identifier import parse_prefix
from resolver.record import DEFAULT_PERMISSIONS, DEFAULT_TTL


@pytest.mark.parametrize("seed", [1, 3, 2020, 2**70])
def test_the_compiled_record_maker_gives_the_definitions_bytes(seed: int) -> None:
    """bench/_registrations.pyx makes what ``registration_wire`` (the dataset's definition) makes,
    key for key and byte for byte: every prefix of the model, at its first, middle and last
    registrations, serials past 10^9, a prefix of one registration, no timestamp."""
    from bench._registrations import registration_wire_columns

    def both(prefix: str, count: int, start: int, stop: int, timestamp: int) -> None:
        pairs = list(registration_wire(prefix, count, seed, start, stop, timestamp))
        made = registration_wire_columns(
            prefix, parse_prefix(prefix).key, count, seed, start, stop, timestamp, DEFAULT_TTL, int(DEFAULT_PERMISSIONS)
        )
        assert made == ([k for k, _ in pairs], [w for _, w in pairs])
        assert registration_columns(prefix, count, seed, start, stop, timestamp) == made

    model = wuhan_model(444_000_000)
    for prefix in model.prefixes_under("88"):
        count = model.counts[prefix]
        for start in (0, count // 2, count - 20):
            both(prefix, count, max(0, start), start + 20, 1_800_000_000)
    both("88.100.1", 3_000_000_000, 2_999_999_990, 3_000_000_010, 1_800_000_000)  # stops at count
    both("88.100.1", 1, 0, 1, 0)
    both("88.100.1", 7, 0, 7, 1)
    both("88.105.40", 50, 0, 50, 1)
    # What the compiled maker refuses (prefixes the parser refuses too, counts past 2^40), the
    # wrapper makes with the definition.
    long_prefix = "88." + ".".join(["abc"] * 20)
    with pytest.raises(ValueError, match="longer than 64"):
        registration_wire_columns(long_prefix, long_prefix, 10, seed, 0, 10, 5, DEFAULT_TTL, 1)
    for count, start, ttl, permissions in [(2**41, 0, 1, 1), (10, -1, 1, 1), (10, 0, 2**32, 1), (10, 0, 1, 2**32)]:
        with pytest.raises(ValueError, match="out of range"):
            registration_wire_columns("88.1", "88.1", count, seed, start, 10, 5, ttl, permissions)
    for prefix in ["88.1/x", "88.1 ", "88.\x001", "88.é"]:
        with pytest.raises(ValueError):
            registration_wire_columns(prefix, "88.1", 10, seed, 0, 10, 5, DEFAULT_TTL, 1)
    pairs = list(registration_wire("88.1", 10, seed, 0, 2**70, 5))  # a stop past int64: the definition's
    assert registration_columns("88.1", 10, seed, 0, 2**70, 5) == ([k for k, _ in pairs], [w for _, w in pairs])
    pairs = list(registration_wire("88.1", 2**41, seed, 2**40, 2**40 + 5, 5))
    expected = ([k for k, _ in pairs], [w for _, w in pairs])
    assert registration_columns("88.1", 2**41, seed, 2**40, 2**40 + 5, 5) == expected


def test_the_importers_pool_keeps_order_and_at_most_ahead_jobs_out() -> None:
    """``bounded_imap``: the importer's workers may not run further ahead of the writer than
    ``ahead`` chunks (``Pool.imap`` kept every finished chunk: a 444M import grew to 24 GB)."""
    from multiprocessing.pool import ThreadPool

    from bench.wuhan import bounded_imap

    drawn = 0

    def jobs() -> Iterator[int]:
        nonlocal drawn
        for job in range(50):
            drawn += 1
            yield job

    with ThreadPool(3) as pool:
        results = []
        for taken, result in enumerate(bounded_imap(pool, lambda x: x * x, jobs(), 4), start=1):
            assert drawn - taken < 4  # the one just taken back, and fewer than 4 still out
            results.append(result)
        assert results == [x * x for x in range(50)]
        assert list(bounded_imap(pool, str, iter([]), 1)) == []
        with pytest.raises(ValueError, match="at least 1"):
            list(bounded_imap(pool, str, jobs(), 0))
