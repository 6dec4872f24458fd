"""Prometheus metrics of a node, and the HTTP endpoint that serves them with the probes.

Names follow Prometheus conventions (``_total``, ``_seconds``). Per-call metrics are recorded by
the request pipeline (``nodes.pipeline``); store timings by the store; cache and per-prefix
figures are read at scrape time, so the hot path pays nothing for them.

    idis_requests_total{method, code}                    calls by method and gRPC status
    idis_request_duration_seconds{method}                latency histogram
    idis_store_operation_duration_seconds{operation}     SQLite get / get_many / write_transaction latency
    idis_registrations_total{prefix}                     identifiers created (single and batch)
    idis_referrals_total                                 referrals answered on the Python path
    idis_resolver_hops                                   referral hops per recursive resolution
    idis_identifiers{prefix}                             identifiers stored per hosted prefix
    idis_cache_<event>_total{node, implementation}       event: hits, misses, insertions, evictions,
                                                         expirations, invalidations
    idis_cache_entries{node, implementation}, idis_cache_bytes{node, implementation}
    idis_node_info{name, role, cache}                    1, with the node's identity as labels

The same HTTP port answers the probes of process supervisors (Kubernetes, Docker), which cannot
speak the node's TLS-only gRPC: ``/healthz`` (liveness) and ``/readyz`` (readiness, following
the node's gRPC health status). See ``Probes``.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
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


class Probes:
    """What ``/healthz`` and ``/readyz`` answer, asked from the HTTP server's threads.

    Both questions go to the event loop that serves gRPC, so a wedged loop fails them even
    though the HTTP thread still answers:

    * ``/healthz`` (liveness): 200 when the loop answers within ``timeout`` seconds, else 503;
    * ``/readyz`` (readiness): 200 when, in addition, ``serving()`` (the node's gRPC health
      status is SERVING); 503 while it is NOT_SERVING: until start-up completes, and while
      the node drains on SIGTERM.
    """

    def __init__(self, serving: Callable[[], bool], loop: asyncio.AbstractEventLoop, timeout: float = 1.0) -> None:
        self.serving = serving
        self.loop = loop
        self.timeout = timeout

    def ask(self) -> bool | None:
        """``serving()`` as read on the loop; None when the loop does not answer in time."""
        answers: list[bool] = []
        answered = threading.Event()

        def answer() -> None:
            answers.append(self.serving())
            answered.set()

        try:
            self.loop.call_soon_threadsafe(answer)
        except RuntimeError:  # the loop is closed: the node is gone
            return None
        return answers[0] if answered.wait(self.timeout) else None

    def app(self, metrics: WSGIApplication) -> WSGIApplication:
        """``metrics`` (prometheus_client's WSGI app) with the two probe paths in front of it."""

        def probes_then_metrics(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO")
            if path not in ("/healthz", "/readyz"):
                return metrics(environ, start_response)
            serving = self.ask()
            if serving is None:
                status, text = "503 Service Unavailable", f"the event loop did not answer within {self.timeout} s"
            elif path == "/readyz":
                status, text = ("200 OK", "SERVING") if serving else ("503 Service Unavailable", "NOT_SERVING")
            else:
                status, text = "200 OK", "alive"
            body = f"{text}\n".encode()
            headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
            start_response(status, [*headers, ("Content-Length", str(len(body)))])
            return [body]

        return probes_then_metrics


class _QuietHandler(WSGIRequestHandler):
    """Scrapes and probes come every few seconds: no access log line for each."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_metrics(registry: CollectorRegistry, listen: str, probes: Probes | None = None) -> int:
    """Serves ``/metrics`` on ``host:port`` from a daemon thread (as prometheus_client's
    ``start_http_server`` does), with ``probes`` also ``/healthz`` and ``/readyz``; returns the port."""
    host, _, port = listen.rpartition(":")
    family, _, _, _, address = socket.getaddrinfo(
        host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    app: WSGIApplication = make_wsgi_app(registry)
    if probes is not None:
        app = probes.app(app)
    server = make_server(str(address[0]), int(port), app, Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name=f"metrics {listen}", daemon=True).start()
    return int(server.server_address[1])
