"""How a node reaches other nodes over TLS: one place, used by the node's recursor and key
lookups (``nodes.node``) and by its HTTP resolution page (``nodes.http``)."""

from __future__ import annotations

from nodes.config import NodeConfig
from resolver.channels import ClientTLS


def client_tls(config: NodeConfig) -> ClientTLS | None:
    """How this node calls other nodes: the configured CA, and its own certificate as the
    client certificate (for nodes that require mutual TLS)."""
    if config.tls.mode != "required":
        return None
    return ClientTLS(config.path(config.tls.ca), config.path(config.tls.cert), config.path(config.tls.key))
