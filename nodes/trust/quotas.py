"""Quotas: how much any one peer or identity may ask of a node.

* calls per second per peer address (all calls) and per identity (signed writes), as token
  buckets: a burst is allowed, then the sustained rate; over it the call is refused with
  RESOURCE_EXHAUSTED, the trailer ``retry-after-ms`` and a message saying when to retry;
* concurrent streams per peer address;
* identifiers per prefix (a registration quota, checked in the registration's transaction);
* sizes (gRPC message, batch, values per record, record bytes) are in ``[limits]``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from resolver.errors import LimitExceeded

RETRY_AFTER_KEY = "retry-after-ms"


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

    def take(self, key: str, what: str) -> None:
        """Takes a token for ``key``; raises RateLimited when there is none."""
        if self.rate <= 0:
            return
        now = self.clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            wait = (1 - tokens) / self.rate
            raise RateLimited(
                f"{what} {key} is over its limit of {self.rate:g} calls/s (burst {self.burst:g});"
                f" retry in {int(wait * 1000) + 1} ms",
                wait,
            )
        self._buckets[key] = (tokens - 1, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


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


def peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5432`` -> ``127.0.0.1`` (limits are per address, not per connection)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]%25")
    return rest.rsplit(":", 1)[0] if rest else peer
