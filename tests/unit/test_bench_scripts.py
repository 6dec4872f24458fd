"""The benchmark scripts keep working (a smoke run on small sizes; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_cache_bench_quick_run_reports_every_section(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.cache_bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    assert set(report["speed"]["2000"]) >= {"cython", "python", "cachetools.TTLCache", "dict"}
    assert report["memory"]["cython"]["entries"] == 20000
    for workload in ("zipf_0.8", "zipf_1.0", "zipf_1.2", "hot_set_with_scan"):
        row = report["hit_ratio"][workload]
        assert 0 <= row["lru"] <= 1 and 0 <= row["s3fifo"] <= 1
    assert (tmp_path / "cache_bench.png").stat().st_size > 10_000


def test_e2e_bench_quick_run_compares_node_and_baseline_through_idis_bench(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bench.e2e_bench", "--runs", "1", "--duration", "0.3", "--warmup", "0.1"),
            *("--count", "300", "--processes", "1", "--out", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["load_generator"].startswith("idis-bench")
    names = {"node_ping", "node_resolve", "node_batch100", "node_batch1000", "node_stream100"}
    assert set(report["median"]) == names | {"baseline_batch100", "baseline_batch1000", "baseline_stream100"}
    for name, figures in report["median"].items():
        assert figures["errors"] == 0 and figures["items_per_s"] > 0, name
        assert figures["server_cpu_us_per_item"] > 0, name
    assert all(value > 0 for value in report["ratios"].values())
    assert (tmp_path / "e2e_bench.json").is_file() and (tmp_path / "e2e_bench.png").stat().st_size > 10_000


def test_attestation_bench_quick_run_reports_each_cost() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.attestation_bench", "--records", "40", "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["records"] == 40
    for name in ("ed25519_signature_alone_us", "per_record_jws_us", "validation_us_per_answer_from_scratch"):
        assert report[name]["median"] > 0, name
    assert report["proof_bytes_per_answer"] > 32 * 5  # a tree of 40 leaves: a path of 6 hashes
