"""HSJ's JSON form of values, its response codes, and sealed secret keys: the REST API's pieces
that need no server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nodes.http.codes import RC, HandleFailure, failure_of, http_status
from nodes.http.handle_json import (
    admin_permissions_text,
    permissions_text,
    value_from_json,
    value_to_json,
    values_of_body,
)
from nodes.trust.quotas import RateLimited
from nodes.trust.secret_keys import (
    SECKEY_TYPE,
    SecretSealer,
    SecretVerifier,
    is_sealed,
    matches,
    seal,
    seal_secret_values,
)
from resolver import errors
from resolver.record import (
    DEFAULT_PERMISSIONS,
    AdminPermission,
    Permission,
    Reference,
    TtlType,
    Value,
    admin_value,
    grant_of,
    select_values,
)


def test_value_out_in_hsj_order_with_defaults_left_out() -> None:
    value = Value(1, "URL", b"https://example.com", timestamp=1_800_000_000)
    out = value_to_json(value)
    assert list(out) == ["index", "type", "data", "ttl", "timestamp"]
    assert out["data"] == {"format": "string", "value": "https://example.com"}
    assert out["timestamp"] == "2027-01-15T08:00:00Z"
    private = value_to_json(Value(2, "EMAIL", b"x", permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE))
    assert private["permissions"] == "1100" and "timestamp" not in private
    absolute = value_to_json(Value(3, "X", b"y", ttl=1_800_000_000, ttl_type=TtlType.ABSOLUTE))
    assert absolute["ttl"] == "2027-01-15T08:00:00Z"
    refs = value_to_json(Value(4, "X", b"y", references=(Reference("88.100.1/A", 2),)))
    assert refs["references"] == [{"handle": "88.100.1/A", "index": 2}]


def test_data_formats_out() -> None:
    assert value_to_json(Value(1, "BIN", b"\x00\x01"))["data"] == {"format": "base64", "value": "AAE="}
    assert value_to_json(Value(1, "TXT", b"line\nnext"))["data"]["format"] == "string"  # 0x0a passes HSJ's test
    assert value_to_json(Value(1, "BAD", b"\xff"))["data"]["format"] == "base64"
    admin = value_to_json(admin_value(100, "0.NA/88.100.1", 200, AdminPermission(0b011111110011)))
    assert admin["data"] == {
        "format": "admin",
        "value": {"handle": "0.NA/88.100.1", "index": 200, "permissions": "011111110011"},
    }


def test_permission_texts() -> None:
    assert permissions_text(DEFAULT_PERMISSIONS) == "1110"
    assert admin_permissions_text(AdminPermission.LIST_HDLS | AdminPermission.ADD_HANDLE) == "100000000001"


def test_values_in_as_pyhandle_sends_them() -> None:
    body = {
        "values": [
            {
                "index": 100,
                "type": "HS_ADMIN",
                "data": {
                    "value": {"index": "200", "handle": "0.NA/88.100.1", "permissions": "011111110011"},
                    "format": "admin",
                },
            },
            {"index": 1, "type": "URL", "data": "https://example.com"},
            {"index": "2", "type": "CHECKSUM", "data": "abc", "ttlType": 0, "timestamp": "ignored"},
        ]
    }
    values, named = values_of_body(body)
    assert named is None and [v.index for v in values] == [100, 1, 2]
    grant = grant_of(values[0])
    assert (grant.admin, grant.index, int(grant.permissions)) == ("0.NA/88.100.1", 200, 0b011111110011)
    assert values[1].data == b"https://example.com" and values[1].permissions == DEFAULT_PERMISSIONS


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"format": "string", "value": "a"}, b"a"),
        ({"format": "BASE64", "value": "AAE="}, b"\x00\x01"),
        ({"format": "hex", "value": "0a0b"}, b"\x0a\x0b"),
        ("plain", b"plain"),
    ],
)
def test_data_formats_in(data: Any, expected: bytes) -> None:
    assert value_from_json({"index": 1, "type": "X", "data": data}).data == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [("*", "0xfff"), (True, "0xfff"), (False, "0x0"), (5, "0x5"), ("11", "0x3"), ([1, 0, 1], "0x5")],
)
def test_admin_permissions_in_every_form(given: Any, expected: str) -> None:
    value = value_from_json(
        {"index": 1, "type": "HS_ADMIN", "data": {"format": "admin", "value": {"handle": "88/A", "permissions": given}}}
    )
    assert hex(int(grant_of(value).permissions)) == expected


@pytest.mark.parametrize(
    ("given", "bits"),
    [
        ("1111", 0xF),
        ("1100", 0xC),
        ("*", 0xF),
        ("1", int(DEFAULT_PERMISSIONS)),  # HSJ: one character changes nothing
        ("01", int(DEFAULT_PERMISSIONS) | 0x1),  # only the last character applies
    ],
)
def test_value_permissions_follow_hsj(given: str, bits: int) -> None:
    assert int(value_from_json({"index": 1, "type": "X", "data": "y", "permissions": given}).permissions) == bits


def test_ttls_in() -> None:
    assert value_from_json({"index": 1, "type": "X", "data": "y"}).ttl == 86400
    assert value_from_json({"index": 1, "type": "X", "data": "y", "ttl": "60"}).ttl == 60
    absolute = value_from_json({"index": 1, "type": "X", "data": "y", "ttl": "2027-01-15T08:00:00Z"})
    assert (absolute.ttl, absolute.ttl_type) == (1_800_000_000, TtlType.ABSOLUTE)


@pytest.mark.parametrize(
    ("body", "rc"),
    [
        ({"values": [{"index": 0, "type": "X", "data": "y"}]}, RC.INVALID_VALUE),
        ({"values": [{"index": 2**31, "type": "X", "data": "y"}]}, RC.INVALID_VALUE),
        ({"values": [{"index": 1, "type": 5, "data": "y"}]}, RC.INVALID_VALUE),
        ({"values": [{"index": True, "type": "X", "data": "y"}]}, RC.INVALID_VALUE),
        ({"values": [{"index": 1, "type": "X", "data": {"format": "pdf", "value": "y"}}]}, RC.PROTOCOL_ERROR),
        ({"values": [{"index": 1, "type": "X", "data": {"format": "hex", "value": "zz"}}]}, RC.INVALID_VALUE),
        ({"values": [{"index": 1, "type": "X", "data": "y", "permissions": "12"}]}, RC.INVALID_VALUE),
        ({"values": [{"index": 1, "type": "X", "data": "y", "ttl": "soon"}]}, RC.INVALID_VALUE),
        ({"values": [{"index": 1, "type": "X", "data": "y", "references": [None]}]}, RC.INVALID_VALUE),
        (
            {"values": [{"index": 1, "type": "X", "data": "y"}, {"index": 1, "type": "Z", "data": "y"}]},
            RC.VALUE_ALREADY_EXISTS,
        ),
        ({"values": "nope"}, RC.PROTOCOL_ERROR),
        ({"values": [5]}, RC.PROTOCOL_ERROR),
        ({"handle": 5, "values": []}, RC.PROTOCOL_ERROR),
        ("text", RC.PROTOCOL_ERROR),
        ({"other": 1}, RC.PROTOCOL_ERROR),
    ],
)
def test_bad_bodies_name_their_problem(body: Any, rc: RC) -> None:
    with pytest.raises(HandleFailure) as caught:
        values_of_body(json.loads(json.dumps(body)))
    assert caught.value.rc is rc and (caught.value.message or rc is RC.HANDLE_NOT_FOUND)


def test_three_body_shapes() -> None:
    one = {"index": 1, "type": "URL", "data": "u"}
    assert values_of_body([one])[0] == values_of_body({"values": [one]})[0] == values_of_body(one)[0]
    assert values_of_body({"handle": "88.100.1/A", "values": [one]})[1] == "88.100.1/A"


def test_filters_are_the_union_of_indexes_and_types() -> None:
    values = [Value(1, "URL", b""), Value(2, "EMAIL", b""), Value(3, "HS_SITE.PREFIX", b""), Value(4, "HS_SITE", b"")]
    assert [v.index for v in select_values(values, [], [])] == [1, 2, 3, 4]
    assert [v.index for v in select_values(values, [2], ["url"])] == [1, 2]
    assert [v.index for v in select_values(values, [], ["hs_site."])] == [3, 4]
    assert select_values(values, [9], ["NOPE"]) == []


@pytest.mark.parametrize(
    ("error", "rc", "status"),
    [
        (errors.InvalidIdentifier("x"), RC.INVALID_HANDLE, 400),
        (errors.InvalidValue("x"), RC.INVALID_VALUE, 400),
        (errors.InvalidArgument("x"), RC.PROTOCOL_ERROR, 400),
        (errors.NotFound("x"), RC.HANDLE_NOT_FOUND, 404),
        (errors.ValueNotFound("x"), RC.VALUES_NOT_FOUND, 400),
        (errors.AlreadyExists("x"), RC.HANDLE_ALREADY_EXISTS, 409),
        (errors.ValueExists("x"), RC.VALUE_ALREADY_EXISTS, 409),
        (errors.NotAuthoritative("x"), RC.SERVER_NOT_RESP, 400),
        (errors.VersionConflict("x"), RC.PROTOCOL_ERROR, 400),
        (errors.Unauthenticated("x"), RC.AUTHENTICATION_NEEDED, 401),
        (errors.PermissionDenied("x"), RC.INSUFFICIENT_PERMISSIONS, 403),
        (errors.LimitExceeded("x"), RC.INVALID_VALUE, 400),
        (errors.Unavailable("x"), RC.SERVER_TOO_BUSY, 503),
        (errors.InternalError("x"), RC.ERROR, 500),
    ],
)
def test_domain_errors_map_to_handle_codes(error: errors.IdisError, rc: RC, status: int) -> None:
    failure = failure_of(error)
    assert (failure.rc, failure.status) == (rc, status)
    assert failure.message == ("" if rc is RC.HANDLE_NOT_FOUND else "x")


def test_statuses_of_success() -> None:
    assert http_status(RC.SUCCESS) == 200 and http_status(RC.SUCCESS, created=True) == 201
    assert http_status(RC.VALUES_NOT_FOUND, resolution=True) == 200 and http_status(RC.VALUES_NOT_FOUND) == 400


def test_secrets_are_sealed_salted_and_checked() -> None:
    sealed = seal(b"open sesame")
    assert is_sealed(sealed) and b"open sesame" not in sealed and sealed != seal(b"open sesame")
    assert matches(sealed, b"open sesame") and not matches(sealed, b"open sesame!") and not matches(sealed, b"")
    assert not matches(b"open sesame", b"open sesame")  # a clear secret is never compared as one
    assert not is_sealed(sealed.replace(b"$14$", b"$30$"))  # more work than a node will do
    [value] = seal_secret_values([Value(301, SECKEY_TYPE, b"pw", permissions=Permission(0xF))])
    assert is_sealed(value.data) and value.permissions == Permission.ADMIN_WRITE and not value.publicly_readable
    [kept] = seal_secret_values([Value(301, SECKEY_TYPE, sealed)])
    assert kept.data == sealed
    with pytest.raises(errors.InvalidValue):
        seal(b"")


async def test_the_verifier_remembers_only_what_matched() -> None:
    verifier = SecretVerifier(cache_ttl=60)
    sealed = seal(b"pw")
    assert await verifier.matches(sealed, b"pw") and not await verifier.matches(sealed, b"other")
    assert await verifier.matches(sealed, b"pw")
    assert not await verifier.matches(seal(b"changed"), b"pw")  # a new seal is checked afresh


async def test_the_verifier_charges_only_the_checks_that_run_scrypt() -> None:
    verifier = SecretVerifier(cache_ttl=60)
    sealed = seal(b"pw")
    charged: list[int] = []

    def admit() -> float:
        charged.append(1)
        return 0.0

    assert await verifier.matches(sealed, b"pw", admit) and await verifier.matches(sealed, b"pw", admit)
    assert len(charged) == 1  # the second was remembered
    with pytest.raises(RateLimited) as refused:
        await verifier.matches(sealed, b"wrong", lambda: 2.5)
    assert refused.value.retry_after == 2.5


def test_only_this_nodes_scrypt_parameters_count_as_sealed() -> None:
    sealed = seal(b"pw")
    for heavier in (b"$15$8$1$", b"$14$16$1$", b"$14$8$4$"):
        assert not is_sealed(sealed.replace(b"$14$8$1$", heavier))


async def test_secrets_per_call_are_capped_before_any_scrypt() -> None:
    sealer = SecretSealer()
    five = tuple(Value(300 + i, SECKEY_TYPE, b"pw%d" % i) for i in range(5))
    with pytest.raises(errors.LimitExceeded):
        await sealer.sealed([five[:3], five[3:]])  # counted over the whole call (a batch)
    [done] = await sealer.sealed([five[:2]])
    assert all(is_sealed(v.data) for v in done)
