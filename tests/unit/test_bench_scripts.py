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
