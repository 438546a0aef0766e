"""The broker's plain path: publish, consume and ack of messages without keys or limits.

    .venv/bin/python benchmarks/plain_path.py [--brokers memory,sqlite,redis,postgres]
                                               [--messages 20000] [--repeat 5] [--json]

For comparing two checkouts (before and after a change to the brokers) in one run, give
each its own interpreter and alternate them, e.g.::

    for i in 1 2 3; do
        (cd ../before && .venv/bin/python benchmarks/plain_path.py --json)
        (cd ../after  && .venv/bin/python benchmarks/plain_path.py --json)
    done

Per broker and round: ``publish_many`` of ``--messages`` small frames in batches of 500,
then ``consume`` (``max_count`` 100) and ``ack`` until the queue is empty.  Figures are
microseconds of wall clock per message for each phase, the median of ``--repeat`` rounds
(the queue is deleted between rounds).  Nothing else runs in the process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stem.brokers import from_url  # noqa: E402
from stem.brokers.base import Message  # noqa: E402

URLS = {
    "memory": "memory://plain-path-bench",
    "sqlite": "sqlite:///{tmp}/plain-path.db",
    "redis": "redis://127.0.0.1:6379/0",
    "postgres": "postgresql://postgres@127.0.0.1:5432/postgres",
}
BATCH = 500
FRAME = b"x" * 200


def _round(broker, n: int) -> tuple[float, float]:
    queue = "bench-" + uuid.uuid4().hex[:8]
    messages = [Message(uuid.uuid4().hex, queue, FRAME) for _ in range(n)]
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        broker.publish_many(messages[i:i + BATCH])
    t1 = time.perf_counter()
    done = 0
    while done < n:
        got = broker.consume([queue], 100, 1.0)
        if not got:
            raise RuntimeError(f"consume came back empty after {done} of {n}")
        broker.ack(got)
        done += len(got)
    t2 = time.perf_counter()
    broker.delete_queue(queue)
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6


def measure(name: str, n: int, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"namespace": "plainbench" + uuid.uuid4().hex[:6]} if name == "redis" else {}
        broker = from_url(URLS[name].format(tmp=tmp), **kwargs)
        try:
            _round(broker, min(n, 2000))                     # warm up: scripts, statements, pages
            rounds = [_round(broker, n) for _ in range(repeat)]
        finally:
            broker.close()
    return {"publish_us": statistics.median(r[0] for r in rounds),
            "consume_ack_us": statistics.median(r[1] for r in rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="memory,sqlite,redis,postgres")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    args = parser.parse_args()
    names = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in names if b not in URLS]
    if unknown:
        parser.error(f"unknown broker(s) {unknown}; known: {', '.join(URLS)}")
    results = {name: measure(name, args.messages, args.repeat) for name in names}
    if args.json:
        print(json.dumps({"cwd": os.getcwd(), **results}))
        return
    print(f"{'broker':<10} {'publish µs/msg':>15} {'consume+ack µs/msg':>20}")
    for name, r in results.items():
        print(f"{name:<10} {r['publish_us']:>15.2f} {r['consume_ack_us']:>20.2f}")


if __name__ == "__main__":
    main()
