"""Metadata templates: their definitions, and what a registration must hold to follow one."""

from __future__ import annotations

import json
import re

import pytest

from bench.templates import AUTOMOTIVE_PART, FOOD_TRACE
from resolver.errors import BadTemplate, TemplateViolation
from resolver.identifier import parse_identifier, parse_prefix
from resolver.record import Permission, Value
from resolver.template import (
    Industry,
    applies_to,
    check,
    exposed,
    named_template,
    parse_template,
    template_identifier,
    template_in,
    template_of_document,
)


def values(**items: str) -> list[Value]:
    return [Value(n + 1, name, text.encode()) for n, (name, text) in enumerate(items.items())]


GOOD_PART = dict(
    partNumber="BRK-2041",
    partName="Brake disc, front",
    material="steel",
    weightKg="7.25",
    batchSize="500",
    productionDate="2026-11-30",
    manufacturer="Hubei Parts Co.",
    datasheet="https://example.com/brk-2041.pdf",
)


def test_a_template_reads_back_as_it_was_written() -> None:
    for template in (AUTOMOTIVE_PART, FOOD_TRACE):
        assert template.identifier == template_identifier(template.prefix, template.name, template.version)
        assert parse_template(template.identifier, template.to_json()) == template
    assert str(AUTOMOTIVE_PART.identifier) == "88.100/TEMPLATE.auto-part.v2"


def test_a_registration_that_follows_the_template_has_no_violation() -> None:
    assert check(AUTOMOTIVE_PART, values(**GOOD_PART)) == []
    optional_left_out = {k: v for k, v in GOOD_PART.items() if k not in ("material", "weightKg", "datasheet")}
    assert check(AUTOMOTIVE_PART, values(**optional_left_out)) == []


def test_every_violation_is_listed_with_its_item() -> None:
    bad = dict(
        GOOD_PART,
        partNumber="X" * 40,  # too long
        material="wood",  # not in the enumeration
        weightKg="heavy",  # not a number
        batchSize="0",  # below the minimum
        productionDate="2026-13-01",  # not a date
        datasheet="not a url",
    )
    del bad["manufacturer"]  # required
    found = dict(check(AUTOMOTIVE_PART, values(**bad)))
    assert set(found) == {
        "partNumber",
        "material",
        "weightKg",
        "batchSize",
        "productionDate",
        "datasheet",
        "manufacturer",
    }
    assert found["partNumber"] == "40 characters, at most 32"
    assert "'wood' is not one of steel" in found["material"]
    assert found["manufacturer"] == "required, missing"
    assert "not a date as YYYY-MM-DD" in found["productionDate"]
    twice = [*values(**GOOD_PART), Value(99, "partName", b"again")]
    assert check(AUTOMOTIVE_PART, twice) == [("partName", "given 2 times, once at most")]
    assert check(
        FOOD_TRACE,
        values(productName="milk", lot="L1", origin="Hubei", producedAt="2026-11-30T08:00:00", shelfLifeDays="7"),
    ) == [("producedAt", "'2026-11-30T08:00:00' is not a datetime as YYYY-MM-DD HH:mm:ss")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"items": []}, "items: a list of 1 to 200"),
        ({"items": [{"name": "a", "type": "blob"}]}, "items[0].type: one of"),
        ({"items": [{"name": "a"}, {"name": "a"}]}, "each name once"),
        ({"items": [{"name": "a", "type": "enum"}]}, "items[0].values"),
        ({"items": [{"name": "a", "min_length": 5, "max_length": 2}]}, "min_length <= max_length"),
        ({"items": [{"name": "a", "type": "date", "format": "DD.MM.YYYY"}]}, "items[0].format"),
        ({"items": [{"name": "a", "colour": "red"}]}, "unknown keys"),
        ({"industry": {"category": "Z"}}, "industry.category"),
        ({"industry": {"category": "C", "division": "36", "group": "141"}}, "not within the coarser code"),
        ({"version": 3}, "name and version must be the identifier's"),
        ({"items": [{"name": "a", "readers": "88/ADMIN"}]}, "items[0].readers: a list of at most 64"),
        ({"items": [{"name": "a", "type": "number", "maximum": 10**400}]}, "finite numbers"),
        ({"items": [{"name": "a", "readers": ["88..1/X"]}]}, "items[0].readers: '88..1/X' is not an identity"),
        ({"items": [{"name": "a", "readers": [f"88/R{n}" for n in range(65)]}]}, "at most 64 identities"),
    ],
)
def test_a_malformed_template_is_refused_naming_the_part_at_fault(change: dict[str, object], message: str) -> None:
    document = {**json.loads(AUTOMOTIVE_PART.to_json()), **change}
    with pytest.raises(BadTemplate, match=re.escape(message)):
        parse_template(AUTOMOTIVE_PART.identifier, json.dumps(document))
    with pytest.raises(BadTemplate, match="not JSON"):
        parse_template(AUTOMOTIVE_PART.identifier, "{")
    with pytest.raises(BadTemplate, match="not a template identifier"):
        parse_template(parse_identifier("88.100/X"), AUTOMOTIVE_PART.to_json())


def test_industry_codes_follow_gbt_4754() -> None:
    Industry("C", "36", "367", "3670")
    Industry("A")
    with pytest.raises(BadTemplate, match=r"industry\.division: 2 digits"):
        Industry("C", "3")


def test_a_registration_names_one_template_of_its_prefix_or_above() -> None:
    named = named_template([*values(**GOOD_PART), Value(50, "TEMPLATE", b"88.100/TEMPLATE.auto-part.v2")])
    assert named == AUTOMOTIVE_PART.identifier
    assert named_template(values(**GOOD_PART)) is None
    with pytest.raises(TemplateViolation, match="not a template identifier"):
        named_template([Value(50, "TEMPLATE", b"88.100/SN-1")])
    with pytest.raises(TemplateViolation, match="more than one"):
        named_template([Value(50, "TEMPLATE", b"88.100/TEMPLATE.a.v1"), Value(51, "TEMPLATE", b"88.100/TEMPLATE.b.v1")])
    assert applies_to(AUTOMOTIVE_PART.identifier, parse_prefix("88.100"))
    assert applies_to(AUTOMOTIVE_PART.identifier, parse_prefix("88.100.1"))  # an enterprise inherits it
    assert not applies_to(AUTOMOTIVE_PART.identifier, parse_prefix("88.1000"))
    assert not applies_to(AUTOMOTIVE_PART.identifier, parse_prefix("88.200.1"))


def test_a_violation_error_lists_them_all() -> None:
    error = TemplateViolation.of([("a", "required, missing"), ("b", "too long")], "88.100.1/X")
    assert error.violations == (("a", "required, missing"), ("b", "too long"))
    assert str(error) == "88.100.1/X breaks its template: a: required, missing; b: too long"


def test_a_template_file_and_a_template_record_read_back_or_name_their_fault() -> None:
    document = {"prefix": "88.100", **json.loads(AUTOMOTIVE_PART.to_json())}
    assert template_of_document(document) == AUTOMOTIVE_PART
    wrong: list[object] = [[], {**document, "prefix": 88}, {**document, "version": "2"}, {**document, "version": True}]
    for bad in wrong:
        with pytest.raises(BadTemplate):
            template_of_document(bad)
    assert template_in(AUTOMOTIVE_PART.identifier, [Value(2, "URL", b"x"), AUTOMOTIVE_PART.value()]) == AUTOMOTIVE_PART
    with pytest.raises(BadTemplate, match="holds one IDIS_TEMPLATE value"):
        template_in(AUTOMOTIVE_PART.identifier, [AUTOMOTIVE_PART.value(1), AUTOMOTIVE_PART.value(2)])


def test_an_item_with_readers_is_readable_by_them_only_and_never_public() -> None:
    document = json.loads(FOOD_TRACE.to_json())
    document["items"][6]["readers"] = ["88.100/QA", "88.300.1/Auditor", "88.100/QA"]  # inspector
    template = parse_template(FOOD_TRACE.identifier, json.dumps(document))
    assert template.items[6].readers == ("88.100/QA", "88.300.1/Auditor")  # keys, each once
    assert template.restricted == {"inspector": ("88.100/QA", "88.300.1/Auditor")}
    assert parse_template(FOOD_TRACE.identifier, template.to_json()) == template
    assert template.granted_to("88.300.1/Auditor") == {"inspector"} and not template.granted_to("88.100/OTHER")
    public = Value(7, "inspector", b"qa@example.com")
    hidden = Value(7, "inspector", b"qa@example.com", permissions=Permission.ADMIN_READ | Permission.ADMIN_WRITE)
    assert exposed(template, [Value(1, "productName", b"milk"), public]) == [
        ("inspector", "readable by its readers only (88.100/QA, 88.300.1/Auditor): store it without PUBLIC_READ")
    ]
    assert exposed(template, [hidden]) == [] and exposed(FOOD_TRACE, [public]) == []
