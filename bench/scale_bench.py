"""Wuhan scale: load rate, bytes on disk and resolution cold and warm, at growing sizes.

    python -m bench.scale_bench --sizes 1000000,10000000 --dir /var/tmp/idis-scale [--api-max 1000000]
    python -m bench.scale_bench --miss-path --sizes 1000000 --dir /var/tmp/idis-scale [--runs 3]

For each size N: a node with apex 88 gets the Wuhan model of N registrations by offline import
(idis-wuhan import) and, up to --api-max, a second node gets them through the registration API
(idis-wuhan load), for the two load rates. Then, on the imported node:

* cold: right after the node starts (its cache empty; the OS page cache dropped when this
  process may), identifiers drawn uniformly from all N, ResolveBatch of 100 and unary Resolve;
* warm: Zipf (s = 1.0) popularity after a warm-up, the same two workloads.

Prints JSON and writes scale_bench.json and scale_bench.png to --out.

With --miss-path, the cache-miss path alone, against baselines measured in the same run on the
same database file (imported first if the folder has none), --runs times, medians and ratios:

* raw SQLite: this process reading the file directly, one thread, ``IN (...)`` of 100 random
  keys and point lookups (the stored bytes of each row, nothing decoded);
* misses: a node whose cache holds 16 entries (every lookup misses, and each answer evicts
  another), ResolveBatch of 100 and unary Resolve, identifiers uniform over all N;
* hits: the same unary load on a node with a large cache, warmed.

Writes miss_path.json to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.dataset import KeySpace, wuhan_model
from bench.idis_bench import headline
from nodes.hierarchy import NodeProcess, NodeSpec
from resolver.identifier import parse_identifier


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


def node(directory: Path, name: str, cache_entries: int = 2_000_000, database: str = "") -> Path:
    spec = NodeSpec(
        name,
        "secondary",
        "88",
        0,
        extra={
            "storage": {"synchronous": "normal"},
            "node": {"metrics_listen": "127.0.0.1:0"},
            "cache": {"max_entries": cache_entries},
            # The load generator is one peer asking for more than a peer may by default.
            "quotas": {"peer_calls_per_second": 0, "peer_burst": 0},
        },
    )
    config = directory / f"{name}.toml"
    config.write_text(spec.config_text(database))
    return config


def bench(
    address: str,
    size: int,
    workload: str,
    popularity: str,
    warmup: float,
    duration: float,
    out: Path,
    concurrency: int = 16,
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
        "--concurrency",
        str(concurrency),
        "--out",
        str(out),
    ]
    return headline(run_json(args)["result"])


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


# --- the cache-miss path against raw SQLite on the same file ----------------------------------


def wuhan_keys(size: int, count: int, seed: int) -> list[str]:
    """``count`` normalised keys drawn uniformly from the Wuhan model of ``size`` registrations."""
    model = wuhan_model(size)
    keyspace = KeySpace([(p, model.counts[p]) for p in model.prefixes_under("88")])
    rng = random.Random(seed)
    return [parse_identifier(keyspace.identifier(rng.randrange(size))).key for _ in range(count)]


def raw_lookups(database: Path, keys: list[str], seconds: float) -> dict[str, float]:
    """Lookups per second straight from SQLite (one thread, the stored bytes of each row fetched):
    ``IN (...)`` of 100 keys, and point lookups."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    sql = f"SELECT key, version, record FROM identifiers WHERE key IN ({','.join('?' * 100)})"
    try:
        done = start = 0
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            found = db.execute(sql, keys[start : start + 100]).fetchall()
            assert len(found) == len(set(keys[start : start + 100]))
            done += 100
            start = (start + 100) % (len(keys) - 100)
        batch = done / (time.perf_counter() - began)
        done = 0
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            db.execute("SELECT version, record FROM identifiers WHERE key = ?", (keys[done % len(keys)],)).fetchall()
            done += 1
        point = done / (time.perf_counter() - began)
    finally:
        db.close()
    return {"in_100_ids_per_s": round(batch, 1), "point_lookups_per_s": round(point, 1)}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def served(config: Path) -> Iterator[tuple[str, int]]:
    """A node serving ``config``: (address, pid)."""
    process = NodeProcess(config, config.with_suffix(".log"))
    address = process.start()
    assert process.proc is not None
    try:
        yield address, process.proc.pid
    finally:
        process.stop()


def load(address: str, pid: int, size: int, workload: str, warmup: float, duration: float, out: Path) -> dict[str, Any]:
    """``bench`` (idis-bench, uniform popularity, 2 processes x 8 callers) after ``warmup``
    seconds of the same load, unmeasured; plus the node's CPU per item while it was measured."""
    if warmup > 0:
        bench(address, size, workload, "uniform", 0, warmup, out, concurrency=8)
    before = cpu_seconds(pid)
    result = bench(address, size, workload, "uniform", 0, duration, out, concurrency=8)
    used = cpu_seconds(pid) - before  # the node idles while the load generator starts and stops
    result["server_cpu_us_per_item"] = round(1e6 * used / (result["items_per_s"] * duration), 1)
    return result


def miss_path(size: int, base: Path, runs: int, duration: float) -> dict[str, Any]:
    directory = base / f"n{size}"
    database = directory / "imported.sqlite3"
    if not database.exists():
        directory.mkdir(parents=True, exist_ok=True)
        progress(f"[{size:,}] offline import into {database}")
        run_json(
            ["-m", "bench.wuhan", "import", "--config", str(node(directory, "imported")), "--registrations", str(size)]
        )
    misses = node(directory, "misses", cache_entries=16, database=database.name)
    hits = node(directory, "hits", database=database.name)
    with database.open("rb") as fh:  # the page cache warm for every contender alike
        while fh.read(1 << 24):
            pass
    keys = wuhan_keys(size, 200_000, seed=7)
    rows = []
    for run in range(runs):
        progress(f"[{size:,}] miss path, run {run + 1} of {runs}")
        row: dict[str, Any] = {"raw_sqlite": raw_lookups(database, keys, duration)}
        for which in ("misses", "hits") if run % 2 == 0 else ("hits", "misses"):  # drift cancels out
            if which == "hits":
                with served(hits) as (address, pid):
                    row["unary_hits"] = load(address, pid, size, "resolve", 3.0, duration, directory / "hit-unary")
                continue
            with served(misses) as (address, pid):
                row["batch100_misses"] = load(address, pid, size, "batch", 1.0, duration, directory / "miss-batch")
                row["unary_misses"] = load(address, pid, size, "resolve", 1.0, duration, directory / "miss-unary")
        row["ratios"] = {
            "batch100_misses_vs_raw_in_100": round(
                row["batch100_misses"]["items_per_s"] / row["raw_sqlite"]["in_100_ids_per_s"], 3
            ),
            "unary_misses_vs_unary_hits": round(
                row["unary_misses"]["calls_per_s"] / row["unary_hits"]["calls_per_s"], 3
            ),
        }
        progress(f"[{size:,}] {json.dumps(row)}")
        rows.append(row)

    def median(path: tuple[str, str]) -> float:
        return round(float(statistics.median(r[path[0]][path[1]] for r in rows)), 3)

    figures = {
        "raw_in_100_ids_per_s": ("raw_sqlite", "in_100_ids_per_s"),
        "raw_point_lookups_per_s": ("raw_sqlite", "point_lookups_per_s"),
        "batch100_misses_ids_per_s": ("batch100_misses", "items_per_s"),
        "batch100_misses_p50_ms": ("batch100_misses", "p50_ms"),
        "batch100_misses_p99_ms": ("batch100_misses", "p99_ms"),
        "batch100_misses_server_cpu_us_per_id": ("batch100_misses", "server_cpu_us_per_item"),
        "unary_misses_calls_per_s": ("unary_misses", "calls_per_s"),
        "unary_misses_p99_ms": ("unary_misses", "p99_ms"),
        "unary_misses_server_cpu_us_per_call": ("unary_misses", "server_cpu_us_per_item"),
        "unary_hits_calls_per_s": ("unary_hits", "calls_per_s"),
        "unary_hits_p99_ms": ("unary_hits", "p99_ms"),
        "unary_hits_server_cpu_us_per_call": ("unary_hits", "server_cpu_us_per_item"),
        "ratio_batch100_misses_vs_raw_in_100": ("ratios", "batch100_misses_vs_raw_in_100"),
        "ratio_unary_misses_vs_unary_hits": ("ratios", "unary_misses_vs_unary_hits"),
    }
    return {
        "registrations": size,
        "runs": runs,
        "duration_s": duration,
        "load": "idis-bench closed loop, 2 processes x 8 callers, identifiers uniform over all N",
        "median": {name: median(path) for name, path in figures.items()},
        "spread": {
            name: [min(r[p[0]][p[1]] for r in rows), max(r[p[0]][p[1]] for r in rows)] for name, p in figures.items()
        },
        "each_run": rows,
    }


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
    parser.add_argument("--miss-path", action="store_true", help="measure the cache-miss path (see above)")
    parser.add_argument("--runs", type=int, default=3, help="with --miss-path: runs, medians reported")
    args = parser.parse_args()
    if args.miss_path:
        results = [miss_path(int(s), args.dir, args.runs, args.duration) for s in args.sizes.split(",")]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "miss_path.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        return
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
