"""The REST API's resolution (``GET /api/handles/{h}``, cache hits) against gRPC unary Resolve on
the same node, measured in the same run.

    python -m bench.http_bench [--runs 3] [--duration 5] [--count 10000] [--connections 16]
                               [--out bench/results]

Starts one enterprise node (plaintext gRPC and HTTP on 127.0.0.1, cache on) holding --count
registrations, resolves each once both ways (so the measured calls are cache hits), then, for
--runs rounds in alternating order:

* http: ``wrk -t1 -c CONNECTIONS`` (Debian package ``wrk``), each request a uniformly random
  identifier, keep-alive HTTP/1.1, as a Handle REST client sends them;
* grpc: idis-bench's load generator, unary Resolve, 16 callers, uniformly random identifiers.

For each: requests per second, and the node's CPU time per request (from /proc, the steadier
figure on a shared machine). Prints JSON (medians, min-max, and the ratio http / grpc that the
target is stated in: at least 2) and writes a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from bench.e2e_bench import PREFIX, Scenario, measure, run_options, seed_node, warm
from bench.idis_bench import require_bench_extra
from bench.report import publish
from bench.scale_bench import cpu_seconds
from nodes.hierarchy import NodeProcess, NodeSpec

WRK_SCRIPT = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
request = function()
  return wrk.format("GET", paths[math.random(#paths)])
end
"""


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def warm_http(base: str, identifiers: list[str]) -> None:
    for identifier in identifiers:
        with urllib.request.urlopen(f"{base}/api/handles/{identifier}", timeout=30) as response:
            response.read()


def _requests_per_second(output: str) -> tuple[float, int, int]:
    """wrk's Requests/sec, total requests, and non-2xx/3xx responses plus socket errors."""
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    failed = int(bad.group(1)) if bad else 0
    failed += sum(int(x) for x in errors.groups()) if errors else 0
    return rate, total, failed


def run_wrk(base: str, paths_file: Path, connections: int, duration: float, pid: int) -> dict[str, Any]:
    script = paths_file.with_suffix(".lua")
    script.write_text(WRK_SCRIPT % paths_file)
    before = cpu_seconds(pid)
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script), base]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    used = cpu_seconds(pid) - before
    rate, total, failed = _requests_per_second(output)
    if failed:
        raise RuntimeError(f"wrk saw {failed} failed requests:\n{output}")
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", output)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {
        "calls_per_s": round(rate, 1),
        "p99_ms": round(float(p99.group(1)) * scale[p99.group(2)], 3) if p99 else None,
        "server_cpu_us_per_call": round(1e6 * used / total, 1),
    }


def run_grpc(address: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    before = cpu_seconds(pid)
    figures = measure(Scenario("node_resolve", "resolve", 1, 16), address, pid, args)
    used = cpu_seconds(pid) - before
    calls = figures["calls_per_s"] * (args.duration + args.warmup)  # the node also serves the warm-up
    return {
        "calls_per_s": figures["calls_per_s"],
        "p99_ms": figures["p99_ms"],
        "server_cpu_us_per_call": round(1e6 * used / calls, 1) if calls else None,
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        if values:
            out[key] = {"median": round(statistics.median(values), 1), "min": min(values), "max": max(values)}
    return out


def measure_node(state: Path, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Starts the node in ``state``, seeds and warms it, and runs the rounds; every run's figures."""
    extra: dict[str, dict[str, Any]] = {
        "storage": {"synchronous": "normal"},
        "quotas": {"peer_calls_per_second": 0, "peer_burst": 0},  # one load generator: no per-peer quota
        "node": {"http_listen": "127.0.0.1:0"},
    }
    spec = NodeSpec("bench-node", "enterprise", PREFIX, 0, extra=extra)
    (state / "bench-node.toml").write_text(spec.config_text())
    node = NodeProcess(state / "bench-node.toml", state / "bench-node.log")
    address = node.start()
    base = f"http://127.0.0.1:{node.http_port}"
    pid = node.proc.pid if node.proc else 0
    runs: dict[str, list[dict[str, Any]]] = {"http": [], "grpc": []}
    try:
        progress(f"seeding {args.count} registrations")
        identifiers = asyncio.run(seed_node(address, args.count))
        asyncio.run(warm(address, identifiers))
        warm_http(base, identifiers)
        paths = state / "paths.txt"
        paths.write_text("".join(f"/api/handles/{i}\n" for i in identifiers))
        for round_ in range(args.runs):
            for which in ("http", "grpc") if round_ % 2 == 0 else ("grpc", "http"):
                if which == "http":
                    result = run_wrk(base, paths, args.connections, args.duration, pid)
                else:
                    result = run_grpc(address, pid, args)
                runs[which].append(result)
                progress(f"run {round_ + 1}/{args.runs} {which}: {result}")
    finally:
        node.stop()
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = run_options(__doc__, processes=1)
    parser.add_argument("--connections", type=int, default=16, help="wrk's keep-alive connections")
    args = parser.parse_args(argv)
    require_bench_extra()
    if shutil.which("wrk") is None:
        sys.exit("http_bench needs wrk: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="idis-http-") as tmp:
        runs = measure_node(Path(tmp), args)
    medians = {name: summary(r) for name, r in runs.items()}
    report = {
        "count": args.count,
        "duration_s": args.duration,
        "runs": args.runs,
        "http": medians["http"],
        "grpc_unary": medians["grpc"],
        "ratio_http_vs_grpc_unary_calls": round(
            medians["http"]["calls_per_s"]["median"] / medians["grpc"]["calls_per_s"]["median"], 2
        ),
        "all_runs": runs,
    }
    publish(report, args.out, "http_bench", lambda path: plot(report, path), hidden=("all_runs",))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["REST GET (wrk)", "gRPC unary Resolve"]
    for ax, key, label in (
        (ax1, "calls_per_s", "calls per second"),
        (ax2, "server_cpu_us_per_call", "node CPU µs per call"),
    ):
        rows = [report["http"][key], report["grpc_unary"][key]]
        ax.bar(names, [r["median"] for r in rows], color=["C1", "C0"])
        ax.errorbar(
            names,
            [r["median"] for r in rows],
            yerr=[[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]],
            fmt="none",
            ecolor="black",
            capsize=4,
        )
        ax.set_ylabel(label)
    ax1.set_title(f"Cache hits, one node process: REST / gRPC = {report['ratio_http_vs_grpc_unary_calls']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
