"""The SNMS v3 API, as enterprise systems written for the national secondary-node system call it
(``../shared/DOMAIN.md`` §4), beside the Handle REST API on the node's HTTPS listener.

* ``POST /identity/token`` ``{"username": "[index:]identity", "password": secret}``: a bearer
  token (``nodes.http.sessions.BearerTokens``) for an administrator identity and one of its
  secret keys, checked as HTTP Basic is; then ``Authorization: Bearer <token>``. A token is
  worth nothing once its key changes or is removed, and after an hour.
* ``/snms/api/v3/template``: GET ``?prefix=&version=`` (one template; without ``version``, the
  prefix's templates stored here), POST (publish), PUT (the same again succeeds; a different
  definition is refused: a published version never changes, publish the next), DELETE (refused
  for the same reason: registrations name it).
* ``/identityv2/data``: GET ``?handle=`` (and ``/identityv2/data/detail?handle=``), POST
  (register; a retry of the same is a success), PUT (replace), DELETE ``?handle=``;
  ``/identityv2/data/batchCreate|batchUpdate|batchDelete``: at most 2000 items, one transaction,
  a result per item.

Every answer is ``{"status", "message", "data"}``: status 1 is success, any other is the Handle
response code of the failure (the REST API's, ``nodes.http.codes``) with the matching HTTP
status; a template violation lists its faults in ``data.faults``. Writes go through the same
``Registry`` as gRPC and the REST API: permissions, quotas, templates and audit alike. Bodies
are described in ``nodes.http.snms_json``.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from nodes.authority import Authority
from nodes.http.api import admit_writer, json_body, readable, secure
from nodes.http.authentication import RequestAuthenticator, Unauthorized, insecure
from nodes.http.codes import RC, HandleFailure, failure_of, http_status
from nodes.http.sessions import BearerTokens
from nodes.http.snms_json import (
    naming,
    record_json,
    registration_of,
    snms_of_template,
    template_candidates,
    template_of_snms,
    version_parts,
)
from nodes.registry import BatchItemResult, Registry
from nodes.templates import MAX_NAMED_PER_CALL
from nodes.trust.audit import Actor, Caller
from nodes.trust.quotas import TokenBuckets
from resolver.errors import AlreadyExists, FailedPrecondition, IdisError, TemplateViolation
from resolver.identifier import Identifier, parse_identifier, parse_prefix
from resolver.record import Record, Value
from resolver.site import Referral
from resolver.template import REFERENCE_TYPE, Template, template_identifier, template_in
from resolver.wire import registration_pb2, value_to_pb

log = logging.getLogger("idis.http")

SUCCESS = 1
MAX_TEMPLATE_LEVELS = 4
"""Prefixes a ``templateVersion`` is looked for at: the registration's own and those above it."""
MAX_LISTED_TEMPLATES = 100
MAX_BATCH_BYTES = 16 << 20
"""The largest body read: a batch of 2000 registrations of a few dozen values each, read only
once its caller is authenticated."""
MAX_BODY_BYTES = 1 << 20
"""One registration (a record is at most 256 KiB stored) or one template."""
MAX_LOGIN_BYTES = 4096


def envelope(status: int, message: str, data: Any = None, http: int = 200) -> web.Response:
    body = {"status": status, "message": message, "data": data}
    return web.json_response(body, status=http, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def failure_envelope(failure: HandleFailure, error: IdisError | None = None) -> web.Response:
    data = {"faults": faults_of(error)} if isinstance(error, TemplateViolation) else None
    response = envelope(int(failure.rc), failure.message or failure.rc.name.lower(), data, failure.status)
    if failure.retry_after:
        response.headers["Retry-After"] = str(max(1, round(failure.retry_after)))
    if failure.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="snms"'
    return response


def faults_of(error: IdisError) -> list[dict[str, str]]:
    return [{"item": item, "reason": why} for item, why in error.violations]


def item_result(handle: str, result: BatchItemResult, done: str) -> dict[str, Any]:
    """A batch item's entry in ``data.results``."""
    if result.error is None:
        return {"handle": handle, "status": SUCCESS, "message": done, "version": result.version}
    failure = failure_of(result.error)
    out: dict[str, Any] = {"handle": handle, "status": int(failure.rc), "message": str(result.error)}
    if isinstance(result.error, TemplateViolation):
        out["faults"] = faults_of(result.error)
    return out


class SnmsApi:
    def __init__(
        self,
        authority: Authority,
        registry: Registry,
        authenticator: RequestAuthenticator,
        tokens: BearerTokens,
        identity_limit: TokenBuckets | None = None,
    ) -> None:
        self.authority = authority
        self.registry = registry
        self.authenticator = authenticator
        self.tokens = tokens
        self.identity_limit = identity_limit

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/identity/token", self._guarded(self.login)),
            web.route("*", "/snms/api/v3/template", self._guarded(self.template)),
            web.route("*", "/identityv2/data", self._guarded(self.data)),
            web.get("/identityv2/data/detail", self._guarded(self.detail)),
            web.post("/identityv2/data/batchCreate", self._guarded(self.batch_create)),
            web.post("/identityv2/data/batchUpdate", self._guarded(self.batch_update)),
            web.post("/identityv2/data/batchDelete", self._guarded(self.batch_delete)),
        ]

    @staticmethod
    def _guarded(handler: Any) -> Any:
        """Domain errors and Handle failures become the envelope, in this one place."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                response: web.StreamResponse = await handler(request)
                return response
            except HandleFailure as failure:
                return failure_envelope(failure)
            except IdisError as error:
                return failure_envelope(failure_of(error), error)
            except ConnectionResetError:
                return web.Response(status=499)
            except Exception:  # a bug: logged with its traceback, answered as rc 2 (HTTP 500)
                log.exception("SNMS %s %s failed", request.method, request.path)
                return failure_envelope(HandleFailure(RC.ERROR, "internal error (logged on the node)"))

        return guarded

    # --- who is calling ----------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        if not secure(request):
            raise insecure()
        body = await _json(request, MAX_LOGIN_BYTES)
        user, password = (body.get(k) if isinstance(body, dict) else None for k in ("username", "password"))
        if not isinstance(user, str) or not isinstance(password, str) or not user or not password:
            raise HandleFailure(RC.PROTOCOL_ERROR, 'a JSON object with "username" and "password" expected')
        caller, credential = await self.authenticator.secret_login(user, password.encode(), request.remote or "-")
        bearer = self.tokens.issue(str(caller.identity), caller.key_index, credential)
        data = {
            "token": self.tokens.token(bearer),
            "expiresIn": self.tokens.seconds,
            "identity": f"{caller.key_index}:{caller.identity}",
        }
        return envelope(SUCCESS, "success", data)

    async def _caller(self, request: web.Request) -> Caller | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return None
        if not secure(request):
            raise insecure()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized(f"authentication scheme {scheme!r} is not supported here: Bearer (POST /identity/token)")
        bearer = self.tokens.check(token.strip())
        if bearer is None:
            raise Unauthorized("unknown or expired token: POST /identity/token for a new one")
        identity = parse_identifier(bearer.identity)
        credential = await self.authenticator.credential(identity, bearer.key_index)
        if credential is None or not hmac.compare_digest(self.tokens.stamp_of(credential), bearer.stamp):
            raise Unauthorized(f"the token's key {bearer.key_index}:{identity} has changed: log in again")
        return Caller(identity, bearer.key_index)

    async def _actor(self, request: web.Request) -> Actor:
        caller = await self._caller(request)
        admit_writer(
            caller, self.authority, self.identity_limit, "Authentication needed: POST /identity/token, then Bearer"
        )
        return Actor(caller, request.remote or "", f"SNMS {request.method} {request.path}")

    # --- templates ---------------------------------------------------------------------------

    async def template(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return await self._get_template(request)
        actor = await self._actor(request)
        if request.method == "DELETE":
            identifier = _template_asked(request)
            await self.registry.delete(str(identifier), actor=actor)  # refused: published versions stay
            return envelope(SUCCESS, "deleted")
        if request.method not in ("POST", "PUT"):
            raise HandleFailure(RC.PROTOCOL_ERROR, f"Unknown method {request.method}", status=405)
        template = template_of_snms(await _json(request, MAX_BODY_BYTES))
        try:
            result = await self.registry.create(str(template.identifier), [template.value()], actor)
        except AlreadyExists:
            raise FailedPrecondition(
                f"{template.identifier} is published with another definition and never changes:"
                f" publish {template.name}.v{template.version + 1} instead"
            ) from None
        message = "created" if result.created else "unchanged"
        return envelope(SUCCESS, message, snms_of_template(template), http_status(RC.SUCCESS, created=result.created))

    async def _get_template(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)  # anyone may read templates; a token offered must be good
        if "version" not in request.query:
            prefix = parse_prefix(_query(request, "prefix"))
            start = f"{prefix.key}/TEMPLATE."
            keys = await self.authority.store.list_keys(prefix.key, start, MAX_LISTED_TEMPLATES)
            found = [await self._published(parse_identifier(k), caller) for k in keys if k.startswith(start)]
            listed = [snms_of_template(t) for t in found if t is not None]
            return envelope(SUCCESS, "success", {"prefix": prefix.display, "total": len(listed), "templates": listed})
        template = await self._published(_template_asked(request), caller)
        if template is None:
            raise HandleFailure(
                RC.HANDLE_NOT_FOUND, f"no template {request.query['version']} of {request.query.get('prefix')}"
            )
        return envelope(SUCCESS, "success", snms_of_template(template))

    async def _published(self, identifier: Identifier, caller: Caller | None) -> Template | None:
        """The template stored on this node at ``identifier``, as ``caller`` may read its record
        (None: none here, or its definition is not readable to the caller). Nothing is looked up
        elsewhere: reading templates is open to anyone, so it costs no other node anything."""
        try:
            found = await self.authority.answer(identifier)
        except IdisError:
            return None
        if not isinstance(found, Record):
            return None
        try:
            return template_in(identifier, (await readable(self.registry, found, caller)).values)
        except IdisError:
            return None

    async def _template_at(self, identifier: Identifier) -> Template | None:
        """The template a registration names, read where it is stored (through the hierarchy when
        not here): for writes, whose callers are authenticated and whose lookups are bounded."""
        if self.registry.templates is None:
            return None
        return await self.registry.templates.template(identifier)

    # --- identifiers -------------------------------------------------------------------------

    async def data(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return await self._read(request, detail=False)
        actor = await self._actor(request)
        if request.method == "DELETE":
            handle = _query(request, "handle")
            deleted = await self.registry.delete(handle, actor=actor)
            return envelope(SUCCESS, "deleted", {"handle": handle, "version": deleted})
        if request.method not in ("POST", "PUT"):
            raise HandleFailure(RC.PROTOCOL_ERROR, f"Unknown method {request.method}", status=405)
        handle, values, version = registration_of(await _json(request, MAX_BODY_BYTES))
        if version:
            resolved = await self._versions([(parse_identifier(handle), version)])
            values = _named(handle, values, version, resolved)
        if request.method == "PUT":
            result = await self.registry.replace(handle, values, actor=actor)
        else:
            result = await self.registry.create(handle, values, actor)
        message = "created" if result.created else "unchanged" if request.method == "POST" else "updated"
        data = {"handle": handle, "version": result.record.version}
        return envelope(SUCCESS, message, data, http_status(RC.SUCCESS, created=result.created))

    async def detail(self, request: web.Request) -> web.Response:
        return await self._read(request, detail=True)

    async def _read(self, request: web.Request, detail: bool) -> web.Response:
        identifier = parse_identifier(_query(request, "handle"))
        caller = await self._caller(request)
        found = await self.authority.answer(identifier)
        if isinstance(found, Referral):
            servers = ", ".join(server.address for server in found.site.servers)
            raise HandleFailure(RC.SERVER_NOT_RESP, f"{found.prefix} is served by {servers}")
        shown = await readable(self.registry, found, caller)
        return envelope(SUCCESS, "success", record_json(Record(shown.identifier, shown.values, found.version), detail))

    async def _versions(self, asked: Sequence[tuple[Identifier, str]]) -> dict[tuple[str, str], Template | str]:
        """The template each (registration, templateVersion) pair names, by (prefix key, version):
        the nearest of its prefix and the prefixes above it that has one, or why there is none.
        Each pair is looked up once, at most MAX_NAMED_PER_CALL different ones a call."""
        out: dict[tuple[str, str], Template | str] = {}
        for identifier, version in asked:
            key = (identifier.prefix.key, version)
            if key in out:
                continue
            if len(out) >= MAX_NAMED_PER_CALL:
                out[key] = f"one call names more than {MAX_NAMED_PER_CALL} template versions: {version} not read"
                continue
            try:
                candidates = template_candidates(identifier, version)[:MAX_TEMPLATE_LEVELS]
            except IdisError as error:
                out[key] = str(error)
                continue
            out[key] = f"no template {version} of {identifier.prefix} or of a prefix above it"
            for candidate in candidates:
                found = await self._template_at(candidate)
                if found is not None:
                    out[key] = found
                    break
        return out

    async def _items(self, request: web.Request, key: str) -> tuple[list[Any], list[dict[str, Any] | None]]:
        """A batch's items (a JSON list, or the list under ``key``/``data``) and a result slot for each."""
        body = await _json(request, MAX_BATCH_BYTES)
        items = body.get(key, body.get("data")) if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise HandleFailure(RC.PROTOCOL_ERROR, f'a batch is a JSON list, or an object with "{key}": [...]')
        self.registry.limits.check_batch(len(items))
        return items, [None] * len(items)

    async def _registrations(
        self, request: web.Request
    ) -> tuple[list[tuple[int, str, list[Value]]], list[dict[str, Any] | None]]:
        """A batchCreate or batchUpdate body: each item's handle, the items that parse (their
        place, handle, and values naming their template), and the results of those that do not."""
        items, results = await self._items(request, "handles")
        handles: list[str] = []
        parsed: list[tuple[int, Identifier, list[Value], str]] = []
        for n, item in enumerate(items):
            handles.append(
                item.get("handle", "") if isinstance(item, dict) and isinstance(item.get("handle"), str) else ""
            )
            try:
                handle, values, version = registration_of(item, f"items[{n}]")
                parsed.append((n, parse_identifier(handle), values, version))
            except HandleFailure as failure:
                results[n] = {"handle": handles[n], "status": int(failure.rc), "message": failure.message}
            except IdisError as error:
                results[n] = item_result(handles[n], BatchItemResult(error=error), "")
        resolved = await self._versions([(i, v) for _, i, _, v in parsed if v])
        ready: list[tuple[int, str, list[Value]]] = []
        for n, _, values, version in parsed:
            try:
                ready.append((n, handles[n], _named(handles[n], values, version, resolved) if version else values))
            except IdisError as error:
                results[n] = item_result(handles[n], BatchItemResult(error=error), "")
        return ready, results

    async def batch_create(self, request: web.Request) -> web.Response:
        actor = await self._actor(request)
        ready, results = await self._registrations(request)
        # As a gRPC BatchCreate: plain items checked and encoded by the compiled fast path.
        request_pb = registration_pb2.BatchCreateRequest(
            items=[
                registration_pb2.CreateRequest(identifier=h, values=[value_to_pb(v) for v in values])
                for _, h, values in ready
            ]
        )
        outcomes = await self.registry.batch_create_request(request_pb, actor)
        for (n, handle, _), outcome in zip(ready, outcomes, strict=True):
            results[n] = item_result(handle, outcome, "created" if outcome.created else "unchanged")
        return _batch_answer(results)

    async def batch_update(self, request: web.Request) -> web.Response:
        actor = await self._actor(request)
        ready, results = await self._registrations(request)
        outcomes = await self.registry.batch_replace([(h, v) for _, h, v in ready], actor)
        for (n, handle, _), outcome in zip(ready, outcomes, strict=True):
            results[n] = item_result(handle, outcome, "updated")
        return _batch_answer(results)

    async def batch_delete(self, request: web.Request) -> web.Response:
        actor = await self._actor(request)
        items, results = await self._items(request, "handles")
        ready: list[tuple[int, str]] = []
        for n, item in enumerate(items):
            handle = item.get("handle") if isinstance(item, dict) else item
            if isinstance(handle, str) and handle:
                ready.append((n, handle))
            else:
                message = f'items[{n}]: a handle, or an object with "handle", expected'
                results[n] = {"handle": "", "status": int(RC.INVALID_HANDLE), "message": message}
        outcomes = await self.registry.batch_delete([h for _, h in ready], actor)
        for (n, handle), outcome in zip(ready, outcomes, strict=True):
            results[n] = item_result(handle, outcome, "deleted")
        return _batch_answer(results)


def _batch_answer(results: list[dict[str, Any] | None]) -> web.Response:
    done = [r for r in results if r is not None]
    succeeded = sum(1 for r in done if r["status"] == SUCCESS)
    data = {"total": len(done), "success": succeeded, "failed": len(done) - succeeded, "results": done}
    return envelope(SUCCESS, "success" if succeeded == len(done) else "partly refused", data)


def _named(
    handle: str, values: list[Value], version: str, resolved: dict[tuple[str, str], Template | str]
) -> list[Value]:
    """``values`` naming the template ``version`` means for ``handle``; TemplateViolation when there is none."""
    identifier = parse_identifier(handle)
    template = resolved.get((identifier.prefix.key, version), f"template version {version} not looked up")
    if isinstance(template, str):
        raise TemplateViolation.of([(REFERENCE_TYPE, template)], handle)
    return naming(values, template)


def _template_asked(request: web.Request) -> Identifier:
    name, number = version_parts(_query(request, "version"))
    return template_identifier(parse_prefix(_query(request, "prefix")), name, number)


def _query(request: web.Request, name: str) -> str:
    value = request.query.get(name, "")
    if not value:
        raise HandleFailure(RC.PROTOCOL_ERROR, f"the query parameter {name!r} is needed")
    return value


async def _json(request: web.Request, limit: int) -> Any:
    return await json_body(request, limit, "the body is not JSON")
