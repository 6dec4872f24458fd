"""The store engines the suites run on: every store test, and the integration tests that say so,
run once per engine (the ``engine`` and ``open_store`` fixtures of tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nodes.storage import Store

ENGINES = ("sqlite", "postgresql")

Opener = Callable[[], Awaitable[Store]]
"""Opens a store of the test's engine: a fresh one the first time, the same one after."""
