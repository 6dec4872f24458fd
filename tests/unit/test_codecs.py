"""Wire and JSON codecs: what goes out comes back the same."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resolver import errors
from resolver.identifier import parse_identifier
from resolver.json_form import record_to_json, values_from_json
from resolver.record import Permission, Record, Reference, TtlType, Value
from resolver.site import make_site
from resolver.status import error_from_code_number, error_from_status, status_code_of
from resolver.wire import decode_record, decode_site, encode_record, encode_site, value_from_pb, value_to_pb

values = st.builds(
    Value,
    index=st.integers(1, 2**32 - 1),
    type=st.text(min_size=1, max_size=20),
    data=st.binary(max_size=100),
    ttl=st.integers(0, 2**32 - 1),
    ttl_type=st.sampled_from(list(TtlType)),
    timestamp=st.integers(0, 2**40),
    permissions=st.integers(0, 15).map(Permission),
    references=st.lists(st.builds(Reference, st.just("88.1/ref"), st.integers(0, 100)), max_size=3).map(tuple),
)


@given(st.lists(values, max_size=5))
def test_record_round_trips_through_the_wire_form(vals: list[Value]) -> None:
    record = Record(parse_identifier("88.100.Ab/SN-1"), tuple(vals), 7)
    assert decode_record(encode_record(record)) == record


def test_zero_ttl_and_permissions_on_writes_mean_the_defaults() -> None:
    msg = value_to_pb(Value(1, "URL", b"x", ttl=0, permissions=Permission(0)))
    written = value_from_pb(msg, for_write=True)
    assert written.ttl == 86400 and written.permissions == Permission(0xE)


def test_site_round_trips() -> None:
    site = make_site(["127.0.0.1:1", "127.0.0.1:2"])
    assert decode_site(encode_site(site)) == site


@given(st.lists(values, max_size=4, unique_by=lambda v: v.index))
def test_json_form_round_trips_what_a_registrant_sets(vals: list[Value]) -> None:
    record = Record(parse_identifier("88.1/x"), tuple(vals), 1)
    back = values_from_json(record_to_json(record)["values"])
    assert [v.same_content(w) for v, w in zip(back, vals, strict=True)] == [True] * len(vals)


def test_json_values_name_their_problem() -> None:
    with pytest.raises(errors.InvalidValue, match=r"values\[1\]: type must be a string"):
        values_from_json([{"type": "URL", "data": "x"}, {"data": "y"}])
    with pytest.raises(errors.InvalidValue, match="unknown field 'colour'"):
        values_from_json([{"type": "URL", "colour": "red"}])


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidIdentifier("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.VersionConflict("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ReferralLoop("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.LimitExceeded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (ValueError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_has_one_status_and_maps_back(error: Exception, code: grpc.StatusCode) -> None:
    assert status_code_of(error) == code
    back = error_from_status(code, "msg")
    assert status_code_of(back) == code
    assert status_code_of(error_from_code_number(code.value[0], "msg")) == code
