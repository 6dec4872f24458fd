"""A node as several worker processes on one port: the supervisor.

Each worker is a whole node (store connection, authority, cache, gRPC server) bound to the same
address with SO_REUSEPORT, so the kernel spreads connections over them and every core serves.
Writes stay coherent through the change log next to the database (``<database>.changes``,
see ``nodes.coherence``), which the supervisor creates afresh at start (caches start empty).

The supervisor prints one ready line once every worker is ready, forwards SIGTERM/SIGINT so
they drain, and restarts a worker that died (at most ``MAX_RESTARTS`` times).
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nodes.config import NodeConfig
from nodes.ready import announce, announce_stopped, read_ready, ready_event
from resolver.cache import ChangeLog

log = logging.getLogger("idis.node")

MAX_RESTARTS = 10


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


class Supervisor:
    """Starts ``config.node.workers`` worker processes of the node configured in ``config_path``
    on one port, keeps them running, and stops them."""

    def __init__(self, config_path: Path, config: NodeConfig, log_options: list[str]) -> None:
        self.config_path = config_path
        self.config = config
        self.log_options = log_options
        host, _, port_text = config.node.listen.rpartition(":")
        self.reserved, port = _reserve_port(host, int(port_text))
        self.listen = f"{host}:{port}"
        self.change_log = config.database_path.with_name(config.database_path.name + ".changes")
        self.workers: list[subprocess.Popen[str]] = []
        self.stopping = False

    def spawn(self, number: int) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "nodes.main", "--config", str(self.config_path), *self.log_options]
        command += ["--worker", str(number), "--listen", self.listen, "--change-log", str(self.change_log)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)

    @staticmethod
    def wait_ready(proc: subprocess.Popen[str]) -> dict[str, Any]:
        assert proc.stdout is not None
        event = read_ready(proc.stdout)
        if event is None:
            raise WorkerFailed(f"worker exited ({proc.wait()}) before it was ready")
        return event

    def start(self) -> dict[str, Any]:
        """Starts every worker; the ready event of the first. WorkerFailed (and none left running)
        when one exits before it is ready."""
        ChangeLog(str(self.change_log), create=True).close()
        self.workers = [self.spawn(0)]
        try:
            # The first worker creates or migrates the database alone; the others then start together.
            first = self.wait_ready(self.workers[0])
            self.workers += [self.spawn(n) for n in range(1, self.config.node.workers)]
            for worker in self.workers[1:]:
                self.wait_ready(worker)
        except WorkerFailed:
            for worker in self.workers:
                worker.terminate()
            raise
        finally:
            self.reserved.close()
        return first

    def keep_running(self) -> None:
        """Restarts workers that die until asked to stop, or until MAX_RESTARTS restarts."""
        restarts = 0
        while not self.stopping:
            time.sleep(0.2)
            for number, worker in enumerate(self.workers):
                if worker.poll() is None or self.stopping:
                    continue
                if restarts >= MAX_RESTARTS:
                    log.error("worker %d died again; giving up after %d restarts", number, restarts)
                    return
                log.warning("worker %d exited with %s; restarting it", number, worker.returncode)
                restarts += 1
                self.workers[number] = self.spawn(number)
                self.wait_ready(self.workers[number])

    def stop(self) -> int:
        """Asks every worker to drain; 1 if one had to be killed."""
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        code = 0
        for worker in self.workers:
            try:
                worker.wait(timeout=self.config.node.grace_seconds + 10)
            except subprocess.TimeoutExpired:
                worker.kill()
                code = 1
        return code

    def on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True


def supervise(config_path: Path, config: NodeConfig, log_options: list[str]) -> int:
    """Runs the node as ``config.node.workers`` processes until SIGTERM or SIGINT; the exit code.
    ``log_options`` are the idis-node options every worker gets for its logging."""
    supervisor = Supervisor(config_path, config, log_options)
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    try:
        first = supervisor.start()
    except WorkerFailed as exc:
        log.error("%s", exc)
        return 1
    workers = supervisor.workers
    announce(
        ready_event(
            config,
            supervisor.listen,
            int(first.get("metrics_port") or 0),
            workers=len(workers),
            worker_pids=[w.pid for w in workers],
        )
    )
    try:
        supervisor.keep_running()
    except WorkerFailed as exc:
        log.error("%s", exc)
    code = supervisor.stop()
    announce_stopped(config)
    return code
