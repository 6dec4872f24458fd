"""One node process: store, authority, registry, cache and the gRPC server, built from a NodeConfig."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nodes.attesting import Attesting
from nodes.authority import Authority, PrefixKind
from nodes.coherence import Coherence, PrefixWatch
from nodes.config import NodeConfig
from nodes.handle.answers import HandleAnswers, own_handle_site
from nodes.handle.server import HandleInterface
from nodes.http.server import HttpInterface
from nodes.metrics import NodeMetrics, PrefixSnapshot, Probes, file_prefixes, serve_metrics, shared_metrics_directory
from nodes.pipeline import RequestPipeline
from nodes.proofs import Proofs
from nodes.ready import announce_status
from nodes.registry import Registry
from nodes.resolution import ResolutionService
from nodes.service import PrefixAdminService, RegistrationService
from nodes.storage import Store, Transaction, open_store
from nodes.storage.postgres import ChangeFeed, PostgresStore
from nodes.storage.sqlite import SqliteStore
from nodes.templates import Templates
from nodes.tls import client_tls
from nodes.trust.attester import Attester
from nodes.trust.audit import RefusalTrail
from nodes.trust.authentication import Authenticator, audiences_of
from nodes.trust.permissions import Permissions
from nodes.trust.quotas import Quotas, StreamCounter, TokenBuckets
from nodes.trust.zone_keys import ZoneKeys
from resolver.attestation import Validator, load_anchor
from resolver.cache import IMPLEMENTATION, ChangeLog, LookupCache
from resolver.channels import ChannelPool, ClientTLS
from resolver.errors import NotFound
from resolver.identifier import Identifier, parse_prefix
from resolver.record import Record
from resolver.resolver import Resolver
from resolver.wire import prefix_pb2, prefix_pb2_grpc, registration_pb2, registration_pb2_grpc, resolution_pb2

log = logging.getLogger("idis.node")

FEED_START_WAIT = 10.0
"""Seconds a node on PostgreSQL waits to be listening for other processes' changes before it
serves anyway (what it caches before it listens is forgotten once it does)."""
PREFIX_COUNT_INTERVAL = 10.0
"""Seconds between reads of the per-prefix counts, on a store scrapes cannot read themselves."""

SERVICE_NAMES = (
    resolution_pb2.DESCRIPTOR.services_by_name["Resolution"].full_name,
    registration_pb2.DESCRIPTOR.services_by_name["Registration"].full_name,
    prefix_pb2.DESCRIPTOR.services_by_name["PrefixAdmin"].full_name,
)


def _validator(config: NodeConfig) -> Validator | None:
    """Validation of what the node resolves from other nodes (recursion, administrators' keys),
    when [signing] anchor names a trust anchor: a rogue node cannot inject a record or a key."""
    return Validator(load_anchor(config.path(config.signing.anchor))) if config.signing.anchor else None


def _recursor(config: NodeConfig, metrics: NodeMetrics, outgoing: ClientTLS | None) -> Resolver | None:
    """The resolver answering Resolve(recursive=true), when [recursion] is enabled."""
    if not config.recursion.enabled:
        return None
    return Resolver(
        config.recursion.roots,
        validator=_validator(config),
        channels=ChannelPool(outgoing),
        max_hops=config.recursion.max_hops,
        timeout=config.recursion.timeout,
        on_resolved=metrics.resolver_hops.observe,
        max_ttl=config.recursion.max_ttl,
    )


def _authenticator(config: NodeConfig, authority: Authority, outgoing: ClientTLS | None) -> Authenticator | None:
    """Sets the authority's permissions and returns the verifier of signed calls (None when
    [auth] mode is off); keys of other nodes' administrators are looked up from [auth] roots."""
    auth = config.auth
    anchors = auth.anchors(config.base_dir)
    required = auth.mode == "required"
    authority.permissions = Permissions(authority.grants_on, authority.apexes, anchors, enforce=required)
    if not required:
        log.warning("%s: [auth] mode is off: anyone who reaches this node can write to it", config.node.name)
        return None
    key_resolver = None
    if auth.roots:  # answers are kept by the authenticator alone, for key_cache_ttl
        key_resolver = Resolver(
            auth.roots,
            channels=ChannelPool(outgoing, max_channels=16),
            cache=LookupCache(10_000, 8 * 1024 * 1024),
            timeout=auth.key_lookup_timeout,
            max_ttl=max(1, int(auth.key_cache_ttl)),
            cache_answers=False,
            validator=_validator(config),
        )
    return Authenticator(
        authority.answer,
        anchors,
        key_resolver.resolve if key_resolver is not None else None,
        auth.max_clock_skew,
        key_cache_ttl=auth.key_cache_ttl,
        negative_ttl=auth.key_negative_ttl,
        lookup_timeout=auth.key_lookup_timeout,
        lookup_limit=TokenBuckets(auth.key_lookups_per_second, auth.key_lookup_burst),
    )


def _templates(config: NodeConfig, authority: Authority, outgoing: ClientTLS | None) -> Templates:
    """What registrations are checked against: templates stored here, or resolved from [auth]
    roots (validated like every other lookup when the node has a trust anchor)."""
    resolve = None
    if config.auth.roots:
        resolver = Resolver(
            config.auth.roots,
            channels=ChannelPool(outgoing, max_channels=4),
            cache=LookupCache(1_000, 4 * 1024 * 1024),
            timeout=config.auth.key_lookup_timeout,
            validator=_validator(config),
        )

        async def resolve(identifier: Identifier) -> Record:
            answer = await resolver.resolve(str(identifier))
            if not isinstance(answer, Record):
                raise NotFound(f"template {identifier} not found")
            return answer

    return Templates(authority, [parse_prefix(p) for p in config.templates.required], resolve)


def _attesting(
    config: NodeConfig, registry: Registry, outgoing: ClientTLS | None, on_chain: Callable[[], None]
) -> tuple[Proofs, Attesting] | None:
    """What a node that signs ([signing] enabled) proves its answers with, and its upkeep; the
    registry signs every write from then on."""
    signing = config.signing
    if not signing.enabled:
        return None
    authority, store = registry.authority, registry.authority.store
    anchor = load_anchor(config.path(signing.anchor)) if signing.anchor else None
    attester = Attester(
        ZoneKeys(config.path(signing.keys)),
        [apex.key for apex in config.apex_prefixes],
        anchor,
        lifetime=int(signing.lifetime_days * 86_400),
        denials_per_second=signing.denials_per_second,
    )
    for apex in config.apex_prefixes:
        attester.signing_key(apex.key)  # made at start: its parent's delegation lists it
    registry.attester = attester
    roots = signing.fetch_roots(config.auth.roots, config.recursion.roots)
    # The chain comes with the referrals of nodes asked for proofs, each checked on the way.
    validator = Validator(anchor) if anchor is not None else None
    resolver = (
        Resolver(roots, channels=ChannelPool(outgoing), timeout=5.0, validator=validator, proofs=True)
        if roots
        else None
    )

    def hosted() -> list[str]:
        return [e.prefix.key for e in authority.entries() if e.kind is PrefixKind.HOSTED]

    proofs = Proofs(store, attester)
    attesting = Attesting(
        attester, store, resolver, on_chain, signing.resign_interval, hosted, registry.notify_changed, proofs.forget
    )
    return proofs, attesting


def _proof_cache(config: NodeConfig, coherence: Coherence) -> LookupCache | None:
    """Where answers with proofs are cached, apart from those without, when the node gives them
    (it signs, or validates and relays what it resolves), kept coherent like the others."""
    if not config.cache.enabled or not (config.signing.enabled or config.signing.anchor):
        return None
    cache = LookupCache(config.cache.max_entries, config.cache.max_bytes)
    coherence.add(cache)
    return cache


def _forgetting(*caches: LookupCache | None) -> Callable[[], None]:
    """What forgets every answer of ``caches`` (a chain changed: each carries the old one)."""

    def forget() -> None:
        for cache in caches:
            if cache is not None:
                cache.clear()

    return forget


def _refusal_trail(config: NodeConfig, store: Store) -> RefusalTrail:
    """Where the pipeline's refused calls go: written in batches, rate-limited per peer; the
    same task prunes the audit trail to [audit] retention_days and max_rows."""
    audit = config.audit
    retention = audit.retention_days * 86400

    async def prune(now: float) -> int:
        return await store.prune_audit(now - retention if retention else 0, audit.max_rows, audit.prune_step)

    return RefusalTrail(
        store.record_audit,
        capacity=audit.refusal_buffer,
        peer_rate=audit.refusals_per_peer_per_second,
        peer_burst=audit.refusal_burst,
        prune=prune,
        prune_step=audit.prune_step,
        prune_interval=audit.prune_interval,
    )


async def _no_change(tx: Transaction) -> None:
    """The work of a transaction that only spends a signed read's nonce."""


def _quotas(config: NodeConfig) -> Quotas:
    quotas = config.quotas
    return Quotas(
        TokenBuckets(quotas.peer_calls_per_second, quotas.peer_burst),
        TokenBuckets(quotas.identity_writes_per_second, quotas.identity_burst),
    )


def _server(
    config: NodeConfig,
    metrics: NodeMetrics,
    authenticator: Authenticator | None,
    store: Store,
    worker: WorkerRole | None,
    refusals: RefusalTrail,
    quotas: Quotas,
) -> grpc.aio.Server:
    """The gRPC server, every call passing the request pipeline (quotas, authentication, metrics)."""
    size = config.limits.max_message_bytes
    return grpc.aio.server(
        interceptors=[
            RequestPipeline(
                metrics,
                authenticator,
                audit=refusals.add,
                peer_limit=quotas.peers,
                identity_limit=quotas.identities,
                streams=StreamCounter(config.quotas.streams_per_peer),
                spend_nonce=lambda nonce: store.write(_no_change, nonce=nonce),
            )
        ],
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            # gRPC turns SO_REUSEPORT on by default, which would let two nodes silently share a
            # port; a node owns its port unless it is explicitly run as several workers.
            ("grpc.so_reuseport", 1 if worker is not None else 0),
        ],
    )


async def _health_and_reflection(server: grpc.aio.Server) -> health_aio.HealthServicer:
    """The standard health service, NOT_SERVING until start-up completes, and server reflection."""
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    return health_servicer


def _add_port(server: grpc.aio.Server, config: NodeConfig, listen: str) -> int:
    """Binds ``listen``, over TLS unless [tls] mode is off; OSError when it cannot."""
    try:
        if config.tls.mode == "required":
            credentials = grpc.ssl_server_credentials(
                [(config.path(config.tls.key).read_bytes(), config.path(config.tls.cert).read_bytes())],
                root_certificates=config.path(config.tls.ca).read_bytes(),
                require_client_auth=config.tls.require_client_cert,
            )
            return server.add_secure_port(listen, credentials)
        log.warning("%s: [tls] mode is off: serving plaintext gRPC on %s", config.node.name, listen)
        return server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen}: {exc}") from exc


@dataclass(frozen=True)
class WorkerRole:
    """This process is worker ``number`` of a node serving ``listen`` with SO_REUSEPORT."""

    number: int
    listen: str
    change_log: Path
    http_listen: str = ""
    """The HTTP port the supervisor reserved for the workers (empty: none)."""
    handle_listen: str = ""
    """The Handle-protocol port (UDP and TCP) the supervisor reserved for the workers (empty: none)."""


@dataclass
class Node:
    config: NodeConfig
    store: Store
    authority: Authority
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    recursor: Resolver | None
    cache: LookupCache | None
    address: str = ""
    metrics_port: int = 0
    http: HttpInterface | None = None
    handle: HandleInterface | None = None
    metrics: NodeMetrics | None = None
    serving: bool = False  # the gRPC health status, as /readyz on the metrics port reports it
    attesting: Attesting | None = None
    draining: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, config: NodeConfig, worker: WorkerRole | None = None) -> Node:
        """Opens the store, loads the prefix table and starts serving; health is SERVING after.

        ``worker`` makes this process one of several serving the same port."""
        store = await open_store(config)
        shared = worker is not None and shared_metrics_directory() is not None  # summed by the supervisor
        metrics = NodeMetrics(config.node.name, config.node.role, config.metrics.top_prefixes, shared)
        store.observe = lambda operation, seconds: metrics.store_latency.labels(operation).observe(seconds)
        cache = LookupCache(config.cache.max_entries, config.cache.max_bytes) if config.cache.enabled else None
        if cache is not None and IMPLEMENTATION != "cython":
            log.warning("the compiled lookup cache is not built: serving from the slower pure-Python twin")
        change_log = ChangeLog(worker.change_log) if worker is not None else None
        coherence = Coherence(cache, change_log)
        authority = Authority(
            store,
            config.apex_prefixes,
            config.authority.negative_ttl,
            on_prefix_change=coherence.prefix_changed,
            watch=PrefixWatch(change_log) if change_log is not None else None,
        )
        await authority.load()
        limits = config.record_limits()
        registry = Registry(
            authority,
            limits,
            on_change=coherence.identifiers_changed,
            on_created=metrics.count_registrations,
            identifiers_per_prefix=config.quotas.identifiers_per_prefix,
        )
        outgoing = client_tls(config)
        registry.templates = _templates(config, authority, outgoing)
        recursor = _recursor(config, metrics, outgoing)
        authenticator = _authenticator(config, authority, outgoing)
        refusals = _refusal_trail(config, store)
        quotas = _quotas(config)
        server = _server(config, metrics, authenticator, store, worker, refusals, quotas)
        signing = _attesting(
            config, registry, outgoing, _forgetting(cache, proof_cache := _proof_cache(config, coherence))
        )
        resolution = ResolutionService(
            authority,
            limits,
            recursor,
            time.time,
            cache,
            config.cache.max_ttl,
            on_referral=metrics.referrals.inc,
            recursive_per_call=config.quotas.recursive_per_call,
            recursive_cost=config.quotas.recursive_cost,
            proofs=signing[0] if signing is not None else None,
            proof_cache=proof_cache,
            templates=registry.templates,
        )
        server.add_generic_rpc_handlers((resolution.handler(),))
        registration_pb2_grpc.add_RegistrationServicer_to_server(RegistrationService(registry), server)
        prefix_pb2_grpc.add_PrefixAdminServicer_to_server(PrefixAdminService(authority), server)
        health_servicer = await _health_and_reflection(server)
        listen = worker.listen if worker is not None else config.node.listen
        try:
            port = _add_port(server, config, listen)
        except OSError:
            await store.close()
            raise
        host = listen.rpartition(":")[0]
        if authenticator is not None:  # a signature names the node it is for: this one's names
            authenticator.known_as(audiences_of(f"{host}:{port}", config.auth.audiences))
        await server.start()
        node = cls(config, store, authority, server, health_servicer, recursor, cache, f"{host}:{port}")
        node.metrics = metrics
        await node._start_http(registry, worker, coherence, quotas)
        await node._start_handle(worker, coherence, quotas)
        node._tasks.append(asyncio.create_task(refusals.run(config.audit.flush_interval)))
        node._keep_signing(signing[1] if signing is not None else None, worker)
        node._watch(metrics, cache, worker)
        await node._begin_serving(coherence, metrics)
        return node

    async def _begin_serving(self, coherence: Coherence, metrics: NodeMetrics) -> None:
        """Health SERVING (while the store can write), once the node follows other processes'
        changes (on PostgreSQL)."""
        await self._follow_changes(coherence, metrics)
        self.store.on_writable = self._store_writable
        metrics.store_writable.set(1 if self.store.writable else 0)
        await self.set_serving(self.store.writable)

    async def _follow_changes(self, coherence: Coherence, metrics: NodeMetrics) -> None:
        """On PostgreSQL, other processes (other nodes of the site) write too: their changes,
        published as they commit, reach this process's caches and prefix table. Listening has
        begun (or FEED_START_WAIT passed) before the node serves."""
        store = self.store
        if not isinstance(store, PostgresStore):
            return
        authority = self.authority

        def changed(keys: list[str], prefixes: list[str], lag: float) -> None:
            coherence.identifiers_changed(keys)
            for prefix in prefixes:
                coherence.prefix_changed(prefix)
            if prefixes:
                authority.mark_stale()
            metrics.change_lag.observe(lag)

        def lost() -> None:
            coherence.forget_all()
            authority.mark_stale()
            metrics.changes_lost.inc()

        feed = ChangeFeed(store.dsn, store.writer_pid, changed, lost)
        self._tasks.append(asyncio.create_task(feed.run(), name="change-feed"))
        self._tasks.append(asyncio.create_task(self._report_store_periodically(store, metrics)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(feed.listening.wait(), FEED_START_WAIT)

    def _keep_signing(self, attesting: Attesting | None, worker: WorkerRole | None) -> None:
        """Starts a signing node's upkeep: one process re-signs the stored trees; every worker
        keeps its own chains."""
        if attesting is not None:
            self.attesting = attesting
            self._tasks += attesting.tasks(resign=worker is None or worker.number == 0)

    def _answer_cache(self, coherence: Coherence) -> LookupCache | None:
        """One more cache of answers by identifier (a transport's own form of them), kept
        coherent with the store like the gRPC one; None when caching is off."""
        config = self.config
        if not config.cache.enabled:
            return None
        cache = LookupCache(config.cache.max_entries, config.cache.max_bytes)
        coherence.add(cache)
        return cache

    async def _start_http(
        self, registry: Registry, worker: WorkerRole | None, coherence: Coherence, quotas: Quotas
    ) -> None:
        """The HTTP interface, if configured (a worker's on the port its supervisor reserved),
        with a cache of its JSON answers kept coherent like the gRPC one."""
        config = self.config
        listen = worker.http_listen if worker is not None else config.node.http_listen
        if not listen:
            return
        cache = self._answer_cache(coherence)
        try:
            self.http = await HttpInterface.start(
                config,
                self.authority,
                registry,
                listen,
                self.address,
                reuse_port=worker is not None,
                cache=cache,
                quotas=quotas,
            )
        except OSError:
            await self.server.stop(None)
            await self.store.close()
            raise

    async def _start_handle(self, worker: WorkerRole | None, coherence: Coherence, quotas: Quotas) -> None:
        """The Handle-protocol listeners, if configured, with their own answer cache kept
        coherent like the others."""
        config = self.config
        listen = worker.handle_listen if worker is not None else config.node.handle_listen
        if not listen:
            return
        cache = self._answer_cache(coherence)
        host = config.handle.advertise or listen.rpartition(":")[0].strip("[]")
        port_holder = {"port": 0}
        https_port = self.http.port if self.http is not None else 0
        description = f"IDIS {config.node.role} node {config.node.name}"
        answers = HandleAnswers(
            self.authority,
            lambda: own_handle_site(host, port_holder["port"], https_port, config.handle.site_serial, description),
            time.time,
            cache,
            config.cache.max_ttl,
            config.handle.site_serial,
        )
        try:
            self.handle = await HandleInterface.start(
                answers, listen, config.handle, cache, quotas, reuse_port=worker is not None
            )
        except OSError:
            if self.http is not None:
                await self.http.stop()
            await self.server.stop(None)
            await self.store.close()
            raise
        port_holder["port"] = self.handle.port
        if self.metrics is not None:
            self.metrics.watch_handle(self.handle.stats, config.node.name)
        log.info("%s: Handle protocol on %s:%d (UDP and TCP)", config.node.name, host, self.handle.port)

    def _watch(self, metrics: NodeMetrics, cache: LookupCache | None, worker: WorkerRole | None) -> None:
        """Metrics read at scrape time, their HTTP endpoint with the probes (a worker's are its
        supervisor's, which it reports to instead), the cache's sweeper."""
        config = self.config
        if cache is not None:
            metrics.watch_cache(cache, config.node.name)
        if isinstance(self.store, SqliteStore):
            metrics.watch_prefixes(file_prefixes(config.database_path))
        else:
            snapshot = PrefixSnapshot()
            metrics.watch_prefixes(snapshot)
            self._tasks.append(
                asyncio.create_task(self._count_prefixes_periodically(snapshot, config.metrics.top_prefixes))
            )
        if worker is not None:
            report = self._report_periodically(metrics, config.metrics.report_interval)
            self._tasks.append(asyncio.create_task(report))
        elif config.node.metrics_listen:
            probes = Probes(lambda: self.serving, asyncio.get_running_loop())
            self.metrics_port = serve_metrics(metrics.registry, config.node.metrics_listen, probes)
        if cache is not None:
            self._tasks.append(asyncio.create_task(self._expire_periodically(cache, config.cache.expire_interval)))

    def _store_writable(self, writable: bool) -> None:
        """Health follows the store: NOT_SERVING while it cannot write (it recovers by itself)."""
        if self.metrics is not None:
            self.metrics.store_writable.set(1 if writable else 0)
        if self.draining:
            return
        if not writable:
            log.error(
                "%s: the store cannot write (%s): health is NOT_SERVING", self.config.node.name, self.store.failure
            )
        task = asyncio.create_task(self.set_serving(writable))
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _report_periodically(self, metrics: NodeMetrics, interval: float) -> None:
        """A worker's report to its supervisor (nodes.workers): its figures read at scrape time
        into the node's shared metrics, and its health status on stdout, which also tells that
        its event loop turns."""
        while True:
            metrics.publish()
            announce_status(self.serving)
            await asyncio.sleep(interval)

    @staticmethod
    async def _report_store_periodically(store: PostgresStore, metrics: NodeMetrics) -> None:
        """The PostgreSQL pools' and replication's figures, for scrapes, every second."""
        while True:
            for name, value in (await store.figures()).items():
                metrics.store_figures[name].set(value)
            await asyncio.sleep(1.0)

    async def _count_prefixes_periodically(self, snapshot: PrefixSnapshot, limit: int) -> None:
        """Reads the largest prefixes' counts for scrapes (a store they cannot read themselves)."""
        while True:
            try:
                snapshot.figures = await self.store.largest_prefixes(limit)
            except Exception as exc:  # a scrape shows the last figures meanwhile
                log.warning("%s: counting identifiers per prefix failed: %s", self.config.node.name, exc)
            await asyncio.sleep(PREFIX_COUNT_INTERVAL)

    @staticmethod
    async def _expire_periodically(cache: LookupCache, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            cache.expire(max_scan=20_000)  # bounded work per sweep: no pause on a large cache

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drains: health NOT_SERVING, no new calls, in-flight calls get ``grace`` seconds."""
        self.draining = True
        await self.set_serving(False)
        await self.server.stop(self.config.node.grace_seconds if grace is None else grace)
        if self.http is not None:
            await self.http.stop()
        if self.handle is not None:
            await self.handle.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.recursor is not None:
            await self.recursor.close()
        if self.attesting is not None and self.attesting.resolver is not None:
            await self.attesting.resolver.close()
        await self.store.close()
