"""The gRPC servicers: decode the request, call the domain, encode the answer. Nothing else.

Errors are not handled here: domain exceptions propagate to ``nodes.pipeline``, which turns
them into gRPC statuses in one place. Batch methods report per-item statuses with the same
mapping (``resolver.status``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from nodes.authority import Authority, PrefixEntry, PrefixKind
from nodes.registry import Registry, WriteResult
from resolver.errors import FailedPrecondition, IdisError, InvalidArgument, NotFound
from resolver.identifier import parse_identifier, parse_prefix
from resolver.record import Limits, Record, Value
from resolver.resolver import Resolver
from resolver.site import Referral
from resolver.status import status_code_of
from resolver.wire import (
    prefix_pb2,
    prefix_pb2_grpc,
    record_pb2,
    record_to_pb,
    referral_to_pb,
    registration_pb2,
    registration_pb2_grpc,
    resolution_pb2,
    resolution_pb2_grpc,
    site_from_pb,
    site_to_pb,
    values_from_pb,
)

Context = Any  # grpc.aio.ServicerContext; the stubs' generic form adds nothing here

MAX_PAGE = 1000


def item_status(error: IdisError | None) -> record_pb2.ItemStatus:
    if error is None:
        return record_pb2.ItemStatus(code=0)
    return record_pb2.ItemStatus(code=status_code_of(error).value[0], message=str(error))


def _select(record: Record, request: resolution_pb2.ResolveRequest) -> Record:
    """Applies the request's type and index filters."""
    if not request.types and not request.indexes:
        return record
    types, indexes = set(request.types), set(request.indexes)
    kept = tuple(v for v in record.values if (not types or v.type in types) and (not indexes or v.index in indexes))
    return Record(record.identifier, kept, record.version)


class ResolutionService(resolution_pb2_grpc.ResolutionServicer):
    def __init__(self, authority: Authority, limits: Limits, recursor: Resolver | None, clock: Any) -> None:
        self.authority = authority
        self.limits = limits
        self.recursor = recursor
        self.clock = clock

    async def answer(self, request: resolution_pb2.ResolveRequest) -> resolution_pb2.ResolveResponse:
        identifier = parse_identifier(request.identifier)
        answer: Record | Referral
        if request.recursive:
            if self.recursor is None:
                raise FailedPrecondition("recursion is not enabled on this node; ask without recursive")
            answer = await self.recursor.resolve(identifier)
        else:
            answer = await self.authority.answer(identifier)
        if isinstance(answer, Referral):
            return resolution_pb2.ResolveResponse(referral=referral_to_pb(answer), ttl=answer.ttl)
        record = _select(answer, request)
        return resolution_pb2.ResolveResponse(record=record_to_pb(record), ttl=answer.cache_ttl(int(self.clock())))

    async def answer_batch(self, request: resolution_pb2.ResolveBatchRequest) -> resolution_pb2.ResolveBatchResponse:
        self.limits.check_batch(len(request.requests))
        items = []
        for one in request.requests:
            try:
                items.append(resolution_pb2.ResolveBatchItem(status=item_status(None), response=await self.answer(one)))
            except IdisError as error:
                negative_ttl = error.negative_ttl if isinstance(error, NotFound) else 0
                items.append(resolution_pb2.ResolveBatchItem(status=item_status(error), negative_ttl=negative_ttl))
        return resolution_pb2.ResolveBatchResponse(items=items)

    async def Resolve(self, request: resolution_pb2.ResolveRequest, context: Context) -> resolution_pb2.ResolveResponse:
        return await self.answer(request)

    async def ResolveBatch(
        self, request: resolution_pb2.ResolveBatchRequest, context: Context
    ) -> resolution_pb2.ResolveBatchResponse:
        return await self.answer_batch(request)

    async def ResolveStream(
        self, request_iterator: AsyncIterator[resolution_pb2.ResolveBatchRequest], context: Context
    ) -> AsyncIterator[resolution_pb2.ResolveBatchResponse]:
        async for request in request_iterator:
            yield await self.answer_batch(request)


def _written(result: WriteResult) -> registration_pb2.WriteResponse:
    return registration_pb2.WriteResponse(record=record_to_pb(result.record), created=result.created)


class RegistrationService(registration_pb2_grpc.RegistrationServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def Create(self, request: registration_pb2.CreateRequest, context: Context) -> registration_pb2.WriteResponse:
        return _written(await self.registry.create(request.identifier, values_from_pb(request.values, for_write=True)))

    async def Replace(
        self, request: registration_pb2.ReplaceRequest, context: Context
    ) -> registration_pb2.WriteResponse:
        values = values_from_pb(request.values, for_write=True)
        return _written(await self.registry.replace(request.identifier, values, request.expected_version))

    async def Delete(
        self, request: registration_pb2.DeleteRequest, context: Context
    ) -> registration_pb2.DeleteResponse:
        version = await self.registry.delete(request.identifier, request.expected_version)
        return registration_pb2.DeleteResponse(deleted_version=version)

    async def AddValues(
        self, request: registration_pb2.ValuesRequest, context: Context
    ) -> registration_pb2.WriteResponse:
        values = values_from_pb(request.values, for_write=True)
        return _written(await self.registry.add_values(request.identifier, values, request.expected_version))

    async def ModifyValues(
        self, request: registration_pb2.ValuesRequest, context: Context
    ) -> registration_pb2.WriteResponse:
        values = values_from_pb(request.values, for_write=True)
        return _written(await self.registry.modify_values(request.identifier, values, request.expected_version))

    async def RemoveValues(
        self, request: registration_pb2.RemoveValuesRequest, context: Context
    ) -> registration_pb2.WriteResponse:
        indexes: Sequence[int] = list(request.indexes)
        return _written(await self.registry.remove_values(request.identifier, indexes, request.expected_version))

    async def BatchCreate(
        self, request: registration_pb2.BatchCreateRequest, context: Context
    ) -> registration_pb2.BatchCreateResponse:
        self.registry.limits.check_batch(len(request.items))
        decoded: list[tuple[str, tuple[Value, ...]] | IdisError] = []
        for item in request.items:
            try:
                decoded.append((item.identifier, values_from_pb(item.values, for_write=True)))
            except IdisError as error:
                decoded.append(error)
        results = iter(await self.registry.batch_create([d for d in decoded if not isinstance(d, IdisError)]))
        out = []
        for d in decoded:
            if isinstance(d, IdisError):
                out.append(registration_pb2.BatchCreateItem(status=item_status(d)))
            else:
                r = next(results)
                out.append(
                    registration_pb2.BatchCreateItem(status=item_status(r.error), version=r.version, created=r.created)
                )
        return registration_pb2.BatchCreateResponse(items=out)


def prefix_info(entry: PrefixEntry) -> prefix_pb2.PrefixInfo:
    return prefix_pb2.PrefixInfo(
        prefix=entry.prefix.display,
        kind=prefix_pb2.PREFIX_KIND_HOSTED if entry.kind is PrefixKind.HOSTED else prefix_pb2.PREFIX_KIND_DELEGATED,
        site=site_to_pb(entry.site) if entry.site else None,
        ttl=entry.ttl,
        identifier_count=entry.identifier_count,
    )


class PrefixAdminService(prefix_pb2_grpc.PrefixAdminServicer):
    def __init__(self, authority: Authority) -> None:
        self.authority = authority

    async def CreatePrefix(self, request: prefix_pb2.CreatePrefixRequest, context: Context) -> prefix_pb2.PrefixInfo:
        return prefix_info(await self.authority.create_prefix(request.prefix))

    async def DelegatePrefix(
        self, request: prefix_pb2.DelegatePrefixRequest, context: Context
    ) -> prefix_pb2.PrefixInfo:
        site = site_from_pb(request.site)
        return prefix_info(await self.authority.delegate_prefix(request.prefix, site, request.ttl))

    async def ListPrefixes(
        self, request: prefix_pb2.ListPrefixesRequest, context: Context
    ) -> prefix_pb2.ListPrefixesResponse:
        under = parse_prefix(request.under) if request.under else None
        await self.authority.refresh_counts()
        return prefix_pb2.ListPrefixesResponse(prefixes=[prefix_info(e) for e in self.authority.entries(under)])

    async def ListIdentifiers(
        self, request: prefix_pb2.ListIdentifiersRequest, context: Context
    ) -> prefix_pb2.ListIdentifiersResponse:
        prefix = parse_prefix(request.prefix)
        entry = self.authority.entry(prefix)
        if entry is None or entry.kind is not PrefixKind.HOSTED:
            raise NotFound(f"prefix {prefix} is not hosted by this node")
        size = request.page_size or 100
        if size > MAX_PAGE:
            raise InvalidArgument(f"page_size {size} is over the limit of {MAX_PAGE}")
        after = request.page_token
        if after and not after.startswith(prefix.key + "/"):
            raise InvalidArgument(f"page_token does not belong to prefix {prefix}")
        keys = await self.authority.store.list_keys(prefix.key, after, size + 1)
        more = len(keys) > size
        keys = keys[:size]
        records = [await self.authority.answer(parse_identifier(k)) for k in keys]
        names = [str(r.identifier) if isinstance(r, Record) else k for r, k in zip(records, keys, strict=True)]
        return prefix_pb2.ListIdentifiersResponse(identifiers=names, next_page_token=keys[-1] if more else "")
