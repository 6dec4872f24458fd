"""Knot DNS answering A lookups on loopback, driven by our own compiled load generator (or by
dnsperf): the row "a C DNS server on this machine" against which our own UDP server is compared
in the same benchmark run.

    python -m bench.knot_baseline [--records 100000] [--duration 5] [--generator idis|dnsperf]
                                  [--processes 2] [--window 64] [--warmup 1]
                                  [--clients 4] [--threads 2] [--workers 2]
                                  [--no-latency-samples] [--out DIR]

Needs knotd (Debian package ``knot``, 3.2), and for ``--generator dnsperf`` dnsperf (Debian
package ``dnsperf``, 2.10): ``make bench-tools`` installs them. Without them it prints
``{"skipped": ...}`` and exits 0.

Writes a zone ``bench.test.`` of --records A records (``k0.bench.test.`` up), starts knotd as the
current user (no systemd) with its configuration, pid file, database and control socket in a
temporary folder, listening on 127.0.0.1 with --workers UDP workers (one TCP and one background
worker), and waits until it answers the last record (a DNS query sent from here, at most 10 s).

``--generator idis`` (the default) loads knotd exactly as bench.handle_bench loads our server:
--processes processes (spawned), each running the compiled generator
(bench/_handle_load.pyx ``run_udp(..., protocol="dns")``: one UDP socket, --window queries
outstanding, sendmmsg/recvmmsg 64 at a time, a query unanswered for 1 s lost) over 200,000 names
drawn uniformly from the records (seeded per process), all starting together, for --warmup
unmeasured seconds and then --duration measured ones. knotd's CPU counts from the end of the
warm-up until every process has reported, as idis-bench counts the node's. Latency percentiles
come from the generator's histogram (log-linear buckets, within 0.8%); every answer must be
NOERROR. The generator costs about half dnsperf's CPU per lookup, so on a small machine knotd
gets the same share of the cores as our server does under the same generator.

``--generator dnsperf``: dnsperf sends, for --duration seconds, names drawn uniformly (with
replacement) from the records, over --clients UDP sockets on --threads send/receive thread pairs,
at most 500 queries outstanding; a query unanswered for 1 s is lost (``-t 1``). Every answer must
be NOERROR.

Reports queries sent, completed and lost, lookups per second, the latency average, min, max and
standard deviation (for the idis generator from its histogram's bucket midpoints, the max exact),
and knotd's CPU time (from /proc, the steadier figure on a shared machine) per lookup and as
lookups per server core-second, with the CPU of each knotd thread, to see how the load spread over
the UDP workers (SO_REUSEPORT hashes each client socket to one worker). Also the datagrams the
kernel dropped on knotd's sockets (a full receive buffer: where lost queries go on loopback) and
the load generator's own CPU and wall time (on 2 cores it competes with knotd for them).

Latency percentiles: dnsperf 2.10 has no histogram or percentile option (``dnsperf -h`` and
``-H`` list none), so they are computed here from the latency of every answer that dnsperf prints
with ``-v`` (microsecond resolution, written to a file). Printing a line per answer costs dnsperf
some throughput on a small machine; ``--no-latency-samples`` leaves ``-v`` out, and then only
dnsperf's average, min, max and standard deviation are reported.

Prints JSON on stdout, progress on stderr; --out keeps the zone, configuration, knotd's log and
dnsperf's input and output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ZONE = "bench.test."
MAX_OUTSTANDING = 500
# dnsperf -t: a query unanswered this long is lost, and frees its slot of the 500 (dnsperf's default
# of 5 s kept lost queries' slots for 5 s and made a run last up to 5 s past -l).
QUERY_TIMEOUT_S = 1
QUERY_LINES = 200_000
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 60.0
"""The most the load-generator processes take to start and build their queries."""
SKIPPED = {"skipped": "knotd or dnsperf not installed (make bench-tools)"}
GENERATORS = {"idis": "idis C generator", "dnsperf": "dnsperf"}
"""``measure_knot``'s load generators, by the name its ``generator`` takes: what the report calls them."""
LATENCY_KEYS = (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99_9"))
"""The latency percentiles reported (``latency_p50_ms``...), and bench._handle_load.latency_ms's names."""
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def available(generator: str = "idis") -> bool:
    """Whether knotd is on PATH, and dnsperf too if it is the ``generator``."""
    needed = ["knotd", "dnsperf"] if generator == "dnsperf" else ["knotd"]
    return all(shutil.which(command) is not None for command in needed)


def record_name(index: int) -> str:
    return f"k{index}.{ZONE}"


def free_port() -> int:
    """A port on 127.0.0.1 free for both UDP and TCP (knotd binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


def write_zone(path: Path, records: int) -> None:
    lines = [
        f"$ORIGIN {ZONE}\n$TTL 3600\n",
        f"@ SOA ns.{ZONE} hostmaster.{ZONE} 1 3600 900 604800 300\n@ NS ns\nns A 127.0.0.1\n",
    ]
    lines += [f"k{i} A 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n" for i in range(records)]
    path.write_text("".join(lines))


def write_config(path: Path, zone_dir: Path, run_dir: Path, port: int, workers: int) -> None:
    """A knot.conf that keeps every file knotd writes in ``run_dir`` and never writes the zone back."""
    (run_dir / "db").mkdir(exist_ok=True)
    path.write_text(f"""server:
    rundir: "{run_dir}"
    pidfile: "{run_dir / "knot.pid"}"
    listen: 127.0.0.1@{port}
    udp-workers: {workers}
    tcp-workers: 1
    background-workers: 1
control:
    listen: "{run_dir / "knot.sock"}"
log:
  - target: stderr
    any: info
database:
    storage: "{run_dir / "db"}"
template:
  - id: default
    storage: "{zone_dir}"
    file: "%s.zone"
    zonefile-sync: -1
    journal-content: none
    semantic-checks: off
zone:
  - domain: {ZONE}
""")


def drawn_records(records: int, count: int = QUERY_LINES, seed: int = 1) -> list[int]:
    """``count`` record numbers drawn uniformly, with replacement, from the zone's (seeded)."""
    rng = random.Random(seed)
    return [rng.randrange(records) for _ in range(count)]


def write_queries(path: Path, records: int, lines: int = QUERY_LINES) -> None:
    """dnsperf's input: ``lines`` names drawn uniformly from the records (seeded), type A."""
    path.write_text("".join(f"{record_name(i)} A\n" for i in drawn_records(records, lines)))


def dns_query(name: str, query_id: int) -> bytes:
    """A DNS query for ``name`` IN A, no flags set (knotd is authoritative)."""
    labels = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split("."))
    return struct.pack("!6H", query_id, 0, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!2H", 1, 1)


def dns_queries(records: int, count: int = QUERY_LINES, seed: int = 1) -> list[bytes]:
    """Whole DNS queries in wire format (a 12-byte header, RD clear, one question: IN A) for
    ``count`` names drawn uniformly from the zone's records, as dnsperf's input is for seed 1;
    their IDs are 0 (the load generator writes one into each send)."""
    drawn = drawn_records(records, count, seed)
    built = {i: dns_query(record_name(i), 0) for i in set(drawn)}
    return [built[i] for i in drawn]


def answers(port: int, name: str, timeout: float = 0.2) -> bool:
    """Whether the server on 127.0.0.1:port answers ``name`` A with NOERROR and an answer record."""
    query_id = random.randrange(1 << 16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(dns_query(name, query_id), ("127.0.0.1", port))
            reply = sock.recv(4096)
        except OSError:  # timeout, or ICMP port unreachable before knotd binds
            return False
    if len(reply) < 12:
        return False
    reply_id, flags, _, ancount = (int(field) for field in struct.unpack("!4H", reply[:8]))
    return reply_id == query_id and flags & 0x8000 != 0 and flags & 0xF == 0 and ancount > 0


def log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def wait_until_answering(process: subprocess.Popen[bytes], port: int, name: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(port, name):
        if process.poll() is not None:
            raise RuntimeError(f"knotd exited with {process.returncode} before answering:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"knotd did not answer {name} within {START_TIMEOUT_S:.0f} s:\n{log_tail(log)}")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; always reaps the process."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def knotd(config: Path, log: Path, port: int, probe: str) -> Iterator[int]:
    """knotd running ``config`` in the foreground, answering ``probe``: its pid."""
    with log.open("wb") as out:
        process = subprocess.Popen(["knotd", "-c", str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_until_answering(process, port, probe, log)
        yield process.pid
    finally:
        stop(process)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User and system CPU time of each thread of ``pid`` so far, by thread id."""
    times: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            times[int(task.name)] = cpu_seconds(task / "stat")
    return times


def cpu_seconds(stat: Path) -> float:
    """User and system CPU time so far from a /proc stat file: a process's (all its threads) or a thread's."""
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def version(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    return " ".join((result.stdout + result.stderr).split())


def parse_dnsperf(output: str) -> dict[str, Any]:
    """dnsperf's closing statistics (latencies converted to ms)."""

    def number(pattern: str) -> float:
        match = re.search(pattern, output)
        if match is None:
            raise RuntimeError(f"dnsperf output has no {pattern!r}:\n{output[-2000:]}")
        return float(match.group(1))

    codes = re.search(r"Response codes:\s+(.*)", output)
    latency = re.search(r"Average Latency \(s\):\s+([\d.]+) \(min ([\d.]+), max ([\d.]+)\)", output)
    if latency is None:
        raise RuntimeError(f"dnsperf output has no average latency:\n{output[-2000:]}")
    return {
        "queries_sent": int(number(r"Queries sent:\s+(\d+)")),
        "queries_completed": int(number(r"Queries completed:\s+(\d+)")),
        "lost": int(number(r"Queries lost:\s+(\d+)")),
        "response_codes": {code: int(n) for code, n in re.findall(r"(\w+) (\d+) \(", codes.group(1))} if codes else {},
        "run_time_s": number(r"Run time \(s\):\s+([\d.]+)"),
        "lookups_per_s": round(number(r"Queries per second:\s+([\d.]+)"), 1),
        "latency_avg_ms": round(1000 * float(latency.group(1)), 3),
        "latency_min_ms": round(1000 * float(latency.group(2)), 3),
        "latency_max_ms": round(1000 * float(latency.group(3)), 3),
        "latency_stddev_ms": round(1000 * number(r"Latency StdDev \(s\):\s+([\d.]+)"), 3),
    }


def latency_samples(output: str) -> list[float]:
    """The latency in seconds of each answer that ``dnsperf -v`` reported (``> NOERROR name A 0.000123``);
    timeouts (``> T``) and interrupted queries (``> I``) have none."""
    samples: list[float] = []
    for line in output.splitlines():
        if line.startswith("> ") and not line.startswith(("> T ", "> I ")):
            with contextlib.suppress(ValueError, IndexError):
                samples.append(float(line.rsplit(None, 1)[1]))
    return samples


def percentiles(samples: list[float]) -> dict[str, float]:
    """Nearest-rank p50, p90, p99 and p99.9 of latencies in seconds, in ms (none of no samples)."""
    ordered = sorted(samples)
    n = len(ordered)
    if n == 0:
        return {}
    return {
        f"latency_{name}_ms": round(1000 * ordered[max(0, math.ceil(q * n) - 1)], 3)
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))
    }


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_dnsperf(command: list[str], output: Path, duration: float) -> tuple[str, dict[str, float]]:
    """Runs dnsperf with its stdout in ``output``: that text, and dnsperf's CPU and wall seconds."""
    cpu_before, started = children_cpu_seconds(), time.monotonic()
    with output.open("wb") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.PIPE, timeout=duration + 60, check=False)
    used = {"client_cpu_s": children_cpu_seconds() - cpu_before, "client_wall_s": time.monotonic() - started}
    text = output.read_text(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"dnsperf exited with {result.returncode}:\n{result.stderr.decode()}\n{text[-2000:]}")
    return text, used


def socket_drops(port: int) -> int:
    """Datagrams the kernel dropped so far on the UDP sockets bound to 127.0.0.1:port (knotd's),
    most often because a socket's receive buffer was full (the last column of /proc/net/udp)."""
    local = f"0100007F:{port:04X}"
    rows = Path("/proc/net/udp").read_text().splitlines()[1:]
    return sum(int(row.split()[-1]) for row in rows if row.split()[1] == local)


def dnsperf_figures(text: str, samples_wanted: bool) -> dict[str, Any]:
    """dnsperf's statistics, and the percentiles of its per-answer latencies if it ran with -v."""
    figures = parse_dnsperf(text)
    if set(figures["response_codes"]) != {"NOERROR"}:
        raise RuntimeError(f"knotd answered other than NOERROR: {figures['response_codes']}")
    if samples_wanted:
        samples = latency_samples(text)
        figures |= percentiles(samples)
        figures["latency_samples"] = len(samples)
        figures["latency_percentiles_from"] = (
            "dnsperf -v: the latency of every answered query (lost ones excluded), nearest rank"
        )
    else:
        figures["latency_percentiles_from"] = None  # dnsperf 2.10 reports only avg/min/max/stddev
    return figures


@contextlib.contextmanager
def server_costs(pid: int, port: int) -> Iterator[dict[str, Any]]:
    """What knotd ``pid`` used while the block ran, filled in when it ends: its CPU (all threads,
    and each thread's), and the datagrams the kernel dropped on its sockets."""
    stat = Path(f"/proc/{pid}/stat")
    cpu_before, threads_before, drops_before = cpu_seconds(stat), thread_cpu_seconds(pid), socket_drops(port)
    costs: dict[str, Any] = {}
    yield costs
    cpu = cpu_seconds(stat) - cpu_before
    threads = {tid: t - threads_before.get(tid, 0.0) for tid, t in thread_cpu_seconds(pid).items()}
    costs["server_cpu_s"] = round(cpu, 3)
    costs["server_thread_cpu_s"] = sorted((round(t, 2) for t in threads.values() if t > 0), reverse=True)
    costs["server_socket_drops"] = socket_drops(port) - drops_before


def load(pid: int, port: int, command: list[str], output: Path, duration: float) -> tuple[str, dict[str, Any]]:
    """Runs dnsperf against knotd ``pid``: dnsperf's output, and what the run cost knotd and dnsperf."""
    with server_costs(pid, port) as costs:
        text, client = run_dnsperf(command, output, duration)
    costs["client_cpu_s"] = round(client["client_cpu_s"], 3)
    costs["client_wall_s"] = round(client["client_wall_s"], 3)
    return text, costs


def _generator_main(
    port: int, records: int, seed: int, duration: float, warmup: float, window: int, start: Any, results: Any
) -> None:
    """One load-generator process: the compiled generator in DNS mode against knotd on ``port``,
    once every process is ready (``start``), for ``warmup`` unmeasured seconds, then ``duration``
    measured ones; the measured run's result goes to ``results``."""
    try:
        from bench._handle_load import run_udp

        queries = dns_queries(records, QUERY_LINES, seed)
    except BaseException:
        start.abort()  # run_generators stops waiting at once
        raise
    start.wait(STARTUP_TIMEOUT_S)
    if warmup > 0:
        run_udp("127.0.0.1", port, queries, warmup, window, QUERY_TIMEOUT_S, protocol="dns")
    results.put(run_udp("127.0.0.1", port, queries, duration, window, QUERY_TIMEOUT_S, protocol="dns"))


def collect_results(procs: list[Any], results: Any, deadline: float) -> list[dict[str, Any]]:
    """Every load-generator process's result; RuntimeError if one fails or ``deadline`` passes."""
    reports: list[dict[str, Any]] = []
    while len(reports) < len(procs):
        try:
            reports.append(results.get(timeout=0.2))
        except queue.Empty:
            if any(p.exitcode not in (0, None) for p in procs):
                raise RuntimeError("a load-generator process failed") from None
            if time.monotonic() > deadline:
                raise RuntimeError("the load-generator processes did not report in time") from None
    return reports


def run_generators(
    pid: int, port: int, records: int, duration: float, processes: int, window: int, warmup: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compiled generator from ``processes`` spawned processes against knotd ``pid``, started
    together, as idis-bench runs its handle-udp workload (``bench.idis_bench.run_load``): their
    results merged, and what the measured part cost knotd (from the end of the warm-up until every
    process has reported)."""
    from bench._handle_load import merge

    if processes < 1:
        raise ValueError("processes must be at least 1")
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(processes + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_generator_main, args=(port, records, n + 1, duration, warmup, window, start, results))
        for n in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        try:
            start.wait(STARTUP_TIMEOUT_S)
        except threading.BrokenBarrierError as exc:
            raise RuntimeError("a load-generator process failed to start") from exc
        time.sleep(warmup)
        with server_costs(pid, port) as costs:
            reports = collect_results(procs, results, time.monotonic() + duration + STARTUP_TIMEOUT_S)
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    return merge(reports), costs


def generator_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The figures dnsperf_figures gives, from the compiled generator's (merged) result: the
    latency average and max exact, min, standard deviation and percentiles from its histogram
    (bucket midpoints, within 0.8%). RuntimeError unless every answer was NOERROR."""
    from bench._handle_load import bucket_midpoint_ns, latency_ms

    answered, elapsed = result["answered"], result["elapsed_s"]
    codes = {RCODES.get(rc, f"RCODE{rc}"): n for rc, n in sorted(result["rc"].items())}
    if set(codes) != {"NOERROR"}:
        raise RuntimeError(f"knotd answered other than NOERROR: {codes}")
    latency = latency_ms(result)
    midpoints = [(bucket_midpoint_ns(int(index)), n) for index, n in result["histogram"].items()]
    mean = result["latency_sum_ns"] / answered
    variance = sum(n * (m - mean) ** 2 for m, n in midpoints) / answered
    return {
        "queries_sent": result["sent"],
        "queries_completed": answered,
        "lost": result["lost"],
        "response_codes": codes,
        "run_time_s": round(elapsed, 3),
        "lookups_per_s": round(answered / elapsed, 1),
        "latency_avg_ms": round(mean / 1e6, 3),
        "latency_min_ms": round(min(m for m, _ in midpoints) / 1e6, 3),
        "latency_max_ms": round(result["latency_max_ns"] / 1e6, 3),
        "latency_stddev_ms": round(math.sqrt(variance) / 1e6, 3),
        **{f"latency_{name}_ms": latency[f"{key}_ms"] for name, key in LATENCY_KEYS},
        "latency_samples": answered,
        "latency_percentiles_from": "the generator's histogram: bucket midpoints (within 0.8%), nearest rank",
        **{key: result[key] for key in ("in_flight", "stale", "socket_errors", "send_stalls")},
    }


def measure_knot(
    records: int,
    duration: float,
    *,
    generator: str = "idis",
    processes: int = 2,
    window: int = 64,
    warmup: float = 1.0,
    clients: int = 4,
    threads: int = 2,
    port: int = 0,
    workers: int = 2,
    out_dir: Path | None = None,
    samples: bool = True,
) -> dict[str, Any]:
    """knotd serving ``records`` A records on 127.0.0.1, loaded for ``duration`` seconds by
    ``generator`` (see the module docstring):

    * "idis": the compiled generator, ``processes`` processes of ``window`` queries outstanding,
      after ``warmup`` unmeasured seconds;
    * "dnsperf": dnsperf with ``clients`` sockets on ``threads`` thread pairs; ``samples`` runs it
      with ``-v`` for latency percentiles.
    """
    if records < 1:
        raise ValueError("records must be at least 1")
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {', '.join(GENERATORS)}, not {generator!r}")
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="idis-knot-") as tmp:
        run_dir = Path(tmp)
        files = out_dir or run_dir
        files.mkdir(parents=True, exist_ok=True)
        progress(f"knot baseline: zone of {records} records, {QUERY_LINES} query names, load by {generator}")
        write_zone(files / f"{ZONE}zone", records)
        write_config(files / "knot.conf", files, run_dir, port, workers)
        with knotd(files / "knot.conf", files / "knotd.log", port, record_name(records - 1)) as pid:
            if generator == "dnsperf":
                figures, costs, setup = dnsperf_run(pid, port, files, records, duration, clients, threads, samples)
            else:
                progress(f"knotd {pid} answering on 127.0.0.1:{port}; {processes} generator processes x {window}")
                result, costs = run_generators(pid, port, records, duration, processes, window, warmup)
                figures = generator_figures(result)
                costs["client_cpu_s"] = round(result["cpu_s"], 3)
                costs["client_wall_s"] = round(result["elapsed_s"], 3)
                setup = {
                    "load_generator_version": "bench/_handle_load.pyx run_udp(protocol='dns')",
                    "clients": processes,  # one UDP socket a process
                    "threads": processes,
                    "processes": processes,
                    "window": window,
                    "warmup_s": warmup,
                    "max_outstanding": processes * window,
                    "dnsperf_command": None,
                }
    completed, cpu, wall = figures["queries_completed"], costs["server_cpu_s"], costs["client_wall_s"]
    costs["server_cpu_us_per_lookup"] = round(1e6 * cpu / completed, 3) if completed else None
    costs["lookups_per_server_core_s"] = round(completed / cpu) if cpu else None
    # over the load generator's measured run (dnsperf: its whole life), as idis-bench counts the node's
    costs["server_cpu_percent_of_one_core"] = round(100 * cpu / wall, 1) if wall else None
    return {
        "server": version(["knotd", "-V"]),
        "load_generator": GENERATORS[generator],
        "records": records,
        "duration_s": duration,
        "udp_workers": workers,
        "cpus": os.cpu_count(),
        **setup,
        **figures,
        **costs,
    }


def dnsperf_run(
    pid: int, port: int, files: Path, records: int, duration: float, clients: int, threads: int, samples: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """dnsperf against knotd ``pid``: its figures, what the run cost knotd and dnsperf, and how it ran."""
    write_queries(files / "queries.txt", records)
    command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(files / "queries.txt")]
    command += ["-l", f"{duration:g}", "-c", str(clients), "-T", str(threads), "-q", str(MAX_OUTSTANDING)]
    command += ["-t", str(QUERY_TIMEOUT_S)]
    command += ["-v"] if samples else []
    progress(f"knotd {pid} answering on 127.0.0.1:{port}; {shlex.join(command)}")
    text, costs = load(pid, port, command, files / "dnsperf.out", duration)
    setup = {
        "load_generator_version": " ".join(text.split("\n", 2)[:2]).strip(),
        "clients": clients,
        "threads": threads,
        "max_outstanding": MAX_OUTSTANDING,
        "dnsperf_command": shlex.join(command),
    }
    return dnsperf_figures(text, samples), costs, setup


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="A records in the zone")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds of load")
    parser.add_argument("--generator", choices=list(GENERATORS), default="idis", help="the load generator")
    parser.add_argument("--processes", type=int, default=2, help="idis generator processes")
    parser.add_argument("--window", type=int, default=64, help="idis generator: queries outstanding per process")
    parser.add_argument("--warmup", type=float, default=1.0, help="idis generator: unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=4, help="dnsperf -c: client sockets")
    parser.add_argument("--threads", type=int, default=2, help="dnsperf -T: send/receive thread pairs")
    parser.add_argument("--workers", type=int, default=2, help="knotd udp-workers")
    parser.add_argument("--no-latency-samples", action="store_true", help="no dnsperf -v: no percentiles")
    parser.add_argument("--out", type=Path, help="keep the zone, knot.conf, knotd.log and dnsperf's files here")
    args = parser.parse_args(argv)
    if not available(args.generator):
        print(json.dumps(SKIPPED))
        return
    report = measure_knot(
        args.records,
        args.duration,
        generator=args.generator,
        processes=args.processes,
        window=args.window,
        warmup=args.warmup,
        clients=args.clients,
        threads=args.threads,
        workers=args.workers,
        out_dir=args.out,
        samples=not args.no_latency_samples,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
