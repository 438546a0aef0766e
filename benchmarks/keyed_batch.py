"""Keyed batches against plain ones: ``enqueue_many`` of unique tasks, per broker.

    .venv/bin/python benchmarks/keyed_batch.py [--brokers redis,postgres,sqlite] [--tasks 10000]

Each round publishes ``--tasks`` items of one task name, in one ``enqueue_many`` call:

* ``plain``: distinct args, no options (the uniform fast path, ``publish_frames``);
* ``unique, 50% duplicates``: ``TaskOptions(unique=True)``, every args dict twice
  (the second of each pair a duplicate, inside the batch), so half the items publish;
* ``unique, no duplicates``: distinct args under ``unique=True`` (every key claimed).

The queue is purged between rounds (purge releases keys), and the figure is items per
second of the ``enqueue_many`` call, wall clock, the median of ``--repeat`` rounds; each
keyed variant is also given as a ratio to ``plain`` measured in the same run.  On
Redis the round trips are counted at the socket: every ``send_packed_command`` of
redis-py's connections during the call (a pipeline is one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stem import Stem, TaskOptions, TaskRegistry  # noqa: E402
from stem.brokers import from_url as broker_from_url  # noqa: E402

URLS = {
    "redis": "redis://127.0.0.1:6379/0",
    "postgres": "postgresql://postgres@127.0.0.1:5432/postgres",
    "sqlite": "sqlite:///{tmp}/keyed-bench.db",
}
UNIQUE = TaskOptions(unique=True)


class RoundTrips:
    """Counts redis-py's socket writes (one per command or pipeline) while active."""

    def __init__(self):
        self.count = 0
        self._orig = None

    def __enter__(self):
        from redis.connection import Connection
        self._orig = orig = Connection.send_packed_command

        def counting(conn, command, check_health=True):
            self.count += 1
            return orig(conn, command, check_health)

        Connection.send_packed_command = counting
        return self

    def __exit__(self, *exc):
        from redis.connection import Connection
        Connection.send_packed_command = self._orig


def _items(kind: str, n: int) -> list:
    salt = uuid.uuid4().hex            # fresh keys every round: nothing held over
    if kind == "plain":
        return [("bench.keyed", {"i": i, "s": salt}) for i in range(n)]
    if kind == "unique, 50% duplicates":
        return [("bench.keyed", {"i": i // 2, "s": salt}, UNIQUE) for i in range(n)]
    return [("bench.keyed", {"i": i, "s": salt}, UNIQUE) for i in range(n)]


def run(name: str, url: str, tasks: int, repeat: int) -> dict:
    kwargs = {"namespace": "stembench_" + uuid.uuid4().hex[:8]} if name == "redis" else {}
    if name == "postgres":
        kwargs = {"schema": "stembench_" + uuid.uuid4().hex[:8]}
    broker = broker_from_url(url, **kwargs)
    registry = TaskRegistry()
    registry.task("bench.keyed")(lambda ctx, i, s: None)
    stem = Stem(broker, None, registry)
    queue = "default"
    out: dict = {"broker": name, "tasks": tasks, "variants": {}}
    try:
        for kind in ("plain", "unique, 50% duplicates", "unique, no duplicates"):
            rates, trips, dupes = [], [], 0
            for _ in range(repeat):
                items = _items(kind, tasks)
                counter = RoundTrips() if name == "redis" else None
                t0 = time.perf_counter()
                if counter is not None:
                    with counter:
                        ids = stem.enqueue_many(items)
                    trips.append(counter.count)
                else:
                    ids = stem.enqueue_many(items)
                rates.append(tasks / (time.perf_counter() - t0))
                dupes = len(getattr(ids, "duplicates", ()))
                broker.purge(queue)
            out["variants"][kind] = {"items_per_s": statistics.median(rates), "duplicates": dupes,
                                     "round_trips": statistics.median(trips) if trips else None}
        plain = out["variants"]["plain"]["items_per_s"]
        for v in out["variants"].values():
            v["vs_plain"] = v["items_per_s"] / plain
    finally:
        if name == "redis":
            import redis
            from tests.support import drop_namespace
            client = redis.Redis.from_url(url)
            drop_namespace(client, kwargs["namespace"])
            client.close()
        if name == "postgres":
            import psycopg
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{kwargs["schema"]}" CASCADE')
        stem.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", default="redis,postgres,sqlite")
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import tempfile
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.brokers.split(","):
            results.append(run(name, URLS[name].format(tmp=tmp), args.tasks, args.repeat))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"enqueue_many of {args.tasks} items, median of {args.repeat} rounds (load {os.getloadavg()[0]:.1f})")
    print(f"{'broker':10} {'variant':26} {'items/s':>10} {'vs plain':>9} {'dupes':>6} {'round trips':>12}")
    for r in results:
        for kind, v in r["variants"].items():
            trips = "-" if v["round_trips"] is None else f"{v['round_trips']:g}"
            print(f"{r['broker']:10} {kind:26} {v['items_per_s']:10,.0f} {v['vs_plain']:9.2f} {v['duplicates']:6} "
                  f"{trips:>12}")


if __name__ == "__main__":
    main()
