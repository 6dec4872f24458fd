"""The Wuhan dataset loaded offline and through the API gives the same stored data."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nodes.config import load_config
from nodes.hierarchy import NodeSpec
from nodes.storage import open_store
from resolver.wire import decode_record
from tests.engines import ENGINES
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.parametrize("store_engine", ENGINES)

TOTAL = 6000  # the whole model; the part under 88.101 is what each node gets


async def stored(config: Path) -> tuple[dict[str, tuple[int, object]], dict[str, int]]:
    """Every identifier's version and values (timestamps aside), and the identifier counts, of
    the store a node's config names (either engine)."""
    store = await open_store(load_config(config))
    try:
        rows = await store._read("SELECT key, version, record FROM identifiers", ())
        records: dict[str, tuple[int, object]] = {}
        for (key, version, _), wire in zip(rows, await store.decode_many([r[2] for r in rows]), strict=True):
            record = decode_record(wire)
            values = tuple((v.index, v.type, v.data, v.ttl, int(v.permissions)) for v in record.values)
            records[key] = (version, (str(record.identifier), values))
        counts = {p.key: p.identifier_count for p in await store.prefixes() if p.kind == 1}
    finally:
        await store.close()
    return records, counts


def wuhan(*args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.wuhan", *args], capture_output=True, text=True, timeout=300, check=True
    )
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_offline_import_and_api_load_store_the_same_data(cluster: Cluster, tmp_path: Path) -> None:
    offline = cluster.placed(NodeSpec("offline", "secondary", "88.101", 0))
    (cluster.state / "offline.toml").write_text(offline.config_text())
    imported = wuhan(
        "import", "--config", str(cluster.state / "offline.toml"), "--registrations", str(TOTAL), "--processes", "1"
    )
    online = cluster.start(NodeSpec("online", "secondary", "88.101", 0))
    loaded = wuhan("load", "--target", online, "--apex", "88.101", "--registrations", str(TOTAL))
    assert imported["registrations"] == loaded["registrations"] and loaded["failed"] == 0
    assert int(str(imported["registrations"])) > 500
    cluster.processes["online"].stop()
    a_records, a_counts = asyncio.run(stored(cluster.state / "offline.toml"))
    b_records, b_counts = asyncio.run(stored(cluster.state / "online.toml"))
    assert a_records == b_records
    assert {k: v for k, v in a_counts.items() if v} == {k: v for k, v in b_counts.items() if v}
    # The imported node serves what was imported.
    address = cluster.start(offline)
    some_key = next(iter(a_records))

    async def resolve() -> str:
        from resolver.resolver import Resolver

        async with Resolver([address]) as resolver:
            return str((await resolver.resolve(some_key)).identifier)

    assert asyncio.run(resolve()) == some_key
