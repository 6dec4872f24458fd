"""The Handle protocol codec (resolver/handle_protocol.py) and the compiled fast path
(``LookupCache.handle_answer``, both implementations) held to HANDLE-INTEROP.md part B: its worked
example byte for byte (B.8), the spec's own decoder (tests/handle_spec.py) both ways, UDP chunks
(B.1), and hostile bytes, which may raise nothing but ProtocolError.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import struct
import tracemalloc
from types import ModuleType
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from resolver import handle_protocol as hp
from resolver.cache import IMPLEMENTATIONS
from resolver.identifier import parse_identifier
from resolver.record import AdminPermission, Permission, Reference, TtlType, Value, admin_value, grant_of
from tests import handle_spec as spec


def hexbytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# B.8, copied from the spec.
B8_REQUEST = hexbytes("""
020b020b 00000000 00003039 00000000 00000038
00000001 00000000 19000000 ffff 00 00 6b0c13c0 0000001c
00000010 38382e3130302e312f534e2d30303031 00000000 00000000
00000000
""")
B8_RESPONSE = hexbytes("""
020b020b 00000000 00003039 00000000 0000006b
00000001 00000001 99000000 0001 00 00 6b0c13c0 0000004f
00000010 38382e3130302e312f534e2d30303031 00000001
00000001 6b0a1980 00 00015180 0e 00000003 55524c
0000001a 68747470733a2f2f66312e6578616d706c652e636f6d2f702f31 00000000
00000000
""")
B8_NOT_FOUND = hexbytes("""
020b020b 00000000 00003039 00000000 00000020
00000001 00000064 99000000 0001 00 00 6b0c13c0 00000004
00000000
00000000
""")

HANDLE = b"88.100.1/SN-0001"
URL = Value(1, "URL", b"https://f1.example.com/p/1", 86400, TtlType.RELATIVE, 1795824000, Permission(0x0E))
NOW = 1795953600 - 43200
"""The wall clock of the example: its expiration is now + 43200."""
SERIAL = 1
NOT_FOUND_ENTRY = hp.int4(100) + hp.int4(0)


def python_answer(data: bytes, rc: int, body: bytes) -> bytes:
    """What the Python path writes for ``data`` (``resolver.handle_protocol.respond``)."""
    return hp.respond(hp.decode_message(data), rc, body, SERIAL, NOW)


# --- B.8: the worked example -------------------------------------------------------------------


def test_the_spec_decoder_reads_the_worked_example_as_the_spec_tables_say() -> None:
    # The decoder the other tests trust, checked against the spec's own byte tables.
    assert len(B8_REQUEST) == 76 and len(B8_RESPONSE) == 127 and len(B8_NOT_FOUND) == 52
    assert spec.request(HANDLE, request_id=12345) == B8_REQUEST
    request = spec.decode(B8_REQUEST)
    assert (request.version, request.suggested) == ((2, 11), (2, 11))
    assert (request.session_id, request.request_id, request.message_id, request.message_length) == (0, 12345, 0, 56)
    assert (request.opcode, request.rc, request.flags, request.serial, request.expiration) == (
        1, 0, 0x19000000, 0xFFFF, 1795953600,
    )  # fmt: skip
    assert spec.decode_request(request.body) == spec.ResolutionRequest(HANDLE, (), ())
    response = spec.decode(B8_RESPONSE)
    assert (response.rc, response.flags, response.serial, response.message_length) == (1, 0x99000000, 1, 107)
    assert spec.decode_response(response) == spec.Response(
        1, handle=HANDLE, values=(spec.Value(1, b"URL", URL.data, 86400, 0, 1795824000, 0x0E),)
    )
    missing = spec.decode(B8_NOT_FOUND)
    assert spec.decode_response(missing) == spec.Response(100, message=b"")


def test_our_decoder_reads_the_worked_request() -> None:
    message = hp.decode_message(B8_REQUEST)
    envelope, header = message.envelope, message.header
    assert (envelope.major, envelope.minor, envelope.flags, envelope.suggested) == (2, 11, 0, (2, 11))
    assert (envelope.session_id, envelope.request_id, envelope.message_id, envelope.message_length) == (0, 12345, 0, 56)
    assert (header.opcode, header.rc, header.flags, header.site_serial) == (1, 0, 0x19000000, 0xFFFF)
    assert (header.recursion, header.expiration, header.body_length) == (0, 1795953600, 28)
    assert message.credential == b""
    assert message.signed_part == B8_REQUEST[20:72]
    assert hp.decode_resolution_request(message.body) == hp.ResolutionRequest(HANDLE, (), ())


def test_respond_writes_the_worked_responses_byte_for_byte() -> None:
    assert python_answer(B8_REQUEST, hp.RC.SUCCESS, hp.blob(HANDLE) + hp.values_section([URL])) == B8_RESPONSE
    assert python_answer(B8_REQUEST, hp.RC.HANDLE_NOT_FOUND, hp.error_body("")) == B8_NOT_FOUND


# --- the fast path: LookupCache.handle_answer, both implementations --------------------------


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = IMPLEMENTATIONS[request.param]
    return module


def cache_with(impl: ModuleType, entries: dict[bytes, bytes], negative: bool = False) -> Any:
    cache = impl.LookupCache()
    for key, value in entries.items():
        assert cache.set(key, value, 3600, negative)
    return cache


def fast(cache: Any, data: bytes) -> bytes | None:
    answer: bytes | None = cache.handle_answer(data, NOW, SERIAL)
    return answer


def test_the_cache_answers_the_worked_example(impl: ModuleType) -> None:
    positive = cache_with(impl, {HANDLE: hp.values_section([URL])})
    assert fast(positive, B8_REQUEST) == B8_RESPONSE
    negative = cache_with(impl, {HANDLE: NOT_FOUND_ENTRY}, negative=True)
    assert fast(negative, B8_REQUEST) == B8_NOT_FOUND


def with_length(data: bytes, length: int) -> bytes:
    return data[:16] + struct.pack(">I", length) + data[20:]


LEFT_TO_PYTHON: dict[str, bytes] = {
    "index filter": spec.request(HANDLE, indexes=(1,)),
    "type filter": spec.request(HANDLE, types=(b"URL",)),
    "both filters": spec.request(HANDLE, indexes=(1,), types=(b"URL",)),
    "RD": spec.request(HANDLE, flags=spec.HSJ_FLAGS | spec.RD),
    "ENC": spec.request(HANDLE, flags=spec.HSJ_FLAGS | spec.ENC),
    "TC": spec.request(HANDLE, envelope_flags=spec.TC),
    "CP": spec.request(HANDLE, envelope_flags=spec.CP),
    "EC": spec.request(HANDLE, envelope_flags=spec.EC),
    "message id 1": spec.request(HANDLE, message_id=1),
    "message length + 1": with_length(B8_REQUEST, 57),
    "message length - 1": with_length(B8_REQUEST, 55),
    "a byte after the message": B8_REQUEST + b"\0",
    "cut short": B8_REQUEST[:-1],
    "opcode 0": spec.request(HANDLE, opcode=0),
    "opcode 2": spec.request(HANDLE, opcode=2),
    "opcode 7": spec.request(HANDLE, opcode=7),
    "a response (rc 1)": spec.request(HANDLE, rc=1),
    "rc 100": spec.request(HANDLE, rc=100),
    "version 2.0": spec.request(HANDLE, version=(2, 0), suggested=None),
    "suggesting 2.0": spec.request(HANDLE, version=(2, 11), suggested=(2, 0)),
    "version 1.11": spec.request(HANDLE, version=(1, 11), suggested=None),
    "slashless": spec.request(b"88.100.1"),
    "empty suffix": spec.request(b"88.100.1/"),
    "control character": spec.request(b"88.100.1/a\x01b"),
    "C1 control": spec.request(b"88.100.1/a\xc2\x85b"),
    "invalid UTF-8": spec.request(b"88.100.1/\xff"),
    "empty prefix": spec.request(b"/SN-0001"),
    "bad prefix": spec.request(b"88..1/SN-0001"),
    "credential": spec.request(HANDLE, credential=bytes(8)),
    "body length + 1": B8_REQUEST[:40] + struct.pack(">I", 29) + B8_REQUEST[44:],
}


ODD_HANDLES = {
    "slashless", "empty suffix", "control character", "C1 control", "invalid UTF-8", "empty prefix", "bad prefix",
}  # fmt: skip
"""The cases above whose handle is not HANDLE."""


@pytest.mark.parametrize("case", sorted(LEFT_TO_PYTHON))
def test_the_cache_leaves_everything_else_to_the_python_path(impl: ModuleType, case: str) -> None:
    data = LEFT_TO_PYTHON[case]
    handle = spec.decode_request(spec.decode(data).body).handle if case in ODD_HANDLES else HANDLE
    # Entries under every key a careless lookup could use, so a None means "refused", not "missed".
    keys = {HANDLE, handle, handle.upper(), b"0.NA/" + handle}
    cache = cache_with(impl, {k: hp.values_section([URL]) for k in keys})
    assert fast(cache, B8_REQUEST) == B8_RESPONSE  # the entry is there
    assert fast(cache, data) is None, case


def test_the_handle_is_echoed_as_written_and_only_the_prefix_folds_case(impl: ModuleType) -> None:
    section = hp.values_section([URL])
    cache = cache_with(impl, {b"88.AB1/SN-1": section})
    for written in (b"88.ab1/SN-1", b"88.Ab1/SN-1", b"88.AB1/SN-1"):
        data = spec.request(written, request_id=7)
        answer = fast(cache, data)
        assert answer is not None, written
        decoded = spec.Answer(answer).response
        assert decoded.rc == 1 and decoded.handle == written
        assert answer == python_answer(data, 1, hp.blob(written) + section)
    assert fast(cache, spec.request(b"88.AB1/sn-1")) is None  # the suffix is case-sensitive


@pytest.mark.parametrize("request_id", [1, 12345, 0x7FFFFFFF, 0x80000001, 0xFFFFFFFF])
def test_ids_and_recursion_count_are_copied(impl: ModuleType, request_id: int) -> None:
    cache = cache_with(impl, {HANDLE: hp.values_section([URL])})
    data = spec.request(HANDLE, request_id=request_id, session_id=0x0A0B0C0D, recursion=7)
    answer = fast(cache, data)
    assert answer is not None
    message = spec.decode(answer)
    assert (message.request_id, message.session_id, message.recursion) == (request_id, 0x0A0B0C0D, 7)
    assert (message.message_id, message.serial, message.expiration) == (0, SERIAL, NOW + 43200)
    assert answer == python_answer(data, 1, hp.blob(HANDLE) + hp.values_section([URL]))


@pytest.mark.parametrize(
    ("version", "suggested", "expected"),
    [
        ((2, 3), (2, 5), (2, 5)),
        ((2, 3), (3, 0), (2, 11)),
        ((2, 3), (2, 11), (2, 11)),
        ((2, 3), (2, 12), (2, 11)),
        ((2, 3), (2, 1), (2, 1)),
        ((2, 7), None, (2, 7)),
        ((2, 11), None, (2, 11)),
    ],
)
def test_the_response_version_is_the_suggested_one_capped_at_2_11(
    impl: ModuleType, version: tuple[int, int], suggested: tuple[int, int] | None, expected: tuple[int, int]
) -> None:
    for entry, negative, rc in ((hp.values_section([URL]), False, 1), (NOT_FOUND_ENTRY, True, 100)):
        cache = cache_with(impl, {HANDLE: entry}, negative)
        data = spec.request(HANDLE, version=version, suggested=suggested)
        answer = fast(cache, data)
        assert answer is not None
        message = spec.decode(answer)
        assert (message.version, message.suggested, message.rc) == (expected, (2, 11), rc)
        body = hp.blob(HANDLE) + entry if rc == 1 else entry[4:]
        assert answer == python_answer(data, rc, body)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (0, spec.AT | spec.REC),
        (spec.HSJ_FLAGS, 0x99000000),
        (0xFFFFFFFF & ~(spec.ENC | spec.RD), spec.AT | spec.CT | spec.REC | spec.CA | spec.PO | spec.DNRF),
    ],
)
def test_response_flags_echo_what_b4_says_plus_at_and_rec(impl: ModuleType, flags: int, expected: int) -> None:
    cache = cache_with(impl, {HANDLE: hp.values_section([URL])})
    data = spec.request(HANDLE, flags=flags)
    answer = fast(cache, data)
    assert answer is not None and spec.decode(answer).flags == expected
    assert answer == python_answer(data, 1, hp.blob(HANDLE) + hp.values_section([URL]))


# --- our codec and the spec's decoder, both ways ---------------------------------------------

ADMIN = admin_value(100, "88.100.1/ADMIN", 300, AdminPermission(0xFFF) & ~AdminPermission.LIST_HDLS)
VALUES = [
    URL,
    Value(2, "EMAIL", b"ops@f1.example.com", 600, TtlType.ABSOLUTE, 1795000000, Permission(0x0C)),
    Value(3, "BLOB", bytes(range(256)), 0, TtlType.RELATIVE, 0, Permission(0x0F), (Reference("88.100.1/X", 4),)),
    Value(4, "名前", "値".encode(), 30, references=(Reference("88/A", 1), Reference("88.100/B", 0))),
    ADMIN,
]


def as_spec(v: Value) -> spec.Value:
    data = spec.admin_data(0xFFF & ~0x800, b"88.100.1/ADMIN", 300) if v.type == "HS_ADMIN" else v.data
    refs = tuple((r.identifier.encode(), r.index) for r in v.references)
    return spec.Value(v.index, v.type.encode(), data, v.ttl, int(v.ttl_type), v.timestamp, int(v.permissions), refs)


SITE = hp.HandleSite(
    (
        hp.SiteServer(1, "127.0.0.1", (hp.Interface(2, hp.PROTOCOL_UDP, 2641), hp.Interface(3, hp.PROTOCOL_TCP, 2641))),
        hp.SiteServer(7, "2001:db8::1", (hp.Interface(2, hp.PROTOCOL_HTTPS, 8000),), b"\x01key"),
    ),
    serial=5,
    attributes=(("desc", "IDIS enterprise node"),),
)
SPEC_SITE = spec.Site(
    1, (2, 11), 5, 0x80, 0, b"", ((b"desc", b"IDIS enterprise node"),),
    (
        spec.Server(1, bytes(12) + b"\x7f\0\0\x01", b"", (spec.Interface(2, 0, 2641), spec.Interface(3, 1, 2641))),
        spec.Server(7, bytes.fromhex("20010db8000000000000000000000001"), b"\x01key", (spec.Interface(2, 3, 8000),)),
    ),
)  # fmt: skip


def test_the_spec_decodes_our_values_including_hs_admin_in_binary() -> None:
    answer = spec.Answer(python_answer(B8_REQUEST, 1, hp.blob(HANDLE) + hp.values_section(VALUES)))
    assert answer.response.handle == HANDLE
    assert answer.response.values == tuple(as_spec(v) for v in VALUES)
    assert spec.decode_admin(answer.response.values[-1].data) == (0x7FF, b"88.100.1/ADMIN", 300)


def test_the_spec_decodes_our_site() -> None:
    assert spec.decode_site(hp.encode_site(SITE)) == SPEC_SITE
    info = spec.request(body=b"", opcode=2)
    assert spec.Answer(python_answer(info, 1, hp.encode_site(SITE))).response.site == SPEC_SITE


def test_the_spec_decodes_our_referrals() -> None:
    site_value = Value(1, hp.SITE_PREFIX_TYPE, hp.encode_site(SITE), 3600, permissions=Permission(0x0E))
    prefix = spec.request(b"0.NA/88.100.1.7")
    referral = spec.Answer(python_answer(prefix, 303, hp.blob(b"") + hp.values_section([site_value]))).response
    assert (referral.rc, referral.handle, len(referral.values)) == (303, b"", 1)
    assert referral.values[0].type == b"HS_SITE.PREFIX"
    assert spec.decode_site(referral.values[0].data) == SPEC_SITE
    service = spec.Answer(python_answer(prefix, 302, hp.blob(b"0.NA/88.100"))).response
    assert (service.rc, service.handle, service.values) == (302, b"0.NA/88.100", ())


@pytest.mark.parametrize(
    ("suggested", "code", "algorithm"), [((2, 11), 3, "sha256"), ((2, 7), 3, "sha256"), ((2, 5), 2, "sha1")]
)
def test_the_request_digest_is_over_the_request_header_and_body(
    suggested: tuple[int, int], code: int, algorithm: str
) -> None:
    data = spec.request(HANDLE, flags=spec.HSJ_FLAGS | spec.RD, suggested=suggested, credential=b"")
    answer = spec.Answer(python_answer(data, 1, hp.blob(HANDLE) + hp.values_section([URL])))
    expected = bytes([code]) + hashlib.new(algorithm, data[20:72]).digest()
    assert answer.message.flags & spec.RD and answer.response.digest == expected
    assert answer.response.values == (as_spec(URL),)


def test_our_decoder_reads_spec_requests() -> None:
    data = spec.request(
        "88.100.1/ü", indexes=(1, 0xFFFFFFFF), types=(b"URL", b"HS_SITE."), request_id=99, session_id=3,
        flags=spec.REC | spec.DNRF, version=(2, 3), suggested=(2, 10), serial=4, recursion=2, expiration=77,
    )  # fmt: skip
    message = hp.decode_message(data)
    assert message.envelope.version == (2, 3) and message.envelope.suggested == (2, 10)
    assert (message.envelope.request_id, message.envelope.session_id) == (99, 3)
    header = message.header
    assert (header.flags, header.site_serial, header.recursion, header.expiration) == (0x10100000, 4, 2, 77)
    request = hp.decode_resolution_request(message.body)
    assert request == hp.ResolutionRequest("88.100.1/ü".encode(), (1, -1), (b"URL", b"HS_SITE."))


def test_our_decoder_reads_spec_responses() -> None:
    spec_values = [as_spec(v) for v in VALUES]
    body = spec.blob(HANDLE) + spec.values_section(spec_values)
    decoded = hp.decode_response(hp.decode_message(spec.request(body=body, rc=1, flags=0x99000000)))
    assert (decoded.rc, decoded.handle, decoded.site_serial) == (1, HANDLE.decode(), 0xFFFF)
    assert list(decoded.values[:-1]) == VALUES[:-1]
    assert grant_of(decoded.values[-1]) == grant_of(ADMIN)
    site_value = spec.Value(1, b"HS_SITE.PREFIX", spec.site_data(SPEC_SITE))
    for tail in (spec.values_section([site_value]), b""):
        referral = hp.decode_response(hp.decode_message(spec.request(body=spec.blob(b"") + tail, rc=303)))
        assert referral.rc == 303 and referral.handle == ""
        assert hp.sites_of(referral.values) == ([SITE] if tail else [])
    error = hp.decode_response(
        hp.decode_message(spec.request(body=spec.blob(b"That prefix doesn't live here"), rc=301))
    )
    assert (error.rc, error.message) == (301, "That prefix doesn't live here")
    info = hp.decode_response(hp.decode_message(spec.request(body=spec.site_data(SPEC_SITE), opcode=2, rc=1)))
    assert hp.sites_of(info.values) == [SITE]


def test_a_digest_written_by_the_spec_is_read() -> None:
    digest = b"\x03" + bytes(range(32))
    body = digest + spec.blob(HANDLE) + spec.values_section([as_spec(URL)])
    decoded = hp.decode_response(hp.decode_message(spec.request(body=body, rc=1, flags=spec.AT | spec.RD)))
    assert decoded.digest == digest and decoded.values == (URL,)


# --- UDP: 492-byte chunks ----------------------------------------------------------------------


def message_of_length(length: int) -> bytes:
    """A response whose message (after the envelope) is ``length`` bytes: rc 2 with a long text."""
    data = python_answer(B8_REQUEST, hp.RC.ERROR, hp.error_body("x" * (length - 32)))
    assert len(data) == 20 + length
    return data


@pytest.mark.parametrize("length", [100, 492, 493, 2000])
def test_datagrams_are_the_spec_chunks(length: int) -> None:
    data = message_of_length(length)
    datagrams = hp.datagrams(data)
    count = 1 if length <= 492 else -(-length // 492)
    assert len(datagrams) == count and all(len(d) <= 512 for d in datagrams)
    assert datagrams == spec.split(data)
    if count == 1:
        assert datagrams == [data]
    for k, d in enumerate(datagrams if count > 1 else []):
        envelope = spec.ENVELOPE.unpack_from(d)
        assert d[2] & spec.TC and envelope[5] == 12345 and envelope[6] == k and envelope[7] == length
    shuffled = list(datagrams)
    random.Random(length).shuffle(shuffled)
    assert spec.reassemble(shuffled) == data
    reassembly = hp.Reassembly(hp.decode_envelope(shuffled[0]))
    results = [reassembly.add(d) for d in shuffled]
    assert results[-1] == data and results[:-1] == [None] * (count - 1)


CHUNKS = spec.split(message_of_length(2000))
"""5 chunks: 4 of 492 bytes, then 32."""


def renumbered(chunk: bytes, number: int) -> bytes:
    return chunk[:12] + struct.pack(">I", number) + chunk[16:]


BAD_CHUNKS = {  # name: (the chunk it stands for, the bad chunk)
    "chunk 5 of 5": (4, renumbered(CHUNKS[4], 5)),
    "chunk -1": (0, renumbered(CHUNKS[0], 0xFFFFFFFF)),
    "a short middle chunk": (1, CHUNKS[1][:-1]),
    "a long middle chunk": (1, CHUNKS[1] + b"x"),
    "a short last chunk": (4, CHUNKS[4][:-1]),
    "a long last chunk": (4, CHUNKS[4] + b"x"),
    "the last chunk numbered as a middle one": (4, renumbered(CHUNKS[4], 2)),
    "another request id": (1, CHUNKS[1][:8] + struct.pack(">I", 1) + CHUNKS[1][12:]),
    "another length": (1, with_length(CHUNKS[1], 2001)),
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
def test_reassembly_refuses_a_chunk_of_the_wrong_size_or_number(case: str) -> None:
    k, chunk = BAD_CHUNKS[case]
    with pytest.raises(hp.ProtocolError):
        hp.Reassembly(hp.decode_envelope(CHUNKS[0])).add(chunk)
    with pytest.raises(spec.SpecError):
        spec.reassemble([*CHUNKS[:k], chunk, *CHUNKS[k + 1 :]])


def test_reassembly_refuses_a_message_longer_than_the_limit() -> None:
    with pytest.raises(hp.ProtocolError):
        hp.Reassembly(hp.decode_envelope(with_length(CHUNKS[0], 262145)))


# --- hostile input ----------------------------------------------------------------------------


def decode_everything(data: bytes) -> None:
    """Every decoder a peer's bytes reach; ProtocolError is the only way out but success."""
    try:
        message = hp.decode_message(data)
    except hp.ProtocolError:
        return
    for step in (
        lambda: hp.decode_resolution_request(message.body),
        lambda: hp.decode_response(message),
        lambda: hp.decode_response(message, (2, 0)),
        lambda: hp.decode_response(message, (2, 5)),
        lambda: hp.decode_site(message.body),  # HS_SITE data comes from peers too
        lambda: hp.decode_admin(message.body),
    ):
        with contextlib.suppress(hp.ProtocolError):
            step()


def rewrite(data: bytes, offset: int, number: int) -> bytes:
    return data[:offset] + struct.pack(">I", number & 0xFFFFFFFF) + data[offset + 4 :]


INT4_FIELDS = [8, 12, 16, 20, 24, 28, 36, 40, 44, 64, 68, 72]
"""Offsets of the B.8 request's int4 fields (B.8's table)."""
HOSTILE_NUMBERS = [0, 1, -1, 0x7FFFFFFF, 0x80000000, 262144, 262145, 2048, 2049, 1 << 20]


@st.composite
def mutated(draw: st.DrawFn, seeds: tuple[bytes, ...]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "int4", "cut", "extend"]))
        if kind == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif kind == "int4" and len(data) >= 4:
            offset = draw(st.sampled_from([o for o in INT4_FIELDS if o + 4 <= len(data)] or [0]))
            number = draw(st.sampled_from(HOSTILE_NUMBERS) | st.integers(0, 0xFFFFFFFF))
            data = bytearray(rewrite(bytes(data), offset, number))
        elif kind == "cut":
            del data[draw(st.integers(0, len(data))) :]
        else:
            data += draw(st.binary(max_size=64))
    return bytes(data)


RD_RESPONSE = spec.request(body=b"\x03" + bytes(32) + B8_RESPONSE[44:123], rc=1, flags=0x99800000)
SEEDS = (B8_REQUEST, B8_RESPONSE, B8_NOT_FOUND, RD_RESPONSE, spec.request(HANDLE, indexes=(1, 2), types=(b"URL",)))


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=700))
def test_random_bytes_raise_nothing_but_protocol_error(data: bytes) -> None:
    decode_everything(data)
    decode_everything(B8_REQUEST[:20] + data)  # behind a plausible envelope
    decode_everything(with_length(B8_REQUEST[:20], len(data)) + data)  # and with the length right


@settings(max_examples=1500, deadline=None)
@given(mutated(SEEDS))
def test_mutated_messages_raise_nothing_but_protocol_error(data: bytes) -> None:
    decode_everything(data)
    if len(data) >= 20:
        decode_everything(with_length(data, len(data) - 20))  # the envelope's length made to fit


HUGE = 0x7FFFFFFF


def response_with(body: bytes) -> bytes:
    return spec.request(body=body, rc=1, flags=0x99000000)


CLAIMS: dict[str, bytes] = {
    "message length": with_length(B8_REQUEST, HUGE),
    "body length": B8_REQUEST[:40] + struct.pack(">I", HUGE) + B8_REQUEST[44:],
    "credential length": B8_REQUEST[:72] + struct.pack(">I", HUGE),
    "handle length": spec.request(body=struct.pack(">I", HUGE) + bytes(8)),
    "index count": spec.request(body=spec.blob(HANDLE) + struct.pack(">I", HUGE) + bytes(4)),
    "type count": spec.request(body=spec.blob(HANDLE) + bytes(4) + struct.pack(">I", HUGE)),
    "type length": spec.request(body=spec.blob(HANDLE) + bytes(4) + spec.int4(1) + struct.pack(">I", HUGE)),
    "value count": response_with(spec.blob(HANDLE) + struct.pack(">I", HUGE)),
    "value type length": response_with(spec.blob(HANDLE) + spec.int4(1) + bytes(14) + struct.pack(">I", HUGE)),
    "value data length": response_with(spec.blob(HANDLE) + spec.int4(1) + bytes(18) + struct.pack(">I", HUGE)),
    "reference count": response_with(spec.blob(HANDLE) + spec.int4(1) + bytes(22) + struct.pack(">I", HUGE)),
    "referral value count": spec.request(body=spec.blob(b"") + struct.pack(">I", HUGE), rc=303),
    "error message length": spec.request(body=struct.pack(">I", HUGE), rc=2),
    "digest length (< 2.1)": spec.request(
        body=struct.pack(">I", HUGE), rc=2, flags=spec.RD, version=(2, 0), suggested=None
    ),
}  # fmt: skip


def decode_request_or_response(data: bytes) -> None:
    message = hp.decode_message(data)
    if message.header.rc == 0:
        hp.decode_resolution_request(message.body)
    else:
        hp.decode_response(message)


@pytest.mark.parametrize("claim", sorted(CLAIMS))
def test_huge_claimed_counts_and_lengths_are_refused_without_allocating(claim: str) -> None:
    data = CLAIMS[claim]
    tracemalloc.start()
    try:
        with pytest.raises(hp.ProtocolError):
            decode_request_or_response(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"{claim}: {peak} bytes allocated"


def test_site_data_with_huge_counts_is_refused() -> None:
    good = spec.site_data(SPEC_SITE)
    # The hash filter's length, the attribute count, an attribute's name and value lengths, the
    # server count, the first server's key length and interface count.
    for offset in (8, 12, 16, 24, 48, 72, 76):
        with pytest.raises(hp.ProtocolError):
            hp.decode_site(rewrite(good, offset, HUGE))


# --- the cache against the Python path, on generated requests -------------------------------

HANDLE_TEXT = st.text(alphabet="aA1._-/é\x01\x85 ", max_size=40).map(str.encode)
HANDLES = st.one_of(
    st.sampled_from([HANDLE, b"88.Ab1/SN-1", b"0.NA/88.100.1", b"88.100.1", b"88.100.1/SN-0001/x"]),
    st.tuples(st.sampled_from([b"88.100.1/", b"88.ab1/", b"88.", b""]), HANDLE_TEXT).map(b"".join),
    st.binary(max_size=300),
)


FLAGS = st.sampled_from([spec.HSJ_FLAGS, 0, 0xFFFFFFFF & ~(spec.ENC | spec.RD), spec.HSJ_FLAGS | spec.RD, 0xFFFFFFFF])


@settings(max_examples=1000, deadline=None)
@given(HANDLES, st.sampled_from([(), (), (1,)]), FLAGS, st.data())
def test_what_the_cache_answers_is_what_the_python_path_answers(
    handle: bytes, indexes: tuple[int, ...], flags: int, data: st.DataObject
) -> None:
    """Both implementations answer the same, and only requests the Python path would answer
    from that entry, with its bytes: an entry under the key a careless lookup would use."""
    request = spec.request(handle, indexes=indexes, flags=flags, request_id=data.draw(st.integers(0, 0xFFFFFFFF)))
    if data.draw(st.integers(0, 3)) == 0:
        request = data.draw(mutated((request,)))
    entries = {HANDLE: hp.values_section([URL])}
    if 0 < len(handle) <= 255:
        entries[IMPLEMENTATIONS["python"].normalise_key(handle)] = hp.int4(0)
    answers = {name: fast(cache_with(impl, entries), request) for name, impl in IMPLEMENTATIONS.items()}
    assert len(set(answers.values())) == 1, answers
    answer = answers["python"]
    event("answered from the cache" if answer is not None else "left to the Python path")
    if answer is None:
        return
    message = hp.decode_message(request)
    assert (message.header.opcode, message.header.rc) == (1, 0)
    assert (message.envelope.flags, message.envelope.message_id) == (0, 0)
    assert message.envelope.suggested >= (2, 1) and not message.header.flags & (hp.Flag.ENC | hp.Flag.RD)
    query = hp.decode_resolution_request(message.body)
    assert query.indexes == () and query.types == () and message.credential == b""
    key = parse_identifier(query.handle.decode("utf-8")).key.encode()
    assert answer == python_answer(request, 1, hp.blob(query.handle) + entries[key])
