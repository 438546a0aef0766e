"""One ``Stem.enqueue`` at a time on Redis against a raw-socket XADD round trip, in the same run.

Producer CPU (``time.process_time``: this process only; Redis runs in its own) and wall
time per task, for:

* ``stem.enqueue("bench.echo", {"i": i})``: checks, envelope, signed frame (signing on),
  XADD, reply; the task name known to the registry;
* the same XADD (same key, same fields, a frame of the same size) written straight to a
  socket, its reply read with one ``recv`` -- the floor any client pays;
* with ``--threads``: 8 threads of one process, each enqueueing one task at a time
  (tasks/s and CPU per task: their round trips are shared, ``stem.stores.redis_group``);
* with ``--parts``: this tree's single enqueue layer by layer, each the lowest CPU per call of
  15 blocks of 500 (the raw round trip, ``resp.exchange`` alone on the dedicated socket, the
  broker's ``send`` of a built command, ``XaddTemplate.build`` alone, the whole ``enqueue``),
  in alternation, so the differences say what each layer adds;
* with ``--baseline DIR`` (a checkout of stem, e.g. ``git archive main``, built): the same
  ``enqueue`` calls by that checkout's stem, in a child process, between the rounds of
  this one, for a before/after ratio from one run; and for both, ``enqueue_many`` of
  500 tasks (CPU per task), so a change of the single path is seen not to slow the batch.

Rounds alternate (3 by default), each ``--tasks`` calls; within a round stem and the raw
XADD (and the baseline) alternate in blocks of 500 calls, so a change of the machine's
load between them moves all of them.  The median round is shown with the ratios.  A
private redis-server is started, so other work on the shared one does not move the
figures.  ``--postgres URL`` measures a PostgresBroker instead (``postgres_main``).

    .venv/bin/python benchmarks/single_enqueue.py [--tasks 20000] [--rounds 3] [--profile] [--threads]
                                                  [--parts] [--baseline DIR] [--postgres URL]

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
import threading
import time

import redis

# a child measuring a baseline checkout imports that checkout's stem (``--child``)
sys.path.insert(0, os.environ.get("STEM_BENCH_CHECKOUT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


MANY = 500   # tasks per enqueue_many call
PG_SCHEMA = "stem_bench_single"
THREADS = 8  # --threads: threads enqueueing at once


def producer(url: str) -> tuple[Stem, dict]:
    """A producer on ``url`` (signing on) and its measured calls: "single" (one enqueue per
    call) and "many" (one ``enqueue_many`` of ``MANY`` per call; per task).  A postgresql://
    URL: a PostgresBroker in schema ``PG_SCHEMA``, fire-and-forget."""
    signer = PayloadSigner({"k1": b"k" * 32}, "k1")
    if url.startswith("postgres"):
        from stem.brokers.postgres import PostgresBroker
        stem = Stem(PostgresBroker(url, schema=os.environ.get("STEM_BENCH_PG_SCHEMA", PG_SCHEMA)), None, registry,
                    signer)
    else:
        stem = Stem(RedisBroker(url, namespace="bench"), RedisResultBackend(url, namespace="bench"), registry,
                    signer)
    stem.enqueue("bench.echo", {"i": 0})
    items = [("bench.echo", {"i": i}) for i in range(MANY)]

    def single(n: int) -> tuple[float, float]:
        return measure(lambda i: stem.enqueue("bench.echo", {"i": i}), n)

    def many(n: int) -> tuple[float, float]:
        cpu, wall = measure(lambda i: stem.enqueue_many(items), max(20, 4 * n // MANY))
        return cpu / MANY, wall / MANY

    def threads(n: int) -> tuple[float, float]:
        """``THREADS`` threads, each enqueueing one task at a time (n in all): per task."""
        per = max(1, n // THREADS)
        go = threading.Barrier(THREADS + 1)

        def run() -> None:
            go.wait()
            for i in range(per):
                stem.enqueue("bench.echo", {"i": i})
        workers = [threading.Thread(target=run) for _ in range(THREADS)]
        for t in workers:
            t.start()
        c, w = time.process_time(), time.perf_counter()
        go.wait()
        for t in workers:
            t.join()
        return (time.process_time() - c) / (per * THREADS) * 1e6, (time.perf_counter() - w) / (per * THREADS) * 1e6

    return stem, {"single": single, "many": many, "threads": threads}


def child(url: str) -> None:
    """``--child``: measure on request, one line in ("single N"), one line out ("cpu wall")."""
    stem, calls = producer(url)
    if not url.startswith("postgres"):
        redis.Redis.from_url(url).delete(*stem.broker.queue_keys("default"))
    for line in sys.stdin:
        what, n = line.split()
        cpu, wall = calls[what](int(n))
        print(f"{cpu} {wall}", flush=True)


class Baseline:
    """A baseline checkout's producer in a child process."""

    def __init__(self, checkout: str, url: str, **env_vars: str):
        env = dict(os.environ, STEM_BENCH_CHECKOUT=os.path.abspath(checkout), **env_vars)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", url], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, what: str, n: int) -> tuple[float, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{what} {n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the baseline child died")
        cpu, wall = line.split()
        return float(cpu), float(wall)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one stem round")
    parser.add_argument("--baseline", metavar="DIR", help="a built checkout of stem to measure in the same run")
    parser.add_argument("--threads", action="store_true",
                        help=f"also {THREADS} threads enqueueing one task at a time each (tasks/s)")
    parser.add_argument("--parts", action="store_true",
                        help="also the single enqueue layer by layer (min CPU of 15 blocks each)")
    parser.add_argument("--postgres", metavar="URL",
                        help="measure on Postgres instead (a raw prepared INSERT of the row beside it)")
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.postgres:
        postgres_main(args)
        return
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not on PATH")
    import stem as stem_pkg
    with tempfile.TemporaryDirectory() as d:
        proc, port = start_redis(d)
        baseline = None
        try:
            url = f"redis://127.0.0.1:{port}/0"
            stem, calls = producer(url)
            key = stem.broker.queue_keys("default")[0]
            frame_len = len(redis.Redis(port=port).xrange(key, count=1)[0][1][b"f"])
            xadd = pack_commands([("XADD", key, "*", "t", "0" * 32, "f", b"x" * frame_len, "p", 0, "v", 0)])
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if args.baseline:
                baseline = Baseline(args.baseline, url)

            def raw(i: int) -> None:
                sock.sendall(xadd)
                if not sock.recv(256).startswith(b"$"):
                    raise RuntimeError("XADD failed")

            trim = redis.Redis(port=port)
            def interleaved(n: int) -> list[tuple[float, float]]:
                """stem, raw (and the baseline) in alternating blocks of 500 calls, so all see
                the same load: (CPU, wall) per call of each."""
                fns = [lambda: calls["single"](500), lambda: measure(raw, 500)]
                if baseline is not None:
                    fns.append(lambda: baseline("single", 500))
                totals = [[0.0, 0.0] for _ in fns]
                blocks = max(1, n // 500)
                for _ in range(blocks):
                    for total, fn in zip(totals, fns):
                        cpu, wall = fn()
                        total[0] += cpu
                        total[1] += wall
                return [(cpu / blocks, wall / blocks) for cpu, wall in totals]

            rows = []
            for _ in range(args.rounds):
                measured = interleaved(args.tasks)
                row = {"stem": measured[0], "raw": measured[1]}
                if baseline is not None:
                    row["base"] = measured[2]
                    row["many"] = calls["many"](args.tasks)
                    row["base_many"] = baseline("many", args.tasks)
                if args.threads:
                    row["threads"] = calls["threads"](args.tasks)
                    if baseline is not None:
                        row["base_threads"] = baseline("threads", args.tasks)
                trim.delete(key)
                rows.append(row)
            print(f"stem build: {stem_pkg.IMPLEMENTATION}; {args.tasks} calls a round, frame {frame_len} B, "
                  f"signing on" + (f"; baseline {args.baseline}" if baseline else ""))
            for n, row in enumerate(rows, 1):
                (s_cpu, s_wall), (r_cpu, r_wall) = row["stem"], row["raw"]
                line = (f"round {n}: stem.enqueue {s_cpu:.1f} us CPU, {s_wall:.1f} us wall | raw XADD "
                        f"{r_cpu:.1f} us CPU, {r_wall:.1f} us wall | wall ratio {s_wall / r_wall:.2f}x")
                if "base" in row:
                    b_cpu, b_wall = row["base"]
                    line += (f" | baseline {b_cpu:.1f} us CPU, {b_wall:.1f} us wall, ratio {b_wall / r_wall:.2f}x; "
                             f"after/before wall {s_wall / b_wall:.2f}x CPU {s_cpu / b_cpu:.2f}x | enqueue_many "
                             f"CPU/task {row['many'][0]:.2f} us (baseline {row['base_many'][0]:.2f}, "
                             f"{row['many'][0] / row['base_many'][0]:.2f}x)")
                if "threads" in row:
                    line += (f" | {THREADS} threads: {1e6 / row['threads'][1]:,.0f} tasks/s, "
                             f"{row['threads'][0]:.1f} us CPU/task")
                    if "base_threads" in row:
                        line += (f" (baseline {1e6 / row['base_threads'][1]:,.0f} tasks/s, "
                                 f"{row['base_threads'][0]:.1f} us CPU/task; after/before "
                                 f"{row['base_threads'][1] / row['threads'][1]:.2f}x)")
                print(line)
            med = sorted(rows, key=lambda r: r["stem"][1])[len(rows) // 2]
            print(f"median round: producer CPU {med['stem'][0]:.1f} us (raw {med['raw'][0]:.1f}), wall "
                  f"{med['stem'][1]:.1f} us (raw {med['raw'][1]:.1f}), "
                  f"wall ratio {med['stem'][1] / med['raw'][1]:.2f}x; "
                  f"CPU median of rounds {statistics.median(r['stem'][0] for r in rows):.1f} us; wall ratio median "
                  f"{statistics.median(r['stem'][1] / r['raw'][1] for r in rows):.2f}x"
                  + (f", baseline's {statistics.median(r['base'][1] / r['raw'][1] for r in rows):.2f}x"
                     if baseline else ""))
            if args.parts:
                print_parts(stem, port, raw, key)
            if args.profile:
                prof = cProfile.Profile()
                prof.runcall(calls["single"], args.tasks)
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            sock.close()
            stem.close()
        finally:
            if baseline is not None:
                baseline.close()
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def print_parts(stem: Stem, port: int, raw, key: str) -> None:
    """``--parts``: the layers of this tree's single enqueue, min CPU per call of 15 blocks of
    500 each, the layers alternating block by block; wall is the median block's."""
    from stem.stores.redis_dedicated import dedicated
    from stem.stores.redis_pipe import _exchange
    single = stem._singles.get("bench.echo")
    if single is None:
        print("parts: no one-call path for bench.echo (an older stem?)")
        return
    _, command = single.build({"i": 0}, time.time())
    d = dedicated(stem.broker._client.connection_pool)
    conn = d.connection()
    layers = {"raw round trip": raw,
              "exchange alone": lambda i: _exchange(conn._sock, command, d.feed),
              "send (group, dedicated, exchange)": lambda i: single.send(command),
              "build alone": lambda i: single.build({"i": i}, time.time()),
              "enqueue": lambda i: stem.enqueue("bench.echo", {"i": i})}
    blocks: dict[str, list[tuple[float, float]]] = {name: [] for name in layers}
    for _ in range(15):
        for name, fn in layers.items():
            blocks[name].append(measure(fn, 500))
        redis.Redis(port=port).delete(key)
    for name, got in blocks.items():
        print(f"parts: {name}: {min(c for c, _ in got):.2f} us CPU (min of 15), "
              f"{statistics.median(w for _, w in got):.1f} us wall (median)")


def postgres_main(args: argparse.Namespace) -> None:
    """``--postgres URL``: stem.enqueue on a PostgresBroker (durable commit) against the same
    row INSERTed by psycopg with a prepared statement on an autocommit connection, in blocks
    of 200 alternating (and the baseline's, in a schema of its own)."""
    import uuid

    import psycopg
    import stem as stem_pkg
    run = uuid.uuid4().hex[:8]
    schema, base_schema = f"{PG_SCHEMA}_{run}", f"{PG_SCHEMA}_base_{run}"
    os.environ["STEM_BENCH_PG_SCHEMA"] = schema
    stem, calls = producer(args.postgres)
    baseline = Baseline(args.baseline, args.postgres, STEM_BENCH_PG_SCHEMA=base_schema) if args.baseline else None
    raw = psycopg.connect(args.postgres, autocommit=True, prepare_threshold=0)
    try:
        raw.execute(f"CREATE TABLE {schema}.raw_rows (queue text, task_id text, priority int4, frame bytea)")
        frame = b"x" * 145
        insert = f"INSERT INTO {schema}.raw_rows VALUES (%s, %s, %s, %s)"
        fns = [lambda: calls["single"](200),
               lambda: measure(lambda i: raw.execute(insert, ("default", "0" * 32, 0, frame)), 200)]
        if baseline is not None:
            fns.append(lambda: baseline("single", 200))
        print(f"stem build: {stem_pkg.IMPLEMENTATION}; Postgres, {args.tasks} calls a round, signing on"
              + (f"; baseline {args.baseline}" if baseline else ""))
        for n in range(1, args.rounds + 1):
            totals = [[0.0, 0.0] for _ in fns]
            blocks = max(1, args.tasks // 200)
            for _ in range(blocks):
                for total, fn in zip(totals, fns):
                    cpu, wall = fn()
                    total[0] += cpu / blocks
                    total[1] += wall / blocks
            line = (f"round {n}: stem.enqueue {totals[0][0]:.0f} us CPU, {totals[0][1]:.0f} us wall | raw prepared "
                    f"INSERT {totals[1][0]:.0f} us CPU, {totals[1][1]:.0f} us wall | wall ratio "
                    f"{totals[0][1] / totals[1][1]:.2f}x")
            if baseline is not None:
                line += (f" | baseline {totals[2][0]:.0f} us CPU, {totals[2][1]:.0f} us wall; after/before CPU "
                         f"{totals[0][0] / totals[2][0]:.2f}x wall {totals[0][1] / totals[2][1]:.2f}x")
            print(line)
    finally:
        if baseline is not None:
            baseline.close()
        stem.close()
        for s in (schema, base_schema):
            raw.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        raw.close()


if __name__ == "__main__":
    main()
