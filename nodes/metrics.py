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
    process_*, python_info, python_gc_*                  the client library's standard metrics

Per-prefix series are bounded: at most ``[metrics] top_prefixes`` prefixes have their own, the
rest are summed under ``prefix="(other)"`` (not a valid prefix, so it names no real one).
``idis_identifiers`` names the largest prefixes at scrape time; ``idis_registrations_total``, a
counter whose series must not move, keeps the prefixes it started with (``PrefixLabels``).

A node run as several workers (``nodes.workers``) has one endpoint, served by its supervisor,
that sums the workers: they record into shared files (prometheus_client's multiprocess mode,
``PROMETHEUS_MULTIPROC_DIR``); counters and histograms add up over every worker that ever ran
(so they never go back when one is replaced), gauges have a ``multiprocess_mode`` each; the
workers' cache figures are copied into those files every ``[metrics] report_interval`` seconds
(``CacheFigures``); the supervisor reads the per-prefix counts from the database itself, once,
and sums the process metrics of all the node's processes (``NodeProcessesCollector``).

The same HTTP port answers the probes of process supervisors (Kubernetes, Docker), which cannot
speak the node's TLS-only gRPC: ``/healthz`` (liveness) and ``/readyz`` (readiness). A single
process asks its event loop (``Probes``); a supervisor answers for its workers.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import resource
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from nodes.storage.rows import HOSTED_TOTALS, LARGEST_PREFIXES, LargestPrefixes, largest_of
from resolver.cache import IMPLEMENTATION, LookupCache

MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"
"""The environment variable that puts prometheus_client in multiprocess mode (read at import)."""

OTHER_PREFIXES = "(other)"
"""The ``prefix`` label of the prefixes that have no series of their own."""

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
_CACHE_GAUGES = {"entries": "Entries in the cache.", "bytes": "Key and value bytes held by the cache."}

_HANDLE_OUTCOMES = {
    "received": "datagrams read from the UDP socket",
    "answered_fast": "UDP requests answered from the compiled cache, with no Python object made",
    "passed": "UDP requests answered by the Python side (misses, filters, errors)",
    "limited": "UDP datagrams dropped over their source's answers-per-second budget",
    "ignored": "UDP datagrams never answered: responses, or from port 0 or the node's own port",
    "dropped_busy": "UDP requests dropped while [handle] max_pending answers were being computed",
    "send_failures": "UDP answers the socket could not take (a full send buffer)",
}
_HANDLE_DOC = "Handle-protocol UDP datagrams by outcome: " + "; ".join(f"{k}: {v}" for k, v in _HANDLE_OUTCOMES.items())

_GC_COUNTERS = {  # as prometheus_client's GCCollector names them
    "collected": ("python_gc_objects_collected", "Objects collected during gc"),
    "uncollectable": ("python_gc_objects_uncollectable", "Uncollectable objects found during GC"),
    "collections": ("python_gc_collections", "Number of times this generation was collected"),
}


def shared_metrics_directory() -> Path | None:
    """Where this process records its metrics for a supervisor to sum, when it does."""
    directory = os.environ.get(MULTIPROCESS_DIRECTORY)
    return Path(directory) if directory else None


class NodeMetrics:
    """The metrics one node process records, in its own registry.

    ``shared``: this process is one worker of several, recording into the shared files its
    supervisor serves (``nodes.workers``); figures read at scrape time elsewhere are then copied
    into them by ``publish()``, and the process metrics are left to the supervisor."""

    def __init__(self, name: str, role: str, top_prefixes: int = 50, shared: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.shared = shared
        self.top_prefixes = top_prefixes
        self.prefix_labels = PrefixLabels(top_prefixes)
        self._published: list[CacheFigures | GcFigures | HandleFigures] = []
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
            "Store operation latency.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.change_lag = Histogram(
            "idis_store_change_lag_seconds",
            "PostgreSQL: from a change published by another process to this one's caches forgetting it.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.store_writable = Gauge(
            "idis_store_writable",
            "1 while the store can write (SQLite: the file; PostgreSQL: a primary answers), else 0.",
            registry=r,
            multiprocess_mode="min",
        )
        self.store_figures = {
            name: Gauge(f"idis_store_{name}", doc, registry=r, multiprocess_mode="max")
            for name, doc in _STORE_GAUGES.items()
        }
        self.changes_lost = Counter(
            "idis_store_change_feed_lost",
            "PostgreSQL: times listening for other processes' changes was lost (every cache then forgotten).",
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
        # Every worker says the same: any one's value is the node's.
        info = Gauge(
            "idis_node_info", "The node's identity.", ["name", "role", "cache"], registry=r, multiprocess_mode="max"
        )
        info.labels(name, role, IMPLEMENTATION).set(1)
        if shared:
            self._published.append(GcFigures(r))
        else:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    def count_registrations(self, prefix: str, count: int) -> None:
        self.registrations.labels(self.prefix_labels(prefix)).inc(count)

    def watch_cache(self, cache: LookupCache, node: str) -> None:
        if self.shared:
            self._published.append(CacheFigures(cache, node, self.registry))
        else:
            self.registry.register(CacheCollector(cache, node))

    def watch_handle(self, stats: Callable[[], dict[str, int]], node: str) -> None:
        """``idis_handle_udp_datagrams_total{outcome}`` from a Handle listener's counters."""
        if self.shared:
            self._published.append(HandleFigures(stats, node, self.registry))
        else:
            self.registry.register(HandleCollector(stats, node))

    def watch_prefixes(self, source: PrefixSource) -> None:
        """Per-prefix series for the prefixes ``source`` reads: the largest now (if not empty)
        get the first registration series; ``idis_identifiers`` is read at scrape time, in a
        worker by its supervisor instead (once for all workers)."""
        self.prefix_labels.seed(name for name, count in source(self.top_prefixes)[0] if count)
        if not self.shared:
            self.registry.register(PrefixCollector(source, self.top_prefixes))

    def publish(self) -> None:
        """Copies the figures read at scrape time into the shared files (a worker's report)."""
        for figures in self._published:
            figures.publish()


_STORE_GAUGES = {
    "readers_open": "PostgreSQL: connections open in the reader pool.",
    "readers_idle": "PostgreSQL: idle connections in the reader pool.",
    "primary_readers_open": "PostgreSQL, reads from a standby: connections open in the primary's reader pool.",
    "primary_readers_idle": "PostgreSQL, reads from a standby: idle connections in the primary's reader pool.",
    "replication_lag": "PostgreSQL: seconds the standby behind furthest is (as the primary or the read standby says).",
    "sync_standbys": "PostgreSQL: synchronous standbys the primary has (-1: unknown).",
    "primary_reads": "PostgreSQL, reads from a standby: reads sent to the primary for this process's own writes.",
}


class PrefixLabels:
    """The ``prefix`` label a per-prefix counter records a prefix under: the prefix itself for at
    most ``limit`` prefixes, ``OTHER_PREFIXES`` for the rest.

    A prefix keeps the label it was given, since a counter's series must not move: the places
    go first to the prefixes ``seed`` names (the largest when the node starts), then to new
    prefixes while places are left. Each worker of a node decides alone, so a node of N workers
    that starts with fewer prefixes than ``limit`` may label up to N × ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.own: set[str] = set()

    def seed(self, prefixes: Iterable[str]) -> None:
        for prefix in prefixes:
            if len(self.own) >= self.limit:
                return
            self.own.add(prefix)

    def __call__(self, prefix: str) -> str:
        if prefix in self.own:
            return prefix
        if len(self.own) < self.limit:
            self.own.add(prefix)
            return prefix
        return OTHER_PREFIXES


PrefixSource = Callable[[int], LargestPrefixes]
"""Reads the ``limit`` largest hosted prefixes (``largest_prefixes``), at scrape time."""


class PrefixSnapshot:
    """A ``PrefixSource`` for a store a scrape's thread cannot read by itself (PostgreSQL): the
    figures as the node last read them (``Store.largest_prefixes``, every few seconds)."""

    def __init__(self) -> None:
        self.figures: LargestPrefixes = ([], 0, 0)

    def __call__(self, limit: int) -> LargestPrefixes:
        return self.figures


def file_prefixes(database: Path) -> PrefixSource:
    """The ``PrefixSource`` of an SQLite file."""
    return functools.partial(largest_prefixes, database)


def largest_prefixes(database: Path, limit: int) -> LargestPrefixes:
    """The ``limit`` hosted prefixes of ``database`` with the most identifiers (and their
    counts), how many other hosted prefixes there are, and how many identifiers they hold.
    Nothing when the database cannot be read: a scrape must not fail because it is busy."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1.0) as db:
            largest = db.execute(LARGEST_PREFIXES, (limit,)).fetchall()
            totals = db.execute(HOSTED_TOTALS).fetchone()
    except sqlite3.Error:
        return [], 0, 0
    return largest_of(largest, totals)


class PrefixCollector(Collector):
    """``idis_identifiers{prefix}`` read from the database at scrape time (a read-only query): the
    ``limit`` largest hosted prefixes, the others summed under ``OTHER_PREFIXES``."""

    def __init__(self, source: PrefixSource, limit: int) -> None:
        self.source = source
        self.limit = limit

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("idis_identifiers", "Identifiers stored per hosted prefix.", labels=["prefix"])
        largest, others, in_others = self.source(self.limit)
        for prefix, count in largest:
            family.add_metric([prefix], count)
        if others:
            family.add_metric([OTHER_PREFIXES], in_others)
        yield family


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
            counter = CounterMetricFamily(f"idis_cache_{name}", doc, labels=labels)
            counter.add_metric(values, stats[name])
            yield counter
        for name, doc in _CACHE_GAUGES.items():
            gauge = GaugeMetricFamily(f"idis_cache_{name}", doc, labels=labels)
            gauge.add_metric(values, stats[name])
            yield gauge


class HandleCollector(Collector):
    """``idis_handle_udp_datagrams_total`` read at scrape time (one process)."""

    def __init__(self, stats: Callable[[], dict[str, int]], node: str) -> None:
        self.stats = stats
        self.node = node

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.stats()
        counter = CounterMetricFamily("idis_handle_udp_datagrams", _HANDLE_DOC, labels=["node", "outcome"])
        for outcome in _HANDLE_OUTCOMES:
            counter.add_metric([self.node, outcome], stats.get(outcome, 0))
        yield counter


class Increments:
    """A cumulative figure a worker keeps in its own memory, copied into a shared counter as
    increments (the counter then sums over every worker that ever ran, the dead included)."""

    def __init__(self) -> None:
        self.published: dict[tuple[str, ...], float] = {}

    def up_to(self, counter: Counter, key: tuple[str, ...], total: float) -> None:
        """Increments ``counter.labels(*key[1:])`` so that this worker has added ``total`` in all."""
        increase = total - self.published.get(key, 0.0)
        if increase > 0:
            counter.labels(*key[1:]).inc(increase)
            self.published[key] = total


class CacheFigures:
    """``idis_cache_*`` of one worker, copied into the shared files for its supervisor to sum:
    the counters over every worker, entries and bytes over the live ones (``livesum``)."""

    def __init__(self, cache: LookupCache, node: str, registry: CollectorRegistry) -> None:
        self.increments = Increments()
        self.cache = cache
        self.labels = (node, IMPLEMENTATION)
        names = ["node", "implementation"]
        self.counters = {
            name: Counter(f"idis_cache_{name}", doc, names, registry=registry) for name, doc in _CACHE_COUNTERS.items()
        }
        self.gauges = {
            name: Gauge(f"idis_cache_{name}", doc, names, registry=registry, multiprocess_mode="livesum")
            for name, doc in _CACHE_GAUGES.items()
        }
        for counter in self.counters.values():
            counter.labels(*self.labels)  # a series from the start, even at 0

    def publish(self) -> None:
        stats = self.cache.stats()
        for name, counter in self.counters.items():
            self.increments.up_to(counter, (name, *self.labels), stats[name])
        for name, gauge in self.gauges.items():
            gauge.labels(*self.labels).set(stats[name])


class HandleFigures:
    """``idis_handle_udp_datagrams_total`` of one worker, copied into the shared files."""

    def __init__(self, stats: Callable[[], dict[str, int]], node: str, registry: CollectorRegistry) -> None:
        self.increments = Increments()
        self.stats = stats
        self.node = node
        self.counter = Counter("idis_handle_udp_datagrams", _HANDLE_DOC, ["node", "outcome"], registry=registry)
        for outcome in _HANDLE_OUTCOMES:
            self.counter.labels(node, outcome)

    def publish(self) -> None:
        stats = self.stats()
        for outcome in _HANDLE_OUTCOMES:
            self.increments.up_to(self.counter, (outcome, self.node, outcome), stats.get(outcome, 0))


class GcFigures:
    """The ``python_gc_*`` counters of prometheus_client's GC collector (which reads this process
    alone), copied into the shared files for a supervisor to sum."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.increments = Increments()
        self.counters = {
            key: Counter(name, doc, ["generation"], registry=registry) for key, (name, doc) in _GC_COUNTERS.items()
        }
        for counter in self.counters.values():
            for generation in range(len(gc.get_stats())):
                counter.labels(str(generation))

    def publish(self) -> None:
        for generation, stats in enumerate(gc.get_stats()):
            for key, counter in self.counters.items():
                self.increments.up_to(counter, (key, str(generation)), stats[key])


_SUMMED = ("process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds")


class NodeProcessesCollector(Collector):
    """prometheus_client's ``process_*`` metrics for a node run as a supervisor and its workers.

    CPU seconds, memory and open files are summed over the supervisor and the running workers
    (resident memory counts pages they share once per process); the CPU of workers that have
    exited and been reaped is added from the supervisor's children's usage, so the counter does
    not go back when a worker is replaced. Start time and the file limit are the supervisor's.
    ``lock`` is held by whoever reaps workers, so none is counted twice or not at all."""

    def __init__(self, workers: Callable[[], list[int]], lock: AbstractContextManager[Any]) -> None:
        self.workers = workers
        self.lock = lock

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
            supervisor = _process_figures("self")
            workers = [_process_figures(pid) for pid in self.workers()]
        for name, family in supervisor.items():
            value = family.samples[0].value
            if name in _SUMMED:
                value += sum(figures[name].samples[0].value for figures in workers if name in figures)
            if name == "process_cpu_seconds":
                value += reaped.ru_utime + reaped.ru_stime
            kind = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
            yield kind(name, family.documentation, value=value)


def _process_figures(pid: int | str) -> dict[str, Metric]:
    return {family.name: family for family in ProcessCollector(pid=lambda: pid, registry=None).collect()}


def supervisor_registry(
    directory: Path,
    database: Path,
    top_prefixes: int,
    workers: Callable[[], list[int]],
    lock: AbstractContextManager[Any],
) -> CollectorRegistry:
    """What a supervisor serves: its workers' shared files summed, ``idis_identifiers`` read once,
    the process metrics of every process of the node, and ``python_info``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    registry.register(PrefixCollector(file_prefixes(database), top_prefixes))
    registry.register(NodeProcessesCollector(workers, lock))
    PlatformCollector(registry=registry)
    return registry


# -- the HTTP endpoint and the probes ------------------------------------------------------------


class ProbeAnswers(Protocol):
    """What ``/healthz`` and ``/readyz`` say, asked from the HTTP server's threads."""

    def probe(self, readiness: bool) -> tuple[bool, str]:
        """(passes, one line saying why) for ``/readyz`` when ``readiness``, else ``/healthz``."""
        ...


class Probes:
    """The probes of a single node process.

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

    def probe(self, readiness: bool) -> tuple[bool, str]:
        serving = self.ask()
        if serving is None:
            return False, f"the event loop did not answer within {self.timeout} s"
        if readiness:
            return (True, "SERVING") if serving else (False, "NOT_SERVING")
        return True, "alive"


def _probes_then(metrics: WSGIApplication, probes: ProbeAnswers) -> WSGIApplication:
    """``metrics`` (prometheus_client's WSGI app) with the two probe paths in front of it."""

    def probes_then_metrics(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path not in ("/healthz", "/readyz"):
            return metrics(environ, start_response)
        passes, text = probes.probe(readiness=path == "/readyz")
        body = f"{text}\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
        start_response(
            "200 OK" if passes else "503 Service Unavailable", [*headers, ("Content-Length", str(len(body)))]
        )
        return [body]

    return probes_then_metrics


class _QuietHandler(WSGIRequestHandler):
    """Scrapes and probes come every few seconds: no access log line for each."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_metrics(registry: CollectorRegistry, listen: str, probes: ProbeAnswers | None = None) -> int:
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
        app = _probes_then(app, probes)
    server = make_server(str(address[0]), int(port), app, Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name=f"metrics {listen}", daemon=True).start()
    return int(server.server_address[1])
