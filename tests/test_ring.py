"""The shared-memory ring and the supervisor <-> child channel built on it.

Three layers: the ring itself on both builds in one process (the ``impl``
fixture: the ring of conftest's ``twin``, ids ``c``/``py``) and across builds on one buffer (compiled writer,
pure reader and the reverse); the ``Channel`` on whichever build
``stem.worker.channel`` selected, in one process; and the channel across real
processes (``fork`` and ``spawn``), including children that die mid-write.
Every test checks that no segment it created is left in /dev/shm.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stem import _ring_py
from stem.errors import WorkerError
from stem.worker import channel as ring_module
from stem.worker.channel import Channel, ChannelHandle, wait_readable
from .support import wait_for as wait_until

SETTINGS = settings(deadline=None, max_examples=120,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SEGMENT_PREFIX = f"stmr_{os.getpid():x}_"
SHM_DIR = "/dev/shm"
# the doorbell flags inside a ring's control block (both builds agree: see the layout test)
READER_WAITING = _ring_py.OFF_READER_WAITING
WRITER_WAITING = _ring_py.OFF_WRITER_WAITING


# -- helpers -------------------------------------------------------------------------


def shm_names(prefix: str = SEGMENT_PREFIX) -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}


def frame(seq: int, size: int) -> bytes:
    """``seq`` (8 bytes) | crc32 of the body (4 bytes) | a body derived from seq; >= 12 bytes."""
    body_len = max(0, size - 12)
    body = (seq.to_bytes(8, "little") * (body_len // 8 + 1))[:body_len]
    return seq.to_bytes(8, "little") + zlib.crc32(body).to_bytes(4, "little") + body


def check_frame(data: bytes) -> int:
    """The frame's seq, after checking that it is complete and intact."""
    seq = int.from_bytes(data[:8], "little")
    assert zlib.crc32(data[12:]) == int.from_bytes(data[8:12], "little"), f"frame {seq} is torn"
    assert data == frame(seq, len(data)), f"frame {seq} has the wrong content"
    return seq




def flag(ch: Channel, ring_index: int, offset: int) -> int:
    """Read a doorbell flag of ring 0 (tasks) or 1 (results) straight from the segment."""
    buf = ch._resources.shm.buf if ch._resources.shm is not None else ch._resources.mapping
    base = ring_module.SEGMENT_HEADER_BYTES + ring_index * _ring_py.ring_bytes(ch.capacity)
    return struct.unpack_from("=I", buf, base + offset)[0]


def reader_flag(impl, buf, offset: int = 0) -> int:
    """The ``reader_waiting`` flag of the ring at ``offset`` in ``buf``."""
    return struct.unpack_from("=I", buf, offset + impl.OFF_READER_WAITING)[0]


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_segment_is_left_in_dev_shm():
    before = shm_names()
    yield
    gc.collect()
    leaked = shm_names() - before
    assert not leaked, f"segments left in /dev/shm: {sorted(leaked)}"


@pytest.fixture(scope="module")
def impl(twin):
    """The ring of each build in turn (``twin``: ``c``, then ``py``)."""
    return twin.ring


@pytest.fixture(params=["c-writes-py-reads", "py-writes-c-reads"])
def writer_reader(request, compiled_twin):
    c, py = compiled_twin.ring, _ring_py
    return (c, py) if request.param == "c-writes-py-reads" else (py, c)


class SpillStore:
    """An in-memory side channel for ring-level tests."""

    def __init__(self):
        self.segments: dict[int, bytes] = {}

    def spill(self, seq, data):
        assert seq not in self.segments
        self.segments[seq] = bytes(data)

    def unspill(self, seq, length):
        data = self.segments.pop(seq)
        assert len(data) == length
        return data


def make_ring(mod, buf, capacity, store=None, **kw):
    if store is not None:
        kw.update(spill=store.spill, unspill=store.unspill)
    return mod.Ring(buf, 0, capacity, **kw)


ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.lists(st.integers(0, 400), min_size=1, max_size=8)),
        st.tuples(st.just("recv"), st.integers(1, 10)),
    ),
    max_size=80,
)


def run_ops(writer, reader, capacity, ops):
    """Apply ``ops`` to a writer/reader pair and compare with a list model."""
    model: list[bytes] = []
    seq = 0
    for op, arg in ops:
        if op == "send":
            frames = [frame(seq + i, max(12, size)) for i, size in enumerate(arg)]
            if len(frames) == 1 and seq % 2:
                n = 1 if writer.send(frames[0]) else 0
            else:
                n = writer.send_many(frames)
            assert 0 <= n <= len(frames)
            if n < len(frames):
                assert not writer.fits(len(frames[n]))
            model += frames[:n]
            seq += n
        else:
            got = reader.recv_many(arg) if arg > 1 else [x for x in [reader.recv()] if x is not None]
            assert got == model[:len(got)]
            assert len(got) == min(arg, len(model))
            del model[:len(got)]
    assert reader.recv_many(10**6) == model
    assert reader.pending_bytes() == 0 and writer.free_bytes() == capacity


# -- the ring, both builds ---------------------------------------------------------------


def test_both_builds_export_the_same_layout_constants_and_offsets(compiled_twin):
    c = compiled_twin.ring
    constants = [name for name in _ring_py.__all__ if name.isupper() and name != "ATOMIC_CLAIM"]
    assert {"CTRL_BYTES", "OFF_HEAD", "OFF_SPILL_SEEN", "OFF_TAIL", "OFF_SPILL_SEQ", "OFF_READER_WAITING",
            "OFF_WRITER_WAITING", "OFF_CLAIM", "CLAIM_SLOTS"} <= set(constants)
    assert {name: getattr(c, name) for name in constants} == {name: getattr(_ring_py, name) for name in constants}
    assert c.max_inline(4096) == _ring_py.max_inline(4096) == 2040
    assert c.ring_bytes(4096) == _ring_py.ring_bytes(4096) == 4096 + 256


def test_the_control_block_offsets_fit_the_control_block():
    """Each word in its place: head and tail on cache lines of their own, the claim words
    after the flags, all inside ``CTRL_BYTES``."""
    r = _ring_py
    assert r.OFF_HEAD % 64 == r.OFF_TAIL % 64 == r.OFF_READER_WAITING % 64 == r.OFF_WRITER_WAITING % 64 == 0
    assert r.OFF_HEAD < r.OFF_SPILL_SEEN < r.OFF_TAIL < r.OFF_SPILL_SEQ < r.OFF_READER_WAITING
    assert r.OFF_WRITER_WAITING + 4 <= r.OFF_CLAIM and r.OFF_CLAIM % 8 == 0
    assert r.OFF_CLAIM + 8 * r.CLAIM_SLOTS <= r.CTRL_BYTES


@SETTINGS
@given(ops=ops_strategy, capacity=st.sampled_from([256, 512, 4096]))
def test_frames_of_random_sizes_round_trip_in_order_across_wrap_around(impl, ops, capacity):
    buf = bytearray(impl.ring_bytes(capacity))
    store = SpillStore()
    w, r = make_ring(impl, buf, capacity, store), make_ring(impl, buf, capacity, store)
    try:
        run_ops(w, r, capacity, ops)
        assert not store.segments
    finally:
        w.close()
        r.close()


@SETTINGS
@given(ops=ops_strategy, capacity=st.sampled_from([256, 1024]))
def test_a_writer_of_one_build_and_a_reader_of_the_other_share_one_layout(writer_reader, ops,
                                                                          capacity):
    wmod, rmod = writer_reader
    buf = bytearray(_ring_py.ring_bytes(capacity))
    store = SpillStore()
    w, r = make_ring(wmod, buf, capacity, store), make_ring(rmod, buf, capacity, store)
    try:
        run_ops(w, r, capacity, ops)
    finally:
        w.close()
        r.close()


def test_a_full_ring_refuses_a_frame_and_keeps_what_it_holds(impl):
    buf = bytearray(impl.ring_bytes(1024))
    w, r = impl.Ring(buf, 0, 1024), impl.Ring(buf, 0, 1024)
    sent = []
    while w.send(frame(len(sent), 100)):
        sent.append(frame(len(sent), 100))
    assert len(sent) == 1024 // 112 and w.free_bytes() < 112  # 8-byte header + 104 padded
    assert not w.send(frame(99, 100)) and w.send_many([frame(99, 100)]) == 0
    assert r.recv_many(1000) == sent
    assert w.send(frame(7, 100)) and r.recv() == frame(7, 100)
    w.close()
    r.close()


def test_receiving_from_an_empty_ring_gives_none_and_an_empty_list(impl):
    buf = bytearray(impl.ring_bytes(256))
    r = impl.Ring(buf, 0, 256)
    assert r.recv() is None and r.recv_many(10) == [] and r.pending_bytes() == 0
    assert r.recv_many(0) == []
    r.close()


def test_send_many_stops_at_the_first_frame_that_does_not_fit_and_keeps_order(impl):
    buf = bytearray(impl.ring_bytes(256))
    w, r = impl.Ring(buf, 0, 256), impl.Ring(buf, 0, 256)
    frames = [frame(i, 60) for i in range(10)]  # 72-byte records: three fit in 256 bytes
    assert w.send_many(frames) == 3
    assert w.send_many(frames, 3) == 0
    assert r.recv_many(2) == frames[:2]
    assert w.send_many(frames, 3) == 2  # one freed record + the wrap padding make room for two
    assert r.recv_many(10) == frames[2:5]
    w.close()
    r.close()


def test_frames_may_be_any_contiguous_bytes_like_object_including_empty(impl):
    buf = bytearray(impl.ring_bytes(256))
    w, r = impl.Ring(buf, 0, 256), impl.Ring(buf, 0, 256)
    assert w.send_many([b"", bytearray(b"ab"), memoryview(b"xyz123")[1:4], b"q"]) == 4
    got = r.recv_many(10)
    assert got == [b"", b"ab", b"yz1", b"q"] and {type(x) for x in got} == {bytes}
    w.close()
    r.close()


def test_a_frame_above_max_inline_without_a_side_channel_is_refused_with_a_clear_error(impl):
    buf = bytearray(impl.ring_bytes(256))
    w = impl.Ring(buf, 0, 256)
    assert w.max_inline == 120
    assert w.send(bytes(120))
    with pytest.raises(ValueError, match="max_inline"):
        w.send(bytes(121))
    w.close()


def test_a_closed_ring_refuses_every_operation_and_releases_its_buffer(impl):
    buf = bytearray(impl.ring_bytes(256))
    w = impl.Ring(buf, 0, 256)
    w.close()
    w.close()
    assert w.closed
    for call in (lambda: w.send(b"x"), lambda: w.send_many([b"x"]), lambda: w.recv_many(1)):
        with pytest.raises(ValueError, match="closed"):
            call()
    buf.extend(b"more")  # no export left on the bytearray


def test_bad_geometry_is_refused(impl):
    with pytest.raises(ValueError, match="power of two"):
        impl.Ring(bytearray(2000), 0, 1000)
    with pytest.raises(ValueError, match="too small"):
        impl.Ring(bytearray(300), 0, 256)
    with pytest.raises(ValueError, match="multiple of 64"):
        impl.Ring(bytearray(1024), 8, 256)
    with pytest.raises(TypeError, match="writable"):
        impl.Ring(bytes(1024), 0, 256)


def test_a_failing_side_channel_publishes_the_frames_before_it_and_raises_next(impl):
    buf = bytearray(impl.ring_bytes(256))
    calls = []

    def spill(seq, data):
        calls.append(seq)
        raise OSError("no space left on /dev/shm")

    w, r = impl.Ring(buf, 0, 256, spill=spill), impl.Ring(buf, 0, 256)
    assert w.send_many([b"a", b"b", bytes(500), b"c"]) == 2
    assert r.recv_many(10) == [b"a", b"b"]
    with pytest.raises(OSError, match="no space"):
        w.send_many([bytes(500), b"c"])
    assert r.recv_many(10) == []
    w.close()
    r.close()


def test_a_side_channel_frame_that_cannot_be_read_is_reported_once_not_forever(impl):
    buf = bytearray(impl.ring_bytes(256))
    store = SpillStore()
    w = impl.Ring(buf, 0, 256, spill=store.spill)
    r = impl.Ring(buf, 0, 256, unspill=lambda seq, n: store.segments.pop(seq))
    assert w.send_many([b"a", bytes(300), b"b"]) == 3
    store.segments.clear()  # the segment vanished behind the channel's back
    assert r.recv_many(10) == [b"a"]
    with pytest.raises(KeyError):
        r.recv_many(10)
    assert r.recv_many(10) == [b"b"]
    w.close()
    r.close()


@contextlib.contextmanager
def _belled_ring(impl):
    """A writer and a reader of one 256-byte ring, the reader's doorbell an eventfd, and
    ``rung()``: did the writer ring it since the last look."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    buf = bytearray(impl.ring_bytes(256))
    w, r = impl.Ring(buf, 0, 256, reader_bell=fd), impl.Ring(buf, 0, 256)

    def rung() -> bool:
        try:
            return os.eventfd_read(fd) > 0
        except BlockingIOError:
            return False

    try:
        yield w, r, rung
    finally:
        w.close()
        r.close()
        os.close(fd)


def test_a_writer_rings_the_doorbell_only_when_the_reader_announced_sleep(impl):
    with _belled_ring(impl) as (w, r, rung):
        assert w.send(b"busy") and not rung()          # nobody sleeps: no system call
        assert not r.arm_recv()                        # something pending: do not sleep
        assert r.recv() == b"busy" and r.arm_recv()    # empty: the reader may sleep
        assert w.send_many([b"x", b"y"]) == 2 and rung()
        assert w.send(b"z") and not rung()             # the flag was cleared by the first ring
        r.disarm_recv()


def test_a_quiet_send_publishes_without_ringing_and_the_next_send_rings(impl):
    with _belled_ring(impl) as (w, r, rung):
        assert r.arm_recv()                                     # the reader is about to sleep
        assert w.send_quiet(b"quiet") and not rung()            # published, nobody woken
        assert r.pending_bytes() > 0
        assert w.send(b"loud") and rung()                       # the flag was still set
        assert r.recv_many(10) == [b"quiet", b"loud"]
        n = 0
        while w.send_quiet(b"x" * 100):
            n += 1
        assert n > 0 and not rung()
        assert r.recv_many(100) == [b"x" * 100] * n             # the one that did not fit left nothing


def test_ring_wait_sleeps_until_the_writer_rings_and_drains_the_bell(impl):
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    buf = bytearray(impl.ring_bytes(256))
    w, r = impl.Ring(buf, 0, 256, reader_bell=fd), impl.Ring(buf, 0, 256)
    try:
        assert r.wait(fd, 0) is False                  # nothing pending, nothing rang
        assert reader_flag(impl, buf) == 0                # disarmed again
        w.send(b"early")
        assert r.wait(fd, 60_000) is True              # pending already: returns at once
        assert r.recv() == b"early"
        result = []
        t = threading.Thread(target=lambda: result.append(r.wait(fd, 60_000)))
        t.start()
        wait_until(lambda: reader_flag(impl, buf) != 0, what="the reader armed its doorbell")
        assert w.send(b"wake")
        t.join(10)
        assert result == [True] and r.recv() == b"wake"
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)                        # the bell was drained
        assert reader_flag(impl, buf) == 0
    finally:
        w.close()
        r.close()
        os.close(fd)


def test_wait_rings_returns_the_tags_of_rings_with_frames_and_the_readable_fds(impl):
    bells = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    other_r, other_w = os.pipe()
    buf = bytearray(3 * impl.ring_bytes(256))
    offsets = [i * impl.ring_bytes(256) for i in range(3)]
    writers = [impl.Ring(buf, o, 256, reader_bell=b) for o, b in zip(offsets, bells)]
    readers = [impl.Ring(buf, o, 256) for o in offsets]
    tags = ["a", "b", "c"]
    try:
        assert impl.wait_rings(readers, bells, [other_r], 0, tags) == ([], [])
        writers[2].send(b"x")
        assert impl.wait_rings(readers, bells, [other_r], 60_000, tags) == (["c"], [])  # at once
        readers[2].recv()
        result = []
        t = threading.Thread(target=lambda: result.append(impl.wait_rings(readers, bells, [other_r], 60_000, tags)))
        t.start()
        wait_until(lambda: all(reader_flag(impl, buf, o) != 0 for o in offsets), what="all rings armed")
        writers[1].send(b"y")
        t.join(10)
        assert result == [(["b"], [])]
        assert all(reader_flag(impl, buf, o) == 0 for o in offsets)   # all disarmed
        with pytest.raises(BlockingIOError):
            os.eventfd_read(bells[1])                                   # drained
        readers[1].recv()
        os.write(other_w, b"!")
        assert impl.wait_rings(readers, bells, [other_r], 60_000, tags) == ([], [other_r])
        assert os.read(other_r, 10) == b"!"                             # reported, never read
        with pytest.raises(ValueError):
            impl.wait_rings(readers, bells[:2], [], 0, tags)
    finally:
        for ring in writers + readers:
            ring.close()
        for fd in bells + [other_r, other_w]:
            os.close(fd)


def test_a_signal_handler_that_raises_interrupts_a_ring_wait(impl):
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    buf = bytearray(impl.ring_bytes(256))
    r = impl.Ring(buf, 0, 256)

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted):
            r.wait(fd, 60_000)
        assert reader_flag(impl, buf) == 0                # disarmed on the way out
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted):
            impl.wait_rings([r], [fd], [], 60_000, ["r"])
        assert reader_flag(impl, buf) == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        r.close()
        os.close(fd)


def test_many_rings_and_fds_can_be_waited_on_at_once(impl):
    n = 20  # more than the compiled build keeps on its stack
    bells = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
    buf = bytearray(n * impl.ring_bytes(64))
    offsets = [i * impl.ring_bytes(64) for i in range(n)]
    writers = [impl.Ring(buf, o, 64, reader_bell=b) for o, b in zip(offsets, bells)]
    readers = [impl.Ring(buf, o, 64) for o in offsets]
    try:
        assert impl.wait_rings(readers, bells, bells[:3], 0, list(range(n))) == ([], [])
        result = []
        t = threading.Thread(target=lambda: result.append(
            impl.wait_rings(readers, bells, [], 60_000, list(range(n)))))
        t.start()
        wait_until(lambda: all(reader_flag(impl, buf, o) != 0 for o in offsets), what="all rings armed")
        writers[17].send(b"late")
        t.join(10)
        assert result == [([17], [])]
    finally:
        for ring in writers + readers:
            ring.close()
        for fd in bells:
            os.close(fd)


def test_a_reader_rings_a_writer_waiting_for_space(impl):
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    buf = bytearray(impl.ring_bytes(256))
    w, r = impl.Ring(buf, 0, 256), impl.Ring(buf, 0, 256, writer_bell=fd)
    try:
        while w.send(bytes(50)):
            pass
        assert w.arm_send(50)                       # full for this one: the writer may sleep
        assert r.recv() is not None
        assert os.eventfd_read(fd) == 1
        assert not w.arm_send(50)                   # space now: do not sleep
    finally:
        w.close()
        r.close()
        os.close(fd)


# -- the channel, in one process ----------------------------------------------------------


def test_a_channel_carries_frames_both_ways():
    with Channel.create(capacity=8192) as parent, Channel.attach(parent.handle) as child:
        assert parent.capacity == child.capacity == 8192 and parent.owner and not child.owner
        assert parent.send_many([b"t1", b"t2"]) == 2 and parent.send(b"t3")
        assert child.recv_many(10) == [b"t1", b"t2", b"t3"]
        assert child.send(b"r1") and parent.recv() == b"r1" and parent.recv() is None
        assert child.send_wait([b"r2", b"r3"], timeout=1.0) == 2
        assert parent.recv_wait(1.0) == [b"r2", b"r3"]


def test_capacity_is_rounded_up_to_a_power_of_two_of_at_least_4_kib():
    for asked, got in ((1, 4096), (5000, 8192), (1 << 20, 1 << 20)):
        with Channel.create(capacity=asked) as ch:
            assert ch.capacity == got and ch.max_inline == got // 2 - 8
    with pytest.raises(ValueError, match="positive"):
        Channel.create(capacity=0)
    with pytest.raises(ValueError, match="at most"):
        Channel.create(capacity=(1 << 31) + 1)


@SETTINGS
@given(sizes=st.lists(st.integers(0, 20_000), min_size=1, max_size=30))
def test_frames_larger_than_the_ring_travel_through_the_side_channel_intact_and_in_order(sizes):
    with Channel.create(capacity=4096) as parent, Channel.attach(parent.handle) as child:
        frames = [frame(i, max(12, s)) for i, s in enumerate(sizes)]
        got = []
        sent = 0
        while len(got) < len(frames):
            sent += parent.send_many(frames[sent:])
            got += child.recv_many(7)
            # the reader copies a side-channel frame out and unlinks its segment at once
            assert len(shm_names(parent.name + "_")) <= sent - len(got)
        assert got == frames
        assert not shm_names(parent.name + "_")
        big = frame(10**6, 50_000)
        assert child.send(big) and parent.recv() == big


def test_a_full_ring_refuses_a_large_frame_without_creating_a_segment():
    with Channel.create(capacity=4096) as parent, Channel.attach(parent.handle) as child:
        while parent.send(bytes(500)):
            pass
        before = shm_names(parent.name + "_")
        assert not parent.send(bytes(10_000)) and shm_names(parent.name + "_") == before
        child.recv_many(100)
        assert parent.send(frame(1, 10_000)) and child.recv() == frame(1, 10_000)


def test_recv_wait_returns_an_empty_list_when_the_timeout_passes():
    with Channel.create(capacity=4096) as ch:
        start = time.monotonic()
        assert ch.recv_wait(0.2) == []
        assert 0.19 <= time.monotonic() - start < 5.0
        assert ch.recv_wait(0) == []


def test_send_wait_gives_up_when_the_reader_never_frees_space():
    with Channel.create(capacity=4096) as ch:
        frames = [bytes(1000)] * 10
        start = time.monotonic()
        assert ch.send_wait(frames, 0.2) == 4  # 1008-byte records in 4096 bytes
        assert 0.19 <= time.monotonic() - start < 5.0


def test_a_sleeping_reader_thread_is_woken_by_the_doorbell():
    with Channel.create(capacity=4096) as parent, Channel.attach(parent.handle) as child:
        result = []
        t = threading.Thread(target=lambda: result.append(child.recv_wait(30.0)))
        t.start()
        wait_until(lambda: flag(parent, 0, READER_WAITING) == 1, what="the reader to sleep")
        start = time.monotonic()
        assert parent.send(b"wake up")
        t.join(10)
        assert result == [[b"wake up"]] and time.monotonic() - start < 5.0


def test_a_writer_waiting_for_space_is_woken_when_the_reader_drains():
    with Channel.create(capacity=4096) as parent, Channel.attach(parent.handle) as child:
        frames = [frame(i, 1000) for i in range(12)]
        result = []
        t = threading.Thread(target=lambda: result.append(child.send_wait(frames, 30.0)))
        t.start()
        wait_until(lambda: flag(parent, 1, WRITER_WAITING) == 1, what="the writer to sleep")
        got = []
        deadline = time.monotonic() + 20
        while len(got) < len(frames) and time.monotonic() < deadline:
            got += parent.recv_wait(1.0)
        t.join(10)
        assert result == [12] and got == frames


def test_wait_readable_reports_only_the_channels_with_frames():
    parents = [Channel.create(capacity=4096) for _ in range(3)]
    children = [Channel.attach(p.handle) for p in parents]
    try:
        assert wait_readable(parents, 0.05) == []
        result = []
        t = threading.Thread(target=lambda: result.append(wait_readable(parents, 30.0)))
        t.start()
        wait_until(lambda: all(flag(p, 1, READER_WAITING) for p in parents), what="all armed")
        children[1].send(b"done")
        t.join(10)
        assert result == [[parents[1]]]
        assert parents[1].recv_many(10) == [b"done"]
        assert wait_readable(parents, 0) == []
        children[2].send(b"x")
        assert wait_readable(parents, 1.0) == [parents[2]]
        assert all(flag(p, 1, READER_WAITING) == 0 for p in parents)
    finally:
        for ch in children + parents:
            ch.close()


def test_a_channel_poller_reports_children_with_frames_and_other_fds():
    parents = [Channel.create(capacity=4096) for _ in range(2)]
    children = [Channel.attach(p.handle) for p in parents]
    wake_r, wake_w = os.pipe()
    try:
        poller = ring_module.ChannelPoller(parents, fds=[wake_r], tags=["one", "two"])
        assert poller.wait(0) == ([], [])
        result = []
        t = threading.Thread(target=lambda: result.append(poller.wait(30.0)))
        t.start()
        wait_until(lambda: all(flag(p, 1, READER_WAITING) for p in parents), what="all armed")
        os.write(wake_w, b"x")
        t.join(10)
        assert result == [([], [wake_r])]
        os.read(wake_r, 10)
        children[0].send(b"r")
        assert poller.wait(30.0) == (["one"], [])
        assert all(flag(p, 1, READER_WAITING) == 0 for p in parents)
        with pytest.raises(ValueError):
            ring_module.ChannelPoller(parents, tags=["only one"])
    finally:
        for ch in children + parents:
            ch.close()
        os.close(wake_r)
        os.close(wake_w)


def test_the_doorbell_fileno_works_with_selectors():
    import selectors
    with Channel.create(capacity=4096) as parent, Channel.attach(parent.handle) as child:
        sel = selectors.DefaultSelector()
        sel.register(parent.fileno(), selectors.EVENT_READ, parent)
        assert sel.select(0) == []
        assert parent.arm_doorbell()  # nothing pending: safe to sleep
        child.send(b"result")
        events = sel.select(5.0)
        assert [key.data for key, _ in events] == [parent]
        parent.disarm_doorbell()
        assert sel.select(0) == []  # drained
        assert parent.recv() == b"result"
        child.send(b"more")
        assert not parent.arm_doorbell()  # pending: do not sleep
        sel.close()


def test_closing_the_child_side_leaves_the_supervisor_segment_alone():
    with Channel.create(capacity=4096) as parent:
        child = Channel.attach(parent.handle, keep_name=True)
        child.send(b"before")
        child.close()
        child.close()
        assert child.closed and parent.name in shm_names(parent.name)
        with pytest.raises(ValueError, match="closed"):
            child.send(b"after")
        assert parent.recv() == b"before"
        again = Channel.attach(parent.handle)
        assert parent.send(b"still works") and again.recv() == b"still works"
        again.close()
    assert not shm_names(parent.name)


def test_closing_the_owner_unlinks_the_segment_and_unread_side_channel_segments():
    parent = Channel.create(capacity=4096)
    child = Channel.attach(parent.handle)
    assert parent.send_many([bytes(5000), bytes(6000)]) == 2
    assert child.send(bytes(7000))
    assert shm_names(parent.name) == {f"{parent.name}_t1", f"{parent.name}_t2", f"{parent.name}_r1"}
    child.close()
    parent.close()
    assert not shm_names(parent.name)


def test_a_garbage_collected_channel_unlinks_its_segment():
    ch = Channel.create(capacity=4096)
    name = ch.name
    ch.send(bytes(10_000))
    del ch
    gc.collect()
    assert not shm_names(name)


def test_unlink_is_for_the_owner_and_keeps_attached_mappings_usable():
    with Channel.create(capacity=4096) as parent:
        child = Channel.attach(parent.handle, keep_name=True)
        with pytest.raises(WorkerError, match="only the process that created"):
            child.unlink()
        assert parent.name in shm_names(parent.name)
        parent.unlink()
        parent.unlink()
        assert not shm_names(parent.name)
        assert parent.send(b"x") and child.recv() == b"x"
        with pytest.raises(WorkerError, match="is gone"):
            Channel.attach(parent.handle)
        child.close()


def test_closing_channels_closes_their_doorbell_fds():
    Channel.create(capacity=4096).close()  # the resource tracker's pipe, opened once
    before = open_fds()
    parent = Channel.create(capacity=4096)
    child = Channel.attach(parent.handle)
    assert len(open_fds() - before) >= 4
    child.close()
    parent.close()
    assert open_fds() - before == set()


def test_a_channel_is_not_picklable_but_its_handle_is():
    with Channel.create(capacity=4096) as ch:
        with pytest.raises(TypeError, match="handle"):
            pickle.dumps(ch)
        handle = ch.handle
        assert isinstance(handle, ChannelHandle) and handle.name == ch.name
        assert "ChannelHandle(" in repr(handle) and ch.name in repr(ch)


def test_a_forked_copy_of_the_owner_never_unlinks_the_segment():
    with Channel.create(capacity=4096) as ch:
        pid = os.fork()
        if pid == 0:  # the inherited copy: closing it must not touch the creator's segment
            try:
                ch.close()
                code = 0 if not ch.owner else 1
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert ch.name in shm_names(ch.name)
        assert ch.send(b"x") and Channel.attach(ch.handle).recv() == b"x"


CHILD_WITH_OWN_TRACKER = """
import sys
from stem.worker.channel import Channel, ChannelHandle
name, cap, bell_p, bell_c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ch = Channel.attach(ChannelHandle(name, cap, (bell_p, bell_p, bell_c, bell_c)), keep_name=True)
assert ch.recv() == b"task"
ch.send(b"result")
ch.close()
"""


def test_a_child_with_its_own_resource_tracker_does_not_unlink_or_warn_about_the_segment():
    # A child forked from a zygote, or any unrelated process, has its own resource
    # tracker: had attach() registered the segment, that tracker would unlink it
    # and warn about a "leaked shared_memory object" when the child exits.
    with Channel.create(capacity=4096) as ch:
        ch.send(b"task")
        bells = ch.handle.bells
        proc = subprocess.run(
            [sys.executable, "-c", CHILD_WITH_OWN_TRACKER, ch.name,
             str(ch.capacity), str(bells[0]), str(bells[2])],
            pass_fds=(bells[0], bells[2]), capture_output=True, text=True, timeout=30,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert proc.returncode == 0, proc.stderr
        assert "resource_tracker" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr
        assert ch.name in shm_names(ch.name)
        assert ch.recv() == b"result"


def test_attaching_removes_the_name_and_spends_the_handle():
    with Channel.create(capacity=4096) as parent:
        assert parent.name in shm_names(parent.name)
        with Channel.attach(parent.handle) as child:
            assert not shm_names(parent.name)  # mapped by both, named by none
            with pytest.raises(WorkerError, match="is gone"):
                Channel.attach(parent.handle)
            assert parent.send(b"x") and child.recv() == b"x"


SUPERVISOR_IN_ITS_OWN_SESSION = """
import multiprocessing, sys, time
from stem.worker.channel import Channel

def child(handle):
    with Channel.attach(handle) as ch:
        ch.send(b"attached")
        ch.recv_wait(60.0)

ch = Channel.create(capacity=4096)
proc = multiprocessing.get_context("fork").Process(target=child, args=(ch.handle,))
proc.start()
assert ch.recv_wait(20.0) == [b"attached"]
print(ch.name, flush=True)
ch.recv_wait(60.0)  # until the process group is killed
"""


def test_a_sigkilled_process_group_with_its_resource_tracker_leaks_no_segment():
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISOR_IN_ITS_OWN_SESSION],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        name = proc.stdout.readline().strip()
        assert name.startswith(f"stmr_{proc.pid:x}_"), proc.stderr.read()
        os.killpg(proc.pid, signal.SIGKILL)  # supervisor, child and resource tracker
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
    assert not shm_names(f"stmr_{proc.pid:x}_")


# -- the channel, across processes ------------------------------------------------------


def _echo_child(handle, count):
    """Check every task frame (order, checksum) and send it back unchanged."""
    with Channel.attach(handle) as ch:
        expected = 0
        while expected < count:
            frames = ch.recv_wait(20.0)
            if not frames:
                sys.exit(3)  # the supervisor went away
            for data in frames:
                if check_frame(data) != expected:
                    sys.exit(4)
                expected += 1
            if ch.send_wait(frames, 20.0) != len(frames):
                sys.exit(5)


def _pump(ch: Channel, frames: list[bytes], timeout: float = 50.0) -> None:
    """Supervisor-style loop: never block on a full ring, sleep only when nothing moved."""
    sent = received = 0
    deadline = time.monotonic() + timeout
    while received < len(frames):
        assert time.monotonic() < deadline, f"stuck at sent={sent} received={received}"
        moved = 0
        if sent < len(frames):
            n = ch.send_many(frames[sent:sent + 256])
            sent += n
            moved += n
        for data in ch.recv_many(1024):
            assert data == frames[received], f"result {received} differs"
            received += 1
            moved += 1
        if not moved:
            wait_readable([ch], 1.0)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_100k_frames_each_way_keep_their_order_and_content_across_processes(method):
    count = 100_000
    sizes = [12 + (i * 7919) % 300 for i in range(count)]
    for i in range(0, count, 20_000):
        sizes[i] = 200_000  # a few through the side channel
    frames = [frame(i, s) for i, s in enumerate(sizes)]
    ctx = multiprocessing.get_context(method)
    with Channel.create(capacity=64 * 1024) as ch:
        proc = ctx.Process(target=_echo_child, args=(ch.handle, count))
        proc.start()
        try:
            _pump(ch, frames)
        finally:
            proc.join(30)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        assert proc.exitcode == 0
        assert ch.pending_bytes() == 0 and not shm_names(ch.name + "_")


def _other_build_echo_child(handle, count, ring_class):
    ring_module.Ring = ring_class
    _echo_child(handle, count)


def test_a_child_on_the_other_build_shares_the_channel(compiled_twin):
    other = compiled_twin.ring if ring_module.Ring is _ring_py.Ring else _ring_py
    frames = [frame(i, 12 + i % 200) for i in range(20_000)] + [frame(20_000, 30_000)]
    with Channel.create(capacity=16 * 1024) as ch:
        proc = multiprocessing.get_context("fork").Process(
            target=_other_build_echo_child, args=(ch.handle, len(frames), other.Ring))
        proc.start()
        try:
            _pump(ch, frames)
        finally:
            proc.join(30)
        assert proc.exitcode == 0


def _sleepy_child(handle):
    with Channel.attach(handle) as ch:
        frames = ch.recv_wait(30.0)
        ch.send_many([f[::-1] for f in frames])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_sleeping_child_is_woken_by_the_doorbell(method):
    with Channel.create(capacity=4096) as ch:
        proc = multiprocessing.get_context(method).Process(target=_sleepy_child, args=(ch.handle,))
        proc.start()
        try:
            wait_until(lambda: flag(ch, 0, READER_WAITING) == 1, what="the child to sleep")
            start = time.monotonic()
            ch.send(b"ping")
            assert ch.recv_wait(20.0) == [b"gnip"]
            assert time.monotonic() - start < 10.0  # far below the child's 30 s timeout
        finally:
            proc.join(30)
        assert proc.exitcode == 0


def _streaming_child(handle):
    """Send frames forever, every third one through the side channel, until killed."""
    ch = Channel.attach(handle)
    seq = 0
    while True:
        size = 2_000_000 if seq % 3 == 0 else 12 + seq % 500
        if ch.send_wait([frame(seq, size)], 30.0) != 1:
            os._exit(6)
        seq += 1


def test_a_child_killed_mid_stream_never_delivers_a_torn_frame_and_leaks_nothing():
    ch = Channel.create(capacity=64 * 1024)
    proc = multiprocessing.get_context("fork").Process(target=_streaming_child, args=(ch.handle,))
    proc.start()
    got = []
    try:
        while len(got) < 30:
            got += ch.recv_wait(20.0)
            assert proc.is_alive()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        got += ch.recv_many(10**6)
        assert [check_frame(data) for data in got] == list(range(len(got)))
        assert ch.recv_wait(0.05) == []  # nothing complete left: no torn frame, no hang
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        ch.close()
    assert not shm_names(ch.name)


def _dies_while_spilling_child(handle):
    real_write = ring_module._write_segment

    def write_then_die(name, data):
        real_write(name, data)  # the segment is complete, its record not yet published
        os.kill(os.getpid(), signal.SIGKILL)

    ring_module._write_segment = write_then_die
    ch = Channel.attach(handle)
    ch.send(b"small first")
    ch.send(bytes(100_000))
    os._exit(7)  # not reached


def test_a_child_killed_between_writing_and_publishing_a_side_channel_frame_leaks_nothing():
    ch = Channel.create(capacity=4096)
    proc = multiprocessing.get_context("fork").Process(target=_dies_while_spilling_child,
                                                       args=(ch.handle,))
    proc.start()
    proc.join(30)
    try:
        assert proc.exitcode == -signal.SIGKILL
        assert shm_names(ch.name + "_") == {ch.name + "_r1"}  # the orphan is there...
        assert ch.recv_many(10) == [b"small first"]             # ...but never delivered
        assert ch.recv_wait(0.05) == []
    finally:
        ch.close()
    assert not shm_names(ch.name)  # ...and the owner removed it


# -- offers: the claim word ----------------------------------------------------------------


def test_an_offer_is_claimed_by_exactly_one_side_and_reads_zero_once_settled(impl):
    buf = bytearray(256 + 4096 + 64)
    writer = make_ring(impl, buf, 4096)
    reader = make_ring(impl, buf, 4096)
    assert writer.offered() == 0
    with pytest.raises(ValueError, match="non-zero"):
        writer.offer(0)
    writer.offer(7)
    assert reader.offered() == 7 and reader.open_slots() == 1
    if not impl.ATOMIC_CLAIM:
        with pytest.raises(NotImplementedError, match="compiled ring"):
            reader.claim(7)
        return
    assert not reader.claim(6) and not reader.claim(0)   # another token: not this offer
    assert reader.claim(7) and writer.offered() == 0
    assert not writer.claim(7) and not reader.claim(7)   # settled: nobody wins it again
    writer.offer(8)
    assert writer.claim(8) and not reader.claim(8)      # withdrawn first: the reader loses
    assert writer.open_slots() == 0
    writer.offer(10, slot=0)                            # slots are independent words
    writer.offer(11, slot=1)
    assert (writer.offered(0), writer.offered(1)) == (10, 11)
    assert writer.open_slots() == 0b11
    assert not reader.claim(11, slot=0) and reader.claim(11, slot=1)
    assert writer.open_slots() == 0b01                  # one call sees which was claimed
    assert reader.claim(10, slot=0) and writer.open_slots() == 0
    for bad in (-1, impl.CLAIM_SLOTS):
        with pytest.raises(ValueError, match="slot"):
            writer.offer(12, slot=bad)
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.offer(9)
    with pytest.raises(ValueError, match="closed"):
        writer.open_slots()


def test_both_builds_keep_the_claim_word_at_one_place(compiled_twin):
    mod = compiled_twin.ring
    buf = bytearray(256 + 4096 + 64)
    make_ring(_ring_py, buf, 4096).offer(0x1122334455667788)
    make_ring(_ring_py, buf, 4096).offer(0x99, slot=1)
    make_ring(_ring_py, buf, 4096).offer(0xAB, slot=3)
    assert make_ring(mod, buf, 4096).offered() == 0x1122334455667788
    assert make_ring(mod, buf, 4096).offered(1) == 0x99
    assert make_ring(mod, buf, 4096).offered(3) == 0xAB
    assert make_ring(mod, buf, 4096).open_slots() == make_ring(_ring_py, buf, 4096).open_slots() == 0b1011
    assert mod.ATOMIC_CLAIM and not _ring_py.ATOMIC_CLAIM
    assert mod.CLAIM_SLOTS == _ring_py.CLAIM_SLOTS == 4


def _claiming_child(handle, count):
    with Channel.attach(handle) as ch:
        won = []
        seen = 0
        while seen < count:
            for raw in ch.recv_wait(5.0):
                seen += 1
                token = int.from_bytes(raw, "little")
                if ch.claim(token):
                    won.append(token)
        ch.send_wait([struct.pack(f"<{len(won)}Q", *won)], 10.0)


@pytest.mark.usefixtures("compiled_ring_in_use")
def test_a_racing_withdraw_and_claim_across_processes_give_each_offer_to_exactly_one_side():
    count = 20_000
    with Channel.create(capacity=64 * 1024) as ch:
        proc = multiprocessing.get_context("fork").Process(target=_claiming_child, args=(ch.handle, count))
        proc.start()
        try:
            withdrawn = []
            for token in range(1, count + 1):
                ch.offer(token)
                assert ch.send_wait([token.to_bytes(8, "little")], 10.0) == 1
                if token % 3 and ch.withdraw(token):   # race the child for two thirds of them
                    withdrawn.append(token)
                deadline = time.monotonic() + 10.0
                while ch.offered():   # the child claims the rest; then the next offer
                    assert time.monotonic() < deadline, f"offer {token} was never claimed"
            [raw] = ch.recv_wait(30.0)
        finally:
            proc.join(30)
        claimed = list(struct.unpack(f"<{len(raw) // 8}Q", raw))
    assert proc.exitcode == 0
    assert not set(claimed) & set(withdrawn)
    assert sorted(claimed + withdrawn) == list(range(1, count + 1))
    assert claimed and withdrawn   # both sides won some
