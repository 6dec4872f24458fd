"""gRPC channels to nodes, one per address, reused across calls."""

from __future__ import annotations

import os
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
    otherwise); close() closes them all."""

    def __init__(self, tls: ClientTLS | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._credentials = tls.credentials() if tls is not None else None

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close(grace=None)
