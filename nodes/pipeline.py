"""Every call to a node's own services passes through here, in one place.

Today the pipeline turns domain exceptions into gRPC statuses (``resolver.status`` holds the
table) and unexpected exceptions into INTERNAL without leaking internals; this is also where
authentication, quotas and per-method metrics hook in. Health and reflection calls pass through
untouched.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

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


def _guard_unary(method: str, behaviour: Handler) -> Handler:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(error, context, method)

    return guarded


def _guard_stream(method: str, behaviour: StreamHandler) -> StreamHandler:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for response in behaviour(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(error, context, method)

    return guarded


class RequestPipeline(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps each handler of the idis.v1 services once and reuses the wrapped handler."""

    def __init__(self) -> None:
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

    @staticmethod
    def _wrap(method: str, h: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        kw: dict[str, Any] = {
            "request_deserializer": h.request_deserializer,
            "response_serializer": h.response_serializer,
        }
        # The stubs type handlers as sync callables; on an aio server they are coroutines.
        a: Any = h
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_guard_unary(method, a.unary_unary), **kw)
        if h.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_guard_unary(method, a.stream_unary), **kw)
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_guard_stream(method, a.unary_stream), **kw)
        return grpc.stream_stream_rpc_method_handler(_guard_stream(method, a.stream_stream), **kw)
