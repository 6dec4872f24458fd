"""The HANDLE.NET REST API (``/api/handles``, ``/api/site``, ``/api/prefixes``) over the node's
domain: thin handlers that parse the request, call the same ``Authority`` and ``Registry`` the
gRPC services call (permissions, quotas, audit and all), and answer in HSJ's JSON
(HANDLE-INTEROP.md part A). Domain errors become Handle response codes in one place,
``nodes.http.codes.failure_of``.

Differences from HSJ, on purpose (README, "HTTP API"):

* prefixes compare case-insensitively, suffixes exactly (HSJ upper-cases whole handles);
* a record needs at least one value, and removing its last value is refused (delete it);
* an index PUT with ``overwrite=true`` needs both ADD_VALUE and MODIFY_VALUE;
* listing without ``page``/``pageSize`` returns at most ``UNPAGED_LIST_MAX`` handles, else asks for
  paging (rc 4); ``pageSize`` is capped at ``MAX_PAGE``;
* a handle under a prefix delegated elsewhere gets rc 301 naming the servers (no HS_SITE referral).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from multidict import MultiMapping

from nodes.authority import Authority, PrefixKind
from nodes.http.authentication import insecure
from nodes.http.codes import RC, HandleFailure, failure_of, http_status
from nodes.http.handle_json import compact_json, value_to_json, values_of_body
from nodes.http.sessions import SessionIssuer
from nodes.registry import Registry
from nodes.trust.audit import Actor, Caller
from nodes.trust.permissions import readable_part
from nodes.trust.quotas import TokenBuckets
from resolver.cache import LookupCache
from resolver.errors import IdisError, InvalidIdentifier
from resolver.identifier import Identifier, Prefix, parse_identifier, parse_prefix
from resolver.record import AdminPermission, Record, Value, select_values
from resolver.site import Referral

log = logging.getLogger("idis.http")

MAX_BODY_BYTES = 1 << 20
"""The largest PUT body read (a record is at most 256 KiB stored; JSON and base64 add to that)."""
MAX_PAGE = 1000
UNPAGED_LIST_MAX = 10_000
MAX_LIST_OFFSET = 1_000_000
"""``page * pageSize`` beyond this is refused: an offset costs a scan of the keys before it."""
MINT_ATTEMPTS = 10

TRUE_WORDS = ("", "true", "yes")


def flag(query: Mapping[str, str], name: str, default: bool = False) -> bool:
    """A boolean query parameter as HSJ reads ``auth``, ``publicOnly``, ``pretty``..."""
    if name not in query:
        return default
    return query[name].lower() in TRUE_WORDS


def java_flag(query: Mapping[str, str], name: str, default: bool) -> bool:
    """``overwrite``, ``mintNewSuffix``: Java's ``Boolean.parseBoolean``."""
    return query[name].lower() == "true" if name in query else default


def handle_of(request: web.Request) -> str:
    """The handle: the rest of the raw path after ``/api/handles/``, percent-decoded (``+``
    kept), one leading ``/`` stripped."""
    raw = request.raw_path.partition("?")[0]
    rest = raw[len("/api/handles") :]
    text = unquote(rest, errors="strict") if "%" in rest else rest
    if text.startswith("/"):
        text = text[1:]
    return text


def _all(query: Mapping[str, str], name: str) -> list[str]:
    """Every value of a repeatable parameter (a POST's JSON parameters hold one each)."""
    if isinstance(query, MultiMapping):
        return list(query.getall(name, []))
    return [query[name]] if name in query else []


def _numbers(texts: Sequence[str]) -> list[int]:
    out = []
    for text in texts:
        try:
            out.append(int(text))
        except ValueError:
            raise HandleFailure(
                RC.PROTOCOL_ERROR, f"java.lang.NumberFormatException: For input string: {text!r}"
            ) from None
    return out


def _indexes(request: web.Request) -> list[int]:
    return _numbers(_all(request.query, "index"))


def answer(
    body: dict[str, Any], request: web.Request, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The JSON response: compact, or pretty with ``?pretty``; JSONP with ``?callback``."""
    pretty = flag(request.query, "pretty")
    text = json.dumps(body, ensure_ascii=False, indent=2) if pretty else compact_json(body)
    # JSONP only for anonymous requests: a page of another site must not read what a browser's
    # cached credentials may read.
    callback = request.query.get("callback", "") if "Authorization" not in request.headers else ""
    if callback:
        name = "".join(c for c in callback if c.isascii() and (c.isalnum() or c in "_$"))
        if name and not name[0].isdigit():
            return web.Response(
                text=f"{name}({text});", content_type="application/javascript", status=status, headers=headers
            )
    return web.Response(text=text, content_type="application/json", charset="utf-8", status=status, headers=headers)


def failure_answer(failure: HandleFailure, request: web.Request, handle: str | None) -> web.Response:
    body: dict[str, Any] = {"responseCode": int(failure.rc)}
    if failure.message:
        body["message"] = failure.message
    if handle is not None:
        body["handle"] = handle
    headers: dict[str, str] = {}
    if failure.retry_after:
        headers["Retry-After"] = str(max(1, round(failure.retry_after)))
    status = failure.status
    if status == 401 and not secure(request):  # no credentials invited over plaintext (HSJ)
        status = 403
    elif status == 401 and request.headers.get("X-Requested-With") != "XMLHttpRequest":
        headers["WWW-Authenticate"] = 'Basic realm="handle"'  # HSJ's challenge (HANDLE-INTEROP.md A.10)
    return answer(body, request, status, headers)


async def json_body(request: web.Request, limit: int, invalid: str) -> Any:
    """The request's JSON body, at most ``limit`` bytes however many pieces it came in; a Handle
    failure (rc 4) saying ``invalid`` when it does not parse."""
    too_long = HandleFailure(RC.PROTOCOL_ERROR, f"the body is over {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_long
    chunks, size = [], 0
    while True:  # read from the stream, so a chunked body stops at the limit too
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise too_long
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HandleFailure(RC.PROTOCOL_ERROR, invalid) from exc


def admit_writer(caller: Caller | None, authority: Authority, identity_limit: TokenBuckets | None, needed: str) -> None:
    """Lets a write's caller through: AUTHENTICATION_NEEDED (``needed`` says how) when the node
    requires authentication and there is none; one token of ``[quotas]
    identity_writes_per_second``, shared with gRPC (RateLimited: rc 3, 503)."""
    if caller is None and authority.permissions is not None and authority.permissions.enforce:
        raise HandleFailure(RC.AUTHENTICATION_NEEDED, needed)
    if caller is not None and identity_limit is not None and identity_limit.rate > 0:
        identity_limit.take(caller.identity.key, "identity")


async def readable(registry: Registry, record: Record, reader: Caller | None) -> Record:
    """What ``reader`` may read of ``record``, tiered read grants included."""
    if registry.templates is not None:
        return await registry.templates.readable(record, reader)
    return readable_part(record, reader, registry.authority.permissions)


def secure(request: web.Request) -> bool:
    """Whether the request came over TLS."""
    return request.transport is not None and request.transport.get_extra_info("ssl_object") is not None


class HandlesApi:
    """``/api/handles/...`` and its siblings. ``caller_of`` authenticates a request (None:
    anonymous; raises HandleFailure when credentials are offered but wrong)."""

    def __init__(
        self,
        authority: Authority,
        registry: Registry,
        caller_of: Callable[[web.Request], Any],
        site: Callable[[], dict[str, Any]],
        cache: LookupCache | None = None,
        clock: Callable[[], float] = time.time,
        sessions: SessionIssuer | None = None,
        identity_limit: TokenBuckets | None = None,
    ) -> None:
        """``cache``: the JSON answers of plain anonymous GETs by identifier key, kept coherent
        with the store by ``nodes.coherence`` like the gRPC answers."""
        self.authority = authority
        self.registry = registry
        self.caller_of = caller_of
        self.site = site
        self.cache = cache
        self.clock = clock
        self.sessions = sessions
        self.identity_limit = identity_limit
        """``[quotas] identity_writes_per_second``, shared with gRPC: a write costs one token."""
        """Issues challenges for the Handle authentication scheme (None: a plaintext listener)."""

    def routes(self) -> list[web.RouteDef]:
        return [
            web.route("*", "/api/handles", self.handles),
            web.route("*", "/api/handles/{tail:.*}", self.handles),
            web.post("/api/sessions", self.new_session),
            web.route("*", "/api/sessions/this", self.this_session),
            web.get("/api/site", self.get_site),
            web.get("/api/prefixes", self.get_prefixes),
            web.route("*", "/api/{tail:.*}", self.unknown),
        ]

    async def unknown(self, request: web.Request) -> web.Response:
        message = f"Unknown HTTP API endpoint {request.method} {request.path}"
        failure = HandleFailure(RC.PROTOCOL_ERROR, message, status=404)
        return failure_answer(failure, request, None)

    async def handles(self, request: web.Request) -> web.StreamResponse:
        if self.cache is not None and request.method == "GET" and not request.query_string:
            cached = self._cached(request)
            if cached is not None:
                return cached
        try:
            return await self._dispatch(request)
        except ConnectionResetError:  # the client left mid-request: nothing was changed, no one to answer
            log.debug("HTTP %s %s: the client went away", request.method, request.path)
            return web.Response(status=499)
        except Exception:  # a bug: logged with its traceback, answered as Handle rc 2 (HTTP 500)
            log.exception("HTTP %s %s failed", request.method, request.path)
            return failure_answer(HandleFailure(RC.ERROR, "internal error (logged on the node)"), request, None)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        handle: str | None = None
        try:
            handle = handle_of(request)
            if request.method == "OPTIONS":
                return web.Response(status=200, headers={"Allow": "GET, HEAD, POST, PUT, DELETE, TRACE, OPTIONS"})
            if request.method in ("GET", "HEAD", "POST"):
                query = await self._query_of(request)
                if not handle:
                    if "prefix" in query:
                        handle = None
                        return await self.list_handles(request, query)
                    raise HandleFailure(RC.INVALID_HANDLE, "Empty handle invalid")
                return await self.resolve(request, handle, query)
            if not handle:
                raise HandleFailure(RC.INVALID_HANDLE, "Empty handle invalid")
            if request.method == "PUT":
                return await self.put(request, handle)
            if request.method == "DELETE":
                return await self.delete(request, handle)
            raise HandleFailure(RC.PROTOCOL_ERROR, f"Unknown method {request.method}", status=501)
        except HandleFailure as failure:
            return self._failure(failure, request, handle)
        except IdisError as error:
            return self._failure(failure_of(error), request, handle)
        except UnicodeDecodeError:
            return failure_answer(HandleFailure(RC.INVALID_HANDLE, "the handle is not valid UTF-8"), request, handle)

    async def _query_of(self, request: web.Request) -> Mapping[str, str]:
        """GET's query, or POST's parameters (a JSON object body, HSJ's ``JsonParameterServletReq``)."""
        if request.method != "POST":
            return request.query
        if request.content_type != "application/json":
            return request.query
        body = await self._json_body(request)
        if not isinstance(body, dict):
            raise HandleFailure(RC.PROTOCOL_ERROR, "a POST body must be a JSON object of parameters")
        merged = dict(request.query)
        merged.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in body.items()})
        return merged

    async def _json_body(self, request: web.Request) -> Any:
        return await json_body(request, MAX_BODY_BYTES, "Invalid JSON in PUT request")

    def _actor(self, request: web.Request, caller: Caller | None) -> Actor:
        return Actor(caller, request.remote or "", f"HTTP {request.method}")

    # --- resolution --------------------------------------------------------------------------

    def _cached(self, request: web.Request) -> web.Response | None:
        """The answer to a plain anonymous GET from the cache: bytes as they were sent the last
        time the same handle text was asked, while no write has changed the record since."""
        path = request.raw_path.partition("?")[0]
        if "Authorization" in request.headers or not path.startswith(HANDLES_PATH):
            return None
        handle = path[len(HANDLES_PATH) :]
        key = _cache_key(handle)
        if key is None:
            return None
        entry = self.cache.get(key) if self.cache is not None else None
        if entry is None:
            return None
        asked, _, body = entry.partition(b"\0")
        if asked != handle.encode():
            return None
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    def _remember(self, handle: str, record: Record, body: dict[str, Any], generation: int) -> None:
        """Caches the JSON answer to a plain anonymous GET of ``handle`` (the text asked)."""
        key = _cache_key(handle)
        if self.cache is None or key is None:
            return
        data = compact_json(body).encode()
        ttl = record.cache_ttl(int(self.clock()))
        if ttl > 0:
            self.cache.set(key, handle.encode() + b"\0" + data, ttl, if_generation=generation)

    async def resolve(self, request: web.Request, handle: str, query: Mapping[str, str]) -> web.Response:
        identifier = parse_identifier(handle)
        caller = await self.caller_of(request)
        generation = self.cache.generation if self.cache is not None else 0
        found = await self.authority.answer(identifier)
        if isinstance(found, Referral):
            raise self._elsewhere(found)
        public_only = flag(query, "publicOnly", default=caller is None)
        record = found.public_view() if public_only else await readable(self.registry, found, caller)
        values = select_values(record.values, _numbers(_all(query, "index")), _all(query, "type"))
        if not values:
            empty = {"responseCode": int(RC.VALUES_NOT_FOUND), "handle": handle, "values": []}
            return answer(empty, request, http_status(RC.VALUES_NOT_FOUND, resolution=True))
        body = {"responseCode": 1, "handle": handle, "values": [value_to_json(v) for v in values]}
        if caller is None and not request.query_string and request.method == "GET":
            self._remember(handle, found, body, generation)
        return answer(body, request)

    @staticmethod
    def _elsewhere(referral: Referral) -> HandleFailure:
        servers = ", ".join(server.address for server in referral.site.servers)
        return HandleFailure(
            RC.SERVER_NOT_RESP, f"That prefix doesn't live here: {referral.prefix} is served by {servers}"
        )

    # --- writes ------------------------------------------------------------------------------

    async def _authenticated(self, request: web.Request) -> Actor:
        caller = await self.caller_of(request)
        admit_writer(caller, self.authority, self.identity_limit, "Authentication needed")
        return self._actor(request, caller)

    async def put(self, request: web.Request, handle: str) -> web.Response:
        if request.content_type != "application/json":
            message = f"java.lang.Exception: Unsupported media type {request.content_type}"
            raise HandleFailure(RC.PROTOCOL_ERROR, message)
        actor = await self._authenticated(request)
        body = await self._json_body(request)
        values, named = values_of_body(body)
        query = request.query
        overwrite = java_flag(query, "overwrite", True)
        if java_flag(query, "mintNewSuffix", False):
            return await self._mint(request, handle, values, actor)
        identifier = parse_identifier(handle)
        if named is not None and not _same_handle(named, identifier):
            raise HandleFailure(RC.PROTOCOL_ERROR, "Mismatched handle in PUT request")
        if "index" not in query:
            result = await self.registry.create(handle, values, actor, if_exists="replace" if overwrite else "refuse")
        else:
            self._check_indexes(request, values)
            if overwrite:
                result = await self.registry.put_values(handle, values, actor)
            else:  # every index is new, or it fails: a creation (201)
                result = replace(await self.registry.add_values(handle, values, actor=actor), created=True)
        return answer({"responseCode": 1, "handle": handle}, request, http_status(RC.SUCCESS, created=result.created))

    def _check_indexes(self, request: web.Request, values: Sequence[Value]) -> None:
        """An index PUT names exactly the indexes its body holds (or ``various``)."""
        if not values:
            raise HandleFailure(RC.INVALID_VALUE, "no values to add")
        if request.query.getall("index") != ["various"] and set(_indexes(request)) != {v.index for v in values}:
            raise HandleFailure(RC.PROTOCOL_ERROR, "Mismatched indexes in PUT request")

    async def _mint(self, request: web.Request, start: str, values: Sequence[Value], actor: Actor) -> web.Response:
        """``mintNewSuffix=true``: the path is a prefix and an optional start of the suffix."""
        prefix_text, _, suffix_start = start.partition("/")
        for _ in range(MINT_ATTEMPTS):
            minted = f"{prefix_text}/{suffix_start}{uuid.uuid4()}"
            try:
                await self.registry.create(minted, values, actor, if_exists="refuse")
            except IdisError as error:
                if failure_of(error).rc is RC.HANDLE_ALREADY_EXISTS:
                    continue
                raise
            return answer({"responseCode": 1, "handle": minted}, request, 201)
        raise HandleFailure(RC.ERROR, "could not mint a unique suffix")

    async def delete(self, request: web.Request, handle: str) -> web.Response:
        actor = await self._authenticated(request)
        indexes = _indexes(request)
        if indexes:
            await self.registry.remove_values(handle, indexes, actor=actor)
        else:
            await self.registry.delete(handle, actor=actor)
        return answer({"responseCode": 1, "handle": handle}, request)

    # --- listing, site, prefixes -------------------------------------------------------------

    async def list_handles(self, request: web.Request, query: Mapping[str, str]) -> web.Response:
        given = query["prefix"]
        prefix = _listed_prefix(given)
        caller = await self.caller_of(request)
        entry = self.authority.entry(prefix)
        if entry is None or entry.kind is not PrefixKind.HOSTED:
            raise HandleFailure(RC.SERVER_NOT_RESP, f"That prefix doesn't live here: {prefix}")
        permissions = self.authority.permissions
        if permissions is not None and permissions.enforce:
            if caller is None:
                raise HandleFailure(RC.AUTHENTICATION_NEEDED, "listing handles needs authentication")
            permissions.require(caller, AdminPermission.LIST_HDLS, prefix)
        paged = "page" in query and "pageSize" in query
        if paged:
            page, size = _non_negative(query["page"], "page"), _non_negative(query["pageSize"], "pageSize")
            size = min(size, MAX_PAGE)
            if page * size > MAX_LIST_OFFSET:
                raise HandleFailure(RC.PROTOCOL_ERROR, f"page * pageSize is over {MAX_LIST_OFFSET}")
            keys = await self.authority.store.list_keys_at(prefix.key, page * size, size)
        else:
            keys = await self.authority.store.list_keys(prefix.key, "", UNPAGED_LIST_MAX + 1)
            if len(keys) > UNPAGED_LIST_MAX:
                raise HandleFailure(
                    RC.PROTOCOL_ERROR, f"{prefix} holds over {UNPAGED_LIST_MAX} handles: ask with page and pageSize"
                )
        total = await self.authority.store.identifier_count(prefix.key)
        body: dict[str, Any] = {"responseCode": 1, "prefix": given, "totalCount": str(total)}
        if paged:
            body["page"], body["pageSize"] = page, size
        # Shown with the prefix as the node displays it: no record is read to list its name.
        body["handles"] = [f"{entry.prefix.display}/{k.partition('/')[2]}" for k in keys]
        return answer(body, request)

    def _failure(self, failure: HandleFailure, request: web.Request, handle: str | None) -> web.Response:
        """``failure_answer``, and on a 401 also the Handle scheme's challenge: a fresh session
        to answer on the next request (HANDLE-INTEROP.md A.10)."""
        response = failure_answer(failure, request, handle)
        if response.status == 401 and self.sessions is not None:
            session = self.sessions.issue()
            nonce = base64.b64encode(session.nonce).decode()
            response.headers.add("WWW-Authenticate", f'Handle sessionId="{session.id}", nonce="{nonce}"')
        return response

    async def new_session(self, request: web.Request) -> web.Response:
        """A challenge for the Handle authentication scheme (``nodes.http.sessions``)."""
        if self.sessions is None:
            return failure_answer(insecure(), request, None)
        session = self.sessions.issue()
        body = {"sessionId": session.id, "nonce": base64.b64encode(session.nonce).decode()}
        return answer(body, request, 201, {"Location": "/api/sessions/this"})

    async def this_session(self, request: web.Request) -> web.Response:
        """``GET``/``PUT``: whether the request's Authorization authenticates, and as whom;
        ``DELETE``: ends nothing (sessions are stateless) and says so with 204."""
        if request.method == "DELETE":
            return web.Response(status=204)
        try:
            caller = await self.caller_of(request)
        except HandleFailure as failure:
            return self._failure(failure, request, None)
        body: dict[str, Any] = {"authenticated": caller is not None}
        if caller is not None:
            body["id"] = f"{caller.key_index}:{caller.identity}"
        return answer(body, request)

    async def get_site(self, request: web.Request) -> web.Response:
        return answer({"responseCode": 1, "site": self.site()}, request)

    async def get_prefixes(self, request: web.Request) -> web.Response:
        hosted = [e.prefix.display for e in self.authority.entries() if e.kind is PrefixKind.HOSTED]
        return answer({"responseCode": 1, "totalCount": str(len(hosted)), "prefixes": hosted}, request)


HANDLES_PATH = "/api/handles/"


def _cache_key(handle: str) -> bytes | None:
    """The cache key of a handle as sent (the identifier key: prefix upper-cased), for handles
    the fast path takes: printable ASCII, no percent-encoding; None for the others. Whether the
    handle is valid was decided when its answer was cached: an entry is served only for the
    exact text it was made for."""
    if not handle.isascii() or "%" in handle or not handle.isprintable():
        return None
    prefix, sep, suffix = handle.partition("/")
    if not sep:
        return None
    return (prefix.upper() + "/" + suffix).encode()


def _same_handle(named: str, identifier: Identifier) -> bool:
    try:
        other = parse_identifier(named)
    except InvalidIdentifier:
        return False
    return other.key == identifier.key


def _listed_prefix(given: str) -> Prefix:
    text = given[len("0.NA/") :] if given.upper().startswith("0.NA/") else given
    return parse_prefix(text)


def _non_negative(text: str, name: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise HandleFailure(RC.PROTOCOL_ERROR, f"{name} must be a number") from None
    if number < 0:
        raise HandleFailure(RC.PROTOCOL_ERROR, f"{name} must not be negative")
    return number
