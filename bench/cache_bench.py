"""Lookup-cache micro-benchmark: speed, memory and hit ratio, printed as JSON (plus a PNG).

    python -m bench.cache_bench [--quick] [--runs 5] [--out bench/results]

Speed: ns per get at 90% hits, per get-or-set, and per key of a 1000-key batch get, for the
compiled LookupCache, its pure-Python twin, cachetools.TTLCache and a plain dict, at 10k and
1M entries; the median of --runs runs. Ratios are taken within the same run.

Memory: bytes per entry beyond the key and value bytes, measured with tracemalloc in a fresh
process per implementation (everything the cache allocates, Python objects included), and the
growth of the process's resident set for comparison.

Hit ratio: S3-FIFO (the compiled cache) against LRU (cachetools.LRUCache) with a cache of 1%
of the keys, on Zipf-distributed keys (s = 0.8, 1.0, 1.2) and on a hot set with a one-pass scan
mixed in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cachetools
import numpy as np

from bench.report import publish
from resolver import _cache_py
from resolver.cache import IMPLEMENTATIONS

VALUE = b"v" * 120  # about the size of a small serialised record
TTL = 3600.0


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def keys_of(n: int, tag: str = "SN") -> list[bytes]:
    return [f"88.100.{i % 97}/{tag}-{i:09d}".encode() for i in range(n)]


class DictCache:
    """A plain dict behind the same calls: the floor any cache is measured against."""

    def __init__(self) -> None:
        self.d: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.d.get(key)

    def set(self, key: bytes, value: bytes, ttl: float) -> None:
        self.d[key] = value


class TTLCacheAdapter:
    def __init__(self, size: int) -> None:
        self.c: cachetools.TTLCache[bytes, bytes] = cachetools.TTLCache(maxsize=size, ttl=TTL)

    def get(self, key: bytes) -> bytes | None:
        return self.c.get(key)

    def set(self, key: bytes, value: bytes, ttl: float) -> None:
        self.c[key] = value


def make(name: str, size: int) -> Any:
    if name == "cython":
        return IMPLEMENTATIONS["cython"].LookupCache(size + 1, 1 << 40)
    if name == "python":
        return _cache_py.LookupCache(size + 1, 1 << 40)
    if name == "cachetools.TTLCache":
        return TTLCacheAdapter(size + 1)
    return DictCache()


IMPLS = ["cython", "python", "cachetools.TTLCache", "dict"]


def timed(fn: Callable[[], None], operations: int) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / operations


def speed(size: int, runs: int) -> dict[str, Any]:
    keys = keys_of(size)
    rng = np.random.default_rng(1)
    lookups = 200_000
    picks = rng.integers(0, size, lookups)
    probe = [keys[i] if n % 10 else b"88.100.0/MISS-%d" % n for n, i in enumerate(picks)]  # 90% hits
    fill_keys = keys_of(size * 2, "GS")
    gos = [fill_keys[i] for i in rng.integers(0, size * 2, lookups)]
    batches = [[keys[i] for i in rng.integers(0, size, 1000)] for _ in range(50)]
    out: dict[str, Any] = {}
    for name in IMPLS:
        results: dict[str, list[float]] = {"get_ns": [], "get_or_set_ns": [], "batch_get_1000_ns_per_key": []}
        for run in range(runs):
            cache = make(name, size)
            for k in keys:
                cache.set(k, VALUE, TTL)
            get = cache.get

            def gets(get: Any = get) -> None:
                for k in probe:
                    get(k)

            def get_or_set(cache: Any = cache) -> None:
                get, put = cache.get, cache.set
                for k in gos:
                    if get(k) is None:
                        put(k, VALUE, TTL)

            many = getattr(cache, "get_many", None)

            def batch_gets(get: Any = get, many: Any = many) -> None:
                for b in batches:
                    if many is not None:
                        many(b)
                    else:
                        [get(k) for k in b]

            results["get_ns"].append(timed(gets, lookups))
            results["batch_get_1000_ns_per_key"].append(timed(batch_gets, 1000 * len(batches)))
            results["get_or_set_ns"].append(timed(get_or_set, lookups))
            progress(f"  speed size={size} {name} run {run + 1}/{runs}: get {results['get_ns'][-1]:.0f} ns")
        out[name] = {k: round(statistics.median(v), 1) for k, v in results.items()}
    base = out["python"]
    out["cython_vs_python_twin"] = {k: round(base[k] / out["cython"][k], 2) for k in base}
    return out


def memory_child(name: str, size: int) -> None:
    """Runs in a fresh process: prints JSON with the bytes per entry beyond key + value."""
    import resource

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    heap = _heap_counter()
    rss0, heap0 = rss(), heap()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    cache = make(name, size)
    payload = 0
    for i in range(size):
        key = f"88.100.{i % 97}/SN-{i:09d}".encode()
        value = VALUE + i.to_bytes(4, "little")
        payload += len(key) + len(value)
        cache.set(key, value, TTL)
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    report = {
        "impl": name,
        "entries": size,
        "tracemalloc_overhead_bytes_per_entry": round((used - base - payload) / size, 1),
        "rss_overhead_bytes_per_entry": round((rss() - rss0 - payload) / size, 1),
    }
    if name == "cython":  # all of its memory comes from malloc: glibc's own count includes chunk headers
        report["malloc_overhead_bytes_per_entry"] = round((heap() - heap0 - payload) / size, 1)
    print(json.dumps(report))


def _heap_counter() -> Callable[[], int]:
    """Bytes glibc's malloc has handed out (in-use chunks with their headers, and mmapped blocks)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (f, ctypes.c_size_t)
            for f in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def heap() -> int:
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return heap


def memory(size: int) -> dict[str, Any]:
    out = {}
    for name in IMPLS:
        progress(f"  memory {name} at {size} entries")
        result = subprocess.run(
            [sys.executable, "-m", "bench.cache_bench", "--memory-child", name, "--size", str(size)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[name] = json.loads(result.stdout)
    return out


def zipf_trace(n_keys: int, s: float, length: int, seed: int) -> np.ndarray:
    ranks = np.arange(1, n_keys + 1, dtype=np.float64)
    weights = ranks ** (-s)
    cdf = np.cumsum(weights / weights.sum())
    rng = np.random.default_rng(seed)
    ids = np.searchsorted(cdf, rng.random(length))
    return rng.permutation(n_keys)[np.minimum(ids, n_keys - 1)]  # popularity not tied to key order


def hit_ratio(cache_kind: str, trace: np.ndarray, capacity: int) -> float:
    hits = 0
    if cache_kind == "lru":
        lru: cachetools.LRUCache[int, bytes] = cachetools.LRUCache(maxsize=capacity)
        for k in trace.tolist():
            if lru.get(k) is not None:
                hits += 1
            else:
                lru[k] = b"v"
        return hits / len(trace)
    impl = IMPLEMENTATIONS["cython" if cache_kind == "s3fifo" else "python"]
    cache = impl.LookupCache(capacity, 1 << 40)
    for k in trace.tolist():
        key = b"%d" % k
        if cache.get(key) is not None:
            hits += 1
        else:
            cache.set(key, b"v", TTL)
    return hits / len(trace)


def hit_ratios(n_keys: int, length: int) -> dict[str, Any]:
    capacity = n_keys // 100
    out: dict[str, Any] = {"keys": n_keys, "requests": length, "cache_entries": capacity}
    for s in (0.8, 1.0, 1.2):
        trace = zipf_trace(n_keys, s, length, seed=int(s * 10))
        row = {kind: round(hit_ratio(kind, trace, capacity), 4) for kind in ("s3fifo", "s3fifo_python_twin", "lru")}
        row["s3fifo_minus_lru"] = round(row["s3fifo"] - row["lru"], 4)
        out[f"zipf_{s}"] = row
        progress(f"  hit ratio zipf {s}: {row}")
    # A hot set of 0.5% of the keys (Zipf 1.0 among them) with a one-pass scan over every key
    # interleaved: one request in three belongs to the scan.
    hot = zipf_trace(capacity // 2, 1.0, length, seed=5)
    mixed = np.empty(length + length // 2, dtype=np.int64)
    mixed[0::3] = np.arange(len(mixed[0::3])) + 10 * n_keys  # scanned keys are never asked for again
    rest = np.ones(len(mixed), dtype=bool)
    rest[0::3] = False
    mixed[rest] = hot[: rest.sum()]
    row = {kind: round(hit_ratio(kind, mixed, capacity), 4) for kind in ("s3fifo", "s3fifo_python_twin", "lru")}
    row["s3fifo_minus_lru"] = round(row["s3fifo"] - row["lru"], 4)
    out["hot_set_with_scan"] = row
    progress(f"  hit ratio hot set + scan: {row}")
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    speed_rows = report["speed"]
    sizes = list(speed_rows)
    width = 0.2
    for i, name in enumerate(IMPLS):
        values = [speed_rows[s][name]["batch_get_1000_ns_per_key"] for s in sizes]
        ax1.bar([x + i * width for x in range(len(sizes))], values, width, label=name)
    ax1.set_xticks([x + 1.5 * width for x in range(len(sizes))], [f"{s} entries" for s in sizes])
    ax1.set_ylabel("ns per key (batch get of 1000)")
    ax1.set_title("Batch lookup cost (lower is better)")
    ax1.legend()
    ratios = report["hit_ratio"]
    workloads = [k for k in ratios if k.startswith(("zipf", "hot"))]
    for i, kind in enumerate(("s3fifo", "lru")):
        ax2.bar(
            [x + i * 0.35 for x in range(len(workloads))],
            [ratios[w][kind] for w in workloads],
            0.35,
            label="S3-FIFO (LookupCache)" if kind == "s3fifo" else "LRU",
        )
    ax2.set_xticks([x + 0.175 for x in range(len(workloads))], workloads)
    ax2.set_ylabel("hit ratio")
    ax2.set_title(f"Hit ratio, cache = 1% of {ratios['keys']} keys")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.size)
        return
    sizes = [2_000] if args.quick else [10_000, 1_000_000]
    runs = 1 if args.quick else args.runs
    report: dict[str, Any] = {"implementation_compiled": "cython" in IMPLEMENTATIONS, "runs": runs, "speed": {}}
    for size in sizes:
        progress(f"speed at {size} entries")
        report["speed"][str(size)] = speed(size, runs)
    progress("memory")
    report["memory"] = memory(20_000 if args.quick else 1_000_000)
    progress("hit ratio")
    report["hit_ratio"] = hit_ratios(20_000 if args.quick else 1_000_000, 100_000 if args.quick else 2_000_000)
    publish(report, args.out, "cache_bench", lambda path: plot(report, path))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
