"""The workflow store's per-activation cost: claim + append + park, on SQLite and Postgres.

    .venv/bin/python benchmarks/wf_store.py [--runs 1000] [--steps 3] [--rounds 3] [--procs 1,2]
        [--terminal 100000] [--adapters memory,sqlite,postgres] [--postgres-url URL]

Each adapter gets a fresh store beside a fresh result backend (a SQLite file in a temporary
directory, WAL, ``synchronous=NORMAL``; a new Postgres schema).  A round creates ``runs`` runs,
then activates each ``steps`` times: one activation is what the engine writes for one step
that ends in a sleep -- ``claim`` (the CAS that bumps the epoch), ``append`` (the step's result,
fenced by that epoch), ``park`` (a timer) -- and the next activation claims the parked run.
With ``--procs N`` the runs are split between N processes, each with its own connection,
started together: activations/s is the total over the wall time.  Printed per adapter: runs
created/s, activations/s and the median and mean latency of each call (one process), the
median over rounds.  ``--terminal`` first fills the store with that many finished runs (in bulk, outside
the timing) and then times ``due`` on it: the sweeper's query must not read them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

T0 = 1_700_000_000.0


def open_backend(adapter: str, tmp: str, pg_url: str, tag: str):
    if adapter == "memory":
        from stem.backends.memory import InMemoryResultBackend
        return InMemoryResultBackend()
    if adapter == "sqlite":
        from stem.backends.sqlite import SqliteResultBackend
        return SqliteResultBackend(os.path.join(tmp, f"wf-{tag}.db"))
    from stem.backends.postgres import PostgresResultBackend
    return PostgresResultBackend(pg_url, schema=f"bench_wf_{tag}")


def reopen(backend):
    """A backend on the same file or schema, for a forked process (memory: the same object)."""
    from stem.backends.postgres import PostgresResultBackend
    from stem.backends.sqlite import SqliteResultBackend
    if isinstance(backend, SqliteResultBackend):
        return SqliteResultBackend(backend.sqlite_store.path)
    if isinstance(backend, PostgresResultBackend):
        return PostgresResultBackend(backend.url, schema=backend.schema)
    return backend


def activate(store, run_ids: list[str], steps: int, timings: dict[str, list[float]] | None) -> int:
    """``steps`` activations of each run: claim, append, park.  Returns how many ran."""
    done = 0
    clock = time.perf_counter
    for step in range(steps):
        now = T0 + step
        for run_id in run_ids:
            t0 = clock()
            rec = store.claim(run_id, "bench", now=now, lease=60.0)
            t1 = clock()
            ok = store.append(run_id, rec.epoch, step, "step", "work", output=b"\x91\xa2ok", now=now)
            t2 = clock()
            parked = store.park(run_id, rec.epoch, wake_at=now + 1, waiting=b"\x81\xa5sleep", waits_for=None,
                                inbox_seen=rec.inbox_count, now=now)
            t3 = clock()
            if not ok or parked != "parked":
                raise SystemExit(f"activation of {run_id} failed: append {ok}, park {parked}")
            if timings is not None:
                timings["claim"].append(t1 - t0)
                timings["append"].append(t2 - t1)
                timings["park"].append(t3 - t2)
            done += 1
    return done


def _child(backend, run_ids, steps, start_at, out):
    from stem.workflows.store import open_store
    store = open_store(reopen(backend))
    store.get("warm-up")
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.perf_counter()
    n = activate(store, run_ids, steps, None)
    out.put((n, t0, time.perf_counter()))


def one_round(adapter: str, args, tmp: str, procs: int) -> dict:
    from stem.workflows.store import open_store
    tag = uuid.uuid4().hex[:8]
    backend = open_backend(adapter, tmp, args.postgres_url, tag)
    store = open_store(backend)
    store.get("warm-up")
    run_ids = [f"bench-{n:06d}" for n in range(args.runs)]
    t0 = time.perf_counter()
    for run_id in run_ids:
        store.create(run_id, "bench.flow", "1", b"\x81\xa5input\x01", now=T0)
    created = args.runs / (time.perf_counter() - t0)
    timings: dict[str, list[float]] = {"claim": [], "append": [], "park": []}
    if procs == 1 or adapter == "memory":
        t0 = time.perf_counter()
        n = activate(store, run_ids, args.steps, timings)
        rate = n / (time.perf_counter() - t0)
    else:
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        start_at = time.time() + 0.5
        children = [ctx.Process(target=_child, args=(backend, run_ids[k::procs], args.steps, start_at, out))
                    for k in range(procs)]
        for c in children:
            c.start()
        got = [out.get(timeout=600) for _ in children]
        for c in children:
            c.join(60)
        rate = sum(n for n, _, _ in got) / (max(e for _, _, e in got) - min(s for _, s, _ in got))
    result = {"create/s": created, "activations/s": rate,
              **{f"{k} us": statistics.median(v) * 1e6 for k, v in timings.items() if v},
              **{f"{k} mean us": statistics.fmean(v) * 1e6 for k, v in timings.items() if v}}
    if args.terminal and procs == 1:
        result["due ms"] = due_with_terminal(adapter, backend, store, args.terminal)
    drop(adapter, backend)
    return result


def due_with_terminal(adapter: str, backend, store, n: int) -> float:
    """Fill in ``n`` finished runs (bulk SQL; memory: the store's API), then time ``due``."""
    if adapter == "sqlite":
        with backend.sqlite_store.write() as conn:
            conn.execute("WITH RECURSIVE g(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM g WHERE k < ?) "
                         "INSERT INTO stem_wf_runs (id, name, version, input, status, epoch, created_at, updated_at) "
                         "SELECT 'done-' || k, 'n', '1', x'', 'SUCCEEDED', 1, 0, 0 FROM g", (n,))
    elif adapter == "postgres":
        backend.pg_store.durable.run(lambda conn: conn.execute(
            f'INSERT INTO "{backend.schema}".stem_wf_runs (id, name, version, input, status, epoch, created_at, '
            "updated_at) SELECT 'done-' || g, 'n', '1', '', 'SUCCEEDED', 1, 0, 0 FROM generate_series(1, %s) g",
            (n,)))
        backend.pg_store.durable.run(lambda conn: conn.execute(f'ANALYZE "{backend.schema}".stem_wf_runs'))
    else:
        for k in range(n):
            store.create(f"done-{k}", "n", "1", b"", now=T0)
            rec = store.claim(f"done-{k}", "b", now=T0, lease=1.0)
            store.finish(f"done-{k}", rec.epoch, "SUCCEEDED", now=T0)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        store.due(now=T0 + 1e6, limit=500)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def drop(adapter: str, backend) -> None:
    if adapter == "postgres":
        schema = backend.schema
        backend.pg_store.durable.run(lambda conn: conn.execute(f'DROP SCHEMA "{schema}" CASCADE'))
    backend.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--procs", default="1", help="comma-separated process counts, e.g. 1,2")
    p.add_argument("--terminal", type=int, default=0)
    p.add_argument("--adapters", default="memory,sqlite,postgres")
    p.add_argument("--postgres-url", default=os.environ.get("STEM_TEST_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = p.parse_args(argv)
    procs_list = [int(x) for x in args.procs.split(",")]
    print(f"runs={args.runs} steps={args.steps} rounds={args.rounds} load={os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        for adapter in args.adapters.split(","):
            for procs in procs_list:
                if procs > 1 and adapter == "memory":
                    continue
                rounds = [one_round(adapter, args, tmp, procs) for _ in range(args.rounds)]
                keys = list(rounds[0])
                medians = {k: statistics.median(r[k] for r in rounds if k in r) for k in keys}
                cells = ", ".join(f"{k} {v:,.0f}" if v >= 100 else f"{k} {v:.2f}" for k, v in medians.items())
                print(f"{adapter:8} procs={procs}: {cells}")
    print(f"load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
