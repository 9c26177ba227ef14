cdef extern from "zlib.h":
    ctypedef struct z_stream:
        unsigned char *next_in  # zlib reads it only; declared without const
        unsigned int avail_in
        unsigned char *next_out
        unsigned int avail_out
        const char *msg


cdef class Message:
    cdef:
        readonly str topic
        readonly str id
        readonly str event
        readonly bytes frame
        readonly long long seq
        readonly long long gseq
        Py_ssize_t data_start
        Py_ssize_t data_end
        bytes _raw_data
        bytes _multi_frame


cdef class Ring:
    cdef:
        list slots
        Py_ssize_t mask
        readonly Py_ssize_t capacity
        readonly long long head
        readonly long long tail
        readonly Py_ssize_t nbytes

    cdef int _resize(self, Py_ssize_t size) except -1
    cpdef Message append(self, Message message)
    cpdef Message get(self, long long seq)


cdef class Deflater:
    cdef:
        z_stream strm
        bint ready

    cdef bytes _run(self, const unsigned char *data, Py_ssize_t size, int mode)


cdef class Subscriber


cdef class Channel:
    cdef:
        list subs
        list gzip_subs
        readonly object key
        readonly Py_ssize_t limit
        public long long delivered_frames
        public long long dropped_clients
        Deflater deflater
        Py_ssize_t frames_since_sync
        Py_ssize_t out_of_sync
        bint active

    cdef void _sort(self, Subscriber sub, int rc, list lagging, list dead, list slow)
    cdef Py_ssize_t _deliver_gzip(self, bytes chunk, Py_ssize_t nframes, bint force_sync,
                                  list lagging, list dead, list slow) except -1


cdef class Subscriber:
    cdef:
        readonly int fd
        readonly object sock
        readonly Channel channel
        readonly bint is_gzip
        readonly Py_ssize_t queued_bytes
        public bint is_closed
        public bint is_slow
        readonly bint is_truncated
        public double stalled_since
        public double started
        public object label
        public long long delivered_frames
        public Py_ssize_t grace
        bytes pending
        Py_ssize_t pending_off
        Py_ssize_t pending_frames
        list backlog
        Py_ssize_t backlog_frames
        Py_ssize_t slot
        bint in_sync
        unsigned long crc
        unsigned long long plain_size

    cdef int _push(self, bytes data, Py_ssize_t nframes) except -2
    cdef int _gzip_account(self, bytes plain) except -1
