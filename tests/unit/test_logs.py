"""Log formats: one line per event, JSON that parses, request context on errors."""

from __future__ import annotations

import io
import json
import logging

import grpc
import grpc.aio
import pytest

from nodes import logs
from nodes.pipeline import RequestPipeline


def _record(message: str, exc: BaseException | None = None, **extra: object) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logging.LogRecord("idis.node", logging.ERROR, __file__, 1, message, (), exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def _failure() -> ValueError:
    try:
        raise ValueError("line one\nline two")
    except ValueError as exc:
        return exc


def test_json_events_are_one_parseable_line_with_request_context_and_traceback() -> None:
    formatter = logs.formatter("json", {"node": "n1", "worker": 2})
    line = formatter.format(_record("boom", _failure(), method="Resolve", peer="ipv4:127.0.0.1:5", status="INTERNAL"))
    assert "\n" not in line
    event = json.loads(line)
    assert {k: event[k] for k in ("level", "logger", "message", "node", "worker")} == {
        "level": "ERROR",
        "logger": "idis.node",
        "message": "boom",
        "node": "n1",
        "worker": 2,
    }
    assert (event["method"], event["peer"], event["status"]) == ("Resolve", "ipv4:127.0.0.1:5", "INTERNAL")
    assert "ValueError: line one\nline two" in event["exception"]
    assert event["time"].endswith("Z")


def test_text_events_keep_a_traceback_on_their_line() -> None:
    line = logs.formatter("text").format(_record("boom", _failure(), method="Create", status="INTERNAL"))
    assert "\n" not in line
    assert "ERROR idis.node: boom method=Create status=INTERNAL | Traceback" in line
    assert "ValueError: line one\\nline two" in line


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text, json"):
        logs.formatter("xml")


def test_configure_sends_every_logger_to_the_stream_in_the_format() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure("INFO", "json", {"node": "n1"}, stream=stream)
    try:
        logging.getLogger("idis.some.module").info("hello %s", "there")
        logging.getLogger("idis.some.module").debug("not at INFO")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["logger"], e["message"], e["node"]) for e in events] == [("idis.some.module", "hello there", "n1")]


async def test_an_unexpected_error_in_a_call_is_logged_with_its_method_peer_and_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        raise RuntimeError("a bug")

    handler = grpc.method_handlers_generic_handler(
        "idis.v1.Broken", {"Call": grpc.unary_unary_rpc_method_handler(broken)}
    )
    server = grpc.aio.server(interceptors=[RequestPipeline()])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/idis.v1.Broken/Call", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call(b"")
    finally:
        await server.stop(None)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    (record,) = [r for r in caplog.records if r.exc_info is not None]
    assert (getattr(record, "method", None), getattr(record, "status", None)) == ("Call", "INTERNAL")
    assert "127.0.0.1" in str(getattr(record, "peer", ""))
    assert json.loads(logs.formatter("json").format(record))["method"] == "Call"
