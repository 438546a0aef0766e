"""Ring transport: messages/s between two processes, against multiprocessing's own.

    .venv/bin/python -m pytest benchmarks/test_ring.py -p no:cacheprovider \
        --benchmark-only -q -s

One pytest-benchmark test runs a small harness that measures every transport
in the same run, rounds interleaved, and reports the median of each as
messages/s and as ratios; the figures also land in the benchmark's
``extra_info`` (``--benchmark-json``).  A second test measures wake-up
latency: the reader sleeps between bursts, so every burst pays for a wake-up.

Throughput: the parent forks a child, waits until it is ready, then sends N
frames of 300 bytes; the clock stops when the child reports it received all
N.  Transports:

* ``ring c`` / ``ring py``: ``Channel.send_many`` of 64 frames (``send_wait``
  for the rest when the ring is full), reader in ``recv_wait`` -- the real
  doorbell protocol, on the compiled ring and on the pure twin;
* ``ring c, spin``: the same without doorbells: both sides busy-poll
  (``send_many``/``recv_many``), which shows what the doorbell costs while
  both sides are busy;
* ``ring c, 1/send``: one ``Channel.send`` per frame;
* ``Queue``: ``multiprocessing.Queue.put``/``get`` per frame;
* ``Pipe``: ``Connection.send_bytes``/``recv_bytes`` per frame;
* ``Pipe x64``: 64 frames joined per ``send_bytes``, split back into 64
  ``bytes`` by the reader (what the ring hands out too).

Results and the machine: benchmarks/README.md ("Ring transport").
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import time

import pytest

from benchmarks import _twins as twins
from stem import _ring_py
from stem.worker import channel as ring_module
from stem.worker.channel import Channel

FRAME = bytes(range(256)) + bytes(44)  # 300 bytes
assert len(FRAME) == 300
BATCH = 64
ROUNDS = 3
CAPACITY = 1 << 20
CTX = multiprocessing.get_context("fork")


@contextlib.contextmanager
def ring_build(module):
    """Channels made inside use ``module.Ring`` (forked children inherit the choice)."""
    saved = ring_module.Ring
    ring_module.Ring = module.Ring
    try:
        yield
    finally:
        ring_module.Ring = saved


# -- children ---------------------------------------------------------------------------


class _CountingPoll:
    """Counts how often a channel really went to sleep on its doorbell."""

    def __init__(self, poll):
        self.poll_object = poll
        self.sleeps = 0

    def poll(self, timeout_ms):
        self.sleeps += 1
        return self.poll_object.poll(timeout_ms)


def _ring_reader(handle, n, spin):
    with Channel.attach(handle) as ch:
        ch._poll = counter = _CountingPoll(ch._poll)
        ch.send(b"ready")
        count = 0
        if spin:
            while count < n:
                count += len(ch.recv_many(1024))
        else:
            while count < n:
                count += len(ch.recv_wait(10.0))
        ch.send(b"done %d" % counter.sleeps)


def _queue_reader(q, ctl, n):
    ctl.send_bytes(b"ready")
    for _ in range(n):
        q.get()
    ctl.send_bytes(b"done")


def _pipe_reader(conn, ctl, n, batched):
    ctl.send_bytes(b"ready")
    count = 0
    size = len(FRAME)
    while count < n:
        buf = conn.recv_bytes()
        if batched:
            count += len([buf[i:i + size] for i in range(0, len(buf), size)])
        else:
            count += 1
    ctl.send_bytes(b"done")


# -- one measurement per transport --------------------------------------------------------


SLEEPS: dict[str, list[tuple[int, int, int]]] = {}  # name -> [(messages, reader, writer sleeps)]


def _time_ring(module, n, *, spin=False, per_frame=False, name="") -> float:
    with ring_build(module), Channel.create(capacity=CAPACITY) as ch:
        ch._poll = counter = _CountingPoll(ch._poll)
        proc = CTX.Process(target=_ring_reader, args=(ch.handle, n, spin))
        proc.start()
        assert ch.recv_wait(30.0) == [b"ready"]
        batch = [FRAME] * BATCH
        start = time.perf_counter()
        sent = 0
        if per_frame:
            send = ch.send
            while sent < n:
                if send(FRAME):
                    sent += 1
                else:
                    sent += ch.send_wait([FRAME], 10.0)
        elif spin:
            send_many = ch.send_many
            while sent < n:
                sent += send_many(batch)
        else:
            send_many = ch.send_many
            while sent < n:
                k = send_many(batch)
                if k < BATCH:
                    k += ch.send_wait(batch[k:], 10.0)
                sent += k
        sleeps_before = counter.sleeps
        done = ch.recv_wait(30.0)
        elapsed = time.perf_counter() - start
        proc.join(30)
        assert len(done) == 1 and done[0].startswith(b"done") and proc.exitcode == 0
        if name:
            SLEEPS.setdefault(name, []).append((n, int(done[0].split()[1]), sleeps_before))
    return elapsed


def _time_queue(n) -> float:
    q = CTX.Queue()
    ctl_r, ctl_w = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_queue_reader, args=(q, ctl_w, n))
    proc.start()
    assert ctl_r.recv_bytes() == b"ready"
    start = time.perf_counter()
    put = q.put
    for _ in range(n):
        put(FRAME)
    assert ctl_r.recv_bytes() == b"done"
    elapsed = time.perf_counter() - start
    proc.join(30)
    q.close()
    q.join_thread()
    ctl_r.close()
    ctl_w.close()
    return elapsed


def _time_pipe(n, batched) -> float:
    data_r, data_w = CTX.Pipe(duplex=False)
    ctl_r, ctl_w = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_pipe_reader, args=(data_r, ctl_w, n, batched))
    proc.start()
    assert ctl_r.recv_bytes() == b"ready"
    batch = [FRAME] * BATCH
    start = time.perf_counter()
    send = data_w.send_bytes
    if batched:
        for _ in range(n // BATCH):
            send(b"".join(batch))
    else:
        for _ in range(n):
            send(FRAME)
    assert ctl_r.recv_bytes() == b"done"
    elapsed = time.perf_counter() - start
    proc.join(30)
    for conn in (data_r, data_w, ctl_r, ctl_w):
        conn.close()
    return elapsed


def transports():
    """name -> (messages per round, function(n) -> seconds); N sized for ~0.3-1 s each."""
    compiled = twins.compiled("ring")
    table = {}
    if compiled is not None:
        table["ring c"] = (2_000_000, lambda n: _time_ring(compiled, n, name="ring c"))
        table["ring c, spin"] = (2_000_000, lambda n: _time_ring(compiled, n, spin=True))
        table["ring c, 1/send"] = (1_000_000, lambda n: _time_ring(compiled, n, per_frame=True,
                                                                   name="ring c, 1/send"))
    table["ring py"] = (400_000, lambda n: _time_ring(_ring_py, n, name="ring py"))
    table["Queue"] = (100_000, _time_queue)
    table["Pipe"] = (300_000, lambda n: _time_pipe(n, batched=False))
    table["Pipe x64"] = (1_000_000 // BATCH * BATCH, lambda n: _time_pipe(n, batched=True))
    return table


def measure_throughput(rounds: int = ROUNDS) -> dict[str, float]:
    """Median messages/s of every transport, rounds interleaved so drift hits all alike."""
    table = transports()
    samples: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(rounds):
        for name, (n, run) in table.items():
            samples[name].append(n / run(n))
    return {name: statistics.median(rates) for name, rates in samples.items()}


# -- wake-up latency ----------------------------------------------------------------------


def _ring_sleeper(handle, bursts):
    with Channel.attach(handle) as ch:
        lat = []
        ch.send(b"ready")
        for _ in range(bursts):
            frames = []
            while len(frames) < BATCH:
                got = ch.recv_wait(10.0)
                if not frames and got:
                    lat.append(time.perf_counter_ns() - int.from_bytes(got[0][:8], "little"))
                frames += got
            ch.send(b"ack")
        ch.send(repr(lat).encode())


def _pipe_sleeper(conn, ctl, bursts):
    lat = []
    ctl.send_bytes(b"ready")
    for _ in range(bursts):
        buf = conn.recv_bytes()
        lat.append(time.perf_counter_ns() - int.from_bytes(buf[:8], "little"))
        ctl.send_bytes(b"ack")
    ctl.send_bytes(repr(lat).encode())


def _burst():
    return [time.perf_counter_ns().to_bytes(8, "little") + FRAME[8:]] + [FRAME] * (BATCH - 1)


def _latency_ring(module, bursts, pause) -> list[int]:
    with ring_build(module), Channel.create(capacity=CAPACITY) as ch:
        proc = CTX.Process(target=_ring_sleeper, args=(ch.handle, bursts))
        proc.start()
        assert ch.recv_wait(30.0) == [b"ready"]
        for _ in range(bursts):
            time.sleep(pause)  # the reader goes back to sleep in poll()
            assert ch.send_many(_burst()) == BATCH
            assert ch.recv_wait(10.0) == [b"ack"]
        lat = eval(ch.recv_wait(10.0)[0])  # noqa: S307 - our own child's repr of a list of ints
        proc.join(30)
    return lat


def _latency_pipe(bursts, pause) -> list[int]:
    data_r, data_w = CTX.Pipe(duplex=False)
    ctl_r, ctl_w = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_pipe_sleeper, args=(data_r, ctl_w, bursts))
    proc.start()
    assert ctl_r.recv_bytes() == b"ready"
    for _ in range(bursts):
        time.sleep(pause)
        data_w.send_bytes(b"".join(_burst()))
        assert ctl_r.recv_bytes() == b"ack"
    lat = eval(ctl_r.recv_bytes())  # noqa: S307
    proc.join(30)
    for conn in (data_r, data_w, ctl_r, ctl_w):
        conn.close()
    return lat


def measure_wakeup(bursts: int = 500, pause: float = 0.002) -> dict[str, tuple[float, float]]:
    """(median, p99) microseconds from the writer's send to the sleeping reader holding the frame."""
    runs = {"Pipe x64": lambda: _latency_pipe(bursts, pause),
            "ring py": lambda: _latency_ring(_ring_py, bursts, pause)}
    compiled = twins.compiled("ring")
    if compiled is not None:
        runs = {"ring c": lambda: _latency_ring(compiled, bursts, pause), **runs}
    out = {}
    for name, run in runs.items():
        lat = sorted(run())
        out[name] = (statistics.median(lat) / 1000, lat[int(len(lat) * 0.99)] / 1000)
    return out


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_ring_transport_messages_per_second(benchmark, capsys):
    benchmark.group = "ring transport (one run, see extra_info)"
    rates = benchmark.pedantic(measure_throughput, rounds=1, iterations=1)
    base = rates["Pipe x64"]
    lines = [f"{'transport':<16}{'msgs/s':>14}{'vs Pipe x64':>13}{'vs Pipe':>9}{'vs Queue':>10}"]
    for name, rate in sorted(rates.items(), key=lambda kv: -kv[1]):
        lines.append(f"{name:<16}{rate:>14,.0f}{rate / base:>12.2f}x"
                     f"{rate / rates['Pipe']:>8.1f}x{rate / rates['Queue']:>9.1f}x")
        benchmark.extra_info[f"{name} msgs/s"] = round(rate)
    if "ring c" in rates:
        lines.append(f"compiled/pure ring: {rates['ring c'] / rates['ring py']:.1f}x; "
                     f"doorbell vs both sides spinning: {rates['ring c'] / rates['ring c, spin']:.2f}x")
    for name, runs in SLEEPS.items():
        n = sum(r[0] for r in runs)
        reader, writer = (sum(r[i] for r in runs) * 1_000_000 / n for i in (1, 2))
        lines.append(f"{name}: doorbell sleeps per 1M frames: reader {reader:,.0f}, "
                     f"writer (ring full) {writer:,.0f}")
        benchmark.extra_info[f"{name} reader sleeps per 1M"] = round(reader)
        benchmark.extra_info[f"{name} writer sleeps per 1M"] = round(writer)
    with capsys.disabled():
        print("\n300-byte frames, parent -> forked child, median of "
              f"{ROUNDS} interleaved rounds\n" + "\n".join(lines))
    assert all(rate > 0 for rate in rates.values())


@pytest.mark.timeout(600)
def test_ring_wakeup_latency_when_the_reader_sleeps_between_bursts(benchmark, capsys):
    benchmark.group = "ring wake-up latency (one run, see extra_info)"
    lat = benchmark.pedantic(measure_wakeup, rounds=1, iterations=1)
    lines = [f"{'transport':<12}{'median us':>11}{'p99 us':>9}"]
    for name, (median, p99) in lat.items():
        lines.append(f"{name:<12}{median:>11.1f}{p99:>9.1f}")
        benchmark.extra_info[f"{name} wake median us"] = round(median, 1)
        benchmark.extra_info[f"{name} wake p99 us"] = round(p99, 1)
    with capsys.disabled():
        print("\nburst of 64 x 300 B every 2 ms to a reader asleep in poll()/read(): "
              "send -> first frame in the reader's hands\n" + "\n".join(lines))
