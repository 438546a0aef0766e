"""The transport between the worker supervisor and one child process.

A *channel* is a pair of single-producer/single-consumer byte rings in ONE
shared-memory segment -- ring 0 carries tasks (supervisor -> child), ring 1
carries results (child -> supervisor) -- plus one doorbell per process, so an
idle reader sleeps in ``poll()`` instead of spinning.

API::

    ch = Channel.create(capacity=1 << 20)   # supervisor ("parent"): creates and owns
    proc = ctx.Process(target=child_main, args=(ch.handle,))   # fork, spawn or forkserver
    proc.start()

    def child_main(handle):
        with Channel.attach(handle) as ch:   # side="child"; never owns anything
            for task in ch.recv_wait(timeout=1.0):
                ch.send_wait([run(task)], timeout=5.0)

    ch.send(frame) -> bool                   # False if it does not fit now; nothing written
    ch.send_quiet(frame) -> bool             # the same, without ringing the peer's doorbell
    ch.send_many(frames, start=0) -> int     # how many of frames[start:] were written, in order
    ch.send_wait(frames, timeout) -> int     # the same, sleeping while the ring is full
    ch.recv() -> bytes | None
    ch.recv_many(max_n) -> list[bytes]
    ch.recv_wait(timeout, max_n=1024) -> list[bytes]   # [] when the timeout passes
    ch.pending_bytes(), ch.free_bytes(), ch.capacity, ch.max_inline
    ch.fileno()                              # the incoming doorbell, for poll/selectors:
    ch.arm_doorbell() -> bool; ch.disarm_doorbell(drain=True)   # ...around your own select()
    ch.drain_doorbell()                      # ...after it reported fileno() readable
    wait_readable(channels, timeout) -> list[Channel]  # one thread serving N children
    ChannelPoller(channels, fds, tags).wait(timeout) -> (tags, fds)  # ...reusable, with other fds
    ch.offer(token, slot); ch.withdraw(token, slot) -> bool; ch.offered(slot) -> int   # frames it sends...
    ch.open_slots() -> int                   # ...a bit per slot still offered
    ch.claim(token, slot) -> bool            # ...and those it receives (see "Offers" below)
    ch.can_offer                             # False on the pure twin (no atomic compare-and-swap)
    ch.handle                                # small and picklable
    ch.close(); ch.unlink(); with Channel.create() as ch: ...

``send``/``send_many``/``recv``/``recv_many``/``pending_bytes``/``arm_doorbell``
are the ring's own (compiled) methods bound on the instance: no Python frame
between the caller and the C loop.  Frames are any contiguous bytes-like object; received frames are
``bytes``.  Batch: one index store and at most one doorbell per call.

Segment layout (native byte order; ring layout in ``stem/_ring_py.py``)::

    0                    header: b"STEMRING" | u32 layout version | u32 0 |
                                 u64 capacity | u64 creator pid    (64 bytes)
    64                   ring 0, tasks   (256-byte control block + capacity)
    64 + 256 + capacity  ring 1, results (256-byte control block + capacity)

Names: the segment is ``stmr_<creator pid hex>_<random>``; side-channel
segments are ``<segment>_t<seq hex>`` (ring 0) and ``<segment>_r<seq hex>``
(ring 1).  ``capacity`` is rounded up to a power of two (>= 4 KiB).

Doorbell: an ``eventfd`` per process on Linux (a non-blocking pipe
elsewhere), created by the supervisor.  The reader sets its ring's
``reader_waiting`` flag, fences, re-checks the ring and only then sleeps in
``poll()`` on its eventfd; a writer checks the flag after publishing and
writes the eventfd only if it is set (and clears it), so while both sides are
busy a batch costs one memory fence and no system call.  A writer waiting for
space does the mirror image (``writer_waiting``) and is woken on its own
eventfd, which is also its incoming doorbell: any wake-up just means "look
again".  Wake-ups can be spurious; every wait loops on its deadline.

Why fds and not a ``multiprocessing`` Semaphore: the supervisor multiplexes
N children in one thread, which needs something ``poll()`` can watch.  The fds
reach a child either by inheritance (``fork``: the handle holds the numbers;
``attach`` dups them) or through ``multiprocessing.reduction.DupFd`` when the
handle is pickled (``spawn``/``forkserver``: the fds travel with the process
start, as a ``multiprocessing.Pipe`` does; pickled at any other time they go
through ``multiprocessing.resource_sharer``, which needs the sender alive).

Offers: the sender may offer a frame it sends under a non-zero token and a
claim slot (``offer``; ``claim_slots`` slots, one open offer each), so that
it can still take the frame back after sending it.  The receiver ``claim``s
the frame before acting on it and skips it when the claim fails; the sender
``withdraw``s it the same way.  Both are one atomic compare-and-swap of the
slot's claim word from the token to 0, so exactly one side wins; the word
reading 0 again tells the sender the offer is settled.  The supervisor uses
it to give a busy child its next tasks early (``stem.worker.dispatch``).
Compiled ring only (``can_offer``).

Side channel: a frame longer than ``max_inline`` (capacity/2 - 8) is written
into its own shared-memory segment by the sender, which then publishes a
24-byte record carrying the segment's sequence number and the frame length.
The ring checks there is room for that record *before* creating the segment,
so a full ring returns False without creating anything.  The receiver copies
the frame out and unlinks the segment.  The record is published only after the
segment is complete, so a reader never sees a partial frame -- also when the
sender dies mid-write.  The ring's ``spill_seq``/``spill_seen`` counters name
the segments created and not yet consumed; the owner removes them on close.

Lifecycle: ``Channel.create`` (supervisor) owns the segment and unlinks it --
and any side-channel segment left by a dead peer -- on ``close()``, on
``__exit__``, when the channel is garbage collected and at interpreter exit
(``weakref.finalize``).  ``attach`` removes the segment's name as soon as it
has mapped it (``keep_name=True`` to opt out): from then on no name exists
that could leak, even when the whole process group -- resource tracker
included -- is SIGKILLed; until then the segment is registered with the
creator's ``multiprocessing`` resource tracker.  ``unlink()`` removes the name
early from the owner's side (mappings stay valid).  ``attach`` maps the
segment without registering it with a resource tracker (Python 3.11 would
otherwise unlink the supervisor's segment when the child exits, or warn about
a "leak"), and a child's ``close()`` only unmaps and closes its fds.  A copy of the owner's ``Channel`` inherited by a
forked process is inert: it never unlinks, closes or frees anything -- attach
through the handle instead.  Side-channel segments are never registered with
a resource tracker: the counters above are their accounting.

Close the supervisor's channel after its child has exited (or was killed):
the owner's sweep cannot see a side-channel segment a still-running child
creates after it.  What can still leak: side-channel segments not yet read
when both ends are SIGKILLed, and the main segment when the supervisor's
whole process group is SIGKILLed before the child attached.  A peer that dies mid-write never publishes a partial
frame; ``recv_wait`` simply returns ``[]`` when its timeout passes.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import secrets
import select
import struct
import time
import weakref
from multiprocessing import reduction, resource_tracker
from multiprocessing.shared_memory import SharedMemory

import _posixshmem

from stem import _native
from stem.errors import WorkerError

_impl = _native.load("ring")
#: the ring class in use: ``stem._speedups.ring.Ring`` or ``stem._ring_py.Ring``
Ring = _impl.Ring
#: "cython" or "python": which ring implementation this process uses (``stem._native`` decides)
IMPLEMENTATION = _native.implementation("ring")

__all__ = ["Channel", "ChannelHandle", "ChannelPoller", "wait_readable", "IMPLEMENTATION", "DEFAULT_CAPACITY",
           "DEFAULT_BATCH"]

DEFAULT_CAPACITY = 1 << 20
MIN_CAPACITY = 4096
DEFAULT_BATCH = 1024

_MAGIC = b"STEMRING"
_HEADER = struct.Struct("=8sIIQQ")
#: bytes before ring 0 in a channel segment (the segment layout in this docstring)
SEGMENT_HEADER_BYTES = 64
_COUNTER = struct.Struct("=Q")
_NAME_PREFIX = "stmr_"
_RING_LETTERS = ("t", "r")  # ring 0: tasks, ring 1: results
_SIDES = ("parent", "child")


# -- shared-memory helpers ------------------------------------------------------


def _segment_bytes(capacity: int) -> int:
    return SEGMENT_HEADER_BYTES + 2 * _impl.ring_bytes(capacity)


def _ring_offset(index: int, capacity: int) -> int:
    return SEGMENT_HEADER_BYTES + index * _impl.ring_bytes(capacity)


def _round_capacity(capacity: int) -> int:
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
        raise ValueError(f"capacity must be a positive number of bytes, got {capacity!r}")
    if capacity > _impl.MAX_CAPACITY:
        raise ValueError(f"capacity must be at most {_impl.MAX_CAPACITY} bytes, got {capacity}")
    return max(MIN_CAPACITY, 1 << (capacity - 1).bit_length())


def _unlink_quietly(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def _write_segment(name: str, frame) -> None:
    """Create segment ``name`` holding exactly ``frame`` (never tracked by a resource tracker)."""
    n = memoryview(frame).nbytes
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        os.ftruncate(fd, n)
        with mmap.mmap(fd, n) as mm:
            mm[:] = frame
    except BaseException:
        _unlink_quietly(name)
        raise
    finally:
        os.close(fd)


def _read_segment(name: str, length: int) -> bytes:
    """Copy the frame out of segment ``name`` and unlink it."""
    fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    try:
        with mmap.mmap(fd, length, access=mmap.ACCESS_READ) as mm:
            frame = mm[:]
    finally:
        os.close(fd)
    _unlink_quietly(name)
    return frame


def _write_spill(prefix: str, seq: int, frame) -> None:
    _write_segment(f"{prefix}{seq:x}", frame)


def _read_spill(prefix: str, seq: int, length: int) -> bytes:
    return _read_segment(f"{prefix}{seq:x}", length)


def _sweep_spills(buf, name: str, capacity: int) -> None:
    """Unlink every side-channel segment created and not consumed: seq in (spill_seen, spill_seq]."""
    most = capacity // _impl.SPILL_BYTES + 2  # more records than that cannot be in flight
    for index, letter in enumerate(_RING_LETTERS):
        offset = _ring_offset(index, capacity)
        # the side-channel counters in the ring's control block (layout: stem/_ring_py.py)
        (seen,) = _COUNTER.unpack_from(buf, offset + _impl.OFF_SPILL_SEEN)
        (created,) = _COUNTER.unpack_from(buf, offset + _impl.OFF_SPILL_SEQ)
        for seq in range(max(seen, created - most) + 1, created + 1):
            _unlink_quietly(f"{name}_{letter}{seq:x}")


# -- doorbells ------------------------------------------------------------------


def _new_doorbell() -> tuple[int, int]:
    """(read fd, write fd): one eventfd on Linux, a non-blocking pipe elsewhere."""
    if hasattr(os, "eventfd"):
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return fd, fd
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _drain(fd: int) -> None:
    try:
        os.read(fd, 4096)
    except BlockingIOError:
        pass


def _poll_ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


# -- the handle -------------------------------------------------------------------


class ChannelHandle:
    """What a child needs to attach: the segment name, its capacity and the doorbell fds.

    ``bells`` is ``(parent_read, parent_write, child_read, child_write)``; with
    eventfds each pair is one fd.  Pickling wraps the fds in
    ``multiprocessing.reduction.DupFd``, so a handle passed as a ``Process``
    argument reaches ``spawn``/``forkserver`` children with working fds.
    """

    __slots__ = ("name", "capacity", "bells", "_received")

    def __init__(self, name: str, capacity: int, bells: tuple[int, int, int, int],
                 _received: bool = False):
        self.name = name
        self.capacity = capacity
        self.bells = tuple(bells)
        self._received = _received  # the fds were made for us by unpickling: take them

    def __reduce__(self):
        unique = list(dict.fromkeys(self.bells))
        index = tuple(unique.index(fd) for fd in self.bells)
        return (_rebuild_handle,
                (self.name, self.capacity, index, tuple(reduction.DupFd(fd) for fd in unique)))

    def _take_fds(self) -> tuple[int, int, int, int]:
        if self._received:
            self._received = False
            return self.bells
        dups = {fd: os.dup(fd) for fd in dict.fromkeys(self.bells)}
        return tuple(dups[fd] for fd in self.bells)

    def __repr__(self) -> str:
        return f"ChannelHandle({self.name!r}, capacity={self.capacity}, bells={self.bells})"


def _rebuild_handle(name, capacity, index, dupfds) -> ChannelHandle:
    fds = [d.detach() for d in dupfds]
    return ChannelHandle(name, capacity, tuple(fds[i] for i in index), _received=True)


# -- the channel ----------------------------------------------------------------------


class _Resources:
    """Everything a channel must give back; held by its finalizer, never pointing at the channel."""

    def __init__(self, *, owner: bool, name: str, capacity: int, shm, mapping, fds, rings):
        self.pid = os.getpid()
        self.owner = owner
        self.name = name
        self.capacity = capacity
        self.shm = shm            # SharedMemory (owner) or None
        self.mapping = mapping    # the mmap of an attached side, or None
        self.fds = fds
        self.rings = rings
        self.unlinked = False

    def unlink(self) -> None:
        if self.unlinked:
            return
        self.unlinked = True
        try:
            self.shm.unlink()
        except FileNotFoundError:  # removed behind our back; still forget it in the tracker
            resource_tracker.unregister(self.shm._name, "shared_memory")

    def release(self) -> None:
        if os.getpid() != self.pid:
            return  # a forked copy: these resources belong to the creator
        for ring in self.rings:
            ring.close()
        if self.owner:
            try:
                _sweep_spills(self.shm.buf, self.name, self.capacity)
            finally:
                self.unlink()
        try:
            if self.shm is not None:
                self.shm.close()
            else:
                self.mapping.close()
        except BufferError:
            pass  # someone still holds a view of the segment; it is unmapped with them
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


class Channel:
    """One side of a supervisor <-> child channel; see the module docstring."""

    @classmethod
    def create(cls, capacity: int = DEFAULT_CAPACITY) -> "Channel":
        """Create a channel (the supervisor's side, ``side="parent"``), which owns the segment."""
        capacity = _round_capacity(capacity)
        fds: list[int] = []
        try:
            parent_bell = _new_doorbell()
            fds += dict.fromkeys(parent_bell)
            child_bell = _new_doorbell()
            fds += dict.fromkeys(child_bell)
            for _ in range(8):
                name = f"{_NAME_PREFIX}{os.getpid():x}_{secrets.token_hex(4)}"
                try:
                    shm = SharedMemory(name=name, create=True, size=_segment_bytes(capacity))
                    break
                except FileExistsError:
                    continue
            else:
                raise WorkerError("could not find a free shared-memory name for a channel")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        try:
            _HEADER.pack_into(shm.buf, 0, _MAGIC, _impl.LAYOUT_VERSION, 0, capacity, os.getpid())
            return cls._open(name, capacity, "parent", parent_bell + child_bell, shm=shm,
                             mapping=None)
        except BaseException:
            shm.close()
            shm.unlink()
            for fd in fds:
                os.close(fd)
            raise

    @classmethod
    def attach(cls, handle: ChannelHandle, side: str = "child", *,
               keep_name: bool = False) -> "Channel":
        """Map an existing channel from ``handle``; the result never owns the segment.

        The segment's name is only a rendezvous: once mapped, it is removed
        (the segment lives on while the supervisor and this process map it),
        so even a SIGKILL of the whole process group -- resource tracker
        included -- leaves nothing in /dev/shm.  The handle is then spent.
        ``keep_name=True`` leaves the name for further attaches; the owner's
        ``close()``/``unlink()`` removes it.
        """
        if side not in _SIDES:
            raise ValueError(f"side must be 'parent' or 'child', got {side!r}")
        bells = handle._take_fds()
        unique = list(dict.fromkeys(bells))
        try:
            try:
                fd = _posixshmem.shm_open("/" + handle.name, os.O_RDWR, mode=0o600)
            except FileNotFoundError:
                raise WorkerError(f"channel segment {handle.name!r} is gone: its supervisor "
                                  "closed or unlinked it") from None
            try:
                mapping = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            try:
                magic, version, _, capacity, _ = _HEADER.unpack_from(mapping, 0)
                if magic != _MAGIC or version != _impl.LAYOUT_VERSION or capacity != handle.capacity:
                    raise WorkerError(
                        f"segment {handle.name!r} is not a stem channel of layout "
                        f"{_impl.LAYOUT_VERSION} and capacity {handle.capacity} "
                        f"(magic={magic!r}, version={version}, capacity={capacity})")
                channel = cls._open(handle.name, capacity, side, bells, shm=None, mapping=mapping)
            except BaseException:
                mapping.close()
                raise
        except BaseException:
            for fd in unique:
                os.close(fd)
            raise
        if not keep_name:
            _unlink_quietly(handle.name)
        return channel

    @classmethod
    def _open(cls, name, capacity, side, bells, *, shm, mapping) -> "Channel":
        self = cls.__new__(cls)
        buf = shm.buf if shm is not None else mapping
        me = 0 if side == "parent" else 1
        my_read, my_write = bells[2 * me], bells[2 * me + 1]
        peer_write = bells[2 * (1 - me) + 1]
        out_index, in_index = me, 1 - me  # the parent writes ring 0, the child ring 1
        out = Ring(buf, _ring_offset(out_index, capacity), capacity,
                   reader_bell=peer_write, writer_bell=my_write,
                   spill=functools.partial(_write_spill, f"{name}_{_RING_LETTERS[out_index]}"))
        try:
            inn = Ring(buf, _ring_offset(in_index, capacity), capacity,
                       reader_bell=my_write, writer_bell=peer_write,
                       unspill=functools.partial(_read_spill, f"{name}_{_RING_LETTERS[in_index]}"))
        except BaseException:
            out.close()
            raise
        self.name = name
        self.side = side
        self.capacity = capacity
        self.max_inline = out.max_inline
        self._bells = tuple(bells)
        self._owner = shm is not None
        self._out = out
        self._in = inn
        self._bell_fd = my_read
        self._poll = select.poll()
        self._poll.register(my_read, select.POLLIN)
        # the ring's own methods, bound: no Python frame on the hot path
        self.send = out.send
        self.send_quiet = out.send_quiet
        self.send_many = out.send_many
        self.recv = inn.recv
        self.recv_many = inn.recv_many
        self.pending_bytes = inn.pending_bytes
        self.arm_doorbell = inn.arm_recv
        self.offer = out.offer
        self.withdraw = out.claim
        self.offered = out.offered
        self.open_slots = out.open_slots
        self.claim = inn.claim
        self._resources = _Resources(owner=self._owner, name=name, capacity=capacity, shm=shm,
                                     mapping=mapping, fds=list(dict.fromkeys(bells)),
                                     rings=(out, inn))
        self._finalizer = weakref.finalize(self, self._resources.release)
        return self

    # send, send_many, recv, recv_many, pending_bytes, arm_doorbell and the offer methods are
    # shadowed per instance by the ring's bound methods (see _open); these document the API and
    # behave identically.

    def send(self, frame) -> bool:
        """Write one frame; False (nothing written) if it does not fit now."""
        return self._out.send(frame)

    can_offer: bool = _impl.ATOMIC_CLAIM
    claim_slots: int = _impl.CLAIM_SLOTS

    def offer(self, token: int, slot: int = 0) -> None:
        """Offer the next frame this side sends under ``token`` in ``slot`` (see "Offers")."""
        self._out.offer(token, slot)

    def withdraw(self, token: int, slot: int = 0) -> bool:
        """Take back the offered frame ``token``: True when the peer had not claimed it."""
        return self._out.claim(token, slot)

    def offered(self, slot: int = 0) -> int:
        """The token of this side's open offer in ``slot``, 0 when the peer claimed it or none is open."""
        return self._out.offered(slot)

    def open_slots(self) -> int:
        """A bit per claim slot whose offer (this side's) is still open: ``offered`` for
        every slot in one call."""
        return self._out.open_slots()

    def claim(self, token: int, slot: int = 0) -> bool:
        """Take the frame the peer offered under ``token`` in ``slot``: False when it was withdrawn."""
        return self._in.claim(token, slot)

    def send_many(self, frames, start: int = 0) -> int:
        """Write ``frames[start:]`` (a list or tuple) in order until one does not fit.

        Returns how many were written; all of them are published at once.
        """
        return self._out.send_many(frames, start)

    def recv(self) -> bytes | None:
        """The next frame, or None when nothing is pending."""
        return self._in.recv()

    def recv_many(self, max_n: int) -> list[bytes]:
        """Up to ``max_n`` pending frames (possibly none)."""
        return self._in.recv_many(max_n)

    def recv_wait(self, timeout: float, max_n: int = DEFAULT_BATCH) -> list[bytes]:
        """Up to ``max_n`` frames, sleeping on the doorbell for at most ``timeout`` seconds.

        Returns ``[]`` when the timeout passes with nothing received (also
        when the peer died: a partial frame is never published).
        """
        ring = self._in
        frames = ring.recv_many(max_n)
        if frames or timeout <= 0:
            return frames
        deadline = time.monotonic() + timeout
        while True:
            ring.wait(self._bell_fd, _poll_ms(deadline - time.monotonic()))
            frames = ring.recv_many(max_n)
            if frames or time.monotonic() >= deadline:
                return frames

    def send_wait(self, frames, timeout: float) -> int:
        """Write all ``frames`` in order, sleeping while the ring is full, for at most ``timeout``.

        Returns how many were written (``len(frames)`` unless the timeout passed).
        """
        out = self._out
        total = len(frames)
        done = out.send_many(frames)
        if done == total or timeout <= 0:
            return done
        deadline = time.monotonic() + timeout
        while True:
            if out.arm_send(memoryview(frames[done]).nbytes):
                remaining = deadline - time.monotonic()
                if remaining > 0 and self._poll.poll(_poll_ms(remaining)):
                    _drain(self._bell_fd)
                out.disarm_send()
            done += out.send_many(frames, done)
            if done == total or time.monotonic() >= deadline:
                return done

    def arm_doorbell(self) -> bool:
        """Before sleeping on ``fileno()`` in your own selector: announce it to the peer.

        Returns False (nothing armed) when frames are pending already: receive
        them instead of sleeping.  After waking up -- or giving up -- call
        ``disarm_doorbell()``.  ``wait_readable`` does all this for channels only.
        """
        return self._in.arm_recv()

    def disarm_doorbell(self, drain: bool = True) -> None:
        """Undo ``arm_doorbell()`` and drain the doorbell, so the fd reads as quiet again.

        ``drain=False`` when your selector said the fd is quiet (or you drained it with
        ``drain_doorbell()``): it saves a ``read``.  A bell rung in between only makes
        the next wait return at once, to find the frames.
        """
        self._in.disarm_recv()
        if drain:
            _drain(self._bell_fd)

    def drain_doorbell(self) -> None:
        """Consume a ring of the doorbell (after your selector reported ``fileno()`` readable)."""
        _drain(self._bell_fd)

    def pending_bytes(self) -> int:
        """Bytes of incoming records not yet received (0: nothing to receive)."""
        return self._in.pending_bytes()

    def free_bytes(self) -> int:
        """Bytes free in the outgoing ring (a frame needs 8 + its length rounded up to 8)."""
        return self._out.free_bytes()

    def fileno(self) -> int:
        """The incoming doorbell: readable after a peer rang it (see ``wait_readable``)."""
        return self._bell_fd

    @property
    def handle(self) -> ChannelHandle:
        """A small picklable object from which ``Channel.attach`` maps this channel."""
        return ChannelHandle(self.name, self.capacity, self._bells)

    @property
    def owner(self) -> bool:
        """True in the process that created the channel: it unlinks the segment."""
        return self._owner and self._resources.pid == os.getpid()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def unlink(self) -> None:
        """Remove the segment's name now (owner only); mappings stay valid until closed."""
        if not self.owner:
            raise WorkerError(f"only the process that created channel {self.name!r} unlinks it")
        self._resources.unlink()

    def close(self) -> None:
        """Unmap and close the doorbells; the owner also unlinks everything.  Idempotent."""
        self._finalizer()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError("a Channel is not picklable; pass ch.handle and Channel.attach() it")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pending={self.pending_bytes()}"
        return (f"<Channel {self.name} side={self.side} capacity={self.capacity} "
                f"owner={self.owner} {state}>")


class ChannelPoller:
    """One thread waiting on many channels (and other fds) with one ``poll()``.

    Built once for a set of channels, reused for every wait::

        poller = ChannelPoller(channels, fds=[wake_fd], tags=children)
        ready, fired = poller.wait(0.05)   # tags of channels with frames, readable fds

    ``wait`` returns at once when a channel has frames pending; otherwise it
    arms every channel's doorbell and sleeps (without the GIL in the compiled
    build) until a doorbell rings, one of ``fds`` is readable or ``timeout``
    passes, drains the doorbells that rang and disarms.  ``fds`` are reported,
    never read.  Wake-ups can be spurious.  ``tags`` (default: the channels)
    are what ``wait`` returns for the channels.
    """

    __slots__ = ("channels", "fds", "_rings", "_bells", "_tags")

    def __init__(self, channels, fds=(), tags=None):
        self.channels = list(channels)
        self.fds = list(fds)
        self._rings = [ch._in for ch in self.channels]
        self._bells = [ch._bell_fd for ch in self.channels]
        self._tags = list(self.channels if tags is None else tags)
        if len(self._tags) != len(self.channels):
            raise ValueError("ChannelPoller needs one tag per channel")

    def wait(self, timeout: float) -> tuple[list, list[int]]:
        return _impl.wait_rings(self._rings, self._bells, self.fds, _poll_ms(timeout), self._tags)


def wait_readable(channels, timeout: float) -> list[Channel]:
    """Block until some of ``channels`` have incoming frames, for at most ``timeout`` seconds.

    Returns those channels (``[]`` on timeout).  One thread can serve many
    children this way: every channel is armed, then one ``poll()`` sleeps on
    all their doorbells (``ChannelPoller`` does one such wait, reusably).
    """
    poller = ChannelPoller(channels)
    deadline = time.monotonic() + timeout
    while True:
        ready, _ = poller.wait(deadline - time.monotonic())
        if ready or time.monotonic() >= deadline:
            return ready
