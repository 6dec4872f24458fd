"""The load tester's statistics and the dataset generator, on small data."""

from __future__ import annotations

import numpy as np
import pytest

from bench.dataset import registrations
from bench.idis_bench import (
    key_indexes,
    latency_from_schedule,
    metric_deltas,
    new_histogram,
    open_loop_schedule,
    percentiles,
)
from resolver.identifier import parse_identifier
from resolver.record import Limits, check_values


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


def test_open_loop_schedule_is_evenly_spaced_at_the_rate() -> None:
    due = open_loop_schedule(rate=200.0, start=10.0, count=1000)
    assert due[0] == 10.0 and due[-1] == pytest.approx(10.0 + 999 / 200)
    assert np.allclose(np.diff(due), 1 / 200)


def test_open_loop_latency_counts_the_time_a_call_waited_to_be_sent() -> None:
    # A server stall of 1 s delays the sending of every call due during it: their latency must
    # include the wait (coordinated omission would report only the 2 ms service time).
    due = open_loop_schedule(rate=100.0, start=0.0, count=200)
    stall_until = 1.0
    sent = np.maximum(due, stall_until)
    completed = sent + 0.002
    latencies = np.array([latency_from_schedule(d, c) for d, c in zip(due, completed, strict=True)])
    assert latencies[0] == pytest.approx(1.002)
    assert latencies[-1] == pytest.approx(0.002)
    assert np.percentile(latencies, 99) > 0.9


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


def test_metric_deltas_from_two_scrapes() -> None:
    before = {"idis_cache_hits_total": 10.0, "idis_cache_misses_total": 10.0, "idis_requests_total[Resolve,OK]": 5.0}
    after = {
        "idis_cache_hits_total": 100.0,
        "idis_cache_misses_total": 20.0,
        "idis_requests_total[Resolve,OK]": 105.0,
        "idis_store_operation_duration_seconds_count[get]": 10.0,
        "idis_store_operation_duration_seconds_sum[get]": 0.02,
    }
    d = metric_deltas(before, after)
    assert d["cache_hit_ratio"] == 0.9
    assert d["requests"] == {"[Resolve,OK]": 100.0}
    assert d["store"]["get"] == {"count": 10.0, "mean_ms": 2.0}
