"""A throwaway highly available PostgreSQL on loopback, from the shipped Patroni config.

One etcd (``deploy/postgresql/etcd.env``) and two Patroni members (Debian packages etcd-server
and patroni, which ``.ci/run`` installs when missing) run ``deploy/postgresql/patroni.yml`` as
shipped, with only what a machine of their own would differ in rewritten: names, addresses and
ports (free ones on 127.0.0.1), paths (a temporary folder), the network the pg_hba rules admit
(127.0.0.1/32) and memory sizes. As root, they run as the ``postgres`` user (PostgreSQL refuses
root), each in a session of its own.

``kill`` is a machine's death: Patroni and its PostgreSQL are SIGKILLed together (Patroni starts
PostgreSQL in a session of its own, so killing Patroni alone would leave a primary running)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bench.postgres_server import free_port

SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "postgresql" / "patroni.yml"
ETCD_SHIPPED = SHIPPED.with_name("etcd.env")
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
"""The packaged tools run on the system's Python: nothing of this process's environment."""
USER = "postgres"

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"no {what} after {timeout} s")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        return refused.code
    except OSError:
        return 0


class PatroniCluster:
    """etcd and two Patroni members; ``start`` returns once there is a leader and a synchronous
    standby."""

    def __init__(self, members: tuple[str, ...] = ("pg1", "pg2")) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="idis-ha-"))
        self.as_root = os.geteuid() == 0
        """As root, everything runs as the ``postgres`` user (PostgreSQL refuses root)."""
        self._own(self.base)
        self.etcd_port, self.etcd_peer = free_port(), free_port()
        self.members = {name: {"rest": free_port(), "pg": free_port()} for name in members}
        self.shipped: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def password(self) -> str:
        return str(self.shipped["postgresql"]["authentication"]["superuser"]["password"])

    def dsn(self, database: str = "postgres", member: str = "") -> str:
        """The superuser's DSN: one member's, or every member's (a multi-host DSN)."""
        names = [member] if member else list(self.members)
        hosts = ",".join(f"127.0.0.1:{self.members[n]['pg']}" for n in names)
        return f"postgresql://postgres:{self.password}@{hosts}/{database}"

    def config_of(self, name: str) -> dict[str, Any]:
        """The shipped config, as it would be on member ``name``'s machine."""
        config: dict[str, Any] = json.loads(json.dumps(self.shipped))
        ports, where = self.members[name], str(self.base / name)
        config["name"] = name
        config["log"]["dir"] = f"{where}-log"
        config["restapi"]["listen"] = config["restapi"]["connect_address"] = f"127.0.0.1:{ports['rest']}"
        config["etcd3"]["hosts"] = f"127.0.0.1:{self.etcd_port}"
        pg = config["postgresql"]
        pg["listen"] = pg["connect_address"] = f"127.0.0.1:{ports['pg']}"
        pg["data_dir"], pg["pgpass"] = f"{where}-data", f"{where}.pgpass"
        pg.setdefault("parameters", {})["unix_socket_directories"] = str(self.base)
        pg["pg_hba"] = [rule.replace("10.0.0.0/24", "127.0.0.1/32") for rule in pg["pg_hba"]]
        small = {"shared_buffers": "32MB", "max_connections": 100, "wal_keep_size": "64MB"}  # a test machine's
        config["bootstrap"]["dcs"]["postgresql"]["parameters"].update(small)
        return config

    def _own(self, path: Path) -> None:
        if self.as_root:
            shutil.chown(path, USER, USER)

    def etcd_env(self) -> dict[str, str]:
        """The shipped etcd settings (deploy/postgresql/etcd.env), as a one-member etcd here."""
        settings = dict(
            line.split("=", 1) for line in ETCD_SHIPPED.read_text().splitlines() if line and not line.startswith("#")
        )
        here = {"10.0.0.11:2379": f"127.0.0.1:{self.etcd_port}", "10.0.0.11:2380": f"127.0.0.1:{self.etcd_peer}"}
        for key, value in settings.items():
            for shipped, local in here.items():
                value = value.replace(shipped, local)
            settings[key] = value
        settings["ETCD_INITIAL_CLUSTER"] = f"{settings['ETCD_NAME']}=http://127.0.0.1:{self.etcd_peer}"
        settings["ETCD_DATA_DIR"] = str(self.base / "etcd")
        return settings

    def _spawn(self, key: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.base / f"{key}.out", "ab") as log:
            self.procs[key] = subprocess.Popen(
                argv,
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(CLEAN_ENV, HOME=str(self.base), **(env or {})),
                user=USER if self.as_root else None,
                group=USER if self.as_root else None,
                extra_groups=[] if self.as_root else None,
                start_new_session=True,
            )

    def start(self, timeout: float = 90) -> PatroniCluster:
        self._spawn("etcd", ["/usr/bin/etcd", "--logger", "zap", "--log-level", "warn"], self.etcd_env())
        wait_for(lambda: http_status(f"http://127.0.0.1:{self.etcd_port}/health") == 200, 30, "healthy etcd")
        for name in self.members:
            self.start_member(name)
        wait_for(self.leader, timeout, "leader")
        wait_for(self.sync_standby, timeout, "synchronous standby")
        return self

    def start_member(self, name: str) -> None:
        path = self.base / f"{name}.yml"
        if not path.exists():
            path.write_text(yaml.safe_dump(self.config_of(name)))
            (self.base / f"{name}-log").mkdir()
            for made in (path, self.base / f"{name}-log"):
                self._own(made)
        self._spawn(name, ["/usr/bin/patroni", str(path)])

    def rest(self, name: str, path: str) -> int:
        return http_status(f"http://127.0.0.1:{self.members[name]['rest']}{path}")

    def leader(self) -> str | None:
        return next((n for n in self.members if n in self.procs and self.rest(n, "/leader") == 200), None)

    def sync_standby(self) -> str | None:
        return next((n for n in self.members if n in self.procs and self.rest(n, "/sync") == 200), None)

    def postmaster(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.base / f"{name}-data" / "postmaster.pid").read_text().split("\n", 1)[0])
        return None

    def kill(self, name: str) -> None:
        """Member ``name``'s machine dies: Patroni and its PostgreSQL, SIGKILLed at once."""
        postmaster = self.postmaster(name)
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        if postmaster:
            with contextlib.suppress(ProcessLookupError):
                os.kill(postmaster, signal.SIGKILL)
        proc.wait(10)

    def logs(self, lines: int = 40) -> str:
        """The last lines of what etcd, Patroni and PostgreSQL wrote (to explain a failure)."""
        parts = []
        for path in sorted([*self.base.glob("*.out"), *self.base.glob("*-log/*"), *self.base.glob("*-data/log/*")]):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        members = [n for n in self.procs if n != "etcd"]
        for name in members:
            self.procs[name].send_signal(signal.SIGTERM)  # Patroni stops its PostgreSQL
        for name in members:
            try:
                self.procs[name].wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.procs[name].pid, signal.SIGKILL)
                self.procs[name].wait(5)
        for name in self.members:  # a PostgreSQL whose Patroni was killed
            postmaster = self.postmaster(name)
            if postmaster:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(postmaster, signal.SIGKILL)
        etcd = self.procs.get("etcd")
        if etcd is not None:
            etcd.terminate()
            try:
                etcd.wait(10)
            except subprocess.TimeoutExpired:
                etcd.kill()
                etcd.wait(5)
        self.procs.clear()
        shutil.rmtree(self.base, ignore_errors=True)
