"""AsyncStem on Redis: group commit, event-loop lag under many waits, connections used.

Runs against a private redis-server it starts (so the connection count is exact and
nothing else shares the server), all figures from one run:

1. 10,000 ``await stem.enqueue(...)`` gathered at once vs the same 10,000 awaited one
   after another (tasks/s each, the ratio; round trips of the gathered run).
2. Event-loop lag while 10,000 ``wait_for_task`` calls are pending: a ticker coroutine
   asks for 1 ms sleeps and records how late each wakes (p50 / p99 / max), split into
   the registration phase (10,000 subscribes and their first reads) and the steady
   pending phase; then the results land (one pipeline of 10,000 SET+PUBLISH, from another
   process) and the lag while they are delivered is recorded too.  A baseline phase (the
   ticker alone, nothing pending) shows what the machine itself adds.
3. Connections to Redis while all of it runs (``connected_clients`` minus the probe).

    .venv/bin/python benchmarks/aio_producer.py [--tasks 10000] [--rounds 3]

Figures: benchmarks/README.md, "Async producer".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import redis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stem import AsyncStem, TaskRegistry  # noqa: E402
from stem.backends import RedisResultBackend  # noqa: E402
from stem.brokers import RedisBroker  # noqa: E402

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


async def one_round(url: str, n: int, probe_client: redis.Redis) -> dict:
    ns = f"bench{os.getpid()}x{time.monotonic_ns() % 10**6}"
    broker, backend = RedisBroker(url, namespace=ns), RedisResultBackend(url, namespace=ns)
    out: dict = {}
    async with AsyncStem(broker, backend, registry) as stem:
        await stem.enqueue("bench.echo", {"i": -1})          # connect first: not part of either figure
        t = time.perf_counter()
        ids = await asyncio.gather(*(stem.enqueue("bench.echo", {"i": i}) for i in range(n)))
        out["gather_s"] = time.perf_counter() - t
        out["gather_round_trips"] = stem._publisher.store.round_trips
        t = time.perf_counter()
        for i in range(n):
            await stem.enqueue("bench.echo", {"i": i})
        out["serial_s"] = time.perf_counter() - t
        t = time.perf_counter()
        await asyncio.gather(*(_nop(i) for i in range(n)))     # asyncio's own cost of a gathered coroutine
        out["nop_s"] = time.perf_counter() - t

        probe = LagProbe()
        probe.start()
        probe.phase("baseline")                  # nothing pending: the machine's own noise
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
        out["lag"] = {k: probe.summary(k) for k in ("baseline", "register", "pending", "delivery")}
        out["pending_p99_ms"] = sorted(probe.series["pending"])[int(0.99 * len(probe.series["pending"]))] * 1000
    keys = list(probe_client.scan_iter(f"{ns}:*", count=1000))
    for i in range(0, len(keys), 1000):
        probe_client.delete(*keys[i:i + 1000])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not on PATH")
    import stem
    print(f"stem build: {stem.IMPLEMENTATION}; {args.tasks} tasks, {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as d:
        proc, port = start_redis(d)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            with redis.Redis(port=port) as probe_client:
                for r in range(args.rounds):
                    res = asyncio.run(one_round(url, args.tasks, probe_client))
                    g, s = args.tasks / res["gather_s"], args.tasks / res["serial_s"]
                    print(f"round {r + 1}: gathered {g:,.0f}/s ({res['gather_round_trips']} round trips), "
                          f"one after another {s:,.0f}/s, ratio {g / s:.1f}x; "
                          f"connections {res['connections']}")
                    print(f"    per task: gathered {res['gather_s'] / args.tasks * 1e6:.1f} us, one after another "
                          f"{res['serial_s'] / args.tasks * 1e6:.1f} us; a gathered no-op coroutine "
                          f"{res['nop_s'] / args.tasks * 1e6:.1f} us (ceiling of the ratio: "
                          f"{res['serial_s'] / res['nop_s']:.1f}x)")
                    print(f"    {res['enqueue_while_pending']}")
                    for phase, text in res["lag"].items():
                        print(f"    loop lag, {phase:8s}: {text}")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    main()
