"""gRPC channels to nodes, one per address, reused across calls, a bounded number at a time."""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    # Fail fast on a dead node so the resolver can move to the next server of a site.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)

MAX_CHANNELS = 64
"""Default bound on the channels a pool keeps open: addresses come from referrals, which other
nodes choose, so the pool must not grow with what they name."""

EVICTION_GRACE = 10.0
"""Seconds calls in flight on an evicted channel may still take before it is closed under them."""


@dataclass(frozen=True)
class ClientTLS:
    """How a client reaches TLS nodes: the CA that signs their certificates and, for nodes that
    require mutual TLS, this client's own certificate and key (PEM files)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )

    @classmethod
    def from_environment(cls) -> ClientTLS | None:
        """$IDIS_CA (and $IDIS_CERT, $IDIS_CERT_KEY for mutual TLS), when set."""
        ca = os.environ.get("IDIS_CA")
        if not ca:
            return None
        cert, key = os.environ.get("IDIS_CERT"), os.environ.get("IDIS_CERT_KEY")
        return cls(Path(ca), Path(cert) if cert else None, Path(key) if key else None)


class ChannelPool:
    """Lazily opened channels, keyed by ``host:port``, over TLS when ``tls`` is given (plaintext
    otherwise): at most ``max_channels`` of them, the least recently used closed first (calls in
    flight on it get ``EVICTION_GRACE`` seconds); close() closes them all."""

    def __init__(self, tls: ClientTLS | None = None, max_channels: int = MAX_CHANNELS) -> None:
        if max_channels < 1:
            raise ValueError(f"max_channels must be at least 1, got {max_channels}")
        self.max_channels = max_channels
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._credentials = tls.credentials() if tls is not None else None

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is not None:
            self._channels.move_to_end(address)
            return channel
        channel = self._open(address)
        self._channels[address] = channel
        while len(self._channels) > self.max_channels:
            _address, evicted = self._channels.popitem(last=False)
            self._close_soon(evicted)
        return channel

    def _open(self, address: str) -> grpc.aio.Channel:
        if self._credentials is not None:
            return grpc.aio.secure_channel(address, self._credentials, options=CHANNEL_OPTIONS)
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)

    def _close_soon(self, channel: grpc.aio.Channel) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to close it on: the channel is dropped with its last reference
            return
        task = loop.create_task(channel.close(grace=EVICTION_GRACE))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = self._channels, OrderedDict()
        for channel in channels.values():
            await channel.close(grace=None)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
