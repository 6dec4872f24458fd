# Protocol Buffers' base-128 varints, written into C buffers. Shared by resolver/_cache.pyx (the
# wire fast paths) and bench/_registrations.pyx (the bulk importer's record maker).

from libc.stdint cimport uint64_t


cdef inline Py_ssize_t varint_size(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline char* put_varint(char* out, uint64_t v) noexcept nogil:
    """Writes ``v`` at ``out``; where the next byte goes."""
    while v >= 0x80:
        out[0] = <char>((v & 0x7F) | 0x80)
        out += 1
        v >>= 7
    out[0] = <char>v
    return out + 1
