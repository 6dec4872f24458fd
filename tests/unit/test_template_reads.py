"""What a node looks up to check registrations against templates: only templates that may apply,
a bounded number per call, each kept once read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from bench.templates import AUTOMOTIVE_PART
from nodes.authority import Authority
from nodes.templates import MAX_NAMED_PER_CALL, Templates
from resolver.errors import NotFound
from resolver.identifier import Identifier, parse_identifier, parse_prefix
from resolver.record import Record, Value
from resolver.template import REFERENCE_TYPE, fields_of


class NothingHostedHere:
    """An authority that hosts no prefix: every template is looked up in the hierarchy."""

    async def stored_rows(self, keys: Sequence[str]) -> dict[str, Any]:
        return {}


def naming(template: str) -> list[Value]:
    return [Value(1, "partNumber", b"BRK-1"), Value(90, REFERENCE_TYPE, template.encode())]


async def test_only_templates_that_may_apply_are_looked_up_and_at_most_a_few_per_call() -> None:
    looked_up: list[str] = []

    async def resolve(identifier: Identifier) -> Record:
        looked_up.append(str(identifier))
        if identifier == AUTOMOTIVE_PART.identifier:
            return Record(identifier, (AUTOMOTIVE_PART.value(),), 1)
        raise NotFound(f"{identifier} not found")

    templates = Templates(cast(Authority, NothingHostedHere()), [], resolve)
    at = parse_identifier("88.100.1/P-1")
    # Another industry's template: refused without a lookup.
    foreign = fields_of(naming("99.7/TEMPLATE.anything.v1"))
    fetched = await templates.prefetch([(at, foreign)])
    assert looked_up == [] and fetched == {}
    assert "not a template of 88.100.1" in str(templates.violation(at, foreign, fetched))
    # A batch naming many templates of its own prefixes: the first few looked up, no more.
    many = [(at, fields_of(naming(f"88.100/TEMPLATE.t{n}.v1"))) for n in range(3 * MAX_NAMED_PER_CALL)]
    fetched = await templates.prefetch(many)
    assert len(looked_up) == MAX_NAMED_PER_CALL
    beyond = templates.violation(*many[-1], fetched)
    assert beyond is not None and f"more than {MAX_NAMED_PER_CALL} templates" in str(beyond)
    assert "not found" in str(templates.violation(*many[0], fetched))
    # A template read once is kept: checking again looks nothing up.
    looked_up.clear()
    good = fields_of(naming(str(AUTOMOTIVE_PART.identifier)))
    assert "productionDate: required, missing" in str(
        templates.violation(at, good, await templates.prefetch([(at, good)]))
    )
    assert looked_up == [str(AUTOMOTIVE_PART.identifier)]
    await templates.prefetch([(at, good)])
    assert looked_up == [str(AUTOMOTIVE_PART.identifier)]


async def test_a_grant_comes_only_from_a_template_of_the_records_own_prefix_or_above() -> None:
    """A record that names another industry's template (stored before templates were checked,
    say) gets no grant from it: that industry could publish a template granting itself the
    record's private values. Its own industry's template grants what it lists."""
    from nodes.trust.audit import Caller
    from resolver.record import Permission
    from resolver.template import Industry, Item, Template

    private = Permission.ADMIN_READ | Permission.ADMIN_WRITE
    reader = Caller(parse_identifier("99.7/SPY"), 300)

    def granting(prefix: str) -> Template:
        return Template(parse_prefix(prefix), "grab", 1, Industry("C"), (Item("cost", readers=("99.7/SPY",)),))

    stored = {str(granting(p).identifier): granting(p) for p in ("99.7", "88.100")}

    async def resolve(identifier: Identifier) -> Record:
        return Record(identifier, (stored[str(identifier)].value(),), 1)

    templates = Templates(cast(Authority, NothingHostedHereReading()), [], resolve)
    for prefix, sees in (("99.7", False), ("88.100", True)):
        named = Value(90, REFERENCE_TYPE, str(granting(prefix).identifier).encode())
        record = Record(parse_identifier("88.100.1/P-1"), (Value(1, "cost", b"42", permissions=private), named), 1)
        shown = await templates.readable(record, reader)
        assert ("cost" in [v.type for v in shown.values]) is sees, prefix
        assert "cost" not in [v.type for v in (await templates.readable(record, None)).values]


class NothingHostedHereReading(NothingHostedHere):
    permissions = None
