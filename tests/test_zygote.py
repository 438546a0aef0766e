"""When the zygote dies: the worker recovers (its children keep running, a new zygote forks
the next ones), or stops with the reason when it cannot; it never spins (stem.worker.zygote)."""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from stem import ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, Worker, WorkerLifecycleConfig
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.retry import FixedRetryStrategy
from stem.worker.channel import Channel
from stem.worker.zygote import GONE, Zygote, ZygoteGone

from .support import wait_for, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Importable by path ("tests.test_zygote:registry"), so a new zygote can load it.
registry = TaskRegistry()


@registry.task("zygote.noop")
def noop(ctx):
    return None


@registry.task("zygote.parent")
def parent(ctx):
    """The pid of the zygote that forked this child (1 or a subreaper for an orphan)."""
    return os.getppid()


@registry.task("zygote.crash_once")
def crash_once(ctx, marker):
    if not os.path.exists(marker):   # killed once from outside: redelivered (not a retry)
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getppid()


@registry.task("zygote.policy")
def policy(ctx):
    return os.sched_getscheduler(0)


@registry.task("zygote.hold", options=TaskOptions(max_retries=1))
def hold(ctx, marker):
    """Runs while ``marker`` exists."""
    while os.path.exists(marker):
        time.sleep(0.01)
    return os.getpid()


def lifecycle(**kw):
    kw.setdefault("install_signal_handlers", False)
    kw.setdefault("soft_grace_period", 5)
    kw.setdefault("force_shutdown_after", 5)
    return WorkerLifecycleConfig(**kw)


@pytest.fixture
def stack():
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    workers = []

    def worker(reg=registry, **kw):
        kw.setdefault("concurrency", 2)
        kw.setdefault("lifecycle", lifecycle())
        kw.setdefault("retry_strategy", FixedRetryStrategy(0.01))
        w = Worker(broker, backend, reg, isolation="process", **kw)
        workers.append(w)
        return w

    yield broker, backend, worker
    for w in workers:
        w.shutdown(ShutdownMode.HARD, timeout=15)


def gone(pid: int) -> bool:
    """The process exited (a zombie that init has not reaped yet counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_zygote(w: Worker) -> tuple[int, list[int]]:
    """SIGKILL the worker's zygote; its pid and its children's pids."""
    pid = w.stats()["zygote_pid"]
    children = [c.pid for c in psutil.Process(pid).children()]
    os.kill(pid, signal.SIGKILL)
    return pid, children


# -- the zygote's socket -------------------------------------------------------------------------
def test_a_dead_zygotes_events_end_with_one_gone_and_reading_them_never_spins():
    zygote = Zygote(lambda handle, params: 0)
    zygote.start()
    try:
        os.kill(zygote.pid, signal.SIGKILL)
        results: list = []
        reader = threading.Thread(target=lambda: results.extend([zygote.events(), zygote.events()]), daemon=True)
        wait_for(lambda: psutil.Process(zygote.pid).status() == psutil.STATUS_ZOMBIE, 10, "the zygote to die")
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "events() kept reading a closed socket"
        assert results == [[GONE], []]
        assert zygote.gone and not zygote.ready
        with Channel.create(4096) as channel, pytest.raises(ZygoteGone, match="is gone"):
            zygote.fork(channel.handle, {})
    finally:
        zygote.close()


def test_the_zygote_hands_over_each_childs_pidfd_which_turns_readable_at_its_exit():
    from stem.worker.keeper import exited_pidfds
    zygote = Zygote(lambda handle, params: 3)
    zygote.start()
    try:
        with Channel.create(4096) as channel:
            pid, pidfd = zygote.fork(channel.handle, {})
        assert pidfd is not None
        try:
            assert exited_pidfds([pidfd], timeout=10) == {pidfd}
            events: list = []
            wait_for(lambda: events.extend(zygote.events()) or ("exited", pid, 3) in events, 10,
                     "the zygote to report the exit")
        finally:
            os.close(pidfd)
    finally:
        zygote.stop()


# -- recovery -----------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_killing_the_zygote_mid_run_of_6000_tasks_loses_none_and_the_worker_keeps_going(stack, caplog):
    broker, backend, worker = stack
    stem = Stem(broker, backend, registry)
    # children recycle every 500 tasks: after the kill, the first ones exit as orphans
    # (seen through their pidfds) and the new zygote forks their successors
    w = worker("tests.test_zygote:registry", lifecycle=lifecycle(max_tasks_per_child=500))
    w.run_in_background()
    ids = stem.enqueue_many([("zygote.noop", {})] * 6000)
    wait_for(lambda: w.stats()["succeeded"] >= 1500, 60, "1,500 tasks to succeed")
    with caplog.at_level(logging.ERROR, logger="stem.worker.process_engine"):
        old, _ = kill_zygote(w)
        wait_for(lambda: w.stats()["succeeded"] >= 6000, 90, "every task to succeed")
    assert [stem.get_status(i).state for i in ids] == [TaskState.SUCCEEDED] * 6000
    assert f"the zygote process (pid {old}) died" in caplog.text
    stats = w.stats()
    assert stats["pool_state"] == "running" and stats["zygote_deaths"] == 1
    new = stats["zygote_pid"]
    assert new not in (None, old)
    ready = [c["pid"] for c in stats["children"] if c["state"] == "ready"]   # (not one recycling now)
    assert ready and {psutil.Process(pid).ppid() for pid in ready} == {new}
    assert broker.stats("default").in_flight == 0


def test_a_child_that_dies_after_its_zygote_is_seen_through_its_pidfd_and_its_task_redelivered(stack, caplog,
                                                                                                tmp_path):
    broker, backend, worker = stack
    stem = Stem(broker, backend, registry)
    w = worker("tests.test_zygote:registry", concurrency=1)
    w.run_in_background()
    with caplog.at_level(logging.INFO, logger="stem.worker.process_engine"):
        old, (orphan,) = kill_zygote(w)
        wait_for(lambda: "is ready" in caplog.text, 30, "the new zygote")
        status = stem.wait_for_task(stem.enqueue("zygote.crash_once", {"marker": str(tmp_path / "crashed")}),
                                    timeout=30)
    assert status.state is TaskState.SUCCEEDED and status.attempt == 0
    assert status.result == w.stats()["zygote_pid"] != old   # the redelivery ran in a child of the new zygote
    assert f"child {orphan} exited (crash, code unknown: its zygote died)" in caplog.text
    assert w.stats()["pool_state"] == "running"
    # the supervisor's thread yields the CPU (SCHED_BATCH); the new zygote's children do not
    assert stem.wait_for_task(stem.enqueue("zygote.policy"), timeout=30).result == os.SCHED_OTHER


def test_the_control_plane_still_shuts_down_a_worker_whose_zygote_died(stack):
    from stem.control import Control
    broker, backend, worker = stack
    w = worker("tests.test_zygote:registry", heartbeat_interval=0.2)
    w.run_in_background()
    zygote, _ = kill_zygote(w)
    wait_for(lambda: gone(zygote), 10, "the zygote to die")
    replies = Control(broker, backend).shutdown("warm", workers=[w.id], timeout=10)
    assert [r["reply"] for r in replies] == [{"shutdown": "warm"}]
    assert w.join(15), "the worker did not stop"


# -- when recovery cannot work: a hard stop with the reason ---------------------------------------
def test_a_registry_a_fresh_process_cannot_load_makes_the_worker_requeue_and_stop(stack, caplog, tmp_path):
    broker, backend, worker = stack
    local = TaskRegistry()
    local.task("zygote.local_hold")(lambda ctx, marker: hold(ctx, marker))   # a lambda: cannot be pickled
    marker = tmp_path / "hold"
    marker.touch()
    stem = Stem(broker, backend, local)
    w = worker(local, concurrency=1)
    w.run_in_background()
    task_id = stem.enqueue("zygote.local_hold", {"marker": str(marker)})
    wait_for(lambda: w.stats()["running"] == 1, 20, "the task to run")
    with caplog.at_level(logging.ERROR, logger="stem.worker.process_engine"):
        _, children = kill_zygote(w)
        t0 = time.monotonic()
        assert w.join(15), "the worker did not stop"
    assert time.monotonic() - t0 < 10
    assert "a new zygote cannot be started" in caplog.text and "module:attribute" in caplog.text
    assert broker.stats("default").ready == 1 and broker.stats("default").in_flight == 0   # requeued
    wait_for(lambda: all(gone(pid) for pid in children), 10, "the orphaned child to be killed")
    marker.unlink()
    worker(local, concurrency=1).run_in_background()
    assert stem.wait_for_task(task_id, timeout=30).state is TaskState.SUCCEEDED


def test_without_pidfds_the_orphans_are_killed_and_the_worker_stops(stack, caplog, monkeypatch, tmp_path):
    broker, backend, worker = stack
    monkeypatch.delattr(os, "pidfd_open")   # as on a kernel before 5.3: the zygote forked below has none
    marker = tmp_path / "hold"
    marker.touch()
    stem = Stem(broker, backend, registry)
    w = worker("tests.test_zygote:registry", concurrency=2)
    w.run_in_background()
    task_id = stem.enqueue("zygote.hold", {"marker": str(marker)})
    wait_for(lambda: w.stats()["running"] == 1, 20, "the task to run")
    with caplog.at_level(logging.ERROR, logger="stem.worker.process_engine"):
        _, children = kill_zygote(w)
        t0 = time.monotonic()
        assert w.join(15), "the worker did not stop"
    assert time.monotonic() - t0 < 10
    assert "without pidfds" in caplog.text
    assert len(children) == 2 and all(gone(pid) for pid in children)
    marker.unlink()
    worker("tests.test_zygote:registry").run_in_background()
    status = stem.wait_for_task(task_id, timeout=30)   # its child was killed: redelivered, no retry used
    assert status.state is TaskState.SUCCEEDED and status.attempt == 0


# -- a real worker process: no spinning, and signals still work ------------------------------------
WORKER_SCRIPT = textwrap.dedent("""
    import logging, sys
    sys.path.insert(0, {root!r})
    from stem import Worker, WorkerLifecycleConfig, signals
    from stem.brokers import InMemoryBroker
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(levelname)s %(message)s")
    w = Worker(InMemoryBroker(), None, "tests.test_zygote:registry", concurrency=2, isolation="process",
               lifecycle=WorkerLifecycleConfig(soft_grace_period=5, force_shutdown_after=5))
    signals.worker_ready.connect(lambda s, **kw: print("ZYGOTE", w.stats()["zygote_pid"], flush=True))
    w.start()
    print("EXITED", flush=True)
""")


class Lines:
    """A process's output lines, read by a thread, waited for with a deadline."""

    def __init__(self, stream):
        self.seen: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        with stream:
            for line in stream:
                self._queue.put(line)

    def join(self, timeout: float) -> None:
        """Once the process and every holder of its output pipe exited."""
        self._thread.join(timeout)

    def wait(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            match = next((line for line in self.seen if text in line), None)
            if match is not None:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line with {text!r} within {timeout}s; output:\n" + "".join(self.seen))
            try:
                self.seen.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                pass


@pytest.mark.timeout(90)
def test_a_worker_whose_zygote_died_does_not_spin_and_sigterm_stops_it():
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT.format(root=ROOT)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    out = Lines(proc.stdout)
    try:
        zygote = int(out.wait("ZYGOTE", 30).split()[1])
        orphans = [c.pid for c in psutil.Process(zygote).children()]
        os.kill(zygote, signal.SIGKILL)
        wait_for(lambda: gone(zygote), 10, "the zygote to die")
        supervisor = psutil.Process(proc.pid)
        before = supervisor.cpu_times()
        window = time.monotonic()
        time.sleep(1.0)   # a measured window, not a wait for anything
        after = supervisor.cpu_times()
        busy = (after.user + after.system) - (before.user + before.system)
        assert busy < 0.25 * (time.monotonic() - window), f"the supervisor used {busy:.2f}s of CPU in 1s"
        out.wait(f"the zygote process (pid {zygote}) died", 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        out.wait("EXITED", 5)
        wait_for(lambda: all(gone(pid) for pid in orphans), 10, "the first zygote's children to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.join(10)


# -- a new zygote that cannot serve ------------------------------------------------------------------
def test_a_new_zygote_that_cannot_load_the_registry_stops_the_worker_with_its_reason(stack, caplog, monkeypatch):
    broker, backend, worker = stack
    monkeypatch.setenv("STEM_TEST_REGISTRY_PID", str(os.getpid()))   # imports here, nowhere else
    w = worker("tests.apps.parent_only:registry")
    w.run_in_background()
    with caplog.at_level(logging.ERROR, logger="stem.worker.process_engine"):
        kill_zygote(w)
        assert w.join(20), "the worker did not stop"
    assert "exited (code 1) before it was ready: cannot load the task registry" in caplog.text
    assert "broken on purpose" in caplog.text
    assert w.stats()["pool_state"] == "stopped"


def test_a_new_zygote_that_is_not_ready_in_time_is_killed_and_the_worker_stops(stack, caplog, monkeypatch):
    import stem.worker.process_engine
    import stem.worker.zygote
    broker, backend, worker = stack
    monkeypatch.setattr(stem.worker.process_engine, "STARTUP_TIMEOUT", 2.0)
    w = worker("tests.test_zygote:registry")
    w.run_in_background()
    monkeypatch.setattr(stem.worker.zygote, "_BOOT", "import time; time.sleep(600)")   # never says ready
    with caplog.at_level(logging.ERROR, logger="stem.worker.process_engine"):
        first = w.stats()["zygote_pid"]
        kill_zygote(w)
        wait_for(lambda: w.stats()["zygote_pid"] not in (None, first), 10, "a new zygote")
        hung = w.stats()["zygote_pid"]
        assert w.join(20), "the worker did not stop"
    assert "the new zygote process did not get ready within 2s" in caplog.text
    assert gone(hung)


def test_zygotes_that_keep_dying_stop_the_worker(stack, caplog):
    broker, backend, worker = stack
    w = worker("tests.test_zygote:registry")
    w.run_in_background()
    with caplog.at_level(logging.INFO, logger="stem.worker.process_engine"):
        for deaths in (1, 2):
            kill_zygote(w)
            wait_for(lambda: caplog.text.count("is ready") == deaths, 30, f"new zygote #{deaths}")
        kill_zygote(w)
        assert w.join(20), "the worker did not stop"
    assert "the zygote process died 3 times within 60s" in caplog.text
    from stem.errors import WorkerError
    assert isinstance(w.error, WorkerError) and "died 3 times" in str(w.error)   # start() raises it: exit 1


# -- a process with many descriptors ---------------------------------------------------------------
def test_a_worker_runs_tasks_in_a_process_whose_descriptors_run_past_1024(stack):
    """The zygote, forked from a process with descriptors numbered past select()'s limit,
    waits with poll: its children run tasks (select() raised 'filedescriptor out of range'
    and the worker crashed on start)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit of open files is {hard}: no descriptor past 1024 to test with")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = []
    try:
        while not held or held[-1] <= 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        broker, backend, worker = stack
        stem = Stem(broker, backend, registry)
        w = worker()
        w.run_in_background()
        task_id = stem.enqueue("zygote.noop")
        assert stem.wait_for_task(task_id, timeout=30).state is TaskState.SUCCEEDED
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
