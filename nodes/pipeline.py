"""Every call to a node's own services passes through here, in one place.

The pipeline counts and times each call (``NodeMetrics``), turns domain exceptions into gRPC
statuses (``resolver.status`` holds the table) and unexpected exceptions into INTERNAL without
leaking internals; this is also where authentication and quotas hook in. Health and reflection
calls pass through untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from nodes.metrics import NodeMetrics
from resolver.errors import IdisError, NotFound
from resolver.status import NEGATIVE_TTL_KEY, status_code_of

log = logging.getLogger("idis.node")

OWN_SERVICES = "/idis.v1."

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamHandler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


async def _abort(error: BaseException, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    if isinstance(error, IdisError):
        if isinstance(error, NotFound) and error.negative_ttl:
            context.set_trailing_metadata(((NEGATIVE_TTL_KEY, str(error.negative_ttl)),))
        await context.abort(status_code_of(error), str(error))
    log.exception("unexpected error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the node's log")


class _Recorder:
    """Counts and times the calls of one method (label children bound once)."""

    def __init__(self, metrics: NodeMetrics | None, method: str) -> None:
        self.metrics = metrics
        self.method = method.rsplit("/", 1)[-1]
        self.ok = metrics.requests.labels(self.method, "OK") if metrics else None
        self.latency = metrics.latency.labels(self.method) if metrics else None

    def done(self, started: float, error: BaseException | None) -> None:
        if self.metrics is None or self.latency is None or self.ok is None:
            return
        self.latency.observe(time.perf_counter() - started)
        if error is None:
            self.ok.inc()
        else:
            code = status_code_of(error).name if not isinstance(error, grpc.aio.AbortError) else "ABORTED_BY_HANDLER"
            self.metrics.requests.labels(self.method, code).inc()


def _guard_unary(method: str, behaviour: Handler, recorder: _Recorder) -> Handler:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        try:
            response = await behaviour(request, context)
        except grpc.aio.AbortError as error:
            recorder.done(started, error)
            raise
        except Exception as error:
            recorder.done(started, error)
            await _abort(error, context, method)
        recorder.done(started, None)
        return response

    return guarded


def _guard_stream(method: str, behaviour: StreamHandler, recorder: _Recorder) -> StreamHandler:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started = time.perf_counter()
        try:
            async for response in behaviour(request, context):
                yield response
        except grpc.aio.AbortError as error:
            recorder.done(started, error)
            raise
        except Exception as error:
            recorder.done(started, error)
            await _abort(error, context, method)
        recorder.done(started, None)

    return guarded


class RequestPipeline(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps each handler of the idis.v1 services once and reuses the wrapped handler."""

    def __init__(self, metrics: NodeMetrics | None = None) -> None:
        self.metrics = metrics
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(OWN_SERVICES):
            return handler
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, h: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        recorder = _Recorder(self.metrics, method)
        kw: dict[str, Any] = {
            "request_deserializer": h.request_deserializer,
            "response_serializer": h.response_serializer,
        }
        # The stubs type handlers as sync callables; on an aio server they are coroutines.
        a: Any = h
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_guard_unary(method, a.unary_unary, recorder), **kw)
        if h.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_guard_unary(method, a.stream_unary, recorder), **kw)
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_guard_stream(method, a.unary_stream, recorder), **kw)
        return grpc.stream_stream_rpc_method_handler(_guard_stream(method, a.stream_stream, recorder), **kw)
