"""deploy/ run for real: a node from every deploy/config/*.toml, probed exactly as the Kubernetes
manifests and the Dockerfile declare it.

There is no container engine here, so each config runs as a local process with only what a
container would provide rewritten: its paths moved into a temporary folder (database, TLS files
made with the local CA) and its ports to free ones on 127.0.0.1. A probe's declared port is
translated to the port the node really got; everything else (path, named port, timeout, the
health-check command and its interpreter) is taken from the manifest or the Dockerfile as written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.postgres_server import PostgresServer
from nodes.config import parse_config
from nodes.hierarchy import NodeProcess
from nodes.trust.certificates import ensure_ca, issue
from resolver.wire import resolution_pb2, resolution_pb2_grpc
from tests.unit.test_deploy import CONFIGS, DEPLOY, workloads

BOUND = 30.0  # seconds any awaited state may take before the test gives up


@dataclass
class DeployedNode:
    """A node started from a deploy config, and how its deployed ports map to this machine's."""

    process: NodeProcess
    ports: dict[int, int]  # port in the config (and so in the manifests) -> port on 127.0.0.1
    ca: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_text(document: dict[str, dict[str, Any]]) -> str:
    """The config's tables as TOML: their values (strings, numbers, booleans, lists of strings)
    are spelt the same in JSON."""
    lines: list[str] = []
    for table, values in document.items():
        lines += [f"[{table}]", *(f"{key} = {json.dumps(value)}" for key, value in values.items()), ""]
    text = "\n".join(lines)
    assert tomllib.loads(text) == document
    return text


def deploy(config: Path, state: Path, postgres: PostgresServer | None = None) -> DeployedNode:
    """Starts a node from ``config`` with its paths under ``state`` and free ports on 127.0.0.1
    (and, for a config on PostgreSQL, its DSN a database of ``postgres``)."""
    document = tomllib.loads(config.read_text())
    shipped = parse_config(document, base_dir=config.parent)
    node, ports = document["node"], {}
    for address in ("listen", "metrics_listen"):  # one metrics port, however many workers the node runs
        declared = int(node[address].rpartition(":")[2])
        ports[declared] = free_port()
        node[address] = f"127.0.0.1:{ports[declared]}"
    document.setdefault("storage", {})["path"] = str(state / shipped.database_path.name)
    if shipped.storage.engine == "postgresql":
        assert postgres is not None, f"{config.name} stores on PostgreSQL: give it a server"
        document["storage"]["dsn"] = postgres.create_database_now()
    ca = state / "tls" / "ca.pem"
    if shipped.tls.mode == "required":
        ca, ca_key = ensure_ca(state / "tls")
        cert, key = issue(state / "tls", "node", ca, ca_key)
        document.setdefault("tls", {}).update(cert=str(cert), key=str(key), ca=str(ca))
    deployed = state / config.name
    deployed.write_text(toml_text(document), encoding="utf-8")
    process = NodeProcess(deployed, state / f"{config.stem}.log")
    process.start()
    return DeployedNode(process, ports, ca)


@pytest.fixture(params=CONFIGS, ids=lambda p: p.name)
def deployed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, DeployedNode]]:
    config: Path = request.param
    on_postgresql = tomllib.loads(config.read_text()).get("storage", {}).get("engine") == "postgresql"
    node = deploy(config, tmp_path, request.getfixturevalue("postgres") if on_postgresql else None)
    try:
        yield config, node
    finally:
        if node.process.running:
            node.process.stop()


# -- probes as their declarations say -------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    where: str  # e.g. "idis-secondary readinessProbe"
    kind: str  # startupProbe, readinessProbe, livenessProbe
    spec: dict[str, Any]
    container: dict[str, Any]


def kubernetes_probes(config: Path) -> list[Probe]:
    """The probes of every workload that runs ``config``."""
    probes = []
    for w in workloads():
        (container,) = w["spec"]["template"]["spec"]["containers"]
        if Path(container["args"][container["args"].index("--config") + 1]).name != config.name:
            continue
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in container:
                probes.append(Probe(f"{w['metadata']['name']} {kind}", kind, container[kind], container))
    return probes


def http_get(probe: Probe, ports: dict[int, int]) -> int | None:
    """The kubelet's httpGet: the HTTP status, or None when nothing answered in time."""
    action = probe.spec["httpGet"]
    port = action["port"]
    if isinstance(port, str):  # a named container port
        port = {p["name"]: p["containerPort"] for p in probe.container["ports"]}[port]
    url = f"{action.get('scheme', 'HTTP').lower()}://127.0.0.1:{ports[int(port)]}{action.get('path', '/')}"
    headers = {h["name"]: h["value"] for h in action.get("httpHeaders", [])}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=probe.spec.get("timeoutSeconds", 1)
        ) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        return refused.code
    except OSError:
        return None


def on_this_machine(argument: str, ports: dict[int, int]) -> str:
    """A command-line argument with the container's loopback ports translated."""
    return re.sub(
        r"\b(127\.0\.0\.1|localhost):(\d+)\b",
        lambda m: f"127.0.0.1:{ports.get(int(m[2]), int(m[2]))}",
        argument,
    )


def run_command(argv: list[str], ports: dict[int, int], timeout: float) -> int | None:
    """An exec probe or a health-check command: its exit status, None when it ran out of time.
    PATH starts with this venv's bin, as the image's starts with /opt/idis/.venv/bin."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        done = subprocess.run(
            [on_this_machine(a, ports) for a in argv], env=env, timeout=timeout, capture_output=True, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    return done.returncode


def passes(probe: Probe, ports: dict[int, int]) -> bool:
    if "httpGet" in probe.spec:
        status = http_get(probe, ports)
        return status is not None and 200 <= status < 400
    if "exec" in probe.spec:
        return run_command(probe.spec["exec"]["command"], ports, probe.spec.get("timeoutSeconds", 1)) == 0
    if "grpc" in probe.spec:  # the kubelet's own gRPC probe: grpc.health.v1 over plaintext
        action = probe.spec["grpc"]
        with grpc.insecure_channel(f"127.0.0.1:{ports[int(action['port'])]}") as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=action.get("service", "")),
                    timeout=probe.spec.get("timeoutSeconds", 1),
                )
            except grpc.RpcError:
                return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
    raise AssertionError(f"{probe.where}: a probe this test cannot run as declared: {sorted(probe.spec)}")


@dataclass(frozen=True)
class HealthCheck:
    argv: list[str]
    timeout: float


def dockerfile_health_check() -> HealthCheck:
    text = (DEPLOY / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("HEALTHCHECK ")]
    options, _, command = line.partition(" CMD ")
    timeout = re.search(r"--timeout=(\d+)s", options)
    try:
        argv = json.loads(command)  # the exec form
    except json.JSONDecodeError:
        argv = ["/bin/sh", "-c", command.strip()]  # the shell form
    return HealthCheck(argv, float(timeout[1]) if timeout else 30.0)


def eventually(check: Callable[[], bool]) -> bool:
    """Whether ``check`` holds within BOUND seconds, as a supervisor retries a probe."""
    deadline = time.monotonic() + BOUND
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def status_once(probe: Probe, ports: dict[int, int], settled: Callable[[int | None], bool]) -> int | None:
    """The probe's HTTP status once ``settled`` holds for it (or the last one after BOUND seconds)."""
    deadline = time.monotonic() + BOUND
    status = http_get(probe, ports)
    while not settled(status) and time.monotonic() < deadline:
        time.sleep(0.1)
        status = http_get(probe, ports)
    return status


# -- the tests ---------------------------------------------------------------------------------


def test_every_config_is_run_by_a_workload_with_readiness_and_liveness_probes() -> None:
    for config in CONFIGS:
        kinds = {probe.kind for probe in kubernetes_probes(config)}
        assert {"readinessProbe", "livenessProbe"} <= kinds, config.name


def test_every_declared_probe_passes_on_a_node_started_from_the_config(deployed: tuple[Path, DeployedNode]) -> None:
    config, node = deployed
    probes = kubernetes_probes(config)
    assert probes
    for probe in probes:
        assert eventually(partial(passes, probe, node.ports)), f"{probe.where} never passed"
    check = dockerfile_health_check()
    assert eventually(lambda: run_command(check.argv, node.ports, check.timeout) == 0), "Dockerfile HEALTHCHECK"
    assert node.process.stop() == 0


# -- while draining --------------------------------------------------------------------------


class HeldStream:
    """A ResolveStream call left open after its first answer: a draining node waits for it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.released = threading.Event()
        self.responses = iter(resolution_pb2_grpc.ResolutionStub(channel).ResolveStream(self._requests()))
        next(self.responses)  # the node has the call

    def _requests(self) -> Iterator[resolution_pb2.ResolveBatchRequest]:
        yield resolution_pb2.ResolveBatchRequest(requests=[resolution_pb2.ResolveRequest(identifier="99.1/PROBE")])
        self.released.wait(BOUND)

    def release(self) -> None:
        self.released.set()
        for _ in self.responses:
            pass


def test_readiness_fails_with_503_while_the_node_drains(deployed: tuple[Path, DeployedNode]) -> None:
    config, node = deployed
    probes = kubernetes_probes(config)
    readiness = [p for p in probes if p.kind == "readinessProbe"]
    liveness = [p for p in probes if p.kind == "livenessProbe"]
    assert readiness and liveness
    assert eventually(lambda: all(passes(p, node.ports) for p in readiness))
    # Whichever worker takes the stream keeps the node draining (a node of several workers is
    # ready only when all are, and its supervisor answers the probes until the last has stopped).
    credentials = grpc.ssl_channel_credentials(root_certificates=node.ca.read_bytes())
    channel = grpc.secure_channel(node.process.address, credentials)
    stream = HeldStream(channel)
    try:
        node.process.signal(signal.SIGTERM)  # health goes NOT_SERVING; the held call keeps it draining
        for probe in readiness:
            assert status_once(probe, node.ports, lambda status: status != 200) == 503, probe.where
        for probe in liveness:  # draining is not dying: no restart
            assert passes(probe, node.ports), probe.where
        check = dockerfile_health_check()
        assert run_command(check.argv, node.ports, check.timeout) == 1  # Docker's "unhealthy"
    finally:
        stream.release()
        channel.close()
    assert node.process.wait() == 0
