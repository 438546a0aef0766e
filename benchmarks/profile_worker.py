"""Profile the stem worker's hot path on Redis with py-spy.

    .venv/bin/python benchmarks/profile_worker.py --tasks 30000            # fill, profile, summarize
    .venv/bin/python benchmarks/profile_worker.py --summarize /tmp/x.txt   # summarize a raw profile
    .venv/bin/python benchmarks/profile_worker.py --cpu-split --prefetch-multiplier 16   # no sampler: CPU per thread

Fills a fresh namespace with ``--tasks`` signed ``bench.incr`` tasks (no
profiler), then runs one worker (process engine, ``--concurrency`` children,
results stored) in burst mode under ``py-spy record --subprocesses -f raw``
(idle samples dropped, as py-spy does by default; add ``--gil`` to sample
only the thread holding the GIL), and prints for the
supervisor and for the children: the share of samples per leaf function
(self time) and per function anywhere on the stack (inclusive time).
The namespace is deleted afterwards.

``--cpu-split`` runs the same burst without a profiler, in this process, and
prints CPU µs per task of the supervisor (and of each of its threads, read
with psutil while it runs), of each child and of redis-server, the mean
settle batch and consume batch, and Redis's ``INFO commandstats`` for the
run (reset first: use a private server, ``--redis-url``, for clean counts).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import drop_keys  # noqa: E402

REDIS_URL = os.environ.get("STEM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def _parts(ns: str):
    from e2e import SIGNING_KEY, make_registry
    from stem import PayloadSigner
    from stem.backends.redis import RedisResultBackend
    from stem.brokers.redis import RedisBroker
    broker = RedisBroker(REDIS_URL, namespace=ns)
    backend = RedisResultBackend(REDIS_URL, namespace=ns)
    return broker, backend, make_registry(REDIS_URL, ns + ":side"), PayloadSigner(SIGNING_KEY)


def fill(ns: str, tasks: int) -> None:
    from stem import Stem
    broker, backend, registry, signer = _parts(ns)
    producer = Stem(broker, backend, registry, signer)
    items = [("bench.incr", {})] * 500
    for i in range(0, tasks, 500):
        producer.enqueue_many(items[:min(500, tasks - i)])
    producer.close()


def work(ns: str, concurrency: int, prefetch: int | None) -> None:
    from stem import Worker, WorkerLifecycleConfig
    broker, backend, registry, signer = _parts(ns)
    kw = {} if prefetch is None else {"prefetch_multiplier": prefetch}
    worker = Worker(broker, backend, registry, queues=["bench"], concurrency=concurrency, signer=signer,
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False), **kw)
    t0 = time.time()
    worker.start(burst=True)
    s = worker.stats()
    print(f"processed {s['processed']} in {time.time() - t0:.1f}s", file=sys.stderr)


def cpu_split(ns: str, tasks: int, concurrency: int, prefetch: int | None) -> str:
    """CPU per task by process and supervisor thread, batch sizes and Redis command stats."""
    import threading
    import psutil
    import redis
    from stem import Worker, WorkerLifecycleConfig
    broker, backend, registry, signer = _parts(ns)
    kw = {} if prefetch is None else {"prefetch_multiplier": prefetch}
    worker = Worker(broker, backend, registry, queues=["bench"], concurrency=concurrency, signer=signer,
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False), **kw)
    settles: list[int] = []
    consumes: list[int] = []
    settle, consume = worker._settler.settle, broker.consume
    worker._settler.settle = lambda batch: (settles.append(len(batch)), settle(batch))[1]
    broker.consume = lambda *a, **k: (lambda got: (consumes.append(len(got)), got)[1])(consume(*a, **k))
    offers: dict[str, int] = {}

    def on_stopping(sender, **kw) -> None:   # the pool's counters, before it stops
        offers.update((k, v) for k, v in worker._engine.info().items() if k.startswith("offers"))

    from stem import signals
    signals.worker_stopping.connect(on_stopping)
    r = redis.Redis.from_url(REDIS_URL)
    r.config_resetstat()
    server = psutil.Process(r.info("server")["process_id"])
    me = psutil.Process()
    threads0 = {t.id: t.user_time + t.system_time for t in me.threads()}
    threads: dict[int, float] = {}
    names: dict[int, str] = {}
    children: dict[int, float] = {}
    children_sys: dict[int, float] = {}
    switches0 = {t.id: _thread_switches(t.id) for t in me.threads()}
    switches: dict[int, int] = {}   # voluntary context switches (sleeps) per thread / child

    def sample() -> None:   # threads and children are gone once the worker stops: read them while it runs
        while not worker._stopped.is_set():
            for t in me.threads():
                threads[t.id] = t.user_time + t.system_time
                switches[t.id] = _thread_switches(t.id)
            for t in threading.enumerate():
                names[t.native_id] = t.name
            for c in me.children(recursive=True):
                try:
                    ct = c.cpu_times()
                    children[c.pid] = ct.user + ct.system
                    children_sys[c.pid] = ct.system
                    switches[c.pid] = c.num_ctx_switches().voluntary
                except psutil.Error:
                    pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, name="sampler", daemon=True)
    rsw0 = server.num_ctx_switches().voluntary
    cpu0, rcpu0, t0 = me.cpu_times(), server.cpu_times(), time.time()
    sampler.start()
    worker.start(burst=True)
    dt = time.time() - t0
    cpu1, rcpu1 = me.cpu_times(), server.cpu_times()
    rsw1 = server.num_ctx_switches().voluntary
    per = 1e6 / tasks
    out = [f"{tasks / dt:,.0f} tasks/s (burst, {concurrency} children, prefetch x{worker.prefetch_multiplier})",
           f"supervisor process {(cpu1.user + cpu1.system - cpu0.user - cpu0.system) * per:.0f} µs/task "
           f"({(cpu1.system - cpu0.system) * per:.0f} in the kernel; includes the sampler thread below)"]
    for tid, v in sorted(threads.items(), key=lambda kv: -kv[1]):
        v -= threads0.get(tid, 0.0)
        if v * per >= 1:
            out.append(f"  thread {names.get(tid, tid)}: {v * per:.0f} µs/task, "
                       f"{(switches.get(tid, 0) - switches0.get(tid, 0)) / tasks:.2f} sleeps/task")
    for pid, v in sorted(children.items(), key=lambda kv: -kv[1]):
        out.append(f"  child/zygote {pid}: {v * per:.0f} µs/task ({children_sys.get(pid, 0.0) * per:.0f} in the kernel), "
                   f"{switches.get(pid, 0) / tasks:.2f} sleeps/task")
    out.append(f"redis-server {(rcpu1.user + rcpu1.system - rcpu0.user - rcpu0.system) * per:.0f} µs/task "
               f"({(rcpu1.system - rcpu0.system) * per:.0f} in the kernel), "
               f"{(rsw1 - rsw0) / tasks:.2f} sleeps/task")
    out.append(f"settle calls {len(settles)}, mean batch {sum(settles) / max(1, len(settles)):.1f}; "
               f"consume calls {len(consumes)}, mean batch {sum(consumes) / max(1, len(consumes)):.1f}")
    if offers:
        out.append(f"offers made {offers.get('offers_made', 0)}, taken back {offers.get('offers_withdrawn', 0)}"
                   + ("" if offers.get("offers") else " (offers off)"))
    signals.worker_stopping.disconnect(on_stopping)
    out.append("redis commandstats (µs of server time per task): " + ", ".join(
        f"{k.removeprefix('cmdstat_')} {v['usec'] / tasks:.2f}"
        for k, v in sorted(r.info("commandstats").items(), key=lambda kv: -kv[1]["usec"])[:8]))
    r.close()
    return "\n".join(out)


def _thread_switches(tid: int) -> int:
    """Voluntary context switches of one of this process's threads (each is a sleep and a wake-up)."""
    try:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def summarize(path: str, top: int = 25) -> str:
    """Self and inclusive shares per role (supervisor / child) from a py-spy raw (collapsed) file."""
    self_t: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    pids_seen: dict[str, set] = collections.defaultdict(set)
    for line in open(path):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        n = int(n)
        frames = stack.split(";")
        m = re.match(r"process (\d+):", frames[0])
        pid = m.group(1) if m else "?"
        body = frames[1:] if m else frames
        text = ";".join(body)
        if "child_main (" in text:
            role = "child"
        elif "Zygote._serve (" in text:
            role = "zygote"
        else:
            role = "supervisor"
        pids_seen[role].add(pid)
        totals[role] += n
        names = [re.sub(r" \((?:[^()]*/)?([^/()]+:\d+)\)$", r" (\1)", f) for f in body]
        names = [re.sub(r":\d+\)$", ")", f) for f in names]
        if names:
            self_t[role][names[-1]] += n
        for f in set(names):
            incl[role][f] += n
    out = []
    for role in ("supervisor", "child", "zygote"):
        if not totals[role]:
            continue
        out.append(f"== {role} ({len(pids_seen[role])} process(es)), {totals[role]} samples")
        out.append("   self%  function (file)")
        for f, n in self_t[role].most_common(top):
            out.append(f"  {100 * n / totals[role]:5.1f}  {f}")
        out.append("   incl%  function (file)")
        for f, n in incl[role].most_common(top):
            out.append(f"  {100 * n / totals[role]:5.1f}  {f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=30_000)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--prefetch-multiplier", type=int, default=None)
    p.add_argument("--gil", action="store_true", help="py-spy --gil: only the thread holding the GIL")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--output", default=None, help="keep the raw profile here")
    p.add_argument("--summarize", metavar="RAW", help="only summarize an existing raw profile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--redis-url", default=None, help="default: $STEM_BENCH_REDIS_URL or redis://127.0.0.1:6379/0")
    p.add_argument("--cpu-split", action="store_true", help="no profiler: CPU per thread/process, batch sizes")
    p.add_argument("--work", metavar="NAMESPACE", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.redis_url:
        os.environ["STEM_BENCH_REDIS_URL"] = ns.redis_url   # the --work process reads it too
        global REDIS_URL
        REDIS_URL = ns.redis_url
    if ns.summarize:
        print(summarize(ns.summarize, ns.top))
        return 0
    if ns.work:
        work(ns.work, ns.concurrency, ns.prefetch_multiplier)
        return 0
    if ns.cpu_split:
        import redis
        namespace = f"stembench-split-{uuid.uuid4().hex[:8]}"
        r = redis.Redis.from_url(REDIS_URL)
        try:
            fill(namespace, ns.tasks)
            print(cpu_split(namespace, ns.tasks, ns.concurrency, ns.prefetch_multiplier))
        finally:
            drop_keys(r, namespace + "*")
        return 0
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        p.error("py-spy is not installed: .venv/bin/pip install py-spy")
    namespace = f"stembench-prof-{uuid.uuid4().hex[:8]}"
    raw = ns.output or tempfile.mktemp(prefix="stem-profile-", suffix=".txt")
    import redis
    r = redis.Redis.from_url(REDIS_URL)
    try:
        fill(namespace, ns.tasks)
        argv = [pyspy, "record", "--subprocesses", "-f", "raw", "-r", str(ns.rate), "-o", raw]
        if ns.gil:
            argv.append("--gil")
        work_argv = [sys.executable, os.path.abspath(__file__), "--redis-url", REDIS_URL, "--work", namespace,
                     "--concurrency", str(ns.concurrency)]
        if ns.prefetch_multiplier:
            work_argv += ["--prefetch-multiplier", str(ns.prefetch_multiplier)]
        subprocess.run(argv + ["--"] + work_argv, check=True)
    finally:
        drop_keys(r, namespace + "*")
    print(f"raw profile: {raw}")
    print(summarize(raw, ns.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
