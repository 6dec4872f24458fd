"""The same node on SQLite and on PostgreSQL, and a site of two servers on one PostgreSQL.

    python -m bench.engine_bench [--runs 3] [--duration 5] [--count 20000] [--lag-samples 300]
                                 [--out bench/results]

Starts, on 127.0.0.1 in a temporary folder, a throwaway PostgreSQL server (fsync on: the
durability a deployment has) and enterprise nodes for 88.100.1 with their lookup caches off, so
that every resolution takes the miss path down to the store:

* ``sqlite``: one node on its own SQLite file (synchronous=FULL, the default);
* ``postgresql``: one node on a PostgreSQL database;
* ``site``: that node and a second node process on the same database (one site, two servers).

Each is seeded with --count registrations (BatchCreate, 2000 a call). Then, for --runs rounds,
in alternating order, idis-bench's load generator (bench.idis_bench.run_load) measures:

* batch registration (``register-batch``, 2000 a call, fresh identifiers) on each engine;
* miss-path resolution (``batch`` of 100, uniform over the seeded identifiers) on each engine,
  and on the site (two load processes, one per server) against one server (two load processes);

and last, with two more node processes on one database and their caches on, the invalidation lag:
an identifier resolved (so cached) through server B is replaced through server A; the time from
A's acknowledgement until B answers the new version, --lag-samples times.

Prints JSON (medians, the ratios, the lag distribution) and writes a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.e2e_bench import progress, seed_node
from bench.idis_bench import closed_loop, headline, require_bench_extra, run_load
from bench.postgres_server import PostgresServer
from bench.report import publish
from nodes.hierarchy import NodeProcess, NodeSpec
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.resolver import Resolver

PREFIX = "88.100.1"
UNLIMITED = {"peer_calls_per_second": 0, "peer_burst": 0}
"""No per-peer quota: the load generator is one peer, and a quota would be what is measured."""


def start_node(state: Path, name: str, storage: dict[str, Any], cache: bool) -> NodeProcess:
    spec = NodeSpec(
        name, "enterprise", PREFIX, 0, extra={"storage": storage, "quotas": UNLIMITED, "cache": {"enabled": cache}}
    )
    (state / f"{name}.toml").write_text(spec.config_text(f"{name}.sqlite3"))
    node = NodeProcess(state / f"{name}.toml", state / f"{name}.log")
    node.start()
    return node


def load(workload: str, targets: list[NodeProcess], args: argparse.Namespace, processes: int) -> dict[str, Any]:
    batch = 2000 if workload == "register-batch" else 100
    opts = closed_loop(
        workload,
        ",".join(t.address for t in targets),
        prefix=PREFIX,
        keys=args.count,
        batch_size=batch,
        concurrency=4 if workload == "register-batch" else 8,
        duration=args.duration,
        warmup=args.warmup,
        processes=processes,
        server_pids=[t.proc.pid for t in targets if t.proc is not None],
    )
    return headline(run_load(opts, show_progress=False))


async def lag_samples(a: str, b: str, samples: int) -> list[float]:
    """Seconds from a replace acknowledged by ``a`` to ``b`` answering it (b had it cached)."""
    registrar = Registrar(node=a)
    lags: list[float] = []
    try:
        await registrar.create(f"{PREFIX}/LAG", [Value(1, "URL", b"0")])
        async with Resolver([b], cache_answers=False) as through_b:
            for n in range(1, samples + 1):
                await through_b.resolve(f"{PREFIX}/LAG")  # cached on b
                written = await registrar.replace(f"{PREFIX}/LAG", [Value(1, "URL", str(n).encode())])
                acknowledged = time.perf_counter()
                while True:
                    record = await through_b.resolve(f"{PREFIX}/LAG")
                    if record.version == written.record.version:
                        break
                    if time.perf_counter() - acknowledged > 10:
                        raise RuntimeError("a change was not seen through the other server within 10 s")
                lags.append(time.perf_counter() - acknowledged)
    finally:
        await registrar.close()
    return lags


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return ""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--count", type=int, default=20000, help="registrations seeded on each engine")
    parser.add_argument("--lag-samples", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    require_bench_extra()

    with tempfile.TemporaryDirectory(prefix="idis-engines-") as tmp:
        state = Path(tmp)
        postgres = PostgresServer(fsync=True)
        postgres.init()
        postgres.start()
        nodes: list[NodeProcess] = []
        try:
            pg_storage = {"engine": "postgresql", "dsn": postgres.create_database_now("site")}
            sqlite = start_node(state, "sqlite", {"synchronous": "full"}, cache=False)
            pg = start_node(state, "pg-a", pg_storage, cache=False)
            pg_b = start_node(state, "pg-b", pg_storage, cache=False)
            nodes += [sqlite, pg, pg_b]
            for node in (sqlite, pg):
                progress(f"seeding {args.count} registrations through {node.config.stem}")
                asyncio.run(seed_node(node.address, args.count))
            results: dict[str, list[dict[str, Any]]] = {}
            scenarios = [
                ("register_sqlite", "register-batch", [sqlite], 1),
                ("register_postgresql", "register-batch", [pg], 1),
                ("miss_sqlite", "batch", [sqlite], 2),
                ("miss_postgresql", "batch", [pg], 2),
                ("miss_site_one_server", "batch", [pg], 2),
                ("miss_site_two_servers", "batch", [pg, pg_b], 2),
            ]
            for round_ in range(args.runs):
                for name, workload, targets, processes in scenarios if round_ % 2 == 0 else scenarios[::-1]:
                    figures = load(workload, targets, args, processes)
                    results.setdefault(name, []).append(figures)
                    progress(
                        f"run {round_ + 1}/{args.runs} {name}: {figures['items_per_s']:.0f} items/s,"
                        f" p99 {figures['p99_ms']} ms, server CPU {figures['server_cpu_percent_of_one_core']}%"
                    )
            lag_storage = {"engine": "postgresql", "dsn": postgres.create_database_now("lag")}
            a = start_node(state, "lag-a", lag_storage, cache=True)
            b = start_node(state, "lag-b", lag_storage, cache=True)
            nodes += [a, b]
            progress(f"measuring the invalidation lag, {args.lag_samples} changes")
            lags = asyncio.run(lag_samples(a.address, b.address, args.lag_samples))
        finally:
            for node in nodes:
                node.stop()
            postgres.remove()

    report = report_of(args, results, lags)
    publish(report, args.out, "engine_bench", lambda path: plot(report, lags, path), hidden=("all_runs",))


def report_of(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], lags: list[float]) -> dict[str, Any]:
    def ratio(a: str, b: str) -> dict[str, float]:
        per_run = [x["items_per_s"] / y["items_per_s"] for x, y in zip(results[a], results[b], strict=True)]
        return {
            "median": round(statistics.median(per_run), 3),
            "min": round(min(per_run), 3),
            "max": round(max(per_run), 3),
        }

    ms = [lag * 1000 for lag in lags]
    return {
        "registrations_seeded": args.count,
        "runs": args.runs,
        "seconds_per_run": args.duration,
        "cpu": cpu_model(),
        "median_items_per_s": {
            name: round(statistics.median(r["items_per_s"] for r in runs)) for name, runs in results.items()
        },
        "ratios": {
            "register_postgresql_vs_sqlite": ratio("register_postgresql", "register_sqlite"),
            "miss_postgresql_vs_sqlite": ratio("miss_postgresql", "miss_sqlite"),
            "miss_site_two_servers_vs_one": ratio("miss_site_two_servers", "miss_site_one_server"),
        },
        "invalidation_lag_ms": {
            "samples": len(ms),
            "p50": round(percentile(ms, 0.5), 2),
            "p90": round(percentile(ms, 0.9), 2),
            "p99": round(percentile(ms, 0.99), 2),
            "max": round(max(ms), 2),
        },
        "all_runs": results,
    }


def plot(report: dict[str, Any], lags: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = report["median_items_per_s"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    ax1.bar(["SQLite", "PostgreSQL"], [med["register_sqlite"], med["register_postgresql"]], color=["C0", "C1"])
    ax1.set_title("BatchCreate (2000 a call)")
    ax1.set_ylabel("registrations per second")
    labels = ["SQLite", "PostgreSQL", "site: 1 server", "site: 2 servers"]
    names = ["miss_sqlite", "miss_postgresql", "miss_site_one_server", "miss_site_two_servers"]
    ax2.bar(labels, [med[n] for n in names], color=["C0", "C1", "C1", "C2"])
    ax2.set_title("Miss-path resolution (ResolveBatch of 100, cache off)")
    ax2.set_ylabel("identifiers resolved per second")
    ax2.tick_params(axis="x", labelrotation=15)
    ordered = sorted(lag * 1000 for lag in lags)
    ax3.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))])
    ax3.set_xscale("log")
    ax3.set_xlabel("ms from acknowledgement on A to the new answer through B")
    ax3.set_ylabel("share of changes")
    ax3.set_title(f"Invalidation lag between servers (p99 {report['invalidation_lag_ms']['p99']} ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
