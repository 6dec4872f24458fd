"""Wuhan scale: load rate, bytes on disk and resolution cold and warm, at growing sizes.

    python -m bench.scale_bench --sizes 1000000,10000000 --dir /var/tmp/idis-scale [--api-max 1000000]

For each size N: a node with apex 88 gets the Wuhan model of N registrations by offline import
(idis-wuhan import) and, up to --api-max, a second node gets them through the registration API
(idis-wuhan load), for the two load rates. Then, on the imported node:

* cold: right after the node starts (its cache empty; the OS page cache dropped when this
  process may), identifiers drawn uniformly from all N, ResolveBatch of 100 and unary Resolve;
* warm: Zipf (s = 1.0) popularity after a warm-up, the same two workloads.

Prints JSON and writes scale_bench.json and scale_bench.png to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from nodes.hierarchy import NodeProcess, NodeSpec


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_json(args: list[str]) -> dict[str, Any]:
    result = subprocess.run([sys.executable, *args], stdout=subprocess.PIPE, text=True, check=True)
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def node(directory: Path, name: str) -> Path:
    spec = NodeSpec(
        name,
        "secondary",
        "88",
        0,
        extra={
            "storage": {"synchronous": "normal"},
            "node": {"metrics_listen": "127.0.0.1:0"},
            "cache": {"max_entries": 2_000_000},
        },
    )
    config = directory / f"{name}.toml"
    config.write_text(spec.config_text())
    return config


def bench(
    address: str, size: int, workload: str, popularity: str, warmup: float, duration: float, out: Path
) -> dict[str, Any]:
    args = [
        "-m",
        "bench.idis_bench",
        "--quiet",
        "--target",
        address,
        "--wuhan",
        str(size),
        "--workload",
        workload,
        "--popularity",
        popularity,
        "--warmup",
        str(warmup),
        "--duration",
        str(duration),
        "--batch-size",
        "100",
        "--out",
        str(out),
    ]
    result = run_json(args)["result"]
    return {
        "items_per_s": result["items_per_s"],
        "p50_ms": result["latency"]["p50_ms"],
        "p99_ms": result["latency"]["p99_ms"],
        "errors": result["errors"],
        "load_generator_cpu_percent_of_machine": result["load_generator_cpu_percent_of_machine"],
    }


def measure(size: int, base: Path, api_max: int, duration: float) -> dict[str, Any]:
    directory = base / f"n{size}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    row: dict[str, Any] = {"registrations": size}
    progress(f"[{size:,}] offline import")
    imported = run_json(
        ["-m", "bench.wuhan", "import", "--config", str(node(directory, "imported")), "--registrations", str(size)]
    )
    row["import_per_s"] = imported["registrations_per_s"]
    row["bytes_per_registration"] = imported["bytes_per_registration"]
    row["database_bytes"] = imported["database_bytes"]
    if size <= api_max:
        progress(f"[{size:,}] load through the API")
        api = NodeProcess(node(directory, "api"), directory / "api.log")
        address = api.start()
        try:
            loaded = run_json(
                ["-m", "bench.wuhan", "load", "--target", address, "--apex", "88", "--registrations", str(size)]
            )
        finally:
            api.stop()
        row["api_load_per_s"] = loaded["registrations_per_s"]
        (directory / "api.sqlite3").unlink(missing_ok=True)
    row.update(serve_and_measure(directory / "imported.toml", directory, size, duration))
    progress(f"[{size:,}] {json.dumps(row)}")
    return row


def serve_and_measure(config: Path, directory: Path, size: int, duration: float) -> dict[str, Any]:
    """Cold and warm resolution on a node serving an imported database, and its memory."""
    row: dict[str, Any] = {"page_cache_dropped": drop_page_cache()}
    served = NodeProcess(config, directory / "imported.log")
    address = served.start()
    try:
        progress(f"[{size:,}] cold")
        row["cold_batch100"] = bench(address, size, "batch", "uniform", 0, duration, directory / "cold-batch")
        row["cold_unary"] = bench(address, size, "resolve", "uniform", 0, duration, directory / "cold-unary")
        progress(f"[{size:,}] warm")
        row["warm_batch100"] = bench(address, size, "batch", "zipf", duration, duration, directory / "warm-batch")
        row["warm_unary"] = bench(address, size, "resolve", "zipf", duration, duration, directory / "warm-unary")
        row["node_memory"] = memory_of(served.proc.pid if served.proc is not None else 0)
    finally:
        served.stop()
    return row


def memory_of(pid: int) -> dict[str, int]:
    """Peak and current resident memory of a process, in MiB (Linux /proc)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[{"VmHWM": "peak_rss_mib", "VmRSS": "rss_mib"}[name]] = int(value.split()[0]) // 1024
    return fields


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [f"{r['registrations']:,}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar(sizes, [r["bytes_per_registration"] for r in rows])
    ax1.axhline(80e9 / 444e6, color="red", linestyle="--", label="444M on an 80 GB disk")
    ax1.set_ylabel("bytes on disk per registration")
    ax1.legend()
    x = range(len(rows))
    for i, key in enumerate(("cold_batch100", "warm_batch100")):
        ax2.bar([v + i * 0.35 for v in x], [r[key]["items_per_s"] for r in rows], 0.35, label=key)
    ax2.set_xticks([v + 0.175 for v in x], sizes)
    ax2.set_ylabel("identifiers resolved per second")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/idis-scale"))
    parser.add_argument("--api-max", type=int, default=1_000_000, help="largest size also loaded via the API")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--serve-existing",
        type=Path,
        metavar="CONFIG",
        help="measure only: serve the database an earlier `idis-wuhan import --config CONFIG` wrote"
        " (--sizes then names its size)",
    )
    args = parser.parse_args()
    if args.serve_existing is not None:
        size = int(args.sizes.split(",")[0])
        row = {"registrations": size, **serve_and_measure(args.serve_existing, args.dir, size, args.duration)}
        print(json.dumps(row, indent=2))
        return
    rows = [measure(int(s), args.dir, args.api_max, args.duration) for s in args.sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_bench.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "scale_bench.png")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
