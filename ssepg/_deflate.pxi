# Raw deflate for gzip streams. Included by _fast.pyx.

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
            self.strm.next_in = <unsigned char *>data
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
