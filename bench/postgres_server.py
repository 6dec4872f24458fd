"""Throwaway PostgreSQL servers on loopback, for the tests and the benchmarks: ``initdb`` into a
folder of their own, ``pg_ctl`` to start and stop, a database for each test or node.

The server binaries are Debian's (package postgresql, which ``.ci/run`` installs when they are
missing); the tests fail, never skip, without them. PostgreSQL refuses to run as root: as root,
the cluster runs as the ``postgres`` user the package creates."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import asyncpg

SERVER_USER = "postgres"


def server_binaries() -> Path:
    """The folder of initdb and pg_ctl (the newest installed PostgreSQL)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL's server is not installed (Debian package postgresql; .ci/run installs it)")
    return Path(initdb).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL server in a folder of its own, on 127.0.0.1."""

    def __init__(self, directory: Path | None = None, port: int = 0, *, fsync: bool = False) -> None:
        self.directory = directory or Path(tempfile.mkdtemp(prefix="idis-pg-"))
        self.data = self.directory / "data"
        self.port = port or free_port()
        self.fsync = fsync
        self.bin = server_binaries()
        self._names = itertools.count(1)
        self._as_server = os.geteuid() == 0
        if self._as_server:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        os.chmod(self.directory, 0o755)

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin / command[0]), *command[1:]]
        if self._as_server:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120)

    def init(self, **settings: str) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "idis", "--auth=trust", "--no-sync", "-E", "UTF8")
        lines = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.directory}'",
            f"fsync = {'on' if self.fsync else 'off'}",
            "max_connections = 200",
            "shared_buffers = '64MB'",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n" + "\n".join(lines) + "\n")

    def follow(self, primary: PostgresServer) -> None:
        """Makes this server a streaming standby of ``primary`` (a base backup of it, then
        replaying its WAL as it comes): ``start`` it next."""
        source = ["-h", "127.0.0.1", "-p", str(primary.port), "-U", "idis"]
        self._run("pg_basebackup", *source, "-D", str(self.data), "-R", "-X", "stream", "--checkpoint=fast")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nunix_socket_directories = '{self.directory}'\n")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://idis@127.0.0.1:{self.port}/{database}"

    async def create_database(self, name: str = "") -> str:
        """A new empty database; its DSN."""
        name = name or f"t{next(self._names)}"
        connection = await asyncpg.connect(self.dsn())
        try:
            await connection.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")
        finally:
            await connection.close()
        return self.dsn(name)

    def create_database_now(self, name: str = "") -> str:
        """``create_database`` for code outside any event loop (or inside one, in a thread)."""
        name = name or f"n{next(self._names)}"
        subprocess.run(
            [
                str(self.bin / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "idis",
                "-T",
                "template0",
                name,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return self.dsn(name)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "server.log").read_text()
        return ""
