"""Autoscaling: the policy sample by sample (a fake clock), its validation, and real workers
growing under a step load and shrinking when idle without running any task twice."""

from __future__ import annotations

import collections
import os
import time

import pytest

from stem import ShutdownMode, Stem, TaskRegistry, TaskState, Worker, signals
from stem import status as stem_status
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.control import Control
from stem.errors import ConfigurationError
from stem.worker import WorkerAutoscaleConfig
from stem.worker.autoscale import MEMORY_RESERVE, Autoscaler, AutoscalePolicy, Sample

from .support import wait_for
from .test_worker import NO_SIGNALS, Journal

TICK = 0.25   # one sample per tick (the worker samples every 0.1 s; a quarter keeps the float sums exact)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def drive(phases, concurrency, *, headroom=None, **settings):
    """Feed the policy one sample per TICK through ``phases`` of ``(seconds, busy, waiting)``
    (``busy``: slots running something, "all" for every slot), applying each decision as the
    worker does.  Returns the final concurrency and the changes as ``(seconds, delta)``."""
    settings.setdefault("max_concurrency", 8)
    clock = FakeClock()
    policy = AutoscalePolicy(WorkerAutoscaleConfig(**settings), clock=clock, headroom=headroom)
    c, changes = concurrency, []
    for seconds, busy, waiting in phases:
        for _ in range(round(seconds / TICK)):
            clock.t += TICK
            running = c if busy == "all" else min(busy, c)
            decision = policy.decide(Sample(c, c - running, waiting))
            if decision is not None:
                c += decision.delta
                policy.resized(decision.delta)
                changes.append((clock.t, decision.delta))
    return c, changes


FAST = dict(grow_after=1.0, keep_alive=3.0, cooldown=0.5)

# (settings and samples, final concurrency, changes as (seconds, delta)); the first sample is at 0.25 s
POLICY_CASES = {
    "a_sustained_backlog_grows_the_pool_by_one_step_after_the_window": (
        dict(phases=[(1.25, "all", 4)], concurrency=2, min_concurrency=2, **FAST), 3, [(1.25, 1)]),
    "a_backlog_grows_by_scale_up_step_children_at_once": (
        dict(phases=[(1.25, "all", 8)], concurrency=2, min_concurrency=2, scale_up_step=3, **FAST), 5, [(1.25, 3)]),
    "a_grow_adds_no_more_children_than_deliveries_waited": (
        dict(phases=[(1.25, "all", 2)], concurrency=2, min_concurrency=2, scale_up_step=4,
             backlog_per_child=0.5, **FAST), 4, [(1.25, 2)]),
    "a_burst_shorter_than_the_window_changes_nothing": (
        dict(phases=[(0.75, "all", 6), (0.25, 1, 0), (0.75, "all", 6)], concurrency=2, min_concurrency=2,
             **FAST), 2, []),
    "a_backlog_below_backlog_per_child_changes_nothing": (
        dict(phases=[(5.0, "all", 3)], concurrency=4, min_concurrency=2, **FAST), 4, []),
    "a_backlog_after_a_long_busy_spell_without_one_grows_once_the_windows_mean_reaches_it": (
        dict(phases=[(20.0, "all", 0), (1.25, "all", 4)], concurrency=2, min_concurrency=2, **FAST), 3,
        [(20.75, 1)]),
    "busy_slots_without_a_backlog_change_nothing": (
        dict(phases=[(5.0, "all", 0)], concurrency=2, min_concurrency=2, **FAST), 2, []),
    "a_sustained_backlog_grows_one_step_per_window_up_to_max": (
        dict(phases=[(10.0, "all", 40)], concurrency=2, min_concurrency=2, max_concurrency=5, **FAST),
        5, [(1.25, 1), (2.5, 1), (3.75, 1)]),
    "a_slot_free_for_keep_alive_shrinks_the_pool_by_one": (
        dict(phases=[(3.25, 1, 0)], concurrency=4, min_concurrency=1, **FAST), 3, [(3.25, -1)]),
    "a_pool_that_stays_slack_shrinks_one_child_per_cooldown_down_to_min": (
        dict(phases=[(10.0, 0, 0)], concurrency=5, min_concurrency=2, **FAST), 2,
        [(3.25, -1), (3.75, -1), (4.25, -1)]),
    "a_pool_busy_at_any_sample_restarts_the_keep_alive_period": (
        dict(phases=[(2.5, 1, 0), (0.25, "all", 0), (2.5, 1, 0)], concurrency=3, min_concurrency=1, **FAST),
        3, []),
    "a_shrink_stops_once_every_slot_is_busy": (
        dict(phases=[(6.0, 2, 0)], concurrency=5, min_concurrency=1, **FAST), 2,
        [(3.25, -1), (3.75, -1), (4.25, -1)]),
    "an_idle_pool_at_min_never_shrinks": (
        dict(phases=[(10.0, 0, 0)], concurrency=2, min_concurrency=2, **FAST), 2, []),
    "a_pool_at_max_never_grows": (
        dict(phases=[(10.0, "all", 50)], concurrency=4, min_concurrency=2, max_concurrency=4, **FAST), 4, []),
    "no_grow_when_the_memory_headroom_is_short": (
        dict(phases=[(5.0, "all", 10)], concurrency=2, min_concurrency=2, headroom=lambda n: 0, **FAST), 2, []),
    "a_grow_is_cut_to_what_the_memory_headroom_holds": (
        dict(phases=[(1.25, "all", 10)], concurrency=2, min_concurrency=2, scale_up_step=4,
             headroom=lambda n: min(n, 1), **FAST), 3, [(1.25, 1)]),
    "after_a_grow_no_shrink_within_the_cooldown": (
        dict(phases=[(1.25, "all", 4), (4.0, 0, 0)], concurrency=2, min_concurrency=2,
             grow_after=1.0, keep_alive=0.5, cooldown=4.0), 2, [(1.25, 1), (5.25, -1)]),
    "a_load_between_the_thresholds_never_resizes": (
        dict(phases=[(0.5, "all", 4), (0.25, 2, 0)] * 30, concurrency=3, min_concurrency=1, **FAST), 3, []),
}


@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_policy(case):
    kwargs, final, changes = POLICY_CASES[case]
    kwargs = dict(kwargs)
    assert drive(kwargs.pop("phases"), kwargs.pop("concurrency"), **kwargs) == (final, changes)


def test_a_manual_resize_restarts_the_keep_alive_period():
    clock = FakeClock()
    policy = AutoscalePolicy(WorkerAutoscaleConfig(8, 1, keep_alive=1.0, cooldown=0.5), clock=clock)
    for _ in range(3):
        clock.t += TICK
        assert policy.decide(Sample(4, 2, 0)) is None
    policy.resized(+2, manual=True)   # at 0.75 s: without it, the pool shrank at 1.25 s
    decisions = []
    for _ in range(5):
        clock.t += TICK
        decisions.append(policy.decide(Sample(6, 4, 0)))
    assert [d is not None for d in decisions] == [False, False, False, False, True]
    assert decisions[4].delta == -1


def test_a_grow_held_back_by_memory_is_visible_until_the_pool_has_slack():
    clock = FakeClock()
    policy = AutoscalePolicy(WorkerAutoscaleConfig(8, 1, grow_after=0.5, cooldown=1.0), clock=clock,
                             headroom=lambda n: 0)
    for _ in range(4):
        clock.t += TICK
        assert policy.decide(Sample(2, 0, 6)) is None
    assert policy.held_back == "memory"
    clock.t += TICK
    policy.decide(Sample(2, 1, 0))
    assert policy.held_back is None


def _autoscaler(rss, available, total, max_memory_per_child=None):
    return Autoscaler(WorkerAutoscaleConfig(8, 1), concurrency=lambda: 2, slots_per_child=1, held=lambda: 0,
                      running=lambda: 0, resize=lambda d: 2 + d, child_rss=lambda: rss,
                      max_memory_per_child=max_memory_per_child, memory=lambda: (available, total))


@pytest.mark.parametrize("rss, available, limit, fits", [
    ([100, 100], 1000 + MEMORY_RESERVE * 10_000, None, 8),    # room for ten children of 100: the step of 8 fits
    ([100, 300], 450 + MEMORY_RESERVE * 10_000, None, 2),     # children of 200 on average: two fit in 450
    ([100, 100], 450 + MEMORY_RESERVE * 10_000, 400, 1),      # max_memory_per_child is what a child may grow to
    ([100, 100], 50 + MEMORY_RESERVE * 10_000, None, 0),      # less than one child above the reserve
    ([100, 100], MEMORY_RESERVE * 10_000 - 1, None, 0),       # already inside the reserve
    ([], 1 + MEMORY_RESERVE * 10_000, None, 8),                # threads (inline): no children to budget for
], ids=["room-for-all", "mean-rss", "max-memory-per-child", "less-than-one", "inside-the-reserve", "threads"])
def test_memory_headroom_holds_new_children_at_the_current_childrens_size_above_the_reserve(rss, available, limit,
                                                                                             fits):
    assert _autoscaler(rss, available, 10_000, limit).headroom(8) == fits


# -- settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("autoscale, error", [
    ((2, 8), "max_concurrency >= min_concurrency"),
    ((8, 0), "min_concurrency must be an integer >= 1"),
    (("8", 2), "max_concurrency must be an integer"),
    ((8.0, 2), "max_concurrency must be an integer"),
    ((True, 1), "max_concurrency must be an integer"),
    ((8, 2, 1), "autoscale must be (max, min)"),
    ("8,2", "autoscale must be (max, min)"),
    (8, "autoscale must be (max, min)"),
])
def test_bad_autoscale_is_refused_with_a_configuration_error(autoscale, error):
    with pytest.raises(ConfigurationError, match=error.replace("(", r"\(").replace(")", r"\)")):
        Worker(InMemoryBroker(), None, TaskRegistry(), autoscale=autoscale, isolation="inline")


@pytest.mark.parametrize("field, value", [("grow_after", 0), ("keep_alive", -1.0), ("cooldown", float("nan")),
                                          ("backlog_per_child", 0), ("scale_up_step", 0)])
def test_bad_autoscale_timings_are_refused(field, value):
    with pytest.raises(ConfigurationError, match=field):
        WorkerAutoscaleConfig(8, 2, **{field: value})


def test_concurrency_defaults_to_the_autoscale_minimum_and_must_lie_within_the_range():
    w = Worker(InMemoryBroker(), None, TaskRegistry(), autoscale=(8, 2), isolation="inline")
    assert w.concurrency == 2 and w.prefetch_limit == 2 * 4
    assert Worker(InMemoryBroker(), None, TaskRegistry(), autoscale=(8, 2), concurrency=8,
                  isolation="inline").concurrency == 8
    for outside in (1, 9):
        with pytest.raises(ConfigurationError, match="outside autoscale's range 2..8"):
            Worker(InMemoryBroker(), None, TaskRegistry(), autoscale=(8, 2), concurrency=outside, isolation="inline")


def test_autoscale_needs_a_prefetch_window_that_shows_a_backlog():
    with pytest.raises(ConfigurationError, match="raise prefetch_multiplier to 3 or more"):
        Worker(InMemoryBroker(), None, TaskRegistry(), autoscale=(8, 2), prefetch_multiplier=1, isolation="inline")
    with pytest.raises(ConfigurationError, match="lower backlog_per_child to 0.5"):
        Worker(InMemoryBroker(), None, TaskRegistry(), autoscale=(8, 2), prefetch_multiplier=2, isolation="inline")
    Worker(InMemoryBroker(), None, TaskRegistry(), prefetch_multiplier=2, isolation="inline",
           autoscale=WorkerAutoscaleConfig(8, 2, backlog_per_child=0.5))


def test_stats_say_autoscale_is_off_when_it_is():
    assert Worker(InMemoryBroker(), None, TaskRegistry(), isolation="inline").stats()["autoscale"] is None


# -- the CLI ------------------------------------------------------------------------------------
def _invoke(*args):
    from .test_cli import invoke
    return invoke("worker", "-A", "tests.apps.tasks:registry", "--broker", "memory://", *args)


@pytest.mark.parametrize("value, error", [
    ("8,x", "is not MAX,MIN"), ("8,2,1", "is not MAX,MIN"), ("", "is not MAX,MIN"), ("-1,2", "is not MAX,MIN"),
    ("2,8", "max_concurrency >= min_concurrency"), ("0", "max_concurrency must be an integer >= 1"),
])
def test_stem_worker_refuses_a_bad_autoscale_as_a_usage_error(value, error):
    result = _invoke("--autoscale", value)
    assert result.exit_code == 2, result.output
    assert error in result.output


def test_stem_worker_refuses_a_concurrency_outside_autoscale_before_connecting(monkeypatch):
    import stem.brokers
    monkeypatch.setattr(stem.brokers, "from_url", lambda *a, **kw: pytest.fail("connected before checking"))
    result = _invoke("--autoscale", "8,2", "-c", "9")
    assert result.exit_code == 2 and "outside --autoscale 8,2" in result.output
    result = _invoke("--autoscale", "8,2", "--prefetch-multiplier", "1")
    assert result.exit_code == 2 and "raise prefetch_multiplier" in result.output


def test_stem_worker_autoscale_reaches_the_worker(monkeypatch):
    import stem.logs
    import stem.tracing
    import stem.worker
    seen = {}

    class FakeWorker:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

        def start(self, burst=False):
            seen["burst"] = burst

    monkeypatch.setattr(stem.worker, "Worker", FakeWorker)
    # the test process's logging and signal receivers stay as they are
    monkeypatch.setattr(stem.logs, "configure", lambda *a, **kw: None)
    monkeypatch.setattr(stem.tracing, "install_if_available", lambda *a, **kw: False)
    assert _invoke("--autoscale", "8,2", "--burst").exit_code == 0
    assert seen["autoscale"] == WorkerAutoscaleConfig(8, 2) and seen["concurrency"] is None
    assert _invoke("--autoscale", "6").exit_code == 0
    assert seen["autoscale"] == WorkerAutoscaleConfig(6, 1)
    assert "autoscale" in _invoke("--autoscale", "8,2", "ping").output   # a running worker's option


# -- real workers -------------------------------------------------------------------------------
def _children(w):
    return len(w.stats().get("children") or ()) if w.isolation == "process" else w.stats()["threads"]


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_a_step_load_grows_the_pool_and_an_idle_period_shrinks_it_without_running_a_task_twice(isolation, tmp_path):
    journal = Journal(tmp_path / "runs")
    registry = TaskRegistry()

    @registry.task("work")
    def work(ctx, n):
        time.sleep(0.05)
        journal.add(f"{ctx.id} {os.getpid()}")
        return n

    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    stem = Stem(broker, backend, registry)
    exits = collections.Counter()

    def on_child_exit(sender, reason=None, **kw):
        exits[reason] += 1

    signals.worker_child_shutdown.connect(on_child_exit)
    config = WorkerAutoscaleConfig(4, 1, grow_after=0.2, keep_alive=0.5, cooldown=0.2)
    w = Worker(broker, backend, registry, autoscale=config, lifecycle=NO_SIGNALS, isolation=isolation,
               heartbeat_interval=0.2)
    try:
        w.run_in_background()
        assert w.concurrency == 1 and w.prefetch_limit == 4
        t0 = time.monotonic()
        ids = stem.enqueue_many([("work", {"n": i}) for i in range(160)])
        sizes = {}

        def grown():
            sizes.setdefault(w.concurrency, time.monotonic() - t0)
            return w.concurrency == 4

        wait_for(grown, timeout=30, what="the pool to grow to 4")
        assert w.prefetch_limit == 4 * 4   # the window follows the size
        scale = w.stats()["autoscale"]
        assert (scale["min"], scale["max"], scale["last"], scale["to"], scale["grows"]) == (1, 4, "grow", 4, 3)
        # the idle period: once the backlog is done, children retire one by one, down to min;
        # meanwhile a trickle of delayed tasks keeps reaching the shrinking pool
        trickle = [stem.enqueue("work", {"n": i}, countdown=0.1 * i) for i in range(25)]
        wait_for(lambda: all(stem.get_status(i).state is TaskState.SUCCEEDED for i in ids + trickle), timeout=40,
                 what="every task to succeed")
        t1 = time.monotonic()
        shrinks = {}

        def shrunk():
            shrinks.setdefault(w.concurrency, time.monotonic() - t1)
            return w.concurrency == 1 and _children(w) == 1

        wait_for(shrunk, timeout=30, what="the pool to shrink back to 1")
        assert w.prefetch_limit == 4
        scale = w.stats()["autoscale"]
        assert (scale["last"], scale["to"], scale["shrinks"]) == ("shrink", 1, 3)
        print(f"\n{isolation}: grew to sizes at {sizes} s after the step load; shrank at {shrinks} s after the "
              "last task")
        # no task ran twice, none was redelivered, no child was killed: they were retired
        runs = collections.Counter(line.split()[0] for line in journal.lines())
        assert sorted(runs) == sorted(ids + trickle) and set(runs.values()) == {1}
        stats = w.stats()
        assert stats["received"] == stats["succeeded"] == len(ids) + len(trickle)
        q = broker.stats("default")
        assert (q.ready, q.in_flight, q.dead) == (0, 0, 0)
        if isolation == "process":
            wait_for(lambda: sum(exits.values()) >= 3, what="three child exits")   # sent after the child is gone
            assert dict(exits) == {"shrink": 3}
            assert len({line.split()[1] for line in journal.lines()}) == 4   # four children ran tasks
    finally:
        signals.worker_child_shutdown.disconnect(on_child_exit)
        w.shutdown(ShutdownMode.HARD, timeout=20)


def test_autoscale_is_visible_in_status_and_metrics_and_pool_grow_and_shrink_still_work():
    from prometheus_client import CollectorRegistry, generate_latest

    from stem import metrics as stem_metrics

    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    registry = TaskRegistry()
    registry.task("pid")(lambda ctx: os.getpid())
    config = WorkerAutoscaleConfig(3, 1, keep_alive=30.0)
    w = Worker(broker, backend, registry, autoscale=config, lifecycle=NO_SIGNALS, heartbeat_interval=0.2)
    w.run_in_background()
    metrics = stem_metrics.StemMetrics(CollectorRegistry())
    metrics.connect([w])
    try:
        control = Control(broker, backend)
        wait_for(lambda: w.id in {h["worker_id"] for h in backend.heartbeats()}, what="the first heartbeat")
        [r] = control.pool_grow(3, timeout=10)
        assert r["reply"]["concurrency"] == 4   # a manual resize may leave the range
        wait_for(lambda: len([c for c in w.stats()["children"] if c["state"] == "ready"]) == 4,
                 what="four ready children")
        [r] = control.pool_shrink(2, timeout=10)
        assert r["reply"]["concurrency"] == 2
        wait_for(lambda: len(w.stats()["children"]) == 2, what="two children")
        stem = Stem(broker, backend, registry)
        assert stem.wait_for_task(stem.enqueue("pid"), timeout=30).state is TaskState.SUCCEEDED
        scale = w.stats()["autoscale"]
        assert (scale["last"], scale["from"], scale["to"], scale["reason"]) == ("shrink", 4, 2, "manual")
        assert (scale["grows"], scale["shrinks"]) == (0, 0)   # the autoscaler's own, not the manual ones

        def row():
            rows = [r for r in stem_status.worker_rows(backend) if r["id"] == w.id]
            return rows[0] if rows and (rows[0]["autoscale"] or {}).get("last") == "shrink" else None

        wait_for(row, what="a heartbeat with the manual shrink")
        assert row()["autoscale"]["min"] == 1 and row()["autoscale"]["max"] == 3
        assert stem_status.concurrency_text(row()).startswith("2 (1-3, shrank ")
        text = generate_latest(metrics.registry).decode()
        assert f'stem_worker_autoscale_resizes_total{{direction="grow",worker="{w.id}"}} 0.0' in text
        assert f'stem_worker_autoscale_resizes_total{{direction="shrink",worker="{w.id}"}} 0.0' in text
    finally:
        metrics.disconnect()
        w.shutdown(ShutdownMode.HARD, timeout=20)


def test_a_shrink_right_after_a_grow_retires_children_that_are_still_starting():
    registry = TaskRegistry()
    registry.task("pid")(lambda ctx: os.getpid())
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    w = Worker(broker, backend, registry, concurrency=1, lifecycle=NO_SIGNALS)
    w.run_in_background()
    try:
        assert w.resize(2) == 3
        assert w.resize(-2) == 1   # the two new children have not said ready yet
        wait_for(lambda: len(w.stats()["children"]) == 1, what="one child left")
        stem = Stem(broker, backend, registry)
        assert stem.wait_for_task(stem.enqueue("pid"), timeout=30).state is TaskState.SUCCEEDED
    finally:
        w.shutdown(ShutdownMode.HARD, timeout=20)


def test_both_status_tables_show_the_range_and_the_last_resize_or_what_holds_a_grow_back():
    import io

    from rich.console import Console

    from stem.cli.control import _status_table

    from .test_status import heartbeat, render

    now = time.time()
    backend = InMemoryResultBackend()
    backend.put_heartbeat("w-grew", heartbeat(concurrency=5, autoscale={
        "min": 2, "max": 8, "last": "grow", "at": now - 4.0, "from": 4, "to": 5, "reason": "x", "grows": 3,
        "shrinks": 0, "held_back": None}), ttl=60)
    backend.put_heartbeat("w-held", heartbeat(host="h2", concurrency=3, autoscale={
        "min": 2, "max": 8, "last": "grow", "at": now - 9.0, "grows": 1, "shrinks": 0, "held_back": "memory"}),
        ttl=60)
    backend.put_heartbeat("w-fixed", heartbeat(host="h3", concurrency=2), ttl=60)
    rows = stem_status.worker_rows(backend, now=now)
    assert [r["autoscale"] and r["autoscale"]["max"] for r in rows] == [8, 8, None]
    assert [stem_status.concurrency_text(r, now) for r in rows] == [
        "5 (2-8, grew 4.0s ago)", "3 (2-8, held back: memory)", "2"]
    text = render(stem_status.render_table(rows, now=now))
    assert "5 (2-8, grew 4.0s ago)" in text and "3 (2-8, held back: memory)" in text
    out = Console(record=True, width=220, file=io.StringIO())
    out.print(_status_table(rows, out))
    cli_text = out.export_text()
    assert "(2-8, grew" in cli_text and "(2-8, held back: memory)" in cli_text
