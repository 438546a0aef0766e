"""Scheduler processes under faults: each run of each schedule is published exactly once.

Five ``stem beat`` processes share one store and fire two 1-second schedules
(``tests/apps/sched.py``, catch_up="all") while the test SIGKILLs and restarts them
and SIGSTOPs them for longer than any TTL the scheduler has (its heartbeat's, 5 s;
it holds no lock).  Afterwards every fire time of the window is in the queue once,
by task id (a run's id is its schedule and fire time).  A bounded run is in the
default suite; the two-minute one is marked slow.  A Redis SIGKILL and restart
(appendfsync always) during a run publishes no run twice.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.apps.sched import QUEUE, registry
from tests.conftest import REQUIRE_SERVICES

from .support import ROOT, wait_for

SCHEDULES = registry.schedules
HEARTBEAT_TTL = 5.0          # the scheduler's shortest heartbeat TTL; pauses last longer


class Beats:
    """``stem beat`` processes (python -m stem) with their logs in files; always cleaned up."""

    def __init__(self, url: str, directory, n: int):
        self.url, self.dir = url, str(directory)
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.paused: dict[int, float] = {}       # index -> when to SIGCONT
        self.down: dict[int, float] = {}         # index -> when to restart
        self.starts = 0
        self.names: list[str | None] = [None] * n   # the scheduler id of each one's current incarnation

    def start(self, i: int) -> None:
        log = open(os.path.join(self.dir, f"beat-{i}-{self.starts}.log"), "w")
        self.names[i] = f"chaos-{i}-{self.starts}"
        self.starts += 1
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "stem", "beat", "-A", "tests.apps.sched:registry", "--broker", self.url,
             "--backend", self.url, "--tick", "0.2", "--heartbeat-interval", "1", "--loglevel", "WARNING",
             "-n", self.names[i]],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": ROOT})
        log.close()

    def kill(self, i: int, restart_at: float) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        self.paused.pop(i, None)
        self.procs[i] = None
        self.down[i] = restart_at

    def pause(self, i: int, until: float) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None and i not in self.paused:
            proc.send_signal(signal.SIGSTOP)
            self.paused[i] = until

    def step(self, now: float) -> None:
        for i, when in list(self.paused.items()):
            if now >= when:
                self.procs[i].send_signal(signal.SIGCONT)
                del self.paused[i]
        for i, when in list(self.down.items()):
            if now >= when:
                del self.down[i]
                self.start(i)

    def all_running(self) -> None:
        for i in list(self.paused):
            self.procs[i].send_signal(signal.SIGCONT)
        self.paused.clear()
        for i in list(self.down):
            self.start(i)
        self.down.clear()

    def all_looping(self, backend) -> bool:
        """Every process has put a heartbeat: its loop runs, and SIGTERM stops it after a pass."""
        live = {h["worker_id"] for h in backend.heartbeats()}
        return all(name in live for name, proc in zip(self.names, self.procs) if proc is not None)

    def stop(self, timeout: float = 30.0) -> list[int | None]:
        """SIGTERM each (after SIGCONT); their exit codes (None: had to be killed)."""
        codes = []
        for proc in self.procs:
            if proc is None:
                continue
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            if proc is None:
                continue
            try:
                codes.append(proc.wait(timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                codes.append(None)
        self.procs = [None] * len(self.procs)
        return codes

    def close(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(10)

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.startswith("beat-"):
                with open(os.path.join(self.dir, name)) as f:
                    out.append(f"--- {name}\n{f.read()[-2000:]}")
        return "\n".join(out)


def _records(backend) -> dict:
    return backend.schedule_records([s.id for s in SCHEDULES])


def _queued(broker) -> collections.Counter:
    ids: collections.Counter = collections.Counter()
    while True:
        batch = broker.consume([QUEUE], 1000, 0.0, consumer="chaos-check")
        if not batch:
            return ids
        ids.update(d.task_id for d in batch)


def _check_exactly_once(broker, first: dict[str, float], last: dict[str, float]) -> dict[str, int]:
    """Every fire time in (first, last] of each schedule is in the queue once; nothing twice."""
    counts = _queued(broker)
    twice = {i: n for i, n in counts.items() if n > 1}
    assert not twice, f"published more than once: {sorted(twice.items())[:10]}"
    fired = {}
    for s in SCHEDULES:
        expected = {s.run_id(t) for t in s.fire_times(first[s.id], last[s.id])}
        got = {i for i in counts if i.startswith(f"sched:{s.id}:")}
        missing = sorted(expected - got)
        assert not missing, f"{s.id}: {len(missing)} of {len(expected)} runs missing, e.g. {missing[:5]}"
        fired[s.id] = len(expected)
    return fired


def _chaos(url: str, tmp_path, seconds: float, seed: int) -> dict[str, int]:
    from stem.backends import from_url as backend_from_url
    from stem.brokers import from_url as broker_from_url
    rng = random.Random(seed)
    broker, backend = broker_from_url(url), backend_from_url(url)
    beats = Beats(url, tmp_path, 5)
    try:
        for i in range(5):
            beats.start(i)
        wait_for(lambda: all(r.last_fired for r in _records(backend).values()) and len(_records(backend)) == 2,
                 timeout=30, what="the first runs of both schedules")
        first = {sid: r.last_fired for sid, r in _records(backend).items()}
        kills = pauses = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            now = time.monotonic()
            beats.step(now)
            i = rng.randrange(5)
            if rng.random() < 0.5:
                beats.kill(i, now + rng.uniform(0.0, 3.0))
                kills += 1
            else:
                beats.pause(i, now + rng.uniform(HEARTBEAT_TTL + 0.5, HEARTBEAT_TTL + 3.0))
                pauses += 1
            time.sleep(rng.uniform(0.2, 1.2))    # the chaos's own pace, not a wait for a result
        beats.all_running()
        until = time.time()
        wait_for(lambda: all(r.last_fired >= until - 1 for r in _records(backend).values()), timeout=60,
                 what="the schedulers to catch up to the end of the chaos")
        wait_for(lambda: beats.all_looping(backend), timeout=30, what="every scheduler process running")
        # the race was real: running schedulers found runs already published by another
        wait_for(lambda: sum(h.get("duplicates", 0) for h in backend.heartbeats()) > 0, timeout=10,
                 what="a scheduler reporting a run another one had published")
        codes = beats.stop()
        assert codes and all(c == 0 for c in codes), (codes, beats.logs())
        last = {sid: r.last_fired for sid, r in _records(backend).items()}
        fired = _check_exactly_once(broker, first, last)
        assert kills and pauses
        return fired
    finally:
        beats.close()
        broker.close()
        backend.close()


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    if request.param == "redis":
        yield request.getfixturevalue("redis_own_db_url")
        return
    psycopg = pytest.importorskip("psycopg")
    url = request.getfixturevalue("postgres_url")
    name = "stemtest_sched_" + os.urandom(6).hex()
    yield f"{url}?schema={name}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.mark.pg_heavy
@pytest.mark.timeout(120)
def test_five_schedulers_killed_and_paused_at_random_publish_every_run_exactly_once(store_url, tmp_path):
    fired = _chaos(store_url, tmp_path, seconds=20, seed=23)
    assert all(n >= 20 for n in fired.values()), fired


@pytest.mark.pg_heavy
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_five_schedulers_under_two_minutes_of_kills_and_pauses_publish_every_run_exactly_once(store_url, tmp_path):
    fired = _chaos(store_url, tmp_path, seconds=120, seed=2023)
    assert all(n >= 120 for n in fired.values()), fired


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_redis_killed_and_restarted_under_the_schedulers_publishes_no_run_twice(tmp_path):
    if shutil.which("redis-server") is None:
        if REQUIRE_SERVICES:
            pytest.fail("redis-server is not on PATH and STEM_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip("redis-server is not on PATH")
    from stem.backends import from_url as backend_from_url
    from stem.brokers import from_url as broker_from_url

    from .support import RedisServer
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    beats = Beats(server.url, tmp_path, 3)
    broker = backend = None
    try:
        broker, backend = broker_from_url(server.url), backend_from_url(server.url)
        for i in range(3):
            beats.start(i)
        wait_for(lambda: len(_records(backend)) == 2 and all(r.last_fired for r in _records(backend).values()),
                 timeout=30, what="the first runs of both schedules")
        first = {sid: r.last_fired for sid, r in _records(backend).items()}
        for _ in range(2):
            mark = max(r.last_fired for r in _records(backend).values())
            wait_for(lambda: min(r.last_fired for r in _records(backend).values()) >= mark + 2, timeout=30,
                     what="two more seconds of runs")
            server.kill()
            time.sleep(1.5)        # the outage itself: schedulers fail their passes meanwhile
            server.start()
        until = time.time()
        wait_for(lambda: all(r.last_fired >= until for r in _records(backend).values()), timeout=30,
                 what="the schedulers to catch up past the outages")
        wait_for(lambda: beats.all_looping(backend), timeout=30, what="every scheduler process running")
        codes = beats.stop()
        assert all(c == 0 for c in codes), (codes, beats.logs())
        last = {sid: r.last_fired for sid, r in _records(backend).items()}
        _check_exactly_once(broker, first, last)
    finally:
        beats.close()
        for adapter in (broker, backend):
            if adapter is not None:
                adapter.close()
        server.kill()
