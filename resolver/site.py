"""Sites and referrals: where a prefix is served (HS_SITE), and how a resolver picks a server."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from resolver.errors import InvalidArgument
from resolver.identifier import Prefix


@dataclass(frozen=True, slots=True)
class Server:
    address: str
    """``host:port`` of the server's gRPC endpoint."""
    server_id: int = 0
    handle_port: int = 0
    """Its Handle-protocol port (UDP and TCP), 0 if it has none."""
    https_port: int = 0
    """Its HTTPS port (the HANDLE.NET REST API), 0 if it has none."""

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    def __str__(self) -> str:
        extra = "".join(
            f"+{name}:{port}" for name, port in (("handle", self.handle_port), ("https", self.https_port)) if port
        )
        return self.address + extra


@dataclass(frozen=True, slots=True)
class Site:
    """A set of equivalent servers serving the same prefixes. Every site is its prefix's only
    one: there is no replication between sites, so no mirror site (Handle's HS_SITE primary
    flag has no counterpart)."""

    servers: tuple[Server, ...]

    def ordered_for(self, key: str) -> list[Server]:
        """The servers in the order to try them for ``key``.

        As HANDLE.NET clients do: MD5 of the upper-cased key, last four bytes as a signed integer,
        absolute value, modulo the server count picks the first server, so the load of many keys
        spreads over the site; the others follow in order, for fail-over.
        """
        if not self.servers:
            return []
        digest = hashlib.md5(key.upper().encode("utf-8")).digest()
        first = abs(int.from_bytes(digest[-4:], "big", signed=True)) % len(self.servers)
        return list(self.servers[first:] + self.servers[:first])


def parse_address(address: str) -> str:
    """Validates ``host:port`` (IPv6 as ``[::1]:port``), returning it unchanged."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"server address {address!r} is not host:port with a port in 1..65535")
    return address


_INTERFACES = ("handle", "https")


def parse_server(text: str, server_id: int = 0) -> Server:
    """A server as ``host:port`` (its gRPC endpoint), optionally followed by its other
    interfaces: ``127.0.0.1:2643+handle:2653+https:8643``."""
    address, *extras = text.split("+")
    ports: dict[str, int] = {}
    for extra in extras:
        name, _, port = extra.partition(":")
        if name not in _INTERFACES or name in ports or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(
                f"server {text!r}: after host:port, expected +handle:PORT or +https:PORT (each once), not {extra!r}"
            )
        ports[name] = int(port)
    return Server(parse_address(address), server_id, ports.get("handle", 0), ports.get("https", 0))


def make_site(addresses: list[str] | tuple[str, ...]) -> Site:
    """A site of servers given as ``parse_server`` reads them, numbered from 1."""
    if not addresses:
        raise InvalidArgument("a site needs at least one server address")
    return Site(tuple(parse_server(a, server_id=i + 1) for i, a in enumerate(addresses)))


@dataclass(frozen=True, slots=True)
class Referral:
    """A node's answer for a prefix it has delegated: ask that site instead."""

    prefix: Prefix
    site: Site
    ttl: int
    delegations: tuple[str, ...] = ()
    """From a node that signs: the delegations from the trust anchor down to ``prefix``."""
