"""Prometheus metrics of a node, read at scrape time (nothing is counted twice on the hot path)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from resolver.cache import IMPLEMENTATION, LookupCache

_CACHE_COUNTERS = {
    "hits": "Lookups answered from the cache.",
    "misses": "Lookups the cache could not answer.",
    "insertions": "Answers stored in the cache.",
    "evictions": "Entries evicted to stay within the entry and byte bounds.",
    "expirations": "Entries dropped because their TTL ran out.",
    "invalidations": "Entries dropped because a write changed what they answer.",
}


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


def serve_metrics(registry: CollectorRegistry, listen: str) -> int:
    """Starts the /metrics HTTP endpoint on ``host:port``; returns the port."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host, registry=registry)
    return int(server.server_address[1])
