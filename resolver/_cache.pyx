# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled lookup cache and the wire fast path (see resolver/cache.py for the contract).

Memory layout, all in C allocations (PyMem_Raw*, so tracemalloc sees it):

* ``slots``: one packed 26-byte Entry per cached item: pointer to one allocation holding the
  key bytes followed by the value bytes, value length, expiry second, 32-bit hash, the index of
  the next entry in its FIFO queue, key length, flags (2-bit frequency, queue, live, negative).
* ``index``: open-addressing (linear probing, backward-shift deletion) table of slot numbers,
  at most 3/4 full.
* ``ghost``: a direct-mapped table of the hashes of keys recently evicted from the small queue
  (S3-FIFO's ghost queue, kept as fingerprints the way the S3-FIFO authors suggest).

Eviction is S3-FIFO (Yang et al., SOSP '23): new keys enter a small FIFO; a key read again
while there moves to the main FIFO when it reaches the head, otherwise it is evicted and
remembered in the ghost table; a key found in the ghost table enters the main FIFO directly.
The main FIFO is a CLOCK with a 2-bit counter. One pass over many keys (a scan) therefore only
churns the small queue and never flushes the hot set from the main queue.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec

from resolver._sockets cimport (
    AF_INET,
    AF_INET6,
    MSG_DONTWAIT,
    MSG_TRUNC,
    mmsghdr,
    recvmmsg,
    sendmmsg,
    sockaddr_storage,
    socklen_t,
)
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from resolver._varints cimport put_varint, varint_size
from libc.string cimport memcmp, memcpy, memset

cdef extern from "openssl/sha.h" nogil:
    # OpenSSL's SHA-256 itself, without the EVP layer: hashlib's object and EVP's context cost
    # 5-6x what a leaf or a tree node takes to hash (see record_leaves).
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX* c)
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t length)
    int SHA256_Final(unsigned char* md, SHA256_CTX* c)

import fcntl
import hashlib
import mmap
import os
import time

from resolver.identifier import MAX_IDENTIFIER_BYTES, MAX_PREFIX_BYTES
from resolver.record import DEFAULT_PERMISSIONS, DEFAULT_TTL

cdef extern from *:
    """
    static inline uint64_t idis_load_acquire(uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void idis_store_release(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    #define idis_prefetch(p) __builtin_prefetch((const void*)(p))
    """
    void idis_prefetch(const void* p) nogil
    uint64_t idis_load_acquire(uint64_t* p) nogil
    void idis_store_release(uint64_t* p, uint64_t v) nogil

cdef uint32_t NIL = 0xFFFFFFFF
cdef uint8_t F_FREQ = 0x03
cdef uint8_t F_MAIN = 0x04
cdef uint8_t F_LIVE = 0x08
cdef uint8_t F_NEG = 0x10
cdef Py_ssize_t MAX_KEY = 255
# The grammar's limits (resolver/identifier.py); an identifier must also fit a key buffer.
cdef Py_ssize_t MAX_IDENTIFIER = min(MAX_IDENTIFIER_BYTES, MAX_KEY)
cdef Py_ssize_t MAX_PREFIX = MAX_PREFIX_BYTES

POSITIVE = 1
NEGATIVE = 2

# The change log: a file-backed ring shared by the worker processes of one node.
# Header (64 bytes): uint64 published sequence number. Entry (272 bytes): uint64 sequence,
# uint32 kind, uint32 key length, 256 key bytes.
LOG_HEADER = 64
LOG_ENTRY = 272
LOG_KEY = 1
LOG_PREFIX = 2
cdef uint64_t HEADER = 64
cdef uint64_t ENTRY = 272


cdef class ChangeLog:
    """Invalidations published by the worker that took a write, for every worker to apply.

    A writer appends (under an flock, after its transaction committed and before it
    acknowledges) the key it changed; every worker's cache reads the published sequence number
    (one atomic load) before each lookup and applies what it has not seen. A worker that fell
    more than ``capacity`` entries behind clears its whole cache.
    """

    cdef object _file
    cdef object _map
    cdef unsigned char[::1] _view
    cdef unsigned char* base
    cdef readonly uint64_t capacity

    def __cinit__(self, path, uint64_t capacity=8192, bint create=False):
        if create:
            with open(path, "wb") as fh:
                fh.truncate(LOG_HEADER + capacity * LOG_ENTRY)
        self._file = open(path, "r+b")
        size = os.fstat(self._file.fileno()).st_size
        self.capacity = (size - LOG_HEADER) // LOG_ENTRY
        if self.capacity == 0:
            raise ValueError(f"{path} is not a change log")
        self._map = mmap.mmap(self._file.fileno(), size)
        self._view = self._map
        self.base = &self._view[0]

    cdef inline uint64_t _published(self) noexcept:
        return idis_load_acquire(<uint64_t*>self.base)

    @property
    def sequence(self):
        return self._published()

    def append(self, int kind, bytes key):
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef uint64_t seq
        cdef unsigned char* entry
        if n > 256:
            raise ValueError("key too long for the change log")
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        try:
            seq = self._published() + 1
            entry = self.base + HEADER + (seq % self.capacity) * ENTRY
            (<uint32_t*>(entry + 8))[0] = <uint32_t>kind
            (<uint32_t*>(entry + 12))[0] = <uint32_t>n
            memcpy(entry + 16, PyBytes_AS_STRING(key), n)
            idis_store_release(<uint64_t*>entry, seq)
            idis_store_release(<uint64_t*>self.base, seq)
        finally:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        return seq

    def entries_after(self, uint64_t seen):
        """``(sequence, [(kind, key), ...])`` published after ``seen``; None when some were
        already overwritten."""
        cdef uint64_t last = self._published()
        cdef uint64_t s
        cdef unsigned char* entry
        if last - seen > self.capacity:
            return last, None
        out = []
        for s in range(seen + 1, last + 1):
            entry = self.base + HEADER + (s % self.capacity) * ENTRY
            if idis_load_acquire(<uint64_t*>entry) != s:
                return last, None
            out.append(((<uint32_t*>(entry + 8))[0],
                        PyBytes_FromStringAndSize(<char*>entry + 16, (<uint32_t*>(entry + 12))[0])))
        return last, out

    def close(self):
        self._view = None
        self._map.close()
        self._file.close()


cdef packed struct Entry:
    char* data
    uint32_t vlen
    uint32_t expires
    uint32_t hash
    uint32_t next
    uint8_t klen
    uint8_t flags


cdef inline uint32_t hash_key(const char* p, Py_ssize_t n) noexcept nogil:
    """Eight bytes at a time (multiply-xorshift), then the murmur3 finaliser for the low bits."""
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL ^ <uint64_t>n
    cdef uint64_t w
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        h = (h ^ w) * 0xBF58476D1CE4E5B9ULL
        h ^= h >> 29
        i += 8
    w = 0
    if i < n:
        memcpy(&w, p + i, n - i)
        h = (h ^ w) * 0x94D049BB133111EBULL
        h ^= h >> 31
    h ^= h >> 33
    h *= 0xff51afd7ed558ccdULL
    h ^= h >> 33
    h *= 0xc4ceb9fe1a85ec53ULL
    h ^= h >> 33
    cdef uint32_t out = <uint32_t>h
    return out if out != 0 else 1


cdef inline Py_ssize_t answer_inner_size(Py_ssize_t n) noexcept nogil:
    """Bytes of a ResolveBatchItem with status OK holding an n-byte ResolveResponse."""
    return 3 + varint_size(n) + n


cdef inline char* put_answer_item(char* out, const char* response, Py_ssize_t n) noexcept nogil:
    """Writes ``items`` (ResolveBatchResponse field 1) holding a ResolveBatchItem with status OK
    and the n-byte ResolveResponse at ``response``."""
    out[0] = 0x0A
    out = put_varint(out + 1, answer_inner_size(n))
    out[0] = 0x0A  # status: an empty ItemStatus (code 0, OK)
    out[1] = 0x00
    out[2] = 0x12  # response
    out = put_varint(out + 3, n)
    memcpy(out, response, n)
    return out + n


cdef inline int read_varint(const unsigned char* p, Py_ssize_t end, Py_ssize_t* pos, uint64_t* out) noexcept nogil:
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef unsigned char b
    while pos[0] < end and shift < 64:
        b = p[pos[0]]
        pos[0] += 1
        v |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            out[0] = v
            return 0
        shift += 7
    return -1


# What each byte may be in a prefix: segment = 1*( ALPHA / DIGIT / "-" / "_" ), joined by ".".
cdef enum:
    P_BAD = 0
    P_SEGMENT = 1
    P_LOWER = 2  # a segment character that normalisation upper-cases
    P_DOT = 3
cdef uint8_t PREFIX_CHAR[256]


cdef void classify_prefix_bytes() noexcept nogil:
    cdef int c
    for c in range(256):
        if 65 <= c <= 90 or 48 <= c <= 57 or c == 45 or c == 95:  # A-Z 0-9 - _
            PREFIX_CHAR[c] = P_SEGMENT
        elif 97 <= c <= 122:  # a-z
            PREFIX_CHAR[c] = P_LOWER
        elif c == 46:  # .
            PREFIX_CHAR[c] = P_DOT
        else:
            PREFIX_CHAR[c] = P_BAD


classify_prefix_bytes()


cdef inline bint valid_suffix(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """True when p[:n] is UTF-8 (strict: no overlong forms, surrogates or code points past
    U+10FFFF, as the protobuf decoder of the slow path demands) without the control characters
    U+0000-U+001F and U+007F-U+009F."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c, lo, hi
    cdef uint64_t w
    while i < n:
        if i + 8 <= n:  # eight printable ASCII bytes at a time: no high bit, none < 0x20, no 0x7F
            memcpy(&w, p + i, 8)
            if ((w | (w - 0x2020202020202020ULL) | ((w ^ 0x7F7F7F7F7F7F7F7FULL) - 0x0101010101010101ULL))
                    & 0x8080808080808080ULL) == 0:
                i += 8
                continue
        c = p[i]
        if c < 0x80:
            if c < 0x20 or c == 0x7F:
                return False
            i += 1
        elif c < 0xC2:  # a continuation byte, or the lead of an overlong form
            return False
        elif c < 0xE0:
            lo = 0xA0 if c == 0xC2 else 0x80  # C2 80..C2 9F: the controls U+0080-U+009F
            if i + 1 >= n or not (lo <= p[i + 1] <= 0xBF):
                return False
            i += 2
        elif c < 0xF0:
            lo = 0xA0 if c == 0xE0 else 0x80  # E0 80..E0 9F: overlong
            hi = 0x9F if c == 0xED else 0xBF  # ED A0..ED BF: surrogates
            if i + 2 >= n or not (lo <= p[i + 1] <= hi) or (p[i + 2] & 0xC0) != 0x80:
                return False
            i += 3
        elif c < 0xF5:
            lo = 0x90 if c == 0xF0 else 0x80  # F0 80..F0 8F: overlong
            hi = 0x8F if c == 0xF4 else 0xBF  # F4 90..: past U+10FFFF
            if (i + 3 >= n or not (lo <= p[i + 1] <= hi) or (p[i + 2] & 0xC0) != 0x80
                    or (p[i + 3] & 0xC0) != 0x80):
                return False
            i += 4
        else:
            return False
    return True


cdef inline Py_ssize_t normalise_identifier(const char* src, Py_ssize_t n, char* buf,
                                            const char** key) noexcept nogil:
    """Checks an identifier given as UTF-8 against the grammar of resolver/identifier.py while
    normalising it. Returns the length of its prefix, or -1 when it breaks the grammar; sets
    ``key`` to its normalised form: ``src`` itself when the prefix is upper-case already, else
    ``buf`` (``n`` is at most MAX_IDENTIFIER, so it fits)."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c, kind
    cdef bint segment_empty = True
    cdef bint changed = False
    while True:
        if i >= n or i > MAX_PREFIX:  # no "/", or a prefix too long
            return -1
        c = <unsigned char>src[i]
        if c == 47:  # "/"
            break
        kind = PREFIX_CHAR[c]
        if kind == P_DOT:
            if segment_empty:
                return -1
            segment_empty = True
        elif kind == P_BAD:
            return -1
        else:
            segment_empty = False
            if kind == P_LOWER:
                c -= 32
                changed = True
        buf[i] = <char>c
        i += 1
    if segment_empty or i + 1 >= n:  # empty prefix, a trailing ".", or an empty suffix
        return -1
    if not valid_suffix(<const unsigned char*>src + i + 1, n - i - 1):
        return -1
    if changed:
        memcpy(buf + i, src + i, n - i)
        key[0] = buf
    else:
        key[0] = src
    return i


cdef inline bint normalise(const char* src, Py_ssize_t n, char* dst) noexcept nogil:
    """Copies an identifier, upper-casing ASCII letters before the first "/"; True if changed."""
    cdef Py_ssize_t i
    cdef bint in_prefix = True
    cdef bint changed = False
    cdef char c
    for i in range(n):
        c = src[i]
        if in_prefix:
            if c == 47:
                in_prefix = False
            elif 97 <= c <= 122:
                c = c - 32
                changed = True
        dst[i] = c
    return changed


cdef inline Py_ssize_t plain_request(const unsigned char* p, Py_ssize_t start, Py_ssize_t end, char* keybuf,
                                     const char** key, Py_ssize_t* klen) noexcept nogil:
    """Reads the ResolveRequest in p[start:end] when it carries exactly one field, the
    identifier (no filters, not recursive), and the identifier follows the grammar: returns the
    length of its prefix and sets ``key`` to its normalised form (see normalise_identifier) and
    ``klen`` to its length (the identifier as written is p[end - klen:end]); else -1."""
    cdef Py_ssize_t pos = start
    cdef uint64_t length
    if pos >= end or p[pos] != 0x0A:
        return -1
    pos += 1
    if read_varint(p, end, &pos, &length) < 0 or length == 0 or length > <uint64_t>MAX_IDENTIFIER:
        return -1
    if pos + <Py_ssize_t>length != end:
        return -1
    klen[0] = <Py_ssize_t>length
    return normalise_identifier(<const char*>p + pos, klen[0], keybuf, key)


def normalise_key(bytes identifier):
    """The cache key of an identifier given as UTF-8: the prefix upper-cased (ASCII only)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(identifier)
    out = PyBytes_FromStringAndSize(NULL, n)
    normalise(PyBytes_AS_STRING(identifier), n, PyBytes_AS_STRING(out))
    return out


# Handle protocol op flags (resolver/handle_protocol.py Flag): authoritative, encrypt, recursion,
# request digest, and those a response echoes (AT, CT, ENC, CA, PO, RD, DNRF).
cdef uint32_t HANDLE_AT = 0x80000000, HANDLE_ENC = 0x20000000, HANDLE_REC = 0x10000000, HANDLE_RD = 0x00800000
cdef uint32_t HANDLE_ECHOED = 0xE9900000


cdef struct HandleQuery:
    Py_ssize_t handle_len
    uint32_t flags
    uint8_t major
    uint8_t minor
    uint32_t slot


cdef inline uint32_t be32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline void put_be32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void put_be64(unsigned char* p, uint64_t v) noexcept nogil:
    put_be32(p, <uint32_t>(v >> 32))
    put_be32(p + 4, <uint32_t>v)


cdef class LookupCache:
    """Bytes keys to bytes values, bounded by entries and bytes, with per-entry TTLs."""

    cdef Entry* slots
    cdef uint32_t slot_cap
    cdef uint32_t slot_high
    cdef uint32_t free_head
    cdef uint32_t* index
    cdef uint32_t index_mask
    cdef uint32_t* ghost
    cdef uint32_t ghost_mask
    cdef uint32_t s_head, s_tail, m_head, m_tail
    cdef uint32_t s_len, m_len, count
    cdef uint64_t nbytes
    cdef uint32_t expire_cursor
    cdef double epoch
    cdef object clock
    cdef readonly uint64_t max_entries
    cdef readonly uint64_t max_bytes
    cdef readonly uint64_t hits, misses, insertions, evictions, expirations, invalidations
    cdef uint64_t _generation
    cdef ChangeLog log
    cdef uint64_t log_seen

    def __cinit__(self, uint64_t max_entries=100000, uint64_t max_bytes=256 * 1024 * 1024, clock=None):
        if max_entries == 0 or max_entries > 0x7FFFFFF0:
            raise ValueError("max_entries must be in 1..2147483632")
        if max_bytes == 0:
            raise ValueError("max_bytes must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock if clock is not None else time.monotonic
        self.epoch = self.clock()
        self.slot_cap = 0
        self.slot_high = 0
        self.free_head = NIL
        self.s_head = self.s_tail = self.m_head = self.m_tail = NIL
        self._alloc_tables(1024)

    def __dealloc__(self):
        cdef uint32_t i
        if self.slots != NULL:
            for i in range(self.slot_high):
                if self.slots[i].flags & F_LIVE:
                    PyMem_RawFree(self.slots[i].data)
            PyMem_RawFree(self.slots)
        PyMem_RawFree(self.index)
        PyMem_RawFree(self.ghost)

    # --- the shared change log ---------------------------------------------------------------

    def attach(self, ChangeLog log):
        """Follow ``log``: changes published there are applied before every lookup."""
        self.log = log
        self.log_seen = log._published()

    cdef inline int _sync(self) except -1:
        if self.log is not None and self.log._published() != self.log_seen:
            self._apply_log()
        return 0

    cdef int _apply_log(self) except -1:
        last, changes = self.log.entries_after(self.log_seen)
        self.log_seen = last
        if changes is None:
            self.clear()
            return 0
        for kind, key in changes:
            if kind == LOG_PREFIX:
                self.invalidate_prefix(key)
            else:
                self.invalidate(key)
        return 0

    @property
    def generation(self):
        """Advances with every invalidation, here or published by another worker."""
        self._sync()
        return self._generation

    def sync(self):
        """Applies the changes other workers published (lookups do this by themselves)."""
        self._sync()

    # --- tables ---------------------------------------------------------------------------

    cdef int _alloc_tables(self, uint32_t capacity) except -1:
        cdef uint32_t* index = <uint32_t*>PyMem_RawMalloc(capacity * sizeof(uint32_t))
        # The ghost table holds about as many fingerprints as the cache holds entries.
        cdef uint32_t* ghost = <uint32_t*>PyMem_RawCalloc(capacity // 2, sizeof(uint32_t))
        cdef uint32_t i
        if index == NULL or ghost == NULL:
            PyMem_RawFree(index)
            PyMem_RawFree(ghost)
            raise MemoryError()
        for i in range(capacity):
            index[i] = NIL
        PyMem_RawFree(self.index)
        PyMem_RawFree(self.ghost)
        self.index = index
        self.ghost = ghost
        self.index_mask = capacity - 1
        self.ghost_mask = capacity // 2 - 1
        for i in range(self.slot_high):
            if self.slots[i].flags & F_LIVE:
                self._index_put(i)
        return 0

    cdef inline void _index_put(self, uint32_t slot) noexcept:
        cdef uint32_t pos = self.slots[slot].hash & self.index_mask
        while self.index[pos] != NIL:
            pos = (pos + 1) & self.index_mask
        self.index[pos] = slot

    cdef inline uint32_t _find(self, const char* key, Py_ssize_t klen, uint32_t h) noexcept:
        cdef uint32_t pos = h & self.index_mask
        cdef uint32_t slot
        cdef Entry* e
        while True:
            slot = self.index[pos]
            if slot == NIL:
                return NIL
            e = &self.slots[slot]
            if e.hash == h and e.klen == klen and memcmp(e.data, key, klen) == 0:
                return slot
            pos = (pos + 1) & self.index_mask

    cdef void _index_remove(self, uint32_t slot) noexcept:
        cdef uint32_t mask = self.index_mask
        cdef uint32_t i = self.slots[slot].hash & mask
        cdef uint32_t j, k
        while self.index[i] != slot:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if self.index[j] == NIL:
                break
            k = self.slots[self.index[j]].hash & mask
            if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
                continue
            self.index[i] = self.index[j]
            i = j
        self.index[i] = NIL

    cdef uint32_t _new_slot(self) except? 0xFFFFFFFF:
        cdef uint32_t slot
        cdef uint32_t cap
        cdef Entry* grown
        if self.free_head != NIL:
            slot = self.free_head
            self.free_head = self.slots[slot].next
            return slot
        if self.slot_high == self.slot_cap:
            # Double, but never past what a full cache needs (plus slack for queued dead slots).
            cap = self.slot_cap * 2 if self.slot_cap else 1024
            if self.slot_cap < self.max_entries + 1024 < cap:
                cap = <uint32_t>(self.max_entries + 1024)
            grown = <Entry*>PyMem_RawRealloc(self.slots, cap * sizeof(Entry))
            if grown == NULL:
                raise MemoryError()
            self.slots = grown
            self.slot_cap = cap
        slot = self.slot_high
        self.slot_high += 1
        return slot

    # --- queues ---------------------------------------------------------------------------

    cdef inline void _push(self, uint32_t slot, bint main) noexcept:
        self.slots[slot].next = NIL
        if main:
            self.slots[slot].flags |= F_MAIN
            if self.m_tail == NIL:
                self.m_head = slot
            else:
                self.slots[self.m_tail].next = slot
            self.m_tail = slot
            self.m_len += 1
        else:
            self.slots[slot].flags &= ~F_MAIN
            if self.s_tail == NIL:
                self.s_head = slot
            else:
                self.slots[self.s_tail].next = slot
            self.s_tail = slot
            self.s_len += 1

    cdef inline uint32_t _pop(self, bint main) noexcept:
        cdef uint32_t slot
        if main:
            slot = self.m_head
            if slot != NIL:
                self.m_head = self.slots[slot].next
                if self.m_head == NIL:
                    self.m_tail = NIL
                self.m_len -= 1
        else:
            slot = self.s_head
            if slot != NIL:
                self.s_head = self.slots[slot].next
                if self.s_head == NIL:
                    self.s_tail = NIL
                self.s_len -= 1
        return slot

    cdef inline void _free_slot(self, uint32_t slot) noexcept:
        self.slots[slot].flags = 0
        self.slots[slot].next = self.free_head
        self.free_head = slot

    cdef void _drop(self, uint32_t slot) noexcept:
        """Removes a live entry from the index and frees its bytes; the slot stays queued."""
        cdef Entry* e = &self.slots[slot]
        self._index_remove(slot)
        self.nbytes -= e.klen + e.vlen
        self.count -= 1
        PyMem_RawFree(e.data)
        e.data = NULL
        e.flags &= ~F_LIVE

    cdef inline uint32_t _now(self) except? 0xFFFFFFFF:
        cdef double elapsed = self.clock() - self.epoch
        return <uint32_t>elapsed if elapsed > 0 else 0

    cdef inline void _release(self, uint32_t slot, bint expired) noexcept:
        """Drops a live entry just popped from its queue and frees its slot."""
        self._drop(slot)
        self._free_slot(slot)
        if expired:
            self.expirations += 1
        else:
            self.evictions += 1

    cdef bint _evict_one(self, uint32_t now) noexcept:
        """Evicts one live entry (S3-FIFO); False when the cache holds none."""
        cdef uint32_t slot
        cdef Entry* e
        while self.count > 0:
            if self.s_len > 0 and (self.s_len * 10 >= self.count or self.m_len == 0):
                slot = self._pop(False)
                e = &self.slots[slot]
                if not (e.flags & F_LIVE):
                    self._free_slot(slot)
                    continue
                if e.expires <= now:
                    self._release(slot, True)
                    return True
                if e.flags & F_FREQ:
                    e.flags &= ~F_FREQ  # read while in the small queue: promote, bits cleared
                    self._push(slot, True)
                    continue
                self.ghost[e.hash & self.ghost_mask] = e.hash
                self._release(slot, False)
                return True
            slot = self._pop(True)
            if slot == NIL:
                continue
            e = &self.slots[slot]
            if not (e.flags & F_LIVE):
                self._free_slot(slot)
                continue
            if e.expires <= now or not (e.flags & F_FREQ):
                self._release(slot, e.expires <= now)
                return True
            e.flags -= 1  # read since it was last here: one more round, one count less
            self._push(slot, True)
        return False

    cdef void _compact(self) noexcept:
        """Unlinks dead slots from both queues (after many invalidations without evictions)."""
        cdef uint32_t n, slot
        cdef int q
        for q in range(2):
            n = self.m_len if q else self.s_len
            while n > 0:
                slot = self._pop(q == 1)
                n -= 1
                if self.slots[slot].flags & F_LIVE:
                    self._push(slot, q == 1)
                else:
                    self._free_slot(slot)

    # --- lookups --------------------------------------------------------------------------

    cdef inline uint32_t _probe(self, const char* key, Py_ssize_t klen, uint32_t now) noexcept:
        """The live slot for a key (counting the read for eviction), or NIL; no hit/miss count."""
        return self._probe_hashed(key, klen, hash_key(key, klen), now)

    cdef inline uint32_t _probe_hashed(self, const char* key, Py_ssize_t klen, uint32_t h, uint32_t now) noexcept:
        cdef uint32_t slot = self._find(key, klen, h)
        cdef Entry* e
        if slot == NIL:
            return NIL
        e = &self.slots[slot]
        if e.expires <= now:
            self._drop(slot)
            self.expirations += 1
            return NIL
        if (e.flags & F_FREQ) != F_FREQ:
            e.flags += 1
        return slot

    cdef inline uint32_t _lookup(self, const char* key, Py_ssize_t klen, uint32_t now) noexcept:
        cdef uint32_t slot = self._probe(key, klen, now)
        if slot == NIL:
            self.misses += 1
        else:
            self.hits += 1
        return slot

    def lookup(self, bytes key):
        """``(POSITIVE or NEGATIVE, value)`` for a live entry, else None."""
        self._sync()
        cdef uint32_t slot = self._lookup(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), self._now())
        if slot == NIL:
            return None
        cdef Entry* e = &self.slots[slot]
        value = PyBytes_FromStringAndSize(e.data + e.klen, e.vlen)
        return (NEGATIVE if e.flags & F_NEG else POSITIVE, value)

    def get(self, bytes key):
        """The value of a live positive entry, else None."""
        self._sync()
        cdef uint32_t slot = self._lookup(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), self._now())
        if slot == NIL or self.slots[slot].flags & F_NEG:
            return None
        return PyBytes_FromStringAndSize(self.slots[slot].data + self.slots[slot].klen, self.slots[slot].vlen)

    def get_many(self, list keys):
        """Values (or None) for many keys in one call.

        Keys go through in groups of 16, each group in stages that prefetch the index slot, the
        entry and the key bytes of every key before the next stage needs them, so the memory
        latencies of a large cache overlap instead of adding up.
        """
        self._sync()
        cdef uint32_t now = self._now()
        cdef Py_ssize_t i, j, n = len(keys), group
        cdef uint32_t slot
        cdef uint32_t hashes[16]
        cdef uint32_t firsts[16]
        cdef bytes key
        out = [None] * n
        for i in range(0, n, 16):
            group = min(16, n - i)
            for j in range(group):
                key = <bytes>keys[i + j]
                hashes[j] = hash_key(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
                idis_prefetch(&self.index[hashes[j] & self.index_mask])
            for j in range(group):
                firsts[j] = self.index[hashes[j] & self.index_mask]
                if firsts[j] != NIL:
                    idis_prefetch(&self.slots[firsts[j]])
            for j in range(group):
                if firsts[j] != NIL:
                    idis_prefetch(self.slots[firsts[j]].data)
            for j in range(group):
                key = <bytes>keys[i + j]
                slot = self._probe_hashed(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), hashes[j], now)
                if slot == NIL:
                    self.misses += 1
                    continue
                self.hits += 1
                if not (self.slots[slot].flags & F_NEG):
                    out[i + j] = PyBytes_FromStringAndSize(
                        self.slots[slot].data + self.slots[slot].klen, self.slots[slot].vlen)
        return out

    def remaining_ttl(self, bytes key):
        cdef uint32_t h = hash_key(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
        cdef uint32_t slot = self._find(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), h)
        cdef double elapsed
        if slot == NIL:
            return 0.0
        elapsed = self.clock() - self.epoch
        return max(0.0, self.slots[slot].expires - elapsed)

    # --- writes ---------------------------------------------------------------------------

    def set(self, bytes key, bytes value, double ttl, bint negative=False, long long if_generation=-1):
        """Stores ``value`` for ``ttl`` seconds (whole seconds, rounded up); ttl <= 0 removes.

        With ``if_generation``, stores only if no invalidation happened since the generation
        was read (the value may be stale otherwise); returns whether it stored.
        """
        cdef Py_ssize_t klen = PyBytes_GET_SIZE(key)
        cdef Py_ssize_t vlen = PyBytes_GET_SIZE(value)
        cdef uint32_t now = self._now()
        cdef uint32_t h, slot, gpos
        cdef char* data
        cdef Entry* e
        cdef double expires
        if klen == 0 or klen > MAX_KEY:
            raise ValueError("keys must be 1..255 bytes")
        self._sync()
        if if_generation >= 0 and <uint64_t>if_generation != self._generation:
            return False
        if vlen > 0xFFFFFFF0:
            raise ValueError("value too large")
        h = hash_key(PyBytes_AS_STRING(key), klen)
        slot = self._find(PyBytes_AS_STRING(key), klen, h)
        if ttl <= 0 or <uint64_t>(klen + vlen) > self.max_bytes:
            if slot != NIL:
                self._drop(slot)
            return False
        expires = (self.clock() - self.epoch) + ttl
        if expires > 4000000000.0:
            expires = 4000000000.0
        data = <char*>PyMem_RawMalloc(klen + vlen)
        if data == NULL:
            raise MemoryError()
        memcpy(data, PyBytes_AS_STRING(key), klen)
        memcpy(data + klen, PyBytes_AS_STRING(value), vlen)
        if slot != NIL:  # replace in place: keeps its queue position and frequency
            e = &self.slots[slot]
            self.nbytes += vlen
            self.nbytes -= e.vlen
            PyMem_RawFree(e.data)
            e.data = data
            e.vlen = <uint32_t>vlen
            e.expires = <uint32_t>(expires + 0.999999)
            e.flags = (e.flags & ~F_NEG) | (F_NEG if negative else 0)
            self.insertions += 1
            while self.nbytes > self.max_bytes and self._evict_one(now):
                pass
            return True
        while self.count > 0 and (self.count >= self.max_entries or self.nbytes + klen + vlen > self.max_bytes):
            if not self._evict_one(now):
                break
        if self.s_len + self.m_len > 2 * self.count + 1024:
            self._compact()
        if (self.count + 1) * 4 > (self.index_mask + 1) * 3:
            self._alloc_tables((self.index_mask + 1) * 2)
        slot = self._new_slot()
        e = &self.slots[slot]
        e.data = data
        e.vlen = <uint32_t>vlen
        e.klen = <uint8_t>klen
        e.hash = h
        e.expires = <uint32_t>(expires + 0.999999)
        e.flags = F_LIVE | (F_NEG if negative else 0)
        gpos = h & self.ghost_mask
        if self.ghost[gpos] == h:
            self.ghost[gpos] = 0
            self._push(slot, True)
        else:
            self._push(slot, False)
        self._index_put(slot)
        self.count += 1
        self.nbytes += klen + vlen
        self.insertions += 1
        return True

    def invalidate(self, bytes key):
        """Forgets ``key``; True if it was cached. Always advances the generation."""
        cdef uint32_t h = hash_key(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
        cdef uint32_t slot = self._find(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), h)
        self._generation += 1
        if slot == NIL:
            return False
        self._drop(slot)
        self.invalidations += 1
        return True

    def invalidate_prefix(self, bytes prefix):
        """Forgets ``prefix`` itself and every key below it (``prefix/...``, ``prefix.x...``)."""
        cdef Py_ssize_t plen = PyBytes_GET_SIZE(prefix)
        cdef const char* p = PyBytes_AS_STRING(prefix)
        cdef uint32_t i
        cdef Entry* e
        cdef uint64_t removed = 0
        self._generation += 1
        for i in range(self.slot_high):
            e = &self.slots[i]
            if not (e.flags & F_LIVE) or e.klen < plen or memcmp(e.data, p, plen) != 0:
                continue
            if e.klen == plen or e.data[plen] == 47 or e.data[plen] == 46:
                self._drop(i)
                removed += 1
        self.invalidations += removed
        return removed

    def clear(self):
        cdef uint32_t i
        self._generation += 1
        for i in range(self.slot_high):
            if self.slots[i].flags & F_LIVE:
                self._drop(i)

    def expire(self, uint32_t max_scan=0):
        """Removes expired entries, scanning up to ``max_scan`` slots (0: all) from where the
        previous call stopped; returns how many it removed."""
        cdef uint32_t now = self._now()
        cdef uint32_t scanned = 0, removed = 0
        cdef uint32_t limit = self.slot_high if max_scan == 0 or max_scan > self.slot_high else max_scan
        while scanned < limit:
            if self.expire_cursor >= self.slot_high:
                self.expire_cursor = 0
            if self.slots[self.expire_cursor].flags & F_LIVE and self.slots[self.expire_cursor].expires <= now:
                self._drop(self.expire_cursor)
                removed += 1
            self.expire_cursor += 1
            scanned += 1
        self.expirations += removed
        return removed

    # --- introspection --------------------------------------------------------------------

    def __len__(self):
        return self.count

    @property
    def held_bytes(self):
        """Key and value bytes held."""
        return self.nbytes

    def stats(self):
        return {
            "hits": self.hits, "misses": self.misses, "insertions": self.insertions,
            "evictions": self.evictions, "expirations": self.expirations,
            "invalidations": self.invalidations, "entries": self.count, "bytes": self.nbytes,
        }

    # --- the wire fast path (C level) ----------------------------------------------------

    cdef uint32_t _resolve_item(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                                uint32_t now, char* keybuf) noexcept:
        """The slot answering one ResolveRequest held in p[start:end], or NIL (slow path).

        Only a request carrying exactly one field, the identifier, and an identifier that
        follows the grammar, is answered here (the slow path refuses the others). A
        positive entry for the identifier, else a referral cached under one of its prefixes,
        answers; a negative entry answers only when the request spelled the key exactly (its
        message quotes the identifier as the requester wrote it).
        """
        cdef Py_ssize_t klen, cut
        cdef const char* key
        cdef uint32_t slot
        # The grammar first: an identifier the slow path refuses must reach it, to be refused there.
        cut = plain_request(p, start, end, keybuf, &key, &klen)
        if cut < 0:
            return NIL
        slot = self._probe(key, klen, now)
        if slot != NIL:
            if (self.slots[slot].flags & F_NEG) and key == keybuf:  # spelled otherwise
                self.misses += 1
                return NIL
            self.hits += 1
            return slot
        while cut > 0:  # referrals are cached under the delegated prefix: 88.100.1, 88.100, 88
            slot = self._probe(key, cut, now)
            if slot != NIL and not (self.slots[slot].flags & F_NEG):
                self.hits += 1
                return slot
            cut -= 1
            while cut > 0 and key[cut] != 46:
                cut -= 1
        self.misses += 1
        return NIL

    def answer_one(self, bytes request):
        """Answers a serialized ResolveRequest: ``(POSITIVE, ResolveResponse bytes)``,
        ``(NEGATIVE, ResolveBatchItem bytes)`` or None for the slow path."""
        self._sync()
        cdef char keybuf[256]
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(request)
        cdef uint32_t slot = self._resolve_item(p, 0, PyBytes_GET_SIZE(request), self._now(), keybuf)
        if slot == NIL:
            return None
        cdef Entry* e = &self.slots[slot]
        return (NEGATIVE if e.flags & F_NEG else POSITIVE, PyBytes_FromStringAndSize(e.data + e.klen, e.vlen))

    def answer_batch(self, bytes request, Py_ssize_t max_items=2000):
        """Answers a serialized ResolveBatchRequest.

        Returns the complete ResolveBatchResponse bytes when every item hits; otherwise a list
        with, per item, its framed ResolveBatchResponse field (``items``) or, for a miss, None;
        or None when the request is not a plain batch or holds more than ``max_items`` (the slow
        path then decides everything, errors included).
        """
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(request)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(request)
        cdef Py_ssize_t pos = 0, item_start, total = 0, n = 0, i
        cdef uint64_t length
        cdef uint32_t now = self._now()
        cdef uint32_t slot
        cdef Entry* e
        cdef char keybuf[256]
        cdef uint32_t* found
        cdef uint32_t* grown
        cdef Py_ssize_t cap = 64
        cdef bint all_hit = True
        cdef Py_ssize_t inner
        cdef char* out
        self._sync()
        found = <uint32_t*>PyMem_RawMalloc(cap * sizeof(uint32_t))
        if found == NULL:
            raise MemoryError()
        try:
            while pos < end:
                if p[pos] != 0x0A or n >= max_items:
                    return None
                pos += 1
                if read_varint(p, end, &pos, &length) < 0 or pos + <Py_ssize_t>length > end:
                    return None
                item_start = pos
                pos += <Py_ssize_t>length
                if n == cap:
                    grown = <uint32_t*>PyMem_RawRealloc(found, 2 * cap * sizeof(uint32_t))
                    if grown == NULL:
                        raise MemoryError()
                    found = grown
                    cap *= 2
                slot = self._resolve_item(p, item_start, pos, now, keybuf)
                found[n] = slot
                n += 1
                if slot == NIL:
                    all_hit = False
                    continue
                e = &self.slots[slot]
                inner = e.vlen if e.flags & F_NEG else answer_inner_size(e.vlen)
                total += 1 + varint_size(inner) + inner
            if all_hit:
                result = PyBytes_FromStringAndSize(NULL, total)
                out = PyBytes_AS_STRING(result)
                for i in range(n):
                    out = self._frame(out, found[i])
                return result
            parts = [None] * n
            for i in range(n):
                if found[i] != NIL:
                    e = &self.slots[found[i]]
                    inner = e.vlen if e.flags & F_NEG else answer_inner_size(e.vlen)
                    part = PyBytes_FromStringAndSize(NULL, 1 + varint_size(inner) + inner)
                    self._frame(PyBytes_AS_STRING(part), found[i])
                    parts[i] = part
            return parts
        finally:
            PyMem_RawFree(found)

    cdef char* _frame(self, char* out, uint32_t slot) noexcept:
        """Writes ``items`` (field 1) holding the ResolveBatchItem for a cached answer."""
        cdef Entry* e = &self.slots[slot]
        if not (e.flags & F_NEG):  # the cached ResolveResponse
            return put_answer_item(out, e.data + e.klen, e.vlen)
        out[0] = 0x0A  # the stored value is the whole ResolveBatchItem
        out = put_varint(out + 1, e.vlen)
        memcpy(out, e.data + e.klen, e.vlen)
        return out + e.vlen

    # --- the Handle protocol (resolver/handle_protocol.py, nodes/handle) ---------------------
    #
    # A cache of Handle answers holds, under the normalised identifier, either (positive) the
    # values section of the answer an anonymous reader gets (int4 count + values), or (negative)
    # an int4 response code followed by the body to send (an error message). A resolution
    # request asking for nothing but a grammatical handle (no index or type filter, no digest,
    # not encrypted, one message) is answered from it: the response copies the request's ids,
    # versions and flags as B.9 says and the handle exactly as written, byte for byte what
    # ``resolver.handle_protocol.respond`` writes on the Python path.

    cdef uint32_t _handle_lookup(self, const unsigned char* p, Py_ssize_t n, uint32_t now, char* keybuf,
                                 HandleQuery* q) noexcept:
        """The slot answering the Handle request p[:n], or NIL (a miss, or a request only the
        Python path answers). Fills ``q`` with what the response needs."""
        cdef Py_ssize_t hl, klen, cut
        cdef const char* key
        cdef uint32_t slot, flags
        cdef uint8_t major, minor
        if n < 60 or n > 20 + 24 + 12 + MAX_IDENTIFIER + 4:
            return NIL
        if p[2] & 0xE0 or be32(p + 12) != 0 or be32(p + 16) != <uint32_t>(n - 20):
            return NIL  # CP/EC/TC, a chunk, or a length that does not match
        if p[2] & 0x03:
            major, minor = p[2] & 0x03, p[3]
        else:
            major, minor = p[0], p[1]
        if major < 2 or (major == 2 and minor < 1):
            return NIL
        if major > 2 or minor > 11:
            major, minor = 2, 11
        if be32(p + 20) != 1 or be32(p + 24) != 0:
            return NIL  # not a resolution request (or a response)
        flags = be32(p + 28)
        if flags & (HANDLE_ENC | HANDLE_RD):
            return NIL
        hl = be32(p + 44)
        if hl < 1 or hl > MAX_IDENTIFIER or 48 + hl + 12 != n or be32(p + 40) != <uint32_t>(hl + 12):
            return NIL
        if be32(p + 48 + hl) != 0 or be32(p + 52 + hl) != 0 or be32(p + 56 + hl) != 0:
            return NIL  # index or type filters, or a credential
        cut = normalise_identifier(<const char*>p + 48, hl, keybuf, &key)
        if cut < 0:
            return NIL
        slot = self._probe(key, hl, now)
        if slot == NIL or (self.slots[slot].flags & F_NEG and self.slots[slot].vlen < 8):
            self.misses += 1  # (a negative entry holds a code and a body: at least 8 bytes)
            return NIL
        self.hits += 1
        q.handle_len = hl
        q.flags = (flags & HANDLE_ECHOED) | HANDLE_REC | HANDLE_AT
        q.major = major
        q.minor = minor
        q.slot = slot
        return slot

    cdef inline Py_ssize_t _handle_size(self, HandleQuery* q) noexcept:
        cdef Entry* e = &self.slots[q.slot]
        if e.flags & F_NEG:
            return 20 + 24 + (<Py_ssize_t>e.vlen - 4) + 4
        return 20 + 24 + 4 + q.handle_len + e.vlen + 4

    cdef void _handle_write(self, const unsigned char* p, HandleQuery* q, unsigned char* out, uint32_t wall,
                            uint32_t serial) noexcept:
        cdef Entry* e = &self.slots[q.slot]
        cdef const unsigned char* value = <const unsigned char*>e.data + e.klen
        cdef Py_ssize_t total = self._handle_size(q)
        cdef Py_ssize_t body
        cdef uint32_t rc
        out[0] = q.major
        out[1] = q.minor
        out[2] = 2
        out[3] = 11
        memcpy(out + 4, p + 4, 8)  # session id, request id
        put_be32(out + 12, 0)
        put_be32(out + 16, <uint32_t>(total - 20))
        put_be32(out + 20, 1)
        if e.flags & F_NEG:
            rc = be32(value)
            body = e.vlen - 4
        else:
            rc = 1
            body = 4 + q.handle_len + e.vlen
        put_be32(out + 24, rc)
        put_be32(out + 28, q.flags)
        out[32] = <unsigned char>(serial >> 8)
        out[33] = <unsigned char>serial
        out[34] = p[34]  # recursion count
        out[35] = 0
        put_be32(out + 36, wall + 43200)
        put_be32(out + 40, <uint32_t>body)
        if e.flags & F_NEG:
            memcpy(out + 44, value + 4, e.vlen - 4)
        else:
            memcpy(out + 44, p + 44, 4 + q.handle_len)  # the handle as the request wrote it
            memcpy(out + 48 + q.handle_len, value, e.vlen)
        put_be32(out + total - 4, 0)  # no credential

    def handle_answer(self, bytes request, uint32_t wall, uint32_t serial):
        """The whole response (envelope + message) to a Handle resolution request that the
        cache answers, else None (a miss, or a request only the Python path answers)."""
        cdef HandleQuery q
        cdef char keybuf[256]
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(request)
        self._sync()
        if self._handle_lookup(p, PyBytes_GET_SIZE(request), self._now(), keybuf, &q) == NIL:
            return None
        response = PyBytes_FromStringAndSize(NULL, self._handle_size(&q))
        self._handle_write(p, &q, <unsigned char*>PyBytes_AS_STRING(response), wall, serial)
        return response


# --- answers from stored records (the miss path) ------------------------------------------
#
# A node stores each record in its wire form (idis.v1.Record). When that form is exactly what
# the protobuf encoder writes (fields in order, shortest varints, no zero or empty scalar, no
# unknown field), the Python path's answer to an anonymous reader, decode -> Record -> public
# values (Record.public_view, what nodes.trust.permissions.readable_part gives a reader without
# READ_VALUE) -> encode, is a copy of the stored bytes without the values that are not publicly
# readable, inside a ResolveResponse with the record's TTL. So it is built here by copying,
# and anything else (absolute TTLs, values the Python path would refuse, a form the encoder
# would not reproduce byte for byte) is left to the Python path.

cdef uint64_t UINT32_LIMIT = 0xFFFFFFFF
cdef uint64_t RECORD_DEFAULT_TTL = DEFAULT_TTL
cdef uint64_t WRITE_DEFAULT_PERMISSIONS = int(DEFAULT_PERMISSIONS)


cdef inline bint canonical_varint(const unsigned char* p, Py_ssize_t end, Py_ssize_t* pos,
                                  uint64_t* out) noexcept nogil:
    """Reads a varint written as the encoder writes it: the shortest form, no bit past 64."""
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef Py_ssize_t first = pos[0]
    cdef unsigned char b
    while pos[0] < end:
        b = p[pos[0]]
        pos[0] += 1
        if shift == 63 and b > 1:
            return False
        v |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            out[0] = v
            return b != 0 or pos[0] - first == 1
        shift += 7
    return False


cdef inline bint canonical_length(const unsigned char* p, Py_ssize_t end, Py_ssize_t* pos,
                                  Py_ssize_t* length) noexcept nogil:
    """Reads the length of a length-delimited field that fits in p[pos:end]."""
    cdef uint64_t v
    if not canonical_varint(p, end, pos, &v) or v > <uint64_t>(end - pos[0]):
        return False
    length[0] = <Py_ssize_t>v
    return True


cdef int scan_reference(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    """0 when the idis.v1.Reference in p[pos:end] is in the encoder's form, else -1."""
    cdef int last = 0, field
    cdef unsigned char tag
    cdef uint64_t v
    cdef Py_ssize_t n
    while pos < end:
        tag = p[pos]
        pos += 1
        field = tag >> 3
        if field <= last:
            return -1
        if tag == 0x0A:  # identifier
            if not canonical_length(p, end, &pos, &n) or n == 0 or not valid_suffix(p + pos, n):
                return -1
            pos += n
        elif tag == 0x10:  # index
            if not canonical_varint(p, end, &pos, &v) or v == 0 or v > UINT32_LIMIT:
                return -1
        else:
            return -1
        last = field
    return 0


cdef int scan_value(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end, uint64_t* ttl) noexcept nogil:
    """Checks the idis.v1.Value in p[pos:end]: 1 when it is publicly readable, 0 when it is
    not, -1 when the Python path must read it (not the encoder's form, an absolute or unknown
    TTL type, permission bits the Python path refuses); sets ``ttl`` to its (relative) TTL."""
    cdef int last = 0, field
    cdef unsigned char tag
    cdef uint64_t v, permissions = 0
    cdef Py_ssize_t n
    ttl[0] = 0
    while pos < end:
        tag = p[pos]
        pos += 1
        field = tag >> 3
        if field < last or (field == last and field != 8):  # only references repeat
            return -1
        if tag == 0x12 or tag == 0x1A or tag == 0x42:  # type, data, a reference
            if not canonical_length(p, end, &pos, &n):
                return -1
            if tag == 0x12:
                if n == 0 or not valid_suffix(p + pos, n):
                    return -1
            elif tag == 0x1A:
                if n == 0:
                    return -1
            elif scan_reference(p, pos, pos + n) < 0:
                return -1
            pos += n
        elif tag == 0x08 or tag == 0x28 or tag == 0x30 or tag == 0x38:  # index, ttl, timestamp, permissions
            if not canonical_varint(p, end, &pos, &v) or v == 0:
                return -1
            if tag == 0x38:
                if v > 0xF:
                    return -1
                permissions = v
            elif tag != 0x30 and v > UINT32_LIMIT:
                return -1
            elif tag == 0x28:
                ttl[0] = v
        else:  # 0x20, ttl_type: an absolute TTL (or an unknown type); anything else is unknown
            return -1
        last = field
    return 1 if permissions & 0x2 else 0


cdef Py_ssize_t scan_record(const unsigned char* p, Py_ssize_t end, uint64_t* ttl, bint* private) noexcept nogil:
    """Checks the idis.v1.Record in p[:end]: returns how many of its bytes an anonymous reader
    gets (all but its values that are not publicly readable), or -1 when the Python path must
    read it; sets ``ttl`` to the record's TTL and ``private`` when a value is left out."""
    cdef Py_ssize_t pos = 0, start, n, kept = 0
    cdef int last = 0, field, readable
    cdef unsigned char tag
    cdef uint64_t v, value_ttl, least = 0xFFFFFFFFFFFFFFFFULL
    cdef bint named = False
    cdef char keybuf[256]
    cdef const char* key
    private[0] = False
    while pos < end:
        start = pos
        tag = p[pos]
        pos += 1
        field = tag >> 3
        if field < last or (field == last and field != 2):  # only values repeat
            return -1
        if tag == 0x0A:  # identifier: the Python path parses it, so it must follow the grammar
            if not canonical_length(p, end, &pos, &n) or n == 0 or n > MAX_IDENTIFIER:
                return -1
            if normalise_identifier(<const char*>p + pos, n, keybuf, &key) < 0:
                return -1
            named = True
            pos += n
            kept += pos - start
        elif tag == 0x12:  # a value
            if not canonical_length(p, end, &pos, &n):
                return -1
            readable = scan_value(p, pos, pos + n, &value_ttl)
            if readable < 0:
                return -1
            least = value_ttl if value_ttl < least else least
            pos += n
            if readable:
                kept += pos - start
            else:
                private[0] = True
        elif tag == 0x18:  # version
            if not canonical_varint(p, end, &pos, &v) or v == 0:
                return -1
            kept += pos - start
        else:
            return -1
        last = field
    if not named:
        return -1
    ttl[0] = least if least != 0xFFFFFFFFFFFFFFFFULL else RECORD_DEFAULT_TTL
    return kept


cdef inline bint next_value(const unsigned char* p, Py_ssize_t end, Py_ssize_t* pos, Py_ssize_t* n) noexcept nogil:
    """In a record ``scan_record`` accepted: moves ``pos`` over the fields before the next value
    to the value's first byte and sets ``n`` to its length (the caller then moves past it);
    False when no value is left."""
    cdef unsigned char tag
    cdef uint64_t v
    while pos[0] < end:
        tag = p[pos[0]]
        pos[0] += 1
        if tag == 0x18:
            canonical_varint(p, end, pos, &v)
            continue
        canonical_length(p, end, pos, n)
        if tag == 0x12:
            return True
        pos[0] += n[0]
    return False


def anonymous_response(bytes record):
    """The serialised ResolveResponse an anonymous reader gets for a record given in its wire
    form: the record with its publicly readable values only, and the record's TTL (the least of
    its values' TTLs); None when only the Python path may build it (see above)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(record)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(record)
    cdef uint64_t ttl, value_ttl, v
    cdef bint private
    cdef Py_ssize_t kept = scan_record(p, end, &ttl, &private)
    cdef Py_ssize_t pos = 0, start, n = 0
    cdef unsigned char tag
    cdef char* out
    if kept < 0:
        return None
    response = PyBytes_FromStringAndSize(
        NULL, 1 + varint_size(kept) + kept + ((1 + varint_size(ttl)) if ttl else 0))
    out = PyBytes_AS_STRING(response)
    out[0] = 0x0A  # record
    out = put_varint(out + 1, kept)
    if not private:
        memcpy(out, p, end)
        out += end
    else:
        while pos < end:  # the fields scan_record accepted, without the values it left out
            start = pos
            tag = p[pos]
            pos += 1
            if tag == 0x18:
                canonical_varint(p, end, &pos, &v)
            else:
                canonical_length(p, end, &pos, &n)
                pos += n
                if tag == 0x12 and scan_value(p, pos - n, pos, &value_ttl) != 1:
                    continue
            memcpy(out, p + start, pos - start)
            out += pos - start
    if ttl:
        out[0] = 0x18  # ttl
        put_varint(out + 1, ttl)
    return response


# --- what a record's attestation leaf covers (resolver.attestation) -----------------------

def record_digests(bytes record not None, bytes salt not None):
    """(public part, private digest) of a record in wire form: resolver.attestation's
    ``public_part`` and ``private_digest(salt)`` of its values, from the values' wire forms as
    they lie in the record (nothing decoded); None when only the Python path may make them (a
    form ``anonymous_response`` leaves to it, or values out of index order)."""
    return _record_digests(record, salt)


LEAF_PREFIX = b"\x00idis-record-v1"
"""What a record's leaf hash begins with (resolver.attestation.leaf_hash: LEAF, RECORD_LEAF)."""


def record_leaves(list keys not None, list versions not None, list records not None, bytes secret not None):
    """The Merkle leaves (resolver.attestation.leaf_hash) of records in wire form, each salted
    with ``record_salt(secret, key, version)``; None for a record only the Python path may hash
    (see ``record_digests``). The SHA-256s are OpenSSL's, called directly."""
    if not len(keys) == len(versions) == len(records):
        raise ValueError("keys, versions and records differ in length")
    cdef Py_ssize_t i, klen, n = len(keys)
    cdef bytes name, public, leaf
    cdef unsigned char head[17]
    cdef unsigned char tail[8]
    cdef uint64_t version
    cdef SHA256_CTX c
    base = hashlib.blake2b(key=secret, digest_size=16)
    memcpy(head, PyBytes_AS_STRING(LEAF_PREFIX), 15)
    leaves = []
    for i in range(n):
        name = (<str>keys[i]).encode()
        version = <uint64_t>versions[i]
        klen = len(name)
        if klen > 0xFFFF:
            raise OverflowError(f"a key of {klen} bytes")  # its length is two bytes of the leaf
        if type(records[i]) is not bytes:
            raise TypeError(f"a record is bytes, not {type(records[i]).__name__}")
        put_be64(tail, version)
        h = base.copy()
        h.update(_salt_input(name, tail))
        digests = _record_digests(<bytes>records[i], h.digest())
        if digests is None:
            leaves.append(None)
            continue
        public = <bytes>digests[0]
        head[15] = <unsigned char>((klen >> 8) & 0xFF)
        head[16] = <unsigned char>(klen & 0xFF)
        leaf = PyBytes_FromStringAndSize(NULL, 32)
        SHA256_Init(&c)
        SHA256_Update(&c, head, 17)
        SHA256_Update(&c, PyBytes_AS_STRING(name), klen)
        SHA256_Update(&c, tail, 8)
        SHA256_Update(&c, PyBytes_AS_STRING(<bytes>digests[1]), 32)
        SHA256_Update(&c, PyBytes_AS_STRING(public), PyBytes_GET_SIZE(public))
        SHA256_Final(<unsigned char*>PyBytes_AS_STRING(leaf), &c)
        leaves.append(leaf)
    return leaves


def tree_levels(list leaves not None):
    """A Merkle tree over ``leaves`` (32-byte hashes) level by level, bottom up, each level's
    hashes concatenated: resolver.attestation.merkle_levels (RFC 9162's tree; a level's last
    node without a sibling moves up unhashed)."""
    cdef Py_ssize_t n = len(leaves), i, m
    if n == 0:
        raise ValueError("a Merkle tree needs at least one leaf")
    for leaf in leaves:
        if len(<bytes>leaf) != 32:
            raise ValueError("a leaf is a 32-byte hash")
    cdef bytes level = b"".join(leaves)
    cdef bytes out
    cdef unsigned char interior = 1  # RFC 9162's interior node
    cdef SHA256_CTX c
    cdef const char* below
    cdef unsigned char* above
    levels = [level]
    while n > 1:
        m = (n + 1) // 2
        out = PyBytes_FromStringAndSize(NULL, 32 * m)
        below = PyBytes_AS_STRING(level)
        above = <unsigned char*>PyBytes_AS_STRING(out)
        with nogil:
            for i in range(n // 2):
                SHA256_Init(&c)
                SHA256_Update(&c, &interior, 1)
                SHA256_Update(&c, below + 64 * i, 64)
                SHA256_Final(above + 32 * i, &c)
        if n % 2:
            memcpy(above + 32 * (m - 1), below + 32 * (n - 1), 32)
        levels.append(out)
        level, n = out, m
    return levels


def record_salt(bytes secret not None, str key not None, uint64_t version):
    """A record's salt: the keyed BLAKE2b (16 bytes) of its key and version under the node's secret."""
    cdef unsigned char be_version[8]
    put_be64(be_version, version)
    return hashlib.blake2b(_salt_input(key.encode(), be_version), key=secret, digest_size=16).digest()


cdef bytes _salt_input(bytes name, const unsigned char* be_version):
    """What a record's salt hashes: its key, a zero byte, its version (8 bytes, big-endian)."""
    cdef Py_ssize_t klen = PyBytes_GET_SIZE(name)
    cdef bytes salted = PyBytes_FromStringAndSize(NULL, klen + 9)
    cdef char* out = PyBytes_AS_STRING(salted)
    memcpy(out, PyBytes_AS_STRING(name), klen)
    out[klen] = 0
    memcpy(out + klen + 1, be_version, 8)
    return salted


cdef object _record_digests(bytes record, bytes salt):
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(record)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(record)
    cdef uint64_t ttl, value_ttl, index, last_index = 0
    cdef bint private
    cdef Py_ssize_t pos = 0, at, n = 0, public_size = 0
    cdef unsigned char* out
    cdef unsigned char length[4]
    cdef unsigned char salt_size
    cdef SHA256_CTX c
    if scan_record(p, end, &ttl, &private) < 0:
        return None
    if PyBytes_GET_SIZE(salt) > 255:
        raise ValueError("bytes must be in range(0, 256)")  # what the twin's bytes([len(salt)]) raises
    while next_value(p, end, &pos, &n):  # first the public part's size (and the indexes' order)
        at = pos + 1  # a value's first field is its index (non-zero: scan_value checked it)
        if n == 0 or p[pos] != 0x08 or not canonical_varint(p, pos + n, &at, &index) or index <= last_index:
            return None
        last_index = index
        if scan_value(p, pos, pos + n, &value_ttl) == 1:
            public_size += 4 + n
        pos += n
    public = PyBytes_FromStringAndSize(NULL, public_size)
    out = <unsigned char*>PyBytes_AS_STRING(public)
    # The private digest: SHA-256 of "idis-private", the salt's length and the salt, then each
    # private value's length and bytes, hashed as they lie in the record.
    salt_size = <unsigned char>PyBytes_GET_SIZE(salt)
    SHA256_Init(&c)
    SHA256_Update(&c, b"idis-private", 12)
    SHA256_Update(&c, &salt_size, 1)
    SHA256_Update(&c, PyBytes_AS_STRING(salt), salt_size)
    pos = 0
    while next_value(p, end, &pos, &n):  # then each value's length and bytes, to its side
        if scan_value(p, pos, pos + n, &value_ttl) == 1:
            put_be32(out, <uint32_t>n)
            memcpy(out + 4, p + pos, n)
            out += 4 + n
        else:
            put_be32(length, <uint32_t>n)
            SHA256_Update(&c, length, 4)
            SHA256_Update(&c, p + pos, n)
        pos += n
    digest = PyBytes_FromStringAndSize(NULL, 32)
    SHA256_Final(<unsigned char*>PyBytes_AS_STRING(digest), &c)
    return public, digest


# --- registrations from the wire (BatchCreate's fast path) ----------------------------------
#
# ``created_records`` reads a BatchCreateRequest in wire form and gives, for each item the
# Python path would accept as it is, the record as a node stores it at version 1: the identifier
# as written, the values in index order with the TTL and permission defaults of a write applied
# and every value stamped ``now``, version 1 -- byte for byte what resolver.wire.encode_stamped
# writes for the Record the Python path makes of it (resolver.wire.values_from_pb, then
# resolver.record.check_values). Left to the Python path (None), which accepts or refuses it
# with its reasons: an identifier that breaks the grammar, an item without values, a value whose
# type starts with "HS_" (HS_ADMIN and every credential type among them: their rights, data
# checks and sealing are the Python path's), references, indexes not in increasing order, a
# limit reached, a TTL type other than relative (0) or absolute (1), unknown permission bits,
# and any form the encoder would not write (fields out of order or repeated, zero values
# written out, unknown fields).

cdef struct PlainValue:
    uint64_t index
    uint64_t ttl_type
    uint64_t ttl
    uint64_t permissions
    Py_ssize_t type_at
    Py_ssize_t type_length
    Py_ssize_t data_at
    Py_ssize_t data_length


cdef struct WriteLimits:
    Py_ssize_t max_values
    Py_ssize_t max_value_bytes
    Py_ssize_t max_type_bytes
    Py_ssize_t max_record_bytes


cdef int plain_value(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end, const WriteLimits* limits,
                     PlainValue* v) noexcept nogil:
    """Reads the idis.v1.Value in p[pos:end] into ``v``: 0, or -1 when the Python path must."""
    cdef int last = 0, field
    cdef unsigned char tag
    cdef uint64_t number
    cdef Py_ssize_t n
    v.index = v.ttl_type = v.ttl = v.permissions = 0
    v.type_length = v.data_length = 0
    v.type_at = v.data_at = 0
    while pos < end:
        tag = p[pos]
        pos += 1
        field = tag >> 3
        if field <= last:
            return -1
        if tag == 0x12 or tag == 0x1A:  # type, data
            if not canonical_length(p, end, &pos, &n) or n == 0:
                return -1
            if tag == 0x12:
                if (n > limits.max_type_bytes or not valid_suffix(p + pos, n)
                        or (n >= 3 and p[pos] == 72 and p[pos + 1] == 83 and p[pos + 2] == 95)):  # "HS_"
                    return -1
                v.type_at = pos
                v.type_length = n
            else:
                if n > limits.max_value_bytes:
                    return -1
                v.data_at = pos
                v.data_length = n
            pos += n
        elif tag == 0x08 or tag == 0x20 or tag == 0x28 or tag == 0x30 or tag == 0x38:
            if not canonical_varint(p, end, &pos, &number) or number == 0:
                return -1
            if tag == 0x08:
                if number > UINT32_LIMIT:
                    return -1
                v.index = number
            elif tag == 0x20:  # ttl_type: absolute
                if number != 1:
                    return -1
                v.ttl_type = number
            elif tag == 0x28:
                if number > UINT32_LIMIT:
                    return -1
                v.ttl = number
            elif tag == 0x38:
                if number > 0xF:
                    return -1
                v.permissions = number
            # 0x30, a timestamp: the node sets its own
        else:  # references (0x42) and unknown fields
            return -1
        last = field
    if v.index == 0 or v.type_length == 0:
        return -1
    if v.ttl == 0:
        v.ttl = RECORD_DEFAULT_TTL
    if v.permissions == 0:
        v.permissions = WRITE_DEFAULT_PERMISSIONS
    return 0


cdef inline Py_ssize_t plain_value_size(const PlainValue* v, uint64_t now) noexcept nogil:
    cdef Py_ssize_t size = 1 + varint_size(v.index) + 1 + varint_size(v.type_length) + v.type_length
    if v.data_length:
        size += 1 + varint_size(v.data_length) + v.data_length
    if v.ttl_type:
        size += 2
    size += 1 + varint_size(v.ttl)
    if now:
        size += 1 + varint_size(now)
    return size + 2  # permissions: 1..15


cdef char* put_plain_value(char* out, const unsigned char* p, const PlainValue* v, uint64_t now) noexcept nogil:
    out[0] = 0x08
    out = put_varint(out + 1, v.index)
    out[0] = 0x12
    out = put_varint(out + 1, v.type_length)
    memcpy(out, p + v.type_at, v.type_length)
    out += v.type_length
    if v.data_length:
        out[0] = 0x1A
        out = put_varint(out + 1, v.data_length)
        memcpy(out, p + v.data_at, v.data_length)
        out += v.data_length
    if v.ttl_type:
        out[0] = 0x20
        out[1] = <char>v.ttl_type
        out += 2
    out[0] = 0x28
    out = put_varint(out + 1, v.ttl)
    if now:
        out[0] = 0x30
        out = put_varint(out + 1, now)
    out[0] = 0x38
    out[1] = <char>v.permissions
    return out + 2


cdef object created_record(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end, const WriteLimits* limits,
                           uint64_t now):
    """(identifier, length of its prefix, stored record) for the CreateRequest in p[pos:end],
    or None for the Python path."""
    cdef Py_ssize_t n, at, length, size = 0, count = 0, total = 0, prefix_length
    cdef Py_ssize_t first, identifier_at, identifier_length
    cdef uint64_t previous = 0
    cdef PlainValue v
    cdef char keybuf[256]
    cdef const char* key
    cdef char* out
    if pos >= end or p[pos] != 0x0A:
        return None
    pos += 1
    if not canonical_length(p, end, &pos, &identifier_length) or identifier_length == 0:
        return None
    if identifier_length > MAX_IDENTIFIER:
        return None
    identifier_at = pos
    prefix_length = normalise_identifier(<const char*>p + pos, identifier_length, keybuf, &key)
    if prefix_length < 0:
        return None
    pos += identifier_length
    first = pos
    while pos < end:  # the values: checked, and the stored record's size
        if p[pos] != 0x12:
            return None
        pos += 1
        if not canonical_length(p, end, &pos, &length):
            return None
        if plain_value(p, pos, pos + length, limits, &v) < 0 or v.index <= previous:
            return None
        previous = v.index
        count += 1
        total += v.data_length + v.type_length + 32
        if count > limits.max_values or total > limits.max_record_bytes:
            return None
        n = plain_value_size(&v, now)
        size += 1 + varint_size(n) + n
        pos += length
    if count == 0:
        return None
    size += 1 + varint_size(identifier_length) + identifier_length + 2
    record = PyBytes_FromStringAndSize(NULL, size)
    out = PyBytes_AS_STRING(record)
    out[0] = 0x0A
    out = put_varint(out + 1, identifier_length)
    memcpy(out, p + identifier_at, identifier_length)
    out += identifier_length
    pos = first
    while pos < end:
        pos += 1
        canonical_length(p, end, &pos, &length)
        plain_value(p, pos, pos + length, limits, &v)
        out[0] = 0x12
        out = put_varint(out + 1, plain_value_size(&v, now))
        out = put_plain_value(out, p, &v, now)
        pos += length
    out[0] = 0x18  # version 1
    out[1] = 0x01
    identifier = PyUnicode_DecodeUTF8(<const char*>p + identifier_at, identifier_length, NULL)
    return identifier, prefix_length, record


def created_records(bytes request, long long now, Py_ssize_t max_values, Py_ssize_t max_value_bytes,
                    Py_ssize_t max_type_bytes, Py_ssize_t max_record_bytes):
    """For each item of the BatchCreateRequest ``request`` (wire form): (identifier as written,
    length of its prefix, the record as stored at version 1 with every value stamped ``now``),
    or None when the Python path must make it (see above); None for the whole request when it
    holds anything but items."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(request)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(request)
    cdef Py_ssize_t pos = 0, length
    cdef WriteLimits limits
    limits.max_values = max_values
    limits.max_value_bytes = max_value_bytes
    limits.max_type_bytes = max_type_bytes
    limits.max_record_bytes = max_record_bytes
    out = []
    while pos < end:
        if p[pos] != 0x0A:
            return None
        pos += 1
        if not canonical_length(p, end, &pos, &length):
            return None
        out.append(created_record(p, pos, pos + length, &limits, <uint64_t>now))
        pos += length
    return out


def count_items(bytes request):
    """How many items a batch request in wire form holds (its field 1, length-delimited, the
    only field of ResolveBatchRequest and BatchCreateRequest), without decoding them; -1 when it
    holds anything else."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(request)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(request)
    cdef Py_ssize_t pos = 0, length, count = 0
    while pos < end:
        if p[pos] != 0x0A:
            return -1
        pos += 1
        if not canonical_length(p, end, &pos, &length):
            return -1
        pos += length
        count += 1
    return count


# --- the Handle protocol's answer from a stored record (its miss path) ----------------------
#
# The values section (int4 count, then each value as HANDLE-INTEROP.md B.5 encodes it) of the
# Handle answer an anonymous reader gets: the record's publicly readable values, byte for byte
# what resolver.handle_protocol.values_section writes for them on the Python path. Left to the
# Python path: whatever anonymous_response leaves to it (absolute TTLs, forms the encoder would
# not write), an HS_ADMIN value among the public ones (its data is converted to Handle's binary
# form), and a record with no public value (rc 200).

cdef Py_ssize_t handle_references(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                                  unsigned char* out) noexcept nogil:
    """The references from p[pos:end] (the value's last fields, each an idis.v1.Reference) as
    Handle encodes them, an identifier blob and an int4 index each, into ``out`` (when not
    NULL); returns their size."""
    cdef Py_ssize_t n, r, rend, size = 0
    cdef uint64_t index
    cdef unsigned char tag
    while pos < end:
        pos += 1
        canonical_length(p, end, &pos, &n)
        rend = pos + n
        r = 0
        index = 0
        while pos < rend:
            tag = p[pos]
            pos += 1
            if tag == 0x0A:
                canonical_length(p, rend, &pos, &r)
                if out != NULL:
                    memcpy(out + size + 4, p + pos, r)
                pos += r
            else:
                canonical_varint(p, rend, &pos, &index)
        if out != NULL:
            put_be32(out + size, <uint32_t>r)
            put_be32(out + size + 4 + r, <uint32_t>index)
        size += 8 + r
    return size


cdef Py_ssize_t handle_value(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end, unsigned char* out) noexcept nogil:
    """Encodes the idis.v1.Value in p[pos:end] (already checked by scan_value) as a Handle
    value into ``out`` (when not NULL); returns its size, or -1 for an HS_ADMIN value."""
    cdef uint64_t index = 0, ttl = 0, timestamp = 0, permissions = 0, v
    cdef Py_ssize_t type_at = 0, type_len = 0, data_at = 0, data_len = 0, n, refs = 0, size
    cdef Py_ssize_t refs_at = -1
    cdef unsigned char tag
    while pos < end:
        tag = p[pos]
        pos += 1
        if tag == 0x12 or tag == 0x1A or tag == 0x42:
            canonical_length(p, end, &pos, &n)
            if tag == 0x12:
                type_at, type_len = pos, n
            elif tag == 0x1A:
                data_at, data_len = pos, n
            else:
                if refs_at < 0:
                    refs_at = pos - 1 - varint_size(n)
                refs += 1
            pos += n
        else:
            canonical_varint(p, end, &pos, &v)
            if tag == 0x08:
                index = v
            elif tag == 0x28:
                ttl = v
            elif tag == 0x30:
                timestamp = v
            elif tag == 0x38:
                permissions = v
    if type_len == 8 and memcmp(p + type_at, b"HS_ADMIN", 8) == 0:
        return -1
    size = 14 + 4 + type_len + 4 + data_len + 4
    if refs_at >= 0:
        size += handle_references(p, refs_at, end, NULL)
    if out == NULL:
        return size
    put_be32(out, <uint32_t>index)
    put_be32(out + 4, <uint32_t>timestamp)
    out[8] = 0  # relative: an absolute TTL never reaches here
    put_be32(out + 9, <uint32_t>ttl)
    out[13] = <unsigned char>permissions
    put_be32(out + 14, <uint32_t>type_len)
    memcpy(out + 18, p + type_at, type_len)
    out += 18 + type_len
    put_be32(out, <uint32_t>data_len)
    memcpy(out + 4, p + data_at, data_len)
    out += 4 + data_len
    put_be32(out, <uint32_t>refs)
    if refs_at >= 0:
        handle_references(p, refs_at, end, out + 4)
    return size


def handle_values(bytes record):
    """The values section of the Handle answer an anonymous reader gets for a record given in
    its stored wire form, or None when only the Python path may build it (see above)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(record)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(record)
    cdef uint64_t ttl, value_ttl
    cdef bint private
    cdef Py_ssize_t pos = 0, n = 0, size = 4, one
    cdef uint32_t count = 0
    cdef unsigned char* out = NULL
    if scan_record(p, end, &ttl, &private) < 0:
        return None
    for writing in range(2):
        if writing:
            if count == 0:
                return None
            section = PyBytes_FromStringAndSize(NULL, size)
            out = <unsigned char*>PyBytes_AS_STRING(section)
            put_be32(out, count)
            out += 4
        pos = 0
        while next_value(p, end, &pos, &n):
            if scan_value(p, pos, pos + n, &value_ttl) == 1:
                one = handle_value(p, pos, pos + n, out if writing else NULL)
                if one < 0:
                    return None
                if writing:
                    out += one
                else:
                    size += one
                    count += 1
            pos += n
    return section


cdef object key_and_identifier(const unsigned char* p, Py_ssize_t end, const char* key, Py_ssize_t klen):
    written = PyBytes_FromStringAndSize(<const char*>p + end - klen, klen)
    if key == <const char*>p + end - klen:
        return (written, written)
    return (PyBytes_FromStringAndSize(key, klen), written)


def identifier_of(bytes request):
    """``(key, identifier as written)`` of a serialised ResolveRequest that asks for nothing but
    an identifier following the grammar (no filters, not recursive), else None."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(request)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(request)
    cdef char keybuf[256]
    cdef const char* key
    cdef Py_ssize_t klen
    if plain_request(p, 0, end, keybuf, &key, &klen) < 0:
        return None
    return key_and_identifier(p, end, key, klen)


def identifiers_of(bytes request):
    """``identifier_of`` each request of a serialised ResolveBatchRequest (None for those asking
    for more), or None when the batch is malformed."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(request)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(request)
    cdef Py_ssize_t pos = 0, item_start, klen
    cdef uint64_t length
    cdef char keybuf[256]
    cdef const char* key
    out = []
    while pos < end:
        if p[pos] != 0x0A:
            return None
        pos += 1
        if read_varint(p, end, &pos, &length) < 0 or length > <uint64_t>(end - pos):
            return None
        item_start = pos
        pos += <Py_ssize_t>length
        if plain_request(p, item_start, pos, keybuf, &key, &klen) < 0:
            out.append(None)
        else:
            out.append(key_and_identifier(p, pos, key, klen))
    return out


def answer_item(bytes response):
    """A serialised ResolveResponse as one framed ResolveBatchResponse.items entry with status
    OK: the bytes the Python path and the fast path produce for a successful item."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(response)
    cdef Py_ssize_t inner = answer_inner_size(n)
    item = PyBytes_FromStringAndSize(NULL, 1 + varint_size(inner) + inner)
    put_answer_item(PyBytes_AS_STRING(item), PyBytes_AS_STRING(response), n)
    return item


# --- the Handle protocol over UDP: receive and answer in batches -----------------------------

cdef enum:
    UDP_BATCH = 64
    UDP_BUFFER = 4096
    UDP_ANSWER = 512  # the largest answer sent from here: one datagram (HANDLE-INTEROP B.1)


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class UdpEndpoint:
    """The receive-and-answer loop of a node's Handle UDP socket: reads up to 64 datagrams per
    system call (recvmmsg), answers cache hits straight from the compiled cache into send
    buffers, sends them with one system call (sendmmsg), and hands back only what the Python
    side must answer. Never answered: datagrams that are responses (non-zero response code),
    come from port 0 or this socket's own port, or exceed the per-source budget (a token bucket
    per source address, ``rate`` answers/s with bursts of ``burst``; 0: unlimited). The socket
    (``fd``, non-blocking) stays its owner's."""

    cdef int fd
    cdef unsigned short own_port
    cdef mmsghdr rmsg[UDP_BATCH]
    cdef iovec riov[UDP_BATCH]
    cdef sockaddr_storage raddr[UDP_BATCH]
    cdef mmsghdr smsg[UDP_BATCH]
    cdef iovec siov[UDP_BATCH]
    cdef unsigned char* rbuf
    cdef unsigned char* sbuf
    cdef double rate, burst
    cdef uint64_t* tags
    cdef double* tokens
    cdef double* stamps
    cdef uint32_t mask
    cdef uint64_t key
    cdef readonly uint64_t received, answered, passed, limited, ignored, send_failures

    def __cinit__(self, int fd, double rate=0, double burst=0, uint32_t buckets=65536, int own_port=0):
        cdef uint32_t size = 1
        while size < buckets:
            size <<= 1
        self.fd = fd
        self.key = int.from_bytes(os.urandom(8), "little") | 1
        self.own_port = <unsigned short>own_port
        self.rate = rate
        self.burst = burst if burst > 0 else (rate if rate > 0 else 1)
        self.mask = size - 1
        self.rbuf = <unsigned char*>PyMem_RawMalloc(UDP_BATCH * UDP_BUFFER)
        self.sbuf = <unsigned char*>PyMem_RawMalloc(UDP_BATCH * UDP_ANSWER)
        self.tags = <uint64_t*>PyMem_RawCalloc(size, sizeof(uint64_t))
        self.tokens = <double*>PyMem_RawCalloc(size, sizeof(double))
        self.stamps = <double*>PyMem_RawCalloc(size, sizeof(double))
        if self.rbuf == NULL or self.sbuf == NULL or self.tags == NULL or self.tokens == NULL or self.stamps == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_RawFree(self.rbuf)
        PyMem_RawFree(self.sbuf)
        PyMem_RawFree(self.tags)
        PyMem_RawFree(self.tokens)
        PyMem_RawFree(self.stamps)

    cdef inline unsigned short _port(self, const unsigned char* addr) noexcept:
        # sin_port and sin6_port both follow the 2-byte family, in network order
        return (<unsigned short>addr[2] << 8) | addr[3]

    cdef bint _admit(self, const unsigned char* addr, socklen_t n, double now) noexcept:
        """One answer's worth of the source's budget: False when it has none left. Sources are
        IPv4 addresses (also as IPv4-mapped IPv6 on a dual-stack socket) and IPv6 /64s, hashed
        with this process's random key, so nobody can pick an address that shares a victim's
        bucket; a bucket taken over by another source keeps its tokens (a collision limits
        both, it never refills one)."""
        cdef uint64_t tag = self.key
        cdef uint32_t i, b, first = 4, last = 8
        cdef double t
        if self.rate <= 0:
            return True
        if (<sockaddr_storage*>addr).ss_family == AF_INET6:
            first, last = 8, 16  # the /64 of sin6_addr (bytes 8..24 of sockaddr_in6)
            if memcmp(addr + 8, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0:
                first, last = 20, 24  # ::ffff:a.b.c.d, an IPv4 client
        for i in range(first, last):
            tag = (tag ^ addr[i]) * 0x100000001B3ULL
        tag |= 1
        b = <uint32_t>(tag ^ (tag >> 29)) & self.mask
        if self.tags[b] == 0:  # never used: a full bucket
            self.tokens[b] = self.burst
            self.stamps[b] = now
        self.tags[b] = tag
        t = self.tokens[b] + (now - self.stamps[b]) * self.rate
        self.tokens[b] = t if t < self.burst else self.burst
        self.stamps[b] = now
        if self.tokens[b] < 1:
            return False
        self.tokens[b] -= 1
        return True

    cdef void _send(self, int count) noexcept:
        cdef int sent = 0, r
        while sent < count:
            r = sendmmsg(self.fd, &self.smsg[sent], count - sent, MSG_DONTWAIT)
            if r <= 0:
                self.send_failures += count - sent  # a full socket buffer: UDP may drop
                return
            sent += r

    def serve(self, LookupCache cache, uint32_t wall, uint32_t serial):
        """Reads one batch of datagrams and answers what the cache can (``cache`` None: the
        Python side answers everything). Returns None when nothing was waiting, else the
        datagrams left to the Python side as ``(datagram, source)`` pairs (``source`` is
        opaque: give it back to ``send``)."""
        cdef int n, i, k = 0
        cdef unsigned int length
        cdef const unsigned char* p
        cdef const unsigned char* addr
        cdef HandleQuery q
        cdef char keybuf[256]
        cdef uint32_t now = 0
        cdef double clock = monotonic()
        cdef Py_ssize_t size
        for i in range(UDP_BATCH):
            self.riov[i].iov_base = self.rbuf + i * UDP_BUFFER
            self.riov[i].iov_len = UDP_BUFFER
            self.rmsg[i].msg_hdr.msg_name = &self.raddr[i]
            self.rmsg[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            self.rmsg[i].msg_hdr.msg_iov = &self.riov[i]
            self.rmsg[i].msg_hdr.msg_iovlen = 1
            self.rmsg[i].msg_hdr.msg_control = NULL
            self.rmsg[i].msg_hdr.msg_controllen = 0
            self.rmsg[i].msg_hdr.msg_flags = 0
        with nogil:
            n = recvmmsg(self.fd, self.rmsg, UDP_BATCH, MSG_DONTWAIT, NULL)
        if n <= 0:
            return None
        if cache is not None:
            cache._sync()
            now = cache._now()
        rest = []
        self.received += n
        for i in range(n):
            p = self.rbuf + i * UDP_BUFFER
            addr = <const unsigned char*>&self.raddr[i]
            length = self.rmsg[i].msg_len
            if self._port(addr) == 0 or self._port(addr) == self.own_port or (length >= 28 and be32(p + 24) != 0):
                self.ignored += 1  # spoofed reflection or a response: never answered
                continue
            if not self._admit(addr, self.rmsg[i].msg_hdr.msg_namelen, clock):
                self.limited += 1
                continue
            if cache is not None and not (self.rmsg[i].msg_hdr.msg_flags & MSG_TRUNC):
                if cache._handle_lookup(p, length, now, keybuf, &q) != NIL:
                    size = cache._handle_size(&q)
                    if size <= UDP_ANSWER:
                        cache._handle_write(p, &q, self.sbuf + k * UDP_ANSWER, wall, serial)
                        self.siov[k].iov_base = self.sbuf + k * UDP_ANSWER
                        self.siov[k].iov_len = size
                        self.smsg[k].msg_hdr.msg_name = &self.raddr[i]
                        self.smsg[k].msg_hdr.msg_namelen = self.rmsg[i].msg_hdr.msg_namelen
                        self.smsg[k].msg_hdr.msg_iov = &self.siov[k]
                        self.smsg[k].msg_hdr.msg_iovlen = 1
                        self.smsg[k].msg_hdr.msg_control = NULL
                        self.smsg[k].msg_hdr.msg_controllen = 0
                        self.smsg[k].msg_hdr.msg_flags = 0
                        k += 1
                        continue
            self.passed += 1
            rest.append((
                PyBytes_FromStringAndSize(<const char*>p, length),
                PyBytes_FromStringAndSize(<const char*>addr, self.rmsg[i].msg_hdr.msg_namelen),
            ))
        if k:
            self.answered += k
            self._send(k)
        return rest

    def send(self, bytes source, list datagrams):
        """Sends ``datagrams`` (at most 64) to ``source`` (as ``serve`` gave it)."""
        cdef int k = 0
        cdef bytes d
        if len(datagrams) > UDP_BATCH:
            raise ValueError(f"at most {UDP_BATCH} datagrams at once")
        for d in datagrams:
            self.siov[k].iov_base = <void*>PyBytes_AS_STRING(d)
            self.siov[k].iov_len = PyBytes_GET_SIZE(d)
            self.smsg[k].msg_hdr.msg_name = <void*>PyBytes_AS_STRING(source)
            self.smsg[k].msg_hdr.msg_namelen = PyBytes_GET_SIZE(source)
            self.smsg[k].msg_hdr.msg_iov = &self.siov[k]
            self.smsg[k].msg_hdr.msg_iovlen = 1
            self.smsg[k].msg_hdr.msg_control = NULL
            self.smsg[k].msg_hdr.msg_controllen = 0
            self.smsg[k].msg_hdr.msg_flags = 0
            k += 1
        self._send(k)

    def close(self):
        """The socket is its owner's to close; nothing to release here but buffers (on free)."""


# --- metadata templates: the write side's fast path -------------------------------------------
#
# ``TemplateCheck(template).fits(record)`` reads a record in its stored wire form and says True
# only when resolver.template finds no fault in it (``check_fields`` and ``exposed`` both empty):
# every required item there, none twice, no restricted item publicly readable, every item's value
# valid UTF-8 within its length bounds and of its type. False means "ask the Python check",
# which lists the faults -- or finds none, for the forms this check does not follow: digits,
# URLs and email addresses with anything but printable ASCII, date formats other than
# YYYY-MM-DD (and datetimes other than YYYY-MM-DD HH:mm:ss / ...THH:mm:ss), numbers over 63
# characters, a record not in the encoder's form. ``template_reference`` picks out the data of
# a record's one TEMPLATE value the same way (None: none, several, or ask Python).

cdef enum:
    K_STRING = 0
    K_INTEGER = 1
    K_NUMBER = 2
    K_DATE = 3
    K_DATETIME = 4
    K_ENUM = 5
    K_URL = 6
    K_EMAIL = 7
    K_PYTHON = 8  # a form only the Python check reads

cdef struct ItemRule:
    const unsigned char* name
    Py_ssize_t name_length
    int kind
    unsigned char separator  # a datetime's: ' ' or 'T'
    bint required
    bint restricted
    Py_ssize_t min_length
    Py_ssize_t max_length
    bint has_minimum
    bint has_maximum
    double minimum
    double maximum

cdef extern from "Python.h":
    double PyOS_string_to_double(const char* text, char** end, PyObject* overflow) except? -1.0

cdef enum:
    MAX_TEMPLATE_ITEMS = 256
    MAX_NUMBER_CHARS = 63


cdef Py_ssize_t utf8_characters(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """How many characters p[:n] holds when it is UTF-8 as Python's strict decoder takes it
    (no overlong forms, no surrogates, nothing past U+10FFFF); -1 otherwise."""
    cdef Py_ssize_t i = 0, count = 0, more, k
    cdef unsigned char c, low, high
    while i < n:
        c = p[i]
        low, high = 0x80, 0xBF
        if c < 0x80:
            i += 1
            count += 1
            continue
        if 0xC2 <= c <= 0xDF:
            more = 1
        elif c == 0xE0:
            more, low = 2, 0xA0
        elif c == 0xED:
            more, high = 2, 0x9F
        elif 0xE1 <= c <= 0xEF:
            more = 2
        elif c == 0xF0:
            more, low = 3, 0x90
        elif c == 0xF4:
            more, high = 3, 0x8F
        elif 0xF1 <= c <= 0xF3:
            more = 3
        else:
            return -1
        if i + more >= n:
            return -1
        if not (low <= p[i + 1] <= high):
            return -1
        for k in range(2, more + 1):
            if not (0x80 <= p[i + k] <= 0xBF):
                return -1
        i += more + 1
        count += 1
    return count


cdef inline bint is_digit(unsigned char c) noexcept nogil:
    return 48 <= c <= 57


cdef inline bint printable_ascii(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """No byte but printable, non-space ASCII (what \\S surely matches)."""
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] < 0x21 or p[i] > 0x7E:
            return False
    return True


cdef inline int two_digits(const unsigned char* p) noexcept nogil:
    if not (is_digit(p[0]) and is_digit(p[1])):
        return -1
    return (p[0] - 48) * 10 + (p[1] - 48)


cdef bint iso_date(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """p[:n] is YYYY-MM-DD, a real day of a year 1..9999 (as date.fromisoformat takes it)."""
    cdef int year, month, day, days
    if n != 10 or p[4] != 45 or p[7] != 45:
        return False
    if two_digits(p) < 0 or two_digits(p + 2) < 0:
        return False
    year = two_digits(p) * 100 + two_digits(p + 2)
    month, day = two_digits(p + 5), two_digits(p + 8)
    if year < 1 or month < 1 or month > 12 or day < 1:
        return False
    if month == 2:
        days = 29 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 28
    elif month == 4 or month == 6 or month == 9 or month == 11:
        days = 30
    else:
        days = 31
    return day <= days


cdef bint iso_datetime(const unsigned char* p, Py_ssize_t n, unsigned char separator) noexcept nogil:
    """p[:n] is YYYY-MM-DD<separator>HH:mm:ss, a real day and time (as strptime takes it)."""
    cdef int hour, minute, second
    if n != 19 or not iso_date(p, 10) or p[10] != separator or p[13] != 58 or p[16] != 58:
        return False
    hour, minute, second = two_digits(p + 11), two_digits(p + 14), two_digits(p + 17)
    return 0 <= hour <= 23 and 0 <= minute <= 59 and 0 <= second <= 59


cdef Py_ssize_t digits(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Where the run of ASCII digits from p[i] ends."""
    while i < n and is_digit(p[i]):
        i += 1
    return i


cdef bint decimal_number(const unsigned char* p, Py_ssize_t n, bint integer) noexcept nogil:
    """p[:n] in ASCII is resolver.template's INTEGER (``[+-]?\\d{1,30}``) or NUMBER."""
    cdef Py_ssize_t i = 0, j, k
    if i < n and (p[i] == 43 or p[i] == 45):
        i += 1
    j = digits(p, i, n)
    if integer:
        return j == n and 1 <= j - i <= 30
    k = j
    if k < n and p[k] == 46:  # "."
        k = digits(p, k + 1, n)
        if j == i and k == j + 1:  # "." alone, no digit on either side
            return False
    elif j == i:
        return False
    if k < n and (p[k] == 101 or p[k] == 69):  # e, E
        k += 1
        if k < n and (p[k] == 43 or p[k] == 45):
            k += 1
        j = digits(p, k, n)
        if j == k:
            return False
        k = j
    return k == n


cdef bint within_bounds(const unsigned char* p, Py_ssize_t n, const ItemRule* rule) except -1:
    cdef char text[MAX_NUMBER_CHARS + 1]
    cdef double number
    if not (rule.has_minimum or rule.has_maximum):
        return True
    if n > MAX_NUMBER_CHARS:
        return False
    memcpy(text, p, n)
    text[n] = 0
    number = PyOS_string_to_double(text, NULL, NULL)  # as float() reads it, whatever the locale
    if rule.has_minimum and number < rule.minimum:
        return False
    return not (rule.has_maximum and number > rule.maximum)


cdef bint url(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """resolver.template's URL: ``[a-zA-Z][a-zA-Z0-9+.-]{0,15}://\\S{1,2000}``."""
    cdef Py_ssize_t i = 1
    cdef unsigned char c
    if n < 5 or not printable_ascii(p, n) or not 97 <= (p[0] | 0x20) <= 122:  # an ASCII letter
        return False
    while i < n and i <= 16:
        c = p[i]
        if c == 58:  # ":"
            break
        if not (is_digit(c) or 97 <= (c | 0x20) <= 122 or c == 43 or c == 46 or c == 45):
            return False
        i += 1
    if i > 16 or i + 3 >= n or p[i] != 58 or p[i + 1] != 47 or p[i + 2] != 47:
        return False
    return n - (i + 3) <= 2000


cdef bint email(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """resolver.template's EMAIL: ``[^@\\s]{1,64}@[^@\\s]{1,255}\\.[^@\\s]{1,63}``."""
    cdef Py_ssize_t at = -1, i
    if not printable_ascii(p, n):
        return False
    for i in range(n):
        if p[i] == 64:
            if at >= 0:
                return False
            at = i
    if at < 1 or at > 64:
        return False
    for i in range(at + 2, n - 1):  # a dot with 1..255 characters before it, 1..63 after
        if p[i] == 46 and i - at - 1 <= 255 and n - i - 1 <= 63:
            return True
    return False


cdef bint item_fits(const unsigned char* p, Py_ssize_t n, const ItemRule* rule, tuple options) except -1:
    cdef Py_ssize_t length = utf8_characters(p, n)
    cdef bytes option
    if length < 0 or (rule.max_length and length > rule.max_length) or length < rule.min_length:
        return False
    if rule.kind == K_STRING:
        return True
    if rule.kind == K_ENUM:
        for option in options:
            if PyBytes_GET_SIZE(option) == n and memcmp(PyBytes_AS_STRING(option), p, n) == 0:
                return True
        return False
    if rule.kind == K_INTEGER or rule.kind == K_NUMBER:
        return decimal_number(p, n, rule.kind == K_INTEGER) and within_bounds(p, n, rule)
    if rule.kind == K_DATE:
        return iso_date(p, n)
    if rule.kind == K_DATETIME:
        return iso_datetime(p, n, rule.separator)
    if rule.kind == K_URL:
        return url(p, n)
    if rule.kind == K_EMAIL:
        return email(p, n)
    return False


_KINDS = {"string": K_STRING, "integer": K_INTEGER, "number": K_NUMBER, "enum": K_ENUM, "url": K_URL,
          "email": K_EMAIL}


cdef class TemplateCheck:
    """A template compiled for ``fits`` (see above)."""

    cdef ItemRule rules[MAX_TEMPLATE_ITEMS]
    cdef Py_ssize_t count
    cdef list names
    cdef list options

    def __init__(self, template):
        self.names, self.options = [], []
        try:
            self._compile(template)
        except (UnicodeError, OverflowError, ValueError, TypeError):
            self.count = -1  # a template only Python reads (a lone surrogate, a bound past a double)

    cdef _compile(self, template):
        cdef ItemRule* rule
        cdef bytes name
        items = tuple(template.items)
        restricted = template.restricted
        self.count = min(len(items), MAX_TEMPLATE_ITEMS)
        for i in range(self.count):
            item = items[i]
            rule = &self.rules[i]
            name = item.name.encode()
            self.names.append(name)  # the rule points into it
            self.options.append(tuple(v.encode() for v in item.values))
            rule.name, rule.name_length = <const unsigned char*>PyBytes_AS_STRING(name), len(name)
            rule.kind = _KINDS.get(item.type, K_PYTHON)
            rule.separator = 0
            if item.type == "date" and item.format == "YYYY-MM-DD":
                rule.kind = K_DATE
            elif item.type == "datetime" and item.format in ("YYYY-MM-DD HH:mm:ss", "YYYY-MM-DDTHH:mm:ss"):
                rule.kind, rule.separator = K_DATETIME, ord(item.format[10])
            rule.required, rule.restricted = item.required, item.name in restricted
            rule.min_length, rule.max_length = item.min_length, item.max_length
            rule.has_minimum, rule.has_maximum = item.minimum is not None, item.maximum is not None
            rule.minimum = item.minimum if item.minimum is not None else 0.0
            rule.maximum = item.maximum if item.maximum is not None else 0.0
            for bound in (item.minimum, item.maximum):
                if bound is not None and float(bound) != bound:  # an integer a double cannot hold
                    rule.kind = K_PYTHON
        if len(items) > MAX_TEMPLATE_ITEMS:
            self.count = -1  # never sure: the Python check reads every record

    def fits(self, bytes record not None):
        """True when the Python check finds no fault in ``record`` (stored wire form)."""
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(record)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(record), pos = 0, i
        cdef ValueSpan value
        cdef unsigned char seen[MAX_TEMPLATE_ITEMS]
        cdef const ItemRule* rule
        cdef int read
        if self.count < 0:
            return False
        memset(seen, 0, MAX_TEMPLATE_ITEMS)
        while True:
            read = next_record_value(p, end, &pos, &value)
            if read <= 0:
                if read < 0:
                    return False
                break
            for i in range(self.count):
                rule = &self.rules[i]
                if rule.name_length == value.type_length and memcmp(rule.name, p + value.type_at, value.type_length) == 0:
                    if seen[i] or (rule.restricted and value.permissions & 0x2):
                        return False
                    seen[i] = 1
                    if not item_fits(p + value.data_at, value.data_length, rule, self.options[i]):
                        return False
                    break
        for i in range(self.count):
            if self.rules[i].required and not seen[i]:
                return False
        return True


cdef struct ValueSpan:
    Py_ssize_t type_at
    Py_ssize_t type_length
    Py_ssize_t data_at
    Py_ssize_t data_length
    uint64_t permissions


cdef int next_record_value(const unsigned char* p, Py_ssize_t end, Py_ssize_t* pos, ValueSpan* value) noexcept nogil:
    """Reads the idis.v1.Record p[:end] on from ``pos`` to its next value: 1 when one was read
    (its type, data and permissions in ``value``), 0 at the end, -1 when the record is not in the
    encoder's form."""
    cdef uint64_t tag, version
    cdef Py_ssize_t n
    while pos[0] < end:
        if not canonical_varint(p, end, pos, &tag):
            return -1
        if tag == 0x18:
            if not canonical_varint(p, end, pos, &version):
                return -1
            continue
        if (tag != 0x0A and tag != 0x12) or not canonical_length(p, end, pos, &n):
            return -1
        pos[0] += n
        if tag == 0x12:
            return 1 if one_value(p, pos[0] - n, pos[0], value) else -1
    return 0


cdef bint one_value(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end, ValueSpan* value) noexcept nogil:
    """The type, data and permissions of the idis.v1.Value in p[pos:end]; False when it is not in
    the encoder's form (fields in order, each once but references)."""
    cdef uint64_t tag, v
    cdef Py_ssize_t n
    cdef uint64_t last = 0
    value.type_at = value.data_at = pos
    value.type_length = value.data_length = 0
    value.permissions = 0
    while pos < end:
        if not canonical_varint(p, end, &pos, &tag):
            return False
        if (tag >> 3) < last or ((tag >> 3) == last and tag != 0x42):
            return False
        last = tag >> 3
        if tag & 7 == 0:
            if not canonical_varint(p, end, &pos, &v):
                return False
            if tag == 0x38:
                value.permissions = v
        elif tag & 7 == 2:
            if not canonical_length(p, end, &pos, &n):
                return False
            if tag == 0x12:
                value.type_at, value.type_length = pos, n
            elif tag == 0x1A:
                value.data_at, value.data_length = pos, n
            pos += n
        else:
            return False
    return True


def template_reference(bytes record not None):
    """The data of ``record``'s one TEMPLATE value (stored wire form); None when it has none,
    several, or is not in the encoder's form (the Python path then reads it)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(record)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(record), pos = 0
    cdef ValueSpan value
    cdef int read
    found = None
    while True:
        read = next_record_value(p, end, &pos, &value)
        if read <= 0:
            return found if read == 0 else None
        if value.type_length == 8 and memcmp(p + value.type_at, b"TEMPLATE", 8) == 0:
            if found is not None:
                return None
            found = PyBytes_FromStringAndSize(<const char*>p + value.data_at, value.data_length)
