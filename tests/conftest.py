"""Suite-wide guards.

A test that leaves a non-daemon thread running (an aiosqlite connection never closed, a thread
pool never shut down) would keep the interpreter from exiting after the last test: the run
hangs instead of failing. The autouse fixture fails the test that leaked such a thread, naming
it; the session hook makes sure a leak that slipped past it still ends the run, with a failure.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.postgres_server import PostgresServer
from nodes.storage import Store
from nodes.storage.postgres import PostgresStore
from nodes.storage.sqlite import SqliteStore
from tests.engines import ENGINES, Opener

THREAD_GRACE_SECONDS = 10.0
"""How long a thread that was told to stop may take to end."""


def _running(threads: set[threading.Thread]) -> list[threading.Thread]:
    """The non-daemon threads of ``threads`` still running after the grace period."""
    left = [t for t in threads if not t.daemon and t is not threading.main_thread()]
    for thread in left:
        thread.join(timeout=THREAD_GRACE_SECONDS)
    return [t for t in left if t.is_alive()]


def _describe(threads: list[threading.Thread]) -> str:
    frames = sys._current_frames()
    parts = []
    for thread in threads:
        frame = frames.get(thread.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
        parts.append(f"thread {thread.name!r}, started by the test and still running:\n{stack}")
    return "\n".join(parts)


@pytest.fixture(autouse=True)
def no_thread_left_running() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    left = _running(set(threading.enumerate()) - before)
    if left:
        pytest.fail(
            "the test left non-daemon threads running (an unclosed store or pool?); "
            "the process could not exit:\n" + _describe(left),
            pytrace=False,
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    left = _running(set(threading.enumerate()))
    children = [c for c in multiprocessing.active_children() if not c.daemon]
    for child in children:
        child.join(timeout=THREAD_GRACE_SECONDS)
    children = [c for c in children if c.is_alive()]
    if left or children:
        if left:
            sys.stderr.write("\nnon-daemon threads still running at the end of the run:\n" + _describe(left))
        for child in children:
            sys.stderr.write(f"\nchild process {child.name!r} (pid {child.pid}) still running at the end of the run\n")
        sys.stderr.flush()
        os._exit(3)  # they would block interpreter exit forever: fail instead of hanging


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole run, started when a test first needs it."""
    cluster = PostgresServer()
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Each store test runs on both engines."""
    return str(request.param)


@pytest.fixture
def open_store(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> Opener:
    """Opens a store of the test's engine, on a fresh file or a fresh database (the same one
    each call: a second call reopens what the first wrote)."""
    place: list[str] = []

    async def opened() -> Store:
        if engine == "sqlite":
            return await SqliteStore.open(tmp_path / "n.sqlite3")
        server: PostgresServer = request.getfixturevalue("postgres")
        if not place:
            place.append(await server.create_database())
        return await PostgresStore.open(place[0])

    return opened
