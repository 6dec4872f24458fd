"""The node's HTTP interface: the HANDLE.NET REST API (``nodes.http.api``), the national SNMS v3
registration API (``nodes.http.snms``) and the resolution page (``nodes.http.page``) on aiohttp,
on the node's own event loop (uvloop), in every worker process (``SO_REUSEPORT``, like gRPC).

aiohttp rather than an ASGI framework on uvicorn: it runs inside the loop the node already runs,
takes the node's ``ssl.SSLContext`` as it is, exposes the raw request path (HSJ handles keep
their ``/`` unencoded, so routing must see the path as sent), and adds no second server and
no protocol adapter between the socket and the handler.

TLS follows ``[tls]``: the node's certificate and key; with ``[tls] ca`` the server asks for an
optional client certificate chained to it (``require_client_cert``: demands one), which the
REST API's client-certificate authentication then matches against the identity's HS_PUBKEY.
With ``[tls] mode = "off"``, plaintext, and every request is anonymous.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from aiohttp import web

from nodes.authority import Authority
from nodes.config import NodeConfig
from nodes.http.api import HandlesApi, failure_answer
from nodes.http.authentication import RequestAuthenticator
from nodes.http.codes import failure_of
from nodes.http.page import ResolutionPage, page_resolver
from nodes.http.sessions import BearerTokens, SessionIssuer
from nodes.http.snms import MAX_BATCH_BYTES, SnmsApi
from nodes.registry import Registry
from nodes.trust.authentication import audiences_of
from nodes.trust.quotas import Quotas, RateLimited, TokenBuckets
from resolver.cache import LookupCache
from resolver.resolver import Resolver

log = logging.getLogger("idis.http")


def server_tls(config: NodeConfig) -> ssl.SSLContext | None:
    """The HTTPS context of ``[tls]``; None when TLS is off."""
    if config.tls.mode != "required":
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.path(config.tls.cert), config.path(config.tls.key))
    if config.tls.ca:
        context.load_verify_locations(config.path(config.tls.ca))
        context.verify_mode = ssl.CERT_REQUIRED if config.tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def site_info(config: NodeConfig, address: str, http_port: int) -> dict[str, Any]:
    """This server's HS_SITE in HSJ's JSON form (HANDLE-INTEROP.md A.4.3)."""
    host = address.rpartition(":")[0]
    return {
        "version": 1,
        "protocolVersion": "2.11",
        "serialNumber": 1,
        "primarySite": True,
        "multiPrimary": False,
        "attributes": [{"name": "desc", "value": f"IDIS {config.node.role} node {config.node.name}"}],
        "servers": [
            {
                "serverId": 1,
                "address": host.strip("[]"),
                "interfaces": [{"query": True, "admin": True, "protocol": "HTTP", "port": http_port}],
            }
        ],
    }


def peer_quota(peers: TokenBuckets) -> Any:
    """Every request costs its peer one token of ``[quotas] peer_calls_per_second`` (the budget
    its gRPC calls spend too); beyond it: Handle rc 3, HTTP 503 with Retry-After."""

    @web.middleware
    async def admit(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            peers.take(request.remote or "-", "peer")  # the bucket gRPC's pipeline charges too
        except RateLimited as refused:
            return failure_answer(failure_of(refused), request, None)
        response: web.StreamResponse = await handler(request)
        return response

    return admit


class HttpInterface:
    """The running HTTP server of one node process, and the resolver of its resolution page."""

    def __init__(self, runner: web.AppRunner, port: int, resolver: Resolver) -> None:
        self.runner = runner
        self.port = port
        self.resolver = resolver

    @classmethod
    async def start(
        cls,
        config: NodeConfig,
        authority: Authority,
        registry: Registry,
        listen: str,
        grpc_address: str,
        reuse_port: bool = False,
        cache: LookupCache | None = None,
        quotas: Quotas | None = None,
    ) -> HttpInterface:
        """Serves on ``listen`` (port 0: any); OSError when it cannot bind."""
        context = server_tls(config)
        # The key is the database's: a session opened with one server of a site is good with the others.
        sessions = SessionIssuer(await authority.store.shared_secret("http-sessions"))
        authenticate = RequestAuthenticator(
            authority,
            secure=context is not None,
            sessions=sessions,
            anchors=config.auth.anchors(config.base_dir),
            anchor_secrets=config.auth.anchor_secrets(config.base_dir),
        )
        port_holder: dict[str, int] = {"port": 0}
        api = HandlesApi(
            authority,
            registry,
            authenticate,
            lambda: site_info(config, grpc_address, port_holder["port"]),
            cache,
            sessions=sessions if context is not None else None,
            identity_limit=quotas.identities if quotas is not None else None,
        )
        resolver = page_resolver(config, grpc_address)
        middlewares = [peer_quota(quotas.peers)] if quotas is not None and quotas.peers.rate > 0 else []
        snms = SnmsApi(
            authority,
            registry,
            authenticate,
            BearerTokens(await authority.store.shared_secret("snms-tokens")),
            identity_limit=quotas.identities if quotas is not None else None,
        )
        # Each API checks its own limit (the REST API's is 1 MiB); a batch of 2000 may need more.
        app = web.Application(client_max_size=MAX_BATCH_BYTES, middlewares=middlewares)
        app.add_routes(api.routes())
        app.add_routes(snms.routes())
        app.add_routes(ResolutionPage(config, resolver).routes())  # after /api/...: never an identifier
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, _, port_text = listen.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port_text), ssl_context=context, reuse_port=reuse_port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            await resolver.close()
            raise
        port = int(runner.addresses[0][1])
        authenticate.audiences = audiences_of(f"{host}:{port}", config.auth.audiences)
        port_holder["port"] = port
        scheme = "https" if context is not None else "http"
        if context is None:
            log.warning("%s: [tls] mode is off: serving plaintext HTTP on %s", config.node.name, listen)
        log.info("%s: HTTP API on %s://%s:%d/api/handles/, resolution page at /", config.node.name, scheme, host, port)
        return cls(runner, port, resolver)

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.resolver.close()
