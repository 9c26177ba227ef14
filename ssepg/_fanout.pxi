# Writing shared chunks to subscriber sockets. Included by _fast.pyx.

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
