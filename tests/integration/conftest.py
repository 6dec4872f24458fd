"""Real node processes on 127.0.0.1, each with its own SQLite file in a temporary folder, or
(``store_engine`` "postgresql") its own database on the run's throwaway PostgreSQL server.

A module runs its tests on both engines with
``pytestmark = pytest.mark.parametrize("store_engine", ENGINES)``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import requests

from bench.postgres_server import PostgresServer
from nodes.hierarchy import NodeProcess, NodeSpec, key_path, local_specs, wire_and_describe, wire_and_seed
from resolver.signing import Signer


@dataclass
class Cluster:
    """Node processes started from specs; ``restart`` brings one back on the same port."""

    state: Path
    specs: dict[str, NodeSpec] = field(default_factory=dict)
    processes: dict[str, NodeProcess] = field(default_factory=dict)
    postgres: PostgresServer | None = None
    """Where nodes store (a database each) when the test runs on PostgreSQL."""

    def placed(self, spec: NodeSpec) -> NodeSpec:
        """``spec`` storing on the test's engine: on PostgreSQL, in a database of its own."""
        if self.postgres is None or "storage" in spec.extra:
            return spec
        storage = {"engine": "postgresql", "dsn": self.postgres.create_database_now()}
        return replace(spec, extra={**spec.extra, "storage": storage})

    def start(self, spec: NodeSpec) -> str:
        spec = self.placed(spec)
        process = NodeProcess.of(spec, self.state)
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
        process = NodeProcess.of(self.specs[name], self.state)
        address = process.start()
        self.processes[name] = process
        return address

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.running:
                process.stop()


@pytest.fixture
def store_engine() -> str:
    """The engine the test's nodes store on: SQLite unless the module parametrises it."""
    return "sqlite"


@pytest.fixture
def cluster(tmp_path: Path, store_engine: str, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    postgres = request.getfixturevalue("postgres") if store_engine == "postgresql" else None
    c = Cluster(tmp_path, postgres=postgres)
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
    asyncio.run(wire_and_seed({name: p.server for name, p in cluster.processes.items()}))
    return cluster


ADMIN = "88.100.1/ADMIN"


@dataclass
class Local:
    """The hierarchy as ``idis-local`` starts it (HTTPS from the local CA, signed gRPC writes,
    administrators with secret keys), one per test module (the ``local`` fixture)."""

    state: Path
    endpoints: dict[str, dict[str, str]]
    processes: dict[str, NodeProcess]

    @property
    def ca(self) -> str:
        return str(self.ca_path)

    @property
    def ca_path(self) -> Path:
        return self.state / "tls" / "ca.pem"

    def base(self, node: str = "enterprise-1") -> str:
        return self.endpoints[node]["https"]

    def secret(self, identity: str = ADMIN) -> str:
        return (self.state / "keys" / (identity.replace("/", "_") + ".secret")).read_text().strip()

    def auth(self, identity: str = ADMIN, index: int = 301, secret: str | None = None) -> tuple[str, str]:
        """Basic credentials as pyhandle builds them: the user is percent-encoded index:handle."""
        return (f"{index}%3A{identity}", self.secret(identity) if secret is None else secret)

    def get(self, path: str, node: str = "enterprise-1", **kwargs: Any) -> requests.Response:
        return self.request("GET", path, node, **kwargs)

    def request(self, method: str, path: str, node: str = "enterprise-1", **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return requests.request(method, self.base(node) + path, verify=self.ca, **kwargs)

    def register(self, handle: str, values: list[dict[str, Any]]) -> None:
        """Creates (or replaces) ``handle`` with HSJ JSON ``values`` through the REST API, as the
        enterprise administrator with its secret key (HTTP Basic)."""
        body = json.dumps({"values": values})
        headers = {"Content-Type": "application/json"}
        response = self.request("PUT", f"/api/handles/{handle}", auth=self.auth(), data=body, headers=headers)
        assert response.status_code in (200, 201), response.text

    def signer(self) -> Signer:
        return Signer.from_file(ADMIN, key_path(self.state, ADMIN))

    def grpc(self, node: str = "enterprise-1") -> str:
        return self.endpoints[node]["grpc"]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Local]:
    state = tmp_path_factory.mktemp("local")
    processes: dict[str, NodeProcess] = {}
    try:
        top = local_specs(0, state)[0]
        processes[top.name] = NodeProcess.of(top, state)
        roots = [processes[top.name].start()]  # the others fetch their chains of delegations there
        for spec in local_specs(0, state, roots=roots)[1:]:
            processes[spec.name] = NodeProcess.of(spec, state)
            processes[spec.name].start()
        endpoints = wire_and_describe(processes, state)
        yield Local(state, endpoints, processes)
    finally:
        for process in processes.values():
            if process.running:
                process.stop()
