"""The process engine: recycling, crashes, time limits, shutdown modes, spawn, cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from stem import ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, Worker, WorkerLifecycleConfig, signals
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.errors import WorkerError
from stem.retry import FixedRetryStrategy

from .test_worker import wait_until


def lifecycle(**kw):
    kw.setdefault("install_signal_handlers", False)
    kw.setdefault("soft_grace_period", 5)
    kw.setdefault("force_shutdown_after", 5)
    return WorkerLifecycleConfig(**kw)


@pytest.fixture
def setup():
    registry = TaskRegistry()
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    workers = []

    def worker(**kw):
        kw.setdefault("concurrency", 2)
        kw.setdefault("lifecycle", lifecycle())
        kw.setdefault("retry_strategy", FixedRetryStrategy(0.01))
        w = Worker(broker, backend, registry, isolation="process", **kw)
        workers.append(w)
        return w

    yield registry, Stem(broker, backend, registry), worker, broker
    for w in workers:
        w.shutdown(ShutdownMode.HARD, timeout=15)


def test_children_are_recycled_after_max_tasks_per_child(setup):
    registry, stem, worker, _ = setup
    registry.task("pid")(lambda ctx: os.getpid())
    reasons = []
    receiver = signals.worker_child_shutdown.connect(lambda s, **kw: reasons.append(kw["reason"]))
    try:
        worker(lifecycle=lifecycle(max_tasks_per_child=5)).run_in_background()
        ids = stem.enqueue_many([("pid", {})] * 40)
        statuses = [stem.wait_for_task(i, timeout=30) for i in ids]
    finally:
        signals.worker_child_shutdown.disconnect(receiver)
    assert all(s.state is TaskState.SUCCEEDED for s in statuses)
    assert len({s.result for s in statuses}) >= 8
    assert os.getpid() not in {s.result for s in statuses}
    assert "max-tasks" in reasons


def test_a_child_over_max_memory_is_replaced_and_nothing_is_lost(setup):
    registry, stem, worker, _ = setup
    hoard = []

    @registry.task("hog")
    def hog(ctx):
        hoard.append(bytearray(150 * 2**20))  # stays alive in this child
        return os.getpid()

    registry.task("pid")(lambda ctx: os.getpid())
    w = worker(concurrency=1, lifecycle=lifecycle(max_memory_per_child=100 * 2**20))
    w.run_in_background()
    first = stem.wait_for_task(stem.enqueue("hog"), timeout=30)
    later = [stem.wait_for_task(stem.enqueue("pid"), timeout=30) for _ in range(3)]
    assert first.state is TaskState.SUCCEEDED
    assert all(s.state is TaskState.SUCCEEDED for s in later)
    assert first.result not in {s.result for s in later}
    assert wait_until(lambda: w.stats()["child_replacements"] >= 1)


def test_hard_time_limit_kills_the_child_and_fails_the_task_while_others_run(setup):
    registry, stem, worker, _ = setup
    registry.task("stuck", options=TaskOptions(hard_time_limit=1))(lambda ctx: time.sleep(60))
    registry.task("add")(lambda ctx, a, b: a + b)
    worker().run_in_background()
    t0 = time.monotonic()
    stuck = stem.enqueue("stuck")
    others = [stem.enqueue("add", {"a": i, "b": i}) for i in range(20)]
    assert [stem.wait_for_task(i, timeout=30).result for i in others] == [2 * i for i in range(20)]
    status = stem.wait_for_task(stuck, timeout=30)
    assert status.state is TaskState.FAILED and status.reason == "hard-time-limit"
    assert time.monotonic() - t0 < 5.0
    # the slot was refilled: more work still runs on two children
    assert stem.wait_for_task(stem.enqueue("add", {"a": 1, "b": 1}), timeout=30).result == 2


def test_a_task_whose_child_is_killed_from_outside_is_redelivered_without_using_a_retry(setup, tmp_path):
    registry, stem, worker, broker = setup
    marker = str(tmp_path / "killed-once")

    @registry.task("oom.victim", options=TaskOptions(max_retries=0))
    def victim(ctx):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)   # as the OOM killer does
        return "survived"

    worker().run_in_background()
    status = stem.wait_for_task(stem.enqueue("oom.victim"), timeout=30)
    assert status.state is TaskState.SUCCEEDED and status.attempt == 0 and status.result == "survived"
    assert broker.dead_letters("default") == []


def test_a_task_that_keeps_killing_its_child_ends_dead_as_poison_while_others_run(setup):
    registry, stem, worker, broker = setup

    @registry.task("crash", options=TaskOptions(max_retries=0))
    def crash(ctx):
        os.kill(os.getpid(), signal.SIGSEGV)

    registry.task("add")(lambda ctx, a, b: a + b)
    worker().run_in_background()
    tid = stem.enqueue("crash")
    status = stem.wait_for_task(tid, timeout=30)
    assert status.state is TaskState.DEAD and status.reason == "poison" and status.attempt == 0
    assert [d.reason for d in broker.dead_letters("default")] == ["poison"]
    assert stem.wait_for_task(stem.enqueue("add", {"a": 2, "b": 3}), timeout=30).result == 5


def test_crashes_do_not_use_up_retries_and_poison_comes_after_max_crash_redeliveries(setup, tmp_path):
    registry, stem, worker, broker = setup
    runs = tmp_path / "runs"

    @registry.task("poison", options=TaskOptions(max_retries=10))
    def poison(ctx):
        with open(runs, "a") as f:
            f.write(f"{ctx.attempt}\n")
        os._exit(3)

    worker(max_crash_redeliveries=3).run_in_background()
    status = stem.wait_for_task(stem.enqueue("poison"), timeout=30)
    assert status.state is TaskState.DEAD and status.reason == "poison" and status.attempt == 0
    assert runs.read_text().split() == ["0", "0", "0"]
    assert [d.reason for d in broker.dead_letters("default")] == ["poison"]


def test_a_child_task_that_cannot_be_published_fails_the_task_that_enqueued_it(setup):
    from stem.errors import BrokerError
    registry, stem, worker, broker = setup
    registry.task("child.task")(lambda ctx: "child ran")
    registry.task("parent.task")(lambda ctx: ctx.enqueue("child.task"))
    real_publish = broker.publish

    def publish(message):
        if message.task_id != parent_id:
            raise BrokerError("the broker refused it")
        real_publish(message)

    parent_id = "parent-1"
    broker.publish = publish
    worker().run_in_background()
    stem.enqueue("parent.task", task_id=parent_id)
    status = stem.wait_for_task(parent_id, timeout=30)
    assert status.state is TaskState.FAILED and status.reason == "enqueue-failed"
    assert "child.task" in status.error and "the broker refused it" in status.error


def test_a_verify_only_worker_fails_a_task_that_enqueues_instead_of_returning_an_id_for_nothing(setup):
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from stem import PayloadSigner
    registry, _, worker, broker = setup
    seed = b"\x07" * 32
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signing = PayloadSigner({"k1": seed}, algorithm="ed25519")
    verify_only = PayloadSigner({}, public_keys={"k1": public}, algorithm="ed25519")
    registry.task("child.task")(lambda ctx: None)
    registry.task("parent.task")(lambda ctx: ctx.enqueue("child.task"))
    stem = Stem(broker, setup[1].backend, registry, signing)
    worker(signer=verify_only).run_in_background()
    status = stem.wait_for_task(stem.enqueue("parent.task"), timeout=30)
    assert status.state is TaskState.FAILED and status.error_type == "ConfigurationError"
    assert "no signing key" in status.error
    assert broker.stats("default").ready == 0


def test_a_handler_that_blocks_forever_ends_with_its_hard_limit(setup):
    registry, stem, worker, _ = setup

    @registry.task("forever", options=TaskOptions(hard_time_limit=0.5, soft_time_limit=0.2))
    def forever(ctx):
        import signal as s
        s.signal(s.SIGALRM, s.SIG_IGN)  # a task that even ignores its soft limit
        while True:
            time.sleep(0.05)

    worker(concurrency=1).run_in_background()
    status = stem.wait_for_task(stem.enqueue("forever"), timeout=30)
    assert status.state is TaskState.FAILED and status.reason == "hard-time-limit"


def test_async_handlers_share_a_child_up_to_child_concurrency(setup):
    registry, stem, worker, _ = setup
    import asyncio

    @registry.task("aio")
    async def aio(ctx, n):
        await asyncio.sleep(0.3)
        return os.getpid()

    worker(concurrency=1, child_concurrency=4).run_in_background()
    t0 = time.monotonic()
    ids = stem.enqueue_many([("aio", {"n": i}) for i in range(4)])
    pids = {stem.wait_for_task(i, timeout=30).result for i in ids}
    assert len(pids) == 1
    assert time.monotonic() - t0 < 1.1  # four 0.3 s sleeps overlapped in one child


def test_spawn_start_method_runs_tasks_from_an_importable_registry():
    from tests.apps.tasks import registry
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    w = Worker(broker, backend, registry, concurrency=1, isolation="process", start_method="spawn",
               lifecycle=lifecycle())
    w.run_in_background()
    try:
        stem = Stem(broker, backend, registry)
        assert stem.wait_for_task(stem.enqueue("apps.add", {"a": 2, "b": 3}), timeout=60).result == 5
    finally:
        w.shutdown(timeout=20)


def test_a_registry_that_fails_to_load_in_the_child_stops_the_worker_from_starting(monkeypatch):
    monkeypatch.setenv("STEM_TEST_REGISTRY_PID", str(os.getpid()))
    w = Worker(InMemoryBroker(), InMemoryResultBackend(), "tests.apps.parent_only:registry", concurrency=2,
               isolation="process", start_method="spawn", lifecycle=lifecycle())
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="broken on purpose"):
        w.run_in_background()
    assert time.monotonic() - t0 < 30
    assert w.join(5)


def test_a_registry_path_that_does_not_import_is_a_configuration_error():
    from stem.errors import ConfigurationError
    with pytest.raises(ConfigurationError, match="no_such_module"):
        Worker(InMemoryBroker(), None, "no_such_module:registry")
    with pytest.raises(ConfigurationError, match="TaskRegistry"):
        Worker(InMemoryBroker(), None, "os:path")


def test_soft_shutdown_asks_running_tasks_to_stop_and_requeues_them(setup):
    registry, stem, worker, broker = setup

    @registry.task("slow")
    def slow(ctx):
        time.sleep(30)

    w = worker(concurrency=1)
    w.run_in_background()
    stem.enqueue("slow")
    assert wait_until(lambda: w.stats()["running"] == 1)
    w.shutdown(ShutdownMode.SOFT, timeout=20)
    assert broker.stats("default").ready == 1
    assert broker.stats("default").in_flight == 0


def test_stats_report_children_with_pid_rss_and_tasks_done(setup):
    registry, stem, worker, _ = setup
    registry.task("pid")(lambda ctx: os.getpid())
    w = worker(lifecycle=lifecycle(max_memory_per_child=1 << 30))
    w.run_in_background()
    for i in stem.enqueue_many([("pid", {})] * 10):
        stem.wait_for_task(i, timeout=30)
    stats = w.stats()
    assert stats["engine"] == "process" and len(stats["children"]) == 2
    assert sum(c["tasks_done"] for c in stats["children"]) == 10
    assert all(c["pid"] != os.getpid() and c["rss"] > 0 for c in stats["children"] if c["tasks_done"])


SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    from stem import Stem, Worker, WorkerLifecycleConfig, TaskState
    from stem.brokers import InMemoryBroker
    from stem.backends import InMemoryResultBackend
    from tests.apps.tasks import registry
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    stem = Stem(broker, backend, registry)
    ids = [stem.enqueue("apps.sleep", {{"seconds": 1.5}}) for _ in range(4)]
    w = Worker(broker, backend, registry, concurrency=4, isolation="process",
               lifecycle=WorkerLifecycleConfig(soft_grace_period=20, force_shutdown_after=5))
    from stem import signals
    signals.worker_ready.connect(lambda s, **kw: print("READY", flush=True))
    signals.task_prerun.connect(lambda s, **kw: print("STARTED", flush=True))
    w.start()
    states = [stem.get_status(i).state.value for i in ids]
    ready = broker.stats("default").ready
    finished_later = []
    if ready:
        w2 = Worker(broker, backend, registry, concurrency=4, isolation="process",
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
        w2.start(burst=True)
        finished_later = [stem.get_status(i).state.value for i in ids]
    print(json.dumps({{"states": states, "ready_after_stop": ready, "finished_later": finished_later}}), flush=True)
""")


def run_worker_and_signal(sig):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(root=root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        started = 0
        for line in proc.stdout:
            if line.strip() == "STARTED":
                started += 1
                if started == 4:
                    break
        assert started == 4, proc.stderr.read()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    import json
    last = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert last, err
    return proc.returncode, json.loads(last[-1]), err


@pytest.mark.timeout(120)
def test_sigterm_lets_running_tasks_finish_and_exits_zero():
    code, result, err = run_worker_and_signal(signal.SIGTERM)
    assert code == 0, err
    assert result["states"] == ["SUCCEEDED"] * 4
    assert result["ready_after_stop"] == 0


@pytest.mark.timeout(120)
def test_sigquit_kills_children_and_requeues_so_a_new_worker_completes_them():
    code, result, err = run_worker_and_signal(signal.SIGQUIT)
    assert code == 0, err
    assert result["ready_after_stop"] == 4
    assert result["states"] == ["PENDING"] * 4
    assert result["finished_later"] == ["SUCCEEDED"] * 4


def test_workers_that_are_never_started_hold_no_file_descriptors():
    import gc
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    registry = TaskRegistry()
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    workers = [Worker(broker, backend, registry, concurrency=2, isolation="process", lifecycle=lifecycle())
               for _ in range(50)]
    assert len(os.listdir("/proc/self/fd")) == before
    for w in workers:
        assert w.shutdown(timeout=1)   # stopping one that never ran is a no-op, twice too
        assert w.shutdown(timeout=1)
    del workers
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
