"""The resolver's acceptance rules, against a hierarchy of fake servers (no network).

A server is a function from the question to its serialised answer (or an error it raises), as
``Resolver._ask`` returns them; the hierarchy below is the README's, with one rogue node:

    root:1     apex 88        refers 88.100 to sec:1
    sec:1      apex 88.100    refers 88.100.9 to rogue:1, answers 88.100.2/* itself
    rogue:1    delegated 88.100.9, answers whatever a test makes it answer
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from resolver.errors import NotFound, ReferralLoop, ResolutionFailed, Unavailable
from resolver.identifier import Identifier, parse_identifier, parse_prefix
from resolver.record import Record, Value
from resolver.resolver import Resolver, Trace
from resolver.site import Referral, make_site
from resolver.wire import decode_answer, record_to_pb, referral_to_pb, resolution_pb2

Server = Callable[[Identifier], bytes]
HUGE = 2**32 - 1


def referral(prefix: str, addresses: list[str], ttl: int = 3600) -> bytes:
    answer = Referral(parse_prefix(prefix), make_site(addresses), ttl)
    return resolution_pb2.ResolveResponse(referral=referral_to_pb(answer)).SerializeToString()


def record(identifier: str, ttl: int = 3600, data: bytes = b"https://example.com") -> bytes:
    answer = Record(parse_identifier(identifier), (Value(1, "URL", data, ttl=ttl),), 1)
    return resolution_pb2.ResolveResponse(record=record_to_pb(answer)).SerializeToString()


def root(ident: Identifier) -> bytes:
    return referral("88.100", ["sec:1"])


def secondary(ident: Identifier) -> bytes:
    if ident.prefix.is_within(parse_prefix("88.100.9")):
        return referral("88.100.9", ["rogue:1"])
    if ident.key == "88.100.2/PARTNER":
        return record("88.100.2/PARTNER", data=b"the real one")
    raise NotFound(f"{ident} does not exist", 300)


class FakeResolver(Resolver):
    """A Resolver whose servers are functions; an address without one is unreachable."""

    def __init__(self, rogue: Server | None = None, **kwargs: object) -> None:
        super().__init__(["root:1"], **kwargs)  # type: ignore[arg-type]
        self.servers: dict[str, Server] = {"root:1": root, "sec:1": secondary}
        if rogue is not None:
            self.servers["rogue:1"] = rogue
        self.asked: list[tuple[str, str]] = []

    async def _ask(self, address: str, ident: Identifier) -> bytes:
        self.asked.append((address, str(ident)))
        server = self.servers.get(address)
        if server is None:
            raise Unavailable(f"{address}: connection refused")
        return server(ident)

    def cached(self, key: str) -> Record | Referral | None:
        data = self.cache.get(key.encode())
        return decode_answer(data) if data is not None else None


async def test_the_fake_hierarchy_resolves_and_caches_what_it_learns() -> None:
    resolver = FakeResolver(lambda ident: record(str(ident)))
    assert (await resolver.resolve("88.100.9/X")).identifier.key == "88.100.9/X"
    assert [a for a, _ in resolver.asked] == ["root:1", "sec:1", "rogue:1"]
    assert len(resolver.cache) == 3  # two referrals and the record
    resolver.asked.clear()
    await resolver.resolve("88.100.9/Y")  # starts at the cached referral for 88.100.9
    assert [a for a, _ in resolver.asked] == ["rogue:1"]


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("88.100", "referred 88.100.9/X to 88.100, outside its authority (it was delegated 88.100.9"),
        ("88", "referred 88.100.9/X to 88, outside its authority"),
        ("88.100.9", "referred 88.100.9/X to 88.100.9, outside its authority"),
        ("88.100.8", "referred 88.100.9/X to 88.100.8, which does not cover its prefix"),
        ("88.100.9.5", "referred 88.100.9/X to 88.100.9.5, which does not cover its prefix"),
    ],
)
async def test_a_referral_beyond_the_servers_delegation_is_refused_and_not_cached(prefix: str, message: str) -> None:
    resolver = FakeResolver(lambda ident: referral(prefix, ["rogue-2:1"], ttl=HUGE))
    with pytest.raises(ResolutionFailed) as info:
        await resolver.resolve("88.100.9/X")
    assert message in str(info.value)
    assert ("rogue-2:1", "88.100.9/X") not in resolver.asked
    assert len(resolver.cache) == 2  # the two legitimate referrals, nothing of the rogue's answer
    upper = resolver.cached(prefix)
    assert upper is None or (isinstance(upper, Referral) and upper.site.servers[0].address != "rogue-2:1")
    # Questions about the rest of 88.100 still go to the secondary.
    resolver.asked.clear()
    partner = await resolver.resolve("88.100.2/PARTNER")
    assert partner.values[0].data == b"the real one"
    assert [a for a, _ in resolver.asked] == ["sec:1"]


async def test_a_referral_strictly_below_the_delegation_is_followed() -> None:
    def rogue(ident: Identifier) -> bytes:
        return referral("88.100.9.5", ["deep:1"])

    resolver = FakeResolver(rogue)
    resolver.servers["deep:1"] = lambda ident: record(str(ident))
    assert (await resolver.resolve("88.100.9.5/X")).identifier.key == "88.100.9.5/X"
    below = resolver.cached("88.100.9.5")
    assert isinstance(below, Referral) and below.site.servers[0].address == "deep:1"


async def test_the_roots_may_refer_to_any_prefix_that_covers_the_question() -> None:
    resolver = FakeResolver()
    resolver.servers["root:1"] = lambda ident: referral("88.100.2", ["sec:1"])
    assert (await resolver.resolve("88.100.2/PARTNER")).values[0].data == b"the real one"


async def test_a_server_reached_through_a_cached_referral_keeps_that_delegation() -> None:
    answers = {"88.100.9/FIRST": record("88.100.9/FIRST"), "88.100.9/SECOND": referral("88.100", ["rogue-2:1"])}

    resolver = FakeResolver(lambda ident: answers[str(ident)])
    await resolver.resolve("88.100.9/FIRST")
    resolver.asked.clear()
    with pytest.raises(ResolutionFailed, match="outside its authority"):
        await resolver.resolve("88.100.9/SECOND")
    assert resolver.asked == [("rogue:1", "88.100.9/SECOND")]
    referral_88_100 = resolver.cached("88.100")
    assert isinstance(referral_88_100, Referral) and referral_88_100.site.servers[0].address == "sec:1"


async def test_a_record_for_another_identifier_is_refused_and_not_cached() -> None:
    resolver = FakeResolver(lambda ident: record("88.100.2/PARTNER", data=b"the rogue's"))
    with pytest.raises(ResolutionFailed, match=r"rogue:1 answered 88\.100\.9/X with the record of 88\.100\.2/PARTNER"):
        await resolver.resolve("88.100.9/X")
    assert resolver.cached("88.100.9/X") is None and resolver.cached("88.100.2/PARTNER") is None
    assert (await resolver.resolve("88.100.2/PARTNER")).values[0].data == b"the real one"


async def test_records_are_matched_by_normalised_key() -> None:
    # The prefix is case-insensitive: a record for 88.100.9.A/X answers 88.100.9.a/X ...
    resolver = FakeResolver(lambda ident: record("88.100.9.A/X"))
    assert (await resolver.resolve("88.100.9.a/X")).identifier.key == "88.100.9.A/X"
    # ... but the suffix is not: x is another identifier.
    with pytest.raises(ResolutionFailed, match=r"with the record of 88\.100\.9\.A/X"):
        await resolver.resolve("88.100.9.a/x")


@pytest.mark.parametrize("max_ttl", [None, 600])
async def test_every_cached_ttl_is_capped(max_ttl: int | None) -> None:
    cap = 86400 if max_ttl is None else max_ttl

    def rogue(ident: Identifier) -> bytes:
        if ident.suffix == "REFERRED":
            return referral("88.100.9.5", ["deep:1"], ttl=HUGE)
        if ident.suffix == "MISSING":
            raise NotFound("no such identifier", HUGE)
        return record(str(ident), ttl=HUGE)

    resolver = FakeResolver(rogue) if max_ttl is None else FakeResolver(rogue, max_ttl=max_ttl)
    resolver.servers["root:1"] = lambda ident: referral("88.100", ["sec:1"], ttl=HUGE)
    resolver.servers["deep:1"] = lambda ident: record(str(ident), ttl=HUGE)
    await resolver.resolve("88.100.9/RECORD")
    await resolver.resolve("88.100.9.5/REFERRED")
    with pytest.raises(NotFound) as info:
        await resolver.resolve("88.100.9/MISSING")
    assert info.value.negative_ttl == cap
    for key in ("88.100", "88.100.9/RECORD", "88.100.9.5", "88.100.9.5/REFERRED", "88.100.9/MISSING"):
        assert 0 < resolver.cache.remaining_ttl(key.encode()) <= cap + 1, key  # whole seconds, rounded up


async def test_at_most_a_few_servers_of_a_site_are_tried() -> None:
    twenty = [f"10.0.0.{n}:2641" for n in range(20)]

    resolver = FakeResolver(lambda ident: referral("88.100.9.5", twenty))
    with pytest.raises(Unavailable, match=r"no server for 88\.100\.9\.5 answered"):
        await resolver.resolve("88.100.9.5/X")
    assert len([a for a, _ in resolver.asked if a in twenty]) == 4
    fewer = FakeResolver(lambda ident: referral("88.100.9.5", twenty), max_servers_per_site=2)
    with pytest.raises(Unavailable):
        await fewer.resolve("88.100.9.5/X")
    assert len([a for a, _ in fewer.asked if a in twenty]) == 2


async def test_the_next_server_of_a_site_answers_when_one_is_down() -> None:
    site = ["down:1", "rogue:1"]
    # An identifier for which the site's server choice starts with the server that is down.
    question = next(
        f"88.100.9/X{n}" for n in range(100) if make_site(site).ordered_for(f"88.100.9/X{n}")[0].address == "down:1"
    )
    resolver = FakeResolver(lambda ident: record(str(ident)))
    resolver.servers["sec:1"] = lambda ident: referral("88.100.9", site)
    trace = Trace()
    assert (await resolver.resolve(question, trace)).identifier.key == question
    assert [h.server for h in trace.hops] == ["root:1", "sec:1", "down:1", "rogue:1"]


@pytest.mark.parametrize("answer", [b"\xff\xff\xff", b""])
async def test_a_malformed_answer_is_a_resolution_failure(answer: bytes) -> None:
    resolver = FakeResolver(lambda ident: answer)
    with pytest.raises(ResolutionFailed, match=r"rogue:1 gave a malformed answer for 88\.100\.9/X"):
        await resolver.resolve("88.100.9/X")
    assert len(resolver.cache) == 2


async def test_a_referral_back_to_a_server_already_asked_is_a_loop() -> None:
    resolver = FakeResolver(lambda ident: referral("88.100.9", ["sec:1"]))
    with pytest.raises(
        ReferralLoop, match=r"referral loop resolving 88\.100\.9/X: root:1 -> sec:1 -> rogue:1 -> sec:1"
    ):
        await resolver.resolve("88.100.9/X")


async def test_without_answer_caching_only_referrals_are_kept() -> None:
    resolver = FakeResolver(lambda ident: record(str(ident)), cache_answers=False)
    await resolver.resolve("88.100.9/X")
    with pytest.raises(NotFound):
        await resolver.resolve("88.100.2/NOBODY")
    assert resolver.cached("88.100.9/X") is None and resolver.cache.get(b"88.100.2/NOBODY") is None
    assert isinstance(resolver.cached("88.100.9"), Referral)
    resolver.asked.clear()
    await resolver.resolve("88.100.9/X")
    assert resolver.asked == [("rogue:1", "88.100.9/X")]  # asked again, from the cached referral
