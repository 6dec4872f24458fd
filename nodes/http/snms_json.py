"""The JSON of the SNMS v3 API (``nodes.http.snms``): its templates and identifier bodies, to and
from the domain's ``Template`` and ``Value``.

An SNMS template::

    {"prefix": "88.100", "version": "auto-part.v2", "description": "...",
     "industryCategory": "C", "industrySpecific": "36", "industryTrade": "367", "industrySubclass": "3670",
     "items": [{"name": "零件号", "idType": "partNumber", "required": true,
                "metadata": {"type": "string", "minLength": 4, "maxLength": 32}}, ...]}

``idType`` is the item's key (the type of the value that holds it in a registration), ``name``
its label (our ``description``). ``metadata`` also takes ``min``/``max`` (numbers), ``format``
(dates) and ``options`` (an enumeration's values). An item's ``readers`` (our addition: identities) restrict
it to them and the record's administrators (tiered read grants). ``version`` is ``<name>.v<N>``: the template
identifier ``<prefix>/TEMPLATE.<name>.v<N>`` (versions are integers here, so that they order;
free-text versions such as ``1.0.0`` are refused with a message saying so).

An identifier body: ``{"handle": "88.100.1/SN-1", "templateVersion": "auto-part.v2",
"value": [<HSJ values>]}``; ``templateVersion`` may also be a template identifier.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from typing import Any

from nodes.http.codes import RC, HandleFailure
from nodes.http.handle_json import value_to_json, values_of_body
from resolver.errors import BadTemplate, IdisError
from resolver.identifier import Identifier, parse_identifier
from resolver.record import Permission, Record, Value
from resolver.template import (
    REFERENCE_TYPE,
    SUFFIX,
    Template,
    applies_to,
    is_template_identifier,
    template_identifier,
    template_of_document,
)

_INDUSTRY = (
    ("industryCategory", "category"),
    ("industrySpecific", "division"),
    ("industryTrade", "group"),
    ("industrySubclass", "class"),
)
_METADATA = (
    ("minLength", "min_length"),
    ("maxLength", "max_length"),
    ("min", "minimum"),
    ("max", "maximum"),
    ("format", "format"),
    ("options", "values"),
)


def version_parts(version: Any) -> tuple[str, int]:
    """``"auto-part.v2"`` -> ("auto-part", 2); BadTemplate for anything else."""
    match = SUFFIX.fullmatch(f"TEMPLATE.{version}") if isinstance(version, str) and len(version) <= 128 else None
    if match is None:
        raise BadTemplate(f"version: <name>.v<integer> expected (for example auto-part.v2), got {version!r}")
    return match.group(1), int(match.group(2))


def version_text(template: Identifier) -> str:
    """The SNMS ``version`` of a template identifier: its suffix without ``TEMPLATE.``."""
    return template.suffix.partition(".")[2]


def template_of_snms(body: Any) -> Template:
    """The template an SNMS body publishes; BadTemplate naming the part at fault."""
    if not isinstance(body, dict) or not isinstance(body.get("prefix"), str):
        raise BadTemplate('a template is a JSON object with "prefix", "version", "items" ...')
    name, version = version_parts(body.get("version"))
    items = body.get("items")
    if not isinstance(items, list):
        raise BadTemplate("items: a list expected")
    document: dict[str, Any] = {
        "prefix": body["prefix"],
        "name": name,
        "version": version,
        "description": body.get("description", ""),
        "industry": {ours: body.get(theirs, "") for theirs, ours in _INDUSTRY},
        "items": [_item_of_snms(n, item) for n, item in enumerate(items)],
    }
    return template_of_document(document)


def _item_of_snms(n: int, item: Any) -> dict[str, Any]:
    where = f"items[{n}]"
    if not isinstance(item, dict) or not isinstance(item.get("idType"), str):
        raise BadTemplate(f'{where}: an object with "idType" (the value type it names) expected')
    metadata = item.get("metadata", {})
    if not isinstance(metadata, dict):
        raise BadTemplate(f"{where}.metadata: an object expected")
    unknown = set(metadata) - {"type"} - {theirs for theirs, _ in _METADATA}
    if unknown:
        raise BadTemplate(f"{where}.metadata: unknown keys {sorted(unknown)}")
    out: dict[str, Any] = {"name": item["idType"], "type": metadata.get("type", "string")}
    if "required" in item:
        out["required"] = item["required"]
    if "name" in item:
        out["description"] = item["name"]
    out.update({ours: metadata[theirs] for theirs, ours in _METADATA if theirs in metadata})
    if "readers" in item:
        out["readers"] = item["readers"]
    return out


def snms_of_template(template: Template) -> dict[str, Any]:
    """An SNMS body of a template (what ``template_of_snms`` reads back to the same template)."""
    industry = template.industry
    parts = (industry.category, industry.division, industry.group, industry.klass)
    body: dict[str, Any] = {
        "prefix": template.prefix.display,
        "version": f"{template.name}.v{template.version}",
        "handle": str(template.identifier),
        "description": template.description,
    }
    body.update({theirs: part for (theirs, _), part in zip(_INDUSTRY, parts, strict=True)})
    items = []
    for item in template.items:
        metadata: dict[str, Any] = {"type": item.type}
        for theirs, ours in _METADATA:
            given = getattr(item, ours)
            if given is not None if ours in ("minimum", "maximum") else given:
                metadata[theirs] = list(given) if isinstance(given, tuple) else given
        shown = {"name": item.description, "idType": item.name, "required": item.required, "metadata": metadata}
        if item.readers:
            shown["readers"] = list(item.readers)
        items.append(shown)
    body["items"] = items
    return body


def snms_template_json(template: Template) -> str:
    return json.dumps(snms_of_template(template), ensure_ascii=False, sort_keys=True)


def registration_of(body: Any, where: str = "body") -> tuple[str, list[Value], str]:
    """An SNMS identifier body: the handle, its values and the template version it names ("" when
    it names none)."""
    if not isinstance(body, dict):
        raise HandleFailure(RC.PROTOCOL_ERROR, f'{where}: a JSON object with "handle" and "value" expected')
    handle = body.get("handle")
    if not isinstance(handle, str) or not handle:
        raise HandleFailure(RC.INVALID_HANDLE, f'{where}: "handle" must be a non-empty string')
    raw = body.get("value", body.get("values"))
    if not isinstance(raw, list):
        raise HandleFailure(RC.PROTOCOL_ERROR, f'{where}: "value" must be a list of values')
    values, _ = values_of_body(raw)
    version = body.get("templateVersion", "")
    if not isinstance(version, str):
        raise HandleFailure(RC.PROTOCOL_ERROR, f'{where}: "templateVersion" must be a string')
    return handle, values, version


def template_candidates(identifier: Identifier, version: str) -> list[Identifier]:
    """The template identifiers ``templateVersion`` may mean for a registration of
    ``identifier``, nearest first: ``<name>.v<N>`` of its own prefix, then of each prefix above
    it (an enterprise inherits its industry's); a whole template identifier means itself."""
    if "/" in version:
        named = parse_identifier(version)
        if not is_template_identifier(named):
            raise BadTemplate(f"templateVersion: {version} is not a template identifier")
        if not applies_to(named, identifier.prefix):
            raise BadTemplate(
                f"templateVersion: {named} is not a template of {identifier.prefix} or of a prefix above it"
            )
        return [named]
    name, number = version_parts(version)
    prefix = identifier.prefix
    out = [template_identifier(prefix, name, number)]
    while prefix.parent is not None:
        prefix = prefix.parent
        out.append(template_identifier(prefix, name, number))
    return out


def naming(values: list[Value], template: Template) -> list[Value]:
    """``values`` following ``template``: with a TEMPLATE value naming it (at the first free index
    from 90) unless one names it already (BadTemplate when one names another), and the values of
    the items it restricts to their readers (tiered read grants) not publicly readable."""
    restricted = template.restricted
    if restricted:
        hidden = ~Permission.PUBLIC_READ
        values = [replace(v, permissions=v.permissions & hidden) if v.type in restricted else v for v in values]
    identifier = str(template.identifier).encode()
    named = [v for v in values if v.type == REFERENCE_TYPE]
    if named:
        if any(v.data != identifier for v in named):
            raise BadTemplate(f"templateVersion names {template.identifier}, a {REFERENCE_TYPE} value names another")
        return values
    used = {v.index for v in values}
    index = next(i for i in range(90, 90 + len(used) + 1) if i not in used)
    return [*values, Value(index, REFERENCE_TYPE, identifier)]


def record_json(record: Record, detail: bool) -> dict[str, Any]:
    """An identifier's record as the SNMS API answers it: its values (in HSJ's form), the template
    version it names, and with ``detail`` its version too."""
    named = next((v.data.decode("utf-8", "replace") for v in record.values if v.type == REFERENCE_TYPE), "")
    body: dict[str, Any] = {"handle": str(record.identifier), "templateVersion": ""}
    if named:
        body["template"] = named
        with contextlib.suppress(IdisError):  # a malformed name (refused since) is shown as stored
            body["templateVersion"] = version_text(parse_identifier(named))
    values = []
    for value in record.values:
        shown = value_to_json(value)
        if not detail:
            shown = {k: shown[k] for k in ("index", "type", "data") if k in shown}
        values.append(shown)
    body["value"] = values
    if detail:
        body["version"] = record.version
    return body
