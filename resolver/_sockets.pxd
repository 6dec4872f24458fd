# The socket calls and structures of <sys/socket.h> that Cython's own declarations (posix.*)
# lack: batched datagrams (recvmmsg/sendmmsg) and the rest the compiled modules use. Shared by
# resolver/_cache.pyx (the node's UDP loop) and bench/_handle_load.pyx (its load generator).

from posix.uio cimport iovec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct sockaddr:
        unsigned short sa_family
    cdef struct sockaddr_storage:
        unsigned short ss_family
    cdef struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int socket(int domain, int kind, int protocol)
    int connect(int fd, const sockaddr* address, socklen_t length)
    int setsockopt(int fd, int level, int name, const void* value, socklen_t length)
    int getsockopt(int fd, int level, int name, void* value, socklen_t* length)
    ssize_t send(int fd, const void* data, size_t n, int flags)
    ssize_t recv(int fd, void* data, size_t n, int flags)
    int recvmmsg(int fd, mmsghdr* msgs, unsigned int n, int flags, void* timeout)
    int sendmmsg(int fd, mmsghdr* msgs, unsigned int n, int flags)
    int AF_INET
    int AF_INET6
    int SOCK_DGRAM
    int SOCK_STREAM
    int SOCK_NONBLOCK
    int SOCK_CLOEXEC
    int SOL_SOCKET
    int SO_RCVBUF
    int SO_SNDBUF
    int SO_ERROR
    int MSG_DONTWAIT
    int MSG_TRUNC
    int MSG_NOSIGNAL
