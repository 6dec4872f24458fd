"""End-to-end resolution throughput on cache hits, against baselines measured in the same run.

    python -m bench.e2e_bench [--runs 3] [--duration 5] [--count 10000] [--out bench/results]

Starts, on 127.0.0.1 in a temporary folder: a real enterprise node (cache on) holding --count
registrations, and the pure-Python protobuf baseline server (bench/baseline_server.py) holding
the same records in a dict. Then, for --runs rounds, in alternating order:

* unary:  the node's Resolve (cache hits)  vs  the node's Ping, a no-op of the same shape;
* batch:  the node's ResolveBatch of 100 and of 1000  vs  the baseline's ResolveBatch;
* stream: the node's ResolveStream, 100 identifiers a message  vs  the baseline's.

Prints JSON (medians over the runs, and the ratios the targets are stated in) and writes a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.dataset import registrations
from bench.loadgen import Result, Scenario, run
from nodes.hierarchy import NodeProcess, NodeSpec
from nodes.ready import read_ready
from resolver.registrar import Registrar
from resolver.wire import resolution_pb2

RESOLVE = "/idis.v1.Resolution/Resolve"
BATCH = "/idis.v1.Resolution/ResolveBatch"
STREAM = "/idis.v1.Resolution/ResolveStream"
PING = "/idis.v1.Resolution/Ping"
PREFIX = "88.100.1"


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


def batch_requests(identifiers: list[str], size: int, n: int, rng: random.Random) -> list[bytes]:
    return [
        resolution_pb2.ResolveBatchRequest(
            requests=[resolution_pb2.ResolveRequest(identifier=rng.choice(identifiers)) for _ in range(size)]
        ).SerializeToString()
        for _ in range(n)
    ]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per scenario run")
    parser.add_argument("--count", type=int, default=10000, help="registrations on the node")
    parser.add_argument("--processes", type=int, default=2, help="load-generator processes")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    rng = random.Random(42)

    with tempfile.TemporaryDirectory(prefix="idis-e2e-") as tmp:
        state = Path(tmp)
        spec = NodeSpec("bench-node", "enterprise", PREFIX, 0, extra={"storage": {"synchronous": "normal"}})
        (state / "bench-node.toml").write_text(spec.config_text())
        node = NodeProcess(state / "bench-node.toml", state / "bench-node.log")
        node_address = node.start()
        baseline, baseline_address = start_baseline(args.count)
        try:
            progress(f"seeding {args.count} registrations")
            identifiers = asyncio.run(seed_node(node_address, args.count))
            unary = [resolution_pb2.ResolveRequest(identifier=i).SerializeToString() for i in identifiers[:2000]]
            # A Ping as large as a typical answer, so both methods move about the same bytes.
            pings = [resolution_pb2.PingRequest(payload=b"x" * 180).SerializeToString()]
            b100 = batch_requests(identifiers, 100, 200, rng)
            b1000 = batch_requests(identifiers, 1000, 30, rng)
            # Warm the node's cache: every identifier once.
            warm = [
                resolution_pb2.ResolveBatchRequest(
                    requests=[resolution_pb2.ResolveRequest(identifier=i) for i in identifiers[s : s + 1000]]
                ).SerializeToString()
                for s in range(0, len(identifiers), 1000)
            ]
            run(Scenario("warm", node_address, BATCH, warm, 1000, processes=1, concurrency=1, duration=1.0, warmup=0.2))

            def scenarios(address: str, prefix: str) -> list[tuple[Scenario, int]]:
                return [
                    (
                        Scenario(
                            f"{prefix}batch100",
                            address,
                            BATCH,
                            b100,
                            100,
                            processes=args.processes,
                            concurrency=4,
                            duration=args.duration,
                        ),
                        100,
                    ),
                    (
                        Scenario(
                            f"{prefix}batch1000",
                            address,
                            BATCH,
                            b1000,
                            1000,
                            processes=args.processes,
                            concurrency=2,
                            duration=args.duration,
                        ),
                        1000,
                    ),
                    (
                        Scenario(
                            f"{prefix}stream100",
                            address,
                            STREAM,
                            b100,
                            100,
                            streaming=True,
                            processes=args.processes,
                            concurrency=4,
                            duration=args.duration,
                        ),
                        100,
                    ),
                ]

            plan: list[tuple[Scenario, int, int]] = [
                (
                    Scenario(
                        "node_ping",
                        node_address,
                        PING,
                        pings,
                        1,
                        processes=args.processes,
                        concurrency=16,
                        duration=args.duration,
                    ),
                    1,
                    node.proc.pid if node.proc else 0,
                ),
                (
                    Scenario(
                        "node_resolve",
                        node_address,
                        RESOLVE,
                        unary,
                        1,
                        processes=args.processes,
                        concurrency=16,
                        duration=args.duration,
                    ),
                    1,
                    node.proc.pid if node.proc else 0,
                ),
            ]
            plan += [(s, n, node.proc.pid if node.proc else 0) for s, n in scenarios(node_address, "node_")]
            plan += [(s, n, baseline.pid) for s, n in scenarios(baseline_address, "baseline_")]
            results: dict[str, list[dict[str, Any]]] = {}
            for round_ in range(args.runs):
                order = plan if round_ % 2 == 0 else list(reversed(plan))
                for scenario, items, pid in order:
                    result: Result = run(scenario, pid)
                    summary = result.summary(items)
                    results.setdefault(scenario.name, []).append(summary)
                    progress(
                        f"run {round_ + 1}/{args.runs} {scenario.name}: {summary['items_per_s']:.0f} items/s, "
                        f"p99 {summary['p99_ms']} ms, client CPU {summary['client_cpu_percent_of_machine']}%, "
                        f"server CPU {summary['server_cpu_percent_of_one_core']}%"
                    )
        finally:
            node.stop()
            baseline.terminate()
            baseline.wait(10)

    medians = {
        name: {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
        for name, runs in results.items()
    }

    def ratio(a: str, b: str, key: str = "items_per_s") -> float:
        per_run = [float(x[key]) / float(y[key]) for x, y in zip(results[a], results[b], strict=True) if y[key]]
        return round(statistics.median(per_run), 2)

    report = {
        "registrations": args.count,
        "runs": args.runs,
        "seconds_per_run": args.duration,
        "load_generator_processes": args.processes,
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e_bench.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "e2e_bench.png")
    report["plot"] = str(args.out / "e2e_bench.png")
    print(json.dumps({k: v for k, v in report.items() if k != "all_runs"}, indent=2))


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
