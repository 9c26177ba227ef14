# Topic, event and id names; FNV-1a. Included by _fast.pyx.

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
