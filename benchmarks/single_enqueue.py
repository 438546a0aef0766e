"""One ``Stem.enqueue`` at a time on Redis against a raw-socket XADD round trip, in the same run.

Producer CPU (``time.process_time``: this process only; Redis runs in its own) and wall
time per task, for:

* ``stem.enqueue("bench.echo", {"i": i})``: checks, envelope, signed frame (signing on),
  XADD, reply; the task name known to the registry;
* the same XADD (same key, same fields, a frame of the same size) written straight to a
  socket, its reply read with one ``recv`` -- the floor any client pays.

Rounds alternate the two (3 by default), each ``--tasks`` calls; the median round is shown
with the ratios.  A private redis-server is started, so other work on the shared one does
not move the figures.

    .venv/bin/python benchmarks/single_enqueue.py [--tasks 20000] [--rounds 3] [--profile]

Figures: benchmarks/README.md, "Single enqueue".
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
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

from stem import PayloadSigner, Stem, TaskRegistry  # noqa: E402
from stem.backends import RedisResultBackend  # noqa: E402
from stem.brokers import RedisBroker  # noqa: E402
from stem.stores.redis import pack_commands  # noqa: E402

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


def measure(fn, n: int) -> tuple[float, float]:
    """(CPU us, wall us) per call of ``fn(i)``."""
    c, w = time.process_time(), time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.process_time() - c) / n * 1e6, (time.perf_counter() - w) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one stem round")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not on PATH")
    import stem as stem_pkg
    with tempfile.TemporaryDirectory() as d:
        proc, port = start_redis(d)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            signer = PayloadSigner({"k1": b"k" * 32}, "k1")
            stem = Stem(RedisBroker(url, namespace="bench"), RedisResultBackend(url, namespace="bench"),
                        registry, signer)
            stem.enqueue("bench.echo", {"i": 0})
            key = stem.broker.queue_keys("default")[0]
            frame_len = len(redis.Redis(port=port).xrange(key, count=1)[0][1][b"f"])
            xadd = pack_commands([("XADD", key, "*", "t", "0" * 32, "f", b"x" * frame_len, "p", 0, "v", 0)])
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def raw(i: int) -> None:
                sock.sendall(xadd)
                if not sock.recv(256).startswith(b"$"):
                    raise RuntimeError("XADD failed")

            def enqueue(i: int) -> None:
                stem.enqueue("bench.echo", {"i": i})

            rows = []
            for _ in range(args.rounds):
                s_cpu, s_wall = measure(enqueue, args.tasks)
                r_cpu, r_wall = measure(raw, args.tasks)
                rows.append((s_cpu, s_wall, r_cpu, r_wall))
            print(f"stem build: {stem_pkg.IMPLEMENTATION}; {args.tasks} calls a round, frame {frame_len} B, "
                  f"signing on")
            for n, (s_cpu, s_wall, r_cpu, r_wall) in enumerate(rows, 1):
                print(f"round {n}: stem.enqueue {s_cpu:.1f} us CPU, {s_wall:.1f} us wall | raw XADD "
                      f"{r_cpu:.1f} us CPU, {r_wall:.1f} us wall | wall ratio {s_wall / r_wall:.2f}x, "
                      f"stem CPU - raw CPU {s_cpu - r_cpu:.1f} us")
            med = sorted(rows, key=lambda r: r[1])[len(rows) // 2]
            print(f"median round: producer CPU {med[0]:.1f} us (raw {med[2]:.1f}), wall {med[1]:.1f} us "
                  f"(raw {med[3]:.1f}), wall ratio {med[1] / med[3]:.2f}x; "
                  f"CPU median of rounds {statistics.median(r[0] for r in rows):.1f} us")
            if args.profile:
                prof = cProfile.Profile()
                prof.runcall(measure, enqueue, args.tasks)
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            sock.close()
            stem.close()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    main()
