"""The lines a node process prints on stdout for whoever started it: ``ready`` (and where it
serves) once it accepts calls, ``stopped`` once it has drained; a worker of several also
``status`` every ``[metrics] report_interval`` (its health status, and proof its event loop
turns). One JSON object a line; logs go to stderr, so a supervisor can read stdout for these alone.

Printed by a single node (``nodes.main``) and by the worker supervisor (``nodes.workers``), read
by the supervisor, ``NodeProcess`` (``nodes.hierarchy``) and the benchmarks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO, Any

from nodes.config import NodeConfig


def ready_event(config: NodeConfig, address: str, metrics_port: int, **extra: Any) -> dict[str, Any]:
    """The ready line's fields: who the node is, where it serves, and ``extra`` (worker details)."""
    return {
        "event": "ready",
        "name": config.node.name,
        "role": config.node.role,
        "address": address,
        "apexes": config.authority.apexes,
        "database": str(config.database_path),
        "metrics_port": metrics_port,
        **extra,
    }


def announce(event: dict[str, Any]) -> None:
    """Prints one event line on stdout at once (a supervisor is waiting for it)."""
    print(json.dumps(event), flush=True)


def announce_stopped(config: NodeConfig) -> None:
    announce({"event": "stopped", "name": config.node.name})


def announce_status(serving: bool) -> None:
    """A worker's report to its supervisor: whether its gRPC health status is SERVING."""
    announce({"event": "status", "serving": serving})


def read_events(stream: IO[str]) -> Iterator[dict[str, Any]]:
    """The events printed on ``stream``, skipping any other line, until it ends."""
    for line in stream:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            yield event


def read_ready(stream: IO[str]) -> dict[str, Any] | None:
    """The ready event a node (or a worker, or the bench baseline) prints on ``stream``,
    skipping any other line; None when the stream ends first (the process died)."""
    for event in read_events(stream):
        if event.get("event") == "ready":
            return event
    return None
