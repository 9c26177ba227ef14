# The per-topic ring of messages. Included by _fast.pyx.

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
