"""The node's configuration: one TOML file, one schema, validated at start-up.

Every section is a dataclass below; its fields are the keys a section accepts, with their types
and defaults. Unknown keys, wrong types and bad values stop the node with an error that names
the key (``authority.apexes[1]: ...``). Relative paths are relative to the config file.

    [node]
    name = "secondary-100"
    role = "secondary"              # top-level | secondary | enterprise | recursive
    listen = "127.0.0.1:7002"

    [authority]
    apexes = ["88.100"]             # prefixes this node is authoritative for
    negative_ttl = 300              # seconds resolvers may cache NOT_FOUND

    [storage]
    engine = "sqlite"               # sqlite (embedded, the default) | postgresql
    path = "secondary-100.sqlite3"
    synchronous = "full"            # off | normal | full | extra (SQLite PRAGMA synchronous)
    # engine = "postgresql"
    # dsn = "postgresql://idis@db1:5432,db2:5432/idis"   # several hosts: the writer finds the primary
    # read_from = "primary"         # primary | standby (reads prefer a streaming standby)

    [limits]
    max_batch = 2000

    [cache]                         # the lookup cache in front of SQLite
    enabled = true
    max_entries = 1000000

    [recursion]                     # answer Resolve(recursive=true) by chasing referrals
    enabled = false
    roots = ["127.0.0.1:7001"]
    max_ttl = 86400                 # cap on every TTL the recursor caches

    [auth]
    roots = ["127.0.0.1:7001"]      # to resolve the keys of administrators of other nodes
    key_cache_ttl = 30              # their keys are kept this long: the revocation delay
    audiences = ["idis-2.example.com:7002"]  # host:port clients dial this node by (signatures name it)

    [audit]
    retention_days = 365            # older rows are pruned, in bounded steps
    max_rows = 10000000
    refusals_per_peer_per_second = 5  # refused calls recorded one by one; the rest counted

    [metrics]                       # Prometheus, on [node] metrics_listen
    top_prefixes = 50               # per-prefix series for the largest; the rest as prefix="(other)"
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes.logs import FORMATS as LOG_FORMATS
from resolver.errors import IdisError
from resolver.identifier import Prefix, parse_identifier, parse_prefix
from resolver.record import Limits
from resolver.signing import parse_public_key
from resolver.site import parse_address

ROLES = ("top-level", "secondary", "enterprise", "recursive")

MAX_CACHE_TTL = 7 * 86400
"""The longest any configurable cache TTL may be (a week)."""


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class NodeSection:
    name: str = "idis-node"
    role: str = "enterprise"
    listen: str = "127.0.0.1:7001"
    metrics_listen: str = ""
    """``host:port`` for the Prometheus endpoint; empty: none."""
    http_listen: str = ""
    """``host:port`` for the HTTP interface (the HANDLE.NET REST API), HTTPS under [tls]; empty: none."""
    handle_listen: str = ""
    """``host:port`` for the Handle protocol, UDP and TCP on the same port (2641 is its IANA
    port; see [handle]); empty: none."""
    grace_seconds: float = 5.0
    """On SIGTERM, how long in-flight calls may take to finish."""
    workers: int = 1
    """Processes serving the same port (SO_REUSEPORT), each with its own cache; kept coherent
    by a shared change log. Their supervisor serves metrics_listen for all of them."""
    log_format: str = "text"
    """text: for people; json: one JSON object per line for log collectors (nodes.logs)."""


@dataclass(frozen=True, slots=True)
class MetricsSection:
    top_prefixes: int = 50
    """Prefixes with series of their own in idis_identifiers and idis_registrations_total (the
    largest); the others are summed under prefix="(other)"."""
    report_interval: float = 1.0
    """With workers > 1: seconds between each worker's reports to its supervisor (its cache and
    GC figures into the node's metrics, its health status for /readyz, a heartbeat for /healthz)."""


@dataclass(frozen=True, slots=True)
class AuthoritySection:
    apexes: list[str] = field(default_factory=list)
    negative_ttl: int = 300


@dataclass(frozen=True, slots=True)
class StorageSection:
    engine: str = "sqlite"
    """sqlite: one embedded file (``path``); postgresql: a PostgreSQL database (``dsn``)."""
    path: str = "node.sqlite3"
    synchronous: str = "full"
    readers: int = 2
    """Reader connections (SQLite) or the size of the reader pool (PostgreSQL)."""
    dsn: str = ""
    """PostgreSQL: libpq-style URL; several ``host:port`` make a multi-host DSN."""
    read_from: str = "primary"
    """PostgreSQL: where reads go, ``primary`` or ``standby`` (preferred when one is up)."""


@dataclass(frozen=True, slots=True)
class LimitsSection(Limits):
    """The record limits (``resolver.record.Limits``) and the largest gRPC message."""

    max_message_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CacheSection:
    enabled: bool = True
    """Serve hits from the lookup cache (request bytes to response bytes)."""
    max_entries: int = 1_000_000
    max_bytes: int = 512 * 1024 * 1024
    max_ttl: int = 3600
    """Seconds a cached answer may live on the node (writes invalidate it sooner)."""
    expire_interval: float = 1.0
    """Seconds between incremental sweeps for expired entries."""


@dataclass(frozen=True, slots=True)
class HandleSection:
    """The Handle-protocol listeners (``[node] handle_listen``; nodes/handle)."""

    site_serial: int = 1
    """This site's serial number, sent in every answer's header and in its HS_SITE: raise it
    whenever the site's servers change."""
    advertise: str = ""
    """The IP address this node's HS_SITE names (for a node listening on 0.0.0.0 or [::]);
    default: the listen address."""
    udp_rate_per_source: float = 2_000.0
    """Answers a second one source (an IPv4 address, an IPv6 /64) may get over UDP from each
    worker (token bucket, like DNS response-rate limiting); beyond it datagrams are dropped
    (0: unlimited). Raise it for recursive resolvers that speak for many clients."""
    udp_burst: float = 4_000.0
    udp_max_datagrams: int = 4
    """The most datagrams one UDP answer may take (492 bytes each); a larger answer is replaced
    by an error telling the client to ask over TCP, so spoofed requests amplify little."""
    max_pending: int = 1024
    """UDP requests answered by the Python side at once; beyond, datagrams are dropped."""
    max_connections: int = 1024
    """TCP connections open at once; beyond, new ones are closed unanswered."""
    tcp_timeout: float = 5.0
    """Seconds a TCP client has to send its request, and to take its answer."""


@dataclass(frozen=True, slots=True)
class RecursionSection:
    enabled: bool = False
    roots: list[str] = field(default_factory=list)
    max_hops: int = 40
    timeout: float = 5.0
    max_ttl: int = 86400
    """Seconds the recursor may cache any answer, whatever TTL the nodes give it."""


@dataclass(frozen=True, slots=True)
class TlsSection:
    mode: str = "required"
    """required: TLS on the listener and on calls to other nodes; off: plaintext (a warning at
    start-up; for tests and loopback experiments only)."""
    cert: str = ""
    """The node's certificate chain (PEM)."""
    key: str = ""
    """Its private key (PEM)."""
    ca: str = ""
    """CA certificates (PEM) trusted for other nodes and, with require_client_cert, for clients."""
    require_client_cert: bool = False
    """Mutual TLS: only clients with a certificate from ``ca`` may connect."""


@dataclass(frozen=True, slots=True)
class TemplatesSection:
    """Metadata templates (``nodes.templates``): registrations that name one are always checked."""

    required: list[str] = field(default_factory=list)
    """Prefixes (each with every prefix below it) whose registrations must name a template."""


@dataclass(frozen=True, slots=True)
class QuotasSection:
    """0 means unlimited. Rates are tokens a second: a unary call costs 1, a batch one per item,
    a stream one per item of each message (so a batch is no way around them)."""

    peer_calls_per_second: float = 1_000_000.0
    peer_burst: float = 2_000_000.0
    identity_writes_per_second: float = 100_000.0
    identity_burst: float = 200_000.0
    streams_per_peer: int = 32
    identifiers_per_prefix: int = 0
    recursive_per_call: int = 16
    """Distinct identifiers one call (or one message of a stream) may have resolved recursively;
    the items beyond are refused (RESOURCE_EXHAUSTED)."""
    recursive_cost: float = 10.0
    """Tokens of the caller's peer_calls_per_second each recursive resolution costs (an
    ordinary item costs 1)."""


@dataclass(frozen=True, slots=True)
class AuditSection:
    """The audit trail's retention and how refused calls reach it."""

    retention_days: float = 365.0
    """Rows older than this are pruned (0: kept however old)."""
    max_rows: int = 10_000_000
    """At most this many rows are kept, the oldest pruned first (0: no limit)."""
    prune_step: int = 1000
    """Rows one pruning transaction may delete; steps follow each other until the trail is
    within bounds, then one every prune_interval seconds."""
    prune_interval: float = 60.0
    refusals_per_peer_per_second: float = 5.0
    """Refused calls recorded one by one per peer address (per worker); the ones beyond are
    counted in one summary row per prefix (0: every one recorded, within refusal_buffer)."""
    refusal_burst: float = 20.0
    refusal_buffer: int = 1000
    """Refused calls waiting in memory for the next write; beyond, counted in the summary."""
    flush_interval: float = 1.0
    """Seconds between writes of waiting refusals (one transaction each)."""


@dataclass(frozen=True, slots=True)
class AuthSection:
    mode: str = "required"
    """required: write calls must be signed and permitted; off: anyone may write (tests only)."""
    trust: list[str] = field(default_factory=list)
    """Trust anchors, ``IDENTITY=BASE64-DER`` or ``IDENTITY=file:PATH`` (a PEM or DER public key):
    administrators holding every right on the node's apexes."""
    roots: list[str] = field(default_factory=list)
    """Top-level servers, to resolve the keys of administrators that live on other nodes."""
    max_clock_skew: float = 300.0
    key_cache_ttl: float = 30.0
    """Seconds a key resolved from another node is trusted without asking again: how long a
    key deleted on its home node still works here (at most 3600)."""
    key_negative_ttl: float = 15.0
    """Seconds a failed key lookup is remembered, so callers cannot make it repeat per call
    (0: not remembered)."""
    key_lookup_timeout: float = 2.0
    """Seconds a key lookup may take (the whole referral chain), at most 30."""
    key_lookups_per_second: float = 5.0
    """Key lookups for identities of other nodes that one peer may cause per second (0: unlimited)."""
    key_lookup_burst: float = 20.0
    trust_secrets: list[str] = field(default_factory=list)
    """Secret keys of trust anchors for HTTP Basic, ``IDENTITY=file:PATH`` (the file holds the
    secret; read at each check, so a rotation needs no restart). A trust anchor authenticates
    only with its configured key or secret, never with values stored in its record."""
    audiences: list[str] = field(default_factory=list)
    # (gRPC and HTTPS alike: a signed gRPC call or an HTTP session signature names one of them)
    """``host:port`` names clients dial this node by, besides its listen address: a signed call
    names the address it was signed for and is refused by any node not known by it. A node
    listening on 0.0.0.0 or [::] knows none but the loopback names: list its public ones here."""

    def anchor_secrets(self, base_dir: Path) -> dict[str, Path]:
        """Identifier key -> the file holding that trust anchor's secret key, from ``trust_secrets``."""
        out = {}
        for i, entry in enumerate(self.trust_secrets):
            identity, sep, where_file = entry.partition("=")
            if not sep or not where_file.startswith("file:"):
                raise ConfigError(f"auth.trust_secrets[{i}]: expected IDENTITY=file:PATH")
            try:
                key = parse_identifier(identity.strip()).key
            except IdisError as exc:
                raise ConfigError(f"auth.trust_secrets[{i}]: {exc}") from exc
            path = Path(where_file[5:])
            out[key] = path if path.is_absolute() else base_dir / path
        return out

    def anchors(self, base_dir: Path) -> dict[str, bytes]:
        """Identifier key -> DER public key, read from ``trust``."""
        from cryptography.hazmat.primitives import serialization

        out = {}
        for i, entry in enumerate(self.trust):
            identity, sep, key = entry.partition("=")
            where = f"auth.trust[{i}]"
            if not sep:
                raise ConfigError(f"{where}: expected IDENTITY=BASE64-DER or IDENTITY=file:PATH")
            try:
                ident = parse_identifier(identity.strip())
                if key.startswith("file:"):
                    path = Path(key[5:])
                    data = (path if path.is_absolute() else base_dir / path).read_bytes()
                    public = (
                        serialization.load_pem_public_key(data)
                        if data.startswith(b"-----")
                        else serialization.load_der_public_key(data)
                    )
                    der = public.public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                    )
                else:
                    der = base64.b64decode(key.strip(), validate=True)
                parse_public_key(der)
            except (IdisError, OSError, ValueError) as exc:
                raise ConfigError(f"{where}: {exc}") from exc
            out[ident.key] = der
        return out


@dataclass(frozen=True, slots=True)
class SigningSection:
    """Verifiable resolution (docs/verifiable-resolution.md): the node signs every write batch,
    its delegations and its NOT_FOUND answers with its prefixes' keys."""

    enabled: bool = False
    keys: str = "zone-keys"
    """The folder of the node's zone keys (one folder per prefix, 0700; keys 0600)."""
    anchor: str = ""
    """The trust anchor file (``idis-node keys anchor`` writes the apex's): the chain a parent
    serves for this node's apexes is checked against it. Needed unless this node's apex is the
    anchor's prefix itself."""
    roots: list[str] = field(default_factory=list)
    """Where the chain of delegations down to this node's apexes is fetched from (the top-level
    servers; default: [auth] roots, else [recursion] roots)."""
    lifetime_days: float = 30.0
    """How long a batch's statement and a delegation are valid; re-signed in the last quarter."""
    denials_per_second: float = 1000.0
    """Signed NOT_FOUND answers made per second at most (each costs a signature; beyond it a
    denial goes unsigned, which a validating resolver refuses)."""
    resign_interval: float = 3600.0
    """Seconds between passes of the background re-signing."""

    def fetch_roots(self, auth_roots: list[str], recursion_roots: list[str]) -> list[str]:
        return self.roots or auth_roots or recursion_roots


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node: NodeSection = field(default_factory=NodeSection)
    authority: AuthoritySection = field(default_factory=AuthoritySection)
    storage: StorageSection = field(default_factory=StorageSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    recursion: RecursionSection = field(default_factory=RecursionSection)
    handle: HandleSection = field(default_factory=HandleSection)
    cache: CacheSection = field(default_factory=CacheSection)
    auth: AuthSection = field(default_factory=AuthSection)
    quotas: QuotasSection = field(default_factory=QuotasSection)
    templates: TemplatesSection = field(default_factory=TemplatesSection)
    audit: AuditSection = field(default_factory=AuditSection)
    tls: TlsSection = field(default_factory=TlsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    signing: SigningSection = field(default_factory=SigningSection)
    base_dir: Path = Path(".")

    @property
    def database_path(self) -> Path:
        path = Path(self.storage.path)
        return path if path.is_absolute() else self.base_dir / path

    def check_files(self) -> None:
        """The files the config names exist (checked when the node starts)."""
        if self.tls.mode == "required":
            for key in ("cert", "key", "ca"):
                if not self.path(getattr(self.tls, key)).is_file():
                    raise ConfigError(f"tls.{key}: {self.path(getattr(self.tls, key))} does not exist")

    def path(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        path = Path(value)
        return path if path.is_absolute() else self.base_dir / path

    @property
    def apex_prefixes(self) -> list[Prefix]:
        return [parse_prefix(a) for a in self.authority.apexes]

    def record_limits(self) -> Limits:
        return self.limits


_SECTIONS = {f.name: f.type for f in dataclasses.fields(NodeConfig) if f.name != "base_dir"}


def _check_type(where: str, value: Any, expected: Any) -> Any:
    origin = typing.get_origin(expected)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_check_type(f"{where}[{i}]", item, item_type) for i, item in enumerate(value)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got a boolean")
    if not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _section(name: str, cls: type[Any], table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
    values = {key: _check_type(f"{name}.{key}", val, hints[key]) for key, val in table.items()}
    return cls(**values)


def parse_config(data: dict[str, Any], base_dir: Path = Path(".")) -> NodeConfig:
    """Builds and validates a NodeConfig from parsed TOML."""
    for key in data:
        if key not in _SECTIONS:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(_SECTIONS)})")
    hints = typing.get_type_hints(NodeConfig)
    sections = {name: _section(name, hints[name], data.get(name, {})) for name in _SECTIONS}
    config = NodeConfig(**sections, base_dir=base_dir)
    _validate(config)
    return config


def _positive(where: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: must be positive, got {value}")


def _addresses(where: str, addresses: list[str]) -> None:
    for i, address in enumerate(addresses):
        try:
            parse_address(address)
        except IdisError as exc:
            raise ConfigError(f"{where}[{i}]: {exc}") from exc


def _validate_node(c: NodeConfig) -> None:
    if c.node.role not in ROLES:
        raise ConfigError(f"node.role: must be one of {', '.join(ROLES)}, got {c.node.role!r}")
    optional = ("node.metrics_listen", "node.http_listen", "node.handle_listen")
    for where, address in [
        ("node.listen", c.node.listen),
        ("node.metrics_listen", c.node.metrics_listen),
        ("node.http_listen", c.node.http_listen),
        ("node.handle_listen", c.node.handle_listen),
    ]:
        if address == "" and where in optional:
            continue
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"{where}: expected host:port (port 0 picks a free one), got {address!r}")
    _positive("node.grace_seconds", c.node.grace_seconds)
    if not 1 <= c.node.workers <= 64:
        raise ConfigError(f"node.workers: must be in 1..64, got {c.node.workers}")
    if c.node.log_format not in LOG_FORMATS:
        raise ConfigError(f"node.log_format: must be {' or '.join(LOG_FORMATS)}, got {c.node.log_format!r}")


def _prefixes(where: str, prefixes: list[str]) -> None:
    """Each of ``prefixes`` a prefix, else the error names the one at fault."""
    for i, prefix in enumerate(prefixes):
        try:
            parse_prefix(prefix)
        except IdisError as exc:
            raise ConfigError(f"{where}[{i}]: {exc}") from exc


def _validate_templates(c: NodeConfig) -> None:
    _prefixes("templates.required", c.templates.required)


def _validate_authority(c: NodeConfig) -> None:
    _prefixes("authority.apexes", c.authority.apexes)
    if c.node.role != "recursive" and not c.authority.apexes:
        raise ConfigError(f"authority.apexes: a node with role {c.node.role!r} needs at least one apex prefix")
    if c.authority.negative_ttl < 0:
        raise ConfigError("authority.negative_ttl: must not be negative")


def _validate_storage_limits_cache(c: NodeConfig) -> None:
    if c.storage.synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigError(f"storage.synchronous: must be off, normal, full or extra, got {c.storage.synchronous!r}")
    _positive("storage.readers", c.storage.readers)
    if c.storage.engine not in ("sqlite", "postgresql"):
        raise ConfigError(f"storage.engine: must be sqlite or postgresql, got {c.storage.engine!r}")
    if c.storage.engine == "postgresql" and not c.storage.dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError("storage.dsn: the postgresql engine needs a postgresql:// URL")
    if c.storage.read_from not in ("primary", "standby"):
        raise ConfigError(f"storage.read_from: must be primary or standby, got {c.storage.read_from!r}")
    for f in dataclasses.fields(LimitsSection):
        _positive(f"limits.{f.name}", getattr(c.limits, f.name))
    if c.limits.max_batch > 100000:
        raise ConfigError("limits.max_batch: at most 100000")
    for key in ("max_entries", "max_bytes", "max_ttl", "expire_interval"):
        _positive(f"cache.{key}", getattr(c.cache, key))
    if c.cache.max_entries > 0x7FFFFFF0:
        raise ConfigError("cache.max_entries: at most 2147483632")


def _validate_recursion(c: NodeConfig) -> None:
    _addresses("recursion.roots", c.recursion.roots)
    if c.recursion.enabled and not c.recursion.roots:
        raise ConfigError("recursion.roots: recursion is enabled but no root servers are given")
    if not 1 <= c.recursion.max_hops <= 40:
        raise ConfigError("recursion.max_hops: must be in 1..40")
    _positive("recursion.timeout", c.recursion.timeout)
    if not 1 <= c.recursion.max_ttl <= MAX_CACHE_TTL:
        raise ConfigError(f"recursion.max_ttl: must be in 1..{MAX_CACHE_TTL} seconds, got {c.recursion.max_ttl}")


def _validate_auth(c: NodeConfig) -> None:
    if c.auth.mode not in ("required", "off"):
        raise ConfigError(f"auth.mode: must be required or off, got {c.auth.mode!r}")
    c.auth.anchors(c.base_dir)
    c.auth.anchor_secrets(c.base_dir)
    _addresses("auth.roots", c.auth.roots)
    _addresses("auth.audiences", c.auth.audiences)
    if c.auth.mode == "required" and c.node.role != "recursive" and not c.auth.trust and not c.auth.roots:
        raise ConfigError(
            "auth.trust: signatures are required but no administrator is trusted; add IDENTITY=KEY"
            ' (idis keygen makes one), or set auth.mode = "off" for a test node'
        )
    _positive("auth.max_clock_skew", c.auth.max_clock_skew)
    auth_seconds = (("key_cache_ttl", 3600, False), ("key_negative_ttl", 3600, True), ("key_lookup_timeout", 30, False))
    for key, high, zero in auth_seconds:
        value = getattr(c.auth, key)
        if value > high or value < 0 or (value == 0 and not zero):
            allowed = f"in 0..{high}" if zero else f"more than 0 and at most {high}"
            raise ConfigError(f"auth.{key}: must be {allowed} seconds, got {value}")
    for key in ("key_lookups_per_second", "key_lookup_burst"):
        if getattr(c.auth, key) < 0:
            raise ConfigError(f"auth.{key}: must not be negative (0 means unlimited)")


def _validate_tls_quotas(c: NodeConfig) -> None:
    if c.tls.mode not in ("required", "off"):
        raise ConfigError(f"tls.mode: must be required or off, got {c.tls.mode!r}")
    if c.tls.mode == "required":
        for key in ("cert", "key", "ca"):
            value = getattr(c.tls, key)
            if not value:
                raise ConfigError(f'tls.{key}: TLS is required but no {key} file is given (or set tls.mode = "off")')
    for f in dataclasses.fields(QuotasSection):
        if getattr(c.quotas, f.name) < 0:
            raise ConfigError(f"quotas.{f.name}: must not be negative (0 means unlimited)")
    if c.quotas.recursive_per_call > 100_000:
        raise ConfigError("quotas.recursive_per_call: at most 100000")


def _validate_audit(c: NodeConfig) -> None:
    a = c.audit
    for key in ("retention_days", "max_rows", "refusals_per_peer_per_second", "refusal_burst"):
        if getattr(a, key) < 0:
            raise ConfigError(f"audit.{key}: must not be negative (0 means no limit)")
    for key, low, high in (("prune_step", 1, 100_000), ("refusal_buffer", 1, 100_000)):
        if not low <= getattr(a, key) <= high:
            raise ConfigError(f"audit.{key}: must be in {low}..{high}, got {getattr(a, key)}")
    for key in ("prune_interval", "flush_interval"):
        if not 0 < getattr(a, key) <= 3600:
            raise ConfigError(f"audit.{key}: must be more than 0 and at most 3600 seconds, got {getattr(a, key)}")


def _validate_metrics(c: NodeConfig) -> None:
    if not 0 <= c.metrics.top_prefixes <= 10_000:
        raise ConfigError(f"metrics.top_prefixes: must be in 0..10000, got {c.metrics.top_prefixes}")
    if not 0 < c.metrics.report_interval <= 60:
        raise ConfigError(
            f"metrics.report_interval: must be more than 0 and at most 60 seconds, got {c.metrics.report_interval}"
        )


def _validate_handle(c: NodeConfig) -> None:
    h = c.handle
    if not 0 <= h.site_serial <= 0xFFFF:
        raise ConfigError(f"handle.site_serial: must be in 0..65535, got {h.site_serial}")
    if h.advertise:
        try:
            ipaddress.ip_address(h.advertise)
        except ValueError:
            raise ConfigError(f"handle.advertise: expected an IP address, got {h.advertise!r}") from None
    elif c.node.handle_listen:
        host = c.node.handle_listen.rpartition(":")[0].strip("[]")
        try:
            unspecified = ipaddress.ip_address(host).is_unspecified
        except ValueError:
            raise ConfigError(
                f"node.handle_listen: HS_SITE names servers by IP address; listen on one, not {host!r}"
            ) from None
        if unspecified:
            raise ConfigError(f"handle.advertise: node.handle_listen is {host}: name the address clients reach")
    for where, value in (("handle.udp_rate_per_source", h.udp_rate_per_source), ("handle.udp_burst", h.udp_burst)):
        if value < 0:
            raise ConfigError(f"{where}: must be 0 (unlimited) or positive, got {value}")
    if not 1 <= h.udp_max_datagrams <= 64:
        raise ConfigError(f"handle.udp_max_datagrams: must be in 1..64, got {h.udp_max_datagrams}")
    for where, count in (("handle.max_pending", h.max_pending), ("handle.max_connections", h.max_connections)):
        if count < 1:
            raise ConfigError(f"{where}: must be at least 1, got {count}")
    _positive("handle.tcp_timeout", h.tcp_timeout)


def _validate_signing(c: NodeConfig) -> None:
    g = c.signing
    _addresses("signing.roots", g.roots)
    if not 1 / 1440 <= g.lifetime_days <= 90:
        raise ConfigError(f"signing.lifetime_days: must be in 1 minute..90 days, got {g.lifetime_days}")
    if g.denials_per_second < 0:
        raise ConfigError("signing.denials_per_second: must not be negative (0 means unlimited)")
    _positive("signing.resign_interval", g.resign_interval)
    if g.anchor:
        from resolver.attestation import load_anchor

        try:
            load_anchor(c.path(g.anchor))
        except IdisError as exc:
            raise ConfigError(f"signing.anchor: {exc}") from exc


_VALIDATORS = (
    _validate_node,
    _validate_handle,
    _validate_authority,
    _validate_templates,
    _validate_storage_limits_cache,
    _validate_recursion,
    _validate_auth,
    _validate_tls_quotas,
    _validate_audit,
    _validate_metrics,
    _validate_signing,
)
"""The checks that go beyond types, a function per concern, run in this order."""


def _validate(c: NodeConfig) -> None:
    for validate in _VALIDATORS:
        validate(c)


def load_config(path: Path) -> NodeConfig:
    """Reads and validates a config file; raises ConfigError naming the bad key."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, base_dir=path.resolve().parent)
