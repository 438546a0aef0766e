"""Single-producer/single-consumer byte ring over shared memory (pure-Python twin).

Same API and byte-for-byte the same memory layout as ``stem._speedups.ring``:
a compiled writer and a pure reader (or the reverse) can share one ring.
``stem.worker.channel`` picks one of the two and builds channels out of them.

Layout of one ring at ``offset`` (64-byte aligned) in a writable buffer::

    offset +   0  head            u64  bytes consumed, written by the consumer only
           +   8  spill_seen      u64  seq of the last side-channel record consumed (consumer)
           +  64  tail            u64  bytes published, written by the producer only
           +  72  spill_seq       u64  seq of the last side-channel segment created (producer)
           + 128  reader_waiting  u32  "the reader is about to sleep on its doorbell"
           + 192  writer_waiting  u32  "the writer is about to sleep until space frees up"
           + 200  claim           u64[4]  per slot: token of a frame offered for taking back, 0 = none
           + 256  data            ``capacity`` bytes (a power of two, 64 .. 2**31)

head and tail are free-running counters (position = counter & (capacity - 1)),
each on its own cache line; the flags get a line each too.  All integers are
in native byte order: both ends live on one machine.

Records are 8-byte aligned and never split::

    u32 length | u32 kind | payload, padded to a multiple of 8

* ``KIND_DATA``: the payload is the frame (``length`` <= ``max_inline(capacity)``).
* ``KIND_PAD``: the rest of the data area up to its end is unused; the next
  record starts at position 0.  Written when a record does not fit before the
  end.  Because an inline record is at most half the capacity, it always fits
  in an empty ring, wherever the counters stand.
* ``KIND_SPILL``: the frame was larger than ``max_inline``; the payload is
  ``u64 seq | u64 frame length`` and the frame itself sits in a separate
  shared-memory segment that the ``spill(seq, frame)`` callback wrote and the
  ``unspill(seq, length) -> bytes`` callback reads and removes (see
  ``stem.worker.channel`` for names and cleanup).  The producer stores
  ``spill_seq`` before calling ``spill``; the consumer stores ``spill_seen``
  after ``unspill`` returned, so the owner can remove the orphans of a dead
  peer: every seq in ``(spill_seen, spill_seq]``.

Publication: the producer copies the record(s), then stores ``tail``; the
consumer copies the payload out, then stores ``head``.  A producer that dies
mid-copy therefore never publishes a partial record.

Doorbells: before sleeping, a reader sets ``reader_waiting``, issues a full
fence and re-checks the ring (``arm_recv``).  After publishing, a writer
issues a full fence and, only if the flag is set, clears it and rings the
reader's doorbell fd (8 bytes: an eventfd increment or a pipe write).  The
same holds the other way round for a writer waiting for space
(``arm_send`` / ``writer_waiting``).  While both sides are busy the doorbell
costs one fence per batch and no system call.

Memory-ordering assumptions of THIS twin (the compiled ring uses C11 atomics
and is the portable one): it relies on x86-TSO-like ordering -- stores become
visible in program order and loads are not reordered with older loads -- and
on CPython executing each index store (one aligned 8-byte store through a
``'Q'`` memoryview) after the data copy that precedes it in the source.  The
store->load fence the doorbell protocol needs comes from acquiring and
releasing an uncontended ``threading.Lock`` (a locked read-modify-write on
x86).  On weakly ordered CPUs (ARM, POWER) use the compiled ring.

A ring object is not thread-safe: one producer and one consumer, each
calling only its own side's methods.
"""

from __future__ import annotations

import os
import select
import sys
import threading

from stem.errors import DecodeError

__all__ = [
    "Ring", "wait_rings", "max_inline", "ring_bytes", "LAYOUT_VERSION", "CTRL_BYTES", "HEADER_BYTES",
    "SPILL_BYTES", "MIN_CAPACITY", "MAX_CAPACITY", "KIND_DATA", "KIND_PAD", "KIND_SPILL", "ATOMIC_CLAIM",
    "CLAIM_SLOTS", "OFF_HEAD", "OFF_SPILL_SEEN", "OFF_TAIL", "OFF_SPILL_SEQ", "OFF_READER_WAITING",
    "OFF_WRITER_WAITING", "OFF_CLAIM",
]

LAYOUT_VERSION = 1
CTRL_BYTES = 256
HEADER_BYTES = 8
SPILL_BYTES = 24
MIN_CAPACITY = 64
MAX_CAPACITY = 1 << 31  # record lengths are u32
KIND_DATA, KIND_PAD, KIND_SPILL = 0, 1, 2

# byte offsets inside the control block (the layout above; ``_speedups/ring.h`` has the same)
OFF_HEAD = 0
OFF_SPILL_SEEN = 8
OFF_TAIL = 64
OFF_SPILL_SEQ = 72
OFF_READER_WAITING = 128
OFF_WRITER_WAITING = 192
OFF_CLAIM = 200

# the same as indexes into the control block seen as u64 ('Q') and u32 ('I') arrays
_Q_HEAD, _Q_SPILL_SEEN, _Q_TAIL, _Q_SPILL_SEQ = OFF_HEAD // 8, OFF_SPILL_SEEN // 8, OFF_TAIL // 8, OFF_SPILL_SEQ // 8
_I_READER_WAITING, _I_WRITER_WAITING = OFF_READER_WAITING // 4, OFF_WRITER_WAITING // 4
_Q_CLAIM = OFF_CLAIM // 8

#: ``claim`` needs an atomic compare-and-swap across processes, which pure Python does not
#: have: this twin reads and writes the word but cannot claim (the worker then never offers)
ATOMIC_CLAIM = False
CLAIM_SLOTS = 4

_BELL = (1).to_bytes(8, sys.byteorder)
_fence_lock = threading.Lock()


def _full_fence() -> None:
    """Store->load barrier: an uncontended lock round trip is a locked RMW on x86."""
    _fence_lock.acquire()
    _fence_lock.release()


def _ring_bell(fd: int) -> None:
    if fd >= 0:
        try:
            os.write(fd, _BELL)
        except OSError:  # pipe full (a wake-up is pending already) or peer gone
            pass


def _drain_bell(fd: int) -> None:
    try:
        os.read(fd, 4096)
    except OSError:  # rung by nobody after all
        pass


def wait_rings(rings, bells, fds, timeout_ms: int, tags):
    """Sleep on several rings' doorbells and on other fds with one poll().

    ``rings[i]`` (the reader side) is woken through ``bells[i]``; ``tags[i]``
    is what to return for it.  When a ring has frames pending already, returns
    at once.  Otherwise arms every ring, polls ``bells + fds`` for at most
    ``timeout_ms`` (-1: no limit), drains the bells that rang and disarms.
    Returns ``(tags of the rings with frames pending, fds that are readable)``;
    ``fds`` are reported, never read.  Wake-ups can be spurious.
    """
    if len(bells) != len(rings) or len(tags) != len(rings):
        raise ValueError("wait_rings needs one bell and one tag per ring")
    if any(ring.closed for ring in rings):
        raise ValueError("ring is closed")
    if any(ring.pending_bytes() for ring in rings):
        return _pending_tags(rings, tags), []
    armed = []
    fired = []
    try:
        for ring in rings:
            if not ring.arm_recv():
                return _pending_tags(rings, tags), []
            armed.append(ring)
        poller = select.poll()
        for fd in bells:
            poller.register(fd, select.POLLIN)
        for fd in fds:
            poller.register(fd, select.POLLIN)
        bell_set = set(bells)
        for fd, _ in poller.poll(timeout_ms):
            if fd in bell_set:
                _drain_bell(fd)
            else:
                fired.append(fd)
    finally:
        for ring in armed:
            if not ring.closed:
                ring.disarm_recv()
    return _pending_tags(rings, tags), [fd for fd in fds if fd in fired]


def _pending_tags(rings, tags) -> list:
    return [tag for ring, tag in zip(rings, tags) if not ring.closed and ring.pending_bytes()]


def max_inline(capacity: int) -> int:
    """Largest frame stored in the ring itself; larger ones take the side channel."""
    return capacity // 2 - HEADER_BYTES


def ring_bytes(capacity: int) -> int:
    """Bytes one ring of ``capacity`` data bytes occupies (control block included)."""
    return CTRL_BYTES + capacity


def _check_geometry(nbytes: int, offset: int, capacity: int) -> None:
    if capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}], "
                         f"got {capacity}")
    if offset < 0 or offset % 64:
        raise ValueError(f"ring offset must be a non-negative multiple of 64, got {offset}")
    if offset + ring_bytes(capacity) > nbytes:
        raise ValueError(f"buffer of {nbytes} bytes is too small for a ring of capacity "
                         f"{capacity} at offset {offset}")


class Ring:
    """One SPSC ring inside ``buffer`` at ``offset``; see the module docstring.

    ``reader_bell``/``writer_bell`` are the fds to ring to wake the reader /
    the writer (-1: none).  ``spill(seq, frame)`` and ``unspill(seq, length)``
    implement the side channel for frames above ``max_inline``; without them
    such a frame raises ``ValueError``.
    """

    __slots__ = ("_mv", "_ctl", "_q", "_w", "_data", "_dw", "_dq", "_cap", "_mask", "_max",
                 "_cached_head", "_cached_tail", "_reader_bell", "_writer_bell", "_spill",
                 "_unspill")

    def __init__(self, buffer, offset: int, capacity: int, *, reader_bell: int = -1,
                 writer_bell: int = -1, spill=None, unspill=None):
        mv = memoryview(buffer)
        if mv.readonly:
            mv.release()
            raise TypeError("the ring needs a writable buffer")
        if mv.format != "B" or not mv.c_contiguous:
            raise TypeError("the ring needs a contiguous byte buffer")
        try:
            _check_geometry(mv.nbytes, offset, capacity)
        except ValueError:
            mv.release()
            raise
        self._mv = mv
        self._ctl = mv[offset:offset + CTRL_BYTES]
        self._q = self._ctl.cast("Q")
        self._w = self._ctl.cast("I")
        self._data = mv[offset + CTRL_BYTES:offset + CTRL_BYTES + capacity]
        self._dw = self._data.cast("I")
        self._dq = self._data.cast("Q")
        self._cap = capacity
        self._mask = capacity - 1
        self._max = max_inline(capacity)
        self._cached_head = self._q[_Q_HEAD]
        self._cached_tail = self._q[_Q_TAIL]
        self._reader_bell = reader_bell
        self._writer_bell = writer_bell
        self._spill = spill
        self._unspill = unspill

    # -- queries ---------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def max_inline(self) -> int:
        return self._max

    def pending_bytes(self) -> int:
        """Bytes published by the producer and not yet consumed (records, padding included)."""
        q = self._q
        return q[_Q_TAIL] - q[_Q_HEAD]

    def free_bytes(self) -> int:
        """Bytes the producer could still write (before alignment and wrap padding)."""
        return self._cap - self.pending_bytes()

    def fits(self, length: int) -> bool:
        """Would a frame of ``length`` bytes be accepted by ``send`` right now?"""
        q = self._q
        if length > self._max:
            rec = SPILL_BYTES
        else:
            rec = HEADER_BYTES + ((length + 7) & ~7)
        tail = q[_Q_TAIL]
        pos = tail & self._mask
        contig = self._cap - pos
        need = rec if rec <= contig else contig + rec
        return need <= self._cap - (tail - q[_Q_HEAD])

    # -- producer side ---------------------------------------------------------

    def send(self, frame) -> bool:
        """Write one frame; False (and nothing written) if it does not fit now."""
        return self.send_many((frame,)) == 1

    def send_quiet(self, frame) -> bool:
        """``send`` without the doorbell: the frame is published, but a sleeping reader is
        not woken for it (it sees it at its next look, woken by a later ``send`` or its
        timeout).  For a writer that knows the reader has no need to act on it yet."""
        return self._send((frame,), 0, False) == 1

    def send_many(self, frames, start: int = 0) -> int:
        """Write ``frames[start:]`` in order until one does not fit; return how many were written.

        Everything written is published at once (one index store, at most
        one doorbell).  If the side channel fails on a frame, the frames
        before it are published and counted; the error is raised when that
        frame comes first.
        """
        return self._send(frames, start, True)

    def _send(self, frames, start: int, bell: bool) -> int:
        q = self._q
        if q is None:
            raise ValueError("ring is closed")
        cap, mask, maxi = self._cap, self._mask, self._max
        dw, data = self._dw, self._data
        tail = start_tail = q[_Q_TAIL]
        head = self._cached_head
        i = start
        n_frames = len(frames)
        try:
            while i < n_frames:
                frame = frames[i]
                n = len(frame)
                spilled = n > maxi
                rec = SPILL_BYTES if spilled else HEADER_BYTES + ((n + 7) & ~7)
                pos = tail & mask
                contig = cap - pos
                need = rec if rec <= contig else contig + rec
                if need > cap - (tail - head):
                    head = self._cached_head = q[_Q_HEAD]
                    if need > cap - (tail - head):
                        break
                if rec > contig:
                    p4 = pos >> 2
                    dw[p4] = 0
                    dw[p4 + 1] = KIND_PAD
                    pos = 0
                    next_tail = tail + contig + rec
                else:
                    next_tail = tail + rec
                p4 = pos >> 2
                if spilled:
                    if self._spill is None:
                        raise ValueError(f"frame of {n} bytes exceeds the ring's max_inline "
                                         f"({maxi}) and the ring has no side channel")
                    seq = q[_Q_SPILL_SEQ] + 1
                    q[_Q_SPILL_SEQ] = seq
                    self._spill(seq, frame)
                    dw[p4] = 16
                    dw[p4 + 1] = KIND_SPILL
                    p8 = (pos >> 3) + 1
                    self._dq[p8] = seq
                    self._dq[p8 + 1] = n
                else:
                    dw[p4] = n
                    dw[p4 + 1] = KIND_DATA
                    data[pos + 8:pos + 8 + n] = frame
                tail = next_tail
                i += 1
        except BaseException:
            if i == start:
                raise
        if tail != start_tail:
            q[_Q_TAIL] = tail
            if not bell:
                return i - start
            _full_fence()
            w = self._w
            if w[_I_READER_WAITING]:
                w[_I_READER_WAITING] = 0
                _ring_bell(self._reader_bell)
        return i - start

    def arm_send(self, length: int) -> bool:
        """Announce that the writer will sleep until a frame of ``length`` fits.

        Returns False (flag cleared again) when it fits already: do not sleep.
        """
        w = self._w
        w[_I_WRITER_WAITING] = 1
        _full_fence()
        if self.fits(length):
            w[_I_WRITER_WAITING] = 0
            return False
        return True

    def disarm_send(self) -> None:
        self._w[_I_WRITER_WAITING] = 0

    # -- consumer side ---------------------------------------------------------

    def recv(self):
        """Return the next frame, or None when the ring is empty."""
        out = self.recv_many(1)
        return out[0] if out else None

    def recv_many(self, max_n: int) -> list:
        """Return up to ``max_n`` frames (possibly none), consumed with one index store."""
        q = self._q
        if q is None:
            raise ValueError("ring is closed")
        cap, mask, maxi = self._cap, self._mask, self._max
        dw, data = self._dw, self._data
        head = start_head = q[_Q_HEAD]
        tail = self._cached_tail
        out = []
        append = out.append
        count = 0
        error = None
        while count < max_n:
            if head == tail:
                tail = self._cached_tail = q[_Q_TAIL]
                if head == tail:
                    break
            pos = head & mask
            p4 = pos >> 2
            n = dw[p4]
            kind = dw[p4 + 1]
            if kind == KIND_DATA and n <= maxi:
                append(data[pos + 8:pos + 8 + n].tobytes())
                head += HEADER_BYTES + ((n + 7) & ~7)
                count += 1
            elif kind == KIND_PAD:
                head += cap - pos
            elif kind == KIND_SPILL and n == 16:
                p8 = (pos >> 3) + 1
                seq, length = self._dq[p8], self._dq[p8 + 1]
                try:
                    if self._unspill is None:
                        raise ValueError("side-channel record received by a ring without unspill")
                    frame = self._unspill(seq, length)
                except BaseException as exc:
                    if count:
                        break  # deliver what we have; the error comes first next time
                    error = exc  # the record is consumed: it cannot be read again
                    frame = None
                q[_Q_SPILL_SEEN] = seq
                head += SPILL_BYTES
                if error is not None:
                    break
                append(frame)
                count += 1
            else:
                if not count:
                    error = DecodeError(f"ring corrupted at position {pos}: "
                                        f"kind={kind} length={n}")
                break
        if head != start_head:
            q[_Q_HEAD] = head
            _full_fence()
            w = self._w
            if w[_I_WRITER_WAITING]:
                w[_I_WRITER_WAITING] = 0
                _ring_bell(self._writer_bell)
        if error is not None:
            raise error
        return out

    # -- the claim word (see the compiled ring) ----------------------------------

    def _slot(self, slot: int) -> int:
        if self._q is None:
            raise ValueError("ring is closed")
        if not 0 <= slot < CLAIM_SLOTS:
            raise ValueError(f"claim slot must be in [0, {CLAIM_SLOTS}), got {slot}")
        return _Q_CLAIM + slot

    def offer(self, token: int, slot: int = 0) -> None:
        index = self._slot(slot)
        if token == 0:
            raise ValueError("a claim token must be non-zero")
        self._q[index] = token

    def claim(self, token: int, slot: int = 0) -> bool:
        self._slot(slot)
        raise NotImplementedError("claim needs an atomic compare-and-swap: use the compiled ring")

    def offered(self, slot: int = 0) -> int:
        return self._q[self._slot(slot)]

    def open_slots(self) -> int:
        self._slot(0)   # raises when closed
        q = self._q
        return sum(1 << slot for slot in range(CLAIM_SLOTS) if q[_Q_CLAIM + slot])

    def arm_recv(self) -> bool:
        """Announce that the reader will sleep on its doorbell.

        Returns False (flag cleared again) when something is pending: do not sleep.
        """
        w = self._w
        w[_I_READER_WAITING] = 1
        _full_fence()
        q = self._q
        if q[_Q_TAIL] != q[_Q_HEAD]:
            w[_I_READER_WAITING] = 0
            return False
        return True

    def disarm_recv(self) -> None:
        self._w[_I_READER_WAITING] = 0

    def wait(self, bell_fd: int, timeout_ms: int) -> bool:
        """Reader side: sleep until the writer rings ``bell_fd`` or ``timeout_ms`` passes.

        arm_recv, poll(bell_fd), drain the bell if it rang, disarm_recv: one
        call.  Returns at once when frames are pending.  True if frames are
        pending afterwards (wake-ups can be spurious).
        """
        if self._q is None:
            raise ValueError("ring is closed")
        if not self.arm_recv():
            return True
        try:
            poller = select.poll()
            poller.register(bell_fd, select.POLLIN)
            if poller.poll(timeout_ms):
                _drain_bell(bell_fd)
        finally:
            if self._q is not None:
                self.disarm_recv()
        return self._q is not None and self.pending_bytes() > 0

    # -- lifecycle -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._q is None

    def close(self) -> None:
        """Release the buffer (the mapping can then be closed); idempotent."""
        if self._q is None:
            return
        for view in (self._dq, self._dw, self._data, self._w, self._q, self._ctl, self._mv):
            view.release()
        self._q = self._w = self._dq = self._dw = self._data = self._ctl = self._mv = None
