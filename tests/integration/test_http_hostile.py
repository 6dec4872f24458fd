"""The REST API against a hostile client or a hostile administrator: each test is a finding of
the review of the HTTP transport, kept as a regression test."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from typing import Any

from resolver.channels import ChannelPool, ClientTLS
from resolver.record import Value
from resolver.registrar import Registrar
from tests.integration.conftest import ADMIN, Local

JSON = {"Content-Type": "application/json"}


async def _registrar_call(local: Local, call: Any) -> Any:
    registrar = Registrar(node=local.grpc(), signer=local.signer(), channels=ChannelPool(ClientTLS(local.ca_path)))
    try:
        return await call(registrar)
    finally:
        await registrar.close()


def grpc(local: Local, call: Any) -> Any:
    return asyncio.run(_registrar_call(local, call))


def test_a_secret_stored_on_the_anchors_record_does_not_make_anyone_the_anchor(local: Local) -> None:
    """A trust anchor is recognised by its configured key or secret only: whoever may add values
    to its record (here the anchor itself stands in for a rogue prefix administrator) cannot log
    in as the anchor with a secret of their own."""
    grpc(local, lambda r: r.put_value(ADMIN, Value(302, "HS_SECKEY", b"rogue-secret")))
    for user in ("302%3A88.100.1/ADMIN", "0%3A88.100.1/ADMIN", "301%3A88.100.1/ADMIN"):
        token = base64.b64encode(f"{user}:rogue-secret".encode()).decode()
        response = local.get("/api/handles?prefix=88.100.1", headers={"Authorization": f"Basic {token}"})
        assert response.status_code == 401, user
    assert local.get("/api/handles?prefix=88.100.1", auth=local.auth()).status_code == 200  # the configured one


def test_batch_created_secrets_are_sealed_and_never_served(local: Local) -> None:
    items = [("88.100.1/BATCH-SECRET", [Value(1, "EMAIL", b"b@example.com"), Value(301, "HS_SECKEY", b"batch-pw")])]
    [outcome] = grpc(local, lambda r: r.batch_create(items))
    assert outcome.error is None
    values = local.get("/api/handles/88.100.1/BATCH-SECRET").json()["values"]
    assert [v["type"] for v in values] == ["EMAIL"]
    assert b"batch-pw" not in (local.state / "enterprise-1.sqlite3").read_bytes()
    token = base64.b64encode(b"301%3A88.100.1/BATCH-SECRET:batch-pw").decode()
    listed = local.get("/api/handles?prefix=88.100.1", headers={"Authorization": f"Basic {token}"})
    assert listed.status_code == 403  # authenticated by the sealed secret; it holds no listing right


def test_secrets_per_call_are_bounded(local: Local) -> None:
    values = [{"index": 300 + i, "type": "HS_SECKEY", "data": f"pw-{i}"} for i in range(5)]
    body = json.dumps({"values": [{"index": 1, "type": "URL", "data": "x"}, *values]})
    response = local.request("PUT", "/api/handles/88.100.1/MANY-SECRETS", data=body, headers=JSON, auth=local.auth())
    assert response.status_code == 400 and "HS_SECKEY" in response.json()["message"]
    assert local.get("/api/handles/88.100.1/MANY-SECRETS").status_code == 404


def test_a_trailing_question_mark_cannot_poison_the_cache(local: Local) -> None:
    body = json.dumps({"values": [{"index": 1, "type": "URL", "data": "https://attacker.example"}]})
    assert local.request("PUT", "/api/handles/88.100.1/SN-0001%3F", data=body, headers=JSON, auth=local.auth()).ok
    assert local.get("/api/handles/88.100.1/SN-0001%3F").json()["handle"] == "88.100.1/SN-0001?"  # cached now
    for _ in range(2):  # sent as is (HTTP libraries drop an empty query)
        answer = raw_get(local, "/api/handles/88.100.1/SN-0001?")
        assert answer["handle"] == "88.100.1/SN-0001" and "attacker" not in json.dumps(answer)


def raw_get(local: Local, path: str) -> Any:
    """GET of exactly ``path`` on the enterprise node (no client-side normalisation)."""
    host, _, port = local.base().removeprefix("https://").rpartition(":")
    connection = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=local.ca))
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def test_a_body_sent_in_pieces_is_read_whole(local: Local) -> None:
    data = "x" * 60_000
    text = json.dumps({"values": [{"index": 1, "type": "NOTE", "data": data}]}).encode()

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(text), 4096):
            yield text[start : start + 4096]

    response = local.request("PUT", "/api/handles/88.100.1/PIECES", data=pieces(), headers=JSON, auth=local.auth())
    assert response.status_code == 201, response.text
    assert local.get("/api/handles/88.100.1/PIECES").json()["values"][0]["data"]["value"] == data


def test_odd_credentials_and_text_get_clear_errors_not_500(local: Local) -> None:
    superscript = base64.b64encode("²:88.100.1/ADMIN:x".encode()).decode()
    assert (
        local.get("/api/handles?prefix=88.100.1", headers={"Authorization": f"Basic {superscript}"}).status_code == 401
    )
    for body in (
        '{"values":[{"index":1,"type":"\\ud800","data":"x"}]}',
        '{"values":[{"index":1,"type":"URL","data":"\\udfff"}]}',
        '{"values":[{"index":1,"type":"URL","data":"x","references":[{"handle":"88.100.1/A","index":-1}]}]}',
        '{"values":[{"index":1,"type":"URL","data":"x","references":[{"handle":"' + "a" * 3000 + '","index":1}]}]}',
    ):
        response = local.request("PUT", "/api/handles/88.100.1/ODD", data=body, headers=JSON, auth=local.auth())
        assert response.status_code == 400 and response.json()["responseCode"] == 202, (body[:80], response.text)
    assert local.get("/api/handles/88.100.1/ODD").status_code == 404


def test_no_jsonp_for_authenticated_readers(local: Local) -> None:
    anonymous = local.get("/api/handles/88.100.1/SN-0002?callback=steal")
    assert anonymous.text.startswith("steal(")
    authenticated = local.get("/api/handles/88.100.1/SN-0002?callback=steal&publicOnly=false", auth=local.auth())
    assert authenticated.headers["Content-Type"].startswith("application/json") and authenticated.json()["values"]


def test_a_client_that_leaves_mid_request_changes_nothing_and_the_node_goes_on(local: Local) -> None:
    host, _, port = local.base().removeprefix("https://").rpartition(":")
    context = ssl.create_default_context(cafile=local.ca)
    body = json.dumps({"values": [{"index": 1, "type": "URL", "data": "x"}]}).encode()
    token = base64.b64encode(f"301%3A{ADMIN}:{local.secret()}".encode()).decode()
    for sent in (body[:10], body):  # half a body, then a whole one whose answer is never read
        with socket.create_connection((host, int(port))) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
            head = (
                f"PUT /api/handles/88.100.1/LEFT-{len(sent)} HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Basic {token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            tls.sendall(head.encode() + sent)
    assert local.get(f"/api/handles/88.100.1/LEFT-{len(body[:10])}").status_code == 404  # the half never landed
    # The whole one was stored or not, never half; either way the node answers and writes on.
    whole = local.get(f"/api/handles/88.100.1/LEFT-{len(body)}")
    assert whole.status_code in (200, 404)
    if whole.status_code == 200:
        assert whole.json()["values"][0]["data"]["value"] == "x"
    assert local.request("PUT", "/api/handles/88.100.1/AFTER-LEFT", data=body, headers=JSON, auth=local.auth()).ok
    # Leaving is not a failure of the node's: no internal error logged for it.
    assert "LEFT-10 failed" not in (local.state / "enterprise-1.log").read_text()
