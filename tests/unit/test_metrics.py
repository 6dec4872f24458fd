"""nodes.metrics without a node: bounded per-prefix labels, the per-prefix collector, a worker's
figures copied into shared counters, and the process metrics of a supervisor and its workers."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bench.idis_bench import process_cpu_seconds
from nodes.config import ConfigError, parse_config
from nodes.metrics import (
    OTHER_PREFIXES,
    CacheFigures,
    NodeMetrics,
    NodeProcessesCollector,
    PrefixCollector,
    PrefixLabels,
    file_prefixes,
    largest_prefixes,
)
from resolver.cache import IMPLEMENTATION, LookupCache
from tests.prometheus_text import Exposition, parse

HOSTED, DELEGATED = 1, 2


def exposition(registry: CollectorRegistry) -> Exposition:
    return parse(generate_latest(registry).decode())


def prefixes_database(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    """A database with just the prefix table the collectors read: (display, kind, identifiers)."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE prefixes (display TEXT, kind INTEGER, identifier_count INTEGER)")
    db.executemany("INSERT INTO prefixes VALUES (?, ?, ?)", rows)
    db.commit()
    db.close()
    return path


def test_a_prefix_keeps_its_label_and_at_most_limit_have_one() -> None:
    labels = PrefixLabels(3)
    labels.seed(["88.1"])
    assert [labels(p) for p in ("88.2", "88.3", "88.4", "88.1", "88.2")] == [
        "88.2",
        "88.3",
        OTHER_PREFIXES,
        "88.1",
        "88.2",
    ]
    seeded = PrefixLabels(2)
    seeded.seed(["88.9", "88.8", "88.7"])  # the largest first: only two places
    assert [seeded(p) for p in ("88.7", "88.8", "88.9")] == [OTHER_PREFIXES, "88.8", "88.9"]
    assert PrefixLabels(0)("88.1") == OTHER_PREFIXES


def test_identifiers_of_the_largest_hosted_prefixes_and_the_rest_summed(tmp_path: Path) -> None:
    rows = [("88.1", HOSTED, 5), ("88.2", HOSTED, 9), ("88.3", HOSTED, 1), ("88.4", HOSTED, 5), ("88.5", DELEGATED, 0)]
    database = prefixes_database(tmp_path / "p.sqlite3", rows)
    assert largest_prefixes(database, 2) == ([("88.2", 9), ("88.1", 5)], 2, 6)  # ties by name
    registry = CollectorRegistry()
    registry.register(PrefixCollector(file_prefixes(database), 2))
    metrics = exposition(registry)
    assert {s.labels["prefix"]: s.value for s in metrics.samples("idis_identifiers")} == {
        "88.2": 9,
        "88.1": 5,
        OTHER_PREFIXES: 6,
    }
    none = CollectorRegistry()
    none.register(PrefixCollector(file_prefixes(database), 0))
    assert [(s.labels, s.value) for s in exposition(none).samples("idis_identifiers")] == [
        ({"prefix": OTHER_PREFIXES}, 20)
    ]
    every = CollectorRegistry()
    every.register(PrefixCollector(file_prefixes(database), 50))
    assert OTHER_PREFIXES not in exposition(every).label_values("idis_identifiers", "prefix")


def test_an_unreadable_database_gives_no_series_and_no_error(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(PrefixCollector(file_prefixes(tmp_path / "missing.sqlite3"), 50))
    assert exposition(registry).samples("idis_identifiers") == []


def test_registrations_are_labelled_by_the_largest_prefixes_at_start(tmp_path: Path) -> None:
    rows = [("88.1", HOSTED, 1), ("88.2", HOSTED, 7), ("88.3", HOSTED, 0), ("88.4", HOSTED, 3)]
    database = prefixes_database(tmp_path / "p.sqlite3", rows)
    metrics = NodeMetrics("n", "enterprise", top_prefixes=2)
    metrics.watch_prefixes(file_prefixes(database))
    for prefix in ("88.1", "88.2", "88.3", "88.4"):
        metrics.count_registrations(prefix, 10)
    scraped = exposition(metrics.registry)
    assert {s.labels["prefix"]: s.value for s in scraped.samples("idis_registrations_total")} == {
        "88.2": 10,
        "88.4": 10,
        OTHER_PREFIXES: 20,
    }


def test_a_workers_cache_figures_are_copied_as_increments_not_added_again() -> None:
    cache = LookupCache(100, 100_000)
    registry = CollectorRegistry()
    figures = CacheFigures(cache, "n", registry)
    cache.set(b"88.1/A", b"answer", 60)
    for _ in range(3):
        cache.get(b"88.1/A")
    cache.get(b"88.1/NONE")
    figures.publish()
    figures.publish()  # nothing new: nothing added
    cache.get(b"88.1/A")
    figures.publish()
    metrics = exposition(registry)
    stats = cache.stats()
    assert stats["hits"] == 4 and stats["misses"] == 1
    labels = {"node": "n", "implementation": IMPLEMENTATION}
    assert metrics.value("idis_cache_hits_total", **labels) == 4
    assert metrics.value("idis_cache_misses_total", **labels) == 1
    assert metrics.value("idis_cache_insertions_total", **labels) == stats["insertions"]
    assert metrics.value("idis_cache_entries", **labels) == 1
    assert metrics.value("idis_cache_bytes", **labels) == stats["bytes"]


BUSY_CHILD = """
import sys, time
while time.process_time() < 0.05:
    pass
print("busy", flush=True)
sys.stdin.read()
"""


def test_process_metrics_sum_the_workers_and_do_not_go_back_when_one_is_reaped() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", BUSY_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "busy\n"
    workers = [child.pid]
    reaping = threading.Lock()
    registry = CollectorRegistry()
    registry.register(NodeProcessesCollector(lambda: [pid for pid in workers if child.returncode is None], reaping))
    used_before = process_cpu_seconds(child.pid) + process_cpu_seconds(os.getpid())  # both only grow
    running = exposition(registry)
    assert running.families == {
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    }
    assert running.value("process_cpu_seconds_total") >= used_before
    assert child.stdin is not None
    child.stdin.close()
    with reaping:
        child.wait()
    reaped = exposition(registry)  # the child's CPU now comes from the children's usage
    assert reaped.value("process_cpu_seconds_total") >= running.value("process_cpu_seconds_total")


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"top_prefixes": -1}, "metrics.top_prefixes"),
        ({"top_prefixes": 10_001}, "metrics.top_prefixes"),
        ({"report_interval": 0}, "metrics.report_interval"),
        ({"bottom_prefixes": 1}, "metrics.bottom_prefixes: unknown key"),
    ],
)
def test_the_metrics_section_is_validated(table: dict[str, int], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(
            {"authority": {"apexes": ["88"]}, "tls": {"mode": "off"}, "auth": {"mode": "off"}, "metrics": table}
        )
