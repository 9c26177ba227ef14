# JSON scanning, validation and compaction; envelope parsing. Included by _fast.pyx.

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
