"""The pure-Python protobuf baseline: the Resolution service written the plain way.

Requests are parsed into protobuf objects, identifiers looked up in a dict of prebuilt Record
messages, responses built as protobuf objects and serialised by grpc. Same data as the node
(``bench.dataset``), same server options, uvloop. The end-to-end benchmark measures the node's
fast path against this.

    python -m bench.baseline_server --prefix 88.100.1 --count 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import uvloop

from bench.dataset import registrations
from resolver.identifier import parse_identifier
from resolver.record import Record
from resolver.wire import record_pb2, record_to_pb, resolution_pb2, resolution_pb2_grpc


class Baseline(resolution_pb2_grpc.ResolutionServicer):
    def __init__(self, records: dict[str, record_pb2.Record]) -> None:
        self.records = records

    def _item(self, request: resolution_pb2.ResolveRequest) -> resolution_pb2.ResolveBatchItem:
        record = self.records.get(request.identifier)
        if record is None:
            return resolution_pb2.ResolveBatchItem(
                status=record_pb2.ItemStatus(code=5, message=f"identifier {request.identifier} not found")
            )
        return resolution_pb2.ResolveBatchItem(
            status=record_pb2.ItemStatus(code=0), response=resolution_pb2.ResolveResponse(record=record, ttl=86400)
        )

    async def Resolve(self, request: Any, context: Any) -> resolution_pb2.ResolveResponse:
        record = self.records.get(request.identifier)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "not found")
        return resolution_pb2.ResolveResponse(record=record, ttl=86400)

    async def ResolveBatch(self, request: Any, context: Any) -> resolution_pb2.ResolveBatchResponse:
        return resolution_pb2.ResolveBatchResponse(items=[self._item(r) for r in request.requests])

    async def ResolveStream(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for request in request_iterator:
            yield resolution_pb2.ResolveBatchResponse(items=[self._item(r) for r in request.requests])

    async def Ping(self, request: Any, context: Any) -> resolution_pb2.PingResponse:
        return resolution_pb2.PingResponse(payload=request.payload)


async def serve(prefix: str, count: int, listen: str) -> None:
    records = {
        ident: record_to_pb(Record(parse_identifier(ident), tuple(values), 1))
        for ident, values in registrations(prefix, count)
    }
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    resolution_pb2_grpc.add_ResolutionServicer_to_server(Baseline(records), server)
    port = server.add_insecure_port(listen)
    await server.start()
    print(json.dumps({"event": "ready", "address": f"{listen.rpartition(':')[0]}:{port}"}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefix", default="88.100.1")
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    uvloop.run(serve(args.prefix, args.count, args.listen))


if __name__ == "__main__":
    main()
