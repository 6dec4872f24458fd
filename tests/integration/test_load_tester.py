"""idis-bench against a real node: closed loop, open loop, writes, and the report it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nodes.hierarchy import NodeSpec
from tests.integration.conftest import Cluster

UNLIMITED: dict[str, dict[str, object]] = {"quotas": {"peer_calls_per_second": 0, "peer_burst": 0}}
"""The load generator is one peer: without this its load would be the node's quota, not its work."""


def bench(*args: str) -> dict[str, object]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.idis_bench",
            "--quiet",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--processes",
            "1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_closed_open_loop_and_writes_against_a_node(cluster: Cluster, tmp_path: Path) -> None:
    address = cluster.start(
        NodeSpec("b", "enterprise", "88.100.1", 0, extra={"node": {"metrics_listen": "127.0.0.1:0"}, **UNLIMITED})
    )
    metrics = f"http://127.0.0.1:{cluster.processes['b'].metrics_port}/metrics"
    closed = bench(
        "--target",
        address,
        "--keys",
        "500",
        "--load",
        "--workload",
        "batch",
        "--batch-size",
        "50",
        "--not-found-share",
        "0.2",
        "--metrics",
        metrics,
        "--out",
        str(tmp_path / "closed"),
    )
    result = closed["result"]
    assert isinstance(result, dict)
    assert result["items"] == result["calls"] * 50 and result["errors"] == 0
    assert result["latency"]["p99_ms"] >= result["latency"]["p50_ms"] > 0
    node = closed["nodes"][metrics]  # type: ignore[index]
    assert node["requests"]["[ResolveBatch,OK]"] >= result["calls"]
    assert 0 < node["cache_hit_ratio"] < 1  # the unknown identifiers miss
    assert (tmp_path / "closed" / "report.png").stat().st_size > 10_000

    opened = bench("--target", address, "--keys", "500", "--rate", "200", "--out", str(tmp_path / "open"))
    result = opened["result"]
    assert isinstance(result, dict)
    assert 50 <= result["calls"] <= 210  # paced at 200 calls/s for 1 s: never more (a closed loop would send thousands)

    writes = bench(
        "--target",
        address,
        "--keys",
        "500",
        "--workload",
        "mixed",
        "--write-ratio",
        "0.5",
        "--out",
        str(tmp_path / "mixed"),
    )
    result = writes["result"]
    assert isinstance(result, dict) and result["statuses"] == {"OK": result["calls"]}


def test_ping_workload_and_the_server_cpu_it_costs(cluster: Cluster, tmp_path: Path) -> None:
    address = cluster.start(NodeSpec("p", "enterprise", "88.100.1", 0, extra=UNLIMITED))
    process = cluster.processes["p"].proc
    assert process is not None
    report = bench("--target", address, "--workload", "ping", "--server-pid", str(process.pid), "--out", str(tmp_path))
    result = report["result"]
    assert isinstance(result, dict)
    assert result["calls"] > 0 and result["statuses"] == {"OK": result["calls"]}
    assert result["server_cpu_percent_of_one_core"] > 0  # the node did the work the calls asked for
    assert result["server_cpu_us_per_item"] > 0
