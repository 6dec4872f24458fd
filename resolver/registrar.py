"""The client of the write side: registration and prefix administration.

Writes go to the node that hosts the identifier's prefix. Unless a node is named, the registrar
finds it the way a resolver would: by following referrals from the top-level node
(``Resolver.authority_for``), cached, so a batch of many identifiers locates each prefix once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio

from resolver.channels import ChannelPool
from resolver.errors import IdisError, Timeout, Unavailable, ValueExists
from resolver.identifier import parse_identifier, parse_prefix
from resolver.record import Record, Value
from resolver.resolver import Resolver
from resolver.signing import Signer
from resolver.site import Site, make_site
from resolver.status import error_from_rpc
from resolver.wire import (
    item_error,
    prefix_pb2,
    record_from_pb,
    registration_pb2,
    site_from_pb,
    site_to_pb,
    value_to_pb,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Written:
    record: Record
    created: bool


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    identifier: str
    version: int = 0
    created: bool = False
    error: IdisError | None = None


@dataclass(frozen=True, slots=True)
class PrefixInfo:
    prefix: str
    kind: str
    """"hosted" or "delegated"."""
    servers: tuple[str, ...] = ()
    ttl: int = 0
    identifier_count: int = 0


def _prefix_info(msg: prefix_pb2.PrefixInfo) -> PrefixInfo:
    kind = "hosted" if msg.kind == prefix_pb2.PREFIX_KIND_HOSTED else "delegated"
    servers = tuple(str(s) for s in site_from_pb(msg.site).servers) if msg.site.servers else ()
    return PrefixInfo(msg.prefix, kind, servers, msg.ttl, msg.identifier_count)


class Registrar:
    """Registers identifiers and administers prefixes.

    ``resolver`` locates the node that hosts a prefix; ``node`` (``host:port``) overrides that
    and sends every call to one node.
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        node: str | None = None,
        *,
        timeout: float = 30.0,
        channels: ChannelPool | None = None,
        signer: Signer | None = None,
    ) -> None:
        if resolver is None and node is None:
            raise ValueError("a Registrar needs a resolver or a node address")
        self._resolver = resolver
        self._node_site = make_site([node]) if node else None
        self.timeout = timeout
        self._channels = channels if channels is not None else ChannelPool()  # an empty pool is falsy
        self.signer = signer
        """Signs every write (nodes with [auth] mode = required refuse unsigned ones)."""

    async def close(self) -> None:
        await self._channels.close()

    async def site_for(self, identifier: str) -> Site:
        """The site hosting ``identifier``'s prefix (the named node, if one was given)."""
        if self._node_site is not None:
            return self._node_site
        assert self._resolver is not None
        return await self._resolver.authority_for(identifier)

    async def site_for_prefix(self, prefix: str) -> Site:
        """The site where ``prefix`` is administered: the one hosting its parent."""
        parent = parse_prefix(prefix).parent
        return await self.site_for(f"{parent or parse_prefix(prefix)}/-")

    async def _call(self, site: Site, key: str, call: Callable[[str], Awaitable[T]]) -> T:
        """``call`` on the site's servers (given each one's address) until one answers."""
        failures = []
        for server in site.ordered_for(key):
            try:
                return await call(server.address)
            except grpc.aio.AioRpcError as exc:
                error = error_from_rpc(exc, server.address)
                if not isinstance(error, (Unavailable, Timeout)):
                    raise error from None
                failures.append(str(error))
        raise Unavailable("; ".join(failures) or "the site has no servers")

    async def _invoke(self, site: Site, key: str, path: str, request: Any, response_type: Any) -> Any:
        """One call, signed when a signer was given (the signature covers these exact bytes and
        names the server it is sent to: each server tried gets its own)."""
        data = request.SerializeToString()

        async def call(address: str) -> Any:
            metadata = self.signer.metadata(path, data, address) if self.signer is not None else None
            rpc = self._channels.get(address).unary_unary(path, request_serializer=None, response_deserializer=None)
            return response_type.FromString(await rpc(data, timeout=self.timeout, metadata=metadata))

        return await self._call(site, key, call)

    async def _write(self, identifier: str, method: str, request: Any) -> Any:
        site = await self.site_for(identifier)
        response_type = registration_pb2.DeleteResponse if method == "Delete" else registration_pb2.WriteResponse
        return await self._invoke(site, identifier, f"/idis.v1.Registration/{method}", request, response_type)

    async def _written(self, identifier: str, method: str, request: Any) -> Written:
        response = await self._write(identifier, method, request)
        return Written(record_from_pb(response.record), response.created)

    async def create(self, identifier: str, values: Sequence[Value]) -> Written:
        """Creates ``identifier``; an identical existing record is a success with created=False."""
        parse_identifier(identifier)
        request = registration_pb2.CreateRequest(identifier=identifier, values=[value_to_pb(v) for v in values])
        return await self._written(identifier, "Create", request)

    async def replace(self, identifier: str, values: Sequence[Value], expected_version: int = 0) -> Written:
        request = registration_pb2.ReplaceRequest(
            identifier=identifier, values=[value_to_pb(v) for v in values], expected_version=expected_version
        )
        return await self._written(identifier, "Replace", request)

    async def add_values(self, identifier: str, values: Sequence[Value], expected_version: int = 0) -> Written:
        request = registration_pb2.ValuesRequest(
            identifier=identifier, values=[value_to_pb(v) for v in values], expected_version=expected_version
        )
        return await self._written(identifier, "AddValues", request)

    async def modify_values(self, identifier: str, values: Sequence[Value], expected_version: int = 0) -> Written:
        request = registration_pb2.ValuesRequest(
            identifier=identifier, values=[value_to_pb(v) for v in values], expected_version=expected_version
        )
        return await self._written(identifier, "ModifyValues", request)

    async def put_value(self, identifier: str, value: Value) -> Written:
        """Adds ``value``, or replaces the one at its index (two calls: AddValues, then
        ModifyValues when the index is taken)."""
        try:
            return await self.add_values(identifier, [value])
        except ValueExists:
            return await self.modify_values(identifier, [value])

    async def remove_values(self, identifier: str, indexes: Sequence[int], expected_version: int = 0) -> Written:
        request = registration_pb2.RemoveValuesRequest(
            identifier=identifier, indexes=list(indexes), expected_version=expected_version
        )
        return await self._written(identifier, "RemoveValues", request)

    async def delete(self, identifier: str, expected_version: int = 0) -> int:
        """Deletes ``identifier``; returns the version it had."""
        request = registration_pb2.DeleteRequest(identifier=identifier, expected_version=expected_version)
        response = await self._write(identifier, "Delete", request)
        return int(response.deleted_version)

    async def batch_create(
        self, items: Sequence[tuple[str, Sequence[Value]]], batch_size: int = 1000
    ) -> list[BatchOutcome]:
        """Creates many identifiers, grouped by hosting site, ``batch_size`` per call (max 2000)."""
        return await self._batched(items, "BatchCreate", batch_size)

    async def batch_replace(
        self, items: Sequence[tuple[str, Sequence[Value]]], batch_size: int = 1000
    ) -> list[BatchOutcome]:
        """Replaces the values of many identifiers (``version``: each one's new version), grouped
        by hosting site, ``batch_size`` per call (max 2000), each call one transaction."""
        return await self._batched(items, "BatchReplace", batch_size)

    async def batch_delete(self, identifiers: Sequence[str], batch_size: int = 1000) -> list[BatchOutcome]:
        """Deletes many identifiers (``version``: the one each had), grouped by hosting site,
        ``batch_size`` per call (max 2000), each call one transaction."""
        return await self._batched([(i, ()) for i in identifiers], "BatchDelete", batch_size)

    async def _batched(
        self, items: Sequence[tuple[str, Sequence[Value]]], method: str, batch_size: int
    ) -> list[BatchOutcome]:
        groups: dict[tuple[str, ...], list[int]] = {}
        sites: dict[tuple[str, ...], Site] = {}
        outcomes: list[BatchOutcome | None] = [None] * len(items)
        for position, (identifier, _values) in enumerate(items):
            try:
                site = await self.site_for(identifier)
            except IdisError as error:
                outcomes[position] = BatchOutcome(identifier, error=error)
                continue
            key = tuple(s.address for s in site.servers)
            sites[key] = site
            groups.setdefault(key, []).append(position)
        for key, positions in groups.items():
            for start in range(0, len(positions), batch_size):
                chunk = positions[start : start + batch_size]
                request: Any
                if method == "BatchDelete":
                    request = registration_pb2.BatchDeleteRequest(identifiers=[items[p][0] for p in chunk])
                else:
                    request = registration_pb2.BatchCreateRequest(
                        items=[
                            registration_pb2.CreateRequest(
                                identifier=items[p][0], values=[value_to_pb(v) for v in items[p][1]]
                            )
                            for p in chunk
                        ]
                    )
                response = await self._invoke(
                    sites[key],
                    items[chunk[0]][0],
                    f"/idis.v1.Registration/{method}",
                    request,
                    registration_pb2.BatchCreateResponse,
                )
                for p, item in zip(chunk, response.items, strict=True):
                    failure = item_error(item.status)
                    outcomes[p] = BatchOutcome(items[p][0], item.version, item.created, failure)
        return [o for o in outcomes if o is not None]

    # --- prefixes ----------------------------------------------------------------------------

    async def _admin(self, site: Site, key: str, method: str, request: Any) -> Any:
        response_type = {
            "CreatePrefix": prefix_pb2.PrefixInfo,
            "DelegatePrefix": prefix_pb2.PrefixInfo,
            "RemovePrefix": prefix_pb2.PrefixInfo,
            "ListPrefixes": prefix_pb2.ListPrefixesResponse,
            "ListIdentifiers": prefix_pb2.ListIdentifiersResponse,
            "ListAudit": prefix_pb2.ListAuditResponse,
        }[method]
        return await self._invoke(site, key, f"/idis.v1.PrefixAdmin/{method}", request, response_type)

    async def create_prefix(self, prefix: str, admins: Sequence[Value] = ()) -> PrefixInfo:
        """Hosts ``prefix`` on the node of its parent; ``admins`` are HS_ADMIN values for it."""
        site = await self.site_for_prefix(prefix)
        request = prefix_pb2.CreatePrefixRequest(prefix=prefix, admins=[value_to_pb(v) for v in admins])
        return _prefix_info(await self._admin(site, prefix, "CreatePrefix", request))

    async def delegate_prefix(
        self, prefix: str, servers: Sequence[str], ttl: int = 0, admins: Sequence[Value] = (), zone_keys: str = ""
    ) -> PrefixInfo:
        """Delegates ``prefix`` to the site of ``servers``; ``zone_keys``: the keys the site signs
        with, as ``idis-node keys show`` prints them (a signing parent's delegation lists them)."""
        site = await self.site_for_prefix(prefix)
        request = prefix_pb2.DelegatePrefixRequest(
            prefix=prefix,
            site=site_to_pb(make_site(list(servers))),
            ttl=ttl,
            admins=[value_to_pb(v) for v in admins],
            zone_keys=zone_keys,
        )
        return _prefix_info(await self._admin(site, prefix, "DelegatePrefix", request))

    async def remove_prefix(self, prefix: str) -> PrefixInfo:
        """Stops hosting or delegating ``prefix`` on the node of its parent (it must hold no
        identifiers and no sub-prefixes); returns the prefix as it was. Needs DELETE_NA."""
        site = await self.site_for_prefix(prefix)
        request = prefix_pb2.RemovePrefixRequest(prefix=prefix)
        return _prefix_info(await self._admin(site, prefix, "RemovePrefix", request))

    async def _pages(
        self, site: Site, key: str, method: str, request: Any, items: str, page_size: int, limit: int
    ) -> list[Any]:
        """The ``items`` of every page of a listing (all, or the first ``limit``), following
        next_page_token (each list pages the same way, see prefix.proto)."""
        out: list[Any] = []
        while True:
            request.page_size = min(page_size, limit - len(out)) if limit else page_size
            response = await self._admin(site, key, method, request)
            out.extend(getattr(response, items))
            request.page_token = response.next_page_token
            if not request.page_token or (limit and len(out) >= limit):
                return out[:limit] if limit else out

    async def list_audit(self, prefix: str = "", identity: str = "", limit: int = 100) -> list[Any]:
        """Audit entries (idis.v1.AuditEntry) for a prefix or an identity, oldest first (all
        with ``limit`` 0). A page may hold fewer entries than asked for (pages are bounded in
        bytes too)."""
        site = await self.site_for(f"{prefix}/-" if prefix else identity)
        request = prefix_pb2.ListAuditRequest(prefix=prefix, identity=identity)
        return await self._pages(site, prefix or identity, "ListAudit", request, "entries", 1000, limit)

    async def list_prefixes(
        self, under: str = "", node_site: Site | None = None, page_size: int = 100, limit: int = 0
    ) -> list[PrefixInfo]:
        """Prefixes known to the node that hosts ``under`` (to the top-level node without one),
        in key order (all, or the first ``limit``)."""
        site = node_site or self._node_site or (await self.site_for(f"{under}/-") if under else None)
        if site is None:
            assert self._resolver is not None
            site = self._resolver.root_site
        request = prefix_pb2.ListPrefixesRequest(under=under)
        pages = await self._pages(site, under, "ListPrefixes", request, "prefixes", page_size, limit)
        return [_prefix_info(p) for p in pages]

    async def list_identifiers(self, prefix: str, page_size: int = 100, limit: int = 0) -> list[str]:
        """Identifiers directly under a hosted prefix, in key order (all, or the first ``limit``)."""
        site = await self.site_for(f"{prefix}/-")
        request = prefix_pb2.ListIdentifiersRequest(prefix=prefix)
        return [
            str(name)
            for name in await self._pages(site, prefix, "ListIdentifiers", request, "identifiers", page_size, limit)
        ]
