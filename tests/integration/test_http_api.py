"""The HANDLE.NET REST API of real node processes, as ``idis-local`` starts them (HTTPS from the
local CA, signed gRPC writes, administrators with secret keys), used by pyhandle 1.5.0 unchanged
and by plain HTTP requests for everything pyhandle does not send."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import requests
from pyhandle.handleclient import PyHandleClient
from pyhandle.handleexceptions import HandleAlreadyExistsException, HandleAuthenticationError

from nodes.hierarchy import key_path
from resolver.channels import ChannelPool, ClientTLS
from resolver.cli import EXIT_NOT_FOUND
from resolver.errors import AlreadyExists
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.resolver import Resolver
from tests.integration.conftest import ADMIN, Local
from tests.integration.test_cli import run_idis


def pyhandle_client(local: Local, identity: str = ADMIN, secret: str | None = None) -> Any:
    return PyHandleClient("rest").instantiate_with_username_and_password(
        local.base(), f"301:{identity}", local.secret(identity) if secret is None else secret, HTTPS_verify=local.ca
    )


def test_pyhandle_unchanged_resolves_registers_modifies_and_deletes(local: Local) -> None:
    client = pyhandle_client(local)
    assert client.retrieve_handle_record("88.100.1/SN-0001")["PRODUCT_MODEL"] == "MOTOR-X200"
    handle = "88.100.1/PYH-0001"
    assert (
        client.register_handle(handle, "https://example.com/1", checksum="c1", overwrite=False, COLOR="red") == handle
    )
    record = client.retrieve_handle_record(handle)
    assert record["URL"] == "https://example.com/1" and record["CHECKSUM"] == "c1" and record["COLOR"] == "red"
    with pytest.raises(HandleAlreadyExistsException):
        client.register_handle(handle, "https://example.com/other", overwrite=False)
    client.modify_handle_value(handle, URL="https://example.com/changed", SIZE="XL")
    record = client.retrieve_handle_record(handle)
    assert record["URL"] == "https://example.com/changed" and record["SIZE"] == "XL"
    client.delete_handle_value(handle, "SIZE")
    assert "SIZE" not in client.retrieve_handle_record(handle)
    client.register_handle(handle, "https://example.com/replaced", overwrite=True)
    assert client.retrieve_handle_record(handle)["URL"] == "https://example.com/replaced"
    client.delete_handle(handle)
    assert client.retrieve_handle_record_json(handle) is None
    # What pyhandle wrote is what the gRPC side reads: one domain, two transports.
    assert asyncio.run(_grpc_resolve(local, "88.100.1/SN-0002")).value(2) is not None


async def _grpc_resolve(local: Local, identifier: str) -> Any:
    resolver = Resolver([local.grpc("top-level")], channels=ChannelPool(ClientTLS(Path(local.ca))))
    try:
        return await resolver.resolve(identifier)
    finally:
        await resolver.close()


def test_pyhandle_with_a_wrong_password_cannot_write(local: Local) -> None:
    client = pyhandle_client(local, secret="not-the-secret")
    with pytest.raises(HandleAuthenticationError):
        client.register_handle("88.100.1/PYH-BAD", "https://example.com/x", overwrite=False)
    assert local.get("/api/handles/88.100.1/PYH-BAD").status_code == 404


def test_resolution_answers_in_hsj_json_and_echoes_the_handle_as_asked(local: Local) -> None:
    response = local.get("/api/handles/88.100.1/SN-0001")
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body["responseCode"] == 1 and body["handle"] == "88.100.1/SN-0001"
    url = body["values"][0]
    assert url["index"] == 1 and url["type"] == "URL" and url["data"]["format"] == "string"
    assert url["ttl"] == 86400 and url["timestamp"].endswith("Z") and "permissions" not in url
    # Percent-encoded handles are decoded; the echo is the handle as requested (prefix case kept).
    assert local.get("/api/handles/88.100.1%2FSN-0001").json()["handle"] == "88.100.1/SN-0001"
    assert local.get("/api/handles/88.100.1/SN-0001?type=URL").json()["values"] == [url]
    assert [v["index"] for v in local.get("/api/handles/88.100.1/SN-0001?index=3&type=url").json()["values"]] == [1, 3]
    empty = local.get("/api/handles/88.100.1/SN-0001?type=NOPE")
    assert empty.status_code == 200 and empty.json() == {
        "responseCode": 200,
        "handle": "88.100.1/SN-0001",
        "values": [],
    }
    assert "\n" in local.get("/api/handles/88.100.1/SN-0001?pretty").text
    jsonp = local.get("/api/handles/88.100.1/SN-0001?callback=show")
    assert jsonp.headers["Content-Type"].startswith("application/javascript") and jsonp.text.startswith("show({")


def test_not_found_and_bad_handles_get_the_handle_codes(local: Local) -> None:
    missing = local.get("/api/handles/88.100.1/NOPE")
    assert missing.status_code == 404 and missing.json() == {"responseCode": 100, "handle": "88.100.1/NOPE"}
    assert local.get("/api/handles/").json()["responseCode"] == 102
    bad = local.get("/api/handles/88..1/X")
    assert bad.status_code == 400 and bad.json()["responseCode"] == 102
    assert local.get("/api/handles/88.100.1/%00").json()["responseCode"] == 102
    assert local.get("/api/handles/88.100.1/%FF").json()["responseCode"] == 102
    elsewhere = local.get("/api/handles/88.100.2/PART-0001")
    assert elsewhere.status_code == 400 and elsewhere.json()["responseCode"] == 301
    unknown = local.get("/api/nothing")
    assert unknown.status_code == 404 and unknown.json()["responseCode"] == 4
    assert local.request("PATCH", "/api/handles/88.100.1/SN-0001").status_code == 501
    options = local.request("OPTIONS", "/api/handles/88.100.1/SN-0001")
    assert options.status_code == 200 and "PUT" in options.headers["Allow"]


def _put(local: Local, handle: str, body: Any, query: str = "", **kwargs: Any) -> requests.Response:
    kwargs.setdefault("auth", local.auth())
    kwargs.setdefault("headers", {"Content-Type": "application/json"})
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return local.request("PUT", f"/api/handles/{handle}{query}", data=data, **kwargs)


URL_VALUE = {"index": 1, "type": "URL", "data": {"format": "string", "value": "https://example.com/a"}}


def test_put_semantics_follow_hsj(local: Local) -> None:
    handle = "88.100.1/PUT-0001"
    created = _put(local, handle, {"values": [URL_VALUE]}, "?overwrite=false")
    assert (created.status_code, created.json()) == (201, {"responseCode": 1, "handle": handle})
    again = _put(local, handle, {"values": [URL_VALUE]}, "?overwrite=false")
    assert again.status_code == 409 and again.json()["responseCode"] == 101
    replaced = _put(local, handle, [dict(URL_VALUE, data="https://example.com/b")])  # a bare list, bare data
    assert replaced.status_code == 200
    added = _put(local, handle, {"index": 2, "type": "EMAIL", "data": "a@example.com"}, "?index=2")
    assert added.status_code == 201
    overwritten = _put(local, handle, {"values": [{"index": 2, "type": "EMAIL", "data": "b@example.com"}]}, "?index=2")
    assert overwritten.status_code == 200
    conflict = _put(local, handle, {"values": [{"index": 2, "type": "X", "data": "y"}]}, "?index=2&overwrite=false")
    assert conflict.status_code == 409 and conflict.json()["responseCode"] == 201
    mismatch = _put(local, handle, {"values": [{"index": 3, "type": "X", "data": "y"}]}, "?index=4")
    assert mismatch.status_code == 400 and mismatch.json()["responseCode"] == 4
    values = local.get(f"/api/handles/{handle}").json()["values"]
    assert [(v["index"], v["data"]["value"]) for v in values] == [(1, "https://example.com/b"), (2, "b@example.com")]
    minted = _put(local, "88.100.1/LOT-", {"values": [URL_VALUE]}, "?mintNewSuffix=true")
    assert minted.status_code == 201 and minted.json()["handle"].startswith("88.100.1/LOT-")
    assert len(minted.json()["handle"]) == len("88.100.1/LOT-") + 36
    assert local.get("/api/handles/" + minted.json()["handle"]).status_code == 200


def test_bad_bodies_get_clear_codes_and_change_nothing(local: Local) -> None:
    handle = "88.100.1/BAD-0001"
    cases: list[tuple[Any, dict[str, Any], int, int]] = [
        ({"values": [URL_VALUE]}, {"headers": {"Content-Type": "text/plain"}}, 400, 4),
        ("{not json", {}, 400, 4),
        ({"something": 1}, {}, 400, 4),
        ({"values": [dict(URL_VALUE, index=0)]}, {}, 400, 202),
        ({"values": [URL_VALUE, URL_VALUE]}, {}, 409, 201),
        ({"values": [dict(URL_VALUE, data={"format": "base64", "value": "***"})]}, {}, 400, 202),
        ({"values": [dict(URL_VALUE, data={"format": "weird", "value": "x"})]}, {}, 400, 4),
        ({"values": [dict(URL_VALUE, type="")]}, {}, 400, 202),
        ({"handle": "88.100.1/OTHER", "values": [URL_VALUE]}, {}, 400, 4),
        (
            {"values": [{"index": 1, "type": "HS_ADMIN", "data": {"format": "admin", "value": {"index": 1}}}]},
            {},
            400,
            202,
        ),
        (b"x" * (2 << 20), {}, 400, 4),
    ]
    for body, headers, status, rc in cases:
        response = _put(local, handle, body, **headers)
        assert (response.status_code, response.json()["responseCode"]) == (status, rc), (body, response.text[:200])
    assert local.get(f"/api/handles/{handle}").status_code == 404


def test_writes_need_credentials_and_permissions(local: Local) -> None:
    handle = "88.100.1/AUTH-0001"
    anonymous = _put(local, handle, {"values": [URL_VALUE]}, auth=None)
    assert anonymous.status_code == 401 and anonymous.json()["responseCode"] == 402
    wrong = _put(local, handle, {"values": [URL_VALUE]}, auth=local.auth(secret="wrong"))
    assert wrong.status_code == 401 and 'Basic realm="handle"' in wrong.raw.headers.getlist("WWW-Authenticate")
    garbage = _put(
        local,
        handle,
        {"values": [URL_VALUE]},
        headers={"Authorization": "Basic %%%", "Content-Type": "application/json"},
        auth=None,
    )
    assert garbage.status_code == 401
    # A clerk with a secret key but no grant: authenticated, and refused by the same permissions as gRPC.
    asyncio.run(_register_clerk(local))
    clerk = _put(local, handle, {"values": [URL_VALUE]}, auth=("301%3A88.100.1/CLERK", "clerk-secret"))
    assert clerk.status_code == 403 and clerk.json()["responseCode"] == 401
    assert local.get(f"/api/handles/{handle}").status_code == 404


async def _register_clerk(local: Local) -> None:
    await _register(local, "88.100.1/CLERK", [Value(301, "HS_SECKEY", b"clerk-secret"), Value(1, "EMAIL", b"c@e")])


def test_secret_keys_are_stored_sealed_and_never_served(local: Local) -> None:
    asyncio.run(_register_clerk_once(local))
    for auth in (None, local.auth()):
        values = local.get("/api/handles/88.100.1/ADMIN", auth=auth).json()["values"]
        assert [v["type"] for v in values] == ["HS_PUBKEY"]
    answer = asyncio.run(_signed_resolve(local, ADMIN))
    assert [v.type for v in answer.values] == ["HS_PUBKEY"]
    database = (local.state / "enterprise-1.sqlite3").read_bytes()
    assert local.secret().encode() not in database


async def _register_clerk_once(local: Local) -> None:
    with contextlib.suppress(AlreadyExists):  # registered by another test of this module
        await _register_clerk(local)


async def _signed_resolve(local: Local, identifier: str) -> Any:
    # Straight to the enterprise node, which verifies its own administrator's signature.
    resolver = Resolver([local.grpc()], channels=ChannelPool(ClientTLS(Path(local.ca))), signer=local.signer())
    try:
        return await resolver.resolve(identifier)
    finally:
        await resolver.close()


def test_delete_of_values_is_all_or_nothing(local: Local) -> None:
    handle = "88.100.1/DEL-0001"
    body = {"values": [URL_VALUE, {"index": 2, "type": "EMAIL", "data": "a@example.com"}]}
    assert _put(local, handle, body).status_code == 201
    partial = local.request("DELETE", f"/api/handles/{handle}?index=2&index=9", auth=local.auth())
    assert partial.status_code == 400 and partial.json()["responseCode"] == 200
    assert len(local.get(f"/api/handles/{handle}").json()["values"]) == 2
    removed = local.request("DELETE", f"/api/handles/{handle}?index=2", auth=local.auth())
    assert removed.status_code == 200 and removed.json() == {"responseCode": 1, "handle": handle}
    deleted = local.request("DELETE", f"/api/handles/{handle}", auth=local.auth())
    assert deleted.status_code == 200
    gone = local.request("DELETE", f"/api/handles/{handle}", auth=local.auth())
    assert gone.status_code == 404 and gone.json() == {"responseCode": 100, "handle": handle}


def test_listing_needs_list_rights_and_pages_in_key_order(local: Local) -> None:
    anonymous = local.get("/api/handles?prefix=88.100.1")
    assert anonymous.status_code == 401 and anonymous.json()["responseCode"] == 402
    listed = local.get("/api/handles?prefix=0.NA/88.100.1", auth=local.auth()).json()
    assert listed["responseCode"] == 1 and listed["prefix"] == "0.NA/88.100.1"
    handles = listed["handles"]
    assert {"88.100.1/SN-0001", "88.100.1/ADMIN"} <= set(handles) and handles == sorted(handles, key=str.upper)
    assert listed["totalCount"] == str(len(handles))
    page = local.get("/api/handles?prefix=88.100.1&page=1&pageSize=2", auth=local.auth()).json()
    assert page["page"] == 1 and page["pageSize"] == 2 and page["handles"] == handles[2:4]
    elsewhere = local.get("/api/handles?prefix=88.100.2", auth=local.auth())
    assert elsewhere.status_code == 400 and elsewhere.json()["responseCode"] == 301


def test_site_and_prefixes(local: Local) -> None:
    site = local.get("/api/site").json()
    assert site["responseCode"] == 1 and site["site"]["servers"][0]["interfaces"][0]["protocol"] == "HTTP"
    assert local.get("/api/prefixes").json()["prefixes"] == ["88.100.1"]


def test_basic_auth_header_formats(local: Local) -> None:
    """The user part may be percent-encoded or not, with or without an index."""
    secret = local.secret()
    for user, status in [
        ("301%3A88.100.1/ADMIN", 200),
        ("88.100.1/ADMIN", 200),  # no index: any of its secret keys
        ("0%3A88.100.1%2FADMIN", 200),
        ("301:88.100.1/ADMIN", 401),  # an unencoded ':' ends the user (as in HSJ): user "301"
        ("302%3A88.100.1/ADMIN", 401),  # no secret key at that index
    ]:
        token = base64.b64encode(f"{user}:{secret}".encode()).decode()
        listed = local.get("/api/handles?prefix=88.100.1", headers={"Authorization": f"Basic {token}"})
        assert listed.status_code == status, user


def test_cli_sets_and_rotates_secret_keys(local: Local, tmp_path: Path) -> None:
    asyncio.run(_register(local, "88.100.1/OPS", [Value(1, "EMAIL", b"ops@example.com")]))
    signed = ["--node", local.grpc(), "--ca", local.ca, "--identity", ADMIN, "--key", str(key_path(local.state, ADMIN))]

    def status_with(secret: str) -> int:
        """401: the secret is wrong; 403: it is right (OPS holds no listing right)."""
        return local.get("/api/handles?prefix=88.100.1", auth=("301%3A88.100.1/OPS", secret)).status_code

    first = tmp_path / "first.secret"
    first.write_text("first-secret\n")
    result = run_idis("secret", "set", "88.100.1/OPS", "--secret-file", str(first), *signed)
    assert result.returncode == 0, result.stderr
    assert (status_with("first-secret"), status_with("other")) == (403, 401)
    rotated = tmp_path / "ops.secret"
    result = run_idis("secret", "rotate", "88.100.1/OPS", "--out", str(rotated), "--json", *signed)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["identity"] == "301:88.100.1/OPS"
    new = rotated.read_text().strip()
    assert rotated.stat().st_mode & 0o777 == 0o600 and len(new) >= 32
    assert (status_with(new), status_with("first-secret")) == (403, 401)
    # A rotation the node refuses (no such identity) leaves no file behind.
    result = run_idis("secret", "rotate", "88.100.1/NOBODY", "--out", str(tmp_path / "x.secret"), *signed)
    assert result.returncode == EXIT_NOT_FOUND and not (tmp_path / "x.secret").exists()
    assert not (tmp_path / "x.secret.new").exists()


async def _register(local: Local, identifier: str, values: list[Value]) -> None:
    registrar = Registrar(node=local.grpc(), signer=local.signer(), channels=ChannelPool(ClientTLS(Path(local.ca))))
    try:
        await registrar.create(identifier, values)
    finally:
        await registrar.close()


def test_the_rest_api_holds_registrations_to_their_template(local: Local) -> None:
    """A PUT naming a template is checked as a gRPC write is: refused with every fault named
    (and nothing stored), stored once it follows the template."""
    from bench.templates import FOOD_TRACE
    from resolver.identifier import parse_prefix
    from resolver.template import Template

    template = Template(
        parse_prefix("88.100.1"), FOOD_TRACE.name, FOOD_TRACE.version, FOOD_TRACE.industry, FOOD_TRACE.items
    )
    asyncio.run(_register(local, str(template.identifier), [template.value()]))

    def value(index: int, kind: str, text: str) -> dict[str, Any]:
        return {"index": index, "type": kind, "data": {"format": "string", "value": text}}

    named = value(90, "TEMPLATE", str(template.identifier))
    handle = "88.100.1/MILK-0001"
    bad = [value(1, "productName", "milk"), value(2, "lot", "L-" + "9" * 30), value(3, "shelfLifeDays", "0"), named]
    response = _put(local, handle, {"values": bad})
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    for fault in (
        "lot: 32 characters, at most 20",
        "shelfLifeDays: 0 is below the minimum 1",
        "origin: required, missing",
    ):
        assert fault in message, message
    assert local.get(f"/api/handles/{handle}").status_code == 404
    good = [
        value(1, "productName", "milk"),
        value(2, "lot", "L-2026-11-30"),
        value(3, "origin", "Hubei"),
        value(4, "producedAt", "2026-11-30 06:00:00"),
        value(5, "shelfLifeDays", "7"),
        named,
    ]
    assert _put(local, handle, {"values": good}).status_code in (200, 201)
    assert local.get(f"/api/handles/{handle}").status_code == 200
