"""Metadata templates: what the records of an industry (or an enterprise) must hold.

In the national system a secondary node keeps versioned templates per industry, tagged with the
GB/T 4754 industry classification; an enterprise registers identifiers that name the template
version they follow, and the node checks them against it (``../shared/DOMAIN.md`` §3).

Here a template is data in the hierarchy: the record of the identifier
``PREFIX/TEMPLATE.<name>.v<version>``, one value of type ``IDIS_TEMPLATE`` holding its JSON, so
it resolves, caches, signs and replicates like any record. A registration names the template it
follows with a value of type ``TEMPLATE`` whose data is that identifier; the template must be of
the registration's own prefix or of a prefix above it (an enterprise inherits its industry's).
An item of the template is a value of the record whose type is the item's name.

``check(template, values)`` lists every violation (a missing required item, a wrong type, a
length or range out of bounds, a value outside the enumeration, a malformed date), each naming
the item at fault; nothing here touches the network or the store.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from resolver.errors import BadTemplate, InvalidArgument, TemplateViolation
from resolver.identifier import Identifier, Prefix, parse_identifier, parse_prefix
from resolver.record import Permission, Value

DEFINITION_TYPE = "IDIS_TEMPLATE"
"""The value type of a template's definition (its JSON) in the template's own record."""
REFERENCE_TYPE = "TEMPLATE"
"""The value type by which a registration names the template it follows (data: its identifier)."""
SUFFIX = re.compile(r"TEMPLATE\.([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.V([1-9][0-9]{0,8})", re.IGNORECASE)
"""A template identifier's suffix: ``TEMPLATE.<name>.v<version>``."""

ITEM_TYPES = ("string", "integer", "number", "date", "datetime", "enum", "url", "email")
DATE_FORMATS = {
    "YYYY-MM-DD": "%Y-%m-%d",
    "YYYYMMDD": "%Y%m%d",
    "YYYY/MM/DD": "%Y/%m/%d",
    "YYYY-MM": "%Y-%m",
}
DATETIME_FORMATS = {
    "YYYY-MM-DD HH:mm:ss": "%Y-%m-%d %H:%M:%S",
    "YYYY-MM-DDTHH:mm:ss": "%Y-%m-%dT%H:%M:%S",
    "ISO8601": "",
}
MAX_ITEMS = 200
MAX_ENUMERATION = 500
MAX_DEFINITION_BYTES = 64 * 1024
MAX_NAME = 64
MAX_READERS = 64
EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}")
URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]{0,15}://[^\s]{1,2000}")
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
INTEGER = re.compile(r"[+-]?\d{1,30}")
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True, slots=True)
class Industry:
    """A GB/T 4754 classification: category (门类, a letter), division (大类, 2 digits), group
    (中类, 3) and class (小类, 4), each part of the one before; the finer ones may be empty."""

    category: str
    division: str = ""
    group: str = ""
    klass: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-T]", self.category):
            raise BadTemplate(f"industry.category: a letter A-T (GB/T 4754), got {self.category!r}")
        for name, text, digits, parent in (
            ("division", self.division, 2, None),
            ("group", self.group, 3, self.division),
            ("class", self.klass, 4, self.group),
        ):
            if not text:
                continue
            if not re.fullmatch(rf"\d{{{digits}}}", text):
                raise BadTemplate(f"industry.{name}: {digits} digits, got {text!r}")
            if parent is not None and (not parent or not text.startswith(parent)):
                raise BadTemplate(f"industry.{name}: {text!r} is not within the coarser code {parent!r}")


@dataclass(frozen=True, slots=True)
class Item:
    name: str
    type: str = "string"
    required: bool = False
    min_length: int = 0
    max_length: int = 0
    """0: no bound (the record's own limits still hold)."""
    minimum: float | None = None
    maximum: float | None = None
    format: str = ""
    """For dates and datetimes: one of DATE_FORMATS / DATETIME_FORMATS."""
    values: tuple[str, ...] = ()
    """For an enumeration: the values allowed."""
    description: str = ""
    readers: tuple[str, ...] = ()
    """Tiered read grant: when given, the identities (identifier keys) that may read the item
    besides the record's administrators; its values must then not be publicly readable."""


@dataclass(frozen=True, slots=True)
class Template:
    prefix: Prefix
    name: str
    version: int
    industry: Industry
    items: tuple[Item, ...]
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    restricted: dict[str, tuple[str, ...]] = field(init=False, compare=False, repr=False)
    """The items with readers (tiered read grants), by name: their readers."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "restricted", {i.name: i.readers for i in self.items if i.readers})

    @property
    def identifier(self) -> Identifier:
        return template_identifier(self.prefix, self.name, self.version)

    def granted_to(self, identity_key: str) -> frozenset[str]:
        """The restricted items ``identity_key`` is a reader of."""
        return frozenset(name for name, readers in self.restricted.items() if identity_key in readers)

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "version": self.version,
                "description": self.description,
                "industry": {
                    "category": self.industry.category,
                    "division": self.industry.division,
                    "group": self.industry.group,
                    "class": self.industry.klass,
                },
                "items": [_item_json(i) for i in self.items],
            },
            ensure_ascii=False,
            sort_keys=True,
        )

    def value(self, index: int = 1) -> Value:
        """The template's record value (its definition)."""
        return Value(index, DEFINITION_TYPE, self.to_json().encode())


def template_identifier(prefix: Prefix, name: str, version: int) -> Identifier:
    return parse_identifier(f"{prefix.display}/TEMPLATE.{name}.v{version}")


def is_template_identifier(identifier: Identifier) -> bool:
    return SUFFIX.fullmatch(identifier.suffix) is not None


def _item_json(item: Item) -> dict[str, Any]:
    out: dict[str, Any] = {"name": item.name, "type": item.type, "required": item.required}
    for key in ("min_length", "max_length", "format", "description"):
        if getattr(item, key):
            out[key] = getattr(item, key)
    for key in ("minimum", "maximum"):
        if getattr(item, key) is not None:
            out[key] = getattr(item, key)
    if item.values:
        out["values"] = list(item.values)
    if item.readers:
        out["readers"] = list(item.readers)
    return out


def parse_template(identifier: Identifier, text: str | bytes) -> Template:
    """The template stored at ``identifier`` (its definition's JSON); BadTemplate naming the part
    at fault when it is malformed, or does not match the identifier's name and version."""
    match = SUFFIX.fullmatch(identifier.suffix)
    if match is None:
        raise BadTemplate(f"{identifier} is not a template identifier (PREFIX/TEMPLATE.<name>.v<version>)")
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_DEFINITION_BYTES:
        raise BadTemplate(f"template: {len(raw)} bytes, at most {MAX_DEFINITION_BYTES}")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadTemplate(f"template: not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise BadTemplate("template: a JSON object expected")
    name, version = _text(document, "name", MAX_NAME), document.get("version")
    if name.upper() != match.group(1).upper() or version != int(match.group(2)):
        raise BadTemplate(f"template: name and version must be the identifier's ({match.group(1)}, v{match.group(2)})")
    industry = document.get("industry")
    if not isinstance(industry, dict):
        raise BadTemplate("industry: an object with category, division, group, class expected")
    items = document.get("items")
    if not isinstance(items, list) or not items or len(items) > MAX_ITEMS:
        raise BadTemplate(f"items: a list of 1 to {MAX_ITEMS} items expected")
    parsed = tuple(_item(n, i) for n, i in enumerate(items))
    names = [i.name for i in parsed]
    if len(set(names)) != len(names):
        raise BadTemplate("items: each name once")
    return Template(
        identifier.prefix,
        match.group(1),
        int(version),
        Industry(*(_text(industry, k, 4) for k in ("category", "division", "group", "class"))),
        parsed,
        _text(document, "description", 1000),
    )


def template_in(identifier: Identifier, values: Iterable[Typed]) -> Template:
    """The template a template identifier's record holds: its one definition value, parsed;
    BadTemplate when there is not exactly one, or it is malformed."""
    definitions = [v.data for v in values if v.type == DEFINITION_TYPE]
    if len(definitions) != 1:
        raise BadTemplate(f"{identifier} is a template identifier: its record holds one {DEFINITION_TYPE} value")
    return parse_template(identifier, definitions[0])


def template_of_document(document: Any) -> Template:
    """A template as a file gives it to be published: its JSON object, with the ``prefix`` it
    belongs to beside its name, version, industry and items."""
    if not isinstance(document, dict) or not isinstance(document.get("prefix"), str):
        raise BadTemplate('a template file is a JSON object with "prefix", "name", "version", ...')
    name, version = document.get("name"), document.get("version")
    if not isinstance(name, str) or not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BadTemplate("template: a string name and a positive integer version expected")
    rest = {k: v for k, v in document.items() if k != "prefix"}
    return parse_template(template_identifier(parse_prefix(document["prefix"]), name, version), json.dumps(rest))


def _text(document: dict[str, Any], key: str, limit: int) -> str:
    value = document.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise BadTemplate(f"{key}: a string of at most {limit} characters expected")
    return value


def _item(n: int, raw: Any) -> Item:
    where = f"items[{n}]"
    if not isinstance(raw, dict):
        raise BadTemplate(f"{where}: an object expected")
    unknown = set(raw) - {
        "name",
        "type",
        "required",
        "min_length",
        "max_length",
        "minimum",
        "maximum",
        "format",
        "values",
        "description",
        "readers",
    }
    if unknown:
        raise BadTemplate(f"{where}: unknown keys {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[^\x00-\x1f\x7f]{1,64}", name):
        raise BadTemplate(f"{where}.name: 1 to {MAX_NAME} printable characters expected")
    kind = raw.get("type", "string")
    if kind not in ITEM_TYPES:
        raise BadTemplate(f"{where}.type: one of {', '.join(ITEM_TYPES)}, got {kind!r}")
    lengths = [raw.get(k, 0) for k in ("min_length", "max_length")]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in lengths) or (
        lengths[1] and lengths[0] > lengths[1]
    ):
        raise BadTemplate(f"{where}: min_length and max_length are counts, min_length <= max_length")
    bounds = [raw.get(k) for k in ("minimum", "maximum")]
    if any(
        b is not None and (not isinstance(b, (int, float)) or isinstance(b, bool) or not _finite(b)) for b in bounds
    ):
        raise BadTemplate(f"{where}: minimum and maximum are finite numbers (at most about 1.8e308)")
    fmt = raw.get("format", "")
    formats = DATE_FORMATS if kind == "date" else DATETIME_FORMATS if kind == "datetime" else {"": ""}
    if kind in ("date", "datetime") and not fmt:
        fmt = next(iter(formats))
    if fmt not in formats:
        raise BadTemplate(f"{where}.format: one of {', '.join(repr(f) for f in formats)} for a {kind}, got {fmt!r}")
    values = raw.get("values", [])
    if kind == "enum" and (
        not isinstance(values, list)
        or not values
        or len(values) > MAX_ENUMERATION
        or not all(isinstance(v, str) for v in values)
    ):
        raise BadTemplate(f"{where}.values: an enumeration is a list of 1 to {MAX_ENUMERATION} strings")
    if kind != "enum" and values:
        raise BadTemplate(f"{where}.values: only an enum item has values")
    required = raw.get("required", False)
    if not isinstance(required, bool):
        raise BadTemplate(f"{where}.required: true or false")
    return Item(
        name,
        kind,
        required,
        lengths[0],
        lengths[1],
        bounds[0],
        bounds[1],
        fmt,
        tuple(values),
        _text(raw, "description", 500),
        _readers(raw.get("readers", []), where),
    )


def _readers(raw: Any, where: str) -> tuple[str, ...]:
    """An item's readers as identifier keys (each once, in the order given)."""
    if not isinstance(raw, list) or len(raw) > MAX_READERS or not all(isinstance(r, str) for r in raw):
        raise BadTemplate(f"{where}.readers: a list of at most {MAX_READERS} identities expected")
    keys: list[str] = []
    for text in raw:
        try:
            key = parse_identifier(text).key
        except InvalidArgument as exc:
            raise BadTemplate(f"{where}.readers: {text!r} is not an identity: {exc}") from None
        if key not in keys:
            keys.append(key)
    return tuple(keys)


def _finite(number: Any) -> bool:
    """A JSON number (not a boolean) that a double holds: no infinity, no NaN, no integer past
    the largest double."""
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        return False
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


class Typed(Protocol):
    """A record's value as far as templates look at it: ``resolver.record.Value``, or the
    protobuf ``idis.v1.Value`` of a record read from its wire form (no need to build the other)."""

    @property
    def type(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def permissions(self) -> int: ...


Fields = dict[str, list[bytes]]
"""A record's values by type: the data of each (what a template looks at)."""


def fields_of(values: Iterable[Typed]) -> Fields:
    fields: Fields = {}
    for value in values:
        data = value.data
        present = fields.get(value.type)
        if present is None:
            fields[value.type] = [data]
        else:
            present.append(data)
    return fields


def check(template: Template, values: Iterable[Typed]) -> list[tuple[str, str]]:
    """Every violation of ``template`` by a record's ``values``: (item name, why)."""
    return check_fields(template, fields_of(values))


def check_fields(template: Template, fields: Fields) -> list[tuple[str, str]]:
    """``check`` of a record's values already gathered by type (``fields_of``)."""
    violations: list[tuple[str, str]] = []
    for item in template.items:
        present = fields.get(item.name)
        if present is None:
            if item.required:
                violations.append((item.name, "required, missing"))
            continue
        if len(present) > 1:
            violations.append((item.name, f"given {len(present)} times, once at most"))
        for data in present:
            why = _check_item(item, data)
            if why:
                violations.append((item.name, why))
    return violations


def exposed(template: Template, values: Iterable[Typed]) -> list[tuple[str, str]]:
    """The values of items the template restricts to their readers that are publicly readable
    anyway: (item name, why), each once."""
    restricted = template.restricted
    if not restricted:
        return []
    faults: dict[str, str] = {}
    for value in values:
        if value.type in restricted and value.permissions & Permission.PUBLIC_READ:
            readers = ", ".join(restricted[value.type][:5])
            faults[value.type] = f"readable by its readers only ({readers}): store it without PUBLIC_READ"
    return list(faults.items())


def _check_item(item: Item, data: bytes) -> str:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return "not UTF-8 text"
    length = len(text)
    if item.max_length and length > item.max_length:
        return f"{length} characters, at most {item.max_length}"
    if length < item.min_length:
        return f"{length} characters, at least {item.min_length}"
    return _CHECKS.get(item.type, _any)(item, text)


def _any(item: Item, text: str) -> str:
    return ""


def _enumerated(item: Item, text: str) -> str:
    return "" if text in item.values else f"{_short(text)} is not one of {', '.join(item.values[:20])}"


def _numeric(item: Item, text: str) -> str:
    integer = item.type == "integer"
    if not (INTEGER if integer else NUMBER).fullmatch(text):
        return f"{_short(text)} is not {'an integer' if integer else 'a number'}"
    number = float(text)
    if item.minimum is not None and number < item.minimum:
        return f"{text} is below the minimum {item.minimum:g}"
    if item.maximum is not None and number > item.maximum:
        return f"{text} is above the maximum {item.maximum:g}"
    return ""


def _dated(item: Item, text: str) -> str:
    pattern = (DATE_FORMATS if item.type == "date" else DATETIME_FORMATS)[item.format]
    try:
        if item.format == "YYYY-MM-DD" and ISO_DATE.fullmatch(text):
            datetime.date.fromisoformat(text)  # the usual one, without strptime's cost
        elif pattern:
            datetime.datetime.strptime(text, pattern)
        else:
            datetime.datetime.fromisoformat(text)
    except ValueError:
        return f"{_short(text)} is not a {item.type} as {item.format}"
    return ""


def _matching(name: str, pattern: re.Pattern[str]) -> Callable[[Item, str], str]:
    def matches(item: Item, text: str) -> str:
        return "" if pattern.fullmatch(text) else f"{_short(text)} is not {name}"

    return matches


_CHECKS: dict[str, Callable[[Item, str], str]] = {
    "enum": _enumerated,
    "integer": _numeric,
    "number": _numeric,
    "date": _dated,
    "datetime": _dated,
    "url": _matching("a URL", URL),
    "email": _matching("an email address", EMAIL),
}


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def named_template(values: Iterable[Typed]) -> Identifier | None:
    """The template a registration names (its ``TEMPLATE`` value), if any; TemplateViolation
    when that value is not a template identifier."""
    return named_in(fields_of(values))


def named_in(fields: Fields) -> Identifier | None:
    """``named_template`` of a record's values gathered by type."""
    named = fields.get(REFERENCE_TYPE)
    if named is None:
        return None
    if len(named) > 1:
        raise TemplateViolation.of([(REFERENCE_TYPE, "names more than one template")])
    identifier = reference_of(named[0])
    if isinstance(identifier, str):
        raise TemplateViolation.of([(REFERENCE_TYPE, identifier)])
    return identifier


@functools.lru_cache(maxsize=1024)
def reference_of(data: bytes) -> Identifier | str:
    """The template identifier ``data`` spells, or why it spells none (a batch names the same
    few templates many times: each is parsed once)."""
    try:
        identifier = parse_identifier(data.decode())
    except (UnicodeDecodeError, InvalidArgument) as exc:
        return f"not a template identifier: {exc}"
    if not is_template_identifier(identifier):
        return f"{identifier} is not a template identifier"
    return identifier


def applies_to(template: Identifier, prefix: Prefix | str) -> bool:
    """A template of ``prefix`` (or of the prefix of that key) or of a prefix above it (an
    enterprise inherits its industry's)."""
    own, key = template.prefix.key, prefix if isinstance(prefix, str) else prefix.key
    return key == own or key.startswith(own + ".")
