"""The load tester's statistics, its open loop (on a virtual clock) and the dataset generator,
on small data."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from bench.dataset import registration_wire, registrations, wuhan_model
from bench.idis_bench import (
    Options,
    Worker,
    key_indexes,
    metric_deltas,
    new_histogram,
    percentiles,
    sample_totals,
)
from nodes.metrics import NodeMetrics
from resolver.cache import LookupCache
from resolver.identifier import parse_identifier
from resolver.record import Limits, Record, check_values
from resolver.wire import encode_record, registration_pb2


def test_histogram_percentiles_match_the_exact_ones_within_hdr_precision() -> None:
    rng = np.random.default_rng(3)
    values_us = rng.lognormal(mean=7, sigma=1, size=50_000).astype(int) + 1
    hist = new_histogram()
    for v in values_us:
        hist.record_value(int(v))
    got = percentiles(hist)
    for name, q in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("p99_9_ms", 99.9)):
        exact = float(np.percentile(values_us, q)) / 1000
        assert got[name] == pytest.approx(exact, rel=0.01)  # 3 significant digits
    assert got["max_ms"] == pytest.approx(values_us.max() / 1000, rel=0.001)
    assert percentiles(new_histogram())["p99_ms"] == 0.0


def test_merged_histograms_equal_one_histogram_of_everything() -> None:
    a, b, both = new_histogram(), new_histogram(), new_histogram()
    for v in range(1, 5000):
        (a if v % 2 else b).record_value(v)
        both.record_value(v)
    a.add(b)
    assert percentiles(a) == percentiles(both)


OPTIONS = Options(
    workload="resolve",
    mode="direct",
    address="127.0.0.1:1",
    prefix="88.100.1",
    keys=100,
    seed=1,
    popularity="uniform",
    zipf_s=1.0,
    not_found_share=0.0,
    batch_size=10,
    write_ratio=0.0,
    concurrency=1,
    rate=100.0,
    duration=2.0,
    warmup=0.0,
    processes=1,
    timeout=5.0,
)


class VirtualClock:
    """Time that passes only when the load tester sleeps; a sleep that reaches ``stall_at``
    wakes ``stall_for`` seconds late, as when the sending process is descheduled or its loop
    blocked."""

    def __init__(self, stall_at: float = -1.0, stall_for: float = 0.0) -> None:
        self.now = 0.0
        self.stall_at = stall_at
        self.stall_for = stall_for

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)  # what is ready runs now, as it would at the start of a real sleep
        wake = self.now + seconds
        if self.now < self.stall_at <= wake:
            wake += self.stall_for
        self.now = max(self.now, wake)


def open_loop_worker(clock: VirtualClock, **options: Any) -> tuple[Worker, list[float]]:
    """A load-generator process whose calls are answered at once; the times they started."""
    worker = Worker(replace(OPTIONS, **options), 0, progress=None)
    worker.clock, worker.sleep = clock, clock.sleep
    started: list[float] = []

    async def operation(ctx: dict[str, Any]) -> tuple[str, int]:
        started.append(clock.now)  # and answered at once
        return "OK", 1

    worker.operation = operation  # type: ignore[method-assign]
    worker.recording, worker.started = True, clock.now
    return worker, started


async def test_the_open_loop_starts_calls_evenly_spaced_at_the_rate() -> None:
    clock = VirtualClock()
    worker, started = open_loop_worker(clock, rate=200.0, duration=2.0)
    await worker.open_loop({}, until=2.0)
    assert worker.calls == len(started) == 400
    assert started == pytest.approx([i / 200 for i in range(400)])
    assert worker.per_second == [200, 200]
    assert percentiles(worker.hist)["max_ms"] < 0.01  # each answered at once: no latency


async def test_the_open_loop_counts_the_time_a_call_waited_to_be_sent() -> None:
    # The sender stalls for 1 s at t = 0.5: the 100 calls due meanwhile start late, at 1.5, and
    # their latency must include the wait (coordinated omission would report ~0 for all).
    clock = VirtualClock(stall_at=0.5, stall_for=1.0)
    worker, started = open_loop_worker(clock, rate=100.0, duration=2.0)
    await worker.open_loop({}, until=2.0)
    assert worker.calls == 200  # none skipped: the late ones are sent as soon as it can
    assert started.count(1.5) == 101  # those due in [0.5, 1.5], all at 1.5
    got = percentiles(worker.hist)
    assert got["max_ms"] == pytest.approx(1000, rel=0.001)  # due at 0.5, sent at 1.5
    assert got["p99_ms"] == pytest.approx(980, rel=0.01)
    assert got["mean_ms"] == pytest.approx(1000 * sum(1.5 - i / 100 for i in range(50, 150)) / 200, rel=0.01)


async def test_the_items_of_failed_calls_are_not_counted_as_served() -> None:
    clock = VirtualClock()
    worker, _ = open_loop_worker(clock, rate=100.0, duration=1.0, batch_size=10)
    answers = iter(["OK", "UNAVAILABLE", "NOT_FOUND", "DEADLINE_EXCEEDED"] * 25)

    async def operation(ctx: dict[str, Any]) -> tuple[str, int]:
        return next(answers), 10

    worker.operation = operation  # type: ignore[method-assign]
    await worker.open_loop({}, until=1.0)
    assert worker.calls == 100 and worker.items == 500 and worker.failed_items == 500
    assert sum(worker.per_second) == 500  # the timeline counts what was served too
    assert worker.statuses == {"OK": 25, "UNAVAILABLE": 25, "NOT_FOUND": 25, "DEADLINE_EXCEEDED": 25}


def test_key_popularity_is_deterministic_and_skewed_for_zipf() -> None:
    a = key_indexes(1000, 20_000, "zipf", 1.0, seed=7)
    assert (a == key_indexes(1000, 20_000, "zipf", 1.0, seed=7)).all()
    counts = np.bincount(a, minlength=1000)
    assert counts.max() > 20 * np.median(counts)  # a few identifiers take most requests
    uniform = np.bincount(key_indexes(1000, 20_000, "uniform", 0, seed=7), minlength=1000)
    assert uniform.max() < 4 * np.median(uniform)


def test_the_dataset_is_the_same_for_the_same_seed_and_valid() -> None:
    first = list(registrations("88.100.1", 300, seed=5))
    assert first == list(registrations("88.100.1", 300, seed=5))
    assert first != list(registrations("88.100.1", 300, seed=6))
    assert len({ident for ident, _ in first}) == 300
    for ident, values in first:
        parse_identifier(ident)
        assert 2 <= len(values) <= 5
        check_values(values, Limits())
        assert ident.split("/")[1].count(".") == 3  # class.model.date.serial


def test_metric_deltas_from_a_node_s_own_exposition_text() -> None:
    metrics = NodeMetrics("n", "enterprise")
    cache = LookupCache(100, 1 << 20)
    metrics.watch_cache(cache, "n")
    metrics.requests.labels("Resolve", "OK").inc(5)
    cache.get(b"88.100.1/A")  # a miss
    before = sample_totals(generate_latest(metrics.registry).decode())
    metrics.requests.labels("Resolve", "OK").inc(100)
    metrics.requests.labels("Resolve", "NOT_FOUND").inc(3)
    for _ in range(10):
        metrics.store_latency.labels("get").observe(0.002)
    cache.set(b"88.100.1/A", b"answer", 60)
    for _ in range(9):
        cache.get(b"88.100.1/A")  # hits
    cache.get(b"88.100.1/B")  # a miss
    d = metric_deltas(before, sample_totals(generate_latest(metrics.registry).decode()))
    assert d["requests"] == {"[Resolve,OK]": 100.0, "[Resolve,NOT_FOUND]": 3.0}
    assert d["store"]["get"] == {"count": 10.0, "mean_ms": 2.0}
    assert (d["cache_hits"], d["cache_misses"], d["cache_hit_ratio"]) == (9.0, 1.0, 0.9)


def test_the_importers_wire_form_is_the_encoders_byte_for_byte() -> None:
    """``registration_wire`` skips the domain objects; what it stores must still be exactly what
    the node's encoder writes (the miss path serves stored bytes as they are)."""
    model = wuhan_model(200_000)
    for prefix in model.prefixes_under("88")[:: max(1, len(model.prefixes_under("88")) // 7)]:
        count = model.counts[prefix]
        start = count // 3
        wire = list(registration_wire(prefix, count, 3, start, start + 300, 1_800_000_000))
        expected = [
            (parse_identifier(text).key, encode_record(Record(parse_identifier(text), tuple(values), 1)))
            for text, values in registrations(prefix, count, 3, start, start + 300, timestamp=1_800_000_000)
        ]
        assert wire == expected and wire


def test_the_register_batch_request_is_the_messages_wire_form_with_fresh_identifiers() -> None:
    worker = Worker(replace(OPTIONS, workload="register-batch", batch_size=3), 0, progress=None)
    first, second = worker.register_batch_request(), worker.register_batch_request()
    decoded = registration_pb2.BatchCreateRequest.FromString(first)
    assert len(decoded.items) == 3
    assert [list(item.values) for item in decoded.items] == [worker.values_pb()] * 3
    assert decoded.SerializeToString() == first  # byte for byte what the encoder writes
    names = [item.identifier for item in decoded.items]
    names += [item.identifier for item in registration_pb2.BatchCreateRequest.FromString(second).items]
    assert len(set(names)) == 6 and all(parse_identifier(n).prefix.key == OPTIONS.prefix.upper() for n in names)
