"""Limits and the unlimited path (issue 21): what a throttled backlog and the limits code cost
the tasks that have no limit.

    .venv/bin/python benchmarks/limits.py [--brokers memory,redis] [--backlog 100000]
        [--tasks 1000] [--interval 0.004] [--path-messages 20000] [--rounds 5] [--before limits]

Two measurements per broker, each a ratio of two figures taken in the same run:

1. **Latency behind a throttled backlog.**  A worker (inline engine, 4 threads) serves one
   queue; a producer enqueues ``--tasks`` unlimited tasks, one every ``--interval`` seconds,
   and the time from each enqueue to its start (``TaskStatus.started_at``) is recorded.  Run
   once on the empty queue, then again after ``--backlog`` tasks limited to 1/h (one rate
   key) were published into the same queue.  p50 / p99 / max of each, and the p99 ratio
   (backlog / none).
2. **The unlimited publish + consume path, before and after.**  ``--path-messages`` messages
   without a limit: ``publish_many`` in batches of 1,000, then ``consume`` (100 at a time)
   and ``ack`` until the queue is empty; messages per second of the whole cycle.  "before"
   is the broker module of git revision ``--before`` (default: the ``limits`` branch, the
   contract without any adapter work), loaded beside the current one; "after" is the current
   module, on an empty queue and with ``--backlog`` throttled messages waiting in a lane of
   the same queue.  Rounds rotate which of before / after / after+backlog goes first (a full
   collection before each); medians and bests, and their ratios.

The machine is shared (see benchmarks/README.md): absolute figures move, the ratios are what
is compared.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stem import Stem, TaskOptions, TaskRegistry, Worker, WorkerLifecycleConfig  # noqa: E402
from stem.backends.memory import InMemoryResultBackend  # noqa: E402
from stem.brokers.base import Limit, Message  # noqa: E402

REDIS_URL = os.environ.get("STEM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
THROTTLED = TaskOptions(rate_limit="1/h", rate_key="bench-backlog", burst=1)
BACKLOG_LIMIT = Limit("bench-backlog", 1 / 3600, 1)
Q = "limits-bench"


# -- brokers, current and before ---------------------------------------------------------------
def _current(kind: str, namespace: str):
    if kind == "memory":
        from stem.brokers.memory import InMemoryBroker
        return InMemoryBroker()
    from stem.brokers.redis import RedisBroker
    return RedisBroker.from_url(REDIS_URL, namespace=namespace)


def _before_class(kind: str, rev: str):
    """The broker class of ``stem/brokers/<kind>.py`` at git revision ``rev``, loaded as a
    module of ``stem.brokers`` (its relative imports resolve to today's base), its Lua
    scripts (Redis) read from the same revision.  The two methods the contract added since
    are stubbed: the unlimited path never calls them."""
    module_file = {"memory": "memory.py", "redis": "redis.py"}[kind]

    def show(path: str) -> str:
        return subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout

    source = show(f"stem/brokers/{module_file}")
    name = f"stem.brokers._before_{kind}"
    module = types.ModuleType(name)
    module.__package__ = "stem.brokers"
    module.__file__ = f"<{rev}:stem/brokers/{module_file}>"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    if kind == "redis":
        scripts = {}

        def load_script(script: str) -> str:
            if script not in scripts:
                scripts[script] = show("stem/brokers/redis_common.lua") + "\n" + show(f"stem/brokers/{script}")
            return scripts[script]
        module._load_script = load_script
        base = module.RedisBroker
    else:
        base = module.InMemoryBroker
    return type(f"Before{base.__name__}", (base,), {"route_limited": lambda self, d, limit: None,
                                                     "lane_stats": lambda self, queue, limit=100: []})


def _before(kind: str, rev: str, namespace: str):
    cls = _before_class(kind, rev)
    return cls() if kind == "memory" else cls.from_url(REDIS_URL, namespace=namespace)


def _drop(broker, kind: str, namespace: str) -> None:
    if kind == "redis":
        import redis
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=namespace + ":*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
        client.close()
    broker.close()


# -- 1. latency behind a backlog -----------------------------------------------------------------
def _latencies(broker, n: int, interval: float) -> list[float]:
    registry = TaskRegistry()
    registry.task("bench.free")(lambda ctx: None)
    registry.task("bench.throttled", options=THROTTLED)(lambda ctx, **kw: None)
    backend = InMemoryResultBackend()
    worker = Worker(broker, backend, registry, queues=[Q], concurrency=4, isolation="inline",
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5,
                                                    force_shutdown_after=5)).run_in_background()
    stem = Stem(broker, backend, registry)
    sent: dict[str, float] = {}
    opts = TaskOptions(queue=Q)
    try:
        start = time.monotonic()
        for i in range(n):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            at = time.time()
            sent[stem.enqueue("bench.free", options=opts)] = at
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            statuses = backend.get_many(list(sent))
            if all(s is not None and s.is_terminal for s in statuses):
                break
            time.sleep(0.05)
        return [s.started_at - sent[s.id] for s in backend.get_many(list(sent))]
    finally:
        worker.shutdown("hard")


def _publish_backlog(broker, n: int) -> None:
    stem = Stem(broker, None)
    opts = TaskOptions(queue=Q, rate_limit="1/h", rate_key="bench-backlog", burst=1)
    for i in range(0, n, 5000):
        stem.enqueue_many([("bench.throttled", {"i": j}, opts) for j in range(i, min(n, i + 5000))])


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def latency(kind: str, args) -> dict:
    """Rounds of (no backlog, then the backlog published, measured, and purged): each round's
    p99 ratio, and the median over rounds (the machine's load moves single figures)."""
    namespace = "stembench_" + uuid.uuid4().hex[:10]
    broker = _current(kind, namespace)

    def summary(xs):
        return {"p50_ms": _pct(xs, 0.5) * 1e3, "p99_ms": _pct(xs, 0.99) * 1e3, "max_ms": max(xs) * 1e3}
    rounds = []
    try:
        for _ in range(args.latency_rounds):
            none = _latencies(broker, args.tasks, args.interval)
            t0 = time.monotonic()
            _publish_backlog(broker, args.backlog)
            published_in = time.monotonic() - t0
            stats = broker.stats(Q)
            assert stats.throttled >= args.backlog - 1, stats
            backlog = _latencies(broker, args.tasks, args.interval)
            throttled_after = broker.stats(Q).throttled
            broker.purge(Q)
            r = {"none": summary(none), "backlog": summary(backlog), "backlog_publish_s": published_in,
                 "throttled_after": throttled_after}
            r["p99_ratio"] = r["backlog"]["p99_ms"] / r["none"]["p99_ms"]
            r["p50_ratio"] = r["backlog"]["p50_ms"] / r["none"]["p50_ms"]
            rounds.append(r)
    finally:
        _drop(broker, kind, namespace)
    med = {key: statistics.median(r[key] for r in rounds) for key in ("p99_ratio", "p50_ratio")}
    return {"rounds": rounds, **med}


# -- 2. the unlimited path, before and after -----------------------------------------------------
def _cycle(broker, n: int) -> float:
    """publish_many + consume/ack of ``n`` unlimited messages; messages per second."""
    batches = [[Message(uuid.uuid4().hex, Q, b"x" * 200) for _ in range(min(1000, n - i))] for i in range(0, n, 1000)]
    t0 = time.perf_counter()
    for batch in batches:
        broker.publish_many(batch)
    left = n
    while left:
        got = broker.consume([Q], 100, 1.0)
        if not got:
            raise RuntimeError(f"{left} messages never came back")
        broker.ack(got)
        left -= len(got)
    return n / (time.perf_counter() - t0)


def path(kind: str, args) -> dict:
    namespaces = ["stembench_" + uuid.uuid4().hex[:10] for _ in range(3)]
    before = _before(kind, args.before, namespaces[0])
    after = _current(kind, namespaces[1])
    loaded = _current(kind, namespaces[2])
    try:
        loaded.publish_many([Message(uuid.uuid4().hex, Q, b"x" * 200, limit=BACKLOG_LIMIT)
                             for _ in range(args.backlog)])
        loaded.consume([Q], 1, 0)                  # spend the lane's one token: it stays throttled
        runs = {"before": [], "after": [], "after_backlog": []}
        variants = [("before", before), ("after", after), ("after_backlog", loaded)]
        for i in range(args.rounds):
            for name, broker in variants[i % 3:] + variants[:i % 3]:     # each goes first in turn
                gc.collect()                                            # no collection owed to another
                runs[name].append(_cycle(broker, args.path_messages))
        assert loaded.stats(Q).throttled == args.backlog - 1
    finally:
        for b, ns in zip((before, after, loaded), namespaces):
            _drop(b, kind, ns)
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: max(v) for k, v in runs.items()}
    return {"msgs_per_s": med, "best": best, "after/before": med["after"] / med["before"],
            "after_backlog/before": med["after_backlog"] / med["before"],
            "best after/before": best["after"] / best["before"],
            "best after_backlog/before": best["after_backlog"] / best["before"], "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default="memory")
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=0.004)
    ap.add_argument("--path-messages", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--latency-rounds", type=int, default=3)
    ap.add_argument("--before", default="limits")
    ap.add_argument("--only", choices=["latency", "path"], default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = {}
    for kind in args.brokers.split(","):
        results[kind] = {}
        if args.only in (None, "latency"):
            results[kind]["latency"] = latency(kind, args)
        if args.only in (None, "path"):
            results[kind]["path"] = path(kind, args)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for kind, r in results.items():
        if "latency" in r:
            lat = r["latency"]
            print(f"{kind}: enqueue -> start of {args.tasks} unlimited tasks (one per {args.interval * 1e3:g} ms)")
            for i, rd in enumerate(lat["rounds"], 1):
                for label in ("none", "backlog"):
                    s = rd[label]
                    name = "no backlog" if label == "none" else f"{args.backlog:,} throttled queued"
                    print(f"  round {i} {name:>24}: p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  "
                          f"max {s['max_ms']:7.2f} ms")
                print(f"  round {i} p99 ratio backlog/none: {rd['p99_ratio']:.2f} (backlog published in "
                      f"{rd['backlog_publish_s']:.1f} s, {rd['throttled_after']:,} still throttled after)")
            print(f"  median p99 ratio backlog/none: {lat['p99_ratio']:.2f}  (p50 {lat['p50_ratio']:.2f})")
        if "path" in r:
            p = r["path"]
            m = p["msgs_per_s"]
            print(f"{kind}: unlimited publish_many + consume/ack, {args.path_messages:,} msgs, median of {args.rounds}")
            print(f"  before ({args.before}): {m['before']:,.0f}/s  after: {m['after']:,.0f}/s  after with "
                  f"{args.backlog:,} throttled in the queue: {m['after_backlog']:,.0f}/s")
            print(f"  after/before {p['after/before']:.2f}  after+backlog/before {p['after_backlog/before']:.2f}"
                  f"  (best of {args.rounds}: {p['best after/before']:.2f} and {p['best after_backlog/before']:.2f})")


if __name__ == "__main__":
    main()
