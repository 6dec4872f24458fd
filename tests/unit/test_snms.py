"""The SNMS API's pieces that need no server: its bearer tokens and its JSON (templates,
registrations, which template a ``templateVersion`` means)."""

from __future__ import annotations

import base64
import copy
import hashlib
from typing import Any

import pytest

from bench.templates import AUTOMOTIVE_PART, FOOD_TRACE
from nodes.http.codes import HandleFailure
from nodes.http.sessions import BearerTokens
from nodes.http.snms_json import (
    naming,
    record_json,
    registration_of,
    snms_of_template,
    template_candidates,
    template_of_snms,
    version_parts,
)
from resolver.errors import BadTemplate
from resolver.identifier import parse_identifier
from resolver.record import Record, Value
from resolver.template import Template


def test_a_token_says_who_until_when_and_nothing_else_passes() -> None:
    now = [1_800_000_000.0]
    tokens = BearerTokens(b"k" * 32, clock=lambda: now[0], seconds=3600)
    bearer = tokens.issue("88.100.1/ADMIN", 301, b"sealed-secret")
    token = tokens.token(bearer)
    checked = tokens.check(token)
    assert checked == bearer and checked.identity == "88.100.1/ADMIN" and checked.key_index == 301
    assert checked.stamp == tokens.stamp_of(b"sealed-secret") != tokens.stamp_of(b"another-secret")
    # The stamp is keyed: a token shown to someone is no fast hash of the secret to guess at.
    assert checked.stamp != hashlib.sha256(b"sealed-secret").digest()[:8]
    assert checked.stamp != BearerTokens(b"x" * 32).stamp_of(b"sealed-secret")
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[12 + 8] ^= 0x01  # another identity, same MAC
    assert tokens.check(base64.urlsafe_b64encode(bytes(raw)).decode()) is None
    assert BearerTokens(b"x" * 32, clock=lambda: now[0]).check(token) is None  # another database's key
    for junk in ("", "!!!", "A" * 2000, token[:20]):
        assert tokens.check(junk) is None
    now[0] += 3601
    assert tokens.check(token) is None


@pytest.mark.parametrize("template", [AUTOMOTIVE_PART, FOOD_TRACE])
def test_an_snms_template_reads_back_to_the_same_template(template: Template) -> None:
    body = snms_of_template(template)
    assert template_of_snms(body) == template
    assert body["version"] == f"{template.name}.v{template.version}"


def test_an_snms_template_as_an_enterprise_system_writes_it() -> None:
    body: dict[str, Any] = {
        "prefix": "88.100.1",
        "version": "motor.v1",
        "industryCategory": "C",
        "industrySpecific": "38",
        "industryTrade": "381",
        "industrySubclass": "3811",
        "items": [
            {"name": "型号", "idType": "model", "required": True, "metadata": {"type": "string", "maxLength": 20}},
            {"name": "功率", "idType": "powerKw", "metadata": {"type": "number", "min": 0, "max": 500}},
            {"name": "等级", "idType": "grade", "metadata": {"type": "enum", "options": ["A", "B"]}},
        ],
    }
    template = template_of_snms(body)
    assert str(template.identifier) == "88.100.1/TEMPLATE.motor.v1"
    model, power, grade = template.items
    assert (model.name, model.description, model.required, model.max_length) == ("model", "型号", True, 20)
    assert (power.minimum, power.maximum, grade.values) == (0, 500, ("A", "B"))
    changes: list[tuple[dict[str, Any], str]] = [
        ({"version": "1.0.0"}, "<name>.v<integer>"),
        ({"industryTrade": "391"}, "industry.group"),
        ({"items": [{"name": "x"}]}, '"idType"'),
        ({"items": [{"idType": "x", "metadata": {"type": "blob"}}]}, r"items[0].type"),
        ({"items": [{"idType": "x", "metadata": {"pattern": ".*"}}]}, "unknown keys ['pattern']"),
        ({"prefix": 88}, '"prefix"'),
    ]
    for change, words in changes:
        broken = copy.deepcopy(body)
        broken.update(change)
        with pytest.raises(BadTemplate) as refused:
            template_of_snms(broken)
        assert words in str(refused.value)


def test_a_template_version_means_the_nearest_prefix_first() -> None:
    part = parse_identifier("88.100.1/SN-1")
    assert [str(t) for t in template_candidates(part, "auto-part.v2")] == [
        "88.100.1/TEMPLATE.auto-part.v2",
        "88.100/TEMPLATE.auto-part.v2",
        "88/TEMPLATE.auto-part.v2",
    ]
    assert [str(t) for t in template_candidates(part, "88.100/TEMPLATE.x.v1")] == ["88.100/TEMPLATE.x.v1"]
    with pytest.raises(BadTemplate):
        template_candidates(part, "88.100/NOT-A-TEMPLATE")
    assert version_parts("auto-part.V12") == ("auto-part", 12)
    for bad in ("v2", "auto-part", "auto-part.v0", 2, "a" * 200 + ".v1"):
        with pytest.raises(BadTemplate):
            version_parts(bad)


def test_a_registration_body_and_the_template_value_it_gains() -> None:
    body = {
        "handle": "88.100.1/SN-1",
        "templateVersion": "auto-part.v2",
        "value": [{"index": 90, "type": "A", "data": "x"}],
    }
    handle, values, version = registration_of(body)
    assert (handle, version, [v.index for v in values]) == ("88.100.1/SN-1", "auto-part.v2", [90])
    named = naming(values, AUTOMOTIVE_PART)
    assert [(v.index, v.type, v.data) for v in named[1:]] == [(91, "TEMPLATE", b"88.100/TEMPLATE.auto-part.v2")]
    assert naming(named, AUTOMOTIVE_PART) == named  # named already: unchanged
    with pytest.raises(BadTemplate, match="names another"):
        naming(named, FOOD_TRACE)
    bads: list[Any] = [
        [],
        {"value": []},
        {"handle": "", "value": []},
        {"handle": "a/b", "value": {}},
        {"handle": "a/b", "value": [], "templateVersion": 2},
    ]
    for bad in bads:
        with pytest.raises(HandleFailure):
            registration_of(bad)
    record = Record(parse_identifier("88.100.1/SN-1"), tuple(named), 3)
    shown = record_json(record, detail=False)
    assert shown["templateVersion"] == "auto-part.v2" and shown["value"][0] == {
        "index": 90,
        "type": "A",
        "data": {"format": "string", "value": "x"},
    }
    assert record_json(record, detail=True)["version"] == 3 and "ttl" in record_json(record, detail=True)["value"][0]
    assert (
        record_json(Record(record.identifier, (Value(1, "TEMPLATE", b"junk"),), 1), detail=False)["templateVersion"]
        == ""
    )
