"""The authenticator with fakes: this node's records, a resolver for other nodes' and clocks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nodes.config import ConfigError, parse_config
from nodes.trust.authentication import Authenticator
from nodes.trust.quotas import RateLimited, TokenBuckets
from resolver.errors import NotAuthoritative, NotFound, Unauthenticated, Unavailable
from resolver.identifier import Identifier, parse_identifier, parse_prefix
from resolver.record import Record
from resolver.signing import Signer, generate_key, pubkey_value
from resolver.site import Referral, make_site
from tests.unit.test_config import GOOD, with_

METHOD = "/idis.v1.Registration/Create"
REQUEST = b"request bytes"
NOW = 1_800_000_000.0
AUDIENCE = "127.0.0.1:2643"
HOME = parse_prefix("88.100.1")


def key_record(identity: str, key: Ed25519PrivateKey) -> Record:
    return Record(parse_identifier(identity), (pubkey_value(key),), 1)


@dataclass
class Fakes:
    """This node (apex 88.100.1, delegating 88.100.1.7) and the rest of the hierarchy."""

    local: dict[str, Record] = field(default_factory=dict)
    remote: dict[str, Record | Exception] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    now: float = 0.0
    """The monotonic clock of the caches."""

    async def local_answer(self, ident: Identifier) -> Record | Referral:
        if ident.prefix.is_within(parse_prefix("88.100.1.7")):
            return Referral(parse_prefix("88.100.1.7"), make_site(["127.0.0.1:9"]), 86400)
        if not ident.prefix.is_within(HOME):
            raise NotAuthoritative(f"{ident} is outside this node's apexes")
        if ident.key not in self.local:
            raise NotFound(f"{ident} does not exist")
        return self.local[ident.key]

    async def resolve(self, ident: Identifier) -> Record:
        self.lookups.append(ident.key)
        answer = self.remote.get(ident.key, NotFound(f"{ident} does not exist"))
        if isinstance(answer, Exception):
            raise answer
        return answer

    def authenticator(self, **kwargs: Any) -> Authenticator:
        return Authenticator(
            self.local_answer,
            {},
            self.resolve,
            clock=lambda: NOW,
            monotonic=lambda: self.now,
            audiences=[AUDIENCE],
            **kwargs,
        )


async def call(auth: Authenticator, signer: Signer, peer: str = "ipv4:10.0.0.1:5000") -> str:
    """The identity authenticated for one call signed by ``signer``."""
    caller = await auth.authenticate(METHOD, REQUEST, signer.metadata(METHOD, REQUEST, AUDIENCE, now=NOW), peer)
    return caller.identity.key


def partner() -> tuple[Signer, Record]:
    key = generate_key()
    return Signer("88.100.2/PARTNER", key), key_record("88.100.2/PARTNER", key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("idis-nonce", None), "no signature: write calls need the metadata idis-nonce"),
        (("idis-key-index", "9" * 5000), "idis-key-index is not a number"),
        (("idis-key-index", "³"), "idis-key-index is not a number"),
        (("idis-timestamp", "1" * 5000), "idis-timestamp is not a number of seconds"),
        (("idis-timestamp", "100"), "s off the node's clock"),
        (("idis-nonce", "XYZ"), "idis-nonce is not 16 bytes of lower-case hex"),
        (("idis-signature", "not base64!"), "idis-signature is not base64"),
    ],
)
async def test_cheap_checks_come_before_any_key_lookup(change: tuple[str, str | None], message: str) -> None:
    fakes = Fakes()
    signer, record = partner()
    fakes.remote[record.identifier.key] = record
    header, value = change
    metadata = [(k, v) for k, v in signer.metadata(METHOD, REQUEST, AUDIENCE, now=NOW) if k != header]
    if value is not None:
        metadata.append((header, value))
    with pytest.raises(Unauthenticated) as info:
        await fakes.authenticator().authenticate(METHOD, REQUEST, metadata)
    assert message in str(info.value)
    assert fakes.lookups == []


async def test_a_spent_nonce_is_refused_before_any_key_lookup() -> None:
    fakes = Fakes()
    signer, record = partner()
    fakes.remote[record.identifier.key] = record
    auth = fakes.authenticator()
    metadata = signer.metadata(METHOD, REQUEST, AUDIENCE, now=NOW)
    await auth.authenticate(METHOD, REQUEST, metadata)
    fakes.now += 3600  # the key is no longer cached
    with pytest.raises(Unauthenticated, match="nonce already used"):
        await auth.authenticate(METHOD, REQUEST, metadata)
    assert fakes.lookups == ["88.100.2/PARTNER"]


async def test_keys_of_other_nodes_are_cached_for_key_cache_ttl_then_revoked() -> None:
    fakes = Fakes()
    signer, record = partner()
    fakes.remote[record.identifier.key] = record
    auth = fakes.authenticator(key_cache_ttl=20.0)
    assert await call(auth, signer) == "88.100.2/PARTNER"
    fakes.now = 19.0
    assert await call(auth, signer) == "88.100.2/PARTNER"
    assert fakes.lookups == ["88.100.2/PARTNER"]
    del fakes.remote[record.identifier.key]  # deleted on its home node
    fakes.now = 20.0
    with pytest.raises(Unauthenticated, match=r"identity 88\.100\.2/PARTNER is not registered"):
        await call(auth, signer)
    assert fakes.lookups == ["88.100.2/PARTNER"] * 2


async def test_keys_of_identities_hosted_here_are_read_fresh_every_time() -> None:
    fakes = Fakes()
    key = generate_key()
    signer = Signer("88.100.1/OPS", key)
    fakes.local["88.100.1/OPS"] = key_record("88.100.1/OPS", key)
    auth = fakes.authenticator()
    assert await call(auth, signer) == "88.100.1/OPS"
    fakes.local["88.100.1/OPS"] = key_record("88.100.1/OPS", generate_key())  # key replaced
    with pytest.raises(Unauthenticated, match="signature does not verify"):
        await call(auth, signer)
    del fakes.local["88.100.1/OPS"]  # identity deleted
    with pytest.raises(Unauthenticated, match=r"identity 88\.100\.1/OPS is not registered"):
        await call(auth, signer)
    assert fakes.lookups == []


async def test_identities_under_a_prefix_this_node_delegated_are_resolved() -> None:
    fakes = Fakes()
    key = generate_key()
    fakes.remote["88.100.1.7/OPS"] = key_record("88.100.1.7/OPS", key)
    assert await call(fakes.authenticator(), Signer("88.100.1.7/OPS", key)) == "88.100.1.7/OPS"
    assert fakes.lookups == ["88.100.1.7/OPS"]


async def test_a_failed_lookup_says_nothing_of_why_and_is_remembered() -> None:
    fakes = Fakes()
    signer, _record = partner()
    fakes.remote["88.100.2/PARTNER"] = Unavailable("no server for 88.100 answered: 10.1.2.3:2641 (connection refused)")
    auth = fakes.authenticator(negative_ttl=15.0)
    for _ in range(3):
        with pytest.raises(Unauthenticated) as info:
            await call(auth, signer)
        assert str(info.value) == "the key of 88.100.2/PARTNER could not be resolved"
    assert fakes.lookups == ["88.100.2/PARTNER"]
    fakes.now = 15.0
    with pytest.raises(Unauthenticated):
        await call(auth, signer)
    assert fakes.lookups == ["88.100.2/PARTNER"] * 2


async def test_an_identity_that_does_not_exist_elsewhere_is_remembered_too() -> None:
    fakes = Fakes()
    signer, _record = partner()
    auth = fakes.authenticator(negative_ttl=15.0)
    for _ in range(2):
        with pytest.raises(Unauthenticated, match=r"identity 88\.100\.2/PARTNER is not registered"):
            await call(auth, signer)
    assert fakes.lookups == ["88.100.2/PARTNER"]


async def test_a_key_lookup_that_hangs_is_cut_off_by_its_deadline() -> None:
    fakes = Fakes()
    signer, _record = partner()
    never = asyncio.Event()

    async def hangs(ident: Identifier) -> Record:
        await never.wait()
        raise AssertionError("unreachable")

    auth = Authenticator(fakes.local_answer, {}, hangs, clock=lambda: NOW, lookup_timeout=0.01, audiences=[AUDIENCE])
    with pytest.raises(Unauthenticated, match=r"^the key of 88\.100\.2/PARTNER could not be resolved$"):
        await call(auth, signer)


async def test_key_lookups_are_rate_limited_per_peer() -> None:
    fakes = Fakes()
    auth = fakes.authenticator(lookup_limit=TokenBuckets(1.0, 2.0, clock=lambda: fakes.now))
    strangers = [Signer(f"88.100.2/STRANGER-{n}", generate_key()) for n in range(4)]
    for stranger in strangers[:2]:
        with pytest.raises(Unauthenticated, match="is not registered"):
            await call(auth, stranger, peer="10.0.0.1")
    with pytest.raises(RateLimited, match=r"too many key lookups for identities of other nodes \(at most 1/s\)"):
        await call(auth, strangers[2], peer="10.0.0.1")
    assert len(fakes.lookups) == 2
    with pytest.raises(Unauthenticated, match="is not registered"):  # another peer has its own bucket
        await call(auth, strangers[2], peer="10.0.0.2")
    assert len(fakes.lookups) == 3


async def test_without_roots_an_identity_of_another_node_is_refused_without_a_lookup() -> None:
    fakes = Fakes()
    signer, _record = partner()
    auth = Authenticator(fakes.local_answer, {}, None, clock=lambda: NOW, audiences=[AUDIENCE])
    with pytest.raises(Unauthenticated, match="no \\[auth\\] roots are configured"):
        await call(auth, signer)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("key_cache_ttl", 0, "auth.key_cache_ttl: must be more than 0 and at most 3600 seconds"),
        ("key_cache_ttl", 86400, "auth.key_cache_ttl: must be more than 0 and at most 3600 seconds"),
        ("key_negative_ttl", -1, "auth.key_negative_ttl: must be in 0..3600 seconds, got -1"),
        ("key_lookup_timeout", 60, "auth.key_lookup_timeout: must be more than 0 and at most 30 seconds"),
        ("key_lookups_per_second", -1, "auth.key_lookups_per_second: must not be negative"),
        ("key_cache_ttl", "30", "auth.key_cache_ttl: expected float, got str"),
    ],
)
def test_bad_auth_settings_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_("auth", **{key: value}))
    assert message in str(info.value)


def test_auth_and_recursion_settings_have_safe_defaults() -> None:
    config = parse_config(GOOD)
    assert config.auth.key_cache_ttl == 30.0 and config.auth.key_negative_ttl == 15.0
    assert config.auth.key_lookup_timeout == 2.0 and config.recursion.max_ttl == 86400
    with pytest.raises(ConfigError, match=r"recursion\.max_ttl: must be in 1\.\.604800 seconds, got 4294967295"):
        parse_config(with_("recursion", max_ttl=2**32 - 1))
