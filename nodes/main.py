"""``idis-node --config node.toml``: run one node (top-level, secondary, enterprise or recursive).

With ``[node] workers = N`` (N > 1) this process becomes a supervisor of N worker processes
serving the same port (``nodes.workers``).

Logs go to stderr, one line per event, as text or JSON (``--log-format``, else ``[node]
log_format``); stdout carries only the ready and stopped lines (``nodes.ready``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop

from nodes import logs
from nodes.config import ConfigError, NodeConfig, load_config
from nodes.node import Node, WorkerRole
from nodes.ready import announce, announce_stopped, ready_event
from nodes.workers import supervise

log = logging.getLogger("idis.node")

DESCRIPTION = """Run one identifier node (top-level, secondary, enterprise or recursive) from its TOML
config. With [node] workers = N (N > 1) this process supervises N worker processes serving the
same port. Logs go to stderr, one line per event, as text or JSON; stdout carries only the ready
and stopped lines (one JSON object each)."""


async def run(config: NodeConfig, worker: WorkerRole | None) -> int:
    try:
        config.check_files()
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    try:
        node = await Node.start(config, worker)
    except OSError as exc:
        log.error("%s", exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # One JSON line on stdout tells supervisors (and tests) that the node is ready, and where.
    number = worker.number if worker is not None else None
    http_port = node.http.port if node.http is not None else 0
    handle_port = node.handle.port if node.handle is not None else 0
    announce(
        ready_event(
            config,
            node.address,
            node.metrics_port,
            worker=number,
            serving=node.serving,
            http_port=http_port,
            handle_port=handle_port,
        )
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
    announce_stopped(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idis-node", description=DESCRIPTION)
    parser.add_argument("--config", "-c", type=Path, required=True, help="the node's TOML config file")
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=logs.LEVELS, help="the least severe events logged"
    )
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="text for people, json for log collectors (default: [node] log_format, else text)",
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--listen", help=argparse.SUPPRESS)
    parser.add_argument("--change-log", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--http-listen", default="", help=argparse.SUPPRESS)
    parser.add_argument("--handle-listen", default="", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format or "text")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        sys.exit(2)
    log_format = args.log_format or config.node.log_format
    fields = {"node": config.node.name, **({"worker": args.worker} if args.worker is not None else {})}
    logs.configure(args.log_level, log_format, fields)
    if args.worker is not None:
        sys.exit(
            uvloop.run(
                run(config, WorkerRole(args.worker, args.listen, args.change_log, args.http_listen, args.handle_listen))
            )
        )
    if config.node.workers > 1:
        sys.exit(supervise(args.config, config, ["--log-level", args.log_level, "--log-format", log_format]))
    sys.exit(uvloop.run(run(config, None)))


if __name__ == "__main__":
    main()
