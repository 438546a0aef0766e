"""AsyncStem on Redis: group commit, event-loop lag under many waits, connections used.

Runs against a private redis-server it starts (so the connection count is exact and
nothing else shares the server), all figures from one run:

1. 10,000 ``await stem.enqueue(...)`` gathered at once vs the same 10,000 awaited one
   after another (tasks/s each, the ratio; round trips of the gathered run), and, in the
   same round, 10,000 gathered no-op coroutines: asyncio's own cost of a gathered
   coroutine.  From these three: the ceiling of the ratio (one after another / no-op: the
   ratio a producer that cost nothing under ``gather`` would reach) and the split of the
   gathered per-task cost into asyncio's (the no-op) and stem's (the rest).  With
   ``--baseline DIR`` (a built checkout of stem, e.g. ``git archive main`` with this
   tree's compiled modules) the same three run in a child process importing that
   checkout and in one importing this tree, in the same round, alternating which goes
   first: a before/after from one run.
2. Event-loop lag while 10,000 ``wait_for_task`` calls are pending: a ticker coroutine
   asks for 1 ms sleeps and records how late each wakes (p50 / p99 / max), split into
   the registration phase (10,000 subscribes and their first reads) and the steady
   pending phase; then the results land (one pipeline of 10,000 SET+PUBLISH, from another
   process) and the lag while they are delivered is recorded too.  An idle phase (the
   ticker alone, nothing pending) shows what the machine itself adds; p99 and max of the
   idle and the pending phase are printed side by side.
3. Connections to Redis while all of it runs (``connected_clients`` minus the probe).

    .venv/bin/python benchmarks/aio_producer.py [--tasks 10000] [--rounds 3] [--baseline DIR] [--gc-freeze]

Figures: benchmarks/README.md, "Async producer".
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redis

# a child measuring a baseline checkout imports that checkout's stem (``--child``)
sys.path.insert(0, os.environ.get("STEM_BENCH_CHECKOUT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stem import AsyncStem, TaskRegistry  # noqa: E402
from stem.backends import RedisResultBackend  # noqa: E402
from stem.brokers import RedisBroker  # noqa: E402
from stem.ids import new_task_ids  # noqa: E402

registry = TaskRegistry()


@registry.task("bench.echo")
def echo(ctx, i: int) -> int:
    return i


def start_redis(directory: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", directory], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        try:
            with redis.Redis(port=port, socket_connect_timeout=0.5) as r:
                r.ping()
                return proc, port
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.02)


class LagProbe:
    """How late a 1 ms sleep wakes, sampled continuously; ``phase(name)`` starts a new series."""

    def __init__(self) -> None:
        self.series: dict[str, list[float]] = {}
        self._current: list[float] = []
        self._task: asyncio.Task | None = None

    def phase(self, name: str) -> None:
        self._current = self.series.setdefault(name, [])

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self._current.append(time.perf_counter() - t - 0.001)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def tails(self, *names: str) -> str:
        """p99 / max of each phase, side by side (ms)."""
        parts = []
        for name in names:
            lags = sorted(self.series.get(name) or [0.0])
            parts.append(f"{name} p99 {lags[min(len(lags) - 1, int(0.99 * len(lags)))] * 1000:.2f} / "
                         f"max {lags[-1] * 1000:.2f}")
        return ", ".join(parts) + " (ms)"

    def summary(self, name: str) -> str:
        lags = sorted(self.series.get(name) or [0.0])
        p = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))] * 1000   # noqa: E731
        return f"p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms, max {lags[-1] * 1000:.2f} ms ({len(lags)} samples)"


_STORE = """
import sys
from stem import TaskState, TaskStatus
from stem.backends import RedisResultBackend
url, ns, ids = sys.argv[1], sys.argv[2], sys.argv[3:]
backend = RedisResultBackend(url, namespace=ns)
backend.store_many([TaskStatus(id=i, state=TaskState.SUCCEEDED, result=1) for i in ids])
backend.close()
"""


async def _nop(i: int) -> int:
    return i


async def _clean(url: str, ns: str) -> None:
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(f"{ns}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])


def _timed() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - start[0], time.process_time() - start[1]


async def gather_vs_serial(url: str, n: int, reps: int = 3) -> dict:
    """(wall, CPU) seconds for ``n`` gathered enqueues, ``n`` awaited one after another and
    ``n`` gathered no-op coroutines, each the least of ``reps`` tries (in turn, after a
    warm-up), and the round trips of one gathered run.  The gathered enqueues and no-ops
    run once more each with the garbage collector paused (``_paused`` keys), which splits
    their cost into the code's and the collector's passes over the heap."""
    ns = f"bench{os.getpid()}x{time.monotonic_ns() % 10**9}"
    keys = ("gather", "gather_paused", "serial", "nop", "nop_paused")
    out: dict = {k: (1e9, 1e9) for k in keys}
    async with AsyncStem(RedisBroker(url, namespace=ns), RedisResultBackend(url, namespace=ns), registry) as stem:
        await asyncio.gather(*(stem.enqueue("bench.echo", {"i": i}) for i in range(1000)))   # connect, warm up
        if os.environ.get("STEM_BENCH_GC_FREEZE"):
            gc.collect()
            gc.freeze()          # what a service may do after its startup: full passes skip that heap
        for _ in range(reps):
            for key in keys:
                gc.collect()
                paused = key.endswith("_paused")
                if paused:
                    gc.disable()
                before = stem._publisher.store.round_trips
                t = _timed()
                if key.startswith("gather"):
                    await asyncio.gather(*(stem.enqueue("bench.echo", {"i": i}) for i in range(n)))
                    out["gather_round_trips"] = stem._publisher.store.round_trips - before
                elif key == "serial":
                    for i in range(n):
                        await stem.enqueue("bench.echo", {"i": i})
                else:       # asyncio's own cost of a gathered coroutine
                    await asyncio.gather(*(_nop(i) for i in range(n)))
                took = _since(t)
                gc.enable()
                out[key] = min(out[key], took)
    await _clean(url, ns)
    return out


def child(url: str) -> None:
    """``--child``: on each line "N", measure ``gather_vs_serial`` and answer it as one JSON line."""
    for line in sys.stdin:
        print(json.dumps(asyncio.run(gather_vs_serial(url, int(line)))), flush=True)


class Baseline:
    """A checkout's ``AsyncStem`` (the baseline's, or this tree's) in a child process."""

    def __init__(self, checkout: str, url: str):
        env = dict(os.environ, STEM_BENCH_CHECKOUT=os.path.abspath(checkout))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", url], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, n: int) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the baseline child died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def split(res: dict, n: int) -> dict:
    """Per-task figures of one ``gather_vs_serial`` (us): wall of each, the ratio, its ceiling,
    and the gathered CPU split into asyncio's (the no-op's, collector paused), stem's code
    (the rest, collector paused) and the collector's (gathered with it on minus paused)."""
    us = {k: (res[k][0] / n * 1e6, res[k][1] / n * 1e6)
          for k in ("gather", "gather_paused", "serial", "nop", "nop_paused")}
    g, g_cpu = us["gather"]
    s, nop = us["serial"][0], us["nop"][0]
    asyncio_cpu = us["nop_paused"][1]
    stem_cpu = us["gather_paused"][1] - asyncio_cpu
    gc_cpu = g_cpu - us["gather_paused"][1]
    return {"gather_us": g, "serial_us": s, "nop_us": nop, "ratio": s / g, "ceiling": s / nop,
            "gather_cpu": g_cpu, "asyncio_cpu": asyncio_cpu, "stem_cpu": stem_cpu, "gc_cpu": gc_cpu,
            "nop_gc_cpu": us["nop"][1] - asyncio_cpu, "trips": res["gather_round_trips"]}


def describe(label: str, f: dict) -> str:
    g = f["gather_cpu"]
    return (f"{label}: per task, wall: gathered {f['gather_us']:.1f} us, one after another {f['serial_us']:.1f}, "
            f"no-op {f['nop_us']:.1f}; ratio {f['ratio']:.1f}x of a ceiling {f['ceiling']:.1f}x\n"
            f"      gathered CPU {g:.1f} us = asyncio {f['asyncio_cpu']:.1f} ({f['asyncio_cpu'] / g:.0%}) "
            f"+ stem's code "
            f"{f['stem_cpu']:.1f} ({f['stem_cpu'] / g:.0%}) + garbage collector {f['gc_cpu']:.1f} "
            f"({f['gc_cpu'] / g:.0%}; a no-op's: {f['nop_gc_cpu']:.1f}); {f['trips']} round trips")


async def one_round(url: str, n: int, probe_client: redis.Redis) -> dict:
    ns = f"bench{os.getpid()}x{time.monotonic_ns() % 10**6}"
    broker, backend = RedisBroker(url, namespace=ns), RedisResultBackend(url, namespace=ns)
    out: dict = {}
    ids = new_task_ids(n)                    # waited on; their results are stored by another process below
    async with AsyncStem(broker, backend, registry) as stem:
        await stem.enqueue("bench.echo", {"i": -1})
        probe = LagProbe()
        probe.start()
        probe.phase("idle")                      # nothing pending: the machine's own noise
        await asyncio.sleep(1.0)
        probe.phase("register")
        waits = asyncio.gather(*(stem.wait_for_task(i, timeout=120) for i in ids))
        hub = stem._results.hub
        while len(hub.waited_ids()) < n or hub._dirty:       # registered, subscribed and read
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        probe.phase("pending")
        await asyncio.sleep(1.0)
        latencies = []
        for i in range(200):                     # an unrelated enqueue while every wait is pending
            t = time.perf_counter()
            await stem.enqueue("bench.echo", {"i": i})
            latencies.append(time.perf_counter() - t)
        latencies.sort()
        out["enqueue_while_pending"] = (f"enqueue while {n} waits pend: median {latencies[100] * 1e6:.0f} us, "
                                        f"max {latencies[-1] * 1e6:.0f} us")
        out["connections"] = int(probe_client.info("clients")["connected_clients"]) - 1
        probe.phase("delivery")
        # the results land from another process (as a worker's would): no GIL shared with the loop
        await asyncio.to_thread(subprocess.run, [sys.executable, "-c", _STORE, url, ns, *ids], check=True)
        await waits
        probe.phase("after")
        await probe.stop()
        out["lag"] = {k: probe.summary(k) for k in ("idle", "register", "pending", "delivery")}
        out["idle_vs_pending"] = probe.tails("idle", "pending")
    keys = list(probe_client.scan_iter(f"{ns}:*", count=1000))
    for i in range(0, len(keys), 1000):
        probe_client.delete(*keys[i:i + 1000])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", metavar="DIR", help="a built checkout of stem to measure in the same rounds")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after the warm-up, on both sides (the collector's full passes then skip "
                             "the heap made so far)")
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gc_freeze:
        os.environ["STEM_BENCH_GC_FREEZE"] = "1"       # read by gather_vs_serial, here and in the children
    if args.child:
        child(args.child)
        return
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not on PATH")
    import stem
    print(f"stem build: {stem.IMPLEMENTATION}; {args.tasks} tasks, {args.rounds} rounds"
          + (f"; baseline {args.baseline}" if args.baseline else "") + ("; gc.freeze()" if args.gc_freeze else "")
          + f"; load average {os.getloadavg()}")
    n = args.tasks
    with tempfile.TemporaryDirectory() as d:
        proc, port = start_redis(d)
        url = f"redis://127.0.0.1:{port}/0"
        # with a baseline, this tree is measured in a child process too: both sides alike
        baseline = Baseline(args.baseline, url) if args.baseline else None
        this_tree = Baseline(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), url) if baseline else None
        try:
            with redis.Redis(port=port) as probe_client:
                for r in range(args.rounds):
                    base = None
                    if baseline is not None and r % 2:           # alternate which goes first
                        base = split(baseline(n), n)
                    mine = split(this_tree(n) if this_tree is not None else asyncio.run(gather_vs_serial(url, n)), n)
                    if baseline is not None and base is None:
                        base = split(baseline(n), n)
                    res = asyncio.run(one_round(url, n, probe_client))
                    print(f"round {r + 1} (load {os.getloadavg()[0]:.2f}): gathered {1e6 / mine['gather_us']:,.0f}/s, "
                          f"one after another {1e6 / mine['serial_us']:,.0f}/s, ratio {mine['ratio']:.1f}x; "
                          f"connections {res['connections']}")
                    print("    " + describe("this tree", mine))
                    if base is not None:
                        print("    " + describe("baseline ", base))
                        print(f"    this tree / baseline: gathered wall {mine['gather_us'] / base['gather_us']:.2f}x, "
                              f"gathered CPU {mine['gather_cpu'] / base['gather_cpu']:.2f}x, stem's code "
                              f"{mine['stem_cpu'] / base['stem_cpu']:.2f}x, collector "
                              f"{mine['gc_cpu'] / max(base['gc_cpu'], 1e-9):.2f}x; one after another, wall "
                              f"{mine['serial_us'] / base['serial_us']:.2f}x")
                    print(f"    {res['enqueue_while_pending']}")
                    print(f"    loop lag p99 / max, idle vs 10,000 pending: {res['idle_vs_pending']}")
                    for phase, text in res["lag"].items():
                        print(f"    loop lag, {phase:8s}: {text}")
        finally:
            for child_proc in (baseline, this_tree):
                if child_proc is not None:
                    child_proc.close()
            proc.send_signal(signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    main()
