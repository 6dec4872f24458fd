"""The resolution page: ``GET /`` (a search box) and ``GET /{identifier}`` on every node's HTTP
interface, for people with a browser and for scripts that want one record as JSON.

Any node's page shows any identifier, not only the node's own: it resolves through the
hierarchy with the resolver library (``resolver.resolver.Resolver``), from the roots of
``[recursion]``, else of ``[auth]``, else the node itself, following referrals as any client
does, and shows the chain it took (``Trace``). The resolver is anonymous (unsigned), so nodes
answer it public values only; nothing private can reach the page.

* A record with a URL value (type ``URL``, the first by index) redirects there (302) when the
  URL is ``http``/``https`` and the query has no ``noredirect``; otherwise, and always for JSON,
  the record is shown: every value (data as text, or base64 when binary), the referral chain.
* JSON when asked (``?format=json``, or ``Accept`` preferring ``application/json`` to
  ``text/html``): the REST API's ``{"responseCode":1,"handle":...,"values":[...]}`` plus
  ``"trace"``; not found is ``{"responseCode":100,"handle":...}``.
* Statuses: 404 not found, 400 an invalid identifier, 502 when resolution failed (unreachable
  servers, a loop, a timeout, an answer beyond its authority), 429 over the per-peer rate, 503
  (with Retry-After) when too many resolutions are in flight or a node's quota refused. Never a
  traceback.

Values are whatever registrants wrote, so every piece of data is HTML-escaped, only ``http`` and
``https`` URLs become links (``rel="noopener noreferrer nofollow"``) or redirects, and every
answer carries a Content-Security-Policy that allows no script at all and only this module's
own style sheet (by its hash).

What an anonymous visitor can make the node do is bounded: ``PAGE_RATE`` resolutions a second
per peer address (burst ``PAGE_BURST``), ``MAX_IN_FLIGHT`` at once, each within the resolver's
hop limit and per-call timeout and ``DEADLINE_CALLS`` of those timeouts in all; the identifier
grammar limits the question to 255 bytes; answers are cached for at most ``PAGE_MAX_TTL``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from aiohttp import web

from nodes.config import NodeConfig
from nodes.http.codes import RC, HandleFailure, failure_of
from nodes.http.handle_json import compact_json, permissions_text, value_to_json
from nodes.tls import client_tls
from nodes.trust.quotas import RateLimited, TokenBuckets
from resolver.cache import LookupCache
from resolver.channels import ChannelPool
from resolver.errors import IdisError
from resolver.identifier import Identifier, parse_identifier
from resolver.record import Record, Value
from resolver.resolver import Resolver, Trace

log = logging.getLogger("idis.http.page")

PAGE_RATE = 20.0
"""Resolutions a second one peer address may ask of the page (sustained)..."""
PAGE_BURST = 40.0
"""...and at once."""
MAX_IN_FLIGHT = 64
"""Resolutions under way at once in one process; beyond, 503."""
PAGE_MAX_TTL = 300
"""Seconds the page's resolver keeps any answer, whatever TTL the nodes give it."""
DEADLINE_CALLS = 3
"""A whole resolution may take this many ``[recursion] timeout``s (each call has one)."""
CACHE_ENTRIES = 10_000
CACHE_BYTES = 16 * 1024 * 1024
MAX_URL_CHARS = 8192
"""A URL value longer than this is shown, not followed."""
MAX_ACCEPT_RANGES = 32

STYLE = (
    "body{font:15px/1.5 system-ui,sans-serif;margin:0;color:#1d2733;background:#f5f7fa}"
    "header{background:#1d3557;color:#fff;padding:.8em 1.5em}"
    "header a{color:#fff;text-decoration:none;font-weight:600}"
    "main{max-width:72em;margin:0 auto;padding:.5em 1.5em 2em}"
    "form.search{display:flex;flex-wrap:wrap;gap:.5em;align-items:center;margin:1em 0}"
    "form.search input[type=text]{flex:1 1 20em;font:inherit;padding:.45em}"
    "button{font:inherit;padding:.45em 1.2em;background:#1d3557;color:#fff;border:0;border-radius:3px}"
    "table{border-collapse:collapse;width:100%;background:#fff}"
    "th,td{border:1px solid #d0d7de;padding:.4em .6em;text-align:left;vertical-align:top}"
    "th{background:#eef2f6}"
    ".data{white-space:pre-wrap;overflow-wrap:anywhere}"
    "td.nowrap{white-space:nowrap}"
    "code,.data{font-family:ui-monospace,monospace;font-size:.93em}"
    ".muted{color:#5b6672}"
    ".error{border-left:4px solid #c62828;background:#fff;padding:.6em 1em}"
    "ol.trace li{margin:.25em 0}"
)
STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{STYLE_HASH}'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
LINK_REL = "noopener noreferrer nofollow"

_PAGE_STATUS = {RC.HANDLE_NOT_FOUND: 404, RC.INVALID_HANDLE: 400}
"""The status of a failed resolution by its response code; any other is the servers' failure:
502, or 503 when they said when to retry (a quota)."""
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


def page_roots(config: NodeConfig, grpc_address: str) -> list[str]:
    """Where the page's resolutions start: ``[recursion] roots``, else ``[auth] roots``, else
    this node itself (a wildcard listen address reached over loopback)."""
    if config.recursion.roots or config.auth.roots:
        return list(config.recursion.roots or config.auth.roots)
    host, _, port = grpc_address.rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    return [f"{host}:{port}"]


def page_resolver(config: NodeConfig, grpc_address: str) -> Resolver:
    """The page's one resolver: anonymous, caching, its TTLs capped at ``PAGE_MAX_TTL``."""
    return Resolver(
        page_roots(config, grpc_address),
        cache=LookupCache(CACHE_ENTRIES, CACHE_BYTES),
        channels=ChannelPool(client_tls(config)),
        max_hops=config.recursion.max_hops,
        timeout=config.recursion.timeout,
        max_ttl=min(PAGE_MAX_TTL, config.recursion.max_ttl),
    )


def safe_url(text: str) -> str | None:
    """``text`` as a URL fit for a link or a ``Location`` (non-ASCII percent-encoded) when it is
    an absolute ``http``/``https`` URL with a host and no whitespace or control character;
    None for anything else (``javascript:``, ``data:``, relative, malformed)."""
    if (
        not text
        or len(text) > MAX_URL_CHARS
        or any(c.isspace() or ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)
    ):
        return None
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    return quote(text, safe=_PRINTABLE_ASCII)


def identifier_path(identifier: str) -> str:
    """The page's path for ``identifier``: percent-encoded, its ``/`` kept readable unless a
    ``.`` or ``..`` segment would let a browser rewrite the path."""
    dot_segment = any(segment in (".", "..") for segment in identifier.split("/"))
    return "/" + quote(identifier, safe="" if dot_segment else "/")


def identifier_text(request: web.Request) -> str:
    """The identifier asked: the raw path after ``/``, percent-decoded (``+`` kept);
    UnicodeDecodeError when the bytes are not UTF-8."""
    raw = request.raw_path.split("?", 1)[0][1:]
    return unquote(raw, errors="strict") if "%" in raw else raw


def wants_json(request: web.Request) -> bool:
    """``?format=json``, or an ``Accept`` header preferring ``application/json`` to ``text/html``."""
    chosen = request.query.get("format", "").lower()
    if chosen in ("json", "html"):
        return chosen == "json"
    accept = request.headers.get("Accept", "")
    return _quality(accept, "application/json") > _quality(accept, "text/html")


def _quality(accept: str, media_type: str) -> float:
    """The q of ``media_type`` in ``accept``: that of its most specific matching range."""
    kind = media_type.partition("/")[0]
    specificity = {media_type: 2, f"{kind}/*": 1, "*/*": 0}
    best, best_rank = 0.0, -1
    for part in accept.split(",")[:MAX_ACCEPT_RANGES]:
        media, *params = part.split(";")
        rank = specificity.get(media.strip().lower(), -1)
        if rank > best_rank:
            best, best_rank = _q(params), rank
    return best


def _q(params: Sequence[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return min(1.0, max(0.0, float(value)))
            except ValueError:
                return 0.0
    return 1.0


def _failure(error: HandleFailure | IdisError | UnicodeDecodeError) -> tuple[HandleFailure, str]:
    """A failed request as the page answers it (a resolution's status by ``_PAGE_STATUS``), and
    the message a person reads (the JSON for NOT_FOUND has none, as in the REST API)."""
    if isinstance(error, HandleFailure):  # the page's own refusals, their status set
        return error, error.message
    if isinstance(error, UnicodeDecodeError):
        return HandleFailure(RC.INVALID_HANDLE, "", status=400), "the identifier is not valid UTF-8"
    failure = failure_of(error)
    status = _PAGE_STATUS.get(failure.rc, 503 if failure.retry_after else 502)
    return HandleFailure(failure.rc, failure.message, failure.retry_after, status=status), str(error)


@dataclass(frozen=True)
class NodeInfo:
    """What the page says about the node serving it."""

    name: str
    role: str
    apexes: tuple[str, ...]
    roots: tuple[str, ...]


class ResolutionPage:
    """``GET /`` and ``GET /{identifier}``: registered after the REST API, so ``/api/...`` is
    never an identifier."""

    def __init__(self, config: NodeConfig, resolver: Resolver) -> None:
        self.resolver = resolver
        roots = tuple(server.address for server in resolver.root_site.servers)
        self.node = NodeInfo(config.node.name, config.node.role, tuple(config.authority.apexes), roots)
        self.buckets = TokenBuckets(PAGE_RATE, PAGE_BURST)
        self.deadline = DEADLINE_CALLS * resolver.timeout
        self._in_flight = 0

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.home),
            web.get("/favicon.ico", self.no_icon),
            web.get("/{identifier:.+}", self.identifier),
        ]

    async def home(self, request: web.Request) -> web.Response:
        """The search box; its form (``/?id=...``) is redirected to the identifier's page."""
        asked = request.query.get("id", "").strip()
        if asked:
            location = identifier_path(asked) + ("?noredirect" if "noredirect" in request.query else "")
            return _redirect(location)
        return _html("Identifier resolution", _home_body(self.node), 200, self.node, _search_form())

    async def no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=404, headers=SECURITY_HEADERS)

    async def identifier(self, request: web.Request) -> web.Response:
        as_json = wants_json(request)
        text = request.raw_path.split("?", 1)[0][1:]
        trace = Trace()
        try:
            self._admit(request)
            text = identifier_text(request)
            record = await self._resolve(parse_identifier(text), trace)
        except (HandleFailure, IdisError, UnicodeDecodeError) as error:
            failure, message = _failure(error)
            return self._failed(failure, message, text, trace, as_json)
        if as_json:
            return _json(_record_json(text, record, trace), 200)
        target = _redirect_target(record)
        if target is not None and "noredirect" not in request.query:
            return _redirect(target)
        search = _search_form(text, "noredirect" in request.query)
        return _html(str(record.identifier), _record_body(record, trace, target), 200, self.node, search)

    def _admit(self, request: web.Request) -> None:
        """The peer's token for one resolution; 429 when it has none, 503 when too many run."""
        peer = request.remote or "unknown"
        try:
            self.buckets.take(peer, "peer address")
        except RateLimited as limited:
            raise HandleFailure(RC.SERVER_TOO_BUSY, str(limited), limited.retry_after, status=429) from None
        if self._in_flight >= MAX_IN_FLIGHT:
            raise HandleFailure(RC.SERVER_TOO_BUSY, "too many resolutions under way: retry", 1.0, status=503)

    async def _resolve(self, identifier: Identifier, trace: Trace) -> Record:
        """Through the hierarchy, within the deadline; any failure as a HandleFailure or IdisError."""
        self._in_flight += 1
        try:
            async with asyncio.timeout(self.deadline):
                return await self.resolver.resolve(identifier, trace)
        except TimeoutError:
            message = f"resolving {identifier} took over {self.deadline:g} s: the servers are too slow"
            raise HandleFailure(RC.ERROR, message, status=502) from None
        except IdisError:
            raise
        except Exception:  # the page answers, whatever broke below it
            log.exception("%s: resolving %s for the page failed", self.node.name, identifier)
            raise HandleFailure(RC.ERROR, f"resolving {identifier} failed unexpectedly", status=502) from None
        finally:
            self._in_flight -= 1

    def _failed(self, failure: HandleFailure, message: str, text: str, trace: Trace, as_json: bool) -> web.Response:
        headers = {"Retry-After": str(max(1, round(failure.retry_after)))} if failure.retry_after else {}
        if as_json:
            body: dict[str, Any] = {"responseCode": int(failure.rc), "handle": text}
            if failure.rc is not RC.HANDLE_NOT_FOUND:
                body["message"] = message
                body["trace"] = _trace_json(trace)
            return _json(body, failure.status, headers)
        content = _error_body(text, failure.status, message, trace)
        return _html(f"{failure.status}: {text}", content, failure.status, self.node, _search_form(text), headers)


# --- answers ---------------------------------------------------------------------------------


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> web.Response:
    text = compact_json(body)
    all_headers = {**SECURITY_HEADERS, "Vary": "Accept", **(headers or {})}
    return web.Response(text=text, content_type="application/json", charset="utf-8", status=status, headers=all_headers)


def _redirect(location: str) -> web.Response:
    link = html.escape(location)
    body = f'<!doctype html><title>Redirect</title><p>Moved to <a href="{link}" rel="{LINK_REL}">{link}</a></p>'
    headers = {**SECURITY_HEADERS, "Location": location, "Vary": "Accept"}
    return web.Response(text=body, content_type="text/html", charset="utf-8", status=302, headers=headers)


def _html(
    title: str,
    content: str,
    status: int,
    node: NodeInfo,
    search: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A page: the node's banner, the search form, ``content``; the security headers."""
    e = html.escape
    about = f"node {node.name} · {node.role} · apexes {', '.join(node.apexes) or 'none'}"
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{e(title)} · IDIS</title><style>{STYLE}</style></head><body>"
        f'<header><a href="/">IDIS identifier resolution</a> <span>· {e(about)}</span></header>'
        f"<main>{search}{content}</main></body></html>"
    )
    all_headers = {**SECURITY_HEADERS, "Vary": "Accept", **(headers or {})}
    return web.Response(text=page, content_type="text/html", charset="utf-8", status=status, headers=all_headers)


# --- HTML ------------------------------------------------------------------------------------


def _search_form(asked: str = "", noredirect: bool = False) -> str:
    checked = " checked" if noredirect else ""
    return (
        '<form class="search" method="get" action="/" role="search">'
        f'<input type="text" name="id" value="{html.escape(asked)}" placeholder="88.100.1/SN-0001"'
        ' aria-label="Identifier" required autofocus>'
        f'<label><input type="checkbox" name="noredirect"{checked}> show the record, do not follow its URL</label>'
        "<button type=submit>Resolve</button></form>"
    )


def _home_body(node: NodeInfo) -> str:
    e = html.escape
    apexes = ", ".join(f"<code>{e(a)}</code>" for a in node.apexes) or "no prefix"
    roots = ", ".join(f"<code>{e(r)}</code>" for r in node.roots)
    return (
        "<h1>Resolve an identifier</h1>"
        f"<p>This is node <strong>{e(node.name)}</strong>, a {e(node.role)} node authoritative for {apexes}."
        f" It resolves any identifier through the hierarchy, starting at {roots} and following referrals,"
        " and shows its public values. A record with a URL sends you there unless you tick the box.</p>"
        '<p class="muted">As JSON: <code>/IDENTIFIER?format=json</code> (or <code>Accept: application/json</code>).'
        " Registration and the rest: the HANDLE.NET REST API under <code>/api/handles/</code>.</p>"
    )


def _redirect_target(record: Record) -> str | None:
    """The first URL value's URL (by index) when it may be followed."""
    urls = sorted((v for v in record.values if v.type == "URL"), key=lambda v: v.index)
    return _url_of(urls[0]) if urls else None


def _url_of(value: Value) -> str | None:
    data = value_to_json(value)["data"]
    return safe_url(data["value"]) if data["format"] == "string" else None


def _record_body(record: Record, trace: Trace, target: str | None) -> str:
    e = html.escape
    count = len(record.values)
    follow = f' · <a href="{e(target)}" rel="{LINK_REL}">follow its URL</a>' if target is not None else ""
    rows = "".join(_value_row(v) for v in sorted(record.values, key=lambda v: v.index))
    values = (
        "<table><thead><tr><th>Index</th><th>Type</th><th>Data</th><th>TTL</th><th>Timestamp (UTC)</th>"
        f"<th>Permissions</th><th>References</th></tr></thead><tbody>{rows}</tbody></table>"
        if count
        else "<p>The record has no public values.</p>"
    )
    return (
        f'<h1 class="identifier">{e(str(record.identifier))}</h1>'
        f'<p class="muted">version {record.version} · {count} public value{"" if count == 1 else "s"}'
        f' · <a href="?format=json">JSON</a>{follow}</p>'
        f"{values}{_trace_section(trace)}"
    )


def _value_row(value: Value) -> str:
    e = html.escape
    shown = value_to_json(value)
    ttl = shown["ttl"]
    ttl_text = f"{ttl} s" if isinstance(ttl, int) else f"until {ttl}"
    references = "<br>".join(
        f'<a href="{e(identifier_path(r.identifier))}?noredirect">{e(r.identifier)}</a> (index {r.index})'
        for r in value.references
    )
    return (
        f'<tr class="value"><td>{value.index}</td><td><code>{e(value.type)}</code></td>'
        f'<td>{_data_cell(value, shown["data"])}</td><td class="nowrap">{e(ttl_text)}</td>'
        f'<td class="nowrap">{e(shown.get("timestamp", "–"))}</td>'
        f"<td><code>{permissions_text(value.permissions)}</code></td><td>{references}</td></tr>"
    )


def _data_cell(value: Value, data: dict[str, Any]) -> str:
    e = html.escape
    kind = data["format"]
    if kind == "admin":
        admin = data["value"]
        return (
            f'<span class="data">{e(admin["handle"])} (index {admin["index"]})</span>'
            f' <span class="muted">permissions {e(admin["permissions"])}</span>'
        )
    if kind == "base64":
        return f'<span class="muted">base64</span> <span class="data">{e(data["value"])}</span>'
    url = safe_url(data["value"])
    if url is not None:
        return f'<a class="data" href="{e(url)}" rel="{LINK_REL}">{e(data["value"])}</a>'
    return f'<span class="data">{e(data["value"])}</span>'


def _trace_section(trace: Trace) -> str:
    e = html.escape
    items = "".join(
        f"<li><code>{e('this page’s cache' if h.server == 'cache' else h.server)}</code>: {e(h.outcome)}"
        f' <span class="muted">({h.elapsed * 1000:.1f} ms)</span></li>'
        for h in trace.hops
    )
    if not items:
        return ""
    return f'<h2>Referral chain</h2><ol class="trace">{items}</ol>'


def _error_body(asked: str, status: int, message: str, trace: Trace) -> str:
    e = html.escape
    headline = {404: "Not found", 400: "Not a valid identifier", 429: "Too many requests"}.get(
        status, "Resolution failed"
    )
    return (
        f'<h1>{e(headline)}</h1><div class="error"><p><code>{e(asked)}</code></p>'
        f"<p>{e(message)}</p></div>{_trace_section(trace)}"
    )


# --- JSON ------------------------------------------------------------------------------------


def _trace_json(trace: Trace) -> list[dict[str, Any]]:
    return [
        {"server": h.server, "question": h.question, "outcome": h.outcome, "milliseconds": round(h.elapsed * 1000, 3)}
        for h in trace.hops
    ]


def _record_json(asked: str, record: Record, trace: Trace) -> dict[str, Any]:
    values = [value_to_json(v) for v in sorted(record.values, key=lambda v: v.index)]
    code = RC.SUCCESS if values else RC.VALUES_NOT_FOUND
    return {"responseCode": int(code), "handle": asked, "values": values, "trace": _trace_json(trace)}
