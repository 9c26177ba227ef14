# SSE frames and the Message a topic keeps. Included by _fast.pyx.

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


# Rings hold many thousands of messages for a long time. A message refers only
# to strings and bytes, so it can never be part of a reference cycle; left out
# of the cyclic garbage collector, it does not lengthen its full collections
# (tens of milliseconds otherwise, felt as latency by every subscriber).
@cython.final
@cython.no_gc
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
