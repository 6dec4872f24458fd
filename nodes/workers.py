"""A node as several worker processes on one port: the supervisor.

Each worker is a whole node (store connection, authority, cache, gRPC server) bound to the same
address with SO_REUSEPORT, so the kernel spreads connections over them and every core serves.
Writes stay coherent through the change log next to the database (``<database>.changes``,
see ``nodes.coherence``), which the supervisor creates afresh at start (caches start empty).

The supervisor prints one ready line once every worker is ready, forwards SIGTERM/SIGINT so
they drain, and restarts a worker that died (at most ``MAX_RESTARTS`` times).
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from nodes.config import load_config
from nodes.main import read_ready
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


def supervise(config_path: Path, log_level: str) -> int:
    config = load_config(config_path)
    host, _, port_text = config.node.listen.rpartition(":")
    reserved, port = _reserve_port(host, int(port_text))
    listen = f"{host}:{port}"
    change_log = config.database_path.with_name(config.database_path.name + ".changes")
    ChangeLog(str(change_log), create=True).close()

    def spawn(number: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nodes.main",
                "--config",
                str(config_path),
                "--log-level",
                log_level,
                "--worker",
                str(number),
                "--listen",
                listen,
                "--change-log",
                str(change_log),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )

    def wait_ready(proc: subprocess.Popen[str]) -> dict[str, object]:
        assert proc.stdout is not None
        event = read_ready(proc.stdout)
        if event is not None:
            return event
        raise RuntimeError(f"worker exited ({proc.wait()}) before it was ready")

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = [spawn(0)]
    try:
        # The first worker creates or migrates the database alone; the others then start together.
        events = [wait_ready(workers[0])]
        workers += [spawn(n) for n in range(1, config.node.workers)]
        events += [wait_ready(w) for w in workers[1:]]
    except RuntimeError as exc:
        print(f"idis-node: {exc}", file=sys.stderr)
        for w in workers:
            w.terminate()
        return 1
    reserved.close()
    print(
        json.dumps(
            {
                "event": "ready",
                "name": config.node.name,
                "role": config.node.role,
                "address": listen,
                "apexes": config.authority.apexes,
                "database": str(config.database_path),
                "metrics_port": events[0].get("metrics_port", 0),
                "workers": len(workers),
                "worker_pids": [w.pid for w in workers],
            }
        ),
        flush=True,
    )
    restarts = 0
    while not stopping:
        time.sleep(0.2)
        for number, w in enumerate(workers):
            if w.poll() is not None and not stopping:
                if restarts >= MAX_RESTARTS:
                    log.error("worker %d died again; giving up after %d restarts", number, restarts)
                    stopping = True
                    break
                log.warning("worker %d exited with %s; restarting it", number, w.returncode)
                restarts += 1
                workers[number] = spawn(number)
                wait_ready(workers[number])
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    code = 0
    for w in workers:
        try:
            w.wait(timeout=config.node.grace_seconds + 10)
        except subprocess.TimeoutExpired:
            w.kill()
            code = 1
    print(json.dumps({"event": "stopped", "name": config.node.name}), flush=True)
    return code
