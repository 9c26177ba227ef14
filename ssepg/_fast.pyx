"""Hot paths of ssepg: JSON checks, SSE framing, the message ring and fan-out.

One extension built from included parts, one concern each: ``_json.pxi``,
``_names.pxi``, ``_frames.pxi``, ``_ring.pxi``, ``_deflate.pxi`` and
``_fanout.pxi``. Declarations shared between them live in ``_fast.pxd``.

Everything here runs on the IOLoop thread and holds the GIL: the fan-out writes
to sockets owned by Python objects, and the socket calls are non-blocking, so
releasing the GIL would only add overhead.
"""

cimport cython
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <errno.h>
    #ifndef MSG_NOSIGNAL
    #define MSG_NOSIGNAL 0
    #endif
    """
    ssize_t c_send "send" (int fd, const void *buf, size_t n, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT
    int EWOULDBLOCK

cdef extern from "zlib.h":
    int Z_OK
    int Z_BUF_ERROR
    int Z_DEFLATED
    int Z_DEFAULT_STRATEGY
    int Z_SYNC_FLUSH
    int Z_FULL_FLUSH
    int deflateInit2(z_stream *strm, int level, int method, int window_bits,
                     int mem_level, int strategy)
    int deflate(z_stream *strm, int flush)
    int deflateEnd(z_stream *strm)
    int deflateReset(z_stream *strm)
    unsigned long deflateBound(z_stream *strm, unsigned long source_len)
    unsigned long crc32(unsigned long crc, const unsigned char *buf,
                        unsigned int size)


class JSONError(ValueError):
    """The bytes are not one valid JSON document (RFC 8259)."""


cdef enum:
    # Containers nested deeper than this are refused: the scanner recurses
    # once per level and a hostile body could otherwise ask for 100,000.
    MAX_DEPTH = 512
    ERR_SYNTAX = 1
    ERR_DEPTH = 2

# Bytes of the gzip member header: magic, deflate, no flags, no mtime, OS unknown.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"

# A final, empty fixed-Huffman block: ends a deflate stream that was left at a
# byte boundary by a sync or full flush.
FINAL_BLOCK = b"\x03\x00"

# Every this many frames the shared compressor of a channel empties its history
# (a full flush), so subscribers that joined since can switch to the shared
# stream. 64 keeps typical JSON events near 3.4x smaller.
SYNC_INTERVAL_FRAMES = 64

include "_json.pxi"
include "_names.pxi"
include "_frames.pxi"
include "_ring.pxi"
include "_deflate.pxi"
include "_fanout.pxi"
