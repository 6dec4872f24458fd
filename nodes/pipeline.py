"""Every call to a node's own services passes through here, in one place.

The pipeline counts and times each call (``NodeMetrics``), turns domain exceptions into gRPC
statuses (``resolver.status`` holds the table) and unexpected exceptions into INTERNAL without
leaking internals; this is also where authentication and quotas hook in. Health and reflection
calls pass through untouched.

Quotas: every call is charged to its peer's bucket when it arrives, one token per item (a
batch of N costs N, ``BATCHES``); every message of a stream is charged the same way as it is
read; signed calls are also charged to their identity's bucket. Signed calls that change nothing
(reads, listings) spend their nonce in the store (``spend_nonce``), so, like a write, each is
good for one use on every worker process of the node and across restarts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from nodes.metrics import NodeMetrics
from nodes.trust.audit import Actor, AuditRow, Caller, current_actor, refusal_row
from nodes.trust.authentication import Authenticator
from nodes.trust.quotas import (
    Charge,
    StreamCounter,
    TokenBuckets,
    charge,
    cost_of,
    current_charge,
    peer_host,
)
from resolver.cache import count_items
from resolver.errors import IdisError, InvalidArgument
from resolver.status import rich_status, status_code_of
from resolver.wire import decode_request, registration_pb2, resolution_pb2

log = logging.getLogger("idis.node")

OWN_SERVICES = "/idis.v1."

SIGNED_METHODS = frozenset(
    [
        f"/idis.v1.Registration/{m}"
        for m in (
            "Create",
            "Replace",
            "Delete",
            "AddValues",
            "ModifyValues",
            "RemoveValues",
            "BatchCreate",
            "BatchReplace",
            "BatchDelete",
        )
    ]
    + [
        f"/idis.v1.PrefixAdmin/{m}"
        for m in ("CreatePrefix", "DelegatePrefix", "RemovePrefix", "ListAudit", "ListIdentifiers")
    ]
)
"""Calls that change data (or list identifiers, or read the audit trail): signed when the node
requires it, always served with an ``Actor``; refusals are audited."""

READ_ONLY_SIGNED = frozenset(["/idis.v1.PrefixAdmin/ListAudit", "/idis.v1.PrefixAdmin/ListIdentifiers"])
"""Signed calls that write nothing: their nonce is spent in the store by the pipeline (a write
spends its own in its transaction)."""

SIGNABLE_READS = frozenset(
    ["/idis.v1.Resolution/Resolve", "/idis.v1.Resolution/ResolveBatch", "/idis.v1.PrefixAdmin/ListPrefixes"]
)
"""Reads that may be signed, so an authorised reader sees values without PUBLIC_READ (and the
prefix grants it may list)."""

BATCHES: dict[str, tuple[Any, str]] = {
    "/idis.v1.Resolution/ResolveBatch": (resolution_pb2.ResolveBatchRequest, "requests"),
    "/idis.v1.Resolution/ResolveStream": (resolution_pb2.ResolveBatchRequest, "requests"),
    "/idis.v1.Registration/BatchCreate": (registration_pb2.BatchCreateRequest, "items"),
    "/idis.v1.Registration/BatchReplace": (registration_pb2.BatchCreateRequest, "items"),
    "/idis.v1.Registration/BatchDelete": (registration_pb2.BatchDeleteRequest, "identifiers"),
}
"""Methods whose requests (each message, for a stream) cost one token per item: the request
type and its repeated field."""

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamHandler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


async def _abort(error: BaseException, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    if isinstance(error, IdisError):
        code, message, trailing = rich_status(error)
        await context.abort(code, message, trailing_metadata=trailing)
    request = {"method": method.rsplit("/", 1)[-1], "peer": context.peer() or "", "status": "INTERNAL"}
    log.exception("unexpected error in %s", method, exc_info=error, extra=request)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the node's log")


def _cost(method: str, request: Any) -> int:
    """Tokens a request costs: its items for a batch in wire form, else 1."""
    batch = BATCHES.get(method)
    if batch is None or not isinstance(request, bytes):
        return 1
    counted = count_items(request)  # a full decode only for a request in an unusual form
    return max(1, counted) if counted >= 0 else cost_of(*batch, request)


async def _charged(method: str, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The messages of a stream, each charged to the peer as it is read (``_cost``; not even
    counted when there is no limit)."""
    async for message in requests:
        if current_charge.get() is not None:
            charge(_cost(method, message))
        yield message


def _decoding(method: str, h: grpc.RpcMethodHandler[Any, Any]) -> Handler:
    behaviour: Any = h.unary_unary
    decode: Any = h.request_deserializer

    async def decoded(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        request = decode_request(decode, raw, f"message for {method.rsplit('/', 1)[-1]}")
        return await behaviour(request, context)

    return decoded


class _Recorder:
    """Counts and times the calls of one method (label children bound once)."""

    def __init__(
        self,
        metrics: NodeMetrics | None,
        method: str,
        admit: Callable[[Any, Any], None] = lambda context, request: None,
        streams: StreamCounter | None = None,
    ) -> None:
        self.metrics = metrics
        self.admit = admit
        self.streams = streams
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
            recorder.admit(context, request)
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
        peer = peer_host(context.peer() or "")
        opened = False
        try:
            recorder.admit(context, None)  # the stream; each message is charged as it is read
            if recorder.streams is not None:
                recorder.streams.open(peer)
                opened = True
            if method in BATCHES and hasattr(request, "__aiter__"):
                request = _charged(method, request)
            async for response in behaviour(request, context):
                yield response
        except grpc.aio.AbortError as error:
            recorder.done(started, error)
            raise
        except Exception as error:
            recorder.done(started, error)
            await _abort(error, context, method)
        finally:
            if opened and recorder.streams is not None:
                recorder.streams.close(peer)
        recorder.done(started, None)

    return guarded


class RequestPipeline(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps each handler of the idis.v1 services once and reuses the wrapped handler."""

    def __init__(
        self,
        metrics: NodeMetrics | None = None,
        authenticator: Authenticator | None = None,
        audit: Callable[[AuditRow, str], None] | None = None,
        clock: Callable[[], float] = time.time,
        peer_limit: TokenBuckets | None = None,
        identity_limit: TokenBuckets | None = None,
        streams: StreamCounter | None = None,
        spend_nonce: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        """``authenticator``: verify signed calls (None: the node does not require them);
        ``audit(row, peer)``: takes a refused call's row (``nodes.trust.audit.RefusalTrail.add``:
        never blocks); ``spend_nonce``: records a signed read's nonce where every worker sees it
        (raises Unauthenticated when it was spent already)."""
        self.metrics = metrics
        self.authenticator = authenticator
        self.audit = audit
        self.clock = clock
        self.peer_limit = peer_limit
        self.identity_limit = identity_limit
        self.streams = streams
        self.spend_nonce = spend_nonce
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

    def _signed(self, method: str, h: grpc.RpcMethodHandler[Any, Any], recorder: _Recorder) -> Handler:
        """A write call: bytes in; authenticate them, then decode, then serve as ``actor``."""
        behaviour: Any = h.unary_unary
        decode = h.request_deserializer
        name = method.rsplit("/", 1)[-1]

        async def signed(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata: Any = context.invocation_metadata() or ()
            caller = None
            request = None
            malformed: IdisError | None = None
            try:  # decoded first, so a refusal names its target
                request = decode_request(decode, raw, f"message for {name}") if decode is not None else raw
            except InvalidArgument as error:
                malformed = error
            try:
                if self.authenticator is not None:
                    caller = await self._authenticated(method, raw, metadata, context)
                if malformed is not None:
                    raise malformed
                current_actor.set(Actor(caller, context.peer() or "", name))
                return await behaviour(request, context)
            except IdisError as error:
                self._audit_refusal(error, caller, metadata, context, name, request)
                raise

        return _guard_unary(method, signed, recorder)

    async def _authenticated(self, method: str, raw: bytes, metadata: Any, context: Any) -> Caller:
        """The verified caller of a signed call, charged to its identity's bucket (one token per
        item); a call that writes nothing spends its nonce in the store here."""
        assert self.authenticator is not None
        peer = peer_host(context.peer() or "")
        caller = await self.authenticator.authenticate(method, raw, metadata, peer=peer)
        if self.identity_limit is not None and self.identity_limit.rate > 0:
            self.identity_limit.take(caller.identity.key, "identity", _cost(method, raw))
        if self.spend_nonce is not None and (method in READ_ONLY_SIGNED or method in SIGNABLE_READS):
            await self.spend_nonce(caller.nonce)
        return caller

    def _audit_refusal(
        self, error: IdisError, caller: Caller | None, metadata: Any, context: Any, name: str, request: Any
    ) -> None:
        """Hands a refused call's row to the refusal trail: the verified identity, or the claim
        marked as not verified; the target as named in the request (bounded by the trail)."""
        if self.audit is None:
            return
        claimed = next((v for k, v in metadata if k == "idis-identity" and isinstance(v, str)), None)
        message = str(error)
        items = getattr(request, "items", None)
        if items:  # a batch: recorded under its first identifier
            target = str(items[0].identifier)
            message = f"batch of {len(items)}: {message}"
        else:
            target = str(getattr(request, "identifier", "") or getattr(request, "prefix", "") or "?")
        row = refusal_row(
            self.clock(),
            str(caller.identity) if caller is not None else None,
            claimed,
            caller.key_index if caller is not None else 0,
            context.peer() or "",
            name,
            target,
            status_code_of(error).name,
            message,
        )
        self.audit(row, peer_host(context.peer() or ""))

    def _optionally_signed(self, method: str, h: grpc.RpcMethodHandler[Any, Any], recorder: _Recorder) -> Handler:
        """A read that may be signed (to see private values, or grants): authenticate it when it
        is, then decode it (when its handler takes a message) and serve it."""
        behaviour: Any = h.unary_unary
        decode = h.request_deserializer
        name = method.rsplit("/", 1)[-1]

        async def read(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self.authenticator is not None:
                metadata: Any = context.invocation_metadata() or ()
                if any(key == "idis-signature" for key, _ in metadata):
                    caller = await self._authenticated(method, raw, metadata, context)
                    current_actor.set(Actor(caller, context.peer() or "", name))
            request = decode_request(decode, raw, f"message for {name}") if decode is not None else raw
            return await behaviour(request, context)

        return _guard_unary(method, read, recorder)

    def _admission(self, method: str) -> Callable[[Any, Any], None]:
        """Every call first: the per-peer rate, ``_cost(request)`` tokens; what the call spends
        later (stream messages, recursion) is charged to the same bucket (``Charge``)."""

        def admit(context: Any, request: Any) -> None:
            if self.peer_limit is None or self.peer_limit.rate <= 0:
                return  # unlimited: nothing to count
            peer = peer_host(context.peer() or "")
            current_charge.set(Charge(self.peer_limit, peer))
            self.peer_limit.take(peer, "peer", _cost(method, request))

        return admit

    def _wrap(self, method: str, h: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        recorder = _Recorder(self.metrics, method, self._admission(method), self.streams)
        if method in SIGNABLE_READS and h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._optionally_signed(method, h, recorder),
                request_deserializer=None,
                response_serializer=h.response_serializer,
            )
        if method in SIGNED_METHODS and h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._signed(method, h, recorder), request_deserializer=None, response_serializer=h.response_serializer
            )
        if h.unary_unary is not None and h.request_deserializer is not None:
            # Decoded here rather than by grpc, so a malformed request is INVALID_ARGUMENT, not UNKNOWN.
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(method, _decoding(method, h), recorder), response_serializer=h.response_serializer
            )
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
