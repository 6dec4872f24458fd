"""Failover that loses nothing: the primary PostgreSQL of a node's site dies under a write load;
Patroni (deploy/postgresql/patroni.yml as shipped, addresses and paths aside) promotes the
synchronous standby, the node reconnects by itself, and every write it acknowledged is there.

The scenario is bench/failover_bench.py's, which also measures the write outage
(bench/RESULTS.md): this test asserts what must hold, never how long it took."""

from __future__ import annotations

from pathlib import Path

from bench.failover_bench import run_once


def test_a_dead_primary_loses_no_acknowledged_write_and_reads_go_on(tmp_path: Path) -> None:
    figures = run_once(tmp_path, writers=4, after=100)
    assert figures["lost_acknowledged_writes"] == {"on_new_primary": 0, "through_the_node": 0}, figures
    assert figures["acknowledged_after_kill"] >= 100  # the node reconnected to the new primary by itself
    assert figures["failed_attempts"] > 0  # writes were refused meanwhile (UNAVAILABLE), not hung
    # Health said NOT_SERVING while no primary could be reached, and SERVING again after.
    assert figures["health_not_serving_after_s"] is not None
    assert figures["health_serving_again_after_s"] is not None
    assert figures["health_serving_again_after_s"] > figures["health_not_serving_after_s"]
    # Reads of what the node had cached went on being answered throughout.
    assert figures["cached_reads_during_outage"] > 0
    assert figures["cached_reads_answered_during_outage"] == figures["cached_reads_during_outage"]
