from __future__ import annotations

import pytest

from resolver.errors import InvalidArgument
from resolver.site import make_site, parse_address


def test_server_choice_spreads_keys_and_keeps_every_server_for_failover() -> None:
    site = make_site(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    firsts = {site.ordered_for(f"88.1/{n}")[0].address for n in range(100)}
    assert firsts == {"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}
    order = site.ordered_for("88.1/X")
    assert sorted(s.address for s in order) == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    assert site.ordered_for("88.1/x") == order  # the hash is of the upper-cased key


@pytest.mark.parametrize("bad", ["localhost", ":80", "host:0", "host:99999", "host:http"])
def test_bad_addresses_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="host:port"):
        parse_address(bad)


def test_a_site_needs_servers() -> None:
    with pytest.raises(InvalidArgument):
        make_site([])
