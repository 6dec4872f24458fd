# cython: boundscheck=False, wraparound=False, cdivision=True
"""The bulk importer's record maker, compiled: ``registration_wire`` of ``bench.dataset``
(its pure-Python twin, the definition of the dataset), giving the same keys and the same wire
bytes (tests/unit/test_dataset.py holds them equal) at a tenth of the cost. The 444M Wuhan
import spends its worker processes' time here.

Each record is written into one stack buffer: the suffix ``CLASS.Mnnn.YYYYMMDD.serial`` from
integer arithmetic, the values' draw from the same BLAKE2b as the twin (hashlib's, copied from a
hasher already fed the salt), and the protobuf fields in field-number order, as
``SerializeToString`` writes them."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport int64_t, uint64_t
from libc.stdio cimport snprintf
from libc.string cimport memcpy, strlen
from resolver._varints cimport put_varint

import hashlib

cdef const char* CLASSES[8]
CLASSES[:] = [b"BEARING", b"CABLE", b"GEAR", b"MOTOR", b"PANEL", b"PUMP", b"SENSOR", b"VALVE"]
cdef const char* EXTRA_TYPES[4]
EXTRA_TYPES[:] = [b"PRODUCT_MODEL", b"MANUFACTURE_DATE", b"BATCH", b"EMAIL"]

PREFIX_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_"

DEF BUFFER = 2048
DEF MAX_TEXT = 200
DEF EPOCH_DAYS = 17532  # 2018-01-01, in days since 1970-01-01


cdef inline int put_field(char* out, int tag, const char* data, int length) noexcept:
    """A length-delimited field: tag, length, bytes."""
    out[0] = <char>tag
    cdef int n = <int>(put_varint(out + 1, length) - out)
    memcpy(out + n, data, length)
    return n + length


cdef void civil_date(int64_t days, char* out) noexcept:
    """YYYYMMDD of ``days`` since 1970-01-01 (H. Hinnant's civil_from_days)."""
    cdef int64_t z = days + 719468
    cdef int64_t era = (z if z >= 0 else z - 146096) // 146097
    cdef int64_t doe = z - era * 146097
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t y = yoe + era * 400
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64_t mp = (5 * doy + 2) // 153
    cdef int64_t d = doy - (153 * mp + 2) // 5 + 1
    cdef int64_t m = mp + 3 if mp < 10 else mp - 9
    if m <= 2:
        y += 1
    snprintf(out, 9, b"%04d%02d%02d", <int>y, <int>m, <int>d)


cdef int put_value(
    char* out, int index, const char* type_, const char* data, int length, const char* tail, int tail_length
) noexcept:
    """Record field 2: one Value (index, type, data, then the fields every value shares)."""
    cdef char body[MAX_TEXT + 64]
    cdef int n = 0
    body[0] = 0x08
    n = <int>(put_varint(body + 1, index) - body)
    n += put_field(body + n, 0x12, type_, <int>strlen(type_))
    n += put_field(body + n, 0x1A, data, length)
    memcpy(body + n, tail, tail_length)
    n += tail_length
    return put_field(out, 0x12, body, n)


def registration_wire_columns(
    str prefix, str key_prefix, int64_t count, seed, int64_t start, int64_t stop, int64_t timestamp,
    uint64_t ttl, uint64_t permissions,
):
    """(keys, wire forms) of registrations [start, stop) of the ``count`` under ``prefix``:
    ``bench.dataset.registration_wire``'s, as two lists. ``key_prefix`` is the prefix's key."""
    cdef bytes prefix_b = prefix.encode("ascii")
    cdef bytes key_prefix_b = key_prefix.encode("ascii")
    if len(prefix_b) > 64 or len(key_prefix_b) > 64:
        raise ValueError(f"prefix {prefix!r} longer than 64 characters")
    if prefix_b.strip(PREFIX_BYTES) or key_prefix_b.strip(PREFIX_BYTES):
        raise ValueError(f"prefix {prefix!r} holds more than ASCII letters, digits, '.', '-' and '_'")
    if count <= 0 or count > (1 << 40) or start < 0 or ttl > 0xFFFFFFFF or permissions > 0xFFFFFFFF:
        raise ValueError(f"count {count}, start {start}, ttl {ttl} or permissions {permissions} out of range")
    cdef const char* p = PyBytes_AS_STRING(prefix_b)
    cdef int plen = <int>PyBytes_GET_SIZE(prefix_b)
    cdef const char* kp = PyBytes_AS_STRING(key_prefix_b)
    cdef int kplen = <int>PyBytes_GET_SIZE(key_prefix_b)
    salted = hashlib.blake2b(f"{seed}:{prefix}:".encode(), digest_size=8)
    cdef bytes email_b = f"quality@{prefix.replace('.', '-')}.example.com".encode("ascii")
    cdef const char* email = PyBytes_AS_STRING(email_b)
    cdef int email_length = <int>PyBytes_GET_SIZE(email_b)

    cdef char tail[48]  # ttl, timestamp, permissions: the same in every value
    cdef int tail_length = 0
    if ttl:
        tail[0] = 0x28
        tail_length = <int>(put_varint(tail + 1, ttl) - tail)
    if timestamp:
        tail[tail_length] = 0x30
        tail_length = <int>(put_varint(tail + tail_length + 1, <uint64_t>timestamp) - tail)
    if permissions:
        tail[tail_length] = 0x38
        tail_length = <int>(put_varint(tail + tail_length + 1, permissions) - tail)

    cdef char sfx[96]
    cdef char model[8]
    cdef char date[12]
    cdef char batch[12]
    cdef char serial_text[24]
    cdef char text[MAX_TEXT]
    cdef char record[BUFFER]
    cdef int sfx_length, n, text_length, serial_length, extras, i
    cdef const char* cls
    cdef int64_t serial
    cdef uint64_t draw
    cdef bytes digest
    cdef const unsigned char* d
    keys = []
    wires = []
    if stop > count:
        stop = count
    for serial in range(start, stop):
        cls = CLASSES[serial * 8 // count]
        snprintf(model, sizeof(model), b"%c%03d", cls[0], <int>(100 + serial * 899 // count))
        civil_date(EPOCH_DAYS + serial * 3000 // count, date)
        sfx_length = snprintf(sfx, sizeof(sfx), b"%s.%s.%s.%09lld", cls, model, date, <long long>serial)
        serial_length = snprintf(serial_text, sizeof(serial_text), b"%lld", <long long>serial)

        hasher = salted.copy()
        hasher.update(PyBytes_FromStringAndSize(serial_text, serial_length))
        digest = hasher.digest()
        d = <const unsigned char*>PyBytes_AS_STRING(digest)
        draw = 0
        for i in range(8):
            draw = (draw << 8) | d[i]

        # field 1: the identifier
        memcpy(text, p, plen)
        text[plen] = b"/"
        memcpy(text + plen + 1, sfx, sfx_length)
        n = put_field(record, 0x0A, text, plen + 1 + sfx_length)
        # value 1: the URL
        text_length = snprintf(text, sizeof(text), b"https://id.example.com/%s/%s", p, sfx)
        n += put_value(record + n, 1, b"URL", text, text_length, tail, tail_length)
        extras = 1 + <int>(draw % 4)
        n += put_value(record + n, 2, EXTRA_TYPES[0], model, <int>strlen(model), tail, tail_length)
        if extras > 1:
            n += put_value(record + n, 3, EXTRA_TYPES[1], date, 8, tail, tail_length)
        if extras > 2:
            snprintf(batch, sizeof(batch), b"B%06d", <int>((draw >> 8) % 1000000))
            n += put_value(record + n, 4, EXTRA_TYPES[2], batch, 7, tail, tail_length)
        if extras > 3:
            n += put_value(record + n, 5, EXTRA_TYPES[3], email, email_length, tail, tail_length)
        record[n] = 0x18  # version 1
        record[n + 1] = 0x01
        wires.append(PyBytes_FromStringAndSize(record, n + 2))

        memcpy(text, kp, kplen)
        text[kplen] = b"/"
        memcpy(text + kplen + 1, sfx, sfx_length)
        keys.append(PyUnicode_DecodeASCII(text, kplen + 1 + sfx_length, NULL))
    return keys, wires
