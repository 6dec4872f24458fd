"""A node's log as a log collector reads it: with JSON logs every line is one JSON event."""

from __future__ import annotations

import json
from typing import Any

from nodes.hierarchy import NodeSpec
from tests.integration.conftest import Cluster


def events_of(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    lines = (cluster.state / f"{name}.log").read_text(encoding="utf-8").splitlines()
    assert lines
    events = [json.loads(line) for line in lines]  # every line parses, alone
    assert all(isinstance(e, dict) and {"time", "level", "logger", "message"} <= e.keys() for e in events)
    return events


def test_a_node_with_json_logs_writes_one_json_event_a_line(cluster: Cluster) -> None:
    cluster.start(NodeSpec("j", "enterprise", "88.7", 0, extra={"node": {"log_format": "json"}}))
    cluster.stop_all()
    events = events_of(cluster, "j")
    messages = [(e["level"], e["message"]) for e in events]
    assert ("WARNING", "j: [auth] mode is off: anyone who reaches this node can write to it") in messages
    assert any(level == "INFO" and "serving 88.7 on 127.0.0.1:" in m for level, m in messages)
    assert ("INFO", "j draining") in messages
    assert {e["node"] for e in events} == {"j"}


def test_the_supervisor_gives_its_workers_the_log_format(cluster: Cluster) -> None:
    cluster.start(NodeSpec("w", "enterprise", "88.7", 0, extra={"node": {"workers": 2, "log_format": "json"}}))
    cluster.stop_all()
    events = events_of(cluster, "w")
    serving = [e for e in events if "serving 88.7" in e["message"]]
    assert sorted(e["worker"] for e in serving) == [0, 1]
