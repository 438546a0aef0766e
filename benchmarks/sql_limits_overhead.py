"""What limits cost the unlimited path of the SQL brokers: plain publish + consume + ack, before
and after (same run, interleaved), and after with a throttled backlog in the same queue.

    .venv/bin/python benchmarks/sql_limits_overhead.py --before /tmp/stem-before [--chunk 1000]
        [--rounds 15] [--backlog 10000] [--adapters sqlite,postgres] [--postgres-url URL]

``--before`` is a directory holding the ``stem`` package as it was before limits (e.g.
``git archive <commit> stem | tar -x -C DIR``, plus the compiled ``stem/_speedups/*.so``).
Both versions run in one process (the old package imported as ``stem_before``), each broker on
a file or schema of its own; a round publishes ``chunk`` plain messages to each and times
draining them with ``consume(max_count=10)`` + ``ack`` (one thread), the variants taking turns
(the order rotating each round), so that the load of a shared machine hits them alike.
"after+backlog" first got ``backlog`` limited messages in the same queue under one rate key at
0.001/s (one leased, the rest throttled for the whole run).  Printed: median msgs/s of each,
and the throughput ratios (median of the per-round ratios, and of the totals).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import uuid

Q = "bench"


def load_before(path: str):
    """The ``stem`` package under ``path`` imported as ``stem_before`` (its modules import each
    other relatively), beside this checkout's ``stem``."""
    spec = importlib.util.spec_from_file_location("stem_before", os.path.join(path, "stem", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(path, "stem")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["stem_before"] = module
    spec.loader.exec_module(module)
    return module


def brokers(adapter: str, before_pkg, backlog: int, tmp: str, pg_url: str) -> dict:
    """name -> (broker, Message class, whether it has a throttled backlog)."""
    from stem.brokers.base import Limit, Message
    module = {"sqlite": "sqlite", "postgres": "postgres"}[adapter]
    cls = {"sqlite": "SqliteBroker", "postgres": "PostgresBroker"}[adapter]
    before = getattr(importlib.import_module(f"stem_before.brokers.{module}"), cls)
    after = getattr(importlib.import_module(f"stem.brokers.{module}"), cls)
    BeforeMessage = importlib.import_module("stem_before.brokers.base").Message
    out = {}
    for name, pkg, msg in (("before", before, BeforeMessage), ("after", after, Message),
                           ("after+backlog", after, Message)):
        tag = name.replace("+", "_")
        url = (f"sqlite:///{tmp}/{tag}.db" if adapter == "sqlite"
               else f"{pg_url}?schema=bench_{uuid.uuid4().hex[:6]}_{tag}")
        broker = pkg.from_url(url)
        if name == "after+backlog":
            limit = Limit(rate_key="slow", rate=0.001, burst=1)
            for i in range(0, backlog, 1000):
                broker.publish_many([Message(uuid.uuid4().hex, Q, b"y" * 200, limit=limit)
                                     for _ in range(min(1000, backlog - i))])
            assert len(broker.consume([Q], 1, 5.0)) == 1     # its one token; the rest stay throttled
            assert broker.stats(Q).throttled == backlog - 1
        out[name] = (broker, msg, url)
    return out


def run_chunk(broker, msg, n: int) -> float:
    """Publish ``n`` plain messages, then time draining them with consume(10) + ack."""
    for i in range(0, n, 500):
        broker.publish_many([msg(uuid.uuid4().hex, Q, b"x" * 200) for _ in range(min(500, n - i))])
    done = 0
    t0 = time.perf_counter()
    while done < n:
        ds = broker.consume([Q], 10, 1.0)
        assert ds and all(getattr(d, "limit", None) is None for d in ds)
        broker.ack(ds)
        done += len(ds)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--backlog", type=int, default=10000)
    ap.add_argument("--adapters", default="sqlite,postgres")
    ap.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()
    before_pkg = load_before(args.before)
    tmp = tempfile.mkdtemp()
    for adapter in args.adapters.split(","):
        made = brokers(adapter, before_pkg, args.backlog, tmp, args.postgres_url)
        for broker, msg, _ in made.values():
            run_chunk(broker, msg, 200)                      # warm up: connections, statements
        times: dict[str, list[float]] = {name: [] for name in made}
        for r in range(args.rounds):
            names = list(made)
            order = names[r % len(names):] + names[:r % len(names)]     # each variant in each place alike
            for name in order:
                broker, msg, _ = made[name]
                times[name].append(run_chunk(broker, msg, args.chunk))
        print(f"{adapter}: plain consume(10)+ack, {args.rounds} interleaved rounds of {args.chunk} messages")
        rates = {name: [args.chunk / t for t in ts] for name, ts in times.items()}
        for name, rs in rates.items():
            print(f"  {name:14s} median {statistics.median(rs):8.0f} msgs/s  (total {sum(times[name]):.2f}s)")
        for num, den in (("after", "before"), ("after+backlog", "after")):
            per_round = [a / b for a, b in zip(times[den], times[num])]      # throughput ratio
            print(f"  {num}/{den}: median {statistics.median(per_round):.3f}, "
                  f"totals {sum(times[den]) / sum(times[num]):.3f}")
        for broker, _, url in made.values():
            broker.delete_queue(Q)
            broker.close()
            if adapter == "postgres":
                import psycopg
                base, schema = url.split("?schema=")
                with psycopg.connect(base, autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    main()
