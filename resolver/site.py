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


def make_site(addresses: list[str] | tuple[str, ...]) -> Site:
    if not addresses:
        raise InvalidArgument("a site needs at least one server address")
    return Site(tuple(Server(parse_address(a), server_id=i + 1) for i, a in enumerate(addresses)))


@dataclass(frozen=True, slots=True)
class Referral:
    """A node's answer for a prefix it has delegated: ask that site instead."""

    prefix: Prefix
    site: Site
    ttl: int
