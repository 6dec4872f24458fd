"""Prometheus metrics of a node. Names follow Prometheus conventions (``_total``, ``_seconds``).

Per-call metrics are recorded by the request pipeline (``nodes.pipeline``); store timings by
the store; cache and per-prefix figures are read at scrape time, so the hot path pays nothing
for them.

    idis_requests_total{method, code}            calls by method and gRPC status
    idis_request_duration_seconds{method}        latency histogram
    idis_store_operation_duration_seconds{op}    SQLite read / write-transaction latency
    idis_registrations_total{prefix}             identifiers created (single and batch)
    idis_referrals_total                         referrals answered on the Python path
    idis_resolver_hops                           referral hops per recursive resolution
    idis_identifiers{prefix}                     identifiers stored per hosted prefix
    idis_cache_{hits,misses,insertions,evictions,expirations,invalidations}_total, idis_cache_entries, idis_cache_bytes
    idis_node_info{name, role, cache}            1, with the node's identity as labels
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from resolver.cache import IMPLEMENTATION, LookupCache

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_CACHE_COUNTERS = {
    "hits": "Lookups answered from the cache.",
    "misses": "Lookups the cache could not answer.",
    "insertions": "Answers stored in the cache.",
    "evictions": "Entries evicted to stay within the entry and byte bounds.",
    "expirations": "Entries dropped because their TTL ran out.",
    "invalidations": "Entries dropped because a write changed what they answer.",
}


class NodeMetrics:
    """The metrics one node process records, in its own registry."""

    def __init__(self, name: str, role: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("idis_requests", "Calls by method and gRPC status.", ["method", "code"], registry=r)
        self.latency = Histogram(
            "idis_request_duration_seconds",
            "Call latency in the node.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_latency = Histogram(
            "idis_store_operation_duration_seconds",
            "SQLite operation latency.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.registrations = Counter("idis_registrations", "Identifiers created, by prefix.", ["prefix"], registry=r)
        self.referrals = Counter("idis_referrals", "Referrals answered on the Python path.", registry=r)
        self.resolver_hops = Histogram(
            "idis_resolver_hops",
            "Referral hops per recursive resolution.",
            buckets=(0, 1, 2, 3, 4, 6, 8, 12, 20, 40),
            registry=r,
        )
        info = Gauge("idis_node_info", "The node's identity.", ["name", "role", "cache"], registry=r)
        info.labels(name, role, IMPLEMENTATION).set(1)

    def watch_cache(self, cache: LookupCache, node: str) -> None:
        self.registry.register(CacheCollector(cache, node))

    def watch_prefixes(self, database: Path) -> None:
        self.registry.register(PrefixCollector(database))


class CacheCollector(Collector):
    """``idis_cache_*`` metrics from ``LookupCache.stats()``."""

    def __init__(self, cache: LookupCache, node: str) -> None:
        self.cache = cache
        self.node = node

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.cache.stats()
        labels = ["node", "implementation"]
        values = [self.node, IMPLEMENTATION]
        for name, doc in _CACHE_COUNTERS.items():
            family = CounterMetricFamily(f"idis_cache_{name}", doc, labels=labels)
            family.add_metric(values, stats[name])
            yield family
        entries = GaugeMetricFamily("idis_cache_entries", "Entries in the cache.", labels=labels)
        entries.add_metric(values, stats["entries"])
        yield entries
        size = GaugeMetricFamily("idis_cache_bytes", "Key and value bytes held by the cache.", labels=labels)
        size.add_metric(values, stats["bytes"])
        yield size


class PrefixCollector(Collector):
    """``idis_identifiers{prefix}`` read from the database at scrape time (a read-only query)."""

    def __init__(self, database: Path) -> None:
        self.database = database

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("idis_identifiers", "Identifiers stored per hosted prefix.", labels=["prefix"])
        try:
            with sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=1.0) as db:
                for key, count in db.execute("SELECT display, identifier_count FROM prefixes WHERE kind = 1"):
                    family.add_metric([key], count)
        except sqlite3.Error:
            pass  # a scrape must not fail because the database is busy
        yield family


def serve_metrics(registry: CollectorRegistry, listen: str) -> int:
    """Starts the /metrics HTTP endpoint on ``host:port``; returns the port."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host, registry=registry)
    return int(server.server_address[1])
