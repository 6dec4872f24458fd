"""TLS on the listener, mutual TLS, and node-to-node calls over TLS."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nodes.hierarchy import NodeSpec
from nodes.trust.certificates import ensure_ca, issue
from resolver.channels import ChannelPool, ClientTLS
from resolver.errors import Unavailable
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.resolver import Resolver
from resolver.wire import resolution_pb2, resolution_pb2_grpc
from tests.integration.conftest import Cluster


def tls_spec(state: Path, name: str, apex: str, mutual: bool = False, **extra: dict[str, object]) -> NodeSpec:
    ca, ca_key = ensure_ca(state / "tls")
    cert, key = issue(state / "tls", name, ca, ca_key)
    sections: dict[str, dict[str, object]] = {
        "tls": {"mode": "required", "cert": str(cert), "key": str(key), "ca": str(ca), "require_client_cert": mutual}
    }
    sections.update(extra)
    return NodeSpec(name, "enterprise" if apex else "recursive", apex, 0, extra=sections)


async def test_tls_node_serves_tls_clients_only(cluster: Cluster) -> None:
    address = await asyncio.to_thread(cluster.start, tls_spec(cluster.state, "secure", "88.9"))
    tls = ClientTLS(cluster.state / "tls" / "ca.pem")
    registrar = Registrar(node=address, channels=ChannelPool(tls))
    try:
        await registrar.create("88.9/OVER-TLS", [Value(1, "URL", b"u")])
    finally:
        await registrar.close()
    async with Resolver([address], channels=ChannelPool(tls)) as resolver:
        assert (await resolver.resolve("88.9/OVER-TLS")).version == 1
    async with Resolver([address], timeout=2.0) as plaintext:
        with pytest.raises(Unavailable):
            await plaintext.resolve("88.9/OVER-TLS")
    other_ca, _ = ensure_ca(cluster.state / "other-ca")
    async with Resolver([address], timeout=2.0, channels=ChannelPool(ClientTLS(other_ca))) as untrusting:
        with pytest.raises(Unavailable):  # the node's certificate is not from this CA
            await untrusting.resolve("88.9/OVER-TLS")


async def test_mutual_tls_and_node_to_node_calls(cluster: Cluster) -> None:
    state = cluster.state
    address = await asyncio.to_thread(cluster.start, tls_spec(state, "mutual", "88.9", mutual=True))
    ca = state / "tls" / "ca.pem"
    async with Resolver([address], timeout=2.0, channels=ChannelPool(ClientTLS(ca))) as no_cert:
        with pytest.raises(Unavailable):  # the node wants a client certificate
            await no_cert.resolve("88.9/X")
    cert, key = issue(state / "tls", "client", ca, state / "tls" / "ca.key")
    with_cert = ClientTLS(ca, cert, key)
    registrar = Registrar(node=address, channels=ChannelPool(with_cert))
    try:
        await registrar.create("88.9/MUTUAL", [Value(1, "URL", b"m")])
    finally:
        await registrar.close()
    # A recursive node reaches the mutual-TLS node with its own certificate.
    recursive = await asyncio.to_thread(
        cluster.start, tls_spec(state, "recursive", "", recursion={"enabled": True, "roots": [address]})
    )
    pool = ChannelPool(with_cert)
    try:
        stub = resolution_pb2_grpc.ResolutionStub(pool.get(recursive))
        answer = await stub.Resolve(resolution_pb2.ResolveRequest(identifier="88.9/MUTUAL", recursive=True))
        assert answer.record.values[0].data == b"m"
    finally:
        await pool.close()
