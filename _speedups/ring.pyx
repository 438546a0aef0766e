# cython: language_level=3
"""Single-producer/single-consumer byte ring over shared memory (compiled).

Same API and byte-for-byte the same memory layout as the pure twin
``stem/_ring_py.py``, whose docstring documents the layout, the record
format, the side channel and the doorbell protocol.  This build is the
portable one: indices and flags go through C11 atomics (``ring.h``):
load-acquire of the other side's index, store-release of one's own after the
copy, and a seq_cst fence on both sides of the doorbell handshake.  No Python
object is touched on the hot path except the ``bytes`` made or read.

A ring object is not thread-safe: one producer and one consumer, each
calling only its own side's methods.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from cpython.sequence cimport PySequence_Fast, PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE

from stem.errors import DecodeError

cdef extern from "ring.h" nogil:
    enum:
        STEM_RING_CTRL_BYTES
        STEM_RING_HEADER_BYTES
        STEM_RING_SPILL_BYTES
        STEM_RING_MIN_CAPACITY
        STEM_KIND_DATA
        STEM_KIND_PAD
        STEM_KIND_SPILL
        STEM_OFF_HEAD
        STEM_OFF_SPILL_SEEN
        STEM_OFF_TAIL
        STEM_OFF_SPILL_SEQ
        STEM_OFF_READER_WAITING
        STEM_OFF_WRITER_WAITING
        STEM_OFF_CLAIM
        STEM_CLAIM_SLOTS
    const long long STEM_RING_MAX_CAPACITY
    uint64_t stem_load_acquire_u64(const uint64_t *p)
    uint64_t stem_load_relaxed_u64(const uint64_t *p)
    void stem_store_release_u64(uint64_t *p, uint64_t v)
    void stem_store_relaxed_u64(uint64_t *p, uint64_t v)
    uint32_t stem_load_relaxed_u32(const uint32_t *p)
    void stem_store_relaxed_u32(uint32_t *p, uint32_t v)
    uint32_t stem_exchange_u32(uint32_t *p, uint32_t v)
    int stem_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired)
    void stem_fence_seq_cst()
    void stem_ring_bell(int fd)
    void stem_drain_bell(int fd)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    ctypedef unsigned long nfds_t
    int poll(pollfd *fds, nfds_t nfds, int timeout)
    enum:
        POLLIN

__all__ = [
    "Ring", "wait_rings", "max_inline", "ring_bytes", "LAYOUT_VERSION", "CTRL_BYTES", "HEADER_BYTES",
    "SPILL_BYTES", "MIN_CAPACITY", "MAX_CAPACITY", "KIND_DATA", "KIND_PAD", "KIND_SPILL", "ATOMIC_CLAIM",
    "CLAIM_SLOTS", "OFF_HEAD", "OFF_SPILL_SEEN", "OFF_TAIL", "OFF_SPILL_SEQ", "OFF_READER_WAITING",
    "OFF_WRITER_WAITING", "OFF_CLAIM",
]

LAYOUT_VERSION = 1
#: ``claim`` is one atomic compare-and-swap, safe across processes
ATOMIC_CLAIM = True
#: offers open at once per ring (one claim word each)
CLAIM_SLOTS = STEM_CLAIM_SLOTS
CTRL_BYTES = STEM_RING_CTRL_BYTES
HEADER_BYTES = STEM_RING_HEADER_BYTES
SPILL_BYTES = STEM_RING_SPILL_BYTES
MIN_CAPACITY = STEM_RING_MIN_CAPACITY
MAX_CAPACITY = STEM_RING_MAX_CAPACITY
KIND_DATA = STEM_KIND_DATA
KIND_PAD = STEM_KIND_PAD
KIND_SPILL = STEM_KIND_SPILL
# byte offsets inside the control block, from ring.h (the pure twin exports the same)
OFF_HEAD = STEM_OFF_HEAD
OFF_SPILL_SEEN = STEM_OFF_SPILL_SEEN
OFF_TAIL = STEM_OFF_TAIL
OFF_SPILL_SEQ = STEM_OFF_SPILL_SEQ
OFF_READER_WAITING = STEM_OFF_READER_WAITING
OFF_WRITER_WAITING = STEM_OFF_WRITER_WAITING
OFF_CLAIM = STEM_OFF_CLAIM


def max_inline(capacity):
    """Largest frame stored in the ring itself; larger ones take the side channel."""
    return capacity // 2 - STEM_RING_HEADER_BYTES


def ring_bytes(capacity):
    """Bytes one ring of ``capacity`` data bytes occupies (control block included)."""
    return STEM_RING_CTRL_BYTES + capacity


cdef int _poll_failed(int err) except -1:
    """After poll() failed: EINTR runs the signal handlers (which may raise), anything else raises."""
    if err == EINTR:
        return PyErr_CheckSignals()
    errno = err
    PyErr_SetFromErrno(OSError)
    return -1


def wait_rings(list rings, list bells, list fds, int timeout_ms, list tags):
    """Sleep on several rings' doorbells and on other fds with one poll(), without the GIL.

    ``rings[i]`` (the reader side) is woken through ``bells[i]``; ``tags[i]``
    is what to return for it.  When a ring has frames pending already, returns
    at once.  Otherwise arms every ring, polls ``bells + fds`` for at most
    ``timeout_ms`` (-1: no limit), drains the bells that rang and disarms.
    Returns ``(tags of the rings with frames pending, fds that are readable)``;
    ``fds`` are reported, never read.  Wake-ups can be spurious.
    """
    cdef Py_ssize_t nr = len(rings), nf = len(fds), i, armed = 0
    cdef Ring ring
    cdef pollfd stack_pfds[16]
    cdef pollfd *pfds = stack_pfds
    cdef int rc = 0, err = 0
    if len(bells) != nr or len(tags) != nr:
        raise ValueError("wait_rings needs one bell and one tag per ring")
    for i in range(nr):
        ring = <Ring?>rings[i]
        ring._check_open()
        if ring._has_pending():
            return _pending_tags(rings, tags), []
    try:
        for i in range(nr):
            ring = <Ring>rings[i]
            if not ring._arm():
                return _pending_tags(rings, tags), []
            armed += 1
        if nr + nf > 16:
            pfds = <pollfd *>malloc((nr + nf) * sizeof(pollfd))
            if pfds == NULL:
                raise MemoryError()
        for i in range(nr):
            pfds[i].fd = bells[i]
            pfds[i].events = POLLIN
            pfds[i].revents = 0
        for i in range(nf):
            pfds[nr + i].fd = fds[i]
            pfds[nr + i].events = POLLIN
            pfds[nr + i].revents = 0
        with nogil:
            rc = poll(pfds, <nfds_t>(nr + nf), timeout_ms)
            if rc < 0:
                err = errno
            elif rc > 0:
                for i in range(nr):
                    if pfds[i].revents:
                        stem_drain_bell(pfds[i].fd)
        fired = []
        if rc > 0:
            for i in range(nf):
                if pfds[nr + i].revents:
                    fired.append(fds[i])
    finally:
        for i in range(armed):
            (<Ring>rings[i])._disarm()
        if pfds != stack_pfds:
            free(pfds)
    if rc < 0:
        _poll_failed(err)
    return _pending_tags(rings, tags), fired


cdef list _pending_tags(list rings, list tags):
    cdef list out = []
    cdef Ring ring
    cdef Py_ssize_t i
    for i in range(len(rings)):
        ring = <Ring>rings[i]
        if ring._open and ring._has_pending():
            out.append(tags[i])
    return out


cdef inline uint64_t _record_bytes(uint64_t n) noexcept nogil:
    return STEM_RING_HEADER_BYTES + ((n + 7) & ~(<uint64_t>7))


cdef class Ring:
    """One SPSC ring inside ``buffer`` at ``offset``; see stem/_ring_py.py.

    ``reader_bell``/``writer_bell`` are the fds to ring to wake the reader /
    the writer (-1: none).  ``spill(seq, frame)`` and ``unspill(seq, length)``
    implement the side channel for frames above ``max_inline``; without them
    such a frame raises ``ValueError``.
    """

    cdef Py_buffer _view
    cdef bint _open
    cdef uint8_t *_data
    cdef uint64_t *_head
    cdef uint64_t *_spill_seen
    cdef uint64_t *_tail
    cdef uint64_t *_spill_seq
    cdef uint32_t *_reader_waiting
    cdef uint32_t *_writer_waiting
    cdef uint64_t *_claim
    cdef uint64_t _cap
    cdef uint64_t _mask
    cdef uint64_t _max
    cdef uint64_t _cached_head
    cdef uint64_t _cached_tail
    cdef int _reader_bell
    cdef int _writer_bell
    cdef object _spill
    cdef object _unspill

    def __cinit__(self, buffer, Py_ssize_t offset, Py_ssize_t capacity, *, int reader_bell=-1,
                  int writer_bell=-1, spill=None, unspill=None):
        cdef uint8_t *ctl
        self._open = False
        if (capacity < STEM_RING_MIN_CAPACITY or capacity > STEM_RING_MAX_CAPACITY
                or capacity & (capacity - 1)):
            raise ValueError(f"ring capacity must be a power of two in [{STEM_RING_MIN_CAPACITY}, "
                             f"{STEM_RING_MAX_CAPACITY}], got {capacity}")
        if offset < 0 or offset % 64:
            raise ValueError(f"ring offset must be a non-negative multiple of 64, got {offset}")
        try:
            PyObject_GetBuffer(buffer, &self._view, PyBUF_WRITABLE)
        except BufferError as exc:
            raise TypeError(f"the ring needs a writable contiguous byte buffer ({exc})") from None
        self._open = True
        nbytes = self._view.len
        if offset + STEM_RING_CTRL_BYTES + capacity > nbytes:
            self.close()
            raise ValueError(f"buffer of {nbytes} bytes is too small for a ring of "
                             f"capacity {capacity} at offset {offset}")
        if (<size_t>self._view.buf) % 8:
            self.close()
            raise ValueError("the ring's buffer must be 8-byte aligned")
        ctl = <uint8_t *>self._view.buf + offset
        self._head = <uint64_t *>(ctl + STEM_OFF_HEAD)
        self._spill_seen = <uint64_t *>(ctl + STEM_OFF_SPILL_SEEN)
        self._tail = <uint64_t *>(ctl + STEM_OFF_TAIL)
        self._spill_seq = <uint64_t *>(ctl + STEM_OFF_SPILL_SEQ)
        self._reader_waiting = <uint32_t *>(ctl + STEM_OFF_READER_WAITING)
        self._writer_waiting = <uint32_t *>(ctl + STEM_OFF_WRITER_WAITING)
        self._claim = <uint64_t *>(ctl + STEM_OFF_CLAIM)
        self._data = ctl + STEM_RING_CTRL_BYTES
        self._cap = capacity
        self._mask = capacity - 1
        self._max = capacity // 2 - STEM_RING_HEADER_BYTES
        self._cached_head = stem_load_acquire_u64(self._head)
        self._cached_tail = stem_load_acquire_u64(self._tail)
        self._reader_bell = reader_bell
        self._writer_bell = writer_bell
        self._spill = spill
        self._unspill = unspill

    def __dealloc__(self):
        if self._open:
            PyBuffer_Release(&self._view)

    cdef inline int _check_open(self) except -1:
        if not self._open:
            raise ValueError("ring is closed")
        return 0

    # -- queries ---------------------------------------------------------------

    @property
    def capacity(self):
        return self._cap

    @property
    def max_inline(self):
        return self._max

    @property
    def closed(self):
        return not self._open

    def pending_bytes(self):
        """Bytes published by the producer and not yet consumed (records, padding included)."""
        self._check_open()
        return stem_load_acquire_u64(self._tail) - stem_load_acquire_u64(self._head)

    def free_bytes(self):
        """Bytes the producer could still write (before alignment and wrap padding)."""
        return self._cap - self.pending_bytes()

    cdef bint _fits(self, uint64_t length) noexcept:
        cdef uint64_t rec = STEM_RING_SPILL_BYTES if length > self._max else _record_bytes(length)
        cdef uint64_t tail = stem_load_relaxed_u64(self._tail)
        cdef uint64_t pos = tail & self._mask
        cdef uint64_t contig = self._cap - pos
        cdef uint64_t need = rec if rec <= contig else contig + rec
        return need <= self._cap - (tail - stem_load_acquire_u64(self._head))

    def fits(self, Py_ssize_t length):
        """Would a frame of ``length`` bytes be accepted by ``send`` right now?"""
        self._check_open()
        return self._fits(length)

    # -- producer side ---------------------------------------------------------

    cdef inline Py_ssize_t _reserve(self, uint64_t tail, uint64_t rec, uint64_t *next_tail) noexcept:
        """Position for a record of ``rec`` bytes at ``tail`` (padding written), or -1 if full."""
        cdef uint64_t pos = tail & self._mask
        cdef uint64_t contig = self._cap - pos
        cdef uint64_t need = rec if rec <= contig else contig + rec
        cdef uint32_t *hdr
        if need > self._cap - (tail - self._cached_head):
            self._cached_head = stem_load_acquire_u64(self._head)
            if need > self._cap - (tail - self._cached_head):
                return -1
        if rec > contig:
            hdr = <uint32_t *>(self._data + pos)
            hdr[0] = 0
            hdr[1] = STEM_KIND_PAD
            next_tail[0] = tail + contig + rec
            return 0
        next_tail[0] = tail + rec
        return <Py_ssize_t>pos

    cdef int _put(self, object frame, const char *src, uint64_t n, uint64_t tail,
                  uint64_t *next_tail) except -1:
        """Write one record at ``tail``; 1 if written (``next_tail`` set), 0 if it does not fit."""
        cdef Py_ssize_t pos
        cdef uint32_t *hdr
        cdef uint64_t *body
        cdef uint64_t seq
        if n <= self._max:
            pos = self._reserve(tail, _record_bytes(n), next_tail)
            if pos < 0:
                return 0
            hdr = <uint32_t *>(self._data + pos)
            hdr[0] = <uint32_t>n
            hdr[1] = STEM_KIND_DATA
            memcpy(self._data + pos + STEM_RING_HEADER_BYTES, src, n)
            return 1
        if self._spill is None:
            raise ValueError(f"frame of {n} bytes exceeds the ring's max_inline ({self._max}) "
                             "and the ring has no side channel")
        pos = self._reserve(tail, STEM_RING_SPILL_BYTES, next_tail)
        if pos < 0:
            return 0
        seq = stem_load_relaxed_u64(self._spill_seq) + 1
        stem_store_relaxed_u64(self._spill_seq, seq)
        self._spill(seq, frame)
        hdr = <uint32_t *>(self._data + pos)
        hdr[0] = 16
        hdr[1] = STEM_KIND_SPILL
        body = <uint64_t *>(self._data + pos + STEM_RING_HEADER_BYTES)
        body[0] = seq
        body[1] = n
        return 1

    cdef int _write(self, object frame, uint64_t tail, uint64_t *next_tail) except -1:
        cdef Py_buffer fb
        if PyBytes_CheckExact(frame):
            return self._put(frame, PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame), tail,
                             next_tail)
        PyObject_GetBuffer(frame, &fb, PyBUF_SIMPLE)
        try:
            return self._put(frame, <const char *>fb.buf, fb.len, tail, next_tail)
        finally:
            PyBuffer_Release(&fb)

    cdef inline void _publish_tail(self, uint64_t tail) noexcept:
        stem_store_release_u64(self._tail, tail)
        stem_fence_seq_cst()
        cdef int fd
        if stem_load_relaxed_u32(self._reader_waiting) and stem_exchange_u32(self._reader_waiting, 0):
            # Waking the peer can get this thread preempted inside write(): never while holding the GIL.
            fd = self._reader_bell
            with nogil:
                stem_ring_bell(fd)

    def send(self, frame):
        """Write one frame; False (and nothing written) if it does not fit now."""
        cdef uint64_t tail, next_tail
        self._check_open()
        tail = stem_load_relaxed_u64(self._tail)
        if not self._write(frame, tail, &next_tail):
            return False
        self._publish_tail(next_tail)
        return True

    def send_quiet(self, frame):
        """``send`` without the doorbell: the frame is published, but a sleeping reader is
        not woken for it (it sees it at its next look, woken by a later ``send`` or its
        timeout).  For a writer that knows the reader has no need to act on it yet."""
        cdef uint64_t tail, next_tail
        self._check_open()
        tail = stem_load_relaxed_u64(self._tail)
        if not self._write(frame, tail, &next_tail):
            return False
        stem_store_release_u64(self._tail, next_tail)
        return True

    def send_many(self, frames, Py_ssize_t start=0):
        """Write ``frames[start:]`` in order until one does not fit; return how many were written.

        Everything written is published at once (one index store, at most
        one doorbell).  If the side channel fails on a frame, the frames
        before it are published and counted; the error is raised when that
        frame comes first.
        """
        cdef uint64_t tail, start_tail, next_tail
        cdef Py_ssize_t i = start
        self._check_open()
        seq = PySequence_Fast(frames, "send_many() needs a sequence of bytes-like frames")
        tail = start_tail = stem_load_relaxed_u64(self._tail)
        try:
            while i < PySequence_Fast_GET_SIZE(seq):
                if not self._write(<object>PySequence_Fast_GET_ITEM(seq, i), tail, &next_tail):
                    break
                tail = next_tail
                i += 1
        except BaseException:
            if i == start:
                raise
        if tail != start_tail:
            self._publish_tail(tail)
        return i - start

    def arm_send(self, Py_ssize_t length):
        """Announce that the writer will sleep until a frame of ``length`` fits.

        Returns False (flag cleared again) when it fits already: do not sleep.
        """
        self._check_open()
        stem_store_relaxed_u32(self._writer_waiting, 1)
        stem_fence_seq_cst()
        if self._fits(length):
            stem_store_relaxed_u32(self._writer_waiting, 0)
            return False
        return True

    def disarm_send(self):
        self._check_open()
        stem_store_relaxed_u32(self._writer_waiting, 0)

    # -- consumer side ---------------------------------------------------------

    cdef inline void _publish_head(self, uint64_t head) noexcept:
        stem_store_release_u64(self._head, head)
        stem_fence_seq_cst()
        cdef int fd
        if stem_load_relaxed_u32(self._writer_waiting) and stem_exchange_u32(self._writer_waiting, 0):
            fd = self._writer_bell
            with nogil:
                stem_ring_bell(fd)

    def recv(self):
        """Return the next frame, or None when the ring is empty."""
        cdef uint64_t head, tail, pos
        cdef uint32_t *hdr
        self._check_open()
        head = stem_load_relaxed_u64(self._head)
        while True:
            tail = self._cached_tail
            if head == tail:
                tail = self._cached_tail = stem_load_acquire_u64(self._tail)
                if head == tail:
                    return None
            pos = head & self._mask
            hdr = <uint32_t *>(self._data + pos)
            if hdr[1] == STEM_KIND_PAD:
                head += self._cap - pos
                continue
            if hdr[1] == STEM_KIND_DATA and hdr[0] <= self._max:
                frame = PyBytes_FromStringAndSize(<char *>self._data + pos + STEM_RING_HEADER_BYTES,
                                                  hdr[0])
                self._publish_head(head + _record_bytes(hdr[0]))
                return frame
            if head != stem_load_relaxed_u64(self._head):
                self._publish_head(head)  # the padding before it
            out = self.recv_many(1)
            return out[0] if out else None

    def recv_many(self, Py_ssize_t max_n):
        """Return up to ``max_n`` frames (possibly none), consumed with one index store."""
        cdef uint64_t head, start_head, tail, pos, n
        cdef uint32_t kind
        cdef uint32_t *hdr
        cdef uint64_t *body
        cdef uint64_t seq, length
        cdef Py_ssize_t count = 0
        cdef list out = []
        self._check_open()
        head = start_head = stem_load_relaxed_u64(self._head)
        tail = self._cached_tail
        error = None
        while count < max_n:
            if head == tail:
                tail = self._cached_tail = stem_load_acquire_u64(self._tail)
                if head == tail:
                    break
            pos = head & self._mask
            hdr = <uint32_t *>(self._data + pos)
            n = hdr[0]
            kind = hdr[1]
            if kind == STEM_KIND_DATA and n <= self._max:
                out.append(PyBytes_FromStringAndSize(
                    <char *>self._data + pos + STEM_RING_HEADER_BYTES, n))
                head += _record_bytes(n)
                count += 1
            elif kind == STEM_KIND_PAD:
                head += self._cap - pos
            elif kind == STEM_KIND_SPILL and n == 16:
                body = <uint64_t *>(self._data + pos + STEM_RING_HEADER_BYTES)
                seq = body[0]
                length = body[1]
                try:
                    if self._unspill is None:
                        raise ValueError("side-channel record received by a ring without unspill")
                    frame = self._unspill(seq, length)
                except BaseException as exc:
                    if count:
                        break  # deliver what we have; the error comes first next time
                    error = exc  # the record is consumed: it cannot be read again
                    frame = None
                stem_store_relaxed_u64(self._spill_seen, seq)
                head += STEM_RING_SPILL_BYTES
                if error is not None:
                    break
                out.append(frame)
                count += 1
            else:
                if not count:
                    error = DecodeError(f"ring corrupted at position {pos}: "
                                        f"kind={kind} length={n}")
                break
        if head != start_head:
            self._publish_head(head)
        if error is not None:
            raise error
        return out

    def arm_recv(self):
        """Announce that the reader will sleep on its doorbell.

        Returns False (flag cleared again) when something is pending: do not sleep.
        """
        self._check_open()
        stem_store_relaxed_u32(self._reader_waiting, 1)
        stem_fence_seq_cst()
        if stem_load_acquire_u64(self._tail) != stem_load_relaxed_u64(self._head):
            stem_store_relaxed_u32(self._reader_waiting, 0)
            return False
        return True

    def disarm_recv(self):
        self._check_open()
        stem_store_relaxed_u32(self._reader_waiting, 0)

    cdef inline bint _has_pending(self) noexcept:
        return stem_load_acquire_u64(self._tail) != stem_load_relaxed_u64(self._head)

    cdef inline bint _arm(self) noexcept:
        stem_store_relaxed_u32(self._reader_waiting, 1)
        stem_fence_seq_cst()
        if self._has_pending():
            stem_store_relaxed_u32(self._reader_waiting, 0)
            return False
        return True

    cdef inline void _disarm(self) noexcept:
        if self._open:  # closed by its owner while we slept: nothing to undo
            stem_store_relaxed_u32(self._reader_waiting, 0)

    def wait(self, int bell_fd, int timeout_ms):
        """Reader side: sleep until the writer rings ``bell_fd`` or ``timeout_ms`` passes.

        arm_recv, poll(bell_fd) without the GIL, drain the bell if it rang,
        disarm_recv: one call.  Returns at once when frames are pending.
        True if frames are pending afterwards (wake-ups can be spurious).
        """
        cdef pollfd pfd
        cdef int rc, err = 0
        self._check_open()
        if not self._arm():
            return True
        pfd.fd = bell_fd
        pfd.events = POLLIN
        pfd.revents = 0
        with nogil:
            rc = poll(&pfd, 1, timeout_ms)
            if rc < 0:
                err = errno
            elif rc > 0:
                stem_drain_bell(bell_fd)
        self._disarm()
        if rc < 0:
            _poll_failed(err)
        return self._open and self._has_pending()

    # -- the claim word --------------------------------------------------------

    cdef inline uint64_t *_slot(self, int slot) except NULL:
        self._check_open()
        if slot < 0 or slot >= STEM_CLAIM_SLOTS:
            raise ValueError(f"claim slot must be in [0, {STEM_CLAIM_SLOTS}), got {slot}")
        return self._claim + slot

    def offer(self, uint64_t token, int slot=0):
        """Producer: announce that the frame about to be sent under ``token`` (non-zero)
        may be taken back.  One offer per slot is open at a time: the caller offers in a
        slot again only after ``claim`` settled its previous one (the word reads 0)."""
        cdef uint64_t *word = self._slot(slot)
        if token == 0:
            raise ValueError("a claim token must be non-zero")
        stem_store_release_u64(word, token)

    def claim(self, uint64_t token, int slot=0):
        """Either side: take the offered frame ``token`` (the consumer, to run it) or take
        it back (the producer, to withdraw it).  One atomic compare-and-swap of the slot's
        word from ``token`` to 0, so exactly one of the two racing sides gets True."""
        cdef uint64_t *word = self._slot(slot)
        return token != 0 and stem_cas_u64(word, token, 0) != 0

    def offered(self, int slot=0):
        """The slot's open offer's token, or 0 when none is open."""
        return stem_load_acquire_u64(self._slot(slot))

    def open_slots(self):
        """A bit per slot whose offer is still open (its word is not 0): one call tells
        the producer whether any of its offers was claimed since it last looked."""
        self._check_open()
        cdef int mask = 0, slot
        for slot in range(STEM_CLAIM_SLOTS):
            if stem_load_acquire_u64(self._claim + slot) != 0:
                mask |= 1 << slot
        return mask

    # -- lifecycle -------------------------------------------------------------

    def close(self):
        """Release the buffer (the mapping can then be closed); idempotent."""
        if self._open:
            self._open = False
            self._data = NULL
            self._head = self._tail = self._spill_seen = self._spill_seq = NULL
            self._reader_waiting = self._writer_waiting = NULL
            self._claim = NULL
            PyBuffer_Release(&self._view)
