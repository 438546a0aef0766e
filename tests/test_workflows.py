"""Durable workflows, the programming model: an inline worker over the memory store runs runs
made of steps, called tasks, durable sleeps, event waits and child runs; each durable call is
recorded once by position and replayed from the journal."""

from __future__ import annotations

import threading
import uuid

import pytest

from stem.errors import (CallFailedError, ChildFailedError, StepFailedError, WorkflowError)
from stem.results import TaskState
from stem.workflows import StepRetry
from stem.workflows.codec import decode
from stem.workflows.context import call_id, child_id

from .support import wait_for
from .wf_support import App, app, wf_clock  # noqa: F401 - fixtures


def test_a_run_with_a_step_a_call_a_sleep_a_wait_and_a_child_completes_with_every_output(app):
    ran = []

    @app.registry.task("warehouse.ship")
    def ship(ctx, order_id):
        return f"shipped {order_id}"

    @app.wf.step(retry=StepRetry(3, backoff=0.0))
    def charge(ctx, order_id, cents):
        ran.append(ctx.idempotency_key)
        return f"ch-{order_id}-{cents}"

    @app.wf.workflow("review.count")
    def count(ctx, stars):
        return stars * 2

    @app.wf.workflow("order.fulfil")
    def fulfil(ctx, order_id, cents):
        charge_id = charge(ctx, order_id, cents)
        shipped = ctx.call("warehouse.ship", {"order_id": order_id})
        ctx.sleep(0.05)
        review = ctx.wait("review", timeout=30)
        doubled = ctx.start_child("review.count", {"stars": review["stars"]}).result()
        return {"charge": charge_id, "shipped": shipped, "review": review, "doubled": doubled}

    with app.worker():
        assert app.wf.start(app.stem, "order.fulfil", {"order_id": "42", "cents": 999}, run_id="order-42") == "order-42"
        app.wait_status("order-42", "PARKED")
        assert app.wf.send(app.stem, "order-42", "review", {"stars": 5}, event_id="rv-9") is True
        status = app.stem.wait_for_task("order-42", timeout=20)
    assert status.state is TaskState.SUCCEEDED
    assert status.result == {"charge": "ch-42-999", "shipped": "shipped 42", "review": {"stars": 5}, "doubled": 10}
    assert ran == ["order-42:g0:p0"]                       # the step ran once, whatever the replays
    assert app.kinds("order-42") == [
        ("step", charge.name), ("call", "warehouse.ship"), ("call.result", "warehouse.ship"), ("sleep", "sleep"),
        ("wait", "review"), ("wait.result", "review"), ("child", "review.count"), ("child.result", "review.count")]
    journal = app.journal("order-42")
    assert app.stem.get_status(call_id("order-42", 1, journal[1].epoch)).result == "shipped 42"
    child = app.run(child_id("order-42", 6, journal[6].epoch))
    assert child.status == "SUCCEEDED" and child.parent == "order-42"
    assert app.stem.get_status(child.id).result == 10       # a child's status is mirrored too
    assert app.run("order-42").status == "SUCCEEDED"


def test_start_is_idempotent_by_run_id_and_the_status_is_mirrored_from_pending_to_the_end(app):
    runs = []

    @app.wf.workflow("once")
    def once(ctx, x):
        runs.append(x)
        return x + 1

    assert app.wf.start(app.stem, once, {"x": 1}, run_id="r1") == "r1"
    assert app.stem.get_status("r1").state is TaskState.PENDING
    assert app.stem.get_status("r1").meta == {"workflow": "once", "workflow_status": "PENDING"}
    assert app.wf.start(app.stem, "once", {"x": 99}, run_id="r1") == "r1"     # no-op: the first run stands
    generated = app.wf.start(app.stem, "once", {"x": 5})
    assert generated != "r1" and len(generated) == 32
    with app.worker():
        assert app.stem.wait_for_task("r1", timeout=20).result == 2
        assert app.stem.wait_for_task(generated, timeout=20).result == 6
    assert sorted(runs) == [1, 5]
    assert app.wf.start(app.stem, "once", {"x": 1}, run_id="r1") == "r1"      # ended: still nothing new
    assert app.run("r1").epoch == 1 and app.queued() == 0


def test_a_step_returning_none_is_recorded_and_never_run_again(app):
    calls = []

    @app.wf.step
    def notify(ctx):
        calls.append(1)

    @app.wf.workflow("nothing")
    def nothing(ctx):
        assert notify(ctx) is None
        ctx.sleep(0.01)                  # a second activation replays the step
        assert notify(ctx) is None
        return "done"

    with app.worker():
        app.wf.start(app.stem, "nothing", run_id="n")
        assert app.stem.wait_for_task("n", timeout=20).result == "done"
    assert calls == [1, 1]               # two step calls, each once
    assert [e.output for e in app.journal("n") if e.kind == "step"] == [b"\xc0", b"\xc0"]


def test_a_failing_step_is_retried_then_its_failure_is_raised_into_the_workflow_the_same_on_replay(app):
    attempts = []

    @app.wf.step(retry=StepRetry(3, backoff=0.001))
    def flaky(ctx):
        attempts.append(ctx.attempt)
        raise ValueError(f"no luck on attempt {ctx.attempt}")

    caught = []

    @app.wf.workflow("recover")
    def recover(ctx):
        try:
            flaky(ctx)
        except StepFailedError as exc:
            caught.append((type(exc.__cause__).__name__ if exc.__cause__ else None, exc.error_type, exc.position))
        ctx.sleep(0.01)
        return "recovered"

    with app.worker():
        app.wf.start(app.stem, "recover", run_id="f")
        assert app.stem.wait_for_task("f", timeout=20).result == "recovered"
    assert attempts == [1, 2, 3]
    # the first run has the original exception as the cause; the replay raises the same type from the journal
    assert caught == [("ValueError", "ValueError", 0), (None, "ValueError", 0)]
    entry = app.journal("f")[0]
    assert entry.attempt == 3 and entry.output is None and b"no luck on attempt 3" in entry.error


def test_a_step_failure_the_workflow_does_not_catch_ends_the_run_failed_for_good(app):
    @app.wf.step(retry=StepRetry(2, backoff=0.0, retry_on=KeyError))
    def broken(ctx):
        raise RuntimeError("out of stock")     # not a KeyError: not retried

    @app.wf.workflow("doomed")
    def doomed(ctx):
        broken(ctx)

    with app.worker():
        app.wf.start(app.stem, "doomed", run_id="d")
        status = app.stem.wait_for_task("d", timeout=20)
        assert status.state is TaskState.FAILED
        assert status.error_type == "StepFailedError" and "out of stock" in status.error
        assert status.reason == "workflow-failed" and "RuntimeError" in status.error
        app.activate("d")                        # a later wake changes nothing: terminal
    assert app.journal("d")[0].attempt == 1
    assert app.run("d").status == "FAILED"


def test_a_called_task_that_fails_raises_call_failed_error_and_an_unknown_task_ends_dead(app):
    @app.registry.task("pay.card")
    def card(ctx, cents):
        raise ValueError(f"declined {cents}")

    @app.wf.workflow("pay")
    def pay(ctx):
        out = []
        for name in ("pay.card", "no.such.task"):
            try:
                ctx.call(name, {"cents": 5})
            except CallFailedError as exc:
                out.append((exc.name, exc.error_type, exc.error))
        return out

    with app.worker():
        app.wf.start(app.stem, "pay", run_id="p")
        result = app.stem.wait_for_task("p", timeout=20).result
    assert result[0] == ["pay.card", "ValueError", "declined 5"]
    assert result[1][0] == "no.such.task" and "unknown task" in result[1][2]


def test_a_child_that_fails_raises_child_failed_error_in_its_parent(app):
    @app.wf.workflow("kid")
    def kid(ctx, n):
        raise LookupError(f"kid {n} lost")

    @app.wf.workflow("parent")
    def parent(ctx):
        child = ctx.start_child(kid, {"n": 3})
        try:
            child.result()
        except ChildFailedError as exc:
            return [child.id, exc.error_type, exc.error]

    with app.worker():
        app.wf.start(app.stem, "parent", run_id="pa")
        got = app.stem.wait_for_task("pa", timeout=20).result
    assert got[1:] == ["LookupError", "kid 3 lost"]
    assert app.run(got[0]).status == "FAILED" and app.run(got[0]).parent == "pa"


def test_children_started_before_waiting_run_side_by_side_and_each_is_awaited(app):
    @app.wf.workflow("square")
    def square(ctx, n):
        ctx.sleep(0.02)
        return n * n

    @app.wf.workflow("fan")
    def fan(ctx, n):
        children = [ctx.start_child("square", {"n": i}) for i in range(n)]
        return [c.result() for c in children]

    with app.worker(concurrency=4):
        app.wf.start(app.stem, "fan", {"n": 5}, run_id="fan")
        assert app.stem.wait_for_task("fan", timeout=20).result == [0, 1, 4, 9, 16]
    assert len(app.store.runs(name="square")) == 5


def test_now_and_uuid4_are_recorded_and_every_replay_sees_the_same_values(app):
    seen = []

    @app.wf.workflow("det")
    def det(ctx):
        values = (ctx.now(), ctx.uuid4())
        seen.append(values)
        ctx.sleep(0.01)
        return [values[0], str(values[1])]

    with app.worker():
        app.wf.start(app.stem, "det", run_id="det")
        result = app.stem.wait_for_task("det", timeout=20).result
    assert len(seen) >= 2 and len(set(seen)) == 1
    assert isinstance(seen[0][1], uuid.UUID) and result == [seen[0][0], str(seen[0][1])]


def test_the_idempotency_key_is_stable_per_step_call_and_set_only_inside_a_step(app):
    keys = []

    @app.wf.step(retry=StepRetry(2, backoff=0.0))
    def remember(ctx):
        keys.append((ctx.idempotency_key, ctx.attempt))
        if ctx.attempt == 1:
            raise ConnectionError("flaky")
        return ctx.idempotency_key

    @app.wf.workflow("keys")
    def keyed(ctx):
        try:
            ctx.idempotency_key
        except WorkflowError as exc:
            outside = str(exc)
        return [remember(ctx), remember(ctx), outside]

    with app.worker():
        app.wf.start(app.stem, "keys", run_id="k")
        first, second, outside = app.stem.wait_for_task("k", timeout=20).result
    assert keys == [("k:g0:p0", 1), ("k:g0:p0", 2), ("k:g0:p1", 1), ("k:g0:p1", 2)]
    assert (first, second) == ("k:g0:p0", "k:g0:p1") and "only set inside a step" in outside


def test_a_durable_call_inside_a_step_fails_the_step_with_a_message_that_says_why(app):
    @app.wf.step(retry=StepRetry(1))
    def sneaky(ctx):
        ctx.sleep(1)

    @app.wf.workflow("sneak")
    def sneak(ctx):
        try:
            sneaky(ctx)
        except StepFailedError as exc:
            return exc.error

    with app.worker():
        app.wf.start(app.stem, "sneak", run_id="s")
        assert "cannot make durable calls" in app.stem.wait_for_task("s", timeout=20).result


def test_a_step_called_outside_a_workflow_is_the_plain_function():
    app = App()

    @app.wf.step
    def add(ctx, a, b):
        return (ctx, a + b)

    assert add("unit-test", 2, 3) == ("unit-test", 5)
    assert add.fn("x", 1, 1) == ("x", 2)


def test_an_event_sent_before_the_wait_is_kept_and_consumed_by_it(app):
    @app.wf.workflow("late.wait")
    def late(ctx):
        ctx.sleep(0.05)
        return ctx.wait("go", timeout=30)

    app.wf.start(app.stem, "late.wait", run_id="lw")
    assert app.wf.send(app.stem, "lw", "go", {"n": 1}, event_id="e1") is True   # before any activation
    with app.worker():
        assert app.stem.wait_for_task("lw", timeout=20).result == {"n": 1}


def test_events_of_a_topic_are_consumed_oldest_first_and_a_duplicate_event_id_is_stored_once(app):
    @app.wf.workflow("inbox")
    def inbox(ctx):
        return [ctx.wait("t"), ctx.wait("t"), ctx.wait("other"), ctx.wait("t", timeout=0)]

    app.wf.start(app.stem, "inbox", run_id="in")
    assert app.wf.send(app.stem, "in", "t", 1, event_id="a") is True
    assert app.wf.send(app.stem, "in", "other", "x", event_id="b") is True
    assert app.wf.send(app.stem, "in", "t", 2, event_id="c") is True
    assert app.wf.send(app.stem, "in", "t", 1, event_id="a") is False      # a retried send: stored once
    with app.worker():
        assert app.stem.wait_for_task("in", timeout=20).result == [1, 2, "x", None]
    assert app.run("in").inbox_count == 3


def test_a_wait_that_times_out_returns_none_at_its_recorded_deadline_never_before(app, wf_clock):
    @app.wf.workflow("patience")
    def patience(ctx):
        return ctx.wait("answer", timeout=3600)

    app.wf.start(app.stem, "patience", run_id="pt")
    assert app.activate("pt") == "parked"
    deadline = app.run("pt").wake_at
    wf_clock.advance(3599)
    assert app.activate("pt") == "not-due"            # a stray wake an hour early does nothing
    assert app.run("pt").status == "PARKED"
    wf_clock.advance(2)
    assert app.activate("pt") == "succeeded"
    assert app.stem.get_status("pt").result is None
    arm = app.journal("pt")[0]
    assert decode(arm.output) == {"deadline": deadline} and abs(deadline - (arm.created_at + 3600)) < 1
    assert decode(app.journal("pt")[1].output) == {"seq": None}


def test_a_durable_sleep_never_wakes_early_and_wakes_once_when_due(app, wf_clock):
    bodies = []

    @app.wf.step
    def after(ctx):
        bodies.append(1)
        return "woke"

    @app.wf.workflow("nap")
    def nap(ctx):
        ctx.sleep(2 * 86400)
        return after(ctx)

    with app.worker():
        app.wf.start(app.stem, "nap", run_id="nap")
        run = app.wait_status("nap", "PARKED")
        assert run.wake_at >= wf_clock.now() + 2 * 86400 - 60
        wf_clock.advance(2 * 86400 - 60)             # a minute early: the sweeper sees nothing due
        sweeper = app.wf.sweeper(app.stem)
        assert sweeper.sweep() == 0
        assert app.activate("nap") == "not-due"
        assert app.run("nap").status == "PARKED" and bodies == []
        wf_clock.advance(61)                          # due: the worker's sweeper wakes it
        assert app.stem.wait_for_task("nap", timeout=20).result == "woke"
    assert bodies == [1]


def test_continue_as_new_starts_the_run_afresh_and_keeps_the_unconsumed_events(app):
    generations = []

    @app.wf.workflow("loop")
    def loop(ctx, n, total):
        generations.append(ctx.generation)
        got = ctx.wait("add")
        total += got
        if n == 0:
            return {"total": total, "generation": ctx.generation, "late": ctx.wait("late", timeout=0)}
        ctx.continue_as_new({"n": n - 1, "total": total})

    app.wf.start(app.stem, "loop", {"n": 2, "total": 0}, run_id="loop")
    for i, value in enumerate((1, 10, 100)):
        app.wf.send(app.stem, "loop", "add", value, event_id=f"add-{i}")
    app.wf.send(app.stem, "loop", "late", "kept", event_id="late")
    with app.worker():
        result = app.stem.wait_for_task("loop", timeout=20).result
    assert result == {"total": 111, "generation": 2, "late": "kept"}
    assert app.run("loop").generation == 2
    # each generation's consumed events went with it; the last generation's stay with its journal
    assert [e.event_id for e in app.store.events("loop")] == ["add-2", "late"]
    assert sorted(set(generations)) == [0, 1, 2]


def test_a_swallowed_suspension_still_parks_the_run(app):
    @app.wf.workflow("greedy")
    def greedy(ctx):
        try:
            ctx.sleep(0.05)
        except BaseException:  # noqa: BLE001 - what the test is about
            pass
        try:
            ctx.wait("x", timeout=0)            # the swallowed signal comes back at the next call
        except Exception:  # noqa: BLE001
            return "escaped"                     # never reached: the signal is not an Exception
        return "not parked"

    app.wf.start(app.stem, "greedy", run_id="g")
    assert app.activate("g") == "parked"
    assert app.kinds("g") == [("sleep", "sleep")]
    with app.worker():
        assert app.stem.wait_for_task("g", timeout=20).result == "not parked"


def test_except_exception_cannot_swallow_a_suspension(app):
    @app.wf.workflow("careful")
    def careful(ctx):
        try:
            ctx.wait("go")
        except Exception:  # noqa: BLE001
            return "swallowed"
        return "waited"

    app.wf.start(app.stem, "careful", run_id="c")
    assert app.activate("c") == "parked"
    app.wf.send(app.stem, "c", "go", 1)
    assert app.activate("c") == "succeeded"
    assert app.stem.get_status("c").result == "waited"


def test_a_run_is_replayed_by_the_version_it_started_under_when_the_worker_holds_it(app):
    @app.wf.workflow("versioned", version="1")
    def v1(ctx):
        ctx.wait("go")
        return "v1"

    app.wf.start(app.stem, "versioned", run_id="old")
    assert app.activate("old") == "parked"

    @app.wf.workflow("versioned", version="2")
    def v2(ctx):
        ctx.wait("go")
        return "v2"

    app.wf.start(app.stem, "versioned", run_id="new")
    assert app.run("old").version == "1" and app.run("new").version == "2"
    for run_id in ("old", "new"):
        app.wf.send(app.stem, run_id, "go", None)
    with app.worker():
        assert app.stem.wait_for_task("old", timeout=20).result == "v1"
        assert app.stem.wait_for_task("new", timeout=20).result == "v2"


def test_a_step_runs_in_its_activation_thread_while_the_lease_is_renewed(app, wf_clock):
    """A step longer than the lease keeps the run: the renewal thread extends it."""
    app = App(lease=0.3)
    release = threading.Event()
    started = threading.Event()

    @app.wf.step
    def slow(ctx):
        started.set()
        release.wait(10)
        return "slow"

    @app.wf.workflow("long")
    def long(ctx):
        return slow(ctx)

    app.wf.start(app.stem, "long", run_id="l")
    out = []
    t = threading.Thread(target=lambda: out.append(app.activate("l")))
    t.start()
    assert started.wait(10)
    epoch = app.run("l").epoch
    for _ in range(3):   # well past the lease, by the clock every process reads
        wait_for(lambda: app.run("l").lease_until > wf_clock.now() + 0.05, 5, "a renewal")
        wf_clock.advance(0.25)
    assert app.activate("l", owner="other") == "held"
    release.set()
    t.join(10)
    assert out == ["succeeded"] and app.run("l").epoch == epoch
