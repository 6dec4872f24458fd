"""Quotas: how much any one peer or identity may ask of a node.

* calls per second per peer address (all calls) and per identity (signed calls), as token
  buckets: a burst is allowed, then the sustained rate; over it the call is refused with
  RESOURCE_EXHAUSTED, a ``google.rpc.RetryInfo`` detail and a message saying when to retry. A call
  costs one token per item: a batch of N items costs N, each message of a stream costs as a
  batch, a recursive resolution costs ``recursive_cost`` (``cost_of`` and ``Charge``);
* concurrent streams per peer address;
* identifiers per prefix (a registration quota, checked in the registration's transaction);
* sizes (gRPC message, batch, values per record, record bytes) are in ``[limits]``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from resolver.errors import LimitExceeded


class RateLimited(LimitExceeded):
    """Over a rate limit; ``retry_after`` seconds until a call would be accepted."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TokenBuckets:
    """One token bucket per key (``rate`` tokens a second, at most ``burst``), for at most
    ``max_keys`` keys (the least recently seen are forgotten, i.e. start full again)."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, what: str, cost: float = 1.0) -> None:
        """Takes ``cost`` tokens for ``key``; raises RateLimited when there are not enough.

        A cost above the burst is taken from a full bucket, which it leaves in debt: a batch
        larger than the burst is admitted, and its items are paid for before the next call."""
        wait = self.spend(key, cost)
        if wait > 0:
            charged = f"; this call costs {cost:g}" if cost != 1 else ""
            raise RateLimited(
                f"{what} {key} is over its limit of {self.rate:g} calls/s (burst {self.burst:g}{charged});"
                f" retry in {int(wait * 1000) + 1} ms",
                wait,
            )

    def admits(self, key: str, cost: float = 1.0) -> bool:
        """Takes ``cost`` tokens for ``key`` when it has them (True), else takes nothing."""
        return self.spend(key, cost) == 0

    def wait_for(self, key: str, cost: float = 1.0) -> float:
        """Seconds until ``key`` would have ``cost`` tokens (0: it has them now); takes nothing."""
        if self.rate <= 0 or key not in self._buckets:
            return 0.0
        tokens, last = self._buckets[key]
        tokens = min(self.burst, tokens + (self.clock() - last) * self.rate)
        return max(0.0, (min(cost, self.burst) - tokens) / self.rate)

    def spend(self, key: str, cost: float = 1.0) -> float:
        """Takes ``cost`` tokens for ``key`` and returns 0, or returns the seconds until it could."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        needed = min(cost, self.burst)
        if tokens < needed:
            self._buckets[key] = (tokens, now)
            return (needed - tokens) / self.rate
        self._buckets[key] = (tokens - cost, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return 0.0


@dataclass(frozen=True)
class Charge:
    """Tokens the call being served spends from its peer's bucket beyond its admission (the
    items of a stream's messages, recursive resolutions); set by the request pipeline."""

    buckets: TokenBuckets
    peer: str

    def take(self, cost: float) -> None:
        self.buckets.take(self.peer, "peer", cost)


current_charge: ContextVar[Charge | None] = ContextVar("idis_charge", default=None)


def charge(cost: float) -> None:
    """Charges the peer of the call being served ``cost`` tokens (nothing outside a call or
    without a peer limit); raises RateLimited when it cannot pay."""
    current = current_charge.get()
    if current is not None:
        current.take(cost)


def cost_of(request_type: Any, field: str, data: bytes) -> int:
    """The cost of a batch request in wire form: its number of items ``field`` (at least 1; a
    message that does not decode costs 1 and is refused by its handler)."""
    try:
        return max(1, len(getattr(request_type.FromString(data), field)))
    except (DecodeError, ValueError, TypeError):
        return 1


@dataclass
class StreamCounter:
    """Concurrent streams per peer, at most ``limit`` each."""

    limit: int

    def __post_init__(self) -> None:
        self._open: dict[str, int] = {}

    def open(self, peer: str) -> None:
        if self.limit and self._open.get(peer, 0) >= self.limit:
            raise LimitExceeded(f"peer {peer} already has {self.limit} streams open (the limit)")
        self._open[peer] = self._open.get(peer, 0) + 1

    def close(self, peer: str) -> None:
        left = self._open.get(peer, 1) - 1
        if left > 0:
            self._open[peer] = left
        else:
            self._open.pop(peer, None)


@dataclass(frozen=True)
class Quotas:
    """The per-peer and per-identity budgets of ``[quotas]``, shared by gRPC and HTTP: a peer
    using both transports has one budget."""

    peers: TokenBuckets
    identities: TokenBuckets


def peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5432`` -> ``127.0.0.1`` (limits are per address, not per connection)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]%25")
    return rest.rsplit(":", 1)[0] if rest else peer
