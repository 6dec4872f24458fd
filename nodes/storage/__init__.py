"""Durable storage: one contract (``Store``, ``Transaction``), two engines.

- ``nodes.storage.sqlite``: one embedded SQLite file, the default (``make run``).
- ``nodes.storage.postgres``: PostgreSQL through asyncpg, for sites of several servers and
  failover (``[storage] engine = "postgresql"``).

Both run the same statements (``nodes.storage.transaction``) and pass one test suite."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nodes.storage.rows import (
    AttestationRow,
    PrefixRow,
    RecordRow,
    StoreUnavailable,
    prefix_of_key,
    range_of_prefix,
)
from nodes.storage.store import Store
from nodes.storage.transaction import Transaction

if TYPE_CHECKING:
    from nodes.config import NodeConfig

__all__ = [
    "AttestationRow",
    "PrefixRow",
    "RecordRow",
    "Store",
    "StoreUnavailable",
    "Transaction",
    "open_store",
    "prefix_of_key",
    "range_of_prefix",
]


async def open_store(config: NodeConfig, synchronous: str = "") -> Store:
    """The store a node's ``[storage]`` section names, open (``synchronous``: SQLite's setting
    instead of the config's, for an offline loader)."""
    section = config.storage
    if section.engine == "postgresql":
        from nodes.storage.postgres import PostgresStore  # asyncpg only where it is used

        return await PostgresStore.open(section.dsn, readers=section.readers, read_from=section.read_from)
    from nodes.storage.sqlite import SqliteStore

    return await SqliteStore.open(
        config.database_path, synchronous=synchronous or section.synchronous, readers=section.readers
    )
