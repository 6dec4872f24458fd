"""Identifiers and prefixes: the grammar, parsing and normalisation.

The grammar (ABNF, RFC 5234; also in README.md):

    identifier  = prefix "/" suffix              ; at most 255 bytes of UTF-8 in all
    prefix      = segment *( "." segment )       ; at most 64 bytes
    segment     = 1*( ALPHA / DIGIT / "-" / "_" )
    suffix      = 1*suffix-char                  ; case-sensitive, may itself contain "/"
    suffix-char = <any Unicode scalar value except the control characters
                   U+0000-U+001F and U+007F-U+009F>

The prefix is case-insensitive: it is compared and stored upper-cased (ASCII only, as the
national SDKs do), while the form the registrant used is kept for display. The suffix is
compared exactly. An identifier splits at its first "/", so a suffix may contain "/".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from resolver.errors import InvalidIdentifier

MAX_IDENTIFIER_BYTES = 255
MAX_PREFIX_BYTES = 64

_SEGMENT = r"[A-Za-z0-9_-]+"
_PREFIX_RE = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_SEGMENT_RE = re.compile(_SEGMENT)
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class Prefix:
    """A dot-separated prefix such as ``88.100.1``; equality ignores ASCII case."""

    key: str
    """Normalised (upper-cased) form: what prefixes are compared and stored by."""
    display: str
    """The form as written by whoever created it."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prefix) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return self.display

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.key.split("."))

    @property
    def parent(self) -> Prefix | None:
        """The prefix one segment up (``88.100`` for ``88.100.1``), or None at the top."""
        cut = self.key.rfind(".")
        if cut < 0:
            return None
        return Prefix(self.key[:cut], self.display[:cut])

    def ancestors(self) -> list[Prefix]:
        """This prefix and every prefix above it, longest first."""
        out: list[Prefix] = []
        current: Prefix | None = self
        while current is not None:
            out.append(current)
            current = current.parent
        return out

    def is_within(self, other: Prefix) -> bool:
        """True when ``other`` is this prefix or one of its ancestors (segment-wise)."""
        return self.key == other.key or self.key.startswith(other.key + ".")


@dataclass(frozen=True, slots=True)
class Identifier:
    """A parsed identifier ``prefix/suffix``; equality uses the normalised key."""

    prefix: Prefix
    suffix: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identifier) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return f"{self.prefix.display}/{self.suffix}"

    @property
    def key(self) -> str:
        """The normalised form (prefix upper-cased): the identity of the identifier."""
        return f"{self.prefix.key}/{self.suffix}"

    @property
    def display(self) -> str:
        return str(self)


def parse_prefix(text: str) -> Prefix:
    """Parses a prefix, raising InvalidIdentifier with a message naming the problem."""
    if not isinstance(text, str) or text == "":
        raise InvalidIdentifier("prefix is empty")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_PREFIX_BYTES:
        raise InvalidIdentifier(f"prefix is {size} bytes long; the limit is {MAX_PREFIX_BYTES}")
    if _PREFIX_RE.fullmatch(text) is None:
        for position, segment in enumerate(text.split(".")):
            if segment == "":
                raise InvalidIdentifier(f"prefix {text!r} has an empty segment at position {position + 1}")
            if _SEGMENT_RE.fullmatch(segment) is None:
                raise InvalidIdentifier(
                    f"prefix {text!r}: segment {segment!r} may only hold ASCII letters, digits, '-' and '_'"
                )
        raise InvalidIdentifier(f"prefix {text!r} is malformed")  # pragma: no cover - defensive
    return Prefix(text.upper(), text)


def parse_identifier(text: str) -> Identifier:
    """Parses ``prefix/suffix``, raising InvalidIdentifier with a message naming the problem."""
    if not isinstance(text, str) or text == "":
        raise InvalidIdentifier("identifier is empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidIdentifier("identifier is not valid Unicode (lone surrogate)") from exc
    if size > MAX_IDENTIFIER_BYTES:
        raise InvalidIdentifier(f"identifier is {size} bytes long; the limit is {MAX_IDENTIFIER_BYTES}")
    slash = text.find("/")
    if slash < 0:
        raise InvalidIdentifier(f"identifier {text!r} has no '/' between prefix and suffix")
    prefix_text, suffix = text[:slash], text[slash + 1 :]
    if suffix == "":
        raise InvalidIdentifier(f"identifier {text!r} has an empty suffix")
    control = _CONTROL_RE.search(suffix)
    if control is not None:
        raise InvalidIdentifier(
            f"identifier suffix contains control character U+{ord(control.group()):04X} "
            f"at position {control.start() + 1}"
        )
    return Identifier(parse_prefix(prefix_text), suffix)


def grammatical_identifier(text: str, cut: int, prefixes: dict[str, Prefix]) -> Identifier:
    """The identifier ``text``, already found grammatical (by the compiled wire fast path,
    ``resolver.cache.created_records``), whose prefix ends at ``cut``; prefixes are shared
    through ``prefixes`` (a batch names a few prefixes thousands of times)."""
    prefix_text = text[:cut]
    prefix = prefixes.get(prefix_text)
    if prefix is None:
        prefix = prefixes[prefix_text] = Prefix(prefix_text.upper(), prefix_text)
    return Identifier(prefix, text[cut + 1 :])


def shown(text: str) -> str:
    """``text`` as printable ASCII that shows it unambiguously: a backslash is doubled and every
    character outside printable ASCII is escaped (``\\u0410`` for the Cyrillic A,
    ``\\U0001f600``, ``\\u000a``), so a look-alike identity (``88.100.1/\\u0410DMIN``) never
    prints like the real one (``88.100.1/ADMIN``) and no two texts show alike. For identities in
    the audit trail and in the CLI's output."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def normalise_identifier(text: str) -> str:
    """The normalised key of an identifier given as text (validating it)."""
    return parse_identifier(text).key
