"""A closed-loop gRPC load generator that sends pre-serialised requests from several processes.

Each process runs its own uvloop and channel with ``concurrency`` callers, each sending the next
request as soon as the previous answer arrived (closed loop), for ``duration`` seconds after a
warm-up. Requests and responses stay bytes (no protobuf work on the client), and each process
reports the CPU time it used, so a reader can see whether the load generator or the server was
the limit.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import numpy as np
import uvloop

EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 - the stubs lack it


@dataclass(frozen=True)
class Scenario:
    name: str
    address: str
    method: str
    """Full method name, e.g. /idis.v1.Resolution/Resolve."""
    requests: list[bytes]
    items_per_call: int = 1
    streaming: bool = False
    processes: int = 2
    concurrency: int = 16
    duration: float = 5.0
    warmup: float = 1.0


@dataclass
class Result:
    scenario: str
    calls: int = 0
    errors: int = 0
    seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    server_cpu_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def summary(self, items_per_call: int) -> dict[str, Any]:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        wall = self.seconds or 1.0
        return {
            "calls_per_s": round(self.calls / wall, 1),
            "items_per_s": round(self.calls * items_per_call / wall, 1),
            "errors": self.errors,
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "client_cpu_percent_of_machine": round(100 * self.client_cpu_seconds / (wall * (os.cpu_count() or 1)), 1),
            "server_cpu_percent_of_one_core": round(100 * self.server_cpu_seconds / wall, 1),
            "server_cpu_us_per_item": round(1e6 * self.server_cpu_seconds / max(1, self.calls * items_per_call), 3),
        }


async def _drive(s: Scenario, seed: int, until: float, latencies: list[float] | None) -> tuple[int, int]:
    calls = errors = 0
    async with grpc.aio.insecure_channel(s.address) as channel:
        requests = s.requests

        async def unary(worker: int) -> None:
            nonlocal calls, errors
            rpc = channel.unary_unary(s.method, request_serializer=None, response_deserializer=None)
            i = seed * 7919 + worker * 104729
            while time.perf_counter() < until:
                started = time.perf_counter()
                try:
                    await rpc(requests[i % len(requests)])
                except grpc.aio.AioRpcError:
                    errors += 1
                if latencies is not None:
                    latencies.append(time.perf_counter() - started)
                calls += 1
                i += 1

        async def stream(worker: int) -> None:
            nonlocal calls, errors
            method: Any = channel.stream_stream(s.method, request_serializer=None, response_deserializer=None)
            call = method()
            i = seed * 7919 + worker * 104729
            while time.perf_counter() < until:
                started = time.perf_counter()
                await call.write(requests[i % len(requests)])
                if await call.read() is EOF:
                    errors += 1
                    break
                if latencies is not None:
                    latencies.append(time.perf_counter() - started)
                calls += 1
                i += 1
            await call.done_writing()

        body = stream if s.streaming else unary
        await asyncio.gather(*(body(w) for w in range(s.concurrency)))
    return calls, errors


def _process(s: Scenario, seed: int, start_at: float, queue: Any) -> None:
    async def run() -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        now = time.perf_counter()
        await _drive(s, seed, now + s.warmup, None)
        before = resource.getrusage(resource.RUSAGE_SELF)
        latencies: list[float] = []
        began = time.perf_counter()
        calls, errors = await _drive(s, seed, began + s.duration, latencies)
        elapsed = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        queue.put((calls, errors, elapsed, cpu, latencies[:: max(1, len(latencies) // 20000)]))

    uvloop.run(run())


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(s: Scenario, server_pid: int | None = None) -> Result:
    """Runs one scenario; the server's CPU is read from /proc when its pid is given."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 1.5  # let every process start before any of them sends
    procs = [ctx.Process(target=_process, args=(s, n, start_at, queue)) for n in range(s.processes)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at + s.warmup - time.time()))
    server_before = process_cpu_seconds(server_pid) if server_pid else 0.0
    parts = [queue.get(timeout=s.warmup + s.duration + 60) for _ in procs]
    server_after = process_cpu_seconds(server_pid) if server_pid else 0.0
    for p in procs:
        p.join()
    result = Result(s.name)
    for calls, errors, elapsed, cpu, lat in parts:
        result.calls += calls
        result.errors += errors
        result.seconds = max(result.seconds, elapsed)
        result.client_cpu_seconds += cpu
        result.latencies.extend(lat)
    result.server_cpu_seconds = server_after - server_before
    return result
