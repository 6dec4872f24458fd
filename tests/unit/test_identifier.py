"""The identifier grammar: examples, error messages, and properties over generated input."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resolver.errors import InvalidIdentifier
from resolver.identifier import (
    MAX_IDENTIFIER_BYTES,
    MAX_PREFIX_BYTES,
    Prefix,
    parse_identifier,
    parse_prefix,
    shown,
)

SEGMENT_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
segments = st.text(alphabet=SEGMENT_CHARS, min_size=1, max_size=8)
prefixes = st.lists(segments, min_size=1, max_size=5).map(".".join).filter(lambda p: len(p) <= MAX_PREFIX_BYTES)
suffix_chars = st.characters(blacklist_categories=("Cc", "Cs"))
suffixes = st.text(alphabet=suffix_chars, min_size=1, max_size=60)


@pytest.mark.parametrize(
    "text",
    [
        "88.100.1/SN-000123",
        "88.118.8/JXDY2106023",
        "88.101.0042/001",
        "88.608.8889/87654321",
        "88/ADMIN",
        "88.100.1/class.model.20261128.0001",
        "88.100.1/a/b/c",
        "88.100.1/产品-001",
        "88.100.1/with space",
    ],
)
def test_real_identifiers_parse(text: str) -> None:
    ident = parse_identifier(text)
    assert str(ident) == text
    assert ident.key == ident.prefix.key + "/" + text.split("/", 1)[1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "identifier is empty"),
        ("88.100.1", "has no '/'"),
        ("88.100.1/", "empty suffix"),
        ("/SN-1", "prefix is empty"),
        ("88..1/SN", "empty segment at position 2"),
        ("88.1 0/SN", "segment '1 0'"),
        ("88.100.1/SN\x00", "control character U+0000 at position 3"),
        ("88.100.1/a\nb", "control character U+000A"),
        ("88.100.1/a\x85", "control character U+0085"),
        ("88/" + "x" * 253, f"limit is {MAX_IDENTIFIER_BYTES}"),
        ("8" * 65 + "/x", f"limit is {MAX_PREFIX_BYTES}"),
        ("88.100.1/\ud800", "lone surrogate"),
    ],
)
def test_malformed_identifiers_are_rejected_with_a_message_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidIdentifier, match=re.escape(message)):
        parse_identifier(text)


def test_multibyte_suffix_counts_bytes_not_characters() -> None:
    parse_identifier("88/" + "产" * 84)  # 3 + 252 bytes = 255
    with pytest.raises(InvalidIdentifier, match="256 bytes"):
        parse_identifier("88/" + "产" * 84 + "x")


def test_prefix_is_case_insensitive_and_keeps_its_display_form() -> None:
    a, b = parse_identifier("88.100.Ab/X"), parse_identifier("88.100.aB/X")
    assert a == b and hash(a) == hash(b)
    assert a.key == "88.100.AB/X"
    assert str(a) == "88.100.Ab/X" and str(b) == "88.100.aB/X"


def test_suffix_is_case_sensitive() -> None:
    assert parse_identifier("88.1/abc") != parse_identifier("88.1/ABC")


def test_prefix_hierarchy() -> None:
    p = parse_prefix("88.100.1")
    assert [str(a) for a in p.ancestors()] == ["88.100.1", "88.100", "88"]
    assert p.is_within(parse_prefix("88.100")) and p.is_within(p)
    assert not parse_prefix("88.1000").is_within(parse_prefix("88.100"))
    assert parse_prefix("88").parent is None


@given(prefixes, suffixes)
def test_every_grammatical_identifier_round_trips(prefix: str, suffix: str) -> None:
    text = f"{prefix}/{suffix}"
    if len(text.encode()) > MAX_IDENTIFIER_BYTES:
        with pytest.raises(InvalidIdentifier):
            parse_identifier(text)
        return
    ident = parse_identifier(text)
    assert str(ident) == text
    assert ident.suffix == suffix
    assert ident.prefix.key == prefix.upper()
    assert parse_identifier(ident.key) == ident


@given(prefixes, suffixes)
def test_normalisation_is_idempotent_and_case_folds_only_the_prefix(prefix: str, suffix: str) -> None:
    text = f"{prefix}/{suffix}"
    if len(text.encode()) > MAX_IDENTIFIER_BYTES:
        return
    once = parse_identifier(text).key
    assert parse_identifier(once).key == once
    assert parse_identifier(f"{prefix.lower()}/{suffix}").key == once
    assert once.split("/", 1)[1] == suffix


@given(st.text(max_size=300))
def test_arbitrary_text_either_parses_or_raises_invalid_identifier(text: str) -> None:
    try:
        ident = parse_identifier(text)
    except InvalidIdentifier:
        return
    assert len(text.encode()) <= MAX_IDENTIFIER_BYTES
    assert "/" in text and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in ident.suffix)


@given(prefixes, suffixes, st.sampled_from(["\x00", "\x1f", "\x7f", "\x9f", "\t"]), st.integers(0, 60))
def test_a_control_character_anywhere_in_the_suffix_is_rejected(
    prefix: str, suffix: str, control: str, at: int
) -> None:
    at = min(at, len(suffix))
    with pytest.raises(InvalidIdentifier):
        parse_identifier(f"{prefix}/{suffix[:at]}{control}{suffix[at:]}")


def test_prefix_equality_ignores_display() -> None:
    assert Prefix("88.A", "88.a") == Prefix("88.A", "88.A")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("88.100.1/ADMIN", "88.100.1/ADMIN"),
        ("88.100.1/\u0410DMIN", "88.100.1/\\u0410DMIN"),  # Cyrillic A: a look-alike of ADMIN
        ("88.100.1/ADM\u0399N", "88.100.1/ADM\\u0399N"),  # Greek Iota
        ("88.100.1/A\\u0410", "88.100.1/A\\\\u0410"),  # a real backslash cannot pass for an escape
        ("88.1/\U0001f600\u200b", "88.1/\\U0001f600\\u200b"),  # beyond the BMP; a zero-width space
        ("a\nb\x7f", "a\\u000ab\\u007f"),
    ],
)
def test_shown_prints_identities_unambiguously(text: str, expected: str) -> None:
    assert shown(text) == expected
    assert shown(text).isascii() and shown(text).isprintable()


def test_no_two_texts_are_shown_alike() -> None:
    texts = ["88.1/A", "88.1/\u0410", "88.1/\\u0410", "88.1/\\\\u0410", "88.1/\\", "88.1/\\\\"]
    assert len({shown(t) for t in texts}) == len(texts)


@given(st.text())
def test_what_is_shown_reads_back_as_the_text(text: str) -> None:
    # Python's own escape syntax: reading it back gives the text, so no two texts show alike.
    assert shown(text).encode("ascii").decode("unicode_escape") == text
