"""Failover under a write load: the primary PostgreSQL of a node's site dies, Patroni promotes
the synchronous standby, the node reconnects by itself; how long writes stopped, and whether
any acknowledged write was lost.

    python -m bench.failover_bench [--runs 3] [--writers 4] [--out bench/results]

Each run starts a throwaway Patroni cluster from deploy/postgresql/patroni.yml (one etcd, two
members, synchronous mode: bench/patroni_cluster.py) and a node on it (its [storage] dsn lists
both members). ``--writers`` clients register identifiers one by one, as fast as the node
acknowledges them, while a prober asks the node's gRPC health every 50 ms and a reader resolves
an identifier the node has cached. Two seconds in, the primary's machine dies (Patroni and
PostgreSQL SIGKILLed). The run goes on until --after acknowledgements have come after the kill.

Reported per run: the write outage (the longest time between two acknowledgements, across the
kill), when health said NOT_SERVING and SERVING again, whether cached reads went on being
answered, and the acknowledged writes missing afterwards (read on the new primary, and through
the node): must be 0. Prints JSON and writes a PNG (acknowledgements over time, the kill marked).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc.aio
from asyncpg.connect_utils import SessionAttribute
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.patroni_cluster import PatroniCluster
from bench.report import publish
from nodes.hierarchy import NodeProcess, NodeSpec
from resolver.errors import IdisError
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.resolver import Resolver

APEX = "88.6"
KILL_AFTER = 2.0
"""Seconds of writes before the primary dies."""
GIVE_UP = 60.0
"""Seconds after the kill within which writes must be acknowledged again."""


@dataclass
class Observed:
    """What the clients saw, with monotonic times."""

    acknowledged: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    health: list[tuple[float, bool]] = field(default_factory=list)
    reads: list[tuple[float, bool]] = field(default_factory=list)
    killed_at: float = 0.0


async def write_load(node: str, writer: int, seen: Observed, stop: asyncio.Event) -> None:
    registrar = Registrar(node=node, timeout=5)
    try:
        n = 0
        while not stop.is_set():
            identifier = f"{APEX}/W-{writer}-{n}"
            try:
                await registrar.create(identifier, [Value(1, "URL", identifier.encode())])
                seen.acknowledged[identifier] = time.monotonic()
                n += 1
            except (IdisError, grpc.aio.AioRpcError):  # unavailable meanwhile: try the same one again
                seen.failures += 1
                await asyncio.sleep(0.02)
    finally:
        await registrar.close()


async def probe_health(node: str, seen: Observed, stop: asyncio.Event) -> None:
    async with grpc.aio.insecure_channel(node) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                serving = answer.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                serving = False
            seen.health.append((time.monotonic(), serving))
            await asyncio.sleep(0.05)


async def read_cached(node: str, identifier: str, seen: Observed, stop: asyncio.Event) -> None:
    async with Resolver([node], cache_answers=False, timeout=2) as resolver:
        while not stop.is_set():
            try:
                await resolver.resolve(identifier)
                seen.reads.append((time.monotonic(), True))
            except IdisError:
                seen.reads.append((time.monotonic(), False))
            await asyncio.sleep(0.05)


async def scenario(cluster: PatroniCluster, node: str, writers: int, after: int) -> Observed:
    seen, stop = Observed(), asyncio.Event()
    registrar = Registrar(node=node)
    try:
        await registrar.create(f"{APEX}/CACHED", [Value(1, "URL", b"read through the outage")])
    finally:
        await registrar.close()
    tasks = [asyncio.create_task(write_load(node, w, seen, stop)) for w in range(writers)]
    tasks += [
        asyncio.create_task(probe_health(node, seen, stop)),
        asyncio.create_task(read_cached(node, f"{APEX}/CACHED", seen, stop)),
    ]
    try:
        await asyncio.sleep(KILL_AFTER)
        leader = cluster.leader()
        assert leader is not None, "no leader to kill"
        seen.killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, leader)
        while sum(1 for t in seen.acknowledged.values() if t > seen.killed_at) < after:
            if time.monotonic() - seen.killed_at > GIVE_UP:
                raise TimeoutError(f"no writes acknowledged within {GIVE_UP} s of the primary's death")
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return seen


async def missing_after(cluster: PatroniCluster, node: str, seen: Observed) -> dict[str, int]:
    """Acknowledged writes not on the new primary, and not answered by the node."""
    connection = await asyncpg.connect(cluster.dsn("idis"), target_session_attrs=SessionAttribute.read_write)
    try:
        stored = {r[0] for r in await connection.fetch("SELECT key FROM identifiers")}
    finally:
        await connection.close()
    on_primary = sum(1 for identifier in seen.acknowledged if identifier.upper() not in stored)
    through_node = 0
    async with Resolver([node], cache_answers=False) as resolver:
        for identifier in seen.acknowledged:
            try:
                await resolver.resolve(identifier)
            except IdisError:
                through_node += 1
    return {"on_new_primary": on_primary, "through_the_node": through_node}


def figures_of(seen: Observed, missing: dict[str, int]) -> dict[str, Any]:
    """The run's figures. The write outage is the longest time without an acknowledgement from
    a second before the kill on (writes in flight at the kill may be acknowledged just after it)."""
    times = sorted(seen.acknowledged.values())
    around = [t for t in times if t > seen.killed_at - 1.0]
    gaps = [(b - a, a, b) for a, b in itertools.pairwise(around)]
    outage, last_before, first_after = max(gaps) if gaps else (float("nan"), 0.0, 0.0)
    down = [t for t, serving in seen.health if t > seen.killed_at and not serving]
    up_again = [t for t, serving in seen.health if down and t > down[0] and serving]
    during = [ok for t, ok in seen.reads if last_before < t < first_after]
    return {
        "acknowledged": len(times),
        "acknowledged_after_kill": sum(1 for t in times if t > seen.killed_at),
        "failed_attempts": seen.failures,
        "write_outage_s": round(outage, 3),
        "writes_resumed_after_s": round(first_after - seen.killed_at, 3),
        "health_not_serving_after_s": round(down[0] - seen.killed_at, 3) if down else None,
        "health_serving_again_after_s": round(up_again[0] - seen.killed_at, 3) if up_again else None,
        "cached_reads_during_outage": len(during),
        "cached_reads_answered_during_outage": sum(during),
        "lost_acknowledged_writes": missing,
        "ack_times_after_kill_s": [round(t - seen.killed_at, 3) for t in times],
    }


def run_once(state: Path, writers: int, after: int) -> dict[str, Any]:
    """One failover: a fresh Patroni cluster and node, the load, the kill; its figures."""
    cluster = PatroniCluster().start()
    node: NodeProcess | None = None
    try:
        asyncio.run(_create_database(cluster))
        storage = {"engine": "postgresql", "dsn": cluster.dsn("idis")}
        spec = NodeSpec("failover", "top-level", APEX, 0, {"storage": storage})
        (state / "failover.toml").write_text(spec.config_text())
        node = NodeProcess(state / "failover.toml", state / "failover.log")
        address = node.start()
        try:
            seen = asyncio.run(scenario(cluster, address, writers, after))
        except BaseException as exc:
            exc.add_note(f"node log:\n{node.log_path.read_text()[-4000:]}\n{cluster.logs()}")
            raise
        missing = asyncio.run(missing_after(cluster, address, seen))
        return figures_of(seen, missing)
    finally:
        if node is not None and node.running:
            node.stop()
        cluster.stop()


async def _create_database(cluster: PatroniCluster) -> None:
    connection = await asyncpg.connect(cluster.dsn(), target_session_attrs=SessionAttribute.read_write)
    try:
        await connection.execute("CREATE DATABASE idis TEMPLATE template0")
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--after", type=int, default=500, help="acknowledgements after the kill before a run ends")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    runs = []
    for n in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="idis-failover-") as tmp:
            figures = run_once(Path(tmp), args.writers, args.after)
        runs.append(figures)
        print(
            f"run {n + 1}/{args.runs}: write outage {figures['write_outage_s']} s, lost"
            f" {figures['lost_acknowledged_writes']}, health down after {figures['health_not_serving_after_s']} s",
            file=sys.stderr,
            flush=True,
        )
    outages = [r["write_outage_s"] for r in runs]
    report = {
        "runs": args.runs,
        "writers": args.writers,
        "patroni_config": "deploy/postgresql/patroni.yml (ttl 10, loop_wait 1, retry_timeout 3, synchronous_mode)",
        "write_outage_s": {"median": statistics.median(outages), "min": min(outages), "max": max(outages)},
        "lost_acknowledged_writes": sum(sum(r["lost_acknowledged_writes"].values()) for r in runs),
        "all_runs": runs,
    }
    publish(report, args.out, "failover_bench", lambda path: plot(runs, path), hidden=("all_runs",))


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for n, run in enumerate(runs):
        times = run["ack_times_after_kill_s"]
        ax.plot(times, range(1, len(times) + 1), label=f"run {n + 1}: outage {run['write_outage_s']} s")
    ax.axvline(0, color="red", linestyle="--", label="primary killed")
    ax.set_xlabel("seconds from the primary's death")
    ax.set_ylabel("writes acknowledged")
    ax.set_title("Writes through a node while Patroni fails its PostgreSQL over")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
