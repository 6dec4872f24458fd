"""A cancelled call can never wedge a node, leave a stale answer, or store half a write.

A deadline sweep sends every write RPC with deadlines from 0.1 ms to 50 ms to a real node, so
that calls are cut off at every moment of their life: before the transaction, while it begins,
inside it, during COMMIT, after it. Afterwards the node must still write, every answer it gives
(from its cache or not) must equal a fresh read of the SQLite file, and no batch may be half
stored.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodes.config import load_config
from nodes.hierarchy import NodeSpec
from nodes.storage import Store, open_store
from resolver.handle_client import HandleClient
from resolver.handle_protocol import RC
from resolver.identifier import parse_identifier
from resolver.wire import (
    decode_answer,
    decode_record,
    prefix_pb2,
    record_pb2,
    registration_pb2,
    resolution_pb2,
)
from tests.engines import ENGINES
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.parametrize("store_engine", ENGINES)

Code = grpc.StatusCode
PREFIX = "88.100"
DEADLINES_MS = [0.1, 0.2, 0.5, 1, 2, 3, 5, 8, 13, 20, 35, 50]
IDENTIFIERS = [f"{PREFIX}/CANCEL-{i}" for i in range(24)]


def value(index: int, data: str) -> record_pb2.Value:
    return record_pb2.Value(index=index, type="URL", data=data.encode())


class Sweep:
    """Raw calls to one node, each with its own deadline; counts the status codes seen."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.codes: dict[str, int] = {}
        self.batches: list[list[str]] = []
        self._serial = itertools.count()

    async def call(self, method: str, request: Any, deadline: float | None) -> bytes | None:
        rpc = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            answer: bytes | None = await rpc(request.SerializeToString(), timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            answer, code, details = None, exc.code(), exc.details()
        else:
            code, details = Code.OK, ""
        assert code not in (Code.INTERNAL, Code.UNKNOWN), f"{method}: {details}"
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        return answer

    def requests(self, identifier: str) -> list[tuple[str, Any]]:
        n = next(self._serial)
        batch = [f"{PREFIX}/BATCH-{n}-{i}" for i in range(50)]
        self.batches.append(batch)
        registration = "/idis.v1.Registration/"
        return [
            (registration + "Create", registration_pb2.CreateRequest(identifier=identifier, values=[value(1, "a")])),
            (
                registration + "Replace",
                registration_pb2.ReplaceRequest(identifier=identifier, values=[value(1, f"r{n}"), value(2, "b")]),
            ),
            (
                registration + "AddValues",
                registration_pb2.ValuesRequest(identifier=identifier, values=[value(3 + n % 50, f"add{n}")]),
            ),
            (
                registration + "ModifyValues",
                registration_pb2.ValuesRequest(identifier=identifier, values=[value(1, f"m{n}")]),
            ),
            (registration + "RemoveValues", registration_pb2.RemoveValuesRequest(identifier=identifier, indexes=[2])),
            (
                registration + "BatchCreate",
                registration_pb2.BatchCreateRequest(
                    items=[registration_pb2.CreateRequest(identifier=i, values=[value(1, i)]) for i in batch]
                ),
            ),
            (registration + "Delete", registration_pb2.DeleteRequest(identifier=identifier)),
            ("/idis.v1.PrefixAdmin/CreatePrefix", prefix_pb2.CreatePrefixRequest(prefix=f"{PREFIX}.{n % 7 + 10}")),
        ]


async def resolve(channel: grpc.aio.Channel, identifier: str) -> tuple[int, list[tuple[int, bytes]]] | None:
    """(version, [(index, data)]) as the node answers, None when it answers NOT_FOUND."""
    rpc = channel.unary_unary("/idis.v1.Resolution/Resolve", request_serializer=None, response_deserializer=None)
    try:
        data = await rpc(resolution_pb2.ResolveRequest(identifier=identifier).SerializeToString(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details()
    else:
        code, details = Code.OK, ""
    assert code in (Code.OK, Code.NOT_FOUND), details
    if code == Code.NOT_FOUND:
        return None
    record = decode_answer(data)
    return record.version, sorted((v.index, v.data) for v in record.values)  # type: ignore[union-attr]


async def stored(store: Store, identifier: str) -> tuple[int, list[tuple[int, bytes]]] | None:
    row = await store.get(parse_identifier(identifier).key)
    if row is None:
        return None
    record = decode_record(row.record)
    return row.version, sorted((v.index, v.data) for v in record.values)


async def handle_values(port: int, identifier: str) -> list[tuple[int, bytes]] | None:
    """[(index, data)] as the node answers over the Handle protocol (UDP), None for rc 100."""
    answer = await HandleClient("udp", timeout=5.0, tcp_fallback=False).ask("127.0.0.1", port, identifier)
    assert answer.rc in (RC.SUCCESS, RC.HANDLE_NOT_FOUND), answer
    return sorted((v.index, v.data) for v in answer.values) if answer.rc == RC.SUCCESS else None


async def run_sweep(address: str, rounds: int, spread: Callable[[int], float], handle_port: int = 0) -> Sweep:
    async with grpc.aio.insecure_channel(address) as channel:
        sweep = Sweep(channel)
        for round_ in range(rounds):
            for identifier in IDENTIFIERS:
                await resolve(channel, identifier)  # fill the caches, so that a stale entry would show
                if handle_port:
                    await handle_values(handle_port, identifier)
            calls = []
            for position, identifier in enumerate(IDENTIFIERS):
                deadline = spread(round_ * len(IDENTIFIERS) + position)
                calls += [sweep.call(m, r, deadline) for m, r in sweep.requests(identifier)]
            await asyncio.gather(*calls)
        return sweep


@pytest.mark.timeout(300)
async def test_a_deadline_sweep_over_every_write_leaves_the_node_writable_and_its_cache_true(
    cluster: Cluster, tmp_path: Path
) -> None:
    spec = NodeSpec("secondary", "secondary", PREFIX, 0, {"node": {"handle_listen": "127.0.0.1:0"}})
    address = await asyncio.to_thread(cluster.start, spec)
    handle_port = cluster.processes["secondary"].handle_port

    def spread(n: int) -> float:
        return DEADLINES_MS[n % len(DEADLINES_MS)] / 1000

    sweep = await run_sweep(address, 3, spread, handle_port)
    calls = sum(sweep.codes.values())
    assert calls >= 500
    assert sweep.codes.get("DEADLINE_EXCEEDED", 0) > 0, sweep.codes  # the sweep did cut calls off

    async with grpc.aio.insecure_channel(address) as channel:
        # Still writable: an ordinary write and a prefix change succeed, and health says so.
        checker = Sweep(channel)
        create = registration_pb2.CreateRequest(identifier=f"{PREFIX}/AFTER", values=[value(1, "after")])
        assert await checker.call("/idis.v1.Registration/Create", create, 10) is not None
        new_prefix = prefix_pb2.CreatePrefixRequest(prefix=f"{PREFIX}.99")
        assert await checker.call("/idis.v1.PrefixAdmin/CreatePrefix", new_prefix, 10) is not None
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        # Every answer, cached or not, is what the file holds now.
        store = await open_store(load_config(cluster.processes["secondary"].config))
        try:
            for identifier in [*IDENTIFIERS, f"{PREFIX}/AFTER"]:
                for _ in range(2):  # the first may fill the cache, the second is answered from it
                    truth = await stored(store, identifier)
                    assert await resolve(channel, identifier) == truth, identifier
                    # The Handle protocol's answer cache too (its answers carry no version).
                    assert await handle_values(handle_port, identifier) == (truth[1] if truth else None), identifier
            # No batch half stored.
            for batch in sweep.batches:
                present = [await stored(store, i) is not None for i in batch]
                assert all(present) or not any(present), f"batch {batch[0]}..: {sum(present)} of {len(batch)}"
        finally:
            await store.close()


@pytest.mark.timeout(300)
async def test_sub_millisecond_deadlines_cannot_make_a_node_read_only(cluster: Cluster) -> None:
    """The original report: a few dozen writes with a 1 ms deadline left the write connection
    inside an open transaction, and every later write failed with INTERNAL."""
    address = await asyncio.to_thread(cluster.start, NodeSpec("secondary", "secondary", PREFIX, 0))
    async with grpc.aio.insecure_channel(address) as channel:
        sweep = Sweep(channel)
        for n in range(200):
            create = registration_pb2.CreateRequest(identifier=f"{PREFIX}/FAST-{n}", values=[value(1, "x")])
            await sweep.call("/idis.v1.Registration/Create", create, (0.1, 0.5, 1.0)[n % 3] / 1000)
        for n in range(5):
            create = registration_pb2.CreateRequest(identifier=f"{PREFIX}/SLOW-{n}", values=[value(1, "x")])
            assert await sweep.call("/idis.v1.Registration/Create", create, 10) is not None, sweep.codes
