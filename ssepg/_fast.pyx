"""Hot paths of ssepg: JSON checks, SSE framing, the message ring and fan-out.

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


# JSON scanning ---------------------------------------------------------------

cdef inline bint _is_ws(unsigned char c) noexcept nogil:
    return c == 32 or c == 10 or c == 13 or c == 9


cdef inline Py_ssize_t _skip_ws(const unsigned char *s, Py_ssize_t i,
                                Py_ssize_t n) noexcept nogil:
    while i < n and _is_ws(s[i]):
        i += 1
    return i


cdef inline bint _is_hex(unsigned char c) noexcept nogil:
    return (48 <= c <= 57) or (65 <= c <= 70) or (97 <= c <= 102)


cdef Py_ssize_t _utf8_error(const unsigned char *s, Py_ssize_t n) noexcept nogil:
    # Returns the offset of the first byte that is not well-formed UTF-8
    # (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF),
    # or -1 when all of it is.
    cdef Py_ssize_t i = 0
    cdef unsigned char c, c1
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return i
            i += 2
            continue
        if 0xE0 <= c <= 0xEF:
            if i + 2 >= n:
                return i
            c1 = s[i + 1]
            if c == 0xE0 and not (0xA0 <= c1 <= 0xBF):
                return i
            if c == 0xED and not (0x80 <= c1 <= 0x9F):
                return i
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
                return i
            i += 3
            continue
        if 0xF0 <= c <= 0xF4:
            if i + 3 >= n:
                return i
            c1 = s[i + 1]
            if c == 0xF0 and not (0x90 <= c1 <= 0xBF):
                return i
            if c == 0xF4 and not (0x80 <= c1 <= 0x8F):
                return i
            if ((c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80
                    or (s[i + 3] & 0xC0) != 0x80):
                return i
            i += 4
            continue
        return i
    return -1


cdef Py_ssize_t _scan_string(const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                             int *err) noexcept nogil:
    # s[i] is the opening quote. UTF-8 validity was checked for the whole
    # buffer beforehand, so bytes >= 0x80 are skipped here.
    cdef unsigned char c
    i += 1
    while i < n:
        c = s[i]
        if c == 34:  # closing quote
            return i + 1
        if c == 92:  # backslash escape
            if i + 1 >= n:
                break
            c = s[i + 1]
            if c == 117:  # \uXXXX
                if (i + 5 >= n or not _is_hex(s[i + 2]) or not _is_hex(s[i + 3])
                        or not _is_hex(s[i + 4]) or not _is_hex(s[i + 5])):
                    break
                i += 6
                continue
            if (c == 34 or c == 92 or c == 47 or c == 98 or c == 102 or c == 110
                    or c == 114 or c == 116):
                i += 2
                continue
            break
        if c < 0x20:  # raw control characters are not allowed in strings
            break
        i += 1
    err[0] = ERR_SYNTAX
    return -1


cdef Py_ssize_t _scan_number(const unsigned char *s, Py_ssize_t i,
                             Py_ssize_t n, int *err) noexcept nogil:
    cdef Py_ssize_t start
    if i < n and s[i] == 45:  # minus
        i += 1
    if i >= n:
        err[0] = ERR_SYNTAX
        return -1
    if s[i] == 48:  # a leading zero stands alone
        i += 1
    elif 49 <= s[i] <= 57:
        while i < n and 48 <= s[i] <= 57:
            i += 1
    else:
        err[0] = ERR_SYNTAX
        return -1
    if i < n and s[i] == 46:  # fraction
        i += 1
        start = i
        while i < n and 48 <= s[i] <= 57:
            i += 1
        if i == start:
            err[0] = ERR_SYNTAX
            return -1
    if i < n and (s[i] == 101 or s[i] == 69):  # exponent
        i += 1
        if i < n and (s[i] == 43 or s[i] == 45):
            i += 1
        start = i
        while i < n and 48 <= s[i] <= 57:
            i += 1
        if i == start:
            err[0] = ERR_SYNTAX
            return -1
    return i


cdef inline Py_ssize_t _scan_literal(const unsigned char *s, Py_ssize_t i,
                                     Py_ssize_t n, const char *word,
                                     Py_ssize_t size, int *err) noexcept nogil:
    cdef Py_ssize_t k
    if i + size > n:
        err[0] = ERR_SYNTAX
        return -1
    for k in range(size):
        if s[i + k] != <unsigned char>word[k]:
            err[0] = ERR_SYNTAX
            return -1
    return i + size


cdef Py_ssize_t _scan_value(const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                            int depth, int *err) noexcept nogil:
    # Scans one value starting at s[i] (no leading whitespace); returns the
    # offset just after it, or -1 with err set.
    cdef unsigned char c
    if i >= n:
        err[0] = ERR_SYNTAX
        return -1
    c = s[i]
    if c == 34:
        return _scan_string(s, i, n, err)
    if c == 123:  # object
        if depth >= MAX_DEPTH:
            err[0] = ERR_DEPTH
            return -1
        i = _skip_ws(s, i + 1, n)
        if i < n and s[i] == 125:
            return i + 1
        while True:
            if i >= n or s[i] != 34:
                err[0] = ERR_SYNTAX
                return -1
            i = _scan_string(s, i, n, err)
            if i < 0:
                return -1
            i = _skip_ws(s, i, n)
            if i >= n or s[i] != 58:
                err[0] = ERR_SYNTAX
                return -1
            i = _skip_ws(s, i + 1, n)
            i = _scan_value(s, i, n, depth + 1, err)
            if i < 0:
                return -1
            i = _skip_ws(s, i, n)
            if i < n and s[i] == 44:
                i = _skip_ws(s, i + 1, n)
                continue
            if i < n and s[i] == 125:
                return i + 1
            err[0] = ERR_SYNTAX
            return -1
    if c == 91:  # array
        if depth >= MAX_DEPTH:
            err[0] = ERR_DEPTH
            return -1
        i = _skip_ws(s, i + 1, n)
        if i < n and s[i] == 93:
            return i + 1
        while True:
            i = _scan_value(s, i, n, depth + 1, err)
            if i < 0:
                return -1
            i = _skip_ws(s, i, n)
            if i < n and s[i] == 44:
                i = _skip_ws(s, i + 1, n)
                continue
            if i < n and s[i] == 93:
                return i + 1
            err[0] = ERR_SYNTAX
            return -1
    if c == 116:
        return _scan_literal(s, i, n, b"true", 4, err)
    if c == 102:
        return _scan_literal(s, i, n, b"false", 5, err)
    if c == 110:
        return _scan_literal(s, i, n, b"null", 4, err)
    return _scan_number(s, i, n, err)


cdef _raise_scan_error(int err):
    if err == ERR_DEPTH:
        raise JSONError("json nested too deeply")
    raise JSONError("invalid json")


cdef inline const unsigned char *_check_span(bytes buf, Py_ssize_t start,
                                             Py_ssize_t end) except NULL:
    if start < 0 or end > PyBytes_GET_SIZE(buf) or start > end:
        raise ValueError(f"span {start}:{end} outside the buffer")
    return <const unsigned char *>PyBytes_AS_STRING(buf)


def check_utf8(bytes buf):
    """Raise `JSONError` unless *buf* is well-formed UTF-8."""
    cdef Py_ssize_t bad = _utf8_error(<const unsigned char *>PyBytes_AS_STRING(buf),
                                      PyBytes_GET_SIZE(buf))
    if bad >= 0:
        raise JSONError("invalid utf-8")


def check_json(bytes buf):
    """Raise `JSONError` unless *buf* holds exactly one JSON value."""
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
    cdef int err = 0
    cdef Py_ssize_t i
    check_utf8(buf)
    i = _skip_ws(s, 0, n)
    i = _scan_value(s, i, n, 0, &err)
    if i < 0:
        _raise_scan_error(err)
    if _skip_ws(s, i, n) != n:
        raise JSONError("trailing data after json value")


cdef str _decode_key(bytes buf, Py_ssize_t start, Py_ssize_t end):
    # start..end covers the key including its quotes.
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t k
    for k in range(start + 1, end - 1):
        if s[k] == 92:
            import json
            return json.loads(buf[start:end])
    return buf[start + 1:end - 1].decode("utf-8")


def object_spans(bytes buf, Py_ssize_t start=0, Py_ssize_t end=-1):
    """Map each member name of the JSON object in ``buf[start:end]`` to the
    ``(start, end)`` offsets of its value.

    The span may hold whitespace around the object and nothing else. Later
    duplicates of a name win, as with most JSON parsers. UTF-8 is checked
    only when the whole buffer is scanned.

    :raises JSONError: the span is not exactly one valid JSON object.
    """
    cdef const unsigned char *s
    cdef Py_ssize_t i, key_start, key_end, value_start
    cdef int err = 0
    cdef dict spans = {}
    if end < 0:
        end = PyBytes_GET_SIZE(buf)
    s = _check_span(buf, start, end)
    if start == 0 and end == PyBytes_GET_SIZE(buf):
        check_utf8(buf)
    i = _skip_ws(s, start, end)
    if i >= end:
        raise JSONError("invalid json")
    if s[i] != 123:
        value_start = _scan_value(s, i, end, 0, &err)
        if value_start < 0:
            _raise_scan_error(err)
        if _skip_ws(s, value_start, end) != end:
            raise JSONError("trailing data after json value")
        raise JSONError("json value is not an object")
    i = _skip_ws(s, i + 1, end)
    if i < end and s[i] == 125:
        i += 1
    else:
        while True:
            if i >= end or s[i] != 34:
                raise JSONError("invalid json")
            key_start = i
            i = _scan_string(s, i, end, &err)
            if i < 0:
                _raise_scan_error(err)
            key_end = i
            i = _skip_ws(s, i, end)
            if i >= end or s[i] != 58:
                raise JSONError("invalid json")
            value_start = _skip_ws(s, i + 1, end)
            i = _scan_value(s, value_start, end, 1, &err)
            if i < 0:
                _raise_scan_error(err)
            spans[_decode_key(buf, key_start, key_end)] = (value_start, i)
            i = _skip_ws(s, i, end)
            if i < end and s[i] == 44:
                i = _skip_ws(s, i + 1, end)
                continue
            if i < end and s[i] == 125:
                i += 1
                break
            raise JSONError("invalid json")
    if _skip_ws(s, i, end) != end:
        raise JSONError("trailing data after json value")
    return spans


def array_spans(bytes buf, Py_ssize_t start, Py_ssize_t end):
    """Return the ``(start, end)`` offsets of each item of the JSON array in
    ``buf[start:end]``, which must already be a valid JSON value.

    :raises JSONError: the value is not an array.
    """
    cdef const unsigned char *s = _check_span(buf, start, end)
    cdef Py_ssize_t i
    cdef Py_ssize_t item_end
    cdef int err = 0
    cdef list items = []
    i = _skip_ws(s, start, end)
    if i >= end or s[i] != 91:
        raise JSONError("json value is not an array")
    i = _skip_ws(s, i + 1, end)
    if i < end and s[i] == 93:
        return items
    while True:
        item_end = _scan_value(s, i, end, 1, &err)
        if item_end < 0:
            _raise_scan_error(err)
        items.append((i, item_end))
        i = _skip_ws(s, item_end, end)
        if i < end and s[i] == 44:
            i = _skip_ws(s, i + 1, end)
            continue
        if i < end and s[i] == 93:
            return items
        raise JSONError("invalid json")


def compact(bytes buf, Py_ssize_t start=0, Py_ssize_t end=-1):
    """Return the valid JSON value in ``buf[start:end]`` without insignificant
    whitespace; numbers, key order and string contents stay byte for byte."""
    cdef const unsigned char *s
    cdef char *w
    cdef Py_ssize_t i, k = 0
    cdef unsigned char c
    cdef bint in_string = False
    cdef bytes out
    if end < 0:
        end = PyBytes_GET_SIZE(buf)
    s = _check_span(buf, start, end)
    out = PyBytes_FromStringAndSize(NULL, end - start)
    w = PyBytes_AS_STRING(out)
    i = start
    while i < end:
        c = s[i]
        if in_string:
            w[k] = c
            k += 1
            if c == 92:
                w[k] = s[i + 1]
                k += 1
                i += 1
            elif c == 34:
                in_string = False
        elif not _is_ws(c):
            w[k] = c
            k += 1
            if c == 34:
                in_string = True
        i += 1
    if k == PyBytes_GET_SIZE(buf):
        return buf
    if k == end - start:
        return out
    return out[:k]


def span_is_string(bytes buf, Py_ssize_t start, Py_ssize_t end):
    """True when the valid JSON value at ``buf[start:end]`` is a string."""
    return _check_span(buf, start, end)[start] == 34


def span_is_null(bytes buf, Py_ssize_t start, Py_ssize_t end):
    """True when the valid JSON value at ``buf[start:end]`` is ``null``."""
    return end - start == 4 and buf[start:end] == b"null"


def decode_string(bytes buf, Py_ssize_t start, Py_ssize_t end):
    """Decode the valid JSON string at ``buf[start:end]`` to `str`."""
    return _decode_key(buf, start, end)


cdef int _known_key(bytes buf, Py_ssize_t start, Py_ssize_t end) except -1:
    # Which envelope field a member name is: 1 topic, 2 id, 3 data, 4 event,
    # 0 anything else. start..end covers the name with its quotes.
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = end - start - 2
    cdef Py_ssize_t k
    cdef str name
    for k in range(start + 1, end - 1):
        if s[k] == 92:
            # An escaped name is rare but legal JSON: compare it decoded.
            name = _decode_key(buf, start, end)
            return {"topic": 1, "id": 2, "data": 3, "event": 4}.get(name, 0)
    s += start + 1
    if n == 5 and s[0] == 116 and s[1] == 111 and s[2] == 112 and s[3] == 105 and s[4] == 99:
        return 1
    if n == 2 and s[0] == 105 and s[1] == 100:
        return 2
    if n == 4 and s[0] == 100 and s[1] == 97 and s[2] == 116 and s[3] == 97:
        return 3
    if n == 5 and s[0] == 101 and s[1] == 118 and s[2] == 101 and s[3] == 110 and s[4] == 116:
        return 4
    return 0


def parse_envelope(bytes payload):
    """Check a NOTIFY payload and return ``(topic, id, event, data)`` with
    *data* compact JSON bytes and *event* ``"message"`` when absent or null.

    :raises ValueError: not valid JSON, not an object, a missing or non-string
        topic or id, an invalid topic, id or event name, data missing or null.
    """
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(payload)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t i, key_start, key_end, value_start
    cdef Py_ssize_t spans[10]
    cdef int err = 0, which
    cdef str topic, event_id, event = "message"
    for which in range(10):
        spans[which] = -1
    check_utf8(payload)
    i = _skip_ws(s, 0, n)
    if i >= n or s[i] != 123:
        raise JSONError("envelope is not a json object")
    i = _skip_ws(s, i + 1, n)
    if i < n and s[i] == 125:
        i += 1
    else:
        while True:
            if i >= n or s[i] != 34:
                raise JSONError("invalid json")
            key_start = i
            i = _scan_string(s, i, n, &err)
            if i < 0:
                _raise_scan_error(err)
            key_end = i
            i = _skip_ws(s, i, n)
            if i >= n or s[i] != 58:
                raise JSONError("invalid json")
            value_start = _skip_ws(s, i + 1, n)
            i = _scan_value(s, value_start, n, 1, &err)
            if i < 0:
                _raise_scan_error(err)
            which = _known_key(payload, key_start, key_end)
            if which:
                spans[2 * which] = value_start
                spans[2 * which + 1] = i
            i = _skip_ws(s, i, n)
            if i < n and s[i] == 44:
                i = _skip_ws(s, i + 1, n)
                continue
            if i < n and s[i] == 125:
                i += 1
                break
            raise JSONError("invalid json")
    if _skip_ws(s, i, n) != n:
        raise JSONError("trailing data after json value")
    for which, name in ((1, "topic"), (2, "id"), (3, "data")):
        if spans[2 * which] < 0:
            raise ValueError(f"envelope lacks {name!r}")
    if s[spans[2]] != 34 or s[spans[4]] != 34:
        raise ValueError("envelope topic and id must be strings")
    topic = _decode_key(payload, spans[2], spans[3])
    event_id = _decode_key(payload, spans[4], spans[5])
    if not is_topic(topic):
        raise ValueError(f"invalid topic {topic!r}")
    if not is_event_id(event_id):
        raise ValueError(f"invalid event id {event_id!r}")
    if spans[7] - spans[6] == 4 and s[spans[6]] == 110:
        raise ValueError("envelope data is null")
    if spans[8] >= 0 and not (spans[9] - spans[8] == 4 and s[spans[8]] == 110):
        if s[spans[8]] != 34:
            raise ValueError("envelope event must be a string")
        event = _decode_key(payload, spans[8], spans[9])
        if not is_event_name(event):
            raise ValueError(f"invalid event name {event!r}")
    return topic, event_id, event, compact(payload, spans[6], spans[7])


# Names and hashing ------------------------------------------------------------

def fnv1a_32(data):
    """FNV-1a 32-bit hash of *data* (a `str` is hashed as UTF-8)."""
    cdef bytes raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t i
    cdef unsigned int h = 2166136261u
    for i in range(PyBytes_GET_SIZE(raw)):
        h ^= s[i]
        h *= 16777619u
    return h


cdef inline bint _topic_char(Py_UCS4 c) noexcept:
    return (97 <= c <= 122) or (48 <= c <= 57) or c == 95 or c == 46 or c == 58 or c == 45


def is_topic(str name):
    """True when *name* is a valid, already lower-cased topic id:
    ``[a-z0-9_.:-]{1,128}`` and neither ``.`` nor ``..`` (dot segments that
    proxies would resolve in a URL path)."""
    cdef Py_ssize_t n = len(name)
    cdef Py_UCS4 c
    if n < 1 or n > 128 or name == "." or name == "..":
        return False
    for c in name:
        if not _topic_char(c):
            return False
    return True


def is_event_name(str name):
    """True when *name* is a valid SSE event name: ``[A-Za-z0-9_.:-]{1,64}``."""
    cdef Py_ssize_t n = len(name)
    cdef Py_UCS4 c
    if n < 1 or n > 64:
        return False
    for c in name:
        if not (_topic_char(c) or 65 <= c <= 90):
            return False
    return True


def is_event_id(str value):
    """True when *value* can be an event id: 1 to 128 printable ASCII
    characters without spaces, so it fits one ``id:`` line."""
    cdef Py_ssize_t n = len(value)
    cdef Py_UCS4 c
    if n < 1 or n > 128:
        return False
    for c in value:
        if c <= 32 or c >= 127:
            return False
    return True


# SSE frames -------------------------------------------------------------------

cdef bytes _data_lines(bytes data):
    # One "data:" line per line of the payload; CR, LF and CRLF all end a line
    # (WHATWG event-stream parsing). Compact JSON never contains one, so the
    # common case is a single line.
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i, start = 0
    cdef list parts
    for i in range(n):
        if s[i] == 10 or s[i] == 13:
            break
    else:
        return b"data: " + data + b"\n"
    parts = []
    i = 0
    while i < n:
        if s[i] == 10 or s[i] == 13:
            parts.append(b"data: " + data[start:i] + b"\n")
            if s[i] == 13 and i + 1 < n and s[i + 1] == 10:
                i += 1
            start = i + 1
        i += 1
    parts.append(b"data: " + data[start:n] + b"\n")
    return b"".join(parts)


def encode_frame(str event_id, str event, bytes data):
    """Encode one SSE event: optional ``id:`` line, ``event:`` line, one
    ``data:`` line per payload line and the blank line that dispatches it."""
    cdef bytes head = b""
    if event_id is not None:
        head = b"id: " + event_id.encode("ascii") + b"\n"
    return head + b"event: " + event.encode("ascii") + b"\n" + _data_lines(data) + b"\n"


def comment(str text):
    """Encode an SSE comment line, ignored by clients: ``: text``."""
    return b": " + text.replace("\r", " ").replace("\n", " ").encode("utf-8") + b"\n\n"


@cython.final
cdef class Message:
    """One event as a topic holds it: ids, sequence numbers and its frame.

    ``seq`` counts the topic's events on this instance; ``gseq`` counts all
    events the instance heard, in arrival order, which is the same order on
    every instance because they all read one Postgres notification queue.
    """

    def __init__(self, str topic, str event_id, str event, bytes data,
                 long long seq, long long gseq):
        cdef bytes head = (b"id: " + event_id.encode("ascii") + b"\nevent: "
                           + event.encode("ascii") + b"\n")
        cdef bytes lines = _data_lines(data)
        self.topic = topic
        self.id = event_id
        self.event = event
        self.seq = seq
        self.gseq = gseq
        self.frame = head + lines + b"\n"
        if PyBytes_GET_SIZE(lines) == PyBytes_GET_SIZE(data) + 7:
            # One data: line, so the payload can be sliced out of the frame.
            self.data_start = PyBytes_GET_SIZE(head) + 6
            self.data_end = self.data_start + PyBytes_GET_SIZE(data)
            self._raw_data = None
        else:
            self._raw_data = data

    @property
    def data(self):
        """The compact JSON payload."""
        if self._raw_data is not None:
            return self._raw_data
        return self.frame[self.data_start:self.data_end]

    @property
    def multi_frame(self):
        """The frame as a stream of several topics carries it: the data names
        the topic, ``{"topic": ..., "data": ...}``. Encoded on first use."""
        if self._multi_frame is None:
            self._multi_frame = encode_frame(
                self.id, self.event,
                b'{"topic":"' + self.topic.encode("ascii") + b'","data":' + self.data + b"}",
            )
        return self._multi_frame

    @property
    def size(self):
        """Bytes held for this message: its object, id and frame. Fixed for the
        message's lifetime so a ring can add and subtract it; the multi-topic
        frame, made only when such streams exist, is not included."""
        # Object headers of the message, its id and frame, plus its entry in
        # the dispatcher's id index: about 230 bytes besides the contents.
        cdef Py_ssize_t n = PyBytes_GET_SIZE(self.frame) + len(self.id) + 230
        if self._raw_data is not None:
            n += PyBytes_GET_SIZE(self._raw_data)
        return n


# Ring -------------------------------------------------------------------------

@cython.final
cdef class Ring:
    """A topic's window of recent messages, oldest dropped when full.

    The capacity is a power of two and a message sits at ``seq & mask``. The
    slot list starts small and doubles up to the capacity, so a topic with few
    messages holds little.
    """

    def __init__(self, Py_ssize_t capacity):
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two, got {capacity!r}")
        self.capacity = capacity
        self.slots = [None] * min(capacity, 8)
        self.mask = len(self.slots) - 1
        self.head = 0
        self.tail = 0
        self.nbytes = 0

    def __len__(self):
        return self.head - self.tail

    @property
    def slots_allocated(self):
        """Slots the ring holds now (it grows up to its capacity)."""
        return PyList_GET_SIZE(self.slots)

    cdef int _resize(self, Py_ssize_t size) except -1:
        cdef list slots = [None] * size
        cdef long long seq
        for seq in range(self.tail, self.head):
            slots[seq & (size - 1)] = self.slots[seq & self.mask]
        self.slots = slots
        self.mask = size - 1
        return 0

    cpdef Message append(self, Message message):
        """Store *message* (its ``seq`` must equal ``head``) and return the
        message it displaced, or None."""
        cdef Message old = None
        cdef Py_ssize_t size = self.mask + 1
        if message.seq != self.head:
            raise ValueError(f"expected seq {self.head}, got {message.seq}")
        if self.head - self.tail >= size:
            if size < self.capacity:
                self._resize(size * 2)
            else:
                old = <Message>self.slots[self.tail & self.mask]
                self.nbytes -= old.size
                self.tail += 1
        self.slots[self.head & self.mask] = message
        self.head += 1
        self.nbytes += message.size
        return old

    cpdef Message get(self, long long seq):
        """The message with sequence *seq*, or None when it is not held."""
        if seq < self.tail or seq >= self.head:
            return None
        return <Message>self.slots[seq & self.mask]

    def messages(self, long long start, long long stop):
        """The messages with ``start <= seq < stop`` that are still held."""
        cdef long long seq
        if start < self.tail:
            start = self.tail
        if stop > self.head:
            stop = self.head
        return [self.slots[seq & self.mask] for seq in range(start, stop)]

    def join_frames(self, long long start, long long stop):
        """The frames of ``start <= seq < stop`` as one bytes object."""
        cdef long long seq
        if start < self.tail:
            start = self.tail
        if stop > self.head:
            stop = self.head
        if stop - start == 1:
            return (<Message>self.slots[start & self.mask]).frame
        return b"".join([(<Message>self.slots[seq & self.mask]).frame
                         for seq in range(start, stop)])

    def first_after_gseq(self, long long gseq):
        """The lowest ``seq`` whose message has a ``gseq`` above *gseq*
        (``head`` when there is none). Binary search: gseq grows with seq."""
        cdef long long lo = self.tail, hi = self.head, mid
        while lo < hi:
            mid = (lo + hi) // 2
            if (<Message>self.slots[mid & self.mask]).gseq > gseq:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def set_capacity(self, Py_ssize_t capacity):
        """Change the capacity (a power of two) and return the messages
        dropped, oldest first, to make the window fit."""
        cdef list dropped = []
        cdef Message old
        cdef Py_ssize_t size
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two, got {capacity!r}")
        while self.head - self.tail > capacity:
            old = <Message>self.slots[self.tail & self.mask]
            self.slots[self.tail & self.mask] = None
            self.nbytes -= old.size
            self.tail += 1
            dropped.append(old)
        self.capacity = capacity
        size = 8 if capacity > 8 else capacity
        while size < self.head - self.tail:
            size *= 2
        self._resize(size)
        return dropped

    def clear(self):
        """Drop every message and return them, oldest first."""
        cdef list dropped = self.messages(self.tail, self.head)
        self.tail = self.head
        self.nbytes = 0
        self.slots = [None] * min(self.capacity, 8)
        self.mask = len(self.slots) - 1
        return dropped


# Compression ------------------------------------------------------------------

@cython.final
cdef class Deflater:
    """A raw deflate stream whose every output ends at a flush point, so a
    client can decode each piece as soon as it arrives.

    Window and hash memory are small (8 KiB window, memLevel 6: about 64 KiB in
    all): the shared history is emptied every `SYNC_INTERVAL_FRAMES` frames
    anyway, which typical events fill in well under 8 KiB.
    """

    def __cinit__(self, int level=6, int window_bits=13, int mem_level=6):
        memset(&self.strm, 0, sizeof(z_stream))
        if deflateInit2(&self.strm, level, Z_DEFLATED, -window_bits, mem_level,
                        Z_DEFAULT_STRATEGY) != Z_OK:
            raise MemoryError("cannot initialise a deflate stream")
        self.ready = True

    def __dealloc__(self):
        if self.ready:
            deflateEnd(&self.strm)

    cdef bytes _run(self, const unsigned char *data, Py_ssize_t size, int mode):
        cdef Py_ssize_t cap = deflateBound(&self.strm, size) + 64
        cdef Py_ssize_t used = 0
        cdef unsigned char *out = <unsigned char *>malloc(cap)
        cdef unsigned char *grown
        cdef int rc
        cdef bytes result
        if out == NULL:
            raise MemoryError()
        try:
            self.strm.next_in = data
            self.strm.avail_in = <unsigned int>size
            while True:
                self.strm.next_out = out + used
                self.strm.avail_out = <unsigned int>(cap - used)
                rc = deflate(&self.strm, mode)
                if rc != Z_OK and rc != Z_BUF_ERROR:
                    raise RuntimeError(f"deflate failed with code {rc}")
                used = cap - self.strm.avail_out
                if self.strm.avail_out != 0:
                    break
                # zlib may need more room to finish the flush: grow and go on.
                cap *= 2
                grown = <unsigned char *>realloc(out, cap)
                if grown == NULL:
                    raise MemoryError()
                out = grown
            result = PyBytes_FromStringAndSize(<char *>out, used)
        finally:
            free(out)
        return result

    def compress(self, bytes data, bint full=False):
        """Compress *data* and flush: a full flush also forgets the history."""
        return self._run(<const unsigned char *>PyBytes_AS_STRING(data),
                         PyBytes_GET_SIZE(data), Z_FULL_FLUSH if full else Z_SYNC_FLUSH)



# One shared deflater compresses pieces that must not depend on any history
# (a new subscriber's first frames); it is reset before every use.
cdef Deflater _solo = Deflater()


cdef bytes _solo_compress(bytes data):
    deflateReset(&_solo.strm)
    return _solo._run(<const unsigned char *>PyBytes_AS_STRING(data),
                      PyBytes_GET_SIZE(data), Z_SYNC_FLUSH)


def solo_compress(bytes data):
    """Compress *data* with no history, ending at a sync flush."""
    return _solo_compress(data)


def gzip_trailer(unsigned long crc, unsigned long long size):
    """Final deflate block and gzip trailer for a stream of *size* plain bytes
    whose CRC-32 is *crc*."""
    cdef unsigned int n = <unsigned int>(size & 0xFFFFFFFFu)
    return FINAL_BLOCK + bytes([
        crc & 0xFF, (crc >> 8) & 0xFF, (crc >> 16) & 0xFF, (crc >> 24) & 0xFF,
        n & 0xFF, (n >> 8) & 0xFF, (n >> 16) & 0xFF, (n >> 24) & 0xFF,
    ])


# Fan-out ----------------------------------------------------------------------

cdef inline int _send_all(int fd, const char *data, Py_ssize_t size,
                          Py_ssize_t *sent) noexcept:
    # Writes as much of data as the socket takes without blocking.
    # 0: all written; 1: the socket is full (*sent bytes went out); -1: error.
    cdef Py_ssize_t off = 0
    cdef ssize_t r
    while off < size:
        r = c_send(fd, data + off, size - off, MSG_NOSIGNAL | MSG_DONTWAIT)
        if r >= 0:
            off += r
            continue
        if errno == EINTR:
            continue
        sent[0] = off
        if errno == EAGAIN or errno == EWOULDBLOCK:
            return 1
        return -1
    sent[0] = off
    return 0


@cython.final
cdef class Channel:
    """The subscribers that receive the same byte stream: the streams of one
    topic, or the streams of one set of topics.

    `deliver` hands one bytes object to every subscriber: those whose socket
    has room get it in one ``send()``; the others queue a reference to it and
    are returned to the caller, which waits for their sockets to drain.
    Subscribers asking for gzip share one compressor per channel.
    """

    def __init__(self, key, Py_ssize_t limit):
        self.key = key
        self.limit = limit
        self.subs = []
        self.gzip_subs = []
        self.delivered_frames = 0
        self.dropped_clients = 0
        self.deflater = None
        self.frames_since_sync = 0
        self.out_of_sync = 0
        self.active = False

    def __len__(self):
        return PyList_GET_SIZE(self.subs) + PyList_GET_SIZE(self.gzip_subs)

    @property
    def has_compressor(self):
        return self.deflater is not None

    def release(self):
        """Free the shared compressor; the next delivery starts a new one."""
        self.deflater = None
        self.frames_since_sync = 0
        self.out_of_sync = 0
        for sub in self.gzip_subs:
            (<Subscriber>sub).in_sync = False

    def subscribers(self):
        """A list of the current subscribers."""
        return self.subs + self.gzip_subs

    def add(self, Subscriber sub):
        """Make *sub* receive this channel's deliveries from now on."""
        if sub.channel is not None:
            raise ValueError("subscriber already belongs to a channel")
        sub.channel = self
        if sub.is_gzip:
            sub.slot = PyList_GET_SIZE(self.gzip_subs)
            self.gzip_subs.append(sub)
            # With no compressor alive, the next shared output starts without
            # history, so the newcomer can take it from the first byte.
            sub.in_sync = self.deflater is None
            if not sub.in_sync:
                self.out_of_sync += 1
        else:
            sub.slot = PyList_GET_SIZE(self.subs)
            self.subs.append(sub)

    def remove(self, Subscriber sub):
        """Stop delivering to *sub*; O(1), the last subscriber takes its slot."""
        cdef list subs
        cdef Subscriber last
        if sub.channel is not self:
            return
        subs = self.gzip_subs if sub.is_gzip else self.subs
        last = <Subscriber>subs[PyList_GET_SIZE(subs) - 1]
        subs[sub.slot] = last
        last.slot = sub.slot
        subs.pop()
        if sub.is_gzip and not sub.in_sync:
            self.out_of_sync -= 1
        sub.channel = None
        sub.slot = -1

    def pending_bytes(self):
        """Bytes accepted for subscribers but not yet taken by their sockets."""
        cdef Py_ssize_t total = 0
        cdef Subscriber sub
        for sub in self.subs:
            total += sub.queued_bytes
        for sub in self.gzip_subs:
            total += sub.queued_bytes
        return total

    cdef inline void _sort(self, Subscriber sub, int rc, list lagging, list dead,
                           list slow):
        if rc == 1:
            lagging.append(sub)
        elif rc < 0:
            dead.append(sub)
        if rc > 0 and sub.queued_bytes > self.limit + sub.grace and not sub.is_slow:
            sub.is_slow = True
            slow.append(sub)

    def deliver(self, bytes chunk, Py_ssize_t nframes, list lagging, list dead,
                list slow):
        """Hand *chunk* (*nframes* frames) to every subscriber.

        Subscribers whose socket filled up are appended to *lagging*, those
        whose socket failed to *dead*, and those whose unsent bytes passed the
        channel's limit to *slow*; the caller deals with each list. Returns
        the number of subscribers that took the whole chunk at once.
        """
        cdef const char *data = PyBytes_AS_STRING(chunk)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(chunk)
        cdef Py_ssize_t count = PyList_GET_SIZE(self.subs)
        cdef Py_ssize_t i, sent, done = 0
        cdef Subscriber sub
        cdef int rc
        self.active = True
        for i in range(count):
            sub = <Subscriber>PyList_GET_ITEM(self.subs, i)
            if sub.is_closed:
                continue
            if sub.pending is None:
                rc = _send_all(sub.fd, data, size, &sent)
                if rc == 0:
                    done += 1
                    sub.delivered_frames += nframes
                    continue
                if rc == 1:
                    sub.pending = chunk
                    sub.pending_off = sent
                    sub.pending_frames = nframes
                    sub.queued_bytes = size - sent
            else:
                rc = sub._push(chunk, nframes)
            self._sort(sub, rc, lagging, dead, slow)
        self.delivered_frames += done * nframes
        if PyList_GET_SIZE(self.gzip_subs):
            done += self._deliver_gzip(chunk, nframes, False, lagging, dead, slow)
        return done

    cdef Py_ssize_t _deliver_gzip(self, bytes chunk, Py_ssize_t nframes,
                                  bint force_sync, list lagging, list dead,
                                  list slow) except -1:
        cdef bytes shared, solo = None
        cdef bint full
        cdef Py_ssize_t i, done = 0
        cdef Subscriber sub
        cdef int rc
        if self.deflater is None:
            self.deflater = Deflater()
        self.frames_since_sync += nframes
        full = force_sync or self.frames_since_sync >= SYNC_INTERVAL_FRAMES
        shared = self.deflater.compress(chunk, full)
        if self.out_of_sync:
            solo = _solo_compress(chunk)
        for i in range(PyList_GET_SIZE(self.gzip_subs)):
            sub = <Subscriber>PyList_GET_ITEM(self.gzip_subs, i)
            if sub.is_closed:
                continue
            sub._gzip_account(chunk)
            rc = sub._push(shared if sub.in_sync else solo, nframes)
            if rc == 0:
                done += 1
            self._sort(sub, rc, lagging, dead, slow)
            if full:
                sub.in_sync = True
        if full:
            self.frames_since_sync = 0
            self.out_of_sync = 0
        self.delivered_frames += done * nframes
        return done

    def heartbeat(self, bytes beat, double now, double stall_limit, list lagging,
                  list dead, list slow, list stalled):
        """Send *beat* to every subscriber whose socket has room and list in
        *stalled* those whose socket made no progress since
        ``now - stall_limit``.

        For gzip subscribers the beat goes through the shared compressor and
        ends in a full flush, so late joiners get in sync; a compressor that
        saw no traffic since the last beat is freed (the next one starts with
        no history, which every in-sync subscriber can follow).
        """
        cdef Py_ssize_t i, sent
        cdef Subscriber sub
        cdef int rc
        cdef const char *data = PyBytes_AS_STRING(beat)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(beat)
        cdef bytes packed
        for i in range(PyList_GET_SIZE(self.subs)):
            sub = <Subscriber>PyList_GET_ITEM(self.subs, i)
            if sub.is_closed:
                continue
            if sub.pending is not None:
                if sub.stalled_since and now - sub.stalled_since > stall_limit:
                    stalled.append(sub)
                continue
            rc = _send_all(sub.fd, data, size, &sent)
            if rc == 1:
                sub.pending = beat
                sub.pending_off = sent
                sub.pending_frames = 0
                sub.queued_bytes = size - sent
            self._sort(sub, rc, lagging, dead, slow)
        if not PyList_GET_SIZE(self.gzip_subs):
            self.deflater = None
            self.active = False
            return
        for i in range(PyList_GET_SIZE(self.gzip_subs)):
            sub = <Subscriber>PyList_GET_ITEM(self.gzip_subs, i)
            if (not sub.is_closed and sub.pending is not None and sub.stalled_since
                    and now - sub.stalled_since > stall_limit):
                stalled.append(sub)
        if self.deflater is None or not self.active:
            # Nobody depends on a history: every subscriber takes the same
            # self-contained piece, and the channel restarts without one.
            self.deflater = None
            self.frames_since_sync = 0
            self.out_of_sync = 0
            packed = _solo_compress(beat)
            for i in range(PyList_GET_SIZE(self.gzip_subs)):
                sub = <Subscriber>PyList_GET_ITEM(self.gzip_subs, i)
                if sub.is_closed or sub.pending is not None:
                    continue
                sub._gzip_account(beat)
                sub.in_sync = True
                rc = sub._push(packed, 0)
                self._sort(sub, rc, lagging, dead, slow)
        else:
            self._deliver_gzip(beat, 0, True, lagging, dead, slow)
        self.active = False


@cython.final
cdef class Subscriber:
    """One SSE client connection: a non-blocking socket and what it has not
    yet taken.

    A subscriber that keeps up holds nothing but its socket. One that fell
    behind holds the unsent rest of one chunk plus references to the shared
    chunks that came after; the first write after the socket drains sends them
    all at once.
    """

    def __init__(self, sock, bint is_gzip=False, label=None, double started=0.0):
        self.sock = sock
        self.fd = sock.fileno()
        self.is_gzip = is_gzip
        self.label = label
        self.started = started
        self.channel = None
        self.slot = -1
        self.pending = None
        self.backlog = None
        self.crc = 0
        self.plain_size = 0

    def fileno(self):
        return self.fd

    @property
    def is_lagging(self):
        return self.pending is not None

    cdef int _push(self, bytes data, Py_ssize_t nframes) except -2:
        # 0: sent at once; 1: the socket filled up, the rest waits;
        # 2: queued behind earlier data; -1: the socket failed.
        cdef Py_ssize_t sent, size
        cdef int rc
        if self.is_closed:
            return -1
        size = PyBytes_GET_SIZE(data)
        if self.pending is not None:
            if self.backlog is None:
                self.backlog = []
            self.backlog.append(data)
            self.backlog_frames += nframes
            self.queued_bytes += size
            return 2
        rc = _send_all(self.fd, PyBytes_AS_STRING(data), size, &sent)
        if rc == 0:
            self.delivered_frames += nframes
            return 0
        if rc == 1:
            self.pending = data
            self.pending_off = sent
            self.pending_frames = nframes
            self.queued_bytes = size - sent
            return 1
        return -1

    cdef int _gzip_account(self, bytes plain) except -1:
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(plain)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(plain)
        self.crc = crc32(self.crc, p, <unsigned int>n)
        self.plain_size += n
        return 0

    def account(self, bytes plain):
        """Count *plain* into the gzip trailer (CRC-32 and size) without
        sending anything: for bytes the caller compresses itself."""
        self._gzip_account(plain)

    def write_raw(self, bytes data):
        """Send bytes exactly as given (the gzip header, say)."""
        return self._push(data, 0)

    def gzip_end(self):
        """The bytes that end this subscriber's gzip member: a final block and
        the CRC-32 and size trailer; nothing once data was dropped, since the
        trailer would then not match what the client received."""
        if self.is_truncated:
            return b""
        return gzip_trailer(self.crc, self.plain_size)

    def flush(self):
        """Write what waits, coalescing queued chunks into one write.

        Returns ``(status, frames)``: status 0 when everything went out, 1
        when the socket is full again, -1 when it failed; *frames* counts the
        frames that left in full.
        """
        cdef Py_ssize_t sent, size, frames = 0
        cdef int rc
        cdef bytes data
        while True:
            if self.pending is None:
                if not self.backlog:
                    self.queued_bytes = 0
                    self.delivered_frames += frames
                    return 0, frames
                if len(self.backlog) == 1:
                    data = self.backlog[0]
                else:
                    data = b"".join(self.backlog)
                self.backlog = None
                self.pending = data
                self.pending_off = 0
                self.pending_frames = self.backlog_frames
                self.backlog_frames = 0
            data = self.pending
            size = PyBytes_GET_SIZE(data) - self.pending_off
            rc = _send_all(self.fd, PyBytes_AS_STRING(data) + self.pending_off, size, &sent)
            self.queued_bytes -= sent
            if rc == 0:
                frames += self.pending_frames
                self.pending = None
                self.pending_frames = 0
                continue
            self.pending_off += sent
            self.delivered_frames += frames
            return (1 if rc == 1 else -1), frames

    def send_now(self, bytes data):
        """Best-effort write that never queues (a goodbye before closing).

        A chunk that went out in part is completed first, so the goodbye
        never lands inside a frame; if the socket cannot take all of it at
        once, nothing more is written and False is returned."""
        cdef Py_ssize_t sent
        if self.is_closed:
            return False
        if self.pending is not None:
            if self.backlog:
                return False
            data = self.pending[self.pending_off:] + data
            self.pending = None
        return _send_all(self.fd, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &sent) == 0

    def drop_queue(self):
        """Forget what is queued, except the rest of a chunk that went out in
        part (a frame must not be cut); returns the number of bytes dropped.
        For gzip, the stream is then truncated: `gzip_end` gives nothing."""
        cdef Py_ssize_t n = self.queued_bytes
        if self.pending is not None and self.pending_off > 0:
            n -= PyBytes_GET_SIZE(self.pending) - self.pending_off
        elif self.pending is not None:
            self.pending = None
        if n > 0:
            self.is_truncated = True
        self.backlog = None
        self.backlog_frames = 0
        self.queued_bytes -= n
        return n
