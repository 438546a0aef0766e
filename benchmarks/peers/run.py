"""stem against the queues its users would otherwise pick, on the same local Redis, in one run.

    make bench-peers                                   # installs .[bench], then runs this
    .venv/bin/python benchmarks/peers/run.py --tasks 10000 --repeat 3
    .venv/bin/python benchmarks/peers/run.py --systems stem,bare,huey --json

The workload (identical for every system): a no-op task that does one Redis
``INCR`` of a counter, so completion is observed in Redis, not inferred.  For
each system, in a fresh driver process:

1. its worker starts as a subprocess (``<app>.worker_argv``): one worker with
   ``--concurrency`` processes where the system has a pool (stem, Celery,
   Dramatiq, Huey, RQ's worker-pool), else that many separate worker
   processes (arq, the bare loop);
2. warm-up: ``--warmup`` tasks, waited for (the worker is up and connected);
3. measured, end to end with producer and worker live together: a producer
   thread in the driver enqueues ``--tasks`` tasks while the worker runs them,
   with the system's fastest client API (``--producer batch``, the default:
   batches where the system has them) or with its ordinary single-task call,
   one task at a time, as a service enqueues (``--producer single``: each
   app's ``produce_single``); the clock runs from the first
   enqueue until the counter shows every task done.  CPU over the same
   window: the worker tree (psutil: every process of the worker and its
   descendants, reaped children included), the producer thread
   (``thread_time``), redis-server (psutil on its pid);
4. the worker gets SIGTERM (then SIGKILL of its process group after 30 s) and
   every key in the system's Redis db is deleted.

Each system has its own Redis db (``DBS``), which must be empty when it
starts.  Settings per system: the ``SETTINGS`` string of each app module,
printed beside the figures.  Systems run in a rotated order in each repeat,
so drift of the machine's load does not favour one of them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # benchmarks/_measure.py
sys.path.insert(0, HERE)

from _measure import machine_probe_ms, source_revision  # noqa: E402

# system -> (app module, Redis db)
SYSTEMS: dict[str, tuple[str, int]] = {
    "stem": ("stem_app", 15),
    "bare": ("bare", 14),
    "huey": ("huey_app", 13),
    "dramatiq": ("dramatiq_app", 10),
    "arq": ("arq_app", 12),
    "rq": ("rq_app", 11),
    "celery": ("celery_app", 9),
}
NEEDS = {"celery": "celery", "dramatiq": "dramatiq", "rq": "rq", "arq": "arq", "huey": "huey"}
#: ``--stem-baseline DIR``: stem's app on another checkout of stem (its driver and worker import
#: stem from DIR), for a before/after from one run; not in the default list.
BASELINE = "stem-base"
BASELINE_ENTRY = ("stem_app", 8)
DEFAULT_SYSTEMS = list(SYSTEMS)


# -- the driver: one system, in its own process -------------------------------------------------------

def drive(system: str, base_url: str, tasks: int, concurrency: int, warmup: int, timeout: float,
          producer_mode: str = "batch", monitor: bool = False, rate: float = 0.0) -> dict[str, Any]:
    import psutil
    import redis
    from _measure import TreeMeter, redis_server_pid, steady_rate

    module, db = SYSTEMS[system] if system != BASELINE else BASELINE_ENTRY
    pythonpath = [HERE]
    if system == BASELINE:
        checkout = os.environ["STEM_BENCH_BASELINE"]
        sys.path.insert(0, checkout)
        pythonpath.insert(0, checkout)
    url = f"{base_url.rstrip('/')}/{db}"
    os.environ["BENCH_REDIS_URL"] = url
    os.environ["BENCH_PYTHON"] = sys.executable
    r = redis.Redis.from_url(url)
    if r.dbsize():
        raise SystemExit(f"Redis db {db} (for {system}) is not empty ({r.dbsize()} keys); "
                         f"the benchmark deletes every key of it afterwards, so it must start empty")
    app = importlib.import_module(module)
    produce = app.produce_single if producer_mode == "single" else app.produce
    if rate:   # one task at a time, paced: the worker settles them as they come
        def produce(n: int, one=app.produce_single) -> None:
            start = time.monotonic()
            for i in range(n):
                one(1)
                ahead = start + (i + 1) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
    from _common import COUNTER
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (*pythonpath, os.environ.get("PYTHONPATH")) if p))
    separate = getattr(app, "PROCESSES_ARE_SEPARATE", False)
    argvs = ([app.worker_argv(1)] * getattr(app, "PROCESSES", concurrency) if separate
             else [app.worker_argv(concurrency)])
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{system}-", suffix=".log", delete=False)
    procs = [subprocess.Popen(a, cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                              start_new_session=True) for a in argvs]
    redis_pid = redis_server_pid(r)

    def count() -> int:
        return int(r.get(COUNTER) or 0)

    def wait_count(target: int, limit: float, samples: list | None = None) -> float:
        deadline = time.monotonic() + limit
        while True:
            n, t = count(), time.time()
            if samples is not None:
                samples.append((t, n))
            if n >= target:
                return t
            if time.monotonic() > deadline:
                raise TimeoutError(f"{system}: {n} of {target} tasks done after {limit}s")
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{system}: a worker process exited with {p.returncode}")
            time.sleep(0.005)

    try:
        app.produce(warmup)
        wait_count(warmup, 120.0)
        time.sleep(0.2)
        c0 = count()
        meters = [TreeMeter(p.pid) for p in procs]
        box: dict[str, Any] = {}

        def producer() -> None:
            try:
                t = time.thread_time()
                produce(tasks)
                box["cpu"] = time.thread_time() - t
                box["t"] = time.time()
            except BaseException as exc:  # noqa: BLE001
                box["error"] = exc

        cpu0 = sum(m.cpu() for m in meters)
        rc0 = psutil.Process(redis_pid).cpu_times() if redis_pid else None
        stats0 = r.info("commandstats")   # commands per task: INFO commandstats over the window
        watcher = _Monitor(url) if monitor else None
        th = threading.Thread(target=producer, name="producer")
        samples: list[tuple[float, int]] = []
        t0 = time.time()
        th.start()
        t_done = wait_count(c0 + tasks, timeout, samples)
        cpu = sum(m.cpu() for m in meters) - cpu0
        rc1 = psutil.Process(redis_pid).cpu_times() if redis_pid else None
        commands = _commands(stats0, r.info("commandstats"), polls=len(samples))
        top_level = watcher.stop(polls=len(samples)) if watcher is not None else None
        th.join()
        if "error" in box:
            raise box["error"]
        rss = [sum(m.rss()[0] + sum(m.rss()[1]) for m in meters)]
        time.sleep(0.3)
        extra = count() - (c0 + tasks)
        rel = [(t, n - c0) for t, n in samples]
        return {
            "system": system, "settings": re.sub(r"\bN\b", str(concurrency), app.SETTINGS), "tasks": tasks,
            "per_s": tasks / (t_done - t0), "steady_per_s": steady_rate(rel, tasks),
            "worker_cpu_us": cpu / tasks * 1e6, "producer_cpu_us": box["cpu"] / tasks * 1e6,
            "producer_s": box["t"] - t0,
            "redis_cpu_us": ((rc1.user + rc1.system - rc0.user - rc0.system) / tasks * 1e6) if rc0 else None,
            "worker_rss_mib": rss[0] / 2 ** 20, "extra_runs": extra, "load_avg": os.getloadavg()[0],
            "redis_commands_per_task": sum(commands.values()) / tasks,
            "redis_commands": {k: round(v / tasks, 3) for k, v in sorted(commands.items(), key=lambda kv: -kv[1])},
            **({} if top_level is None else {
                "client_commands_per_task": sum(top_level.values()) / tasks,
                "client_commands": {k: round(v / tasks, 3)
                                    for k, v in sorted(top_level.items(), key=lambda kv: -kv[1])}}),
        }
    except BaseException:
        log.flush()
        log.seek(0)
        sys.stderr.write(f"--- {system} worker log ---\n{log.read()[-4000:]}\n")
        raise
    finally:
        _stop(procs)
        keys = list(r.scan_iter(count=1000))
        for i in range(0, len(keys), 1000):
            r.unlink(*keys[i:i + 1000])
        log.close()
        os.unlink(log.name)


class _Monitor:
    """``--monitor``: the commands clients send (MONITOR lines not from a script), by name,
    over the measured window.  MONITOR costs the server CPU: its runs' CPU figures are not
    comparable with runs without it."""

    def __init__(self, url: str):
        import redis
        self.calls: dict[str, int] = {}
        self.client = redis.Redis.from_url(url)
        self.mon = self.client.monitor()
        self.mon.__enter__()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = self.mon.connection
        while not self.stopping.is_set():
            try:
                if not conn.can_read(timeout=0.2):
                    continue
                line = conn.read_response()
            except Exception:   # noqa: BLE001 - the connection closed at stop
                return
            text = line.decode(errors="replace") if isinstance(line, bytes) else str(line)
            if "[" not in text or " lua]" in text:
                continue
            name = text.split("] ", 1)[1].split(" ", 1)[0].strip('"').lower()
            self.calls[name] = self.calls.get(name, 0) + 1

    def stop(self, polls: int) -> dict[str, int]:
        self.stopping.set()
        self.thread.join(5)
        try:
            self.mon.__exit__(None, None, None)
        except Exception:   # noqa: BLE001
            pass
        self.client.close()
        calls = dict(self.calls)
        calls["get"] = calls.get("get", 0) - polls
        calls["info"] = calls.get("info", 0) - 1
        return {k: v for k, v in calls.items() if v > 0}


def _commands(before: dict[str, Any], after: dict[str, Any], polls: int) -> dict[str, int]:
    """Calls per command between two INFO commandstats, less the driver's own (its counter
    polls: one GET each, and the second INFO).  Server-wide: meaningful on a Redis of the
    benchmark alone (``--redis-url``); nothing is reset, so a shared server is left as it was."""
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) - int(before.get(name, {}).get("calls", 0))
             for name, v in after.items()}
    calls["get"] = calls.get("get", 0) - polls
    calls["info"] = calls.get("info", 0) - 1
    return {k: v for k, v in calls.items() if v > 0}


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:   # each worker leads its own session: take down whatever it left behind
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()


# -- the runner ---------------------------------------------------------------------------------------

def run(systems: list[str], *, base_url: str, tasks: int, concurrency: int, warmup: int, repeat: int,
        timeout: float, progress: bool = True, producer_mode: str = "batch", monitor: bool = False,
        rate: float = 0.0) -> dict[str, Any]:
    """Every system ``repeat`` times (rotated order); returns runs and per-system medians."""
    runs: list[dict[str, Any]] = []
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        bar = Progress(TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=Console(stderr=True))
        bar.start()
        overall = bar.add_task("peers", total=len(systems) * repeat)
    try:
        for rep in range(repeat):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            for system in order:
                if bar is not None:
                    bar.update(overall, description=f"run {rep + 1}/{repeat}: {system}")
                probe_ms = machine_probe_ms()
                argv = [sys.executable, os.path.abspath(__file__), "--drive", system, "--redis-url", base_url,
                        "--tasks", str(tasks), "--concurrency", str(concurrency), "--warmup", str(warmup),
                        "--timeout", str(timeout), "--producer", producer_mode, "--rate", str(rate)] + (
                            ["--monitor"] if monitor else [])
                out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 300)
                if out.returncode != 0:
                    sys.stderr.write(out.stderr[-6000:])
                    runs.append({"system": system, "error": (out.stderr.strip().splitlines() or ["?"])[-1],
                                 "repeat": rep})
                else:
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    res["repeat"] = rep
                    res["probe_ms"] = probe_ms
                    runs.append(res)
                if bar is not None:
                    bar.advance(overall)
    finally:
        if bar is not None:
            bar.stop()
    return {"config": {"tasks": tasks, "concurrency": concurrency, "warmup": warmup, "repeat": repeat,
                       "producer": producer_mode, "rate": rate, "monitor": monitor,
                       "redis_url": base_url, "cpus": os.cpu_count(), "stem_revision": source_revision()},
            "runs": runs, "summary": summarize(systems, runs)}


def summarize(systems: list[str], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def med(system: str, key: str) -> float | None:
        vals = [r[key] for r in runs if r["system"] == system and r.get(key) is not None]
        return statistics.median(vals) if vals else None

    stem_rate, stem_cpu = med("stem", "per_s"), med("stem", "worker_cpu_us")
    rows = []
    for s in systems:
        ok = [r for r in runs if r["system"] == s and "error" not in r]
        row = {"system": s, "settings": ok[0]["settings"] if ok else None,
               "per_s": med(s, "per_s"), "per_s_runs": [r["per_s"] for r in ok],
               "steady_per_s": med(s, "steady_per_s"), "worker_cpu_us": med(s, "worker_cpu_us"),
               "producer_cpu_us": med(s, "producer_cpu_us"), "redis_cpu_us": med(s, "redis_cpu_us"),
               "redis_commands_per_task": med(s, "redis_commands_per_task"),
               "client_commands_per_task": med(s, "client_commands_per_task"),
               "client_commands": ok[0].get("client_commands") if ok else None,
               "redis_commands": ok[0].get("redis_commands") if ok else None,
               "extra_runs": max((r["extra_runs"] for r in ok), default=None),
               "errors": [r["error"] for r in runs if r["system"] == s and "error" in r]}
        parts = [row["worker_cpu_us"], row["producer_cpu_us"], row["redis_cpu_us"]]
        row["total_cpu_us"] = sum(parts) if None not in parts else None   # type: ignore[arg-type]
        row["stem_speedup"] = stem_rate / row["per_s"] if stem_rate and row["per_s"] else None
        row["cpu_vs_stem"] = row["worker_cpu_us"] / stem_cpu if stem_cpu and row["worker_cpu_us"] else None
        row["paired_speedup"] = paired(runs, s, "per_s", stem_over_it=True)
        row["paired_cpu_vs_stem"] = paired(runs, s, "worker_cpu_us", stem_over_it=False)
        row["probe_ms"] = [r.get("probe_ms") for r in ok]
        rows.append(row)
    return rows


def paired(runs: list[dict[str, Any]], system: str, key: str, *, stem_over_it: bool) -> float | None:
    """The median over repeats of the ratio between stem's run and ``system``'s run of the
    same repeat (stem's / its, or its / stem's): runs of one repeat are minutes apart, not
    the whole benchmark, so a drift of the machine's speed cancels out more of the ratio."""
    by_rep: dict[int, dict[str, float]] = {}
    for r in runs:
        if "error" not in r and r.get(key) and r["system"] in ("stem", system):
            by_rep.setdefault(r["repeat"], {})[r["system"]] = r[key]
    ratios = [(v["stem"] / v[system] if stem_over_it else v[system] / v["stem"])
              for v in by_rep.values() if "stem" in v and system in v]
    return statistics.median(ratios) if ratios else None


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    c = result["config"]
    mode = "one enqueue per task" if c.get("producer") == "single" else "batched enqueues"
    t = Table(title=f"Live end to end ({mode}): {c['tasks']:,} no-op tasks with one Redis INCR, {c['concurrency']} worker "
                    f"processes, {c['cpus']} CPUs, median of {c['repeat']} run(s), stem rev {c.get('stem_revision')}",
              title_justify="left")
    for col in ("system", "tasks/s", "each run", "steady", "worker CPU µs/task", "producer µs/task",
                "redis µs/task", "total CPU µs/task", "redis cmds/task", "stem's tasks/s / its (per repeat)",
                "its CPU / stem's (per repeat)"):
        t.add_column(col, justify="left" if col in ("system", "each run") else "right")

    def f(v, d=0):
        return "-" if v is None else f"{v:,.{d}f}"

    def ratio(v, per_repeat):
        if v is None:
            return "-"
        return f"{v:.2f}x" + ("" if per_repeat is None or c["repeat"] < 2 else f" ({per_repeat:.2f}x)")

    for row in result["summary"]:
        t.add_row(row["system"], f(row["per_s"]), " ".join(f"{x:,.0f}" for x in row["per_s_runs"]) or "-",
                  f(row["steady_per_s"]), f(row["worker_cpu_us"]), f(row["producer_cpu_us"]), f(row["redis_cpu_us"]),
                  f(row.get("total_cpu_us")), f(row.get("redis_commands_per_task"), 2),
                  ratio(row["stem_speedup"], row.get("paired_speedup")),
                  ratio(row["cpu_vs_stem"], row.get("paired_cpu_vs_stem")))
    console = Console(width=max(Console().width, 140))
    console.print(t)
    probes = [p for row in result["summary"] for p in row.get("probe_ms") or [] if p is not None]
    if probes:
        console.print(f"  Ratios: of the medians, and in brackets the median of the ratios within each repeat. "
                      f"Machine probe before each run (ms for a fixed Python loop; higher is a slower machine): "
                      f"{min(probes):.0f}-{max(probes):.0f}", highlight=False)
    for row in result["summary"]:
        cmds = row.get("redis_commands") or {}
        if cmds:
            console.print(f"  {row['system']} Redis commands per task, script calls included (first run): "
                          + ", ".join(f"{k} {v:g}" for k, v in list(cmds.items())[:8]), highlight=False)
        sent = row.get("client_commands") or {}
        if sent:
            console.print(f"  {row['system']} commands sent per task ({row['client_commands_per_task']:.2f}; MONITOR): "
                          + ", ".join(f"{k} {v:g}" for k, v in list(sent.items())[:8]), highlight=False)
    for row in result["summary"]:
        console.print(f"  {row['system']}: {row['settings'] or '-'}"
                      + (f"  ERRORS: {row['errors']}" if row["errors"] else "")
                      + (f"  ({row['extra_runs']} tasks ran more than once)" if row["extra_runs"] else ""),
                      highlight=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="peers/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma-separated, from: " + ", ".join(SYSTEMS) + f" (and {BASELINE} with --stem-baseline)")
    p.add_argument("--stem-baseline", metavar="DIR",
                   help=f"a built checkout of stem, run as system {BASELINE} beside this one (before/after), in "
                        f"db {BASELINE_ENTRY[1]}: give a --redis-url of the benchmark's own")
    p.add_argument("--rate", type=float, default=0.0,
                   help="tasks/s: one enqueue at a time, paced (the live path with tasks arriving one by one)")
    p.add_argument("--monitor", action="store_true",
                   help="count the commands clients send (MONITOR; inflates Redis CPU: compare counts, not CPU)")
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per system and run")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="host and port; each system uses its own db")
    p.add_argument("--producer", choices=("batch", "single"), default="batch",
                   help="batch: each system's fastest enqueue API; single: one ordinary enqueue call per task")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--show", metavar="JSON", help="print the table of a result saved with --json")
    p.add_argument("--drive", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.show:
        with open(ns.show) as f:
            result = json.load(f)
        # summarized again: a file saved by an older run.py gets the newer columns
        result["summary"] = summarize([row["system"] for row in result["summary"]], result["runs"])
        print_table(result)
        return 0
    if ns.drive:
        res = drive(ns.drive, ns.redis_url, ns.tasks, ns.concurrency, ns.warmup, ns.timeout, ns.producer,
                    ns.monitor, ns.rate)
        print(json.dumps(res))
        return 0
    systems = [s.strip() for s in ns.systems.split(",") if s.strip()]
    if ns.stem_baseline:
        os.environ["STEM_BENCH_BASELINE"] = os.path.abspath(ns.stem_baseline)
        if BASELINE not in systems:
            systems.insert(systems.index("stem") + 1 if "stem" in systems else 0, BASELINE)
    unknown = [s for s in systems if s not in SYSTEMS and not (s == BASELINE and ns.stem_baseline)]
    if unknown:
        p.error(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    missing = [s for s in systems if s in NEEDS and importlib.util.find_spec(NEEDS[s]) is None]
    if missing:
        p.error(f"{', '.join(missing)} not installed: .venv/bin/pip install -e '.[bench]' (or make bench-peers)")
    result = run(systems, base_url=ns.redis_url, tasks=ns.tasks, concurrency=ns.concurrency, warmup=ns.warmup,
                 repeat=ns.repeat, timeout=ns.timeout, progress=ns.progress and sys.stderr.isatty(),
                 producer_mode=ns.producer, monitor=ns.monitor, rate=ns.rate)
    if ns.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0 if not any(r.get("error") for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
