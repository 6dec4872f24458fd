from __future__ import annotations

import dataclasses

import pytest

from resolver.errors import InvalidArgument
from resolver.site import make_site, parse_address
from resolver.wire import decode_site, encode_site, record_pb2


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


def test_a_site_is_servers_only_and_reads_sites_stored_with_the_retired_primary_flag() -> None:
    """Site.primary was retired (field 2 reserved): there is no mirror site. A site stored
    before, with primary set, still reads; a site written now carries servers only."""
    site = make_site(["127.0.0.1:1", "127.0.0.1:2"])
    assert [f.name for f in dataclasses.fields(site)] == ["servers"]
    assert "primary" not in record_pb2.Site.DESCRIPTOR.fields_by_name
    assert 2 not in record_pb2.Site.DESCRIPTOR.fields_by_number
    old = record_pb2.Site(servers=[record_pb2.Server(address="127.0.0.1:1", server_id=1)]).SerializeToString()
    old += b"\x10\x01"  # field 2 (varint) = true: primary as nodes wrote it
    assert decode_site(old) == make_site(["127.0.0.1:1"])
    assert decode_site(encode_site(site)) == site
    assert encode_site(make_site(["127.0.0.1:1"])) == old[:-2]  # no field 2 written
