"""The SNMS v3 API of real node processes as ``idis-local`` starts them (HTTPS from the local CA,
administrators with secret keys), called as an enterprise system written for the national API
calls it: token login, then Bearer; templates; identifiers one by one and in batches of 2000."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from bench.templates import AUTOMOTIVE_PART
from nodes.hierarchy import key_path
from nodes.http.handle_json import value_to_json
from nodes.http.snms_json import snms_of_template
from resolver.channels import ChannelPool, ClientTLS
from resolver.errors import TemplateViolation, Unauthenticated
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.resolver import Resolver
from resolver.signing import Signer
from resolver.template import REFERENCE_TYPE
from tests.integration.conftest import ADMIN, Local
from tests.integration.test_templates import FAULTS
from tests.integration.test_templates import part as part_values
from tests.integration.test_verifiable import chains_adopted

SECONDARY_ADMIN = "88.100/ADMIN"
PART_VERSION = f"{AUTOMOTIVE_PART.name}.v{AUTOMOTIVE_PART.version}"


def login(local: Local, node: str, identity: str) -> str:
    answer = local.request(
        "POST", "/identity/token", node, json={"username": f"301:{identity}", "password": local.secret(identity)}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == 1 and body["data"]["identity"] == f"301:{identity}"
    token: str = body["data"]["token"]
    return token


def call(local: Local, method: str, path: str, token: str | None, node: str = "enterprise-1", **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return local.request(method, path, node, headers=headers, **kw)


def part(serial: int, **changes: str | None) -> dict[str, Any]:
    """An SNMS registration of an automotive part (the gRPC tests' values, in HSJ's JSON), following
    ``auto-part.v2`` unless changed."""
    values = [value_to_json(v) for v in part_values(serial, **changes) if v.type != REFERENCE_TYPE]
    return {"handle": f"88.100.1/SNMS-{serial:04d}", "templateVersion": PART_VERSION, "value": values}


@pytest.fixture(scope="module")
def published(local: Local) -> Local:
    """The automotive template, published on the secondary node (88.100) through its SNMS API,
    once the nodes' answers verify (the enterprise node reads it through the hierarchy)."""
    asyncio.run(chains_adopted(local))
    token = login(local, "secondary-100", SECONDARY_ADMIN)
    answer = call(
        local, "POST", "/snms/api/v3/template", token, "secondary-100", json=snms_of_template(AUTOMOTIVE_PART)
    )
    assert answer.status_code == 201, answer.text
    return local


def test_a_token_is_needed_to_write_and_only_the_right_secret_gets_one(local: Local) -> None:
    wrong = local.request("POST", "/identity/token", json={"username": f"301:{ADMIN}", "password": "not-the-secret"})
    assert wrong.status_code == 401 and wrong.json()["status"] == 403  # AUTHENTICATION_FAILED
    assert "does not match" in wrong.json()["message"]
    anonymous = call(local, "POST", "/identityv2/data", None, json=part(1))
    assert anonymous.status_code == 401 and anonymous.json()["status"] == 402  # AUTHENTICATION_NEEDED
    forged = call(local, "POST", "/identityv2/data", "bm90LWEtdG9rZW4", json=part(1))
    assert forged.status_code == 401 and "POST /identity/token" in forged.json()["message"]
    basic = local.request("POST", "/identityv2/data", json=part(1), auth=local.auth())
    assert basic.status_code == 401 and "Bearer" in basic.json()["message"]
    # A token is the node's own: the secondary node (another database) does not take the enterprise's.
    token = login(local, "enterprise-1", ADMIN)
    elsewhere = call(local, "GET", "/snms/api/v3/template?prefix=88.100", token, "secondary-100")
    assert elsewhere.status_code == 401
    assert call(local, "GET", "/identityv2/data?handle=88.100.1/SNMS-0001", None).json()["status"] == 100


def test_templates_publish_read_list_and_never_change(published: Local) -> None:
    local = published
    token = login(local, "secondary-100", SECONDARY_ADMIN)
    path = f"/snms/api/v3/template?prefix=88.100&version={PART_VERSION}"
    got = call(local, "GET", path, None, "secondary-100").json()
    assert got["status"] == 1 and got["data"] == snms_of_template(AUTOMOTIVE_PART)
    listed = call(local, "GET", "/snms/api/v3/template?prefix=88.100", None, "secondary-100").json()["data"]
    assert [t["version"] for t in listed["templates"]] == [PART_VERSION] and listed["total"] == 1
    body = snms_of_template(AUTOMOTIVE_PART)
    again = call(local, "PUT", "/snms/api/v3/template", token, "secondary-100", json=body)
    assert again.status_code == 200 and again.json()["message"] == "unchanged"
    changed = copy.deepcopy(body)
    changed["items"][0]["metadata"]["maxLength"] = 64
    refused = call(local, "PUT", "/snms/api/v3/template", token, "secondary-100", json=changed)
    assert refused.status_code == 400 and "publish auto-part.v3 instead" in refused.json()["message"]
    deleted = call(local, "DELETE", path, token, "secondary-100")
    assert deleted.status_code == 400 and "published template version" in deleted.json()["message"]
    assert call(local, "GET", path, None, "secondary-100").json()["data"] == body  # still there, unchanged
    # A malformed template names the part at fault and publishes nothing.
    broken = copy.deepcopy(body)
    broken["version"], broken["industryTrade"] = "auto-part.v9", "351"
    answer = call(local, "POST", "/snms/api/v3/template", token, "secondary-100", json=broken)
    assert answer.status_code == 400 and "industry.group" in answer.json()["message"]
    free_text = dict(body, version="1.0.0")
    assert (
        "<name>.v<integer>"
        in call(local, "POST", "/snms/api/v3/template", token, "secondary-100", json=free_text).json()["message"]
    )
    missing = call(local, "GET", "/snms/api/v3/template?prefix=88.100&version=auto-part.v9", None, "secondary-100")
    assert missing.status_code == 404


def test_a_registration_follows_its_industrys_template_with_every_fault_listed(published: Local) -> None:
    """The enterprise node (88.100.1) finds ``auto-part.v2`` at its industry's prefix (88.100, on
    the secondary node) and holds registrations to it."""
    local = published
    token = login(local, "enterprise-1", ADMIN)
    bad = part(2, material="wood", manufacturer=None, weightKg="heavy")
    refused = call(local, "POST", "/identityv2/data", token, json=bad)
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["status"] == 202 and {f["item"]: f["reason"] for f in body["data"]["faults"]} == {
        "material": "'wood' is not one of steel, aluminium, plastic, rubber, composite",
        "manufacturer": "required, missing",
        "weightKg": "'heavy' is not a number",
    }
    assert call(local, "GET", "/identityv2/data?handle=88.100.1/SNMS-0002", token).status_code == 404
    created = call(local, "POST", "/identityv2/data", token, json=part(3))
    assert created.status_code == 201 and created.json()["data"] == {"handle": "88.100.1/SNMS-0003", "version": 1}
    retried = call(local, "POST", "/identityv2/data", token, json=part(3))  # the timeout-and-retry case
    assert retried.status_code == 200 and retried.json()["message"] == "unchanged"
    read = call(local, "GET", "/identityv2/data?handle=88.100.1/SNMS-0003", None).json()["data"]
    assert read["templateVersion"] == PART_VERSION and read["template"] == str(AUTOMOTIVE_PART.identifier)
    assert {v["type"]: v["data"]["value"] for v in read["value"]}["partNumber"] == "BRK-00003"
    detail = call(local, "GET", "/identityv2/data/detail?handle=88.100.1/SNMS-0003", token).json()["data"]
    assert detail["version"] == 1 and all("ttl" in v and "timestamp" in v for v in detail["value"])
    updated = call(local, "PUT", "/identityv2/data", token, json=part(3, partName="Brake disc, rear"))
    assert updated.json()["data"]["version"] == 2
    wrong_update = call(local, "PUT", "/identityv2/data", token, json=part(3, productionDate="2026-13-01"))
    assert wrong_update.status_code == 400 and wrong_update.json()["data"]["faults"][0]["item"] == "productionDate"
    unknown = call(local, "POST", "/identityv2/data", token, json=dict(part(4), templateVersion="auto-part.v7"))
    assert unknown.status_code == 400 and "no template auto-part.v7 of 88.100.1" in unknown.json()["message"]
    gone = call(local, "DELETE", "/identityv2/data?handle=88.100.1/SNMS-0003", token)
    assert gone.json() == {"status": 1, "message": "deleted", "data": {"handle": "88.100.1/SNMS-0003", "version": 2}}
    assert call(local, "GET", "/identityv2/data?handle=88.100.1/SNMS-0003", None).status_code == 404


def test_a_batch_of_2000_with_40_bad_stores_the_rest_and_a_retry_changes_nothing(published: Local) -> None:
    local = published
    token = login(local, "enterprise-1", ADMIN)
    bad = dict(zip(range(7, 2000, 50), FAULTS * 10, strict=True))
    items = [part(1000 + n, **bad.get(n, {})) for n in range(2000)]
    for n in range(2000):
        items[n]["handle"] = f"88.100.1/LOT-{n:04d}"
    first = _batch(local, "batchCreate", token, items)
    assert first["total"] == 2000 and first["success"] == 1960 and first["failed"] == 40
    refused = {n for n, r in enumerate(first["results"]) if r["status"] != 1}
    assert refused == set(bad)
    for n in refused:
        assert [f["item"] for f in first["results"][n]["faults"]] == list(bad[n]), first["results"][n]
    assert {r["message"] for n, r in enumerate(first["results"]) if n not in bad} == {"created"}
    again = _batch(local, "batchCreate", token, items)  # the whole batch, retried after a timeout
    assert again["success"] == 1960 and {n for n, r in enumerate(again["results"]) if r["status"] != 1} == refused
    assert {(r["message"], r["version"]) for n, r in enumerate(again["results"]) if n not in bad} == {("unchanged", 1)}
    assert call(local, "GET", "/identityv2/data?handle=88.100.1/LOT-0007", None).status_code == 404
    # Updates and deletions in batches, a result per item.
    updates = [part(5000 + n) for n in range(3)]
    for n, item in enumerate(updates):
        item["handle"] = f"88.100.1/LOT-{n:04d}"
    updates.append(dict(part(1), handle="88.100.1/LOT-9999"))  # not there
    updates.append(dict(part(2, material="paper"), handle="88.100.1/LOT-0003"))
    changed = _batch(local, "batchUpdate", token, updates)
    assert [r["status"] for r in changed["results"]] == [1, 1, 1, 100, 202]
    assert [r.get("version") for r in changed["results"][:3]] == [2, 2, 2]
    assert "material" in changed["results"][4]["message"]
    lot3 = call(local, "GET", "/identityv2/data/detail?handle=88.100.1/LOT-0003", None).json()["data"]
    assert lot3["version"] == 1  # the refused update changed nothing
    deleted = _batch(
        local, "batchDelete", token, ["88.100.1/LOT-0010", {"handle": "88.100.1/LOT-0011"}, "88.100.1/LOT-0007", 5]
    )
    assert [r["status"] for r in deleted["results"]] == [1, 1, 100, 102]
    assert call(local, "GET", "/identityv2/data?handle=88.100.1/LOT-0010", None).status_code == 404
    too_many = call(local, "POST", "/identityv2/data/batchCreate", token, json=[part(1)] * 2001)
    assert too_many.status_code == 400 and "2000" in too_many.json()["message"]


def _batch(local: Local, what: str, token: str, items: list[Any]) -> Any:
    answer = call(local, "POST", f"/identityv2/data/{what}", token, json={"data": items}, timeout=120)
    assert answer.status_code == 200, answer.text[:2000]
    body = answer.json()
    assert body["status"] == 1
    return body["data"]


def test_bad_bodies_get_clear_answers_and_change_nothing(published: Local) -> None:
    local = published
    token = login(local, "enterprise-1", ADMIN)
    for body, status, words in (
        ("not json", 4, "not JSON"),
        ({"value": []}, 102, '"handle"'),
        ({"handle": "88.100.1/X", "value": "text"}, 4, '"value" must be a list'),
        ({"handle": "88.100.1/X", "value": [{"index": -1, "type": "A", "data": "x"}]}, 202, "positive"),
        ({"handle": "88..1/X", "value": [{"index": 1, "type": "A", "data": "x"}]}, 102, "88..1"),
    ):
        data = body if isinstance(body, str) else None
        answer = call(local, "POST", "/identityv2/data", token, data=data, json=None if data else body)
        assert answer.json()["status"] == status and words in answer.json()["message"], answer.text
    assert call(local, "GET", "/identityv2/data", None).json()["message"] == "the query parameter 'handle' is needed"
    # Bodies past the bound, or nested past the parser's depth, are refused before anything is read of them.
    huge = call(local, "POST", "/identityv2/data/batchCreate", token, data=b"[" + b"1," * (9 << 20) + b"1]")
    assert huge.status_code in (400, 413)
    if huge.status_code == 400:
        assert "over 16777216 bytes" in huge.json()["message"]
    deep = call(local, "POST", "/identityv2/data/batchCreate", token, data=b"[" * 100_000 + b"]" * 100_000)
    assert deep.json()["status"] == 4 and "not JSON" in deep.json()["message"]

    def chunks(size: int):  # type: ignore[no-untyped-def]
        yield b'{"handle": "88.100.1/X", "value": ["'
        for _ in range(size // 65536):
            yield b"x" * 65536
        yield b'"]}'

    chunked = call(local, "POST", "/identityv2/data", token, data=chunks(2 << 20))  # no Content-Length
    assert chunked.json()["status"] == 4 and "over 1048576 bytes" in chunked.json()["message"]
    long_login = local.request("POST", "/identity/token", json={"username": "x" * 5000, "password": "y"})
    assert long_login.json()["status"] == 4 and "over 4096 bytes" in long_login.json()["message"]
    foreign = dict(part(9), templateVersion="88.200/TEMPLATE.auto-part.v2")
    refused = call(local, "POST", "/identityv2/data", token, json=foreign)
    assert refused.status_code == 400 and "not a template of 88.100.1 or of a prefix above it" in refused.text
    wrong_shape = call(local, "POST", "/identityv2/data/batchDelete", token, json={"handles": "88.100.1/X"})
    assert wrong_shape.json()["status"] == 4 and "a batch is a JSON list" in wrong_shape.json()["message"]


def test_a_token_is_worth_nothing_once_its_key_changes(local: Local) -> None:
    """The administrator's secret key (here a trust anchor's configured secret file) changes:
    the tokens issued for the old one are refused; the new one logs in."""
    token = login(local, "enterprise-1", ADMIN)
    path = "/identityv2/data?handle=88.100.1/SN-0001"
    assert call(local, "GET", path, token).json()["status"] == 1
    secret_file = local.state / "keys" / (ADMIN.replace("/", "_") + ".secret")
    old = secret_file.read_text()
    try:
        secret_file.write_text("a-new-secret-key-for-the-administrator\n")
        refused = call(local, "GET", path, token)
        assert refused.status_code == 401 and "has changed: log in again" in refused.json()["message"]
        assert call(local, "GET", path, login(local, "enterprise-1", ADMIN)).json()["status"] == 1
    finally:
        secret_file.write_text(old)
    assert call(local, "GET", path, token).json()["status"] == 1


QC_TEMPLATE = {
    "prefix": "88.100.1",
    "version": "qc.v1",
    "industryCategory": "C",
    "industrySpecific": "36",
    "items": [
        {"name": "批次", "idType": "lot", "required": True, "metadata": {"type": "string", "maxLength": 20}},
        {"name": "质检报告", "idType": "inspectionReport", "readers": [SECONDARY_ADMIN], "metadata": {"type": "url"}},
    ],
}


async def _signed_read(local: Local, identity: str, handle: str) -> dict[str, str]:
    """``handle``'s values as ``identity`` reads them over gRPC, its call signed with its key."""
    signer = Signer.from_file(identity, key_path(local.state, identity))
    channels = ChannelPool(ClientTLS(local.ca_path))
    async with Resolver([local.grpc()], channels=channels, signer=signer) as resolver:
        record = await resolver.resolve(handle)
    return {v.type: v.data.decode() for v in record.values}


def test_an_item_restricted_to_its_readers_is_shown_to_them_and_to_no_one_else(local: Local) -> None:
    """Tiered read grants: the template lets 88.100/ADMIN (the industry) read the inspection
    report of the enterprise's parts; the enterprise's administrator reads everything; another
    identity (88/ADMIN) and anonymous readers see the public items only, on every interface."""
    asyncio.run(chains_adopted(local))  # other nodes' signed calls verify through the hierarchy
    token = login(local, "enterprise-1", ADMIN)
    assert call(local, "POST", "/snms/api/v3/template", token, json=QC_TEMPLATE).status_code in (200, 201)
    report = "https://qc.example.com/reports/L-1"
    body = {
        "handle": "88.100.1/QC-1",
        "templateVersion": "qc.v1",
        "value": [
            {"index": 1, "type": "lot", "data": "L-1"},
            {"index": 2, "type": "inspectionReport", "data": report},  # public by default: the API restricts it
        ],
    }
    assert call(local, "POST", "/identityv2/data", token, json=body).status_code in (200, 201)
    anonymous = call(local, "GET", "/identityv2/data?handle=88.100.1/QC-1", None).json()["data"]
    assert [v["type"] for v in anonymous["value"]] == ["lot", "TEMPLATE"]
    assert [v["type"] for v in local.get("/api/handles/88.100.1/QC-1").json()["values"]] == ["lot", "TEMPLATE"]
    assert "inspectionReport" not in asyncio.run(_signed_read(local, "88/ADMIN", "88.100.1/QC-1"))
    assert asyncio.run(_signed_read(local, SECONDARY_ADMIN, "88.100.1/QC-1"))["inspectionReport"] == report
    assert asyncio.run(_signed_read(local, ADMIN, "88.100.1/QC-1"))["inspectionReport"] == report
    detail = call(local, "GET", "/identityv2/data/detail?handle=88.100.1/QC-1", token).json()["data"]
    assert {v["type"]: v.get("permissions") for v in detail["value"]}["inspectionReport"] == "1100"
    # A write that would make the restricted item public is refused, naming it; nothing changes.
    public = [
        Value(1, "lot", b"L-2"),
        Value(2, "inspectionReport", report.encode()),
        Value(90, REFERENCE_TYPE, b"88.100.1/TEMPLATE.qc.v1"),
    ]
    with pytest.raises(TemplateViolation) as refused:
        asyncio.run(_create(local, "88.100.1/QC-2", public))
    assert dict(refused.value.violations) == {
        "inspectionReport": "readable by its readers only (88.100/ADMIN): store it without PUBLIC_READ"
    }
    assert call(local, "GET", "/identityv2/data?handle=88.100.1/QC-2", None).status_code == 404


async def _create(local: Local, handle: str, values: list[Value]) -> None:
    registrar = Registrar(node=local.grpc(), signer=local.signer(), channels=ChannelPool(ClientTLS(local.ca_path)))
    try:
        await registrar.create(handle, values)
    finally:
        await registrar.close()


async def _batches(local: Local, signed: bool) -> list[Any]:
    signer = local.signer() if signed else None
    registrar = Registrar(node=local.grpc(), signer=signer, channels=ChannelPool(ClientTLS(local.ca_path)))
    try:
        replaced = await registrar.batch_replace([("88.100.1/GB-1", [Value(1, "URL", b"https://example.com/2")])])
        deleted = await registrar.batch_delete(["88.100.1/GB-1"])
        return [*replaced, *deleted]
    finally:
        await registrar.close()


def test_grpc_batch_replace_and_delete_are_signed_writes_like_the_others(local: Local) -> None:
    """BatchReplace and BatchDelete, the gRPC twins of batchUpdate and batchDelete: refused
    unsigned on a node that requires signatures, done when signed by the administrator."""
    asyncio.run(_create(local, "88.100.1/GB-1", [Value(1, "URL", b"https://example.com/1")]))
    with pytest.raises(Unauthenticated):
        asyncio.run(_batches(local, signed=False))
    replaced, deleted = asyncio.run(_batches(local, signed=True))
    assert (replaced.version, replaced.error, deleted.version, deleted.error) == (2, None, 2, None)
    assert call(local, "GET", "/identityv2/data?handle=88.100.1/GB-1", None).status_code == 404
