"""Identifiers, well-formed and not, for the tests that hold the fast path to the slow path.

The fast path (``LookupCache.answer_one``/``answer_batch``) must answer nothing the slow path
(decode, ``parse_identifier``, authority) refuses. The dangerous inputs are those *under* a
prefix the cache holds an answer for, so the strategy glues arbitrary tails to such prefixes.
Everything is UTF-8 bytes, because a request on the wire may carry invalid UTF-8.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from resolver.errors import InvalidIdentifier
from resolver.identifier import Identifier, parse_identifier
from resolver.wire import resolution_pb2, varint


def parsed(raw: bytes) -> Identifier | None:
    """What the slow path makes of ``raw``: the identifier, or None when it is refused."""
    try:
        return parse_identifier(raw.decode("utf-8"))
    except (UnicodeDecodeError, InvalidIdentifier):
        return None


def one(identifier: str, **extra: Any) -> bytes:
    """A serialised ResolveRequest (``extra``: its other fields)."""
    return resolution_pb2.ResolveRequest(identifier=identifier, **extra).SerializeToString()


def batch(*identifiers: str, **extra: Any) -> bytes:
    """A serialised ResolveBatchRequest, one ResolveRequest per identifier."""
    return resolution_pb2.ResolveBatchRequest(
        requests=[resolution_pb2.ResolveRequest(identifier=i, **extra) for i in identifiers]
    ).SerializeToString()


def resolve_request(raw: bytes) -> bytes:
    """A ResolveRequest carrying ``raw`` as its identifier, even when it is not UTF-8."""
    return b"\x0a" + varint(len(raw)) + raw


def batch_request(*raws: bytes) -> bytes:
    """A ResolveBatchRequest of one ResolveRequest per identifier, valid UTF-8 or not."""
    return b"".join(b"\x0a" + varint(len(r)) + r for r in map(resolve_request, raws))


def malformed_under(prefix: str) -> list[bytes]:
    """Identifiers under ``prefix`` (a delegated prefix of at most 8 bytes) that break the grammar."""
    p = prefix.encode()
    return [
        p,  # no "/": exactly the key a referral is cached under
        p + b"/",  # empty suffix
        p + b".1/",
        p + b"/a\x00b",  # NUL
        p + b"/\x01",
        p + b"/SN\x1f",
        p + b"/SN\x7f",  # DEL
        p + "/SN\x80".encode(),  # C1 controls, U+0080-U+009F
        p + "/SN\x85".encode(),
        p + "/SN\x9f".encode(),
        p + b"/SN\xff",  # invalid UTF-8: a byte that never occurs
        p + b"/SN\xc3",  # truncated sequence
        p + b"/SN\xc0\xaf",  # overlong "/"
        p + b"/SN\xed\xa0\x80",  # UTF-16 surrogate
        p + b"/SN\xf4\x90\x80\x80",  # past U+10FFFF
        p + b"..1/x",  # empty segment
        p + b"./x",  # trailing "."
        p + b".1./x",
        p + b".a b/x",  # not a segment character
        p + b".1:80/x",
        p + ".é/x".encode(),  # not ASCII
        p + b"." + b"A" * (64 - len(p)) + b"/x",  # prefix of 65 bytes
        p + b"/" + b"x" * (255 - len(p)),  # identifier of 256 bytes
    ]


def well_formed_under(prefix: str) -> list[bytes]:
    """Identifiers under ``prefix`` at the edges of the grammar, which must still be answered."""
    p = prefix.encode()
    return [
        p + b"/x",
        p.lower() + b"/x",
        p + b".a-b_C.9/x",
        p + b"." + b"A" * (63 - len(p)) + b"/x",  # prefix of 64 bytes
        p + b"/" + b"x" * (254 - len(p)),  # identifier of 255 bytes
        p + b"/a/b.c//",
        p + "/\xa0 ~ é 设备 \U0001f600 \U0010ffff \ufffd \uffff".encode(),
    ]


_tails = st.one_of(
    st.text(max_size=40).map(str.encode),  # arbitrary text, control characters included
    st.text(alphabet="aZ09-_./ \x00\x1f\x7f\x80\x9f\xa0é设\U0010ffff", max_size=40).map(str.encode),
    st.binary(max_size=40),  # invalid UTF-8 too
    st.builds(bytes.__mul__, st.sampled_from([b"x", b"A", b".A", "é".encode()]), st.integers(0, 260)),  # long
)


def identifiers_near(*anchors: str) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, mostly starting with one of ``anchors`` (prefixes or identifiers the
    cache holds answers for) or a neighbour of one."""
    starts = st.sampled_from([b"", *(a.encode() for a in anchors), *(a.lower().encode() + b"." for a in anchors)])
    return st.builds(bytes.__add__, starts, _tails)
