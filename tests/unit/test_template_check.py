"""The write side's template fast path (``TemplateCheck``, ``template_reference``), compiled and
pure Python alike: a record it passes is one the Python check finds no fault in, whatever its
values; and the compiled one passes the usual good records (else it would save nothing)."""

from __future__ import annotations

import random
from types import ModuleType

import pytest

from bench.templates import AUTOMOTIVE_PART, FOOD_TRACE
from resolver.cache import IMPLEMENTATIONS
from resolver.identifier import parse_identifier
from resolver.record import Permission, Record, Value
from resolver.template import REFERENCE_TYPE, Industry, Item, Template, check, exposed
from resolver.wire import encode_stamped

PRIVATE = Permission.ADMIN_READ | Permission.ADMIN_WRITE

EVERYTHING = Template(
    AUTOMOTIVE_PART.prefix,
    "everything",
    1,
    Industry("C"),
    (
        Item("text", "string", required=True, min_length=2, max_length=5),
        Item("count", "integer", minimum=-10, maximum=1000),
        Item("ratio", "number", minimum=0.5, maximum=2.5),
        Item("free", "number"),
        Item("day", "date", format="YYYY-MM-DD"),
        Item("compact", "date", format="YYYYMMDD"),
        Item("at", "datetime", format="YYYY-MM-DD HH:mm:ss"),
        Item("iso", "datetime", format="YYYY-MM-DDTHH:mm:ss"),
        Item("kind", "enum", values=("a", "bé", "c")),
        Item("link", "url"),
        Item("mail", "email"),
        Item("secret", "string", readers=("88.100/QA",)),
    ),
)

GOOD = {
    "text": "abc",
    "count": "12",
    "ratio": "1.5",
    "free": "-3e5",
    "day": "2024-02-29",
    "compact": "20240229",
    "at": "2026-11-30 23:59:59",
    "iso": "2026-11-30T00:00:00",
    "kind": "bé",
    "link": "https://example.com/x?y=1",
    "mail": "ops@example.com",
}

EDGES = {
    "text": [
        "a",
        "abcde",
        "abcdef",
        "é中",
        "中文字符串",
        "\x00\x01",
        "ab\udcff",
    ],
    "count": [
        "0",
        "+5",
        "-10",
        "-11",
        "1000",
        "1001",
        "١٢",
        "1.0",
        "",
        " 1",
        "0" * 31,
        "9" * 30,
    ],
    "ratio": [
        "0.5",
        ".5",
        "5.",
        "2.5",
        "2.50001",
        "1e0",
        "1E-1",
        "1e",
        ".",
        "+.5e+0",
        "nan",
        "inf",
        "1_0",
    ],
    "free": [
        "1" * 70,
        "-0",
        "1e400",
        "-1e400",
        "0x10",
        "1,5",
    ],
    "day": [
        "2023-02-29",
        "2026-13-01",
        "2026-00-10",
        "2026-04-31",
        "0000-01-01",
        "9999-12-31",
        "2026-1-5",
        "2026/11/30",
    ],
    "compact": [
        "20261130",
        "2026-11-30",
        "20260230",
    ],
    "at": [
        "2026-11-30 24:00:00",
        "2026-11-30 12:60:00",
        "2026-11-30 12:00:60",
        "2026-11-30T12:00:00",
        "2026-11-30 1:00:00",
    ],
    "iso": [
        "2026-11-30 12:00:00",
        "2026-02-30T12:00:00",
    ],
    "kind": [
        "a",
        "b",
        "c ",
        "BÉ",
    ],
    "link": [
        "http://a",
        "h://x",
        "1http://x",
        "ftp:/x",
        "https://",
        "https://exa mple.com",
        "a" * 17 + "://x",
        "a" * 16 + "://x",
        "https://例子.cn",
        "mailto:x",
    ],
    "mail": [
        "a@b.c",
        "@b.c",
        "a@b",
        "a@.c",
        "a@b.",
        "a@@b.c",
        "a b@c.d",
        "x" * 65 + "@b.c",
        "a@" + "b" * 256 + ".c",
        "a@b." + "c" * 64,
        "a@b.c.d",
        "é@b.c",
    ],
}


def wire(template: Template, values: list[Value]) -> bytes:
    named = Value(900, REFERENCE_TYPE, str(template.identifier).encode())
    return encode_stamped(Record(parse_identifier("88.100.1/X"), (*values, named), 1), 1_800_000_000)


def values_of(fields: dict[str, str], private: tuple[str, ...] = ("secret",)) -> list[Value]:
    out = []
    for n, (name, text) in enumerate(fields.items()):
        data = text.encode("utf-8", "surrogatepass")
        out.append(Value(n + 1, name, data, permissions=PRIVATE if name in private else Permission(0xE)))
    return out


def faults(template: Template, values: list[Value]) -> list[tuple[str, str]]:
    return check(template, values) + exposed(template, values)


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return IMPLEMENTATIONS[request.param]


def test_good_records_fit_and_every_edge_agrees_with_the_python_check(impl: ModuleType) -> None:
    check_of = impl.TemplateCheck(EVERYTHING)
    good = values_of(GOOD)
    assert faults(EVERYTHING, good) == []
    # Only the forms the compiled check leaves to Python make it unsure: YYYYMMDD here, so the
    # edges are tried without it (else no record would fit, whatever the check said of the edge).
    base = {k: v for k, v in GOOD.items() if k != "compact"}
    assert check_of.fits(wire(EVERYTHING, values_of(base)))
    fitting = 0
    for name, texts in EDGES.items():
        for text in texts:
            values = values_of({**base, name: text})
            fits = check_of.fits(wire(EVERYTHING, values))
            assert not fits or faults(EVERYTHING, values) == [], (name, text)
            fitting += fits
    assert fitting >= 20  # most edges that are good (30 of them): passed, not left to Python


def test_structure_missing_twice_and_restricted_items(impl: ModuleType) -> None:
    check_of = impl.TemplateCheck(AUTOMOTIVE_PART)
    part = {
        "partNumber": "BRK-00001",
        "partName": "Brake disc, front",
        "material": "steel",
        "weightKg": "7.25",
        "productionDate": "2026-11-30",
        "manufacturer": "湖北零件有限公司",
        "datasheet": "https://example.com/brk.pdf",
    }
    assert check_of.fits(wire(AUTOMOTIVE_PART, values_of(part)))
    assert not check_of.fits(wire(AUTOMOTIVE_PART, values_of({k: v for k, v in part.items() if k != "partName"})))
    twice = [*values_of(part), Value(50, "material", b"steel")]
    assert not check_of.fits(wire(AUTOMOTIVE_PART, twice)) and faults(AUTOMOTIVE_PART, twice)
    public_secret = values_of({**GOOD, "secret": "x"}, private=())
    assert not impl.TemplateCheck(EVERYTHING).fits(wire(EVERYTHING, public_secret))
    assert faults(EVERYTHING, public_secret) and not faults(EVERYTHING, values_of({**GOOD, "secret": "x"}))
    assert not check_of.fits(b"\xff\xff") and not check_of.fits(b"")


def test_random_records_never_fit_where_the_python_check_finds_a_fault(impl: ModuleType) -> None:
    rng = random.Random(16)
    alphabet = ["0", "1", "9", "-", "+", ".", "e", "a", "@", ":", "/", " ", "é", "中", "T", "Z", "_"]
    for template in (EVERYTHING, FOOD_TRACE, AUTOMOTIVE_PART):
        check_of = impl.TemplateCheck(template)
        names = [item.name for item in template.items]
        for _ in range(3000):
            fields = {}
            for name in rng.sample(names, rng.randint(0, len(names))):
                base = GOOD.get(name, "x")
                chars = list(base)
                for _ in range(rng.randint(0, 3)):
                    at = rng.randint(0, len(chars))
                    chars[at : at + rng.randint(0, 1)] = [rng.choice(alphabet)]
                fields[name] = "".join(chars)
            values = values_of(fields, private=tuple(n for n in names if rng.random() < 0.5))
            if check_of.fits(wire(template, values)):
                assert faults(template, values) == [], fields


def test_the_template_a_record_names(impl: ModuleType) -> None:
    one = wire(AUTOMOTIVE_PART, [Value(1, "partNumber", b"X")])
    assert impl.template_reference(one) == str(AUTOMOTIVE_PART.identifier).encode()
    plain = encode_stamped(Record(parse_identifier("88.100.1/X"), (Value(1, "URL", b"x"),), 1), 1)
    assert impl.template_reference(plain) is None
    two = wire(AUTOMOTIVE_PART, [Value(1, REFERENCE_TYPE, b"88.100/TEMPLATE.other.v1")])
    assert impl.template_reference(two) is None  # several: the Python path says why
    assert impl.template_reference(b"\x12\x05junk!") is None


def test_what_a_double_cannot_hold_or_a_name_that_does_not_encode_is_left_to_python(impl: ModuleType) -> None:
    exact = Template(AUTOMOTIVE_PART.prefix, "big", 1, Industry("C"), (Item("n", "integer", minimum=9007199254740993),))
    below = [Value(1, "n", b"9007199254740992")]
    assert faults(exact, below) and not impl.TemplateCheck(exact).fits(wire(exact, below))
    assert impl.TemplateCheck(exact).fits(wire(exact, [Value(1, "n", b"9007199254740994")])) in (True, False)
    odd = Template(AUTOMOTIVE_PART.prefix, "odd", 1, Industry("C"), (Item("a\ud800", "string", required=True),))
    assert not impl.TemplateCheck(odd).fits(wire(odd, [Value(1, "x", b"y")]))  # built, and never sure
