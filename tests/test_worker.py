"""The worker end to end on the in-memory adapters (every engine runs these)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from stem import (PayloadSigner, ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, Worker,
                  WorkerLifecycleConfig, signals)
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker, Message
from stem.errors import ConfigurationError
from stem.retry import FixedRetryStrategy
from .support import NO_SIGNALS, record_peak_in_flight, wait_until, worker_env





@pytest.fixture(params=["inline", "process"])
def isolation(request):
    return request.param


class Journal:
    """Side effects that both engines can record: lines appended to a file
    (an O_APPEND write of one short line is atomic across processes)."""

    def __init__(self, path):
        self.path = str(path)
        open(self.path, "w").close()

    def add(self, line) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)

    def lines(self) -> list[str]:
        with open(self.path) as f:
            return f.read().splitlines()

    def flag(self, name: str) -> str:
        return self.path + "." + name


def set_flag(path: str) -> None:
    open(path, "w").close()


def wait_flag(path: str, timeout: float = 20.0) -> bool:
    """Used inside tasks: wait for a file the test creates (with a deadline)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def journal(tmp_path):
    return Journal(tmp_path / "journal")


@pytest.fixture
def env(isolation):
    """A registry, adapters, a producer and a worker factory; workers are shut down after the test."""
    yield from worker_env(isolation)


def test_tasks_run_and_their_results_are_stored(env):
    env.registry.task("add")(lambda ctx, a, b: a + b)
    env.worker().run_in_background()
    ids = [env.stem.enqueue("add", {"a": i, "b": 1}) for i in range(20)]
    results = [env.stem.wait_for_task(i, timeout=20) for i in ids]
    assert [r.result for r in results] == [i + 1 for i in range(20)]
    assert all(r.state is TaskState.SUCCEEDED and r.attempt == 0 for r in results)
    assert env.broker.stats("default").in_flight == 0


def test_burst_worker_drains_the_queue_and_stops(env):
    env.registry.task("noop")(lambda ctx: None)
    env.stem.enqueue_many([("noop", {})] * 50)
    w = env.worker(concurrency=4)
    w.run_in_background(burst=True)
    assert w.join(20)
    assert w.stats()["succeeded"] == 50
    s = env.broker.stats("default")
    assert (s.ready, s.in_flight) == (0, 0)


def test_failing_task_is_retried_until_it_succeeds(env, journal):
    @env.registry.task("flaky", options=TaskOptions(max_retries=3))
    def flaky(ctx):
        journal.add(ctx.attempt)
        if ctx.attempt < 2:
            raise RuntimeError(f"fail {ctx.attempt}")
        return "ok"

    env.worker().run_in_background()
    status = env.stem.wait_for_task(env.stem.enqueue("flaky"), timeout=20)
    assert status.state is TaskState.SUCCEEDED and status.attempt == 2 and status.result == "ok"
    assert journal.lines() == ["0", "1", "2"]


def test_task_that_exhausts_retries_fails_and_is_dead_lettered(env):
    @env.registry.task("boom", options=TaskOptions(max_retries=1))
    def boom(ctx):
        raise ValueError("always")

    env.worker().run_in_background()
    tid = env.stem.enqueue("boom")
    status = env.stem.wait_for_task(tid, timeout=20)
    assert status.state is TaskState.FAILED and status.attempt == 1
    assert status.error == "always" and status.error_type == "ValueError" and "Traceback" in status.traceback
    assert wait_until(lambda: env.broker.stats("default").dead == 1)
    [dl] = env.broker.dead_letters("default")
    assert dl.task_id == tid and dl.reason == "error"


def test_ctx_retry_reschedules_with_its_countdown(env):
    @env.registry.task("again", options=TaskOptions(max_retries=1))
    def again(ctx):
        if ctx.attempt == 0:
            ctx.retry(countdown=0.2)
        return ctx.attempt

    env.worker().run_in_background()
    t0 = time.monotonic()
    status = env.stem.wait_for_task(env.stem.enqueue("again"), timeout=20)
    assert status.result == 1 and time.monotonic() - t0 >= 0.15


def test_result_msgpack_cannot_encode_fails_the_task_without_retrying(env):
    env.registry.task("bad.result", options=TaskOptions(max_retries=3))(lambda ctx: object())
    env.worker().run_in_background()
    status = env.stem.wait_for_task(env.stem.enqueue("bad.result"), timeout=20)
    assert status.state is TaskState.FAILED and status.reason == "result-not-encodable" and status.attempt == 0


def test_unsigned_or_tampered_frames_are_dead_lettered_by_a_signing_worker(env):
    from stem.envelope import Envelope, encode_frame
    env.registry.task("noop")(lambda ctx: "ran")
    signer = PayloadSigner({"k1": b"s" * 32})
    unsigned_id = env.stem.enqueue("noop")
    frame = bytearray(encode_frame(Envelope(id="tampered", name="noop", args={"x": 1}), signer))
    frame[-2] ^= 0x01
    env.broker.publish(Message("tampered", "default", bytes(frame)))
    ok_id = Stem(env.broker, env.backend, env.registry, signer).enqueue("noop", {})
    env.worker(signer=signer).run_in_background()
    assert env.stem.wait_for_task(ok_id, timeout=20).result == "ran"
    for tid in (unsigned_id, "tampered"):
        status = env.stem.wait_for_task(tid, timeout=20)
        assert status.state is TaskState.DEAD and status.reason == "signature-invalid"
    assert wait_until(lambda: len(env.broker.dead_letters("default")) == 2)
    assert {d.reason for d in env.broker.dead_letters("default")} == {"signature-invalid"}


def test_unknown_task_at_the_worker_is_dead_lettered(env):
    free = Stem(env.broker, env.backend)  # no registry: any name goes
    tid = free.enqueue("not.registered")
    env.registry.task("noop")(lambda ctx: None)
    env.worker().run_in_background()
    status = env.stem.wait_for_task(tid, timeout=20)
    assert status.state is TaskState.DEAD and status.reason == "unknown-task"


def test_revoked_task_is_not_run(env, journal):
    env.registry.task("noop")(lambda ctx: journal.add(ctx.id))
    tid = env.stem.enqueue("noop")
    env.stem.revoke(tid)
    env.worker().run_in_background()
    status = env.stem.wait_for_task(tid, timeout=20)
    assert status.state is TaskState.REVOKED and status.reason == "revoked" and journal.lines() == []


def test_expired_task_is_not_run(env, journal):
    env.registry.task("noop")(lambda ctx: journal.add(1))
    tid = env.stem.enqueue("noop", options=TaskOptions(expires=0.05))
    time.sleep(0.1)  # let it expire before any worker exists (expiry is the point of the test)
    env.worker().run_in_background()
    status = env.stem.wait_for_task(tid, timeout=20)
    assert status.state is TaskState.REVOKED and status.reason == "expired" and journal.lines() == []


def test_soft_time_limit_raises_inside_the_task(env, journal):

    @env.registry.task("slow", options=TaskOptions(soft_time_limit=0.3))
    def slow(ctx):
        from stem.errors import SoftTimeLimitExceeded
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.01)
        except SoftTimeLimitExceeded:
            journal.add("cleaned")
            raise
        return "not reached"

    env.worker().run_in_background()
    status = env.stem.wait_for_task(env.stem.enqueue("slow"), timeout=20)
    assert status.state is TaskState.FAILED and status.reason == "soft-time-limit"
    assert journal.lines() == ["cleaned"]


def test_task_signals_fire_in_order(env):
    seen = []
    env.registry.task("noop")(lambda ctx: 1)
    receivers = {
        "task_received": lambda s, **kw: seen.append("received"),
        "task_prerun": lambda s, **kw: seen.append("prerun"),
        "task_succeeded": lambda s, **kw: seen.append("succeeded"),
        "task_postrun": lambda s, **kw: seen.append("postrun"),
    }
    for name, fn in receivers.items():
        signals.get(name).connect(fn)
    try:
        env.worker().run_in_background()
        env.stem.wait_for_task(env.stem.enqueue("noop"), timeout=20)
        assert wait_until(lambda: "postrun" in seen)
    finally:
        for name, fn in receivers.items():
            signals.get(name).disconnect(fn)
    assert seen == ["received", "prerun", "succeeded", "postrun"]


def test_failure_and_retry_signals_fire(env):
    seen = []

    @env.registry.task("boom", options=TaskOptions(max_retries=1))
    def boom(ctx):
        raise RuntimeError("x")

    r1 = signals.task_retry.connect(lambda s, **kw: seen.append(("retry", kw["delay"] >= 0)))
    r2 = signals.task_failed.connect(lambda s, **kw: seen.append(("failed", kw["reason"])))
    try:
        env.worker().run_in_background()
        env.stem.wait_for_task(env.stem.enqueue("boom"), timeout=20)
        assert wait_until(lambda: len(seen) == 2)
    finally:
        signals.task_retry.disconnect(r1)
        signals.task_failed.disconnect(r2)
    assert seen == [("retry", True), ("failed", "error")]


def test_concurrency_bounds_running_tasks_and_prefetch_bounds_leases(env, journal):
    @env.registry.task("busy")
    def busy(ctx):
        journal.add(f"start {time.monotonic()}")
        time.sleep(0.005)
        journal.add(f"end {time.monotonic()}")

    max_in_flight = record_peak_in_flight(env.broker)
    env.stem.enqueue_many([("busy", {})] * 200)
    w = env.worker(concurrency=3, prefetch_multiplier=2)
    w.run_in_background(burst=True)
    assert w.join(30)
    events = sorted((float(t), +1 if kind == "start" else -1)
                    for kind, t in (line.split() for line in journal.lines()))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert 1 <= peak <= 3
    assert 1 <= max_in_flight[0] <= 6
    assert w.stats()["succeeded"] == 200


def test_warm_shutdown_finishes_running_and_requeues_the_rest(env, journal):
    release = journal.flag("release")

    @env.registry.task("block")
    def block(ctx):
        journal.add("started")
        wait_flag(release)
        return "finished"

    ids = env.stem.enqueue_many([("block", {})] * 4)
    w = env.worker(concurrency=1, prefetch_multiplier=4)
    w.run_in_background()
    assert wait_until(lambda: journal.lines() == ["started"])
    assert wait_until(lambda: w.stats()["in_flight"] == 4)
    w.shutdown_nowait(ShutdownMode.WARM)
    assert wait_until(lambda: env.broker.stats("default").ready == 3)
    set_flag(release)
    assert w.join(20)
    done = [env.stem.get_status(i) for i in ids]
    assert sum(s.state is TaskState.SUCCEEDED for s in done) == 1
    assert env.broker.stats("default").in_flight == 0
    assert journal.lines() == ["started"]


def test_heartbeats_reach_the_backend_and_vanish_on_shutdown(env):
    env.registry.task("noop")(lambda ctx: None)
    w = env.worker(heartbeat_interval=0.1)
    w.run_in_background()
    assert wait_until(lambda: any(h["worker_id"] == w.id for h in env.backend.heartbeats()))
    beat = next(h for h in env.backend.heartbeats() if h["worker_id"] == w.id)
    assert beat["concurrency"] == 2 and beat["queues"] == ["default"] and "processed" in beat
    w.shutdown(timeout=20)
    assert all(h["worker_id"] != w.id for h in env.backend.heartbeats())


def test_a_task_longer_than_its_visibility_timeout_runs_once(env, journal):
    @env.registry.task("long", options=TaskOptions(visibility_timeout=0.3))
    def long(ctx):
        journal.add("run")
        time.sleep(1.0)
        return "done"

    env.worker().run_in_background()
    status = env.stem.wait_for_task(env.stem.enqueue("long"), timeout=20)
    assert status.state is TaskState.SUCCEEDED and journal.lines() == ["run"]


def test_child_tasks_record_their_parent(env):
    @env.registry.task("parent")
    def parent(ctx):
        return ctx.enqueue("child", {"x": 1})

    env.registry.task("child")(lambda ctx, x: x + 1)
    env.worker().run_in_background()
    pid = env.stem.enqueue("parent")
    child_id = env.stem.wait_for_task(pid, timeout=20).result
    assert env.stem.wait_for_task(child_id, timeout=20).result == 2


def test_async_handlers_run(env):
    import asyncio

    @env.registry.task("aio")
    async def aio(ctx, n):
        await asyncio.sleep(0.01)
        return n * 2

    env.worker().run_in_background()
    assert env.stem.wait_for_task(env.stem.enqueue("aio", {"n": 21}), timeout=20).result == 42


def test_rate_limit_spaces_out_tasks(env):
    env.registry.task("limited", options=TaskOptions(rate_limit="10/s"))(lambda ctx: time.monotonic())
    ids = env.stem.enqueue_many([("limited", {})] * 20)
    env.worker(concurrency=4).run_in_background()
    times = sorted(env.stem.wait_for_task(i, timeout=20).result for i in ids)
    # a bucket of 10 then 10/s: the last 10 need at least ~1 s
    assert times[-1] - times[0] >= 0.8


def test_progress_is_visible_while_the_task_runs(env, journal):
    go = journal.flag("go")

    @env.registry.task("prog")
    def prog(ctx):
        ctx.progress(0.5, {"step": 1})
        wait_flag(go)
        return "done"

    env.worker().run_in_background()
    tid = env.stem.enqueue("prog")
    assert wait_until(lambda: env.stem.get_status(tid).progress == 0.5)
    assert env.stem.get_status(tid).state is TaskState.RUNNING
    set_flag(go)
    assert env.stem.wait_for_task(tid, timeout=20).result == "done"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"registry": None}, "TaskRegistry"),
    ({"concurrency": 0}, "concurrency"),
    ({"prefetch_multiplier": 0}, "prefetch_multiplier"),
    ({"queues": ["bad queue"]}, "queue"),
    ({"isolation": "thread"}, "isolation"),
    ({"heartbeat_interval": 0}, "heartbeat_interval"),
    ({"retry_strategy": 3}, "retry_strategy"),
    ({"lifecycle": {}}, "lifecycle"),
])
def test_worker_rejects_bad_arguments(kwargs, fragment):
    args = {"broker": InMemoryBroker(), "backend": InMemoryResultBackend(), "registry": TaskRegistry()}
    args.update(kwargs)
    with pytest.raises(ConfigurationError, match=fragment):
        Worker(**args)


@pytest.mark.parametrize("kwargs", [{"soft_grace_period": -1}, {"max_tasks_per_child": 0},
                                    {"max_memory_per_child": 1.5}])
def test_lifecycle_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigurationError):
        WorkerLifecycleConfig(**kwargs)


def test_an_unexpected_error_in_consume_does_not_stop_fetching(env, monkeypatch, caplog):
    """A bug-shaped exception (not a StemError) from the broker is logged and retried;
    it once killed the fetcher thread and left a live worker that never fetched again."""
    env.registry.task("add")(lambda ctx, a, b: a + b)
    real = env.broker.consume
    failures = []

    def flaky(*a, **k):
        if threading.current_thread().name == "stem-fetcher" and len(failures) < 2:
            failures.append(1)
            raise ConnectionResetError(104, "Connection reset by peer")
        return real(*a, **k)

    monkeypatch.setattr(env.broker, "consume", flaky)
    env.worker().run_in_background()
    task_id = env.stem.enqueue("add", {"a": 1, "b": 2})
    assert env.stem.wait_for_task(task_id, timeout=20).result == 3
    assert len(failures) == 2
    assert "consume failed unexpectedly" in caplog.text


# -- who decides a task's options (issue: options applied by the producer only) ------------------
def test_a_producer_without_the_registry_gets_the_handlers_retries_applied_by_the_worker(env, journal):
    @env.registry.task("flaky.remote", options=TaskOptions(max_retries=2))
    def flaky(ctx):
        journal.add(ctx.attempt)
        raise RuntimeError("down")

    env.worker().run_in_background()
    free = Stem(env.broker, env.backend)        # a service that does not import the tasks
    status = env.stem.wait_for_task(free.enqueue("flaky.remote"), timeout=20)
    assert status.state is TaskState.FAILED and status.attempt == 2
    assert journal.lines() == ["0", "1", "2"]
    # what the caller sets explicitly still wins over the handler
    status = env.stem.wait_for_task(free.enqueue("flaky.remote", options=TaskOptions(max_retries=0)), timeout=20)
    assert status.state is TaskState.FAILED and status.attempt == 0


def test_a_producer_without_the_registry_gets_the_handlers_hard_time_limit_enforced(env, isolation):
    if isolation != "process":
        pytest.skip("hard time limits kill a child process")
    env.registry.task("hard.limit", options=TaskOptions(hard_time_limit=0.5))(lambda ctx, seconds: time.sleep(seconds))
    env.worker().run_in_background()
    free = Stem(env.broker, env.backend)
    t0 = time.monotonic()
    status = env.stem.wait_for_task(free.enqueue("hard.limit", {"seconds": 20}), timeout=15)
    assert status.state is TaskState.FAILED and status.reason == "hard-time-limit"
    assert time.monotonic() - t0 < 10


def test_a_task_on_another_queue_than_its_handlers_runs_with_the_handlers_options_and_a_warning(env, caplog):
    env.registry.task("report.build", options=TaskOptions(queue="reports", max_retries=1))(
        lambda ctx: 1 / 0)
    env.worker(queues=["default", "reports"]).run_in_background()
    free = Stem(env.broker, env.backend)
    status = env.stem.wait_for_task(free.enqueue("report.build"), timeout=20)
    assert status.state is TaskState.FAILED and status.attempt == 1 and status.queue == "default"
    assert "arrived on queue 'default' but its handler's queue is 'reports'" in caplog.text


def test_apply_handler_options_fills_only_what_the_producer_left_unset():
    from stem.envelope import Envelope
    from stem.task import FunctionTaskHandler
    from stem.worker.execution import apply_handler_options
    handler = FunctionTaskHandler(lambda ctx: None, "t", TaskOptions(max_retries=3, soft_time_limit=1.0,
                                                                      visibility_timeout=90.0, expires=5.0))
    env = Envelope(id="a", name="t", max_retries=0, enqueued_at=100.0, soft_time_limit=2.0,
                   unset_options=["max_retries", "visibility_timeout", "expires", "hard_time_limit"])
    assert apply_handler_options(env, handler) is True
    assert (env.max_retries, env.soft_time_limit, env.visibility_timeout, env.expires_at, env.hard_time_limit) == (
        3, 2.0, 90.0, 105.0, None)
    decided = Envelope(id="b", name="t", max_retries=0)
    assert apply_handler_options(decided, handler) is False and decided.max_retries == 0


def test_arguments_that_do_not_fit_the_function_fail_at_once_as_bad_arguments(env):
    env.registry.task("greet", options=TaskOptions(max_retries=3))(lambda ctx, name: f"hi {name}")

    @env.registry.task("typo.inside", options=TaskOptions(max_retries=1))
    def typo_inside(ctx):
        return len(5)   # a TypeError of the task's own: an ordinary error, retried

    env.worker().run_in_background()
    status = env.stem.wait_for_task(env.stem.enqueue("greet", {"nmae": "x"}), timeout=20)
    assert status.state is TaskState.FAILED and status.reason == "bad-arguments" and status.attempt == 0
    assert "nmae" in status.error
    status = env.stem.wait_for_task(env.stem.enqueue("typo.inside"), timeout=20)
    assert status.state is TaskState.FAILED and status.reason == "error" and status.attempt == 1


def test_autoretry_for_retries_only_the_exceptions_it_names(env, journal):
    @env.registry.task("fetch.page", options=TaskOptions(max_retries=2, autoretry_for=(ConnectionError, KeyError),
                                                         retry_backoff=0.01))
    def fetch_page(ctx, error):
        journal.add(f"{error}:{ctx.attempt}")
        raise {"conn": ConnectionResetError, "value": ValueError}[error]("x")

    env.worker().run_in_background()
    retried = env.stem.wait_for_task(env.stem.enqueue("fetch.page", {"error": "conn"}), timeout=20)
    assert retried.state is TaskState.FAILED and retried.attempt == 2
    failed = env.stem.wait_for_task(env.stem.enqueue("fetch.page", {"error": "value"}), timeout=20)
    assert failed.state is TaskState.FAILED and failed.attempt == 0 and failed.error_type == "ValueError"
    assert sorted(journal.lines()) == ["conn:0", "conn:1", "conn:2", "value:0"]


def test_a_handlers_retry_backoff_replaces_the_workers_strategy():
    from stem.worker.settle import retry_delay
    options = TaskOptions(retry_backoff=2.0, retry_backoff_max=5.0)
    delays = [retry_delay(options, n, FixedRetryStrategy(0.01)) for n in range(4)]
    assert 1.5 <= delays[0] <= 2.0 and 3.0 <= delays[1] <= 4.0 and 3.75 <= delays[2] <= 5.0 and delays[3] <= 5.0
    assert retry_delay(TaskOptions(), 0, FixedRetryStrategy(0.01)) == 0.01


@pytest.mark.parametrize("kwargs, fragment", [
    ({"autoretry_for": "ValueError"}, "autoretry_for"),
    ({"autoretry_for": (ValueError, int)}, "autoretry_for"),
    ({"retry_backoff": -1}, "retry_backoff"),
    ({"retry_backoff_max": 5.0}, "needs retry_backoff"),
    ({"retry_backoff": 10.0, "retry_backoff_max": 5.0}, "must be >= retry_backoff"),
])
def test_task_options_reject_bad_retry_policies(kwargs, fragment):
    from stem.errors import InvalidTaskOptionsError
    with pytest.raises(InvalidTaskOptionsError, match=fragment):
        TaskOptions(**kwargs)


def test_autoretry_for_takes_a_single_class_and_is_refused_at_enqueue(env):
    assert TaskOptions(autoretry_for=KeyError).autoretry_for == (KeyError,)
    from stem.errors import InvalidTaskOptionsError
    env.registry.task("noop")(lambda ctx: None)
    with pytest.raises(InvalidTaskOptionsError, match="options of the handler"):
        env.stem.enqueue("noop", options=TaskOptions(autoretry_for=KeyError))
    assert env.broker.stats("default").ready == 0


def test_every_dead_letter_path_of_the_worker_stores_a_dead_status(env):
    from stem.envelope import Envelope, encode_frame
    env.registry.task("noop")(lambda ctx: None)
    env.broker.publish(Message("garbage", "default", b"not a frame at all"))
    env.broker.publish(Message("unknown", "default", encode_frame(Envelope(id="unknown", name="nobody.home"))))
    env.worker().run_in_background()
    for tid, reason in (("garbage", "decode-error"), ("unknown", "unknown-task")):
        status = env.stem.wait_for_task(tid, timeout=20)
        assert status.state is TaskState.DEAD and status.reason == reason


# -- running statuses: started, progress (stem.worker.progress) ---------------------------------
def test_a_long_task_without_progress_calls_is_visible_as_running(env, journal):
    go = journal.flag("go")
    env.registry.task("long")(lambda ctx: wait_flag(go) and "done")
    env.worker().run_in_background()
    tid = env.stem.enqueue("long")
    assert wait_until(lambda: env.stem.get_status(tid).state is TaskState.RUNNING, timeout=10)
    running = env.stem.get_status(tid)
    assert running.started_at is not None and running.worker is not None and running.progress is None
    set_flag(go)
    assert env.stem.wait_for_task(tid, timeout=20).result == "done"


class _SlowProgressBackend(InMemoryResultBackend):
    """Every write of a RUNNING status takes 200 ms (a slow store), and is counted."""

    def __init__(self):
        super().__init__()
        self.progress_writes = 0

    def _slow(self, statuses):
        if any(s.state is TaskState.RUNNING for s in statuses):
            self.progress_writes += 1
            time.sleep(0.2)

    def store_many(self, statuses):   # store() goes through here
        self._slow(statuses)
        super().store_many(statuses)

    def store_if_not_terminal(self, statuses):
        self._slow(statuses)
        super().store_if_not_terminal(statuses)


def test_progress_calls_are_coalesced_and_never_hold_back_other_tasks_results(isolation, journal):
    registry, broker, backend = TaskRegistry(), InMemoryBroker(), _SlowProgressBackend()
    go = journal.flag("go")

    @registry.task("chatty")
    def chatty(ctx):
        for i in range(200):
            ctx.progress(i / 200)
        wait_flag(go)
        return "done"

    registry.task("noop")(lambda ctx: None)
    stem = Stem(broker, backend, registry)
    w = Worker(broker, backend, registry, concurrency=2, isolation=isolation, lifecycle=NO_SIGNALS)
    w.run_in_background()
    try:
        t0 = time.monotonic()
        chatty_id = stem.enqueue("chatty")
        assert wait_until(lambda: backend.get(chatty_id) is not None, timeout=10)   # its progress is stored
        ids = stem.enqueue_many([("noop", {})] * 50)
        assert all(stem.wait_for_task(i, timeout=20).succeeded for i in ids)
        elapsed = time.monotonic() - t0
        # 200 progress calls, written at most once per FLUSH_INTERVAL (0.25 s), not once each
        assert backend.progress_writes <= elapsed / 0.25 + 2
        set_flag(go)
        assert stem.wait_for_task(chatty_id, timeout=20).result == "done"
    finally:
        w.shutdown(ShutdownMode.HARD, timeout=15)


def test_a_late_progress_note_never_turns_a_finished_task_back_to_running():
    from stem.envelope import Envelope
    from stem.results import TaskStatus
    from stem.worker.progress import StatusBoard
    backend = InMemoryResultBackend()
    board = StatusBoard(backend, "w1")
    env = Envelope(id="t1", name="noop")
    board.progress(env, time.time(), 0.9, None)
    backend.store(TaskStatus(id="t1", state=TaskState.SUCCEEDED, result=1))   # the result wins the race
    board.flush(time.monotonic(), force=True)
    assert backend.get("t1").state is TaskState.SUCCEEDED
    board.started(Envelope(id="t2", name="noop"), time.time())
    board.forget(["t2"])                                                        # settled meanwhile
    board.flush(time.monotonic(), force=True)
    assert backend.get("t2") is None


def test_a_worker_storing_results_stops_without_waiting_out_its_force_shutdown_deadline(env):
    env.registry.task("noop")(lambda ctx: None)
    w = env.worker(lifecycle=WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=60,
                                                   force_shutdown_after=60))
    w.run_in_background()
    assert env.stem.wait_for_task(env.stem.enqueue("noop"), timeout=20).succeeded
    assert w.shutdown(timeout=10), "the worker still runs: its settle thread did not stop"
