"""End-to-end resolution throughput on cache hits, against baselines measured in the same run.

    python -m bench.e2e_bench [--runs 3] [--duration 5] [--count 10000] [--out bench/results]

Starts, on 127.0.0.1 in a temporary folder: a real enterprise node (cache on) holding --count
registrations, and the pure-Python protobuf baseline server (bench/baseline_server.py) holding
the same records in a dict. Then, for --runs rounds, in alternating order, idis-bench's load
generator (bench.idis_bench.run_load, closed loop, uniform popularity) runs:

* unary:  the node's Resolve (cache hits)  vs  the node's Ping, a no-op of the same shape;
* batch:  the node's ResolveBatch of 100 and of 1000  vs  the baseline's ResolveBatch;
* stream: the node's ResolveStream, 100 identifiers a message  vs  the baseline's.

Each scenario is one idis-bench run (python -m bench.idis_bench --target ADDRESS --workload
WORKLOAD --batch-size N --concurrency C --popularity uniform --keys COUNT --server-pid PID).
Prints JSON (medians over the runs, and the ratios the targets are stated in) and writes a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.dataset import registrations
from bench.idis_bench import closed_loop, headline, require_bench_extra, run_load
from bench.report import publish
from nodes.hierarchy import NodeProcess, NodeSpec
from nodes.ready import read_ready
from resolver.registrar import Registrar
from resolver.wire import resolution_pb2, resolution_pb2_grpc

PREFIX = "88.100.1"


@dataclass(frozen=True)
class Scenario:
    """One idis-bench run: a workload against the node or the baseline."""

    name: str
    workload: str
    batch_size: int
    concurrency: int
    on_baseline: bool = False


SCENARIOS = (
    Scenario("node_ping", "ping", 1, 16),
    Scenario("node_resolve", "resolve", 1, 16),
    Scenario("node_batch100", "batch", 100, 4),
    Scenario("node_batch1000", "batch", 1000, 2),
    Scenario("node_stream100", "stream", 100, 4),
    Scenario("baseline_batch100", "batch", 100, 4, on_baseline=True),
    Scenario("baseline_batch1000", "batch", 1000, 2, on_baseline=True),
    Scenario("baseline_stream100", "stream", 100, 4, on_baseline=True),
)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def seed_node(address: str, count: int) -> list[str]:
    items = list(registrations(PREFIX, count))
    registrar = Registrar(node=address)
    try:
        for start in range(0, len(items), 2000):
            for outcome in await registrar.batch_create(items[start : start + 2000], batch_size=2000):
                if outcome.error is not None:
                    raise outcome.error
    finally:
        await registrar.close()
    return [ident for ident, _ in items]


async def warm(address: str, identifiers: list[str]) -> None:
    """Every identifier resolved once on the node, so the measured calls are cache hits."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = resolution_pb2_grpc.ResolutionStub(channel)
        for start in range(0, len(identifiers), 1000):
            batch = [resolution_pb2.ResolveRequest(identifier=i) for i in identifiers[start : start + 1000]]
            await stub.ResolveBatch(resolution_pb2.ResolveBatchRequest(requests=batch))


async def seed_and_warm(address: str, count: int) -> None:
    await warm(address, await seed_node(address, count))


def start_baseline(count: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.baseline_server", "--prefix", PREFIX, "--count", str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    event = read_ready(proc.stdout)
    if event is None:
        raise RuntimeError(f"the baseline server exited ({proc.wait()}) before it was ready")
    return proc, str(event["address"])


def measure(scenario: Scenario, address: str, server_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """One scenario through idis-bench's load generator; the figures the report compares."""
    opts = closed_loop(
        scenario.workload,
        address,
        prefix=PREFIX,
        keys=args.count,
        batch_size=scenario.batch_size,
        concurrency=scenario.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        processes=args.processes,
        server_pids=[server_pid],
    )
    figures = headline(run_load(opts, show_progress=False))
    figures["client_cpu_percent_of_machine"] = figures.pop("load_generator_cpu_percent_of_machine")
    return figures


def run_rounds(args: argparse.Namespace, node: tuple[str, int], baseline: tuple[str, int]) -> dict[str, list[Any]]:
    """Every scenario ``args.runs`` times, in alternating order; the summaries by scenario."""
    results: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.runs):
        order = SCENARIOS if round_ % 2 == 0 else tuple(reversed(SCENARIOS))
        for scenario in order:
            address, pid = baseline if scenario.on_baseline else node
            summary = measure(scenario, address, pid, args)
            results.setdefault(scenario.name, []).append(summary)
            progress(
                f"run {round_ + 1}/{args.runs} {scenario.name}: {summary['items_per_s']:.0f} items/s, "
                f"p99 {summary['p99_ms']} ms, client CPU {summary['client_cpu_percent_of_machine']}%, "
                f"server CPU {summary['server_cpu_percent_of_one_core']}%"
            )
    return results


def report_of(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    medians = {
        name: {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
        for name, runs in results.items()
    }

    def ratio(a: str, b: str, key: str = "items_per_s") -> float:
        per_run = [float(x[key]) / float(y[key]) for x, y in zip(results[a], results[b], strict=True) if y[key]]
        return round(statistics.median(per_run), 2) if per_run else 0.0

    return {
        "registrations": args.count,
        "runs": args.runs,
        "seconds_per_run": args.duration,
        "load_generator_processes": args.processes,
        "load_generator": "idis-bench (bench.idis_bench.run_load)",
        "median": medians,
        "ratios": {
            "unary_resolve_vs_noop_ping_calls": ratio("node_resolve", "node_ping", "calls_per_s"),
            "batch100_node_vs_python_baseline_items": ratio("node_batch100", "baseline_batch100"),
            "batch1000_node_vs_python_baseline_items": ratio("node_batch1000", "baseline_batch1000"),
            "stream100_node_vs_python_baseline_items": ratio("node_stream100", "baseline_stream100"),
            # Server CPU per identifier: the efficiency ratio, whatever limited the throughput.
            "batch100_baseline_vs_node_server_cpu_per_item": ratio(
                "baseline_batch100", "node_batch100", "server_cpu_us_per_item"
            ),
            "batch1000_baseline_vs_node_server_cpu_per_item": ratio(
                "baseline_batch1000", "node_batch1000", "server_cpu_us_per_item"
            ),
            "stream100_baseline_vs_node_server_cpu_per_item": ratio(
                "baseline_stream100", "node_stream100", "server_cpu_us_per_item"
            ),
        },
        "all_runs": results,
    }


def run_options(description: str | None, processes: int) -> argparse.ArgumentParser:
    """The options of a bench that runs ``measure`` rounds against a seeded node (this one and
    bench.http_bench): rounds, their length, the node's size, load processes, output folder."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each load-generator run")
    parser.add_argument("--count", type=int, default=10000, help="registrations on the node")
    parser.add_argument("--processes", type=int, default=processes, help="load-generator processes")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = run_options(__doc__, processes=2).parse_args(argv)
    require_bench_extra()

    with tempfile.TemporaryDirectory(prefix="idis-e2e-") as tmp:
        state = Path(tmp)
        # No per-peer quota: the load generator is one peer, and a quota would be what is measured.
        unlimited = {"peer_calls_per_second": 0, "peer_burst": 0}
        spec = NodeSpec(
            "bench-node", "enterprise", PREFIX, 0, extra={"storage": {"synchronous": "normal"}, "quotas": unlimited}
        )
        (state / "bench-node.toml").write_text(spec.config_text())
        node = NodeProcess(state / "bench-node.toml", state / "bench-node.log")
        node_address = node.start()
        baseline, baseline_address = start_baseline(args.count)
        try:
            progress(f"seeding {args.count} registrations")
            asyncio.run(seed_and_warm(node_address, args.count))
            node_pid = node.proc.pid if node.proc else 0
            results = run_rounds(args, (node_address, node_pid), (baseline_address, baseline.pid))
        finally:
            node.stop()
            baseline.terminate()
            baseline.wait(10)

    report = report_of(args, results)
    publish(report, args.out, "e2e_bench", lambda path: plot(report, path), hidden=("all_runs",))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = report["median"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = ["batch100", "batch1000", "stream100"]
    for i, who in enumerate(("node_", "baseline_")):
        ax1.bar(
            [x + i * 0.35 for x in range(len(groups))],
            [med[who + g]["items_per_s"] for g in groups],
            0.35,
            label="node (fast path)" if who == "node_" else "pure-Python protobuf baseline",
        )
    ax1.set_xticks([x + 0.175 for x in range(len(groups))], groups)
    ax1.set_ylabel("identifiers resolved per second")
    ax1.set_title("Batch resolution on cache hits")
    ax1.legend()
    names = ["node_ping", "node_resolve"]
    ax2.bar(["Ping (no-op)", "Resolve (cache hit)"], [med[n]["calls_per_s"] for n in names], color=["grey", "C0"])
    ax2.set_ylabel("unary calls per second")
    ax2.set_title(f"Unary: Resolve / Ping = {report['ratios']['unary_resolve_vs_noop_ping_calls']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
