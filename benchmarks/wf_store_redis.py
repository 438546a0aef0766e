"""The workflow store on Redis: one activation's store calls (claim + append + park), per second.

    .venv/bin/python benchmarks/wf_store_redis.py [--runs 2000] [--repeat 3] [--steps 1] [--json]
        [--targets single,aof,cluster]

Starts its own servers on free ports (``tests.support``), none shared with anything else:

* ``single``: one redis-server without persistence;
* ``aof``: one redis-server with ``appendonly yes`` and ``appendfsync always`` (every write
  on disk before its reply: what "a killed server loses nothing" costs);
* ``cluster``: a Redis Cluster of three primaries without persistence.

Each round creates ``--runs`` runs (not timed), then, one thread, one store, for each run in
turn: ``claim`` + ``--steps`` × ``append`` + ``park`` on a timer, i.e. one activation of a
workflow that ran ``--steps`` new steps and went to sleep.  The figures are store calls per
second and activations per second (wall clock, median of ``--repeat`` rounds), and the time
of one ``due`` call (limit 500) over the parked runs once their timers are due: the
sweeper's read of 64 shards.
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

from stem.workflows.store_redis import RedisWorkflowStore  # noqa: E402
from tests.support import ClusterSetup, RedisServer, drop_namespace, raw_client  # noqa: E402

T0 = 1_700_000_000.0


def one_round(url: str, runs: int, steps: int) -> tuple[float, float, float]:
    """(store calls/s, activations/s, ms of one due call) of one round on ``url``."""
    namespace = "benchwf_" + uuid.uuid4().hex[:8]
    store = RedisWorkflowStore.from_url(url, namespace=namespace)
    try:
        ids = [f"order-{i}" for i in range(runs)]
        for rid in ids:
            store.create(rid, "order.fulfil", "1", b"\x81\xa2id\x01", now=T0)
        output = b"\x82\xa6charge\xa5ch_42\xa5cents\xcd\x03\xe7"
        start = time.perf_counter()
        for rid in ids:
            run = store.claim(rid, "worker-1", now=T0 + 1, lease=30.0)
            assert run is not None
            for pos in range(steps):
                assert store.append(rid, run.epoch, pos, "step", f"charge{pos}", output=output, now=T0 + 1)
            assert store.park(rid, run.epoch, wake_at=T0 + 100, waiting=None, waits_for=None,
                              inbox_seen=0, now=T0 + 1) == "parked"
        elapsed = time.perf_counter() - start
        t = time.perf_counter()
        due = store.due(now=T0 + 200, limit=500)
        due_ms = (time.perf_counter() - t) * 1000
        assert len(due) == min(500, runs)
        return runs * (steps + 2) / elapsed, runs / elapsed, due_ms
    finally:
        store.close()
        client = raw_client(url)
        try:
            drop_namespace(client, namespace)
        finally:
            client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=1, help="appends per activation")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--targets", default="single,aof,cluster")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    wanted = args.targets.split(",")
    tmp = tempfile.mkdtemp(prefix="stem-wf-bench-")
    servers: dict = {}
    results: dict = {}
    try:
        if "single" in wanted:
            servers["single"] = RedisServer(os.path.join(tmp, "single"), args=["--appendonly", "no"])
        if "aof" in wanted:
            servers["aof"] = RedisServer(os.path.join(tmp, "aof"))    # appendonly yes, appendfsync always
        for server in servers.values():
            os.makedirs(server.dir, exist_ok=True)
            server.start()
        targets = {name: server.url for name, server in servers.items()}
        if "cluster" in wanted:
            servers["cluster"] = ClusterSetup(os.path.join(tmp, "cluster"), masters=3, replicas=0).start()
            targets["cluster"] = servers["cluster"].url()
        for name, url in targets.items():
            rounds = [one_round(url, args.runs, args.steps) for _ in range(args.repeat)]
            results[name] = {"calls_per_s": statistics.median(r[0] for r in rounds),
                             "activations_per_s": statistics.median(r[1] for r in rounds),
                             "due_ms": statistics.median(r[2] for r in rounds),
                             "rounds_calls_per_s": [round(r[0]) for r in rounds]}
            if not args.json:
                r = results[name]
                print(f"{name:8} claim+{args.steps}xappend+park: {r['calls_per_s']:>8,.0f} calls/s "
                      f"{r['activations_per_s']:>8,.0f} activations/s   due(500): {r['due_ms']:.1f} ms   "
                      f"(rounds {r['rounds_calls_per_s']})", flush=True)
    finally:
        for server in servers.values():
            if isinstance(server, ClusterSetup):
                server.stop()
            else:
                server.kill()
    if args.json:
        print(json.dumps({"runs": args.runs, "steps": args.steps, "results": results}))


if __name__ == "__main__":
    main()
