"""The scheduler, pass by pass on a fake clock (``run_once(now)``), against the memory broker
and backend: each run published once however many schedulers share them, overlap and
catch-up policies, pauses, stored definitions, what it records, signals, metrics, heartbeats."""

from __future__ import annotations

import collections
import logging
import threading
import time

import pytest

from stem import Stem, TaskRegistry
from stem.backends.memory import InMemoryResultBackend
from stem.brokers.memory import InMemoryBroker
from stem.errors import BrokerConnectionError, ConfigurationError, InvalidTaskOptionsError, UnknownTaskError
from stem.results import TaskState, TaskStatus
from stem.scheduler import Scheduler, decode_definition, encode_definition
from stem.schedules import Schedule, at, cron, every
from stem.signals import signals

from .support import wait_for, wait_until

T0 = 1_800_000_000.0     # a round epoch second, 2027-01-15, far from DST changes in UTC


def _registry() -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("report.build")
    def build(ctx, **kw):
        return None

    @registry.task("feed.poll")
    def poll(ctx, **kw):
        return None

    return registry


@pytest.fixture
def world():
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    stem = Stem(broker, backend, _registry())
    yield stem
    stem.close()


def queued_ids(stem: Stem, queue: str = "default") -> list[str]:
    """Every task id in ``queue`` (leased off the queue, so call once per check)."""
    out = []
    while True:
        batch = stem.broker.consume([queue], 1000, 0.0, consumer="test")
        if not batch:
            return out
        out += [d.task_id for d in batch]


def _times(fired) -> list[float]:
    return [f.fire_time for f in fired]


# -- once however many schedulers -------------------------------------------------------------
def test_two_schedulers_walking_the_same_clock_publish_each_run_once(world):
    s = Schedule("poll", task="feed.poll", spec=every(10))
    a, b = Scheduler(world, [s]), Scheduler(world, [s])
    published = []
    for step in range(0, 200):
        now = T0 + step * 0.5
        for sched in (a, b) if step % 2 else (b, a):
            published += [f.run_id for f in sched.run_once(now) if f.published]
    ids = queued_ids(world)
    expected = [s.run_id(T0 + 10 * k) for k in range(10)]
    assert sorted(ids) == sorted(expected)
    assert sorted(published) == sorted(expected)
    assert a.counters["fired"] + b.counters["fired"] == 10


def test_five_schedulers_racing_on_threads_publish_each_run_once(world):
    specs = [Schedule("fast", task="feed.poll", spec=every(1)),
             Schedule("slow", task="report.build", spec=every(3), catch_up="all")]
    schedulers = [Scheduler(world, specs) for _ in range(5)]
    barrier = threading.Barrier(5)
    errors = []

    def walk(sched: Scheduler, skew: float) -> None:
        try:
            for step in range(60):
                barrier.wait(10)
                sched.run_once(T0 + step + skew)
        except Exception as exc:   # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=walk, args=(s, i * 0.1)) for i, s in enumerate(schedulers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    counts = collections.Counter(queued_ids(world))
    assert set(counts.values()) == {1}
    fast = sorted(i for i in counts if i.startswith("sched:fast:"))
    assert fast == sorted(specs[0].run_id(T0 + k) for k in range(-1, 60))   # the first pass: (T0 - grace, T0]
    assert sum(s.counters["fired"] for s in schedulers) == len(counts)
    assert sum(s.counters["duplicates"] for s in schedulers) >= 0


def test_a_scheduler_with_a_stale_record_fires_only_duplicates(world):
    s = Schedule("poll", task="feed.poll", spec=every(10), catch_up="all")
    a = Scheduler(world, [s])
    for k in range(6):
        a.run_once(T0 + 10 * k)
    # another scheduler that starts from the record of long ago (as if paused in mid-pass)
    backend = world.backend
    stale = backend.schedule_records()
    b = Scheduler(world, [s])
    b.backend = type("Stale", (), {"schedule_records": lambda self, ids=None: {"poll": stale["poll"]._replace(
        last_fired=T0)}, "__getattr__": lambda self, name: getattr(backend, name)})()
    fired = b.run_once(T0 + 50)
    assert fired and not any(f.published for f in fired)
    assert sorted(queued_ids(world)) == sorted(s.run_id(T0 + 10 * k) for k in range(6))


# -- what a pass records ---------------------------------------------------------------------
def test_each_published_run_is_marked_fired_with_its_run_id_and_a_pending_status(world):
    s = Schedule("poll", task="feed.poll", spec=every(10), args={"n": 1}, queue="feeds")
    fired = Scheduler(world, [s]).run_once(T0)
    assert [(f.fire_time, f.published, f.late) for f in fired] == [(T0, True, False)]
    record = world.backend.schedule_records()["poll"]
    assert (record.last_fired, record.last_run_id) == (T0, s.run_id(T0))
    status = world.backend.get(s.run_id(T0))
    assert status.state is TaskState.PENDING and status.meta == {"schedule": "poll", "fire_time": T0}
    assert queued_ids(world, "feeds") == [s.run_id(T0)]


def test_a_run_carries_its_args_meta_and_jittered_eta(world):
    s = Schedule("poll", task="feed.poll", spec=every(60), args={"url": "x"}, jitter=30)
    Scheduler(world, [s]).run_once(T0)
    captured = []
    signals.after_task_publish.connect(rec := lambda sender, envelope, **kw: captured.append(envelope))
    try:
        Scheduler(world, [s]).run_once(T0 + 60)
    finally:
        signals.after_task_publish.disconnect(rec)
    env, = captured
    assert env.args == {"url": "x"} and env.meta["fire_time"] == T0 + 60
    assert env.not_before == T0 + 60 + s.jitter_for(T0 + 60)


def test_nothing_is_fired_before_the_first_fire_time_and_a_never_fired_schedule_does_not_catch_up(world):
    s = Schedule("poll", task="feed.poll", spec=every(10), catch_up="all")
    sched = Scheduler(world, [s], tick=1.0)
    assert sched.run_once(T0 + 5) == []           # first pass after T0 + 2 s of grace: T0 is a misfire
    assert world.backend.schedule_records() == {} or world.backend.schedule_records()["poll"].last_fired is None
    assert _times(sched.run_once(T0 + 10.5)) == [T0 + 10]


def test_a_failed_publish_is_not_marked_and_the_next_pass_publishes_it(world):
    s = Schedule("poll", task="feed.poll", spec=every(10))
    sched = Scheduler(world, [s])
    sched.run_once(T0)
    real = world.broker.publish_keyed
    calls = []

    def broken(items):
        calls.append(items)
        raise BrokerConnectionError("broker down (injected)")

    world.broker.publish_keyed = broken
    try:
        assert sched.run_once(T0 + 10) == []
    finally:
        world.broker.publish_keyed = real
    assert calls and sched.counters["errors"] == 1
    assert world.backend.schedule_records()["poll"].last_fired == T0
    assert _times(sched.run_once(T0 + 11)) == [T0 + 10]
    assert sorted(queued_ids(world)) == sorted([s.run_id(T0), s.run_id(T0 + 10)])


# -- catch-up ------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, fired, late", [
    ("none", [T0 + 600], []),
    ("latest", [T0 + 600], []),
    ("all", [T0 + 60 * k for k in range(1, 11)], [T0 + 60 * k for k in range(1, 10)]),
])
def test_after_a_ten_minute_outage_each_policy_fires_its_runs(world, policy, fired, late):
    s = Schedule("report", task="report.build", spec=every(60), catch_up=policy)
    sched = Scheduler(world, [s])
    sched.run_once(T0)
    queued_ids(world)
    got = sched.run_once(T0 + 600.5)
    assert _times(got) == fired
    assert [f.fire_time for f in got if f.late] == late
    assert sorted(queued_ids(world)) == sorted(s.run_id(t) for t in fired)
    assert world.backend.schedule_records()["report"].last_fired == T0 + 600


def test_latest_fires_the_newest_misfire_when_no_run_is_on_time(world):
    s = Schedule("report", task="report.build", spec=every(60), catch_up="latest")
    sched = Scheduler(world, [s])
    sched.run_once(T0)
    got = sched.run_once(T0 + 630)
    assert [(f.fire_time, f.late) for f in got] == [(T0 + 600, True)]
    assert sched.counters["caught_up"] == 1 and sched.counters["skipped"] == 9


def test_skipped_misfires_are_marked_fired_so_the_next_pass_does_not_skip_them_again(world):
    s = Schedule("report", task="report.build", spec=every(60), catch_up="none")
    sched = Scheduler(world, [s])
    sched.run_once(T0)
    skipped = []
    signals.schedule_skipped.connect(rec := lambda sender, fire_times, reason, **kw: skipped.append(
        (reason, list(fire_times))))
    try:
        assert sched.run_once(T0 + 630) == []
        record = world.backend.schedule_records()["report"]
        assert record.last_fired == T0 + 600
        assert record.last_run_id == s.run_id(T0)      # the newest run published, for the overlap check
        assert sched.run_once(T0 + 631) == []
        assert sched.run_once(T0 + 632) == []
    finally:
        signals.schedule_skipped.disconnect(rec)
    assert skipped == [("misfire", [T0 + 60 * k for k in range(1, 11)])]
    assert _times(sched.run_once(T0 + 660)) == [T0 + 660]


# -- overlap ---------------------------------------------------------------------------------
def _finish(stem: Stem, run_id: str, state: TaskState = TaskState.SUCCEEDED) -> None:
    stem.backend.store(TaskStatus(id=run_id, state=state))


def test_overlap_skip_skips_while_the_previous_run_is_queued_or_running(world):
    s = Schedule("r", task="report.build", spec=every(10), overlap="skip")
    sched = Scheduler(world, [s])
    assert _times(sched.run_once(T0)) == [T0]
    assert sched.run_once(T0 + 10) == []                                    # T0's run is PENDING
    record = world.backend.schedule_records()["r"]
    assert (record.last_fired, record.last_run_id) == (T0 + 10, s.run_id(T0))
    world.backend.store_if_not_terminal([TaskStatus(id=s.run_id(T0), state=TaskState.RUNNING)])
    assert sched.run_once(T0 + 20) == []                                    # running
    world.backend.store_if_not_terminal([TaskStatus(id=s.run_id(T0), state=TaskState.RETRYING)])
    assert sched.run_once(T0 + 30) == []                                    # retrying
    _finish(world, s.run_id(T0))
    assert _times(sched.run_once(T0 + 40)) == [T0 + 40]
    assert sorted(queued_ids(world)) == sorted([s.run_id(T0), s.run_id(T0 + 40)])


def test_overlap_queue_one_skips_only_while_the_previous_run_has_not_started(world):
    s = Schedule("r", task="report.build", spec=every(10), overlap="queue_one")
    sched = Scheduler(world, [s])
    sched.run_once(T0)
    assert sched.run_once(T0 + 10) == []                                    # still PENDING: skipped
    world.backend.store_if_not_terminal([TaskStatus(id=s.run_id(T0), state=TaskState.RUNNING)])
    assert _times(sched.run_once(T0 + 20)) == [T0 + 20]                     # started: one more queued
    assert sched.run_once(T0 + 30) == []                                    # T0+20 not started
    _finish(world, s.run_id(T0 + 20), TaskState.FAILED)
    assert _times(sched.run_once(T0 + 40)) == [T0 + 40]


def test_overlap_allow_fires_whatever_the_previous_run_does(world):
    s = Schedule("r", task="report.build", spec=every(10), overlap="allow")
    sched = Scheduler(world, [s])
    assert [len(sched.run_once(T0 + 10 * k)) for k in range(4)] == [1, 1, 1, 1]


def test_overlap_skip_with_catch_up_all_fires_the_first_misfire_and_skips_the_rest(world):
    s = Schedule("r", task="report.build", spec=every(10), overlap="skip", catch_up="all")
    sched = Scheduler(world, [s])
    sched.run_once(T0)
    _finish(world, s.run_id(T0))
    assert _times(sched.run_once(T0 + 50)) == [T0 + 10]
    record = world.backend.schedule_records()["r"]
    assert (record.last_fired, record.last_run_id) == (T0 + 50, s.run_id(T0 + 10))


def test_an_expired_previous_status_blocks_nothing(world):
    s = Schedule("r", task="report.build", spec=every(10), overlap="skip")
    sched = Scheduler(world, [s])
    sched.run_once(T0)
    world.backend.forget(s.run_id(T0))
    assert _times(sched.run_once(T0 + 10)) == [T0 + 10]


# -- pause, stored definitions ----------------------------------------------------------------
def test_a_paused_schedule_fires_nothing_and_its_runs_are_settled_so_resume_does_not_catch_up(world):
    s = Schedule("r", task="report.build", spec=every(10), catch_up="all")
    sched = Scheduler(world, [s])
    sched.run_once(T0)
    assert world.backend.pause_schedule("r", True) is True
    assert sched.run_once(T0 + 10) == [] and sched.run_once(T0 + 35) == []
    assert world.backend.schedule_records()["r"].last_fired == T0 + 30
    assert world.backend.pause_schedule("r", False) is True
    assert _times(sched.run_once(T0 + 40)) == [T0 + 40]
    assert sorted(queued_ids(world)) == sorted([s.run_id(T0), s.run_id(T0 + 40)])


def test_a_code_schedule_paused_before_it_ever_fired_stays_silent(world):
    s = Schedule("r", task="report.build", spec=every(10))
    world.backend.pause_schedule("r", True)
    sched = Scheduler(world, [s])
    assert sched.run_once(T0) == []
    assert queued_ids(world) == []


def test_stored_definitions_are_picked_up_changed_and_dropped_at_run_time(world):
    sched = Scheduler(world, [])
    assert sched.run_once(T0) == []
    s = Schedule("added", task="feed.poll", spec=every(10), args={"v": 1})
    world.backend.put_schedule("added", encode_definition(s))
    assert _times(sched.run_once(T0 + 10)) == [T0 + 10]
    changed = Schedule("added", task="feed.poll", spec=every(5), args={"v": 2})
    world.backend.put_schedule("added", encode_definition(changed))
    assert _times(sched.run_once(T0 + 15)) == [T0 + 15]
    world.backend.remove_schedule("added")
    assert sched.run_once(T0 + 20) == []


def test_a_stored_definition_that_cannot_be_read_is_skipped_with_one_warning(world, caplog):
    world.backend.put_schedule("broken", b"\xc1 not msgpack")
    good = Schedule("good", task="feed.poll", spec=every(10))
    world.backend.put_schedule("good", encode_definition(good))
    sched = Scheduler(world, [])
    with caplog.at_level(logging.WARNING, logger="stem.scheduler"):
        assert _times(sched.run_once(T0)) == [T0]
        sched.run_once(T0 + 1)
    assert len([r for r in caplog.records if "broken" in r.getMessage()]) == 1


def test_a_code_schedule_wins_over_a_stored_one_with_its_id(world, caplog):
    code = Schedule("r", task="report.build", spec=every(10))
    world.backend.put_schedule("r", encode_definition(Schedule("r", task="feed.poll", spec=every(1))))
    with caplog.at_level(logging.WARNING, logger="stem.scheduler"):
        fired = Scheduler(world, [code]).run_once(T0)
    assert _times(fired) == [T0]
    assert any("declared in code and stored" in r.getMessage() for r in caplog.records)


def test_a_stored_schedule_of_a_task_the_registry_lacks_logs_and_leaves_the_others_firing(world, caplog):
    world.backend.put_schedule("typo", encode_definition(Schedule("typo", task="feed.pol", spec=every(10))))
    sched = Scheduler(world, [Schedule("r", task="report.build", spec=every(10))])
    with caplog.at_level(logging.WARNING, logger="stem.scheduler"):
        fired = sched.run_once(T0)
    assert [f.schedule_id for f in fired] == ["r"]
    assert any("feed.pol" in r.getMessage() and "did you mean" in r.getMessage() for r in caplog.records)


def test_schedule_records_survive_the_memory_backends_sweep_of_expired_statuses(world):
    s = Schedule("r", task="report.build", spec=every(10))
    Scheduler(world, [s]).run_once(T0)
    world.backend.store_many([TaskStatus(id=str(i), state=TaskState.SUCCEEDED) for i in range(5000)])
    world.backend.store_many([TaskStatus(id=f"more-{i}", state=TaskState.SUCCEEDED) for i in range(3000)])
    assert world.backend.schedule_records()["r"].last_fired == T0


def test_definitions_round_trip_and_garbage_is_refused():
    s = Schedule("x", task="a.b", spec=cron("30 2 * * *", tz="Europe/Berlin"), args={"k": [1, 2]}, jitter=3)
    assert decode_definition(encode_definition(s)) == s
    with pytest.raises(InvalidTaskOptionsError):
        decode_definition(b"\xc1")
    with pytest.raises(InvalidTaskOptionsError):
        decode_definition(b"\x80")   # {}


def test_a_one_shot_fires_once(world):
    s = Schedule("once", task="feed.poll", spec=at(T0 + 5))
    sched = Scheduler(world, [s])
    assert [len(sched.run_once(T0 + k)) for k in range(10)] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]


# -- signals, metrics ------------------------------------------------------------------------
def test_signals_report_fired_and_skipped_runs(world):
    s = Schedule("r", task="report.build", spec=every(60), catch_up="latest")
    fired, skipped = [], []
    r1 = signals.schedule_fired.connect(lambda sender, **kw: fired.append((kw["run_id"], kw["late"])))
    r2 = signals.schedule_skipped.connect(lambda sender, **kw: skipped.append((kw["reason"], len(kw["fire_times"]))))
    try:
        sched = Scheduler(world, [s])
        sched.run_once(T0)
        Scheduler(world, [s]).run_once(T0)        # a duplicate: no signal
        sched.run_once(T0 + 630)
    finally:
        signals.schedule_fired.disconnect(r1)
        signals.schedule_skipped.disconnect(r2)
    assert fired == [(s.run_id(T0), False), (s.run_id(T0 + 600), True)]
    assert skipped == [("misfire", 9)]


def test_metrics_count_fired_caught_up_and_skipped_runs(world):
    prometheus_client = pytest.importorskip("prometheus_client")
    from stem import metrics
    metrics.uninstall()
    m = metrics.install(prometheus_client.CollectorRegistry())
    try:
        s = Schedule("r", task="report.build", spec=every(60), catch_up="latest", overlap="skip")
        sched = Scheduler(world, [s])
        sched.run_once(T0)
        _finish(world, s.run_id(T0))
        sched.run_once(T0 + 630)      # 9 misfires skipped, the newest caught up
        sched.run_once(T0 + 660)      # the caught-up run is pending: overlap skip
    finally:
        metrics.uninstall()
    value = m.registry.get_sample_value
    assert value("stem_schedule_runs_fired_total", {"schedule": "r"}) == 2
    assert value("stem_schedule_runs_caught_up_total", {"schedule": "r"}) == 1
    assert value("stem_schedule_runs_skipped_total", {"schedule": "r", "reason": "misfire"}) == 9
    assert value("stem_schedule_runs_skipped_total", {"schedule": "r", "reason": "overlap"}) == 1


# -- running: the loop, heartbeats, stop -----------------------------------------------------
def test_the_loop_fires_on_the_real_clock_and_heartbeats_as_a_scheduler(world):
    from stem.control import Control
    from stem.status import worker_rows
    s = Schedule("tick", task="feed.poll", spec=every(1))
    sched = Scheduler(world, [s], tick=0.5, heartbeat_interval=0.2, scheduler_id="beat-1").run_in_background()
    try:
        wait_for(lambda: sched.counters["fired"] >= 2, timeout=10, what="two runs fired")
        wait_for(lambda: any(h["worker_id"] == "beat-1" for h in world.backend.heartbeats()), timeout=10,
                 what="the scheduler's heartbeat")
        row, = [r for r in worker_rows(world.backend) if r["id"] == "beat-1"]
        assert row["kind"] == "scheduler" and row["schedules"] == 1 and row["fired"] >= 1 and not row["lost"]
        assert Control(world.broker, world.backend).workers() == []   # takes no control commands
    finally:
        started = time.monotonic()
        assert sched.stop(5.0)
        assert time.monotonic() - started < 2.0
    assert not any(h["worker_id"] == "beat-1" for h in world.backend.heartbeats())
    ids = queued_ids(world)
    assert len(ids) == len(set(ids)) >= 2


def test_stop_wakes_a_scheduler_sleeping_a_long_tick(world):
    sched = Scheduler(world, [Schedule("h", task="feed.poll", spec=every(3600))], tick=60).run_in_background()
    wait_until(lambda: sched.counters["passes"] >= 1, timeout=5)
    started = time.monotonic()
    assert sched.stop(5.0)
    assert time.monotonic() - started < 1.0


def test_the_loop_sleeps_until_the_next_fire_time_not_a_whole_tick(world):
    sched = Scheduler(world, [Schedule("s", task="feed.poll", spec=every(10))], tick=5.0)
    sched.run_once(T0 + 9.7)
    assert sched.next_wake(T0 + 9.7) == pytest.approx(0.3)
    assert sched.next_wake(T0 + 1) == pytest.approx(5.0)


def test_a_pass_that_fails_is_retried_and_the_loop_goes_on(world):
    sched = Scheduler(world, [Schedule("s", task="feed.poll", spec=every(1))], tick=0.2)
    real = world.backend.schedule_records
    failures = []

    def flaky(ids=None):
        if len(failures) < 2:
            failures.append(1)
            from stem.errors import BackendConnectionError
            raise BackendConnectionError("backend down (injected)")
        return real(ids)

    world.backend.schedule_records = flaky
    sched.run_in_background()
    try:
        wait_for(lambda: sched.counters["fired"] >= 1, timeout=10, what="a run after two failed passes")
    finally:
        sched.stop(5.0)
    assert sched.counters["errors"] >= 2


# -- construction and the registry ---------------------------------------------------------
def test_the_registry_holds_schedules_and_refuses_duplicates_and_unknown_tasks():
    registry = _registry()
    s = registry.schedule(Schedule("r", task="report.build", spec=every(60)))
    assert registry.schedules == [s]
    with pytest.raises(ConfigurationError, match="already declared"):
        registry.schedule(Schedule("r", task="feed.poll", spec=every(60)))
    with pytest.raises(UnknownTaskError, match="did you mean 'report.build'"):
        registry.schedule(Schedule("x", task="report.buil", spec=every(60)))
    with pytest.raises(InvalidTaskOptionsError):
        registry.schedule("r")
    assert registry.schedules == [s]


def test_a_scheduler_takes_the_registrys_schedules_by_default(world):
    world.registry.schedule(Schedule("r", task="report.build", spec=every(60)))
    assert list(Scheduler(world).schedules) == ["r"]
    assert list(Scheduler(world, []).schedules) == []


def test_bad_construction_is_refused():
    broker = InMemoryBroker()
    with pytest.raises(ConfigurationError, match="result backend"):
        Scheduler(Stem(broker))
    stem = Stem(broker, InMemoryResultBackend())
    s = Schedule("r", task="report.build", spec=every(60))
    with pytest.raises(ConfigurationError, match="unique"):
        Scheduler(stem, [s, s])
    with pytest.raises(ConfigurationError):
        Scheduler(stem, ["r"])
    with pytest.raises(ConfigurationError):
        Scheduler(stem, [s], tick=0)
    with pytest.raises(ConfigurationError):
        Scheduler(stem, [s], clock=3)
    with pytest.raises(ConfigurationError):
        Scheduler("redis://")
    with pytest.raises(ConfigurationError):
        Scheduler(stem, [s], scheduler_id=" ")


def test_a_worker_with_beat_fires_its_registrys_schedules_and_stops_them_with_it():
    from stem import Worker
    registry = _registry()
    registry.schedule(Schedule("w", task="feed.poll", spec=every(1), queue="beats"))
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    w = Worker(broker, backend, registry, isolation="inline", concurrency=1, beat=True, heartbeat_interval=0.2)
    w.run_in_background()
    try:
        wait_for(lambda: broker.stats("beats").ready >= 1, timeout=10, what="a run from the worker's scheduler")
        wait_for(lambda: any(h.get("kind") == "scheduler" for h in backend.heartbeats()), timeout=10,
                 what="the embedded scheduler's heartbeat")
    finally:
        assert w.shutdown(timeout=10)
    assert not w._scheduler._thread.is_alive()
    with pytest.raises(ConfigurationError):
        Worker(broker, None, registry, isolation="inline", beat=True)
