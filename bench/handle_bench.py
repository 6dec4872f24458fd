"""Our Handle-protocol UDP server against Knot DNS, measured in the same run: lookups per server
core-second (the target: ours at least half of Knot's) and server CPU per lookup, on cache hits.

    python -m bench.handle_bench [--records 100000] [--duration 5] [--warmup 1] [--runs 1]
                                 [--processes 2] [--window 64] [--workers 1] [--no-knot] [--no-grpc]
                                 [--knot-generator idis|dnsperf] [--out bench/results]

Starts one node (plaintext and unsigned, ``[node] workers`` = --workers) whose database holds
--records identifiers of the Wuhan model (bench.dataset.wuhan_model, written by ``idis-wuhan
import`` before the node starts), serving the Handle protocol on 127.0.0.1 (UDP and TCP, a free
port) with no per-source budget (``[handle] udp_rate_per_source = 0``). Resolves every identifier
once over UDP (misses: the Python side answers and fills the cache), then, for --runs rounds, in
alternating order:

* ours: idis-bench's handle-udp workload (``bench.idis_bench.run_load``): --processes processes,
  each running the compiled generator (bench/_handle_load.pyx: one UDP socket, --window requests
  outstanding, sendmmsg/recvmmsg 64 at a time), identifiers drawn uniformly, for --duration
  seconds after --warmup unmeasured ones;
* knot: ``bench.knot_baseline.measure_knot`` (knotd, A lookups in a zone of --records names),
  driven as ours is: --processes processes of the same compiled generator in its DNS mode
  (``run_udp(..., protocol="dns")``), --window queries outstanding each, names drawn uniformly,
  --warmup then --duration seconds, knotd's CPU counted over the same span. With
  ``--knot-generator dnsperf``, dnsperf drives it instead (as before: it needs about twice our
  generator's CPU per lookup, so on a small machine Knot is never fully loaded and the comparison
  flatters us). Skipped with --no-knot, or when knotd (or dnsperf, if it is the generator) is
  missing;
* grpc: idis-bench's unary Resolve of the same identifiers (16 callers a process, the gRPC
  cache warmed first), our previous fastest path; skipped with --no-grpc.

For each: lookups per second on the box, server CPU µs per lookup and lookups per server
core-second (server CPU from /proc: the node with its workers, knotd), latency percentiles,
response codes, lost requests, and the load generator's own CPU (in all and per lookup), to see
whether it or the server was the limit (on a 2-core box they share the cores). For ours also how
many UDP requests the node answered in its compiled loop
(``idis_handle_udp_datagrams_total{outcome="answered_fast"}``): on cache hits all of them. Prints
JSON on stdout (every run, the median of each figure over the runs, and the ratios ours / knot, and
what drove Knot: ``knot_load_generator``), progress on stderr; writes handle_bench.json and
handle_bench.png into --out.

With --workers > 1 the kernel gives each load process's socket to one worker (SO_REUSEPORT
hashes the source address), so run several processes per worker; the warm-up pass is then
repeated from 2 x workers sockets, since each worker has a cache of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.dataset import KeySpace, wuhan_model
from bench.e2e_bench import run_options
from bench.e2e_bench import warm as warm_grpc
from bench.idis_bench import build_parser, handle_request, options_of, require_bench_extra, run_load
from bench.knot_baseline import GENERATORS, SKIPPED, available, measure_knot
from bench.report import publish
from bench.wuhan import import_offline
from nodes.hierarchy import NodeProcess, NodeSpec

APEX = "88"
WARM_WINDOW = 64
WARM_TIMEOUT_S = 2.0
WARM_LIMIT_S = 600.0
ROWS = ("ours", "knot", "grpc")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def keyspace(records: int) -> KeySpace:
    """The identifiers the node holds: the Wuhan model's under 88 (as idis-bench --wuhan sees them)."""
    model = wuhan_model(records)
    return KeySpace([(p, model.counts[p]) for p in model.prefixes_under(APEX)])


def idis_bench_argv(args: argparse.Namespace, workload: str, address: str, pids: list[int]) -> list[str]:
    """idis-bench's command line for a closed-loop run of ``workload`` over the node's identifiers,
    uniform popularity, the node's processes' CPU measured."""
    concurrency = args.window if workload == "handle-udp" else 16
    argv = [*("--target", address, "--workload", workload, "--wuhan", str(args.count), "--apex", APEX)]
    argv += [*("--popularity", "uniform", "--concurrency", str(concurrency), "--processes", str(args.processes))]
    argv += [*("--duration", str(args.duration), "--warmup", str(args.warmup), "--timeout", "1")]
    return argv + [arg for pid in pids for arg in ("--server-pid", str(pid))]


def run_idis_bench(argv: list[str]) -> dict[str, Any]:
    """idis-bench's load generator (``run_load``) for that command line: its result."""
    result = run_load(options_of(build_parser().parse_args(argv)), show_progress=False)
    result.pop("_histogram")
    result["command"] = shlex.join(["idis-bench", *argv])
    return result


def udp_outcomes(metrics_port: int) -> dict[str, float]:
    """The node's ``idis_handle_udp_datagrams_total`` by outcome (summed over its workers)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "idis_handle_udp_datagrams_total":
                outcome = sample.labels.get("outcome", "?")
                out[outcome] = out.get(outcome, 0.0) + sample.value
    return out


def warm(port: int, identifiers: list[str], passes: int) -> dict[str, Any]:
    """Every identifier resolved once over UDP, ``passes`` times (each from a socket of its own);
    the first pass's figures (the miss path: the Python side answers). RuntimeError unless the
    last pass got rc 1 for every identifier."""
    from bench._handle_load import run_udp

    requests = [handle_request(i) for i in identifiers]
    first: dict[str, Any] = {}
    result: dict[str, Any] = {}
    for n in range(passes):
        progress(f"warming the cache: pass {n + 1}/{passes} over {len(requests)} identifiers")
        result = run_udp("127.0.0.1", port, requests, WARM_LIMIT_S, WARM_WINDOW, WARM_TIMEOUT_S, limit=len(requests))
        first = first or result
    if result["rc"] != {1: len(requests)}:
        raise RuntimeError(f"warm-up: not every identifier answered rc 1: rc {result['rc']}, lost {result['lost']}")
    return {
        "passes": passes,
        "first_pass_s": round(first["elapsed_s"], 2),
        "first_pass_lookups_per_s": round(first["answered"] / first["elapsed_s"]),
        "first_pass_rc": first["rc"],
    }


def measure_ours(args: argparse.Namespace, node: NodeProcess, pids: list[int]) -> dict[str, Any]:
    """One idis-bench handle-udp run against the node: the figures the report compares."""
    before = udp_outcomes(node.metrics_port)
    result = run_idis_bench(idis_bench_argv(args, "handle-udp", f"127.0.0.1:{node.handle_port}", pids))
    after = udp_outcomes(node.metrics_port)
    statuses = result["statuses"]
    answered = statuses.get("OK", 0)
    seconds = result["seconds"]
    server_s = result["server_cpu_us_per_item"] * result["items"] / 1e6
    client_s = result["load_generator_cpu_s"]
    fast = after.get("answered_fast", 0.0) - before.get("answered_fast", 0.0)
    received = after.get("received", 0.0) - before.get("received", 0.0)
    return {
        "lookups_per_s": round(answered / seconds, 1),
        "server_cpu_us_per_lookup": round(1e6 * server_s / answered, 3) if answered else None,
        "lookups_per_server_core_s": round(answered / server_s) if server_s else None,
        "server_cpu_percent_of_one_core": result["server_cpu_percent_of_one_core"],
        **latencies(result["latency"]),
        "lost": statuses.get("LOST", 0),
        "statuses": statuses,
        "answered_in_compiled_loop_share": round(fast / received, 4) if received else None,
        "load_generator_cpu_s": client_s,
        "load_generator_cpu_us_per_lookup": round(1e6 * client_s / answered, 3) if answered else None,
        "box_cpu_percent": box_percent(server_s + client_s, seconds),
        "command": result["command"],
    }


def box_percent(cpu_seconds: float, seconds: float) -> float:
    """How busy the box's cores were: server and load generator together."""
    return round(100 * cpu_seconds / (seconds * (os.cpu_count() or 1)), 1)


def latencies(latency: dict[str, float]) -> dict[str, float]:
    return {f"latency_{key}": latency[key] for key in ("p50_ms", "p90_ms", "p99_ms", "p99_9_ms")}


def measure_grpc(args: argparse.Namespace, node: NodeProcess, pids: list[int]) -> dict[str, Any]:
    """idis-bench's unary Resolve of the same identifiers (cache hits)."""
    result = run_idis_bench(idis_bench_argv(args, "resolve", node.address, pids))
    answered = result["statuses"].get("OK", 0)
    server_s = result["server_cpu_us_per_item"] * result["items"] / 1e6
    return {
        "lookups_per_s": round(answered / result["seconds"], 1),
        "server_cpu_us_per_lookup": round(1e6 * server_s / answered, 3) if answered else None,
        "lookups_per_server_core_s": round(answered / server_s) if server_s else None,
        "server_cpu_percent_of_one_core": result["server_cpu_percent_of_one_core"],
        **latencies(result["latency"]),
        "statuses": result["statuses"],
        "load_generator_cpu_s": result["load_generator_cpu_s"],
        "box_cpu_percent": box_percent(server_s + result["load_generator_cpu_s"], result["seconds"]),
        "command": result["command"],
    }


def measure_knot_row(args: argparse.Namespace) -> dict[str, Any]:
    """One Knot run, driven by --knot-generator (ours: with our row's processes, window and warm-up)."""
    knot = measure_knot(
        records=args.count,
        duration=args.duration,
        generator=args.knot_generator,
        processes=args.processes,
        window=args.window,
        warmup=args.warmup,
    )
    completed, client_s = knot["queries_completed"], knot["client_cpu_s"]
    return {
        "lookups_per_s": knot["lookups_per_s"],
        "server_cpu_us_per_lookup": knot["server_cpu_us_per_lookup"],
        "lookups_per_server_core_s": knot["lookups_per_server_core_s"],
        # over the generator's measured run (dnsperf: its whole life, client_wall_s), as its own CPU is
        "server_cpu_percent_of_one_core": knot["server_cpu_percent_of_one_core"],
        **{key: knot.get(key) for key in ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_p999_ms")},
        "lost": knot["lost"],
        "load_generator": knot["load_generator"],
        "load_generator_cpu_s": client_s,
        "load_generator_cpu_us_per_lookup": round(1e6 * client_s / completed, 3) if completed else None,
        "box_cpu_percent": box_percent(knot["server_cpu_s"] + client_s, knot["client_wall_s"]),
        "server_thread_cpu_s": knot["server_thread_cpu_s"],
        "server": knot["server"],
        "udp_workers": knot["udp_workers"],
    }


def knot_load_generator(args: argparse.Namespace) -> str:
    """What drove the Knot row, for the report."""
    if args.knot_generator == "dnsperf":
        return "dnsperf, as bench.knot_baseline runs it (--knot-generator dnsperf)"
    return f"{ours_load_generator(args)} in its DNS mode (protocol='dns'), as ours"


def ours_load_generator(args: argparse.Namespace) -> str:
    return f"bench/_handle_load.pyx run_udp: {args.processes} processes x {args.window} outstanding"


def start_node(state: Path, args: argparse.Namespace) -> NodeProcess:
    """The node, its database filled offline with the records first."""
    extra: dict[str, dict[str, Any]] = {
        "storage": {"synchronous": "normal"},
        "quotas": {"peer_calls_per_second": 0, "peer_burst": 0},  # the load generator is one peer
        "node": {"handle_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "workers": args.workers},
        "handle": {"udp_rate_per_source": 0},
    }
    node = NodeProcess.of(NodeSpec("bench-node", "top-level", APEX, 0, extra=extra), state)
    progress(f"importing {args.count} records")
    asyncio.run(import_offline(node.config, args.count, APEX, seed=1, processes=2))
    node.start()
    if not node.handle_port:
        node.stop()
        raise RuntimeError(f"the node announced no Handle port; see {node.log_path}")
    return node


def run_rounds(args: argparse.Namespace, state: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Starts and warms the node, then runs the rows ``args.runs`` times: the warm-up's figures
    and every run's, by row."""
    rows = [row for row in ROWS if not (row == "knot" and args.no_knot) and not (row == "grpc" and args.no_grpc)]
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    node = start_node(state, args)
    try:
        assert node.proc is not None
        pids = [node.proc.pid, *node.worker_pids]
        keys = keyspace(args.count)
        identifiers = [keys.identifier(i) for i in range(len(keys))]
        warmed = warm(node.handle_port, identifiers, 1 if args.workers == 1 else 2 * args.workers)
        if "grpc" in rows:
            asyncio.run(warm_grpc(node.address, identifiers))
        measures: dict[str, Callable[[], dict[str, Any]]] = {
            "ours": lambda: measure_ours(args, node, pids),
            "knot": lambda: measure_knot_row(args),
            "grpc": lambda: measure_grpc(args, node, pids),
        }
        for round_ in range(args.runs):
            for row in rows if round_ % 2 == 0 else rows[::-1]:
                runs[row].append(measures[row]())
                progress(f"run {round_ + 1}/{args.runs} {row}: {json.dumps(runs[row][-1])}")
    finally:
        node.stop()
    return warmed, runs


def spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The median, min and max over the runs of each figure (not the per-code counts)."""
    out: dict[str, dict[str, float]] = {}
    for key, first in rows[0].items():
        values = [r[key] for r in rows if r.get(key) is not None]
        if isinstance(first, int | float) and values:
            out[key] = {"median": round(statistics.median(values), 4), "min": min(values), "max": max(values)}
    return out


def ratio(runs: dict[str, list[dict[str, Any]]], key: str, a: str = "ours", b: str = "knot") -> float | None:
    """The median over the rounds of a / b for ``key``."""
    per_run = [x[key] / y[key] for x, y in zip(runs[a], runs[b], strict=True) if x[key] and y[key]]
    return round(statistics.median(per_run), 3) if per_run else None


def report_of(
    args: argparse.Namespace, warmed: dict[str, Any], runs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    medians = {row: spread(rows) for row, rows in runs.items()}
    ours = medians["ours"]
    saturated = ours["server_cpu_percent_of_one_core"]["median"] >= 90 * args.workers
    box_busy = ours["box_cpu_percent"]["median"] >= 85
    report: dict[str, Any] = {
        "records": args.count,
        "duration_s": args.duration,
        "runs": args.runs,
        "node_workers": args.workers,
        "load_generator": ours_load_generator(args),
        "cpus": os.cpu_count(),
        "warm_up": warmed,
        "median": medians,
        "server_saturated": saturated,
        "bottleneck": (
            "the server: its workers were busy the whole run"
            if saturated
            else "the box's cores: server and load generator together kept them busy"
            if box_busy
            else "the load generator: the server and the box had idle time"
        ),
    }
    if "knot" in runs:
        report["knot_load_generator"] = knot_load_generator(args)
        report["ratios"] = {
            "ours_vs_knot_lookups_per_server_core_s": ratio(runs, "lookups_per_server_core_s"),
            "target_ours_vs_knot_lookups_per_server_core_s": 0.5,
            "ours_vs_knot_server_cpu_us_per_lookup": ratio(runs, "server_cpu_us_per_lookup"),
            "ours_vs_knot_lookups_per_s": ratio(runs, "lookups_per_s"),
        }
    else:
        report["knot"] = SKIPPED if not available(args.knot_generator) else {"skipped": "--no-knot"}
    if "grpc" in runs:
        report.setdefault("ratios", {})["ours_vs_grpc_unary_lookups_per_server_core_s"] = ratio(
            runs, "lookups_per_server_core_s", "ours", "grpc"
        )
    report["all_runs"] = runs
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dnsperf = str(report.get("knot_load_generator", "")).startswith("dnsperf")
    names = {
        "ours": "idis Handle UDP",
        "knot": f"Knot DNS (UDP{', dnsperf' if dnsperf else ''})",
        "grpc": "idis gRPC unary",
    }
    rows = list(report["median"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, label in (
        (axes[0], "lookups_per_server_core_s", "lookups per server core-second"),
        (axes[1], "server_cpu_us_per_lookup", "server CPU µs per lookup"),
        (axes[2], "lookups_per_s", "lookups per second (the box)"),
    ):
        figures = [report["median"][row][key] for row in rows]
        medians = [f["median"] for f in figures]
        bars = ax.bar([names[row] for row in rows], medians, color=[f"C{ROWS.index(row)}" for row in rows])
        ax.errorbar(
            [names[row] for row in rows],
            medians,
            yerr=[
                [m - f["min"] for m, f in zip(medians, figures, strict=True)],
                [f["max"] - m for m, f in zip(medians, figures, strict=True)],
            ],
            fmt="none",
            ecolor="black",
            capsize=4,
        )
        ax.bar_label(bars, labels=[f"{m:,.0f}" if m >= 100 else f"{m:.3g}" for m in medians])
        ax.set_ylabel(label)
        if "grpc" in rows:
            ax.set_yscale("log")  # gRPC is two orders of magnitude away
    if "knot" in rows:
        target = 0.5 * report["median"]["knot"]["lookups_per_server_core_s"]["median"]
        axes[0].axhline(target, color="grey", linestyle="--", label="target: half of Knot's")
        axes[0].legend(loc="lower left")
        axes[0].set_title(f"ours / Knot = {report['ratios']['ours_vs_knot_lookups_per_server_core_s']}")
    fig.suptitle(
        f"Cache hits, {report['records']} records, {report['node_workers']} node worker(s), "
        f"{report['cpus']} cores, median of {report['runs']} run(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = run_options(__doc__, processes=2)
    parser.add_argument("--records", dest="count", type=int, help="identifiers on the node, names in Knot's zone")
    parser.add_argument("--window", type=int, default=64, help="UDP requests outstanding per load process")
    parser.add_argument("--workers", type=int, default=1, help="the node's [node] workers")
    parser.add_argument("--no-knot", action="store_true", help="no Knot DNS row")
    parser.add_argument(
        "--knot-generator",
        choices=list(GENERATORS),
        default="idis",
        help="what drives Knot: our generator as for our row (idis), or dnsperf as before",
    )
    parser.add_argument("--no-grpc", action="store_true", help="no gRPC unary Resolve row")
    parser.set_defaults(runs=1, count=100_000)
    args = parser.parse_args(argv)
    require_bench_extra()
    args.no_knot = args.no_knot or not available(args.knot_generator)
    with tempfile.TemporaryDirectory(prefix="idis-handle-") as tmp:
        warmed, runs = run_rounds(args, Path(tmp))
    report = report_of(args, warmed, runs)
    publish(report, args.out, "handle_bench", lambda path: plot(report, path))


if __name__ == "__main__":
    main()
