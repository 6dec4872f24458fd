"""The Wuhan dataset loaded offline and through the API gives the same stored data."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from nodes.compression import RecordCompression
from nodes.hierarchy import NodeSpec
from resolver.wire import decode_record
from tests.integration.conftest import Cluster

TOTAL = 6000  # the whole model; the part under 88.101 is what each node gets


def stored(database: Path) -> tuple[dict[str, tuple[int, object]], dict[str, int]]:
    """Every identifier's version and values (timestamps aside), and the identifier counts."""
    compression = RecordCompression()
    with sqlite3.connect(database) as db:
        for dictionary_id, data in db.execute("SELECT id, data FROM dictionaries"):
            compression.add(dictionary_id, data)
        records: dict[str, tuple[int, object]] = {}
        for key, version, blob in db.execute("SELECT key, version, record FROM identifiers"):
            record = decode_record(compression.decode(blob))
            values = tuple((v.index, v.type, v.data, v.ttl, int(v.permissions)) for v in record.values)
            records[key] = (version, (str(record.identifier), values))
        counts = dict(db.execute("SELECT key, identifier_count FROM prefixes WHERE kind = 1"))
    return records, counts


def wuhan(*args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.wuhan", *args], capture_output=True, text=True, timeout=300, check=True
    )
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_offline_import_and_api_load_store_the_same_data(cluster: Cluster, tmp_path: Path) -> None:
    offline = NodeSpec("offline", "secondary", "88.101", 0)
    (cluster.state / "offline.toml").write_text(offline.config_text())
    imported = wuhan(
        "import", "--config", str(cluster.state / "offline.toml"), "--registrations", str(TOTAL), "--processes", "1"
    )
    online = cluster.start(NodeSpec("online", "secondary", "88.101", 0))
    loaded = wuhan("load", "--target", online, "--apex", "88.101", "--registrations", str(TOTAL))
    assert imported["registrations"] == loaded["registrations"] and loaded["failed"] == 0
    assert int(str(imported["registrations"])) > 500
    cluster.processes["online"].stop()
    a_records, a_counts = stored(cluster.state / "offline.sqlite3")
    b_records, b_counts = stored(cluster.state / "online.sqlite3")
    assert a_records == b_records
    assert {k: v for k, v in a_counts.items() if v} == {k: v for k, v in b_counts.items() if v}
    # The imported node serves what was imported.
    address = cluster.start(NodeSpec("offline", "secondary", "88.101", 0))
    some_key = next(iter(a_records))

    async def resolve() -> str:
        from resolver.resolver import Resolver

        async with Resolver([address]) as resolver:
            return str((await resolver.resolve(some_key)).identifier)

    assert asyncio.run(resolve()) == some_key
