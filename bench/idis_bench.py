"""idis-bench: load-test a node or a whole hierarchy, and see where it breaks.

Examples (against the local hierarchy of make run):

  # load 100k identifiers into the enterprise node, then resolve them through the top-level
  # node's referrals (each client process runs the resolver library and its cache)
  idis-bench --root 127.0.0.1:2641 --mode resolver --prefix 88.100.1 --keys 100000 --load \\
             --workload resolve --popularity zipf --zipf-s 1.0 --duration 30

  # hammer one node directly with batches of 100, 10% of them unknown identifiers
  idis-bench --target 127.0.0.1:2643 --prefix 88.100.1 --keys 100000 --workload batch \\
             --batch-size 100 --not-found-share 0.1 --metrics http://127.0.0.1:9102/metrics

  # an open loop at a fixed 2000 calls/s: latency counts from when each call was due, so a
  # stalled server shows up in the percentiles instead of silently slowing the sender down
  idis-bench --target 127.0.0.1:2643 --prefix 88.100.1 --keys 100000 --rate 2000

Workloads: resolve (unary), batch (ResolveBatch), stream (ResolveStream, batches per message),
register (Create of new identifiers), register-batch (BatchCreate), mixed (--write-ratio of
the calls Replace an existing identifier, the rest Resolve), ping (Ping with a --ping-bytes
payload: the cost of a call that does nothing, to compare Resolve with), handle-udp and
handle-tcp (Handle-protocol resolution, --target being a node's Handle port, by the compiled
generator bench/_handle_load.pyx: --concurrency requests outstanding per process over UDP, or
connections open per process over TCP; closed loop only; statuses by response code, SUCCESS as
OK and HANDLE_NOT_FOUND as NOT_FOUND, LOST for no answer within --timeout).

Modes: direct (calls go to --target), recursive (Resolve with recursive=true to --target, a
node with [recursion] enabled), resolver (each client process follows referrals from --root
with the resolver library and caches what it learns).

Output: a progress line on stderr while it runs; then a JSON report on stdout (and in
--out/report.json): throughput (items of the calls answered OK or NOT_FOUND; the items of
failed calls are reported apart, as failed_items, never as served), latency percentiles from
an HDR histogram (p50, p90, p99, p99.9, max), calls by gRPC status, the load generator's own
CPU use, the deltas of the nodes' Prometheus metrics (--metrics, repeatable), and a PNG
(--out/report.png) with throughput over
time and the latency distribution. With --server-pid (a server process on this machine,
repeatable) it also reports the server's CPU over the measured seconds, per item resolved.

Requests are built before the run and sent as bytes, so the load generator spends its CPU on
sending. The end-to-end comparison with a plain Python server (python -m bench.e2e_bench) runs
this same load generator.

Needs the bench extra (numpy, hdrhistogram, matplotlib): pip install 'idis[bench]'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import multiprocessing as mp
import os
import resource
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import uvloop

from bench.dataset import KeySpace, registrations, wuhan_model
from bench.report import publish
from resolver.channels import ChannelPool, ClientTLS
from resolver.errors import IdisError, NotFound
from resolver.handle_protocol import KNOWN_RCS, RC, Op, ResolutionRequest, encode_resolution_request, request_message
from resolver.registrar import Registrar
from resolver.resolver import Resolver
from resolver.signing import Signer
from resolver.status import status_code_of
from resolver.wire import record_pb2, registration_pb2, resolution_pb2, value_to_pb, varint

# The bench extra: without it `idis-bench --help` still works, and a run says what to install.
BENCH_EXTRA = ("numpy", "hdrh", "matplotlib")
with contextlib.suppress(ModuleNotFoundError):
    import numpy as np
    from hdrh.histogram import HdrHistogram

HANDLE_WORKLOADS = ("handle-udp", "handle-tcp")
ANSWERED = ("OK", "NOT_FOUND")
"""The statuses of a call that was served: only their items count in the throughput."""
WORKLOADS = ("resolve", "batch", "stream", "register", "register-batch", "mixed", "ping", *HANDLE_WORKLOADS)
MODES = ("direct", "recursive", "resolver")
LOWEST_US, HIGHEST_US = 1, 120_000_000
POOL = 2000
STARTUP_SECONDS = 120.0
"""How long the load-generator processes may take to start before the run is given up."""


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, 3)


def percentiles(hist: HdrHistogram) -> dict[str, float]:
    """Latency percentiles in milliseconds."""
    if hist.get_total_count() == 0:
        return {k: 0.0 for k in ("p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms", "mean_ms")}
    return {
        "p50_ms": hist.get_value_at_percentile(50) / 1000,
        "p90_ms": hist.get_value_at_percentile(90) / 1000,
        "p99_ms": hist.get_value_at_percentile(99) / 1000,
        "p99_9_ms": hist.get_value_at_percentile(99.9) / 1000,
        "max_ms": hist.get_max_value() / 1000,
        "mean_ms": round(hist.get_mean_value() / 1000, 3),
    }


def latency_from_schedule(due: float, completed: float) -> float:
    """Open-loop latency: from when the call was due, not when it was sent, so time a call
    spent waiting behind a stalled server counts (no coordinated omission)."""
    return completed - due


def key_indexes(n_keys: int, count: int, popularity: str, s: float, seed: int) -> np.ndarray:
    """Which identifier (0..n_keys-1) each request asks for."""
    rng = np.random.default_rng(seed)
    if popularity == "uniform":
        return rng.integers(0, n_keys, count)
    weights = np.arange(1, n_keys + 1, dtype=np.float64) ** (-s)
    cdf = np.cumsum(weights / weights.sum())
    ranks = np.minimum(np.searchsorted(cdf, rng.random(count)), n_keys - 1)
    return rng.permutation(n_keys)[ranks]


def handle_request(identifier: str) -> bytes:
    """A Handle resolution request for ``identifier`` as HSJ sends it (the load generator gives
    each send a request id of its own)."""
    return request_message(Op.RESOLUTION, encode_resolution_request(ResolutionRequest(identifier.encode())), 0)


def keyspace_of(opts: Options) -> KeySpace:
    """The identifiers the load asks for: one prefix's dataset, or the Wuhan model's (under --apex)."""
    if opts.wuhan:
        model = wuhan_model(opts.wuhan)
        return KeySpace([(p, model.counts[p]) for p in model.prefixes_under(opts.apex or "88")])
    return KeySpace([(opts.prefix, opts.keys)])


@dataclass
class Options:
    workload: str
    mode: str
    address: str
    prefix: str
    keys: int
    seed: int
    popularity: str
    zipf_s: float
    not_found_share: float
    batch_size: int
    write_ratio: float
    concurrency: int
    rate: float
    duration: float
    warmup: float
    processes: int
    timeout: float
    wuhan: int = 0
    apex: str = ""
    ca: str = ""
    identity: str = ""
    key: str = ""
    ping_bytes: int = 180
    server_pids: list[int] = field(default_factory=list)
    """Server processes on this machine whose CPU use over the measured seconds is reported."""

    def tls(self) -> ClientTLS | None:
        return ClientTLS(Path(self.ca)) if self.ca else None

    def signer(self) -> Signer | None:
        return Signer.from_file(self.identity, Path(self.key)) if self.identity and self.key else None


@dataclass
class WorkerReport:
    calls: int = 0
    items: int = 0
    """Items of the calls answered OK or NOT_FOUND: what the throughput counts."""
    failed_items: int = 0
    """Items of the calls that failed (an error status, lost, refused): never counted as served."""
    statuses: dict[str, int] = field(default_factory=dict)
    histogram: bytes = b""
    per_second: list[int] = field(default_factory=list)
    cpu_seconds: float = 0.0
    elapsed: float = 0.0


class Worker:
    """One load-generator process."""

    def __init__(self, opts: Options, number: int, progress: Any, start: Any = None) -> None:
        """``start``: a barrier every load-generator process (and run_load) waits at before its
        warm-up, so they all send at once."""
        self.o = opts
        self.number = number
        self.progress = progress
        self.start = start
        self.keyspace = keyspace_of(opts)
        self.values = next(iter(registrations(opts.prefix, 1, opts.seed)))[1]
        self.picks = key_indexes(
            len(self.keyspace), 200_000, opts.popularity, opts.zipf_s, seed=opts.seed * 100 + number
        )
        self.missing = np.random.default_rng(number + 17).random(200_000) < opts.not_found_share
        self.cursor = 0
        self.serial = 0
        self.values_wire: bytes | None = None
        self.sent = 0
        self.pools: dict[str, list[bytes]] = {}
        self.hist = new_histogram()
        self.statuses: dict[str, int] = {}
        self.calls = self.items = self.failed_items = 0
        self.per_second: list[int] = []
        self.recording = False
        self.started = 0.0
        # The loops read time and wait through these, so a test can run them on a virtual clock.
        self.clock: Callable[[], float] = time.perf_counter
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def identifier(self) -> str:
        i = self.cursor % len(self.picks)
        self.cursor += 1
        if self.missing[i]:
            return f"{self.o.prefix}/NOT-FOUND.{self.number}.{self.cursor}"
        return self.keyspace.identifier(int(self.picks[i]))

    def fresh_identifier(self) -> str:
        self.serial += 1
        return f"{self.o.prefix}/BENCH.{os.getpid()}.{self.number}.{self.serial}"

    def record(self, status: str, latency: float, items: int) -> None:
        if not self.recording:
            return
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.hist.record_value(min(HIGHEST_US, max(LOWEST_US, int(latency * 1e6))))
        self.calls += 1
        if status not in ANSWERED:
            self.failed_items += items
            return
        self.items += items
        second = int(self.clock() - self.started)
        while len(self.per_second) <= second:
            self.per_second.append(0)
        self.per_second[second] += items

    # --- one operation -------------------------------------------------------------------

    async def operation(self, ctx: dict[str, Any]) -> tuple[str, int]:
        o = self.o
        if o.mode == "resolver":
            resolver: Resolver = ctx["resolver"]
            try:
                await resolver.resolve(self.identifier())
                return "OK", 1
            except NotFound:
                return "NOT_FOUND", 1
            except IdisError as exc:
                return status_code_of(exc).name, 1
        workload = o.workload
        if workload == "mixed":
            workload = "replace" if np.random.random() < o.write_ratio else "resolve"
        try:
            if workload == "resolve":
                await ctx["resolve"](self.prepared(self.resolve_request), timeout=o.timeout)
                return "OK", 1
            if workload == "ping":
                await ctx["ping"](self.prepared(self.ping_request), timeout=o.timeout)
                return "OK", 1
            if workload == "batch":
                await ctx["batch"](self.prepared(self.batch_request), timeout=o.timeout)
                return "OK", o.batch_size
            if workload == "register":
                create = registration_pb2.CreateRequest(identifier=self.fresh_identifier(), values=self.values_pb())
                await ctx["create"](create.SerializeToString(), timeout=o.timeout)
                return "OK", 1
            if workload == "register-batch":
                await ctx["batch_create"](self.register_batch_request(), timeout=o.timeout)
                return "OK", o.batch_size
            # replace: a write to an identifier that exists
            ident = self.keyspace.identifier(int(self.picks[self.cursor % len(self.picks)]))
            self.cursor += 1
            request_r = registration_pb2.ReplaceRequest(identifier=ident, values=self.values_pb())
            await ctx["replace"](request_r.SerializeToString(), timeout=o.timeout)
            return "OK", 1
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, o.batch_size if workload in ("batch", "register-batch") else 1

    def prepared(self, make: Any) -> bytes:
        """The next of POOL requests made before the run, so the load generator spends its CPU
        on sending, not on building protobuf messages."""
        pool = self.pools.get(make.__name__)
        if pool is None:
            batched = make.__name__ == "batch_request"
            size = max(50, POOL * 100 // self.o.batch_size) if batched else POOL
            pool = self.pools[make.__name__] = [make() for _ in range(size)]
        self.sent += 1
        return pool[self.sent % len(pool)]

    def resolve_request(self) -> bytes:
        return resolution_pb2.ResolveRequest(
            identifier=self.identifier(), recursive=self.o.mode == "recursive"
        ).SerializeToString()

    def ping_request(self) -> bytes:
        return resolution_pb2.PingRequest(payload=b"x" * self.o.ping_bytes).SerializeToString()

    def values_pb(self) -> list[record_pb2.Value]:
        return [value_to_pb(v) for v in self.values]

    def register_batch_request(self) -> bytes:
        """A BatchCreateRequest of ``batch_size`` fresh identifiers in wire form, joined from
        bytes: a protobuf object per item would cost the load generator more CPU than the node
        spends on the item. The same bytes as the message (tested)."""
        if self.values_wire is None:
            wires = [v.SerializeToString() for v in self.values_pb()]
            self.values_wire = b"".join(b"\x12" + varint(len(w)) + w for w in wires)
        parts = []
        for _ in range(self.o.batch_size):
            identifier = self.fresh_identifier().encode()
            item = b"\x0a" + varint(len(identifier)) + identifier + self.values_wire
            parts.append(b"\x0a" + varint(len(item)) + item)
        return b"".join(parts)

    def batch_request(self) -> bytes:
        return resolution_pb2.ResolveBatchRequest(
            requests=[resolution_pb2.ResolveRequest(identifier=self.identifier()) for _ in range(self.o.batch_size)]
        ).SerializeToString()

    # --- loops ------------------------------------------------------------------------------

    async def closed_loop(self, ctx: dict[str, Any], until: float) -> None:
        async def caller() -> None:
            if self.o.workload == "stream":
                await self.stream_caller(ctx, until)
                return
            while self.clock() < until:
                started = self.clock()
                status, items = await self.operation(ctx)
                self.record(status, self.clock() - started, items)

        await asyncio.gather(*(caller() for _ in range(self.o.concurrency)))

    async def stream_caller(self, ctx: dict[str, Any], until: float) -> None:
        """One stream, a batch a message, the next sent when the answer came; a stream the
        server ended is counted with its status and replaced by a new one."""
        call = ctx["stream"]()
        while self.clock() < until:
            started = self.clock()
            try:
                await call.write(self.prepared(self.batch_request))
                answer = await call.read()
                status = "OK" if isinstance(answer, bytes) else "UNAVAILABLE"
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
            self.record(status, self.clock() - started, self.o.batch_size)
            if status != "OK":
                call = ctx["stream"]()
        await call.done_writing()

    async def open_loop(self, ctx: dict[str, Any], until: float) -> None:
        """Starts a call every 1/rate seconds whether or not earlier ones have answered; a call
        the sender could not start on time (a stalled loop) starts at once, late, and its latency
        counts from when it was due."""
        rate = self.o.rate / self.o.processes
        start = self.clock()
        pending: set[asyncio.Task[None]] = set()

        async def one(due: float) -> None:
            status, items = await self.operation(ctx)
            self.record(status, latency_from_schedule(due, self.clock()), items)

        i = 0
        while True:
            due = start + i / rate
            if due >= until:
                break
            delay = due - self.clock()
            if delay > 0:
                await self.sleep(delay)
            task = asyncio.create_task(one(due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        if pending:
            await asyncio.wait(pending, timeout=self.o.timeout)

    async def run(self) -> WorkerReport:
        o = self.o
        ctx: dict[str, Any] = {}
        channel = None
        pool = ChannelPool(o.tls())
        signer = o.signer()
        if o.mode == "resolver":
            ctx["resolver"] = Resolver([o.address], timeout=o.timeout, channels=pool)
        else:
            channel = pool.get(o.address)
            ctx["channel"] = channel
            raw = {"request_serializer": None, "response_deserializer": None}
            ctx["resolve"] = channel.unary_unary("/idis.v1.Resolution/Resolve", **raw)
            ctx["batch"] = channel.unary_unary("/idis.v1.Resolution/ResolveBatch", **raw)
            ctx["stream"] = channel.stream_stream("/idis.v1.Resolution/ResolveStream", **raw)
            ctx["ping"] = channel.unary_unary("/idis.v1.Resolution/Ping", **raw)
            for name, method in (("create", "Create"), ("batch_create", "BatchCreate"), ("replace", "Replace")):
                ctx[name] = signed_call(
                    channel.unary_unary(f"/idis.v1.Registration/{method}", **raw),
                    f"/idis.v1.Registration/{method}",
                    signer,
                    o.address,
                )
        loop = self.open_loop if o.rate > 0 else self.closed_loop
        if o.workload in ("resolve", "batch", "stream", "mixed", "ping") and o.mode != "resolver":
            prepare = {"batch": self.batch_request, "stream": self.batch_request, "ping": self.ping_request}
            self.prepared(prepare.get(o.workload, self.resolve_request))
        if self.start is not None:
            await asyncio.to_thread(self.start.wait, STARTUP_SECONDS)
        if o.warmup > 0:
            await loop(ctx, self.clock() + o.warmup)
        reporter = asyncio.create_task(self.report_progress())
        before = resource.getrusage(resource.RUSAGE_SELF)
        self.recording = True
        self.started = self.clock()
        await loop(ctx, self.started + o.duration)
        elapsed = self.clock() - self.started
        self.recording = False
        after = resource.getrusage(resource.RUSAGE_SELF)
        reporter.cancel()
        if "resolver" in ctx:
            await ctx["resolver"].close()
        await pool.close()
        return WorkerReport(
            calls=self.calls,
            items=self.items,
            failed_items=self.failed_items,
            statuses=self.statuses,
            histogram=self.hist.encode(),
            per_second=self.per_second,
            cpu_seconds=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            elapsed=elapsed,
        )

    def run_handle(self) -> WorkerReport:
        """The handle-udp and handle-tcp workloads: the compiled generator, in this process."""
        from bench._handle_load import bucket_midpoint_ns, run_tcp, run_udp

        o = self.o
        host, _, port = o.address.rpartition(":")
        requests = [handle_request(self.identifier()) for _ in range(len(self.picks))]
        run = run_udp if o.workload == "handle-udp" else run_tcp
        if self.start is not None:
            self.start.wait(STARTUP_SECONDS)
        if o.warmup > 0:
            run(host.strip("[]"), int(port), requests, o.warmup, o.concurrency, o.timeout)
        result = run(host.strip("[]"), int(port), requests, o.duration, o.concurrency, o.timeout)
        for index, n in result["histogram"].items():
            self.hist.record_value(min(HIGHEST_US, max(LOWEST_US, round(bucket_midpoint_ns(index) / 1000))), n)
        names = {RC.SUCCESS: "OK", RC.HANDLE_NOT_FOUND: "NOT_FOUND"}
        statuses = {names.get(rc, RC(rc).name if rc in KNOWN_RCS else f"RC_{rc}"): n for rc, n in result["rc"].items()}
        statuses |= {name.upper(): result[name] for name in ("lost", "failed") if result[name]}
        calls = result["answered"] + result["lost"] + result["failed"]
        answered = sum(n for status, n in statuses.items() if status in ANSWERED)
        return WorkerReport(
            calls=calls,
            items=answered,
            failed_items=calls - answered,
            statuses=statuses,
            histogram=self.hist.encode(),
            per_second=result["per_second"],
            cpu_seconds=result["cpu_s"],
            elapsed=result["elapsed_s"],
        )

    async def report_progress(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            p99 = self.hist.get_value_at_percentile(99) / 1000 if self.hist.get_total_count() else 0.0
            errors = sum(n for s, n in self.statuses.items() if s not in ANSWERED)
            self.progress.put((self.number, self.items, errors, p99))


def signed_call(rpc: Any, path: str, signer: Signer | None, address: str) -> Any:
    """``rpc`` with each call signed for the node at ``address`` (nodes that require signatures
    refuse unsigned writes, and calls signed for another node)."""
    if signer is None:
        return rpc

    async def call(data: bytes, **options: Any) -> Any:
        return await rpc(data, metadata=signer.metadata(path, data, address), **options)

    return call


def closed_loop(
    workload: str,
    address: str,
    *,
    prefix: str,
    keys: int,
    batch_size: int,
    concurrency: int,
    duration: float,
    warmup: float,
    processes: int,
    server_pids: list[int],
    seed: int = 1,
) -> Options:
    """The options of the benches' runs (bench/*_bench.py): a closed loop, direct mode, uniform
    popularity over ``keys`` identifiers, every one of them found."""
    return Options(
        workload=workload,
        mode="direct",
        address=address,
        prefix=prefix,
        keys=keys,
        seed=seed,
        popularity="uniform",
        zipf_s=0.0,
        not_found_share=0.0,
        batch_size=batch_size,
        write_ratio=0.0,
        concurrency=concurrency,
        rate=0.0,
        duration=duration,
        warmup=warmup,
        processes=processes,
        timeout=60.0,
        server_pids=server_pids,
    )


def _worker_main(opts: Options, number: int, progress: Any, results: Any, start: Any) -> None:
    targets = opts.address.split(",")  # the servers of one site: each process loads one, in turn
    worker = Worker(replace(opts, address=targets[number % len(targets)]), number, progress, start)
    report = worker.run_handle() if opts.workload in HANDLE_WORKLOADS else uvloop.run(worker.run())
    results.put(report)


# --- Prometheus --------------------------------------------------------------------------------


def sample_totals(text: str) -> dict[str, float]:
    """The samples of Prometheus exposition text (parsed by prometheus_client), summed over
    their labels, except requests kept per [method,code] and store operations per [operation]."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key, labels = sample.name, sample.labels
            if key.endswith(("_bucket", "_created")) or sample.value != sample.value:  # buckets, NaN
                continue
            if key == "idis_requests_total":
                key = f"{key}[{labels.get('method', '?')},{labels.get('code', '?')}]"
            elif key.startswith("idis_store_operation_duration_seconds"):
                key = f"{key}[{labels.get('operation', '?')}]"
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def scrape(url: str) -> dict[str, float]:
    """A node's Prometheus endpoint, as sample_totals."""
    return sample_totals(urllib.request.urlopen(url, timeout=5).read().decode())


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    hits, misses = delta.get("idis_cache_hits_total", 0.0), delta.get("idis_cache_misses_total", 0.0)
    requests = {
        k[len("idis_requests_total") :]: v for k, v in delta.items() if k.startswith("idis_requests_total[") and v
    }
    store = {}
    for op in ("get", "write_transaction"):
        count = delta.get(f"idis_store_operation_duration_seconds_count[{op}]", 0.0)
        total = delta.get(f"idis_store_operation_duration_seconds_sum[{op}]", 0.0)
        store[op] = {"count": count, "mean_ms": round(1000 * total / count, 3) if count else None}
    return {
        "requests": requests,
        "cache_hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        "cache_hits": hits,
        "cache_misses": misses,
        "store": store,
        "registrations": delta.get("idis_registrations_total", 0.0),
        "referrals": delta.get("idis_referrals_total", 0.0),
    }


# --- the run -----------------------------------------------------------------------------------


async def load_dataset(opts: Options) -> int:
    """Registers the dataset the load asks for (idempotently), through the resolver or the node."""
    pool = ChannelPool(opts.tls())
    resolver = Resolver([opts.address], channels=pool) if opts.mode == "resolver" else None
    registrar = Registrar(resolver, node=None if resolver else opts.address, signer=opts.signer(), channels=pool)
    loaded = 0
    batch: list[Any] = []
    try:
        for item in registrations(opts.prefix, opts.keys, opts.seed):
            batch.append(item)
            if len(batch) == 2000:
                loaded += sum(1 for o in await registrar.batch_create(batch, 2000) if o.error is None)
                batch = []
        if batch:
            loaded += sum(1 for o in await registrar.batch_create(batch, 2000) if o.error is None)
    finally:
        await registrar.close()
        if resolver is not None:
            await resolver.close()
    return loaded


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system) a process on this machine has used, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of a run that the bench scripts report: rates, errors, p50/p99 and the load
    generator's share of the machine (plus the server's CPU when its pid was given)."""
    figures = {
        "calls_per_s": result["calls_per_s"],
        "items_per_s": result["items_per_s"],
        "errors": result["errors"],
        "p50_ms": result["latency"]["p50_ms"],
        "p99_ms": result["latency"]["p99_ms"],
        "load_generator_cpu_percent_of_machine": result["load_generator_cpu_percent_of_machine"],
    }
    for server in ("server_cpu_percent_of_one_core", "server_cpu_us_per_item"):
        if server in result:
            figures[server] = result[server]
    return figures


def run_load(opts: Options, show_progress: bool = True) -> dict[str, Any]:
    """Runs the load from ``opts.processes`` processes; the merged result (see the README)."""
    ctx = mp.get_context("spawn")
    progress, results = ctx.Queue(), ctx.Queue()
    start = ctx.Barrier(opts.processes + 1)
    procs = [ctx.Process(target=_worker_main, args=(opts, n, progress, results, start)) for n in range(opts.processes)]
    for p in procs:
        p.start()
    try:
        start.wait(STARTUP_SECONDS)
    except threading.BrokenBarrierError as exc:
        raise RuntimeError("a load-generator process failed to start") from exc
    time.sleep(opts.warmup)  # the server's CPU counts from the end of the warm-up, as the workers' does
    server_before = sum(process_cpu_seconds(pid) for pid in opts.server_pids)
    reports = _collect(procs, progress, results, opts.warmup, show_progress)
    server_seconds = sum(process_cpu_seconds(pid) for pid in opts.server_pids) - server_before
    result = _merge(reports)
    if opts.server_pids:
        elapsed, items = max(r.elapsed for r in reports), max(1, result["items"])
        result["server_cpu_percent_of_one_core"] = round(100 * server_seconds / elapsed, 1)
        result["server_cpu_us_per_item"] = round(1e6 * server_seconds / items, 3)
    return result


def _collect(procs: list[Any], progress: Any, results: Any, warmup: float, show: bool) -> list[WorkerReport]:
    """Every process's report, showing a progress line meanwhile; RuntimeError if one fails."""
    reports: list[WorkerReport] = []
    latest: dict[int, tuple[int, int, float]] = {}
    began = time.monotonic()
    while len(reports) < len(procs):
        while not results.empty():
            reports.append(results.get())
        while not progress.empty():
            number, items, errors, p99 = progress.get()
            latest[number] = (items, errors, p99)
        if show and latest:
            elapsed = max(0.001, time.monotonic() - began - warmup)
            items = sum(v[0] for v in latest.values())
            errors = sum(v[1] for v in latest.values())
            p99 = max(v[2] for v in latest.values())
            line = f"\r[{elapsed:6.1f}s] {items / elapsed:12,.0f} items/s  errors {errors:,}  p99 {p99:8.2f} ms "
            print(line, end="", file=sys.stderr, flush=True)
        if any(not p.is_alive() and p.exitcode not in (0, None) for p in procs):
            raise RuntimeError("a load-generator process failed")
        time.sleep(0.2)
    for p in procs:
        p.join()
    if show:
        print(file=sys.stderr)
    return reports


def _merge(reports: list[WorkerReport]) -> dict[str, Any]:
    hist = new_histogram()
    statuses: dict[str, int] = {}
    per_second: list[int] = []
    for r in reports:
        hist.add(HdrHistogram.decode(r.histogram))
        for s, n in r.statuses.items():
            statuses[s] = statuses.get(s, 0) + n
        per_second += [0] * (len(r.per_second) - len(per_second))
        for i, n in enumerate(r.per_second):
            per_second[i] += n
    elapsed = max(r.elapsed for r in reports)
    calls = sum(r.calls for r in reports)
    items = sum(r.items for r in reports)
    cpu = sum(r.cpu_seconds for r in reports)
    return {
        "calls": calls,
        "items": items,
        "seconds": round(elapsed, 3),
        "calls_per_s": round(calls / elapsed, 1),
        "items_per_s": round(items / elapsed, 1),
        "latency": percentiles(hist),
        "statuses": statuses,
        "errors": sum(n for s, n in statuses.items() if s not in ANSWERED),
        "failed_items": sum(r.failed_items for r in reports),
        "load_generator_cpu_percent_of_machine": round(100 * cpu / (elapsed * (os.cpu_count() or 1)), 1),
        "load_generator_cpu_s": round(cpu, 3),
        "items_per_second_timeline": per_second,
        "_histogram": hist,
    }


def plot(report: dict[str, Any], hist: HdrHistogram, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    timeline = report["result"]["items_per_second_timeline"]
    ax1.plot(range(len(timeline)), timeline, marker="o")
    ax1.set_xlabel("second")
    ax1.set_ylabel("items per second")
    ax1.set_title(f"Throughput ({report['options']['workload']}, {report['options']['mode']})")
    ax1.set_ylim(bottom=0)
    quantiles = [50, 75, 90, 95, 99, 99.5, 99.9, 99.99, 100]
    values = [hist.get_value_at_percentile(q) / 1000 for q in quantiles]
    ax2.plot(range(len(quantiles)), values, marker="o")
    ax2.set_xticks(range(len(quantiles)), [f"p{q:g}" for q in quantiles])
    ax2.set_ylabel("latency (ms)")
    ax2.set_yscale("log")
    ax2.set_title("Latency distribution (HDR histogram)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idis-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="the node to load (direct and recursive modes); several, comma-separated (the servers of one"
        " site): the load processes take them in turn",
    )
    where.add_argument("--root", metavar="HOST:PORT", help="the top-level node (resolver mode)")
    p.add_argument("--mode", choices=MODES, default="direct")
    p.add_argument("--workload", choices=WORKLOADS, default="resolve")
    p.add_argument("--prefix", default="88.100.1", help="prefix of the dataset's identifiers")
    p.add_argument("--keys", type=int, default=10000, help="identifiers in the dataset")
    p.add_argument("--seed", type=int, default=1, help="dataset seed (same seed, same identifiers)")
    p.add_argument(
        "--wuhan",
        type=int,
        default=0,
        metavar="TOTAL",
        help="ask for identifiers of the Wuhan model of TOTAL registrations (see idis-wuhan)",
    )
    p.add_argument("--apex", default="", help="with --wuhan: only identifiers under this prefix")
    p.add_argument("--load", action="store_true", help="register the dataset first (idempotent)")
    p.add_argument("--popularity", choices=("uniform", "zipf"), default="zipf")
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--not-found-share", type=float, default=0.0, help="share of queries for unknown identifiers")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--write-ratio", type=float, default=0.1, help="mixed workload: share of writes")
    p.add_argument("--concurrency", type=int, default=16, help="closed loop: callers per process")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: total calls/s (0: closed loop)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("--processes", type=int, default=2, help="load-generator processes")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    p.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="URL",
        help="a node's Prometheus endpoint to diff before/after (repeatable)",
    )
    p.add_argument("--out", type=Path, default=Path("idis-bench-report"), help="folder for report.json/png")
    p.add_argument("--ca", default=os.environ.get("IDIS_CA", ""), help="CA of the nodes' TLS (or $IDIS_CA)")
    p.add_argument(
        "--identity",
        default=os.environ.get("IDIS_IDENTITY", ""),
        help="administrator signing writes and --load (or $IDIS_IDENTITY)",
    )
    p.add_argument("--key", default=os.environ.get("IDIS_KEY", ""), help="its private key file (or $IDIS_KEY)")
    p.add_argument("--ping-bytes", type=int, default=180, help="ping workload: the payload's size")
    p.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=[],
        metavar="PID",
        help="a server process on this machine whose CPU to report (repeatable: one per worker)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def require_bench_extra() -> None:
    """Exits naming the extra to install when a module the load tester needs is missing."""
    missing = [module for module in BENCH_EXTRA if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(
            f"idis-bench: {', '.join(missing)} not installed: the load tester needs the bench extra:"
            " pip install 'idis[bench]'"
        )


def options_of(args: argparse.Namespace) -> Options:
    """The run that idis-bench's command line (``build_parser``) asks for; SystemExit for an
    impossible combination."""
    if args.workload == "stream" and args.rate:
        raise SystemExit("idis-bench: the stream workload runs closed-loop only (drop --rate)")
    if args.mode == "resolver" and args.workload not in ("resolve",):
        raise SystemExit("idis-bench: resolver mode runs the resolve workload only")
    if args.workload in HANDLE_WORKLOADS and (args.rate or args.mode != "direct"):
        raise SystemExit(f"idis-bench: {args.workload} runs closed-loop in direct mode only (drop --rate, --mode)")
    return Options(
        workload=args.workload,
        mode=args.mode,
        address=args.target or args.root,
        prefix=args.prefix,
        keys=args.keys,
        seed=args.seed,
        popularity=args.popularity,
        zipf_s=args.zipf_s,
        not_found_share=args.not_found_share,
        batch_size=args.batch_size,
        write_ratio=args.write_ratio,
        concurrency=args.concurrency,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        processes=args.processes,
        timeout=args.timeout,
        wuhan=args.wuhan,
        apex=args.apex,
        ca=args.ca,
        identity=args.identity,
        key=args.key,
        ping_bytes=args.ping_bytes,
        server_pids=args.server_pid,
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    require_bench_extra()
    opts = options_of(args)
    if args.load:
        print(f"loading {opts.keys:,} identifiers under {opts.prefix} ...", file=sys.stderr, flush=True)
        loaded = asyncio.run(load_dataset(opts))
        print(f"loaded (or found identical) {loaded:,}", file=sys.stderr, flush=True)
    before = {url: scrape(url) for url in args.metrics}
    result = run_load(opts, show_progress=not args.quiet)
    hist = result.pop("_histogram")
    after = {url: scrape(url) for url in args.metrics}
    report: dict[str, Any] = {
        "options": dict(vars(opts)),
        "result": result,
        "nodes": {url: metric_deltas(before[url], after[url]) for url in args.metrics},
    }
    publish(report, args.out, "report", lambda path: plot(report, hist, path))


if __name__ == "__main__":
    main()
