"""Result lifetime per task: ``TaskOptions(result_ttl, failure_ttl, ignore_result)``.

The producer resolves and frames them, the worker fills what its handler says and
stores each status with its lifetime (``TaskStatus.ttl``), the backends keep it that
long (``tests/contract/test_backend_contract.py``).  Worker tests run on the memory
adapters with both engines; the last one runs on Redis, where results and acks share
one round trip.
"""

from __future__ import annotations

import os
import time

import pytest

from stem import ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, Worker
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker, Message
from stem.envelope import Envelope, decode_frame, encode_frame
from stem.errors import InvalidTaskOptionsError, TaskTimeoutError
from stem.results import Reason, TaskStatus
from stem.task import HANDLER_FILLED
from stem.worker.progress import StatusBoard
from .support import NO_SIGNALS, wait_until, worker_env
from .test_worker import isolation  # noqa: F401 - fixtures

SHORT = 0.5     # seconds: a lifetime a test waits out
LONG = 3600.0


# -- options and envelopes ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["result_ttl", "failure_ttl"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "60"])
def test_a_lifetime_that_is_not_finite_positive_seconds_is_refused(name, value):
    with pytest.raises(InvalidTaskOptionsError, match=name):
        TaskOptions(**{name: value})


@pytest.mark.parametrize("value", [1, 0, "yes", 1.0])
def test_ignore_result_must_be_a_bool(value):
    with pytest.raises(InvalidTaskOptionsError, match="ignore_result"):
        TaskOptions(ignore_result=value)


def test_the_result_options_are_not_left_for_the_worker_through_unset_options():
    """They have no default: None in the envelope already says "not set"."""
    assert not {"result_ttl", "failure_ttl", "ignore_result"} & set(HANDLER_FILLED)


@pytest.fixture
def producer():
    registry = TaskRegistry()
    registry.task("kept", options=TaskOptions(result_ttl=60.0, failure_ttl=600.0, ignore_result=True))(
        lambda ctx: None)
    registry.task("plain")(lambda ctx: None)
    return Stem(InMemoryBroker(), InMemoryResultBackend(), registry)


def _envelopes(stem, queue="default"):
    return [decode_frame(d.frame) for d in stem.broker.consume([queue], 100, 1.0)]


def test_the_envelope_carries_the_resolved_options_enqueue_over_handler(producer):
    producer.enqueue("kept")
    producer.enqueue("kept", options=TaskOptions(result_ttl=5.0, ignore_result=False))
    producer.enqueue("plain")
    producer.enqueue("plain", options=TaskOptions(failure_ttl=7.0))
    got = [(e.result_ttl, e.failure_ttl, e.ignore_result) for e in _envelopes(producer)]
    assert got == [(60.0, 600.0, True), (5.0, 600.0, False), (None, None, None), (None, 7.0, None)]


@pytest.mark.parametrize("items", [
    [("kept", {})] * 3,                                                # the uniform batch path
    [("kept", {}), ("plain", {}, TaskOptions(result_ttl=5.0)), ("kept", {})],
    [{"name": "kept"}, {"name": "plain", "options": TaskOptions(result_ttl=5.0)}, ("kept", {})],
])
def test_enqueue_many_frames_them_on_every_path(producer, items):
    producer.enqueue_many(items)
    envs = {(e.name, e.result_ttl, e.failure_ttl, e.ignore_result) for e in _envelopes(producer)}
    expected = {("kept", 60.0, 600.0, True)}
    if len(envs) > 1:
        expected.add(("plain", 5.0, None, None))
    assert envs == expected


def test_a_producer_without_the_registry_sends_only_what_it_was_told():
    stem = Stem(InMemoryBroker(), InMemoryResultBackend())
    stem.enqueue("kept")
    stem.enqueue("kept", options=TaskOptions(result_ttl=5.0))
    stem.enqueue_many([("kept", {})] * 2)
    envs = _envelopes(stem)
    assert [(e.result_ttl, e.failure_ttl, e.ignore_result) for e in envs] == [
        (None, None, None), (5.0, None, None), (None, None, None), (None, None, None)]
    assert all(not {"result_ttl", "failure_ttl", "ignore_result"} & set(e.unset_options) for e in envs)


def test_an_explicit_id_stays_refused_as_long_as_its_result_lives(producer, monkeypatch):
    lingers = []
    real = producer.broker.publish_keyed

    def spy(items):
        lingers.extend(k.linger for k in items)
        return real(items)

    monkeypatch.setattr(producer.broker, "publish_keyed", spy)
    producer.enqueue("kept", task_id="a")                                       # the handler's result_ttl
    producer.enqueue("plain", task_id="b", options=TaskOptions(result_ttl=9.0))  # the enqueue's
    producer.enqueue("plain", task_id="c")                                      # the backend's result_expires
    producer.enqueue("kept", task_id="d", idempotent_for=3.0)                   # said outright
    assert lingers == [60.0, 9.0, producer.backend.result_expires, 3.0]


# -- the worker -----------------------------------------------------------------------------------
class Recorder:
    """Every status the backend was asked to store, by id (whatever path stored it): a test
    reads a short-lived status here, where it cannot expire before the test looks."""

    def __init__(self, backend, monkeypatch):
        self.seen: dict[str, list[TaskStatus]] = {}
        for name in ("store_many", "store_if_not_terminal"):
            real = getattr(backend, name)
            monkeypatch.setattr(backend, name, self._spy(real))

    def _spy(self, real):
        def spy(statuses):
            for s in statuses:
                self.seen.setdefault(s.id, []).append(s)
            return real(statuses)
        return spy

    def terminal(self, task_id: str, timeout: float = 20.0) -> TaskStatus:
        assert wait_until(lambda: any(s.is_terminal for s in self.seen.get(task_id, ())), timeout=timeout)
        return next(s for s in self.seen[task_id] if s.is_terminal)


@pytest.fixture
def env(isolation, monkeypatch, tmp_path):
    for e in worker_env(isolation, start=True, tmp=tmp_path):
        e.recorder = Recorder(e.backend, monkeypatch)
        yield e


def fail(ctx):
    raise ValueError("boom")


def test_a_success_lives_result_ttl_and_a_failure_failure_ttl(env):
    opts = TaskOptions(result_ttl=SHORT, failure_ttl=LONG)
    env.registry.task("ok", options=opts)(lambda ctx: "done")
    env.registry.task("bad", options=opts)(fail)
    env.registry.task("plain")(lambda ctx: "kept")
    env.worker()
    ok, bad, plain = env.stem.enqueue("ok"), env.stem.enqueue("bad"), env.stem.enqueue("plain")
    assert env.recorder.terminal(ok).ttl == SHORT
    failed = env.stem.wait_for_task(bad, timeout=20)
    assert (failed.state, failed.ttl) == (TaskState.FAILED, LONG)
    assert env.stem.wait_for_task(plain, timeout=20).ttl is None
    assert wait_until(lambda: env.stem.get_status(ok).state is TaskState.PENDING, timeout=10)
    assert env.stem.get_status(bad).state is TaskState.FAILED
    assert env.stem.get_status(plain).result == "kept"


def test_a_failure_without_failure_ttl_lives_result_ttl_and_the_enqueue_overrides_the_handler(env):
    env.registry.task("bad", options=TaskOptions(result_ttl=LONG))(fail)
    env.worker()
    own = env.stem.enqueue("bad")
    told = env.stem.enqueue("bad", options=TaskOptions(failure_ttl=SHORT))
    assert env.stem.wait_for_task(own, timeout=20).ttl == LONG
    assert env.recorder.terminal(told).ttl == SHORT
    assert wait_until(lambda: env.stem.get_status(told).state is TaskState.PENDING, timeout=10)
    assert env.stem.get_status(own).state is TaskState.FAILED


def test_the_worker_takes_the_handlers_options_when_the_producer_has_no_registry(env):
    env.registry.task("ok", options=TaskOptions(result_ttl=SHORT, failure_ttl=LONG))(lambda ctx: 1)
    env.registry.task("quiet", options=TaskOptions(ignore_result=True))(lambda ctx: 1)
    bare = Stem(env.broker, env.backend)
    env.worker()
    ok = bare.enqueue("ok")
    told = bare.enqueue("ok", options=TaskOptions(result_ttl=LONG))
    loud = bare.enqueue("quiet", options=TaskOptions(ignore_result=False))
    assert env.recorder.terminal(ok).ttl == SHORT
    assert bare.wait_for_task(told, timeout=20).ttl == LONG
    assert bare.wait_for_task(loud, timeout=20).state is TaskState.SUCCEEDED
    quiet = bare.enqueue("quiet")
    with pytest.raises(TaskTimeoutError):
        bare.wait_for_task(quiet, timeout=0.5)
    assert wait_until(lambda: env.broker.stats("default").in_flight == 0 and env.broker.stats("default").ready == 0)
    assert quiet not in env.recorder.seen


def test_ignore_result_stores_nothing_for_a_success_and_still_acks(env):
    flag = str(env.tmp / "go")

    def slow(ctx):
        ctx.progress(0.5)
        deadline = time.monotonic() + 20
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.005)
        return "done"

    env.registry.task("quiet", options=TaskOptions(ignore_result=True))(slow)
    env.registry.task("first", options=TaskOptions(ignore_result=True, max_retries=1))(
        lambda ctx: fail(ctx) if ctx.attempt == 0 else "second time")
    noted, drained = [], []
    real_progress, real_flush = StatusBoard.progress, StatusBoard.flush

    def progress(self, envelope, *a, **k):
        noted.append(envelope.id)
        return real_progress(self, envelope, *a, **k)

    def flush(self, now, **k):
        seen = bool(noted)
        real_flush(self, now, **k)
        if seen and not self._pending:   # nothing noted is left unwritten
            drained.append(now)

    mp = pytest.MonkeyPatch()
    mp.setattr(StatusBoard, "progress", progress)
    mp.setattr(StatusBoard, "flush", flush)
    try:
        w = env.worker()
        quiet = env.stem.enqueue("quiet")
        assert wait_until(lambda: quiet in noted, timeout=20)           # the supervisor has its progress call
        assert wait_until(lambda: drained, timeout=20)                  # and has written all it noted since
        open(flag, "w").close()
        retried = env.stem.enqueue("first")
        assert wait_until(lambda: w.stats()["succeeded"] == 2, timeout=20)
    finally:
        mp.undo()
    assert w.stats()["retried"] == 1
    assert quiet not in env.recorder.seen and retried not in env.recorder.seen   # no RUNNING, RETRYING, SUCCEEDED
    assert env.stem.get_status(quiet).state is TaskState.PENDING
    with pytest.raises(TaskTimeoutError):
        env.stem.wait_for_task(quiet, timeout=0.2)
    stats = env.broker.stats("default")
    assert (stats.ready, stats.in_flight) == (0, 0)


def test_ignore_result_still_stores_failures_with_their_lifetime(env):
    env.registry.task("bad", options=TaskOptions(ignore_result=True, failure_ttl=LONG))(fail)
    env.worker()
    status = env.stem.wait_for_task(env.stem.enqueue("bad"), timeout=20)
    assert (status.state, status.error, status.ttl) == (TaskState.FAILED, "boom", LONG)


def test_a_retrying_status_lives_until_its_retry_is_due_whatever_the_tasks_lifetime(env):
    flag = str(env.tmp / "go")

    def flaky(ctx):
        if ctx.attempt == 0:
            raise ValueError("once")
        deadline = time.monotonic() + 20
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.005)
        return "second"

    env.registry.task("flaky", options=TaskOptions(result_ttl=SHORT, max_retries=1))(flaky)
    env.worker()
    tid = env.stem.enqueue("flaky")
    assert wait_until(lambda: any(s.state is TaskState.RETRYING for s in env.recorder.seen.get(tid, ())), timeout=20)
    [retrying] = [s for s in env.recorder.seen[tid] if s.state is TaskState.RETRYING]
    assert retrying.ttl >= env.backend.result_expires
    open(flag, "w").close()
    assert env.recorder.terminal(tid).ttl == SHORT


def test_a_task_revoked_before_it_ran_keeps_its_revoked_status_for_its_failure_ttl(env):
    env.registry.task("t", options=TaskOptions(failure_ttl=SHORT))(lambda ctx: 1)
    tid = env.stem.enqueue("t")
    env.stem.revoke(tid)
    env.worker()
    status = env.recorder.terminal(tid)
    assert (status.state, status.reason, status.ttl) == (TaskState.REVOKED, Reason.REVOKED, SHORT)
    assert wait_until(lambda: env.stem.get_status(tid).state is TaskState.PENDING, timeout=10)


@pytest.mark.parametrize("field", ["result_ttl", "failure_ttl"])
def test_a_frame_with_a_lifetime_no_producer_makes_ends_dead_with_a_storable_status(env, field):
    env.registry.task("t")(lambda ctx: 1)
    env.broker.publish(Message("forged", "default", encode_frame(Envelope("forged", "t", **{field: -1.0}))))
    env.worker()
    status = env.stem.wait_for_task("forged", timeout=20)
    assert (status.state, status.reason, status.ttl) == (TaskState.DEAD, Reason.DECODE_ERROR, None)
    assert field in status.error


def test_the_status_board_notes_nothing_for_an_ignore_result_task():
    backend = InMemoryResultBackend()
    board = StatusBoard(backend, "w1")
    quiet, loud = Envelope("q", "t", ignore_result=True), Envelope("l", "t", result_ttl=SHORT, failure_ttl=LONG)
    board.started(quiet, 1.0)
    board.progress(quiet, 1.0, 0.5, None)
    board.started(loud, 1.0)
    board.flush(0.0, force=True)
    assert backend.get("q") is None
    assert (backend.get("l").state, backend.get("l").ttl) == (TaskState.RUNNING, LONG)   # the longer of the two


# -- end to end on Redis, results and acks in one round trip ------------------------------------
@pytest.mark.redis
def test_lifetimes_and_ignore_result_on_redis(redis_url, namespace, isolation):
    """Each key's PX is the task's lifetime (expiry itself: the contract suite)."""
    import redis
    from stem.backends.redis import RedisResultBackend
    from stem.brokers.redis import RedisBroker
    registry = TaskRegistry()
    registry.task("ok", options=TaskOptions(result_ttl=30))(lambda ctx, n: n)
    registry.task("bad", options=TaskOptions(result_ttl=30, failure_ttl=LONG))(fail)
    registry.task("quiet", options=TaskOptions(ignore_result=True))(lambda ctx, n: n)
    broker = RedisBroker(redis_url, namespace=namespace)
    backend = RedisResultBackend(redis_url, namespace=namespace, result_expires=60)
    stem = Stem(broker, backend, registry)
    w = Worker(broker, backend, registry, concurrency=2, lifecycle=NO_SIGNALS, isolation=isolation)
    try:
        assert backend.shares_store_with(broker)
        ok = stem.enqueue_many([("ok", {"n": i}) for i in range(50)])
        quiet = stem.enqueue_many([("quiet", {"n": i}) for i in range(50)])
        bad = stem.enqueue("bad")
        w.run_in_background()
        assert [stem.wait_for_task(i, timeout=30).result for i in ok] == list(range(50))
        assert stem.wait_for_task(bad, timeout=30).state is TaskState.FAILED
        assert wait_until(lambda: w.stats()["succeeded"] == 100, timeout=30)
        assert all(s is None for s in backend.get_many(quiet))
        with redis.Redis.from_url(redis_url) as raw:
            def pttl(i):
                return raw.pttl(f"{namespace}:{{t:{i}}}:status")
            assert all(20_000 < pttl(i) <= 30_000 for i in ok)
            assert pttl(bad) > 3_500_000                        # outlives the backend's 60 s
            assert all(pttl(i) == -2 for i in quiet)           # no key at all
        assert backend.get(bad).state is TaskState.FAILED and backend.get(bad).ttl == LONG
        assert broker.stats("default")[1:3] == (0, 0)
    finally:
        w.shutdown(ShutdownMode.HARD, timeout=15)
        stem.close()
