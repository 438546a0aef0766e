"""The Redis broker's plain (unlimited) consume + ack path with limit lanes (issue 21): before
and after, and beside a throttled backlog, all in one run.

    .venv/bin/python benchmarks/redis_limits.py [--url redis://127.0.0.1:6379/0] [--tasks 20000]
        [--batch 50] [--repeat 5] [--backlog 100000] [--baseline REV] [--server-side]

Each round publishes ``--tasks`` plain messages (``publish_frames``), then drains them with
``consume(batch)`` + ``ack`` of what it got, one broker, one thread; the figure is messages
per second of the drain (wall clock), the median of ``--repeat`` rounds, and the p99 of one
consume call.  Rounds of the variants alternate (each round starting with the next one), so drift hits them
alike:

* ``after``: this checkout's scripts, on a queue that never had a limit;
* ``before``: the consume and settle scripts of git revision ``--baseline`` (default: the
  commit the limits work started from) loaded in place of this checkout's, same queue kind;
* ``backlog``: this checkout, on a queue that also holds ``--backlog`` throttled messages
  (one closed lane per 1,000 of them), which every consume of it passes by;
* ``limited``: for scale, the same drain of messages that all carry a limit that never
  throttles them (ten rate keys at 10^6/s, round robin), i.e. the cost of the limit path.

The ratios ``after / before`` and ``backlog / after`` are printed with the figures.  On a
shared machine the client-side rates swing by tens of percent between rounds; with
``--server-side`` (only against a Redis server of your own: it runs ``CONFIG RESETSTAT``
before every round) the Redis-side microseconds per script call (``INFO commandstats``,
consume and ack calls together) are printed too, which the client's noise does not reach.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stem.brokers.base import Limit, Message  # noqa: E402
from stem.brokers.redis import RedisBroker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "9b09cdd"     # branch "limits": the contract, before any Redis limit code


def _git_show(rev: str, path: str) -> str:
    return subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def baseline_broker(url: str, namespace: str, rev: str) -> RedisBroker:
    """A broker of this checkout whose consume and settle scripts are those of ``rev`` (a
    benchmark's swap: the Python around them is the same, so only the scripts differ)."""
    broker = RedisBroker.from_url(url, namespace=namespace)
    common = _git_show(rev, "stem/brokers/redis_common.lua")
    broker._consume_script = broker.store.script(common + "\n" + _git_show(rev, "stem/brokers/redis_consume.lua"))
    broker._settle_script = broker.store.script(common + "\n" + _git_show(rev, "stem/brokers/redis_settle.lua"))
    broker.store.load_scripts()
    return broker


OPEN = [Limit(rate_key=f"open-{i}", rate=1e6, burst=1000000) for i in range(10)]


def drain_round(broker: RedisBroker, queue: str, tasks: int, batch: int,
                limited: bool = False) -> tuple[float, list[float]]:
    """Publish ``tasks`` messages, then consume + ack exactly that many (never asking an
    empty queue: the baseline scripts' empty reply lacks what this checkout reads then)."""
    ids = [uuid.uuid4().hex for _ in range(tasks)]
    for i in range(0, tasks, 2000):
        if limited:
            broker.publish_many([Message(t, queue, b"x" * 200, limit=OPEN[j % len(OPEN)])
                                 for j, t in enumerate(ids[i:i + 2000])])
        else:
            broker.publish_frames(queue, ids[i:i + 2000], [b"x" * 200] * len(ids[i:i + 2000]))
    calls: list[float] = []
    left = tasks
    start = time.perf_counter()
    while left:
        t = time.perf_counter()
        got = broker.consume([queue], min(batch, left), 0, consumer="bench")
        calls.append(time.perf_counter() - t)
        broker.ack(got)
        left -= len(got)
    return tasks / (time.perf_counter() - start), calls


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backlog", type=int, default=100000)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--server-side", action="store_true",
                    help="CONFIG RESETSTAT before each round and report Redis-side us per script call")
    args = ap.parse_args()

    namespace = "bench_limits_" + uuid.uuid4().hex[:8]
    after = RedisBroker.from_url(args.url, namespace=namespace)
    before = baseline_broker(args.url, namespace, args.baseline)
    closed = [Limit(rate_key=f"tenant-{i}", rate=0.001, burst=1) for i in range(max(1, args.backlog // 1000))]
    for i in range(0, args.backlog, 2000):
        after.publish_many([Message(uuid.uuid4().hex, "backlog", b"y" * 200, limit=closed[j % len(closed)])
                            for j in range(i, min(i + 2000, args.backlog))])
    # spend each lane's one token, so every lane is throttled from here on
    while True:
        spent = after.consume(["backlog"], 1000, 0, consumer="bench-spend")
        if not spent:
            break
        after.ack(spent)
    results: dict[str, tuple[list[float], list[float]]] = {"after": ([], []), "before": ([], []),
                                                            "backlog": ([], []), "limited": ([], [])}
    server_us: dict[str, list[float]] = {name: [] for name in results}
    admin = None
    if args.server_side:
        import redis
        admin = redis.Redis.from_url(args.url)
    try:
        variants = [("after", after, "plain-a"), ("before", before, "plain-b"), ("backlog", after, "backlog"),
                    ("limited", after, "limited")]
        for r in range(args.repeat):
            for name, broker, queue in variants[r % 4:] + variants[:r % 4]:   # each goes first in turn
                if admin is not None:
                    admin.config_resetstat()
                rate, calls = drain_round(broker, queue, args.tasks, args.batch, name == "limited")
                if admin is not None:
                    server_us[name].append(admin.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
                results[name][0].append(rate)
                results[name][1].extend(calls)
        throttled = after.stats("backlog").throttled
    finally:
        for q in ("plain-a", "plain-b", "backlog", "limited"):
            after.delete_queue(q)
        after.close()
        before.close()
    med = {name: statistics.median(r[0]) for name, r in results.items()}
    print(f"consume({args.batch}) + ack of {args.tasks} plain messages, median of {args.repeat} rounds; "
          f"backlog: {throttled} throttled in {len(closed)} lanes; baseline scripts: {args.baseline}")
    for name in ("before", "after", "backlog", "limited"):
        print(f"  {name:8s} {med[name]:10,.0f} msg/s   p99 consume call {p99(results[name][1]) * 1e3:6.3f} ms")
    print(f"  after/before {med['after'] / med['before']:.3f}   backlog/after {med['backlog'] / med['after']:.3f}")
    if admin is not None:
        us = {name: statistics.median(v) for name, v in server_us.items()}
        print("  Redis-side us per script call (median): " + "  ".join(f"{n} {us[n]:.1f}" for n in us)
              + f"   after/before {us['after'] / us['before']:.3f}   backlog/after {us['backlog'] / us['after']:.3f}")
        admin.close()


if __name__ == "__main__":
    main()
