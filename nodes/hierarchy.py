"""idis-local: a whole local hierarchy on embedded SQLite, in the foreground.

Starts three node processes on 127.0.0.1 with their databases in a state folder:

    top-level   88          :2641   delegates 88.100 to the secondary node
    secondary   88.100      :2642   delegates 88.100.1 to the enterprise node, hosts 88.100.2
    enterprise  88.100.1    :2643

then wires the delegations through the PrefixAdmin API, seeds a few identifiers (idempotently),
prints the endpoints and examples, and runs until Ctrl-C, when it stops the nodes cleanly.
Data stays in the state folder across restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nodes.ready import read_ready
from nodes.trust.certificates import ensure_ca, issue
from nodes.trust.zone_keys import ZoneKeys
from resolver.attestation import anchor_text, keys_json
from resolver.channels import ChannelPool, ClientTLS
from resolver.errors import IdisError
from resolver.record import DEFAULT_SECRET_INDEX, SECKEY_TYPE, Value
from resolver.registrar import Registrar
from resolver.signing import Signer, generate_key, pubkey_value, public_key_der, save_private_key, write_private


@dataclass
class NodeSpec:
    name: str
    role: str
    apex: str
    port: int
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)

    def config_text(self, database: str = "") -> str:
        sections: dict[str, dict[str, Any]] = {
            "node": {"name": self.name, "role": self.role, "listen": f"127.0.0.1:{self.port}"},
            "authority": {"apexes": [self.apex] if self.apex else []},
            "storage": {"path": database or f"{self.name}.sqlite3"},
            # Plaintext and unsigned unless a spec says otherwise in ``extra`` (tests of other things).
            "auth": {"mode": "off"},
            "tls": {"mode": "off"},
        }
        for section, values in self.extra.items():
            sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
            lines.append("")
        return "\n".join(lines)


class NodeProcess:
    """A node running as a child process (``python -m nodes.main``), known by its ready line."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self.metrics_port = 0
        self.http_port = 0
        self.handle_port = 0
        self.worker_pids: list[int] = []
        self._log: IO[str] | None = None

    @property
    def server(self) -> str:
        """The node as a server of a delegated site: its gRPC address and its other interfaces
        (``resolver.site.parse_server``), so referrals name its Handle and HTTPS ports too."""
        extras = (("handle", self.handle_port), ("https", self.http_port))
        return self.address + "".join(f"+{name}:{port}" for name, port in extras if port)

    @classmethod
    def of(cls, spec: NodeSpec, state: Path) -> NodeProcess:
        """The process of ``spec``, its config (``NAME.toml``), database and log in ``state``;
        not started yet."""
        config = state / f"{spec.name}.toml"
        config.write_text(spec.config_text(f"{spec.name}.sqlite3"), encoding="utf-8")
        return cls(config, state / f"{spec.name}.log")

    def start(self) -> str:
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nodes.main", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.proc.stdout is not None
        event = read_ready(self.proc.stdout)
        if event is not None:
            self.address = str(event["address"])
            self.metrics_port = int(event.get("metrics_port") or 0)
            self.http_port = int(event.get("http_port") or 0)
            self.handle_port = int(event.get("handle_port") or 0)
            self.worker_pids = [int(p) for p in event.get("worker_pids") or []]
            return self.address
        code = self.proc.wait(timeout=5)
        raise RuntimeError(f"node {self.config.name} exited ({code}) before it was ready; see {self.log_path}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
        return code

    def stop(self) -> int:
        self.signal(signal.SIGTERM)
        return self.wait()

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return self.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


ADMINS = {"top-level": "88/ADMIN", "secondary-100": "88.100/ADMIN", "enterprise-1": "88.100.1/ADMIN"}


def key_path(state: Path, identity: str) -> Path:
    return state / "keys" / (identity.replace("/", "_") + ".pem")


SECRET_KEY_INDEX = DEFAULT_SECRET_INDEX
"""Where each administrator's HS_SECKEY lives (its HS_PUBKEY is at 300): Basic-auth clients
such as pyhandle log in as ``301:<identity>``."""


def secret_path(state: Path, identity: str) -> Path:
    return state / "keys" / (identity.replace("/", "_") + ".secret")


def ensure_secret(state: Path, identity: str) -> str:
    """The administrator's secret key for password clients, made on first start (owner-only)."""
    path = secret_path(state, identity)
    with contextlib.suppress(FileExistsError):
        write_private(path, (secrets.token_urlsafe(24) + "\n").encode(), exclusive=True)
    return path.read_text(encoding="utf-8").strip()


def ensure_admin(state: Path, identity: str) -> Signer:
    """The administrator's signer, its key made on first start (PEM, owner-only) with its
    public key next to it (.pub) for the node's [auth] trust."""
    path = key_path(state, identity)
    if not path.exists():
        key = generate_key()
        save_private_key(key, path)
        path.with_suffix(".pub").write_bytes(public_key_der(key))
    return Signer.from_file(identity, path)


ANCHOR_FILE = "trust-anchor.json"
"""The trust anchor of the local hierarchy (the top-level node's key for 88), in the state folder."""


def zone_keys_of(state: Path, name: str) -> ZoneKeys:
    """The zone keys of the node ``name`` of the local hierarchy."""
    return ZoneKeys(state / "zone-keys" / name)


def ensure_anchor(state: Path) -> Path:
    """The top-level node's key for 88 (made on first start) written as the trust anchor that
    every node and client of the local hierarchy validates with; its path."""
    keys = zone_keys_of(state, "top-level")
    now = int(time.time())
    keys.signing("88", now)
    path = state / ANCHOR_FILE
    text = anchor_text("88", keys.published("88", now))
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_private(path, text.encode())
    return path


def local_specs(
    base_port: int,
    state: Path | None = None,
    udp_rate_per_source: float | None = None,
    roots: list[str] | None = None,
) -> list[NodeSpec]:
    """The three nodes; with ``state``, each trusts its administrator's key (made on first start)
    and signs (verifiable resolution), fetching the chain down to its apex from ``roots`` (None:
    the top-level node at ``base_port``); ``udp_rate_per_source`` sets their ``[handle]`` budget
    (None: the default)."""

    def port(offset: int) -> int:
        return base_port + offset if base_port else 0

    def extra(offset: int, name: str) -> dict[str, dict[str, Any]]:
        # Prometheus endpoints at 9641-9643, the HTTP API at 8641-8643 and the Handle protocol
        # (UDP and TCP) at 2651-2653 next to gRPC at 2641-2643.
        out: dict[str, dict[str, Any]] = {
            "node": {
                "metrics_listen": f"127.0.0.1:{port(offset) + 7000 if base_port else 0}",
                "http_listen": f"127.0.0.1:{port(offset) + 6000 if base_port else 0}",
                "handle_listen": f"127.0.0.1:{port(offset) + 10 if base_port else 0}",
            }
        }
        if udp_rate_per_source is not None:
            out["handle"] = {"udp_rate_per_source": udp_rate_per_source}
        if state is not None:
            out["signing"] = {"enabled": True, "keys": f"zone-keys/{name}", "anchor": ANCHOR_FILE}
            if offset and (roots or base_port):  # where the chain down to its apex comes from
                out["signing"]["roots"] = roots or [f"127.0.0.1:{base_port}"]
            identity = ADMINS[name]
            ensure_admin(state, identity)
            pub = key_path(state, identity).with_suffix(".pub").relative_to(state)
            ensure_secret(state, identity)  # the trust anchor's secret for HTTP Basic, read by the node
            secret = secret_path(state, identity).relative_to(state)
            out["auth"] = {
                "mode": "required",
                "trust": [f"{identity}=file:{pub}"],
                "trust_secrets": [f"{identity}=file:{secret}"],
            }
            if offset and (roots or base_port):  # other administrators' keys and templates: resolved from the top
                out["auth"]["roots"] = roots or [f"127.0.0.1:{base_port}"]
            ca, ca_key = ensure_ca(state / "tls")
            cert, key = issue(state / "tls", name, ca, ca_key)
            out["tls"] = {
                "mode": "required",
                "cert": str(cert.relative_to(state)),
                "key": str(key.relative_to(state)),
                "ca": str(ca.relative_to(state)),
            }
        return out

    if state is not None:
        ensure_anchor(state)
    return [
        NodeSpec("top-level", "top-level", "88", port(0), extra(0, "top-level")),
        NodeSpec("secondary-100", "secondary", "88.100", port(1), extra(1, "secondary-100")),
        NodeSpec("enterprise-1", "enterprise", "88.100.1", port(2), extra(2, "enterprise-1")),
    ]


SEED: list[tuple[str, list[Value]]] = [
    (
        f"88.100.1/SN-{n:04d}",
        [
            Value(1, "URL", f"https://factory-1.example.com/products/SN-{n:04d}".encode()),
            Value(2, "PRODUCT_MODEL", b"MOTOR-X200"),
            Value(3, "MANUFACTURE_DATE", f"2026-11-{n:02d}".encode()),
        ],
    )
    for n in range(1, 4)
] + [
    (
        "88.100.2/PART-0001",
        [
            Value(1, "URL", b"https://supplier-2.example.com/parts/0001"),
            Value(2, "EMAIL", b"quality@supplier-2.example.com"),
        ],
    ),
]


async def wire_and_seed(
    addresses: dict[str, str],
    signers: dict[str, Signer] | None = None,
    tls: ClientTLS | None = None,
    secrets_of: dict[str, str] | None = None,
    zone_keys: dict[str, str] | None = None,
) -> None:
    """Delegations through the API (idempotent: re-pointing replaces the site), then the seed;
    ``zone_keys`` (node name -> its apex's keys, ``keys_json``) go with the delegations;
    ``addresses`` are the nodes' gRPC addresses, or their ``server`` forms (with their Handle and
    HTTPS ports, which the delegations then carry);
    each step signed by the administrator of the node it goes to, when ``signers`` are given.
    Each administrator's HS_PUBKEY is registered on its node too, so other nodes can resolve it,
    and with ``secrets_of`` (identity -> secret) its HS_SECKEY, set afresh on every start."""
    # A node is called at its gRPC address; a delegation names it with its other interfaces.
    servers = addresses
    addresses = {name: server.split("+", 1)[0] for name, server in servers.items()}
    top, secondary, enterprise = addresses["top-level"], addresses["secondary-100"], addresses["enterprise-1"]
    signer_of = {top: "top-level", secondary: "secondary-100", enterprise: "enterprise-1"}
    keys = {"secondary-100": "", "enterprise-1": "", **(zone_keys or {})}
    steps: list[tuple[str, Callable[[Registrar], Awaitable[object]]]] = [
        (top, lambda r: r.delegate_prefix("88.100", [servers["secondary-100"]], zone_keys=keys["secondary-100"])),
        (secondary, lambda r: r.delegate_prefix("88.100.1", [servers["enterprise-1"]], zone_keys=keys["enterprise-1"])),
        (secondary, lambda r: r.create_prefix("88.100.2")),
    ]
    if signers:

        def register_admin(signer: Signer) -> Callable[[Registrar], Awaitable[object]]:
            async def register(r: Registrar) -> None:
                await r.create(signer.identity, [pubkey_value(signer.key)])
                if secrets_of and signer.identity in secrets_of:
                    secret = Value(SECRET_KEY_INDEX, SECKEY_TYPE, secrets_of[signer.identity].encode())
                    await r.put_value(signer.identity, secret)  # afresh: the file may have changed

            return register

        for name, address in (("top-level", top), ("secondary-100", secondary), ("enterprise-1", enterprise)):
            steps.append((address, register_admin(signers[name])))
    for node, step in steps:
        registrar = Registrar(
            node=node, signer=signers[signer_of[node]] if signers else None, channels=ChannelPool(tls)
        )
        try:
            await step(registrar)
        finally:
            await registrar.close()
    for node, items in ((enterprise, SEED[:3]), (secondary, SEED[3:])):
        registrar = Registrar(
            node=node, signer=signers[signer_of[node]] if signers else None, channels=ChannelPool(tls)
        )
        try:
            for outcome in await registrar.batch_create(items):
                if outcome.error is not None:
                    raise outcome.error
        finally:
            await registrar.close()


def wire_and_describe(processes: dict[str, NodeProcess], state: Path) -> dict[str, dict[str, str]]:
    """Wires and seeds the running nodes (signed by their administrators, with their secret
    keys set), writes ``state/endpoints.json`` and returns what it holds."""
    addresses = {name: p.server for name, p in processes.items()}
    signers = {name: ensure_admin(state, identity) for name, identity in ADMINS.items()}
    secrets_of = {identity: ensure_secret(state, identity) for identity in ADMINS.values()}
    now = int(time.time())
    zone_keys = {
        name: keys_json(zone_keys_of(state, name).published(apex, now))
        for name, apex in (("secondary-100", "88.100"), ("enterprise-1", "88.100.1"))
    }
    asyncio.run(wire_and_seed(addresses, signers, ClientTLS(state / "tls" / "ca.pem"), secrets_of, zone_keys))
    endpoints = {name: endpoints_of(p) for name, p in processes.items()}
    (state / "endpoints.json").write_text(json.dumps(endpoints, indent=2), encoding="utf-8")
    return endpoints


def endpoints_of(process: NodeProcess) -> dict[str, str]:
    """Every interface of a running node, as ``state/endpoints.json`` lists them."""
    host = process.address.rpartition(":")[0]
    out = {"grpc": process.address}
    if process.http_port:
        out["https"] = f"https://{host}:{process.http_port}"
    if process.handle_port:
        out["handle"] = f"{host}:{process.handle_port}"
    if process.metrics_port:
        out["metrics"] = f"http://{host}:{process.metrics_port}/metrics"
    return out


def banner(endpoints: dict[str, dict[str, str]], state: Path) -> str:
    addresses = {name: e["grpc"] for name, e in endpoints.items()}
    https = {name: e.get("https", "-") for name, e in endpoints.items()}
    handle = {name: e.get("handle", "-") for name, e in endpoints.items()}
    top = addresses["top-level"]
    root = "" if top == "127.0.0.1:2641" else f" --root {top}"
    handle_root = "" if handle["top-level"] == "127.0.0.1:2651" else f" --root {handle['top-level']}"
    keys = "\n".join(f"  {identity:<16} {key_path(state, identity)}" for identity in ADMINS.values())
    return f"""
Local identifier hierarchy is up (state in {state}/):

  top-level   88        gRPC {addresses["top-level"]}   Handle {handle["top-level"]}   {https["top-level"]}
  secondary   88.100    gRPC {addresses["secondary-100"]}   Handle {handle["secondary-100"]}   {https["secondary-100"]}
  enterprise  88.100.1  gRPC {addresses["enterprise-1"]}   Handle {handle["enterprise-1"]}   {https["enterprise-1"]}
  (the secondary also hosts 88.100.2 itself; Handle = the Handle protocol, UDP and TCP)

Every interface of every node is in {state}/endpoints.json. In a browser (trust {state}/tls/ca.pem),
any node's page resolves any identifier through the hierarchy:

  {https["top-level"]}/88.100.1/SN-0001?noredirect

Writes must be signed. Administrators' keys (made on first start) are in {state}/keys/:
{keys}
Each also has a secret key there (<identity>.secret, HS_SECKEY at index {SECRET_KEY_INDEX}) for
password clients of the HANDLE.NET REST API, such as pyhandle or curl:

  curl --cacert {state}/tls/ca.pem {https["enterprise-1"]}/api/handles/88.100.1/SN-0001
  curl --cacert {state}/tls/ca.pem -u "{SECRET_KEY_INDEX}%3A88.100.1/ADMIN:$(cat {state}/keys/88.100.1_ADMIN.secret)" \\
       -X PUT -H 'Content-Type: application/json' \\
       -d '{{"values":[{{"index":1,"type":"URL","data":"https://f1.example.com/p/7"}}]}}' \\
       {https["enterprise-1"]}/api/handles/88.100.1/SN-0007

Try, from another terminal (after `. .venv/bin/activate`):

  export IDIS_CA={state}/tls/ca.pem   # every node speaks TLS, certificates from a local CA

  idis resolve{root} 88.100.1/SN-0001 --trace
  idis resolve{root} 88.100.1/SN-0001 --repeat 2 --trace     # second answer from the cache
  idis resolve{handle_root} 88.100.1/SN-0001 --protocol handle-udp --trace   # the Handle way: 0.NA/ lookups
  export IDIS_IDENTITY=88.100.1/ADMIN IDIS_KEY={state}/keys/88.100.1_ADMIN.pem
  idis register{root} 88.100.1/SN-0100 --value URL=https://f1.example.com/p/100 --value 2:EMAIL=ops@f1.example.com
  idis resolve{root} 88.100.1/SN-0100 --json
  idis prefix list{root}

Ctrl-C stops the nodes; the data stays.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="idis-local", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--state-dir", type=Path, default=Path("state"), help="where databases and logs live")
    parser.add_argument("--base-port", type=int, default=2641, help="top-level port; the others follow (0: any)")
    parser.add_argument("--exit-after-start", action="store_true", help="start, wire, seed, then stop (a check)")
    parser.add_argument(
        "--udp-rate-per-source",
        type=float,
        help="UDP answers a second each source may get from a node's Handle port ([handle]; 0: unlimited, for"
        " load tests; default 2000)",
    )
    args = parser.parse_args(argv)
    state: Path = args.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)

    processes: dict[str, NodeProcess] = {}
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        for spec in local_specs(args.base_port, state, args.udp_rate_per_source):
            process = NodeProcess.of(spec, state)
            processes[spec.name] = process
            print(f"starting {spec.name} ...", flush=True)
            process.start()
        print(banner(wire_and_describe(processes, state), state), flush=True)
        while not interrupted and not args.exit_after_start:
            dead = [name for name, p in processes.items() if not p.running]
            if dead:
                print(f"node {dead[0]} stopped unexpectedly; see {state / (dead[0] + '.log')}", file=sys.stderr)
                code = 1
                break
            time.sleep(0.5)
    except (RuntimeError, OSError, IdisError) as exc:
        print(f"idis-local: {exc}", file=sys.stderr)
        code = 1
    finally:
        print("stopping nodes ...", flush=True)
        for p in processes.values():
            p.signal(signal.SIGTERM)
        for p in processes.values():
            if p.proc is not None:
                p.wait()
    sys.exit(code)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
