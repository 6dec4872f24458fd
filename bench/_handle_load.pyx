# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Closed-loop load generators for the Handle protocol (HANDLE-INTEROP.md part B), in C, with the
GIL released for the whole run: fast enough that one process loads a server core or more.

``run_udp`` keeps ``window`` requests outstanding on one connected, non-blocking UDP socket. It
sends up to 64 datagrams a system call (sendmmsg) and receives up to 64 (recvmmsg). Each
outstanding request has a slot; the slot's copy of the datagram gets a request id of its own
on every send (the envelope's requestId, offset 8), so an answer is matched to its slot by id,
and its latency runs from the slot's CLOCK_MONOTONIC stamp. A request unanswered after
``timeout`` seconds is lost and its slot reused. An answer that matches no outstanding request
(one that came after its timeout, or a later datagram of a multi-datagram answer) is stale.
Between batches it waits in ppoll, at most until the run ends or the next request times out.

With ``protocol="dns"``, ``run_udp`` drives a DNS server the same way (e.g. Knot DNS, to compare
with under the same load): the request id is the 16-bit DNS ID at offset 0, rewritten on every
send; it is the slot number in the low bits and the slot's send count (a generation) in the high
bits, so no two outstanding requests share an id (each slot has one at most) and a late answer to
a slot's earlier request is stale unless the slot was reused a multiple of 2**(16 - slot bits)
times since (``window`` is at most 4096 there: at least 16 generations). The response code is the
RCODE, the low 4 bits of byte 3. Everything else is as for the Handle protocol.

``run_tcp`` keeps ``connections`` TCP connections at once, one request each as the protocol
wants: connect, send, read the answer until the server closes, close; latency from connect.

Both return plain counts. Every request sent ends answered, lost (no answer within
``timeout``), failed (TCP only: the connection broke, or the answer was short or not ours) or
in flight when the run stopped:

    sent == answered + lost + failed + in_flight

Answers by response code (offset 24 of the answer; DNS: the RCODE); the latency histogram has
fixed log-linear buckets over nanoseconds (every value below 128 ns has a bucket, each power of
two above it is split into 64), so a bucket is at most 1/64 wide, its midpoint is within 0.8% of
any latency in it, and the histograms of several processes add up bucket by bucket (``merge``).
Percentiles: ``latency_ms``.
"""

from cpython.bytes cimport PyBytes_AS_STRING
from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree
from libc.stdint cimport uint32_t, uint64_t
from libc.errno cimport EAGAIN, EINPROGRESS, EINTR, errno  # EWOULDBLOCK is EAGAIN on Linux
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec
from posix.unistd cimport close

from resolver._sockets cimport (
    MSG_DONTWAIT,
    MSG_NOSIGNAL,
    MSG_TRUNC,
    SO_ERROR,
    SO_RCVBUF,
    SO_SNDBUF,
    SOCK_CLOEXEC,
    SOCK_DGRAM,
    SOCK_NONBLOCK,
    SOCK_STREAM,
    SOL_SOCKET,
    connect,
    getsockopt,
    mmsghdr,
    recv,
    recvmmsg,
    send,
    sendmmsg,
    setsockopt,
    sockaddr,
    sockaddr_storage,
    socket,
    socklen_t,
)

import os
import resource

cdef extern from *:
    """
    static inline int idis_log2(unsigned long long v) { return 63 - __builtin_clzll(v); }
    """
    int idis_log2(unsigned long long v) nogil

cdef extern from "<netdb.h>" nogil:
    cdef struct addrinfo:
        int ai_flags
        int ai_family
        int ai_socktype
        int ai_protocol
        socklen_t ai_addrlen
        sockaddr* ai_addr
        char* ai_canonname
        addrinfo* ai_next
    int getaddrinfo(const char* node, const char* service, const addrinfo* hints, addrinfo** res)
    void freeaddrinfo(addrinfo* res)
    const char* gai_strerror(int code)
    int AF_UNSPEC
    int AI_NUMERICSERV

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    ctypedef unsigned long nfds_t
    int ppoll(pollfd* fds, nfds_t n, const timespec* timeout, const void* sigmask)
    short POLLIN
    short POLLOUT
    short POLLERR
    short POLLHUP

cdef enum:
    BATCH = 64  # datagrams per sendmmsg / recvmmsg
    HEAD = 28  # envelope (20 bytes), opCode, responseCode: all an answer is matched and counted by
    DNS_HEAD = 12  # the DNS header: ID (offset 0) and flags with the RCODE (low 4 bits of byte 3)
    MAX_DNS_WINDOW = 4096  # slot bits 12 at most: at least 4 bits of generation
    RECV_BYTES = 64  # bytes of each answer copied in (MSG_TRUNC still reports the whole length)
    SCRATCH = 16384
    LINEAR = 128  # latencies below 128 ns: a bucket per nanosecond
    SUB = 64  # buckets per power of two above
    MAX_SHIFT = 30
    BUCKETS = LINEAR + MAX_SHIFT * SUB  # 2048: up to 2**37 ns (137 s); longer ones go to the last
    RC_SLOTS = 1024  # response codes 0..1022 counted each; any other in the last slot (reported as -1)
    MAX_WINDOW = 65536
    SOCKET_BUFFER = 4 * 1024 * 1024

cdef uint64_t NEVER = 0xFFFFFFFFFFFFFFFFULL

SOCKET_BUFFER_BYTES = SOCKET_BUFFER
HISTOGRAM_BUCKETS = BUCKETS


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef inline uint32_t be32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void put_be32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline int bucket_of(uint64_t ns) noexcept nogil:
    cdef int shift
    if ns < LINEAR:
        return <int>ns
    shift = idis_log2(ns) - 6
    if shift > MAX_SHIFT:
        return BUCKETS - 1
    return LINEAR + (shift - 1) * SUB + <int>(ns >> shift) - SUB


# --- counts ------------------------------------------------------------------------------------

cdef struct Stats:
    uint64_t sent, answered, lost, failed, in_flight, stale, socket_errors, send_stalls
    uint64_t connect_errors, bytes_received, latency_sum, latency_max, send_calls, receive_calls
    uint64_t* histogram
    uint64_t* rc
    uint64_t* per_second
    uint64_t seconds


cdef inline void record(Stats* st, uint64_t latency, uint32_t rc, uint64_t since_start) noexcept nogil:
    cdef uint64_t second = since_start // 1000000000ULL
    st.answered += 1
    st.histogram[bucket_of(latency)] += 1
    st.latency_sum += latency
    if latency > st.latency_max:
        st.latency_max = latency
    st.rc[rc if rc < RC_SLOTS - 1 else RC_SLOTS - 1] += 1
    if second < st.seconds:
        st.per_second[second] += 1


cdef int open_stats(Stats* st, double duration) except -1:
    memset(st, 0, sizeof(Stats))
    st.seconds = <uint64_t>duration + 2
    st.histogram = <uint64_t*>PyMem_RawCalloc(BUCKETS, sizeof(uint64_t))
    st.rc = <uint64_t*>PyMem_RawCalloc(RC_SLOTS, sizeof(uint64_t))
    st.per_second = <uint64_t*>PyMem_RawCalloc(st.seconds, sizeof(uint64_t))
    if st.histogram == NULL or st.rc == NULL or st.per_second == NULL:
        raise MemoryError()
    return 0


cdef void close_stats(Stats* st) noexcept:
    PyMem_RawFree(st.histogram)
    PyMem_RawFree(st.rc)
    PyMem_RawFree(st.per_second)


cdef dict stats_dict(Stats* st, double elapsed, tuple cpu_before):
    cdef int i
    cdef uint64_t j, seconds = min(<uint64_t>elapsed + 1, st.seconds)
    user, system = _thread_cpu()
    user -= cpu_before[0]
    system -= cpu_before[1]
    return {
        "sent": st.sent,
        "answered": st.answered,
        "lost": st.lost,
        "failed": st.failed,
        "in_flight": st.in_flight,
        "stale": st.stale,
        "socket_errors": st.socket_errors,
        "send_stalls": st.send_stalls,
        "connect_errors": st.connect_errors,
        "bytes_received": st.bytes_received,
        "send_calls": st.send_calls,
        "receive_calls": st.receive_calls,
        "rc": {(i if i < RC_SLOTS - 1 else -1): st.rc[i] for i in range(RC_SLOTS) if st.rc[i]},
        "histogram": {i: st.histogram[i] for i in range(BUCKETS) if st.histogram[i]},
        "latency_sum_ns": st.latency_sum,
        "latency_max_ns": st.latency_max,
        "per_second": [st.per_second[j] for j in range(seconds)],
        "elapsed_s": elapsed,
        "cpu_s": user + system,
        "cpu_user_s": user,
        "cpu_system_s": system,
    }


# --- the requests and the server's address ------------------------------------------------------

cdef struct Requests:
    unsigned char* data
    size_t* offset
    uint32_t* length
    size_t count
    size_t longest


cdef int load_requests(Requests* reqs, list requests, size_t shortest) except -1:
    cdef size_t total = 0, i = 0, at = 0
    memset(reqs, 0, sizeof(Requests))
    if not requests:
        raise ValueError("no requests to send")
    for request in requests:
        if not isinstance(request, bytes) or not shortest <= <size_t>len(request) <= 65507:
            raise ValueError(f"a request must be bytes of {shortest}..65507 (the headers at least)")
        total += len(request)
        reqs.longest = max(reqs.longest, <size_t>len(request))
    reqs.count = len(requests)
    reqs.data = <unsigned char*>PyMem_RawCalloc(total, 1)
    reqs.offset = <size_t*>PyMem_RawCalloc(reqs.count, sizeof(size_t))
    reqs.length = <uint32_t*>PyMem_RawCalloc(reqs.count, sizeof(uint32_t))
    if reqs.data == NULL or reqs.offset == NULL or reqs.length == NULL:
        raise MemoryError()
    for request in requests:
        memcpy(reqs.data + at, PyBytes_AS_STRING(request), len(request))
        reqs.offset[i] = at
        reqs.length[i] = <uint32_t>len(request)
        at += len(request)
        i += 1
    return 0


cdef void free_requests(Requests* reqs) noexcept:
    PyMem_RawFree(reqs.data)
    PyMem_RawFree(reqs.offset)
    PyMem_RawFree(reqs.length)


cdef struct Target:
    sockaddr_storage address
    socklen_t length
    int family


cdef int resolve_target(Target* target, str host, int port, int kind) except -1:
    cdef addrinfo hints
    cdef addrinfo* found = NULL
    cdef int code
    cdef bytes node = host.encode()
    cdef bytes service = str(port).encode()
    cdef const char* c_node = node
    cdef const char* c_service = service
    memset(&hints, 0, sizeof(hints))
    hints.ai_family = AF_UNSPEC
    hints.ai_socktype = kind
    hints.ai_flags = AI_NUMERICSERV
    with nogil:
        code = getaddrinfo(c_node, c_service, &hints, &found)
    if code != 0:
        raise OSError(f"{host}:{port}: {gai_strerror(code).decode()}")
    memcpy(&target.address, found.ai_addr, found.ai_addrlen)
    target.length = found.ai_addrlen
    target.family = found.ai_family
    freeaddrinfo(found)
    return 0


cdef int check_options(double duration, int concurrent, double timeout, str what) except -1:
    if not duration > 0:
        raise ValueError("duration must be positive")
    if not 1 <= concurrent <= MAX_WINDOW:
        raise ValueError(f"{what} must be in 1..{MAX_WINDOW}")
    if not timeout > 0:
        raise ValueError("timeout must be positive")
    return 0


def _thread_cpu():
    """This thread's user and system CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime, usage.ru_stime


cdef struct Load:
    Requests reqs
    Stats st
    uint64_t timeout, duration
    unsigned char* buffers  # per slot (UDP) or connection (TCP): its copy of a request


cdef int open_load(
    Load* load, list requests, double duration, int slots, double timeout, str what, size_t shortest=HEAD
) except -1:
    """``load`` ready for ``duration`` seconds with ``slots`` requests at once, each request at
    least ``shortest`` bytes; zeroed first, so that close_load may follow whatever fails."""
    memset(load, 0, sizeof(Load))
    check_options(duration, slots, timeout, what)
    load_requests(&load.reqs, requests, shortest)
    open_stats(&load.st, duration)
    load.timeout = <uint64_t>(timeout * 1e9)
    load.duration = <uint64_t>(duration * 1e9)
    load.buffers = <unsigned char*>PyMem_RawCalloc(<size_t>slots * load.reqs.longest, 1)
    if load.buffers == NULL:
        raise MemoryError()
    return 0


cdef void close_load(Load* load) noexcept:
    free_requests(&load.reqs)
    close_stats(&load.st)
    PyMem_RawFree(load.buffers)


ctypedef void (*Loop)(void* run) noexcept nogil


cdef dict measured(Loop loop, void* run, Load* load):
    """Runs ``loop`` on ``run`` with the GIL released: the counts, wall time and this thread's CPU."""
    cdef uint64_t started
    cpu = _thread_cpu()
    started = now_ns()
    with nogil:
        loop(run)
    return stats_dict(&load.st, (now_ns() - started) / 1e9, cpu)


# --- UDP ---------------------------------------------------------------------------------------

cdef struct UdpRun:
    Load* load
    int fd
    int window
    int slot_bits
    bint dns  # DNS: a 16-bit id at offset 0, the RCODE in byte 3 (else the Handle protocol)
    uint64_t limit
    uint64_t* stamp  # per slot: when its request was sent (0: the slot is free)
    uint32_t* ids  # per slot: the request id of that send
    int* free  # a stack of the free slots
    int nfree


cdef uint64_t udp_expire(UdpRun* u, uint64_t now) noexcept nogil:
    """Frees the slots of requests unanswered for ``timeout`` (lost); when the next one expires."""
    cdef uint64_t next_expiry = NEVER
    cdef int s
    for s in range(u.window):
        if u.stamp[s]:
            if now - u.stamp[s] >= u.load.timeout:
                u.load.st.lost += 1
                u.stamp[s] = 0
                u.free[u.nfree] = s
                u.nfree += 1
            elif u.stamp[s] + u.load.timeout < next_expiry:
                next_expiry = u.stamp[s] + u.load.timeout
    return next_expiry


cdef inline void udp_answer(UdpRun* u, const unsigned char* p, unsigned int length, uint64_t now, uint64_t start) noexcept nogil:
    cdef uint32_t request_id, rc
    cdef int s
    u.load.st.bytes_received += length
    if length < <unsigned int>(DNS_HEAD if u.dns else HEAD):
        u.load.st.stale += 1
        return
    if u.dns:
        request_id = (<uint32_t>p[0] << 8) | p[1]
        rc = p[3] & 0x0F
    else:
        request_id = be32(p + 8)
        rc = be32(p + 24)
    s = <int>(request_id & ((1U << u.slot_bits) - 1))
    if s >= u.window or u.stamp[s] == 0 or u.ids[s] != request_id:
        u.load.st.stale += 1
        return
    record(&u.load.st, now - u.stamp[s], rc, now - start)
    u.stamp[s] = 0
    u.free[u.nfree] = s
    u.nfree += 1


cdef int udp_send(UdpRun* u, mmsghdr* msgs, iovec* iov, uint64_t* counter, size_t* cursor) noexcept nogil:
    """Sends up to one batch from the free slots; the datagrams sent, or -1 when the socket
    buffer was full (or the socket reported an error)."""
    cdef int k = u.nfree if u.nfree < BATCH else BATCH
    cdef int j, n, s
    cdef size_t r
    cdef uint32_t request_id
    cdef unsigned char* p
    cdef uint64_t stamp
    if u.limit and <uint64_t>k > u.limit - u.load.st.sent:
        k = <int>(u.limit - u.load.st.sent)
    for j in range(k):
        s = u.free[u.nfree - 1 - j]
        r = (cursor[0] + j) % u.load.reqs.count
        p = u.load.buffers + <size_t>s * u.load.reqs.longest
        memcpy(p, u.load.reqs.data + u.load.reqs.offset[r], u.load.reqs.length[r])
        if u.dns:  # the slot's next generation above its number, 16 bits in all
            request_id = (((u.ids[s] >> u.slot_bits) + 1) << u.slot_bits | <uint32_t>s) & 0xFFFF
            p[0] = (request_id >> 8) & 0xFF
            p[1] = request_id & 0xFF
        else:
            counter[0] += 1
            request_id = <uint32_t>(((counter[0] << u.slot_bits) | <uint64_t>s) & 0x7FFFFFFF)
            put_be32(p + 8, request_id)
        u.ids[s] = request_id
        iov[j].iov_base = p
        iov[j].iov_len = u.load.reqs.length[r]
    stamp = now_ns()
    n = sendmmsg(u.fd, msgs, k, 0)
    if n < 0:
        if errno == EAGAIN:
            u.load.st.send_stalls += 1
        elif errno != EINTR:
            u.load.st.socket_errors += 1  # e.g. ECONNREFUSED: an earlier datagram met a closed port
        return -1
    u.load.st.send_calls += 1
    for j in range(n):
        u.stamp[u.free[u.nfree - 1 - j]] = stamp
    u.nfree -= n
    u.load.st.sent += n
    cursor[0] += n
    if n < k:
        u.load.st.send_stalls += 1
        return -1
    return n


cdef void udp_loop(void* run) noexcept nogil:
    cdef UdpRun* u = <UdpRun*>run
    cdef mmsghdr smsg[BATCH]
    cdef iovec siov[BATCH]
    cdef mmsghdr rmsg[BATCH]
    cdef iovec riov[BATCH]
    cdef unsigned char rbuf[BATCH * RECV_BYTES]
    cdef pollfd pfd
    cdef timespec ts
    cdef uint64_t start = now_ns(), now, wake, next_expiry = NEVER, counter = start & 0xFFFFFF
    cdef uint64_t end = start + u.load.duration
    cdef size_t cursor = 0
    cdef int i, n, got
    cdef bint blocked, finished
    memset(smsg, 0, sizeof(smsg))
    memset(rmsg, 0, sizeof(rmsg))
    for i in range(BATCH):
        smsg[i].msg_hdr.msg_iov = &siov[i]
        smsg[i].msg_hdr.msg_iovlen = 1
        riov[i].iov_base = rbuf + i * RECV_BYTES
        riov[i].iov_len = RECV_BYTES
        rmsg[i].msg_hdr.msg_iov = &riov[i]
        rmsg[i].msg_hdr.msg_iovlen = 1
    for i in range(u.window):
        u.free[i] = u.window - 1 - i  # slot 0 on top
    u.nfree = u.window
    while True:
        now = now_ns()
        if now >= end:
            break
        if now >= next_expiry:
            next_expiry = udp_expire(u, now)
        finished = u.limit != 0 and u.load.st.sent >= u.limit
        if finished and u.nfree == u.window:
            break
        blocked = False
        if u.nfree and not finished:
            n = udp_send(u, smsg, siov, &counter, &cursor)
            blocked = n < 0
            if n > 0 and next_expiry == NEVER:
                next_expiry = now_ns() + u.load.timeout
        got = recvmmsg(u.fd, rmsg, BATCH, MSG_DONTWAIT | MSG_TRUNC, NULL)
        if got > 0:
            u.load.st.receive_calls += 1
            now = now_ns()
            for i in range(got):
                udp_answer(u, rbuf + i * RECV_BYTES, rmsg[i].msg_len, now, start)
            continue
        if got < 0 and errno != EAGAIN and errno != EINTR:
            u.load.st.socket_errors += 1
        if u.nfree and not blocked and not finished:
            continue  # slots to fill: no waiting
        now = now_ns()
        wake = end if end < next_expiry else next_expiry
        if wake <= now:
            continue
        ts.tv_sec = <long>((wake - now) // 1000000000ULL)
        ts.tv_nsec = <long>((wake - now) % 1000000000ULL)
        pfd.fd = u.fd
        pfd.events = POLLIN | (POLLOUT if blocked else 0)
        pfd.revents = 0
        ppoll(&pfd, 1, &ts, NULL)
    u.load.st.in_flight = u.window - u.nfree


def run_udp(
    str host,
    int port,
    list requests,
    double duration,
    int window=64,
    double timeout=1.0,
    *,
    unsigned long long limit=0,
    str protocol="handle",
):
    """Sends ``requests`` (whole datagrams, envelope first; taken in turn, round and round) to
    ``host``:``port`` over UDP for ``duration`` seconds, ``window`` outstanding at once; with
    ``limit``, stops once that many were sent and answered or lost (e.g. one pass over the
    keys). Returns the counts (see the module docstring), ``elapsed_s``, and ``cpu_s`` (this
    thread's CPU over the run, with its parts ``cpu_user_s`` and ``cpu_system_s``); also
    ``send_calls`` and ``receive_calls``, the sendmmsg and recvmmsg calls that moved datagrams.

    ``protocol``: "handle" (Handle protocol messages), or "dns" (DNS queries, whole messages
    from the header on; ``window`` at most 4096; ``rc`` counts the answers by RCODE)."""
    cdef Target target
    cdef Load load
    cdef UdpRun u
    cdef int size = SOCKET_BUFFER
    memset(&u, 0, sizeof(u))
    u.fd = -1
    if protocol not in ("handle", "dns"):
        raise ValueError(f"protocol must be 'handle' or 'dns', not {protocol!r}")
    u.dns = protocol == "dns"
    if u.dns and window > MAX_DNS_WINDOW:
        raise ValueError(f"window must be in 1..{MAX_DNS_WINDOW} for DNS (16-bit ids)")
    try:
        open_load(&load, requests, duration, window, timeout, "window", DNS_HEAD if u.dns else HEAD)
        resolve_target(&target, host, port, SOCK_DGRAM)
        u.load = &load
        u.window = window
        while (1 << u.slot_bits) < window:
            u.slot_bits += 1
        u.limit = limit
        u.stamp = <uint64_t*>PyMem_RawCalloc(window, sizeof(uint64_t))
        u.ids = <uint32_t*>PyMem_RawCalloc(window, sizeof(uint32_t))
        u.free = <int*>PyMem_RawCalloc(window, sizeof(int))
        if u.stamp == NULL or u.ids == NULL or u.free == NULL:
            raise MemoryError()
        u.fd = socket(target.family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if u.fd < 0:
            raise OSError(errno, os.strerror(errno))
        setsockopt(u.fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size))
        setsockopt(u.fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size))
        if connect(u.fd, <sockaddr*>&target.address, target.length) != 0:
            raise OSError(errno, f"{host}:{port}: {os.strerror(errno)}")
        return measured(udp_loop, &u, &load)
    finally:
        if u.fd >= 0:
            close(u.fd)
        PyMem_RawFree(u.stamp)
        PyMem_RawFree(u.ids)
        PyMem_RawFree(u.free)
        close_load(&load)


# --- TCP ---------------------------------------------------------------------------------------

cdef enum:
    IDLE = 0
    CONNECTING = 1
    WRITING = 2
    READING = 3


cdef struct Conn:
    int fd
    int state
    uint64_t stamp  # when the connection was opened: latency counts from there
    uint32_t request_id
    uint32_t length  # of the request
    uint32_t written
    uint32_t got  # bytes of the answer so far (the first HEAD kept in head)
    unsigned char head[HEAD]


cdef struct TcpRun:
    Load* load
    Target* target
    int count
    Conn* conns
    pollfd* pfds
    int* polled  # which connection each pollfd is


cdef void tcp_close(Conn* c) noexcept nogil:
    if c.fd >= 0:
        close(c.fd)
    c.fd = -1
    c.state = IDLE


cdef bint tcp_open(TcpRun* t, int i, uint64_t* counter, size_t* cursor) noexcept nogil:
    """Opens connection ``i`` for the next request: False when connect failed at once."""
    cdef Conn* c = &t.conns[i]
    cdef size_t r = cursor[0] % t.load.reqs.count
    cdef unsigned char* p = t.load.buffers + <size_t>i * t.load.reqs.longest
    cursor[0] += 1
    counter[0] += 1
    memcpy(p, t.load.reqs.data + t.load.reqs.offset[r], t.load.reqs.length[r])
    c.request_id = <uint32_t>(counter[0] & 0x7FFFFFFF)
    put_be32(p + 8, c.request_id)
    c.length = t.load.reqs.length[r]
    c.written = 0
    c.got = 0
    c.stamp = now_ns()
    c.fd = socket(t.target.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if c.fd < 0:
        t.load.st.connect_errors += 1
        return False
    if connect(c.fd, <sockaddr*>&t.target.address, t.target.length) == 0:
        c.state = WRITING
    elif errno == EINPROGRESS:
        c.state = CONNECTING
    else:
        t.load.st.connect_errors += 1
        tcp_close(c)
        return False
    return True


cdef void tcp_write(TcpRun* t, int i) noexcept nogil:
    cdef Conn* c = &t.conns[i]
    cdef int error = 0
    cdef socklen_t size = sizeof(error)
    cdef ssize_t n
    if c.state == CONNECTING:
        if getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &error, &size) != 0 or error != 0:
            t.load.st.connect_errors += 1
            tcp_close(c)
            return
        c.state = WRITING
    n = send(c.fd, t.load.buffers + <size_t>i * t.load.reqs.longest + c.written, c.length - c.written, MSG_NOSIGNAL)
    if n < 0:
        if errno != EAGAIN and errno != EINTR:
            t.load.st.connect_errors += 1
            tcp_close(c)
        return
    c.written += <uint32_t>n
    if c.written == c.length:
        t.load.st.sent += 1
        c.state = READING


cdef void tcp_read(TcpRun* t, int i, unsigned char* scratch, uint64_t start) noexcept nogil:
    cdef Conn* c = &t.conns[i]
    cdef ssize_t n
    cdef uint64_t now
    while True:
        n = recv(c.fd, scratch, SCRATCH, 0)
        if n > 0:
            if c.got < HEAD:
                memcpy(c.head + c.got, scratch, min(<size_t>n, <size_t>(HEAD - c.got)))
            c.got += <uint32_t>n
            continue
        if n < 0 and (errno == EAGAIN or errno == EINTR):
            return
        break
    now = now_ns()
    # Counted once the answer is over: the bytes of a connection still reading when the run
    # stops belong to a request counted in flight, not answered.
    t.load.st.bytes_received += c.got
    if n == 0 and c.got >= HEAD and be32(c.head + 8) == c.request_id:
        record(&t.load.st, now - c.stamp, be32(c.head + 24), now - start)
    else:
        t.load.st.failed += 1  # reset, or an answer cut short or not to this request
    tcp_close(c)


cdef void tcp_loop(void* run) noexcept nogil:
    cdef TcpRun* t = <TcpRun*>run
    cdef unsigned char scratch[SCRATCH]
    cdef timespec ts
    cdef uint64_t start = now_ns(), now, wake, counter = start & 0xFFFFFF
    cdef uint64_t end = start + t.load.duration
    cdef size_t cursor = 0
    cdef int i, k, n
    cdef bint refused
    cdef Conn* c
    while True:
        now = now_ns()
        if now >= end:
            break
        refused = False
        n = 0
        wake = end
        for i in range(t.count):
            c = &t.conns[i]
            if c.state != IDLE and now - c.stamp >= t.load.timeout:
                if c.state == READING:
                    t.load.st.lost += 1
                else:
                    t.load.st.connect_errors += 1
                tcp_close(c)
            if c.state == IDLE and not tcp_open(t, i, &counter, &cursor):
                refused = True
                continue
            t.pfds[n].fd = c.fd
            t.pfds[n].events = POLLIN if c.state == READING else POLLOUT
            t.pfds[n].revents = 0
            t.polled[n] = i
            n += 1
            if c.stamp + t.load.timeout < wake:
                wake = c.stamp + t.load.timeout
        if refused and wake > now + 1000000:
            wake = now + 1000000  # retry refused connections after 1 ms
        if wake > now:
            ts.tv_sec = <long>((wake - now) // 1000000000ULL)
            ts.tv_nsec = <long>((wake - now) % 1000000000ULL)
            if ppoll(t.pfds, n, &ts, NULL) <= 0:
                continue
        for k in range(n):
            if not t.pfds[k].revents:
                continue
            i = t.polled[k]
            if t.conns[i].state == CONNECTING or t.conns[i].state == WRITING:
                tcp_write(t, i)
            elif t.conns[i].state == READING:
                tcp_read(t, i, scratch, start)
    for i in range(t.count):
        if t.conns[i].state == READING:
            t.load.st.in_flight += 1
        tcp_close(&t.conns[i])


def run_tcp(str host, int port, list requests, double duration, int connections=16, double timeout=1.0):
    """Sends ``requests`` (envelope first; taken in turn) to ``host``:``port`` over TCP for
    ``duration`` seconds, one a connection, ``connections`` open at once; a request unanswered
    ``timeout`` seconds after its connect is lost (or, not sent yet, a connect error). Returns
    the counts (see the module docstring), ``elapsed_s`` and ``cpu_s``."""
    cdef Target target
    cdef Load load
    cdef TcpRun t
    cdef int i
    memset(&t, 0, sizeof(t))
    try:
        open_load(&load, requests, duration, connections, timeout, "connections")
        resolve_target(&target, host, port, SOCK_STREAM)
        t.load = &load
        t.target = &target
        t.count = connections
        t.conns = <Conn*>PyMem_RawCalloc(connections, sizeof(Conn))
        t.pfds = <pollfd*>PyMem_RawCalloc(connections, sizeof(pollfd))
        t.polled = <int*>PyMem_RawCalloc(connections, sizeof(int))
        if t.conns == NULL or t.pfds == NULL or t.polled == NULL:
            raise MemoryError()
        for i in range(connections):
            t.conns[i].fd = -1
        return measured(tcp_loop, &t, &load)
    finally:
        PyMem_RawFree(t.conns)
        PyMem_RawFree(t.pfds)
        PyMem_RawFree(t.polled)
        close_load(&load)


# --- results of several processes ----------------------------------------------------------------

def bucket_bounds(int index):
    """The latencies histogram bucket ``index`` holds: [low, high) in nanoseconds."""
    if not 0 <= index < BUCKETS:
        raise ValueError(f"bucket index must be in 0..{BUCKETS - 1}")
    if index < LINEAR:
        return index, index + 1
    shift = (index - LINEAR) // SUB + 1
    mantissa = SUB + (index - LINEAR) % SUB
    return mantissa << shift, (mantissa + 1) << shift


def bucket_midpoint_ns(int index):
    """The latency that stands for bucket ``index`` (within 0.8% of any in it), in nanoseconds."""
    low, high = bucket_bounds(index)
    return (low + high - 1) / 2


def merge(list results):
    """One result of several runs' (e.g. one per process): counts, response codes, histograms
    and per-second answers added up; ``elapsed_s`` and ``latency_max_ns`` the largest."""
    out = {}
    for result in results:
        for key, value in result.items():
            if isinstance(value, dict):
                into = out.setdefault(key, {})
                for k, n in value.items():
                    into[int(k)] = into.get(int(k), 0) + n
            elif isinstance(value, list):
                into = out.setdefault(key, [])
                into.extend([0] * (len(value) - len(into)))
                for i, n in enumerate(value):
                    into[i] += n
            elif key in ("elapsed_s", "latency_max_ns"):
                out[key] = max(out.get(key, 0), value)
            else:
                out[key] = out.get(key, 0) + value
    return out


def latency_ms(dict result):
    """p50, p90, p99 and p99.9 (nearest rank; a bucket's midpoint, within 0.8%), and the exact
    mean and max of a result's answered requests, in milliseconds (all 0 when none was)."""
    histogram = sorted((int(k), n) for k, n in result["histogram"].items())
    total = sum(n for _, n in histogram)
    out = {}
    for name, q in (("p50_ms", 50.0), ("p90_ms", 90.0), ("p99_ms", 99.0), ("p99_9_ms", 99.9)):
        rank = max(1, -(-total * q // 100))
        seen = 0
        value = 0.0
        for index, n in histogram:
            seen += n
            if seen >= rank:
                value = bucket_midpoint_ns(index)
                break
        out[name] = round(value / 1e6, 4) if total else 0.0
    out["max_ms"] = round(result["latency_max_ns"] / 1e6, 4)
    out["mean_ms"] = round(result["latency_sum_ns"] / total / 1e6, 4) if total else 0.0
    return out
