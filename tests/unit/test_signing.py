"""The signed-call scheme: a signature names the node it is meant for (its audience)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from nodes.trust.authentication import Authenticator, audiences_of
from resolver.errors import NotFound, Unauthenticated
from resolver.identifier import Identifier, parse_identifier
from resolver.record import Record
from resolver.signing import (
    HEADERS,
    Signer,
    audience_of,
    canonical_message,
    generate_key,
    pubkey_value,
    verify,
    write_private,
)
from resolver.site import Referral

METHOD = "/idis.v1.Registration/Create"
REQUEST = b"request bytes"
NOW = 1_800_000_000.0


def test_the_canonical_message_names_its_audience() -> None:
    message = canonical_message(METHOD, REQUEST, 1, "ab" * 16, "88.100.1/ADMIN", 300, "127.0.0.1:2643")
    lines = message.decode().split("\n")
    assert lines[0] == "idis-v2" and lines[-1] == "127.0.0.1:2643"
    other = canonical_message(METHOD, REQUEST, 1, "ab" * 16, "88.100.1/ADMIN", 300, "127.0.0.1:2642")
    assert message != other


def test_a_signature_for_one_audience_does_not_verify_for_another() -> None:
    key = generate_key()
    headers = dict(Signer("88.100.1/ADMIN", key).metadata(METHOD, REQUEST, "Node-A.example:7001", now=NOW))
    assert set(headers) == set(HEADERS)
    assert headers["idis-audience"] == "node-a.example:7001"  # host names are case-insensitive
    signature = base64.b64decode(headers["idis-signature"])

    def message(audience: str) -> bytes:
        timestamp, nonce = int(headers["idis-timestamp"]), headers["idis-nonce"]
        return canonical_message(METHOD, REQUEST, timestamp, nonce, "88.100.1/ADMIN", 300, audience)

    assert verify(key.public_key(), signature, message("node-a.example:7001"))
    assert not verify(key.public_key(), signature, message("node-b.example:7001"))


@pytest.mark.parametrize(
    ("address", "audience"),
    [("127.0.0.1:2643", "127.0.0.1:2643"), ("Node.Example.COM:7001", "node.example.com:7001"), ("[::1]:9", "[::1]:9")],
)
def test_audience_of_lower_cases_the_host_only(address: str, audience: str) -> None:
    assert audience_of(address) == audience


def test_a_node_is_known_by_its_listen_address_its_configured_names_and_loopback() -> None:
    assert audiences_of("10.1.2.3:7001", ["IDIS.example.com:443"]) == {"10.1.2.3:7001", "idis.example.com:443"}
    loopback = audiences_of("127.0.0.1:7001")
    assert loopback == {"127.0.0.1:7001", "localhost:7001", "[::1]:7001"}
    # Listening everywhere, a node cannot know its public names: only loopback and the configured ones.
    assert audiences_of("0.0.0.0:7001", ["idis-2.example.com:7001"]) == {
        "localhost:7001",
        "127.0.0.1:7001",
        "[::1]:7001",
        "idis-2.example.com:7001",
    }


class Keys:
    """This node hosts 88.100.1/ADMIN's key; counts key lookups."""

    def __init__(self, signer: Signer) -> None:
        self.record = Record(parse_identifier(signer.identity), (pubkey_value(signer.key),), 1)
        self.lookups = 0

    async def local_answer(self, ident: Identifier) -> Record | Referral:
        self.lookups += 1
        if ident.key != self.record.identifier.key:
            raise NotFound(f"{ident} does not exist")
        return self.record


async def test_a_call_signed_for_another_node_is_refused_before_any_key_lookup() -> None:
    signer = Signer("88.100.1/ADMIN", generate_key())
    keys = Keys(signer)
    auth = Authenticator(keys.local_answer, {}, None, clock=lambda: NOW, audiences=["127.0.0.1:2643"])
    elsewhere = signer.metadata(METHOD, REQUEST, "127.0.0.1:2642", now=NOW)
    with pytest.raises(Unauthenticated, match=r"signed for the audience '127\.0\.0\.1:2642', which is not this node"):
        await auth.authenticate(METHOD, REQUEST, elsewhere)
    assert keys.lookups == 0
    # The same call signed for this node passes; a name added later (the bound port) too.
    caller = await auth.authenticate(METHOD, REQUEST, signer.metadata(METHOD, REQUEST, "127.0.0.1:2643", now=NOW))
    assert caller.identity.key == "88.100.1/ADMIN"
    auth.known_as(["Idis-1.Example:2643"])
    await auth.authenticate(METHOD, REQUEST, signer.metadata(METHOD, REQUEST, "idis-1.example:2643", now=NOW))


async def test_an_audience_header_that_is_not_the_signed_one_does_not_verify() -> None:
    signer = Signer("88.100.1/ADMIN", generate_key())
    auth = Authenticator(
        Keys(signer).local_answer, {}, None, clock=lambda: NOW, audiences=["127.0.0.1:2643", "127.0.0.1:2642"]
    )
    headers = dict(signer.metadata(METHOD, REQUEST, "127.0.0.1:2642", now=NOW))
    headers["idis-audience"] = "127.0.0.1:2643"  # re-addressed to the other node after signing
    with pytest.raises(Unauthenticated, match="signature does not verify"):
        await auth.authenticate(METHOD, REQUEST, list(headers.items()))


async def test_an_overlong_audience_is_refused_without_echoing_it_whole() -> None:
    signer = Signer("88.100.1/ADMIN", generate_key())
    auth = Authenticator(Keys(signer).local_answer, {}, None, clock=lambda: NOW, audiences=["127.0.0.1:2643"])
    headers = dict(signer.metadata(METHOD, REQUEST, "127.0.0.1:2643", now=NOW))
    headers["idis-audience"] = "x" * 5000
    with pytest.raises(Unauthenticated, match="which is not this node") as refused:
        await auth.authenticate(METHOD, REQUEST, list(headers.items()))
    assert len(str(refused.value)) < 600


def test_private_files_are_owner_only_whole_and_exclusive_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "a.secret"
    write_private(path, b"one")
    assert path.read_bytes() == b"one" and path.stat().st_mode & 0o777 == 0o600
    write_private(path, b"two")
    assert path.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        write_private(path, b"three", exclusive=True)
    assert path.read_bytes() == b"two"
    write_private(tmp_path / "keys" / "b.secret", b"new", exclusive=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.secret", "b.secret"]  # no temporaries left
