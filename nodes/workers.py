"""A node as several worker processes on one port: the supervisor.

Each worker is a whole node (store connection, authority, cache, gRPC server) bound to the same
address with SO_REUSEPORT, so the kernel spreads connections over them and every core serves.
Writes stay coherent through the change log next to the database (``<database>.changes``,
see ``nodes.coherence``), which the supervisor creates afresh at start (caches start empty).

The supervisor prints one ready line once every worker is ready, forwards SIGTERM/SIGINT so
they drain, and restarts a worker that died (at most ``MAX_RESTARTS`` times).

It also serves the node's one ``/metrics`` (with ``metrics_listen``): the workers record into
shared files in ``<database>.metrics/`` (prometheus_client's multiprocess mode; the folder made
afresh at every start and removed at exit; a dead worker's live gauges dropped with
``mark_process_dead``), which it sums (``nodes.metrics.supervisor_registry``). And it answers
the probes for all of them, from what each worker reports on its stdout every ``[metrics]
report_interval`` seconds (``nodes.ready``):

* ``/healthz`` (liveness): every running worker that was ready has reported within
  ``STALE_REPORTS`` intervals and a second (its event loop turns);
* ``/readyz`` (readiness): in addition, the node is not stopping and every one of its
  ``workers`` is running, ready and SERVING. A worker being replaced makes the node unready
  until its successor is ready; a worker whose store cannot write makes it unready too.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from nodes.config import NodeConfig
from nodes.handle.server import bind_pair
from nodes.metrics import MULTIPROCESS_DIRECTORY, serve_metrics, supervisor_registry
from nodes.ready import announce, announce_stopped, read_events, ready_event
from resolver.cache import ChangeLog

log = logging.getLogger("idis.node")

MAX_RESTARTS = 10

STALE_REPORTS = 3
"""A ready worker silent for this many report intervals (and a second) fails the liveness probe."""


def _reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Binds (but does not listen on) the port with SO_REUSEPORT, so the workers can bind it too
    and nothing else can take it meanwhile."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    return sock, int(sock.getsockname()[1])


class WorkerFailed(RuntimeError):
    """A worker exited before it was ready."""


class WorkerProcess:
    """One worker process and what it last said on its stdout, read by a thread of its own so
    the supervisor knows at any moment whether it is ready, serving and still reporting."""

    def __init__(self, number: int, proc: subprocess.Popen[str]) -> None:
        self.number = number
        self.proc = proc
        self.ready_event: dict[str, Any] | None = None
        self.serving = False
        self.heard = time.monotonic()
        self.ended = False  # its stdout is closed: it has exited, or is about to
        self.started = threading.Event()  # the ready line came, or stdout ended before it
        threading.Thread(target=self._listen, name=f"worker {number} stdout", daemon=True).start()

    def _listen(self) -> None:
        assert self.proc.stdout is not None
        for event in read_events(self.proc.stdout):
            self.heard = time.monotonic()
            if event.get("event") == "ready":
                self.serving = bool(event.get("serving", True))
                self.ready_event = event
                self.started.set()
            elif event.get("event") == "status":
                self.serving = bool(event.get("serving"))
        self.ended = True
        self.started.set()

    def wait_ready(self) -> dict[str, Any]:
        """Its ready event; WorkerFailed when it exits first."""
        self.started.wait()
        if self.ready_event is None:
            raise WorkerFailed(f"worker {self.number} exited before it was ready")
        return self.ready_event

    def silent_for(self, now: float) -> float | None:
        """Seconds since it last reported, if it is ready and running (else None)."""
        return now - self.heard if self.ready_event is not None and not self.ended else None

    @property
    def serves(self) -> bool:
        """Ready, running, and SERVING when it last reported."""
        return self.ready_event is not None and not self.ended and self.serving


class Supervisor:
    """Starts ``config.node.workers`` worker processes of the node configured in ``config_path``
    on one port, keeps them running, and stops them; serves their metrics and probes."""

    def __init__(self, config_path: Path, config: NodeConfig, log_options: list[str]) -> None:
        self.config_path = config_path
        self.config = config
        self.log_options = log_options
        host, _, port_text = config.node.listen.rpartition(":")
        self.reserved, port = _reserve_port(host, int(port_text))
        self.listen = f"{host}:{port}"
        self.http_reserved: socket.socket | None = None
        self.http_listen = ""
        if config.node.http_listen:
            http_host, _, http_port_text = config.node.http_listen.rpartition(":")
            self.http_reserved, http_port = _reserve_port(http_host, int(http_port_text))
            self.http_listen = f"{http_host}:{http_port}"
        self.handle_reserved: tuple[socket.socket, socket.socket] | None = None
        self.handle_listen = ""
        if config.node.handle_listen:  # UDP and TCP on one port, bound by every worker
            udp, tcp, handle_port = bind_pair(config.node.handle_listen, reuse_port=True)
            self.handle_reserved = (udp, tcp)
            self.handle_listen = f"{config.node.handle_listen.rpartition(':')[0]}:{handle_port}"
        database = config.database_path
        self.change_log = database.with_name(database.name + ".changes")
        self.metrics_directory = database.with_name(database.name + ".metrics") if config.node.metrics_listen else None
        self.metrics_port = 0
        self.workers: list[WorkerProcess] = []
        self.reaping = threading.Lock()  # held while a worker may be reaped (NodeProcessesCollector)
        self.stopping = False

    def spawn(self, number: int) -> WorkerProcess:
        command = [sys.executable, "-m", "nodes.main", "--config", str(self.config_path), *self.log_options]
        command += ["--worker", str(number), "--listen", self.listen, "--change-log", str(self.change_log)]
        if self.http_listen:
            command += ["--http-listen", self.http_listen]
        if self.handle_listen:
            command += ["--handle-listen", self.handle_listen]
        env = {k: v for k, v in os.environ.items() if k != MULTIPROCESS_DIRECTORY}
        if self.metrics_directory is not None:  # read by prometheus_client when the worker imports it
            env[MULTIPROCESS_DIRECTORY] = str(self.metrics_directory)
        return WorkerProcess(number, subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env))

    def serve_metrics(self) -> None:
        """Serves the workers' metrics, summed, and the node's probes on ``metrics_listen`` (if
        set), from a fresh shared folder. OSError when it cannot."""
        if self.metrics_directory is None:
            return
        shutil.rmtree(self.metrics_directory, ignore_errors=True)  # a previous run's, if it was killed
        self.metrics_directory.mkdir(parents=True)
        config = self.config
        registry = supervisor_registry(
            self.metrics_directory, config.database_path, config.metrics.top_prefixes, self.worker_pids, self.reaping
        )
        self.metrics_port = serve_metrics(registry, config.node.metrics_listen, self)

    def remove_metrics_directory(self) -> None:
        if self.metrics_directory is not None:
            shutil.rmtree(self.metrics_directory, ignore_errors=True)

    def worker_pids(self) -> list[int]:
        """The workers not yet reaped (call with ``reaping`` held)."""
        return [w.proc.pid for w in self.workers if w.proc.returncode is None]

    def start(self) -> dict[str, Any]:
        """Serves metrics and starts every worker; the ready event of the first. WorkerFailed (and
        none left running) when one exits before it is ready; OSError when the metrics port or
        folder cannot be had."""
        ChangeLog(str(self.change_log), create=True).close()
        try:
            self.serve_metrics()
            self.workers = [self.spawn(0)]
            # The first worker creates or migrates the database alone; the others then start together.
            first = self.workers[0].wait_ready()
            self.workers += [self.spawn(n) for n in range(1, self.config.node.workers)]
            for worker in self.workers[1:]:
                worker.wait_ready()
        except WorkerFailed:
            self.stopping = True
            for worker in self.workers:
                self.signal(worker, signal.SIGTERM)
            raise
        finally:
            self.reserved.close()
            if self.http_reserved is not None:
                self.http_reserved.close()
            for sock in self.handle_reserved or ():
                sock.close()
        return first

    def signal(self, worker: WorkerProcess, signum: int) -> None:
        with self.reaping:  # Popen.send_signal may reap the process
            worker.proc.send_signal(signum)

    def reaped(self, worker: WorkerProcess) -> bool:
        """Whether ``worker`` has exited; if so its live gauges are dropped from the metrics."""
        with self.reaping:
            if worker.proc.poll() is None:
                return False
        if self.metrics_directory is not None:
            mark_process_dead(worker.proc.pid, str(self.metrics_directory))  # type: ignore[no-untyped-call]
        return True

    def keep_running(self) -> None:
        """Restarts workers that die until asked to stop, or until MAX_RESTARTS restarts."""
        restarts = 0
        while not self.stopping:
            time.sleep(0.2)
            for number, worker in enumerate(self.workers):
                if self.stopping or not self.reaped(worker):
                    continue
                if restarts >= MAX_RESTARTS:
                    log.error("worker %d died again; giving up after %d restarts", number, restarts)
                    return
                log.warning("worker %d exited with %s; restarting it", number, worker.proc.returncode)
                restarts += 1
                self.workers[number] = self.spawn(number)
                self.workers[number].wait_ready()

    def stop(self) -> int:
        """Asks every worker to drain; 1 if one had to be killed."""
        self.stopping = True
        for worker in self.workers:
            self.signal(worker, signal.SIGTERM)
        deadline = time.monotonic() + self.config.node.grace_seconds + 10
        running = list(self.workers)
        while running and time.monotonic() < deadline:
            running = [w for w in running if not self.reaped(w)]
            if running:
                time.sleep(0.1)
        for worker in running:
            self.signal(worker, signal.SIGKILL)
            with self.reaping:
                worker.proc.wait()
        return 1 if running else 0

    def probe(self, readiness: bool) -> tuple[bool, str]:
        """``/healthz`` and ``/readyz`` of the node (see the module's docstring)."""
        stale = STALE_REPORTS * self.config.metrics.report_interval + 1.0
        now = time.monotonic()
        workers = list(self.workers)
        for worker in workers:
            silent = worker.silent_for(now)
            if silent is not None and silent > stale:
                return False, f"worker {worker.number} has not reported for {silent:.1f} s"
        if not readiness:
            return True, "alive"
        ready = not self.stopping and len(workers) == self.config.node.workers and all(w.serves for w in workers)
        return (True, "SERVING") if ready else (False, "NOT_SERVING")

    def on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True


def supervise(config_path: Path, config: NodeConfig, log_options: list[str]) -> int:
    """Runs the node as ``config.node.workers`` processes until SIGTERM or SIGINT; the exit code.
    ``log_options`` are the idis-node options every worker gets for its logging."""
    supervisor = Supervisor(config_path, config, log_options)
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    try:
        return _run(supervisor)
    finally:
        supervisor.remove_metrics_directory()


def _run(supervisor: Supervisor) -> int:
    try:
        supervisor.start()
    except (WorkerFailed, OSError) as exc:
        log.error("%s", exc)
        return 1
    workers = supervisor.workers
    announce(
        ready_event(
            supervisor.config,
            supervisor.listen,
            supervisor.metrics_port,
            workers=len(workers),
            worker_pids=[w.proc.pid for w in workers],
            http_port=int(supervisor.http_listen.rpartition(":")[2] or 0),
            handle_port=int(supervisor.handle_listen.rpartition(":")[2] or 0),
        )
    )
    try:
        supervisor.keep_running()
    except WorkerFailed as exc:
        log.error("%s", exc)
    code = supervisor.stop()
    announce_stopped(supervisor.config)
    return code
