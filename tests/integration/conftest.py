"""Real node processes on 127.0.0.1, each with its own SQLite file in a temporary folder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from nodes.hierarchy import NodeProcess, NodeSpec, local_specs, wire_and_seed


@dataclass
class Cluster:
    """Node processes started from specs; ``restart`` brings one back on the same port."""

    state: Path
    specs: dict[str, NodeSpec] = field(default_factory=dict)
    processes: dict[str, NodeProcess] = field(default_factory=dict)

    def start(self, spec: NodeSpec) -> str:
        config = self.state / f"{spec.name}.toml"
        config.write_text(spec.config_text(f"{spec.name}.sqlite3"), encoding="utf-8")
        process = NodeProcess(config, self.state / f"{spec.name}.log")
        address = process.start()
        # Pin the port a restart must come back on (the config asked for any free port).
        self.specs[spec.name] = replace(spec, port=int(address.rpartition(":")[2]))
        self.processes[spec.name] = process
        return address

    def address(self, name: str) -> str:
        return self.processes[name].address

    def kill(self, name: str) -> int:
        return self.processes[name].kill()

    def restart(self, name: str) -> str:
        spec = self.specs[name]
        config = self.state / f"{name}.toml"
        config.write_text(spec.config_text(f"{name}.sqlite3"), encoding="utf-8")
        process = NodeProcess(config, self.state / f"{name}.log")
        address = process.start()
        self.processes[name] = process
        return address

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.running:
                process.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def hierarchy(cluster: Cluster) -> Cluster:
    """The README's local hierarchy (top-level 88, secondary 88.100, enterprise 88.100.1), wired
    and seeded through the API exactly as ``idis-local`` does it."""
    for spec in local_specs(0):
        cluster.start(spec)
    asyncio.run(wire_and_seed({name: p.address for name, p in cluster.processes.items()}))
    return cluster
