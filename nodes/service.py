"""The gRPC servicers of registration and prefix administration: decode the request, call the
domain, encode the answer. Nothing else. (Resolution, the hot path, is ``nodes.resolution``.)

Errors are not handled here: domain exceptions propagate to ``nodes.pipeline``, which turns
them into gRPC statuses in one place. Batch methods report per-item statuses with the same
mapping (``resolver.status``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import Any

from nodes.authority import Authority, PrefixEntry, PrefixKind
from nodes.registry import BatchItemResult, Registry, WriteResult
from nodes.trust.audit import Actor, current_actor
from resolver.attestation import keys_from_json
from resolver.errors import IdisError, InvalidArgument, InvalidValue, NotFound
from resolver.identifier import parse_identifier, parse_prefix, shown
from resolver.record import ADMIN_TYPE, AdminGrant, AdminPermission, admin_value, grants_of
from resolver.wire import (
    batch_create_response,
    decode_record,
    prefix_pb2,
    prefix_pb2_grpc,
    record_to_pb,
    registration_pb2,
    registration_pb2_grpc,
    site_from_pb,
    site_to_pb,
    value_to_pb,
    values_from_pb,
)

Context = Any  # grpc.aio.ServicerContext; the stubs' generic form adds nothing here

MAX_PAGE = 1000
DEFAULT_PAGE = 100
"""Every list pages the same way: ``page_size`` (0: DEFAULT_PAGE, at most MAX_PAGE), an opaque
``page_token`` (``page_token``) and ``next_page_token``, empty after the last page."""

MAX_AUDIT_PAGE_BYTES = 256 * 1024
"""A ListAudit page holds at most page_size entries and about this many bytes (at least one
entry, itself at most 3 KB: ``nodes.trust.audit.FIELD_BYTES``), whatever the message limit."""


def _actor() -> Actor | None:
    return current_actor.get()


def _admins(values: Any) -> list[AdminGrant]:
    """The grants of a prefix's administrators: HS_ADMIN values only, each a valid grant."""
    try:
        decoded = values_from_pb(values, for_write=True)
        for v in decoded:
            if v.type != ADMIN_TYPE:
                raise InvalidValue(
                    f"value {v.index}: a prefix's administrators are {ADMIN_TYPE} values, not {v.type!r}"
                )
        return grants_of(decoded)
    except InvalidValue as exc:
        exc.field = "admins"  # the request field at fault (resolver.status)
        raise


def page_size_of(requested: int) -> int:
    """The page size a list request asks for (0: the default); over the limit is refused."""
    if requested > MAX_PAGE:
        error = InvalidArgument(f"page_size {requested} is over the limit of {MAX_PAGE}")
        error.field = "page_size"
        raise error
    return requested or DEFAULT_PAGE


def page_token(listing: str, last: str) -> str:
    """The opaque token of the page after the one that ended with ``last`` (a key or sequence
    number) in ``listing``: urlsafe base64 of both, so a token of one list is refused by another."""
    return base64.urlsafe_b64encode(f"{listing}:{last}".encode()).decode().rstrip("=")


def after_of(listing: str, token: str, valid: Callable[[str], bool]) -> str:
    """The key a page of ``listing`` starts after ('' for the first page), from its page_token;
    ``valid`` tells whether a key can be one of this listing's."""
    if not token:
        return ""
    try:
        if len(token) > 2048 or not token.isascii():
            raise ValueError("not a token")
        decoded = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True).decode()
        kind, sep, last = decoded.partition(":")
        if kind != listing or not sep or not last or not valid(last):
            raise ValueError(f"not a {listing} token")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        error = InvalidArgument(f"page_token is not a token of this {listing} listing; start again without one")
        error.field = "page_token"
        raise error from None
    return last


def _is_prefix_key(key: str) -> bool:
    """Whether ``key`` is a normalised prefix (what a ListPrefixes page token holds)."""
    try:
        return parse_prefix(key).key == key
    except IdisError:
        return False


def _written(result: WriteResult) -> registration_pb2.WriteResponse:
    return registration_pb2.WriteResponse(record=record_to_pb(result.record), created=result.created)


class RegistrationService(registration_pb2_grpc.RegistrationServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def Create(self, request: registration_pb2.CreateRequest, context: Context) -> registration_pb2.WriteResponse:
        return _written(
            await self.registry.create(request.identifier, values_from_pb(request.values, for_write=True), _actor())
        )

    async def Replace(
        self, request: registration_pb2.ReplaceRequest, context: Context
    ) -> registration_pb2.WriteResponse:
        values = values_from_pb(request.values, for_write=True)
        return _written(await self.registry.replace(request.identifier, values, request.expected_version, _actor()))

    async def Delete(
        self, request: registration_pb2.DeleteRequest, context: Context
    ) -> registration_pb2.DeleteResponse:
        version = await self.registry.delete(request.identifier, request.expected_version, _actor())
        return registration_pb2.DeleteResponse(deleted_version=version)

    async def AddValues(
        self, request: registration_pb2.ValuesRequest, context: Context
    ) -> registration_pb2.WriteResponse:
        values = values_from_pb(request.values, for_write=True)
        return _written(await self.registry.add_values(request.identifier, values, request.expected_version, _actor()))

    async def ModifyValues(
        self, request: registration_pb2.ValuesRequest, context: Context
    ) -> registration_pb2.WriteResponse:
        values = values_from_pb(request.values, for_write=True)
        return _written(
            await self.registry.modify_values(request.identifier, values, request.expected_version, _actor())
        )

    async def RemoveValues(
        self, request: registration_pb2.RemoveValuesRequest, context: Context
    ) -> registration_pb2.WriteResponse:
        indexes: Sequence[int] = list(request.indexes)
        return _written(
            await self.registry.remove_values(request.identifier, indexes, request.expected_version, _actor())
        )

    async def BatchCreate(
        self, request: registration_pb2.BatchCreateRequest, context: Context
    ) -> registration_pb2.BatchCreateResponse:
        results = await self.registry.batch_create_request(request, _actor())
        return batch_create_response(_outcome(result) for result in results)

    async def BatchReplace(
        self, request: registration_pb2.BatchCreateRequest, context: Context
    ) -> registration_pb2.BatchCreateResponse:
        results = await self.registry.batch_replace_request(request, _actor())
        return batch_create_response(_outcome(result) for result in results)

    async def BatchDelete(
        self, request: registration_pb2.BatchDeleteRequest, context: Context
    ) -> registration_pb2.BatchCreateResponse:
        results = await self.registry.batch_delete(list(request.identifiers), _actor())
        return batch_create_response(_outcome(result) for result in results)


def _outcome(result: BatchItemResult) -> tuple[IdisError | None, int, bool]:
    return result.error, result.version, result.created


def prefix_info(entry: PrefixEntry, with_admins: bool = True) -> prefix_pb2.PrefixInfo:
    """A prefix as PrefixAdmin shows it; its HS_ADMIN grants only ``with_admins``."""
    admins = entry.admins if with_admins else ()
    return prefix_pb2.PrefixInfo(
        prefix=entry.prefix.display,
        kind=prefix_pb2.PREFIX_KIND_HOSTED if entry.kind is PrefixKind.HOSTED else prefix_pb2.PREFIX_KIND_DELEGATED,
        site=site_to_pb(entry.site) if entry.site else None,
        ttl=entry.ttl,
        identifier_count=entry.identifier_count,
        admins=[value_to_pb(admin_value(i + 1, g.admin, g.index, g.permissions)) for i, g in enumerate(admins)],
        zone_key_ids=[k.kid for k in entry.zone_keys],
    )


class PrefixAdminService(prefix_pb2_grpc.PrefixAdminServicer):
    def __init__(self, authority: Authority) -> None:
        self.authority = authority

    async def CreatePrefix(self, request: prefix_pb2.CreatePrefixRequest, context: Context) -> prefix_pb2.PrefixInfo:
        return prefix_info(await self.authority.create_prefix(request.prefix, _actor(), _admins(request.admins)))

    async def DelegatePrefix(
        self, request: prefix_pb2.DelegatePrefixRequest, context: Context
    ) -> prefix_pb2.PrefixInfo:
        site = site_from_pb(request.site)
        try:
            zone_keys = keys_from_json(request.zone_keys)
        except InvalidArgument as exc:
            exc.field = "zone_keys"
            raise
        entry = await self.authority.delegate_prefix(
            request.prefix, site, request.ttl, _actor(), _admins(request.admins), zone_keys
        )
        return prefix_info(entry)

    async def RemovePrefix(self, request: prefix_pb2.RemovePrefixRequest, context: Context) -> prefix_pb2.PrefixInfo:
        return prefix_info(await self.authority.remove_prefix(request.prefix, _actor()))

    async def ListPrefixes(
        self, request: prefix_pb2.ListPrefixesRequest, context: Context
    ) -> prefix_pb2.ListPrefixesResponse:
        """The prefixes this node hosts or delegates (under ``under``), a page at a time in key
        order. Who administers a prefix (its grants) is shown only to a signed caller holding
        LIST_HDLS on it (or above it), as listing its identifiers needs; others see the prefixes
        without grants."""
        under = parse_prefix(request.under) if request.under else None
        size = page_size_of(request.page_size)
        after = after_of("prefixes", request.page_token, _is_prefix_key)
        await self.authority.refresh_counts()
        actor = _actor()
        caller = actor.caller if actor is not None else None
        permissions = self.authority.permissions

        def grants_shown(entry: PrefixEntry) -> bool:
            if permissions is None or not permissions.enforce:
                return True  # a node that checks no permissions protects nothing
            return caller is not None and permissions.holds(caller, AdminPermission.LIST_HDLS, entry.prefix)

        entries = [e for e in self.authority.entries(under) if e.prefix.key > after][: size + 1]
        page = entries[:size]
        return prefix_pb2.ListPrefixesResponse(
            prefixes=[prefix_info(e, grants_shown(e)) for e in page],
            next_page_token=page_token("prefixes", page[-1].prefix.key) if len(entries) > size else "",
        )

    async def ListIdentifiers(
        self, request: prefix_pb2.ListIdentifiersRequest, context: Context
    ) -> prefix_pb2.ListIdentifiersResponse:
        prefix = parse_prefix(request.prefix)
        entry = self.authority.entry(prefix)
        if entry is None or entry.kind is not PrefixKind.HOSTED:
            raise NotFound(f"prefix {prefix} is not hosted by this node")
        actor = _actor()
        if self.authority.permissions is not None:  # listing is the Handle LIST_HDLS right
            self.authority.permissions.require(actor.caller if actor else None, AdminPermission.LIST_HDLS, prefix)
        size = page_size_of(request.page_size)
        after = after_of("identifiers", request.page_token, lambda key: key.startswith(prefix.key + "/"))
        keys = await self.authority.store.list_keys(prefix.key, after, size + 1)
        more = len(keys) > size
        keys = keys[:size]
        rows = await self.authority.store.get_many(keys)  # one query for the page's display names
        names = [str(decode_record(rows[k].record).identifier) if k in rows else k for k in keys]
        return prefix_pb2.ListIdentifiersResponse(
            identifiers=names, next_page_token=page_token("identifiers", keys[-1]) if more else ""
        )

    async def ListAudit(self, request: prefix_pb2.ListAuditRequest, context: Context) -> prefix_pb2.ListAuditResponse:
        size = page_size_of(request.page_size)
        token = after_of("audit", request.page_token, str.isdigit)
        after = int(token) if token else request.after  # ``after``: clients from before page tokens
        if not request.prefix and not request.identity:
            raise InvalidArgument("name a prefix or an identity")
        prefix = parse_prefix(request.prefix) if request.prefix else None
        identity = parse_identifier(request.identity) if request.identity else None
        actor = _actor()
        permissions = self.authority.permissions
        if permissions is not None and actor is not None:
            own = identity is not None and actor.caller is not None and actor.caller.identity == identity
            if not own:
                target = prefix or self.authority.apexes[0]
                permissions.require(actor.caller, AdminPermission.LIST_HDLS, target)
        recorded_as = shown(identity.display) if identity else ""  # identities are recorded shown
        rows = await self.authority.store.list_audit(prefix.key if prefix else "", recorded_as, after, size + 1)
        entries: list[prefix_pb2.AuditEntry] = []
        page_bytes = 0
        for seq, r in rows[:size]:
            entry = prefix_pb2.AuditEntry(
                seq=seq,
                at=int(r.at),
                identity=r.identity,
                key_index=r.key_index,
                peer=r.peer,
                method=r.method,
                target=r.target,
                result=r.result,
                detail=r.detail,
            )
            page_bytes += entry.ByteSize() + 4
            if entries and page_bytes > MAX_AUDIT_PAGE_BYTES:
                break  # the page is full; the rest is on the next one
            entries.append(entry)
        more = len(entries) < len(rows)
        return prefix_pb2.ListAuditResponse(
            entries=entries, next_page_token=page_token("audit", str(entries[-1].seq)) if more else ""
        )
