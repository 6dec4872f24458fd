"""The Handle challenge-response scheme of the REST API (``/api/sessions``), against the local
hierarchy's enterprise node: a session from one request, a signature over its nonce and the
client's cnonce on the next, with the administrator's Ed25519 key."""

from __future__ import annotations

import base64
import os
from typing import Any

from nodes.http.sessions import session_message
from tests.integration.conftest import ADMIN, Local


def handle_authorization(local: Local, session: dict[str, Any], **override: str) -> str:
    """The header an HSJ-style client sends, signed with the administrator's key."""
    cnonce = os.urandom(16)
    nonce = base64.b64decode(session["nonce"])
    audience = local.base().removeprefix("https://")
    signature = local.signer().key.sign(session_message(nonce, cnonce, override.pop("signed_for", audience)))
    fields = {
        "version": "0",
        "sessionId": session["sessionId"],
        "id": "300%3A88.100.1%2FADMIN",
        "type": "HS_PUBKEY",
        "cnonce": base64.b64encode(cnonce).decode(),
        "alg": "Ed25519",
        "audience": audience,
        "signature": base64.b64encode(signature).decode(),
        **override,
    }
    return "Handle " + ", ".join(f'{name}="{value}"' for name, value in fields.items())


def new_session(local: Local) -> dict[str, Any]:
    response = local.request("POST", "/api/sessions")
    assert response.status_code == 201 and response.headers["Location"] == "/api/sessions/this"
    body: dict[str, Any] = response.json()
    assert len(base64.b64decode(body["nonce"])) == 16
    return body


def test_a_signed_session_answer_authenticates_and_writes(local: Local) -> None:
    session = new_session(local)
    header = handle_authorization(local, session)
    this = local.request("PUT", "/api/sessions/this", headers={"Authorization": header})
    assert this.status_code == 200 and this.json() == {"authenticated": True, "id": f"300:{ADMIN}"}
    body = '{"values":[{"index":1,"type":"URL","data":"https://example.com/s"}]}'
    headers = {"Authorization": header, "Content-Type": "application/json"}
    created = local.request("PUT", "/api/handles/88.100.1/SESSION-0001", data=body, headers=headers)
    assert created.status_code == 201, created.text
    # Sessions are stateless: another process of the node would accept it too; ending it is a no-op.
    assert local.request("DELETE", "/api/sessions/this").status_code == 204
    assert local.get("/api/sessions/this").json() == {"authenticated": False}


def test_wrong_or_forged_session_answers_are_refused(local: Local) -> None:
    session = new_session(local)
    other = new_session(local)
    forged_id = session["sessionId"][:-2] + ("AA" if not session["sessionId"].endswith("AA") else "BB")
    cases = {
        "signed for another session's nonce": handle_authorization(local, other, sessionId=session["sessionId"]),
        "forged session id": handle_authorization(local, session, sessionId=forged_id),
        "another key index": handle_authorization(local, session, id="301%3A88.100.1%2FADMIN"),
        "HMAC of a secret key": handle_authorization(local, session, type="HS_SECKEY"),
        "RSA algorithm": handle_authorization(local, session, alg="SHA256"),
        "signed for another node": handle_authorization(local, session, signed_for="127.0.0.1:1"),
        "naming another node": handle_authorization(local, session, audience="127.0.0.1:1"),
        "missing signature": handle_authorization(local, session).split(", signature=")[0],
        "not base64": handle_authorization(local, session, cnonce="***"),
        "garbage": 'Handle sessionId="x", ===',
    }
    for why, header in cases.items():
        response = local.request("PUT", "/api/sessions/this", headers={"Authorization": header})
        assert response.status_code == 401, (why, response.text)
        body = '{"values":[{"index":1,"type":"URL","data":"x"}]}'
        write = local.request(
            "PUT",
            "/api/handles/88.100.1/SESSION-BAD",
            data=body,
            headers={"Authorization": header, "Content-Type": "application/json"},
        )
        assert write.status_code == 401, why
    assert local.get("/api/handles/88.100.1/SESSION-BAD").status_code == 404


def test_a_401_carries_a_handle_challenge_that_can_be_answered(local: Local) -> None:
    refused = local.request("PUT", "/api/sessions/this", headers={"Authorization": 'Handle sessionId="stale"'})
    assert refused.status_code == 401
    challenges = refused.raw.headers.getlist("WWW-Authenticate")
    assert 'Basic realm="handle"' in challenges
    [handle] = [c for c in challenges if c.startswith("Handle ")]
    offered = dict(part.strip().split("=", 1) for part in handle.removeprefix("Handle ").split(","))
    session = {"sessionId": offered["sessionId"].strip('"'), "nonce": offered["nonce"].strip('"')}
    answered = local.request(
        "PUT", "/api/sessions/this", headers={"Authorization": handle_authorization(local, session)}
    )
    assert answered.json() == {"authenticated": True, "id": f"300:{ADMIN}"}
