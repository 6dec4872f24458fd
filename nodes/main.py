"""``idis-node --config node.toml``: run one node (top-level, secondary, enterprise or recursive).

With ``[node] workers = N`` (N > 1) this process becomes a supervisor of N worker processes
serving the same port (``nodes.workers``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import IO, Any

import uvloop

from nodes.config import ConfigError, load_config
from nodes.node import Node, WorkerRole

log = logging.getLogger("idis.node")


def read_ready(stream: IO[str]) -> dict[str, Any] | None:
    """The ready event a node (or a worker, or the bench baseline) prints on ``stream``,
    skipping any other line; None when the stream ends first (the process died)."""
    for line in stream:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == "ready":
            return event
    return None


async def run(config_path: Path, worker: WorkerRole | None) -> int:
    try:
        config = load_config(config_path)
        config.check_files()
    except ConfigError as exc:
        print(f"idis-node: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        node = await Node.start(config, worker)
    except OSError as exc:
        print(f"idis-node: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # One JSON line on stdout tells supervisors (and tests) that the node is ready, and where.
    print(
        json.dumps(
            {
                "event": "ready",
                "name": config.node.name,
                "role": config.node.role,
                "address": node.address,
                "apexes": config.authority.apexes,
                "database": str(config.database_path),
                "metrics_port": node.metrics_port,
                "worker": worker.number if worker is not None else None,
            }
        ),
        flush=True,
    )
    log.info(
        "%s (%s) serving %s on %s",
        config.node.name,
        config.node.role,
        ", ".join(config.authority.apexes) or "-",
        node.address,
    )
    await stop.wait()
    log.info("%s draining", config.node.name)
    await node.stop()
    print(json.dumps({"event": "stopped", "name": config.node.name}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="idis-node", description=__doc__)
    parser.add_argument("--config", "-c", type=Path, required=True, help="the node's TOML config file")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--listen", help=argparse.SUPPRESS)
    parser.add_argument("--change-log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.worker is None:
        try:
            workers = load_config(args.config).node.workers
        except ConfigError as exc:
            print(f"idis-node: invalid configuration: {exc}", file=sys.stderr)
            sys.exit(2)
        if workers > 1:
            from nodes.workers import supervise

            sys.exit(supervise(args.config, args.log_level))
        sys.exit(uvloop.run(run(args.config, None)))
    role = WorkerRole(args.worker, args.listen, args.change_log)
    sys.exit(uvloop.run(run(args.config, role)))


if __name__ == "__main__":
    main()
