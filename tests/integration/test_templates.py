"""Metadata templates on a real node: published as identifiers, checked on every registration
(single, batch item by item, changes of values), required per prefix, immutable once published."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from bench.templates import AUTOMOTIVE_PART, FOOD_TRACE
from nodes.hierarchy import NodeSpec, wire_and_seed
from resolver.errors import BadTemplate, FailedPrecondition, TemplateViolation
from resolver.record import Value
from resolver.registrar import Registrar
from resolver.resolver import Resolver
from resolver.template import DEFINITION_TYPE, REFERENCE_TYPE, parse_template
from tests.integration.conftest import Cluster

FAULTS: list[dict[str, str | None]] = [
    {"manufacturer": None},
    {"material": "wood"},
    {"productionDate": "30/11/2026"},
    {"partNumber": "X"},
]
PART_REF = Value(90, REFERENCE_TYPE, str(AUTOMOTIVE_PART.identifier).encode())


def part(serial: int, **changes: str | None) -> list[Value]:
    items: dict[str, str | None] = {
        "partNumber": f"BRK-{serial:05d}",
        "partName": "Brake disc, front",
        "material": "steel",
        "weightKg": "7.25",
        "productionDate": "2026-11-30",
        "manufacturer": "Hubei Parts Co.",
    }
    items.update(changes)
    values = [Value(n + 1, name, text.encode()) for n, (name, text) in enumerate(items.items()) if text is not None]
    return [*values, PART_REF]


@pytest.fixture
async def node(cluster: Cluster) -> AsyncIterator[tuple[str, Registrar]]:
    """A secondary node for 88.100 hosting 88.100.1 (whose registrations must name a template)
    and 88.100.2 (free), with the automotive and food templates published."""
    spec = NodeSpec("secondary", "secondary", "88.100", 0, {"templates": {"required": ["88.100.1"]}})
    address = cluster.start(spec)
    registrar = Registrar(node=address, timeout=60)
    try:
        for prefix in ("88.100.1", "88.100.2"):
            await registrar.create_prefix(prefix)
        for template in (AUTOMOTIVE_PART, FOOD_TRACE):
            await registrar.create(str(template.identifier), [template.value()])
        yield address, registrar
    finally:
        await registrar.close()


async def test_a_template_resolves_like_any_record_and_never_changes(node: tuple[str, Registrar]) -> None:
    address, registrar = node
    async with Resolver([address]) as resolver:
        record = await resolver.resolve(str(AUTOMOTIVE_PART.identifier))
    definition = record.value(1)
    assert definition is not None and definition.type == DEFINITION_TYPE
    assert parse_template(AUTOMOTIVE_PART.identifier, definition.data) == AUTOMOTIVE_PART
    # Publishing the same again is an idempotent retry; changing or deleting it is refused.
    assert not (await registrar.create(str(AUTOMOTIVE_PART.identifier), [AUTOMOTIVE_PART.value()])).created
    with pytest.raises(FailedPrecondition, match="published template version"):
        await registrar.replace(str(AUTOMOTIVE_PART.identifier), [FOOD_TRACE.value()])
    with pytest.raises(FailedPrecondition, match="published template version"):
        await registrar.delete(str(AUTOMOTIVE_PART.identifier))
    broken = json.loads(AUTOMOTIVE_PART.to_json())
    broken["items"][0]["type"], broken["version"] = "blob", 9
    with pytest.raises(BadTemplate, match=r"items\[0\]\.type"):
        await registrar.create("88.100/TEMPLATE.auto-part.v9", [Value(1, DEFINITION_TYPE, json.dumps(broken).encode())])


async def test_a_registration_that_breaks_its_template_is_refused_with_every_violation(
    node: tuple[str, Registrar],
) -> None:
    _, registrar = node
    written = await registrar.create("88.100.1/BRK-1", part(1))
    assert written.created and written.record.version == 1
    with pytest.raises(TemplateViolation) as refused:
        await registrar.create("88.100.1/BRK-2", part(2, material="wood", manufacturer=None, weightKg="heavy"))
    assert dict(refused.value.violations) == {
        "material": "'wood' is not one of steel, aluminium, plastic, rubber, composite",
        "manufacturer": "required, missing",
        "weightKg": "'heavy' is not a number",
    }
    assert refused.value.field == "values"
    # Changes of values are held to the template too.
    with pytest.raises(TemplateViolation, match=r"partNumber: 40 characters, at most 32"):
        await registrar.modify_values("88.100.1/BRK-1", [Value(1, "partNumber", b"X" * 40)])
    changed = await registrar.modify_values("88.100.1/BRK-1", [Value(1, "partNumber", b"BRK-00001-B")])
    assert changed.record.version == 2
    # 88.100.1 requires a template; 88.100.2 does not; a template of another industry fits neither.
    with pytest.raises(TemplateViolation, match="requires a template"):
        await registrar.create("88.100.1/PLAIN", [Value(1, "URL", b"https://example.com")])
    assert (await registrar.create("88.100.2/PLAIN", [Value(1, "URL", b"https://example.com")])).created
    foreign = [Value(1, "URL", b"x"), Value(90, REFERENCE_TYPE, b"88.200/TEMPLATE.auto-part.v2")]
    with pytest.raises(TemplateViolation, match=r"not a template of 88\.100\.2"):
        await registrar.create("88.100.2/FOREIGN", foreign)
    with pytest.raises(TemplateViolation, match="not found"):
        await registrar.create(
            "88.100.2/GHOST", [Value(1, "URL", b"x"), Value(90, REFERENCE_TYPE, b"88.100/TEMPLATE.none.v1")]
        )


async def test_a_batch_of_2000_with_bad_items_stores_the_good_ones_and_a_retry_changes_nothing(
    node: tuple[str, Registrar],
) -> None:
    address, registrar = node
    bad: dict[int, dict[str, str | None]] = {
        n: change
        for n, change in zip(
            range(7, 2000, 50),  # 40 bad items spread over the batch
            FAULTS * 10,
            strict=True,
        )
    }
    items = [(f"88.100.1/BATCH-{n:04d}", part(n, **bad.get(n, {}))) for n in range(2000)]
    first = await registrar.batch_create(items, batch_size=2000)
    refused = {n for n, outcome in enumerate(first) if outcome.error is not None}
    assert refused == set(bad)
    for n in refused:
        error = first[n].error
        assert isinstance(error, TemplateViolation), error
        assert [item for item, _ in error.violations] == list(bad[n])  # each item's faults, by item
    assert all(o.created and o.version == 1 for n, o in enumerate(first) if n not in bad)
    again = await registrar.batch_create(items, batch_size=2000)  # the whole batch, retried
    assert {n for n, o in enumerate(again) if o.error is not None} == refused
    assert all(not o.created and o.version == 1 for n, o in enumerate(again) if n not in bad)
    async with Resolver([address]) as resolver:
        assert (await resolver.resolve("88.100.1/BATCH-0000")).version == 1
        for n in list(bad)[:5]:
            with pytest.raises(Exception, match="not found"):
                await resolver.resolve(f"88.100.1/BATCH-{n:04d}")


async def test_an_enterprise_node_holds_registrations_to_its_industrys_template(cluster: Cluster) -> None:
    """The template lives on the secondary node (88.100); the enterprise prefix 88.100.1 is
    delegated to a node of its own, which resolves the template through the hierarchy (its
    [auth] roots) and checks registrations against it: an enterprise inherits its industry's."""
    top = cluster.start(NodeSpec("top-level", "top-level", "88", 0))
    secondary = cluster.start(NodeSpec("secondary-100", "secondary", "88.100", 0))
    enterprise = cluster.start(NodeSpec("enterprise-1", "enterprise", "88.100.1", 0, {"auth": {"roots": [top]}}))
    await wire_and_seed({"top-level": top, "secondary-100": secondary, "enterprise-1": enterprise})
    at_secondary, at_enterprise = Registrar(node=secondary), Registrar(node=enterprise)
    try:
        await at_secondary.create(str(AUTOMOTIVE_PART.identifier), [AUTOMOTIVE_PART.value()])
        with pytest.raises(TemplateViolation) as refused:
            await at_enterprise.create("88.100.1/BRK-9", part(9, material="wood"))
        assert [item for item, _ in refused.value.violations] == ["material"]
        assert (await at_enterprise.create("88.100.1/BRK-10", part(10))).created
    finally:
        await at_secondary.close()
        await at_enterprise.close()


async def test_batches_of_replacements_and_deletions_answer_item_by_item(node: tuple[str, Registrar]) -> None:
    """BatchReplace and BatchDelete over gRPC: one transaction each, every item its own outcome,
    replacements held to their template like any write."""
    address, registrar = node
    created = await registrar.batch_create([(f"88.100.1/RB-{n}", part(n)) for n in range(3)])
    assert [o.version for o in created] == [1, 1, 1]
    replaced = await registrar.batch_replace(
        [
            ("88.100.1/RB-0", part(100)),
            ("88.100.1/RB-1", part(101, material="wood")),
            ("88.100.1/RB-9", part(109)),
            ("88.100.1/RB-2", part(102)),
        ]
    )
    assert [(o.version, type(o.error).__name__ if o.error else None) for o in replaced] == [
        (2, None),
        (0, "TemplateViolation"),
        (0, "NotFound"),
        (2, None),
    ]
    async with Resolver([address]) as resolver:
        assert (await resolver.resolve("88.100.1/RB-1")).version == 1  # the refused item changed nothing
        assert (await resolver.resolve("88.100.1/RB-0")).value(1).data == b"BRK-00100"  # type: ignore[union-attr]
    deleted = await registrar.batch_delete(["88.100.1/RB-0", "88.100.1/RB-9", "88.100.1/RB-1"])
    assert [(o.version, type(o.error).__name__ if o.error else None) for o in deleted] == [
        (2, None),
        (0, "NotFound"),
        (1, None),
    ]
    async with Resolver([address]) as resolver:
        with pytest.raises(Exception, match="not found"):
            await resolver.resolve("88.100.1/RB-0")
        assert (await resolver.resolve("88.100.1/RB-2")).version == 2
