"""Durable workflows when things go wrong: zombies, duplicate wakes, events racing a parking,
code that changed under a running run, crashes at every point of an activation, and what the
sweeper finds.  Activations are driven by hand (``App.activate``) where the order matters,
and by inline workers where the race is the point."""

from __future__ import annotations

import threading

import pytest

from stem.backends.memory import InMemoryResultBackend
from stem.results import TaskState
from stem.workflows import StepRetry, engine
from stem.workflows import sweeper as sweeper_module
from stem.workflows.admin import cancel, reset, retry
from stem.workflows.wake import ACTIVATE, publish_wake

from .support import wait_for
from .wf_support import App, app, wf_clock  # noqa: F401 - fixtures


class Crash(BaseException):
    """Stands for the process dying at this point: nothing after it runs (not an Exception,
    so nothing on the way catches it)."""


def _ledger():
    lock = threading.Lock()
    runs: list[str] = []

    def note(what: str) -> None:
        with lock:
            runs.append(what)
    return runs, note


# -- a zombie ---------------------------------------------------------------------------------
def test_a_stalled_activation_past_its_lease_is_fenced_out_and_no_stored_entry_ever_changes(wf_clock, monkeypatch):
    app = App(lease=1.0)
    stalled, release = threading.Event(), threading.Event()
    executions = []

    @app.wf.step
    def charge(ctx):
        executions.append(threading.current_thread().name)
        if len(executions) == 1:          # executor A: stopped mid-step (SIGSTOP)
            stalled.set()
            release.wait(20)
        return f"charged by execution {len(executions)}"

    @app.wf.workflow("pay")
    def pay(ctx):
        return charge(ctx)

    app.wf.start(app.stem, "pay", run_id="z")
    real_start = engine.Lease.start
    monkeypatch.setattr(engine.Lease, "start", lambda self: self)   # A's renewals stop with it
    out_a = []
    a = threading.Thread(target=lambda: out_a.append(app.activate("z", owner="A")), name="A")
    a.start()
    assert stalled.wait(10)
    monkeypatch.setattr(engine.Lease, "start", real_start)
    assert app.activate("z", owner="B") == "held"                    # A's lease still runs
    wf_clock.advance(1.5)                                            # past it
    assert app.activate("z", owner="B") == "succeeded"               # B claims, runs the step, finishes
    journal_before = app.journal("z")
    record_before = app.run("z")
    assert journal_before[0].output is not None and journal_before[0].epoch == 2
    release.set()                                                    # SIGCONT: A's step returns ...
    a.join(20)
    assert out_a == ["fenced"]                                       # ... and its append is refused
    assert app.journal("z") == journal_before
    assert app.run("z") == record_before
    assert app.stem.get_status("z").result == "charged by execution 2"


# -- duplicate wakes --------------------------------------------------------------------------
def test_fifty_duplicate_wakes_across_two_workers_run_each_step_once_and_end_the_run_once(app):
    runs, note = _ledger()

    @app.wf.step
    def one(ctx):
        note("one")
        return 1

    @app.wf.step
    def two(ctx, x):
        note("two")
        return x + 1

    @app.wf.workflow("dup")
    def dup(ctx):
        a = one(ctx)
        ctx.sleep(0.05)
        return two(ctx, a)

    finishes = []
    real_finish = app.store.finish

    def finish(*args, **kwargs):
        ok = real_finish(*args, **kwargs)
        finishes.append(ok)
        return ok

    app.store.finish = finish
    app.wf.start(app.stem, "dup", run_id="dup")
    collapsed = [publish_wake(app.stem, "dup", 0, "start", "default") for _ in range(50)]
    assert collapsed.count(True) == 0           # wf.start's own wake holds the id: all 50 collapse
    for i in range(50):                         # and 50 more under ids of their own: each is delivered
        app.stem.enqueue(ACTIVATE, {"run_id": "dup"}, task_id=f"stray-{i}")
    with app.worker(concurrency=4), app.worker(concurrency=4):
        assert app.stem.wait_for_task("dup", timeout=30).result == 2
        wait_for(lambda: app.queued() == 0 and app.broker.stats("default").in_flight == 0, 20, "the queue to drain")
    assert sorted(runs) == ["one", "two"]
    assert finishes == [True]


# -- events racing a parking ----------------------------------------------------------------------
def test_an_event_sent_between_the_inbox_read_and_the_parking_is_not_lost(app):
    @app.wf.workflow("race")
    def race(ctx):
        return ctx.wait("go")

    app.wf.start(app.stem, "race", run_id="r")
    real_park = app.store.park
    parks = []

    def park(run_id, epoch, **kwargs):
        if not parks:      # the event lands after the pass read the inbox, before it parks
            assert app.wf.send(app.stem, "r", "go", "in the window") is True
        got = real_park(run_id, epoch, **kwargs)
        parks.append(got)
        return got

    app.store.park = park
    assert app.activate("r") == "succeeded"
    assert parks == ["inbox"]                      # refused: another pass read it instead
    assert app.stem.get_status("r").result == "in the window"


def test_an_event_sent_after_the_wait_found_nothing_and_before_the_parking_is_not_lost(app):
    @app.wf.workflow("race2")
    def race2(ctx):
        return ctx.wait("go", timeout=60)

    app.wf.start(app.stem, "race2", run_id="r2")
    real_events = app.store.events
    sent = []

    def events(run_id, topic=None, after_seq=0, limit=100):
        got = real_events(run_id, topic, after_seq, limit)
        if topic == "go" and not sent:
            sent.append(app.wf.send(app.stem, "r2", "go", "late"))
        return got

    app.store.events = events
    assert app.activate("r2") == "succeeded"
    assert sent == [True] and app.stem.get_status("r2").result == "late"


def test_a_called_task_ending_while_its_run_is_running_is_read_by_another_pass(app):
    """The task's doorbell (the __call__ event) rings while the activation that published it
    still holds the run: its parking is refused and it reads the status."""
    gate = threading.Event()

    @app.registry.task("fast.task")
    def fast(ctx):
        return "fast"

    @app.wf.workflow("caller")
    def caller(ctx):
        return ctx.call("fast.task")

    real_park = app.store.park

    def park(run_id, epoch, **kwargs):
        wait_for(lambda: app.stem.get_status(kwargs["waits_for"]).state is TaskState.SUCCEEDED, 20, "the task")
        wait_for(lambda: app.run(run_id).inbox_count == 1, 20, "the doorbell")
        gate.set()
        return real_park(run_id, epoch, **kwargs)

    app.store.park = park
    app.wf.start(app.stem, "caller", run_id="cl")
    with app.worker():
        assert app.stem.wait_for_task("cl", timeout=30).result == "fast"
    assert gate.is_set()


# -- code that changed under a running run ----------------------------------------------------------
def _deployable(app):
    """A workflow whose code the test swaps while runs are parked (a deploy)."""
    code = {"order": ("reserve", "charge")}

    @app.wf.step(name="reserve")
    def reserve(ctx):
        return "reserved"

    @app.wf.step(name="charge")
    def charge(ctx):
        return "charged"

    @app.wf.step(name="charge.v2")
    def charge_v2(ctx):
        return "charged v2"

    steps = {"reserve": reserve, "charge": charge, "charge.v2": charge_v2}

    @app.wf.workflow("shop")
    def shop(ctx):
        first = steps[code["order"][0]](ctx)
        ctx.wait("go")
        return [first, steps[code["order"][1]](ctx)]

    return code


@pytest.mark.parametrize("new_order, position, old_call, new_call", [
    (("charge", "reserve"), 0, "step 'reserve'", "step 'charge'"),             # reordered
    (("charge.v2", "charge"), 0, "step 'reserve'", "step 'charge.v2'"),        # renamed
])
def test_a_changed_step_order_or_name_parks_the_run_needing_attention_naming_the_position_and_both_calls(
        app, new_order, position, old_call, new_call):
    code = _deployable(app)
    app.wf.start(app.stem, "shop", run_id="s")
    assert app.activate("s") == "parked"
    code["order"] = new_order                     # the deploy
    app.wf.send(app.stem, "s", "go", None)
    assert app.activate("s") == "needs-attention"
    run = app.run("s")
    assert run.status == "NEEDS_ATTENTION"
    assert f"position {position}:" in run.attention
    assert f"calls {new_call} where the journal holds {old_call}" in run.attention
    assert "stem wf reset s --to 0" in run.attention
    status = app.stem.get_status("s")             # visible where a task's status is
    assert status.state is TaskState.RUNNING and status.reason == "needs-attention"
    assert status.meta["workflow_status"] == "NEEDS_ATTENTION" and status.error == run.attention
    assert app.activate("s") == "attention"       # never retried in a loop
    assert app.wf.sweeper(app.stem).sweep() == 0
    assert app.journal("s")[0].name == "reserve"  # nothing recorded was touched
    # recoverable: reset to the position, and the new code runs from there
    reset(app.stem, app.store, "s", position)
    app.wf.send(app.stem, "s", "go", None)
    with app.worker():
        assert app.stem.wait_for_task("s", timeout=20).result[0] == {"charge": "charged",
                                                                     "charge.v2": "charged v2"}[new_order[0]]


def test_a_removed_durable_call_parks_the_run_needing_attention_instead_of_skipping_it(app):
    code = {"two_steps": True}

    @app.wf.step(name="a")
    def a(ctx):
        return "a"

    @app.wf.step(name="b")
    def b(ctx):
        return "b"

    @app.wf.workflow("shrink")
    def shrink(ctx):
        a(ctx)
        if code["two_steps"]:
            b(ctx)
        ctx.wait("go")
        return "end"

    app.wf.start(app.stem, "shrink", run_id="sh")
    assert app.activate("sh") == "parked"
    code["two_steps"] = False
    app.wf.send(app.stem, "sh", "go", None)
    assert app.activate("sh") == "needs-attention"
    assert "position 1: the code calls wait 'go' where the journal holds step 'b'" in app.run("sh").attention


def test_a_workflow_returning_before_the_end_of_its_journal_needs_attention(app):
    code = {"wait": True}

    @app.wf.workflow("early")
    def early(ctx):
        if code["wait"]:
            ctx.wait("go")
        return "done"

    app.wf.start(app.stem, "early", run_id="e")
    assert app.activate("e") == "parked"
    code["wait"] = False
    app.wf.send(app.stem, "e", "go", None)
    assert app.activate("e") == "needs-attention"
    assert app.run("e").attention.startswith("position 0: the workflow returned there, but its journal holds 1 entries")


def test_patched_lets_runs_started_under_the_old_code_and_the_new_code_both_complete(app):
    code = {"new": False}
    ledger, note = _ledger()

    @app.wf.step(name="reserve")
    def reserve(ctx):
        note("reserve")
        return "reserved"

    @app.wf.step(name="fraud.check")
    def fraud_check(ctx):
        note("fraud")
        return "clean"

    @app.wf.step(name="ship")
    def ship(ctx):
        note("ship")
        return "shipped"

    @app.wf.workflow("order")
    def order(ctx):
        out = [reserve(ctx)]
        if code["new"]:
            if ctx.patched("fraud-check"):
                out.append(fraud_check(ctx))
        ctx.wait("go")
        out.append(ship(ctx))
        return out

    app.wf.start(app.stem, "order", run_id="old")
    assert app.activate("old") == "parked"                   # old code: reserve, then parked on go
    code["new"] = True                                       # the deploy adds a step, behind a patch
    app.wf.start(app.stem, "order", run_id="new")
    assert app.activate("new") == "parked"
    for run_id in ("old", "new"):
        app.wf.send(app.stem, run_id, "go", None)
        assert app.activate(run_id) == "succeeded"
    assert app.stem.get_status("old").result == ["reserved", "shipped"]
    assert app.stem.get_status("new").result == ["reserved", "clean", "shipped"]
    assert app.kinds("new")[1] == ("patch", "fraud-check")
    assert ("patch", "fraud-check") not in app.kinds("old")
    # without the patch the old run would have needed attention
    code["new"] = True
    app.wf.start(app.stem, "order", run_id="old2")
    code["new"] = False
    assert app.activate("old2") == "parked"
    code["new"] = True
    app.wf.send(app.stem, "old2", "go", None)
    assert app.activate("old2") == "succeeded"               # patched() was False for it: no attention


# -- crashes at every point of an activation ---------------------------------------------------
def _crash_app(store=None):
    app = App(lease=1.0, store=store)
    ledger, note = _ledger()

    @app.wf.step(name="a")
    def a(ctx, x):
        note("a")
        note(f"key {ctx.idempotency_key}")
        return x * 10

    @app.wf.step(name="b")
    def b(ctx, y):
        note("b")
        return y + 1

    @app.wf.workflow("crashy")
    def crashy(ctx, x):
        first = a(ctx, x)
        ctx.sleep(30)
        return {"a": first, "b": b(ctx, first)}

    return app, ledger, a


def _drive(app, run_id, clock, rounds=12):
    """What the sweeper and the redeliveries do after a crash, by hand: time passes (past a
    lease, past a sleep) and the run is activated again, until it ends."""
    for _ in range(rounds):
        run = app.run(run_id)
        if run.terminal:
            app.activate(run_id)            # a redelivered activation of a terminal run: its mirror
            return
        clock.advance(31)
        app.activate(run_id)
    raise AssertionError(f"run {run_id} did not end: {app.run(run_id)}")


#: point -> (what is wrapped: the step's function or a store method, crash before or after the real call);
#: before-the-ack crashes nowhere: the activation's outcome is never acked, and it runs again
POINTS = {
    "before-a-step-body": ("fn", "before"),
    "mid-body": ("fn", "after"),                  # the side effect happened, the process died before returning
    "after-the-body-before-the-append": ("append", "before"),
    "after-the-append": ("append", "after"),
    "after-parking-before-the-timer-is-published": ("park", "after"),
    "after-completion-before-the-mirror": ("finish", "after"),
    "before-the-ack": (None, None),
}


@pytest.fixture(params=[pytest.param("memory"), pytest.param("sqlite"),
                        pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("redis", marks=pytest.mark.redis)])
def any_store(request):
    """None (the memory store), or a ``tests.support.Store`` of the test's own."""
    if request.param == "memory":
        yield None
        return
    from tests.e2e.conftest import make_store
    store = make_store(request.param, request)
    yield store
    store.close()


def _crash_around(owner, name: str, when: str, crash_once, monkeypatch) -> None:
    """``owner.name`` crashes (once) before or after the real call."""
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if when == "before":
            crash_once()
        got = real(*args, **kwargs)
        if when == "after":
            crash_once()
        return got
    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_each_point_of_an_activation_leaves_a_run_that_completes_with_the_same_outputs(
        point, any_store, wf_clock, monkeypatch):
    app, ledger, step_a = _crash_app(any_store)
    armed = {"on": True}

    def crash_once():
        if armed["on"]:
            armed["on"] = False
            raise Crash(point)

    name, when = POINTS[point]
    if name is not None:
        _crash_around(step_a if name == "fn" else app.store, name, when, crash_once, monkeypatch)

    app.wf.start(app.stem, "crashy", {"x": 4}, run_id="c")
    try:
        app.activate("c")
        if point in ("after-completion-before-the-mirror", "before-the-ack"):
            wf_clock.advance(31)
            app.activate("c")     # (before the ack: this activation's outcome is never acked)
    except Crash:
        pass
    else:
        assert point == "before-the-ack", f"no crash at {point}"
    if point == "after-parking-before-the-timer-is-published":
        assert app.run("c").status == "PARKED" and app.broker.stats("default").delayed == 0   # no timer wake
        wf_clock.advance(31 + app.wf.sweep_interval)
        assert app.wf.sweeper(app.stem).sweep() == 1                      # the sweeper finds the overdue timer
    if point == "after-completion-before-the-mirror":
        assert app.run("c").status == "SUCCEEDED"
        assert not app.stem.get_status("c").is_terminal                  # the mirror was lost ...
    _drive(app, "c", wf_clock)
    status = app.stem.get_status("c")                                    # ... and written again
    assert status.state is TaskState.SUCCEEDED and status.result == {"a": 40, "b": 41}
    # a step whose process died after its side effect and before its record runs again (at most
    # twice); every execution of it had the same idempotency key, so an external system that
    # honours the key saw the effect once
    expected_a = 2 if point in ("mid-body", "after-the-body-before-the-append") else 1
    assert ledger.count("a") == expected_a and ledger.count("b") == 1
    assert {k for k in ledger if k.startswith("key ")} == {"key c:g0:p0"}
    assert [e.kind for e in app.journal("c")] == ["step", "sleep", "step"]


# -- outages ----------------------------------------------------------------------------------
def test_an_outage_under_a_durable_call_stops_the_activation_and_never_reaches_the_workflow(wf_clock, monkeypatch):
    from stem.errors import BrokerConnectionError
    app = App(lease=1.0)

    @app.registry.task("remote.thing")
    def thing(ctx):
        return "thing"

    @app.wf.workflow("outage")
    def outage(ctx):
        try:
            return ctx.call("remote.thing")
        except Exception as exc:  # noqa: BLE001 - what the test is about: it must not see the outage
            return f"saw {type(exc).__name__}"

    app.wf.start(app.stem, "outage", run_id="o")
    real = app.broker.publish_keyed

    def down(items):
        raise BrokerConnectionError("the broker is down")

    monkeypatch.setattr(app.broker, "publish_keyed", down)
    with pytest.raises(BrokerConnectionError):
        app.activate("o")                     # the activation's task fails (and is retried)
    # handed back at once (release), not left RUNNING until its lease runs out
    run = app.run("o")
    assert (run.status, run.owner, run.epoch) == ("PENDING", None, 1) and app.kinds("o") == [("call", "remote.thing")]
    assert [due[:3] for due in app.store.due(now=wf_clock.now())] == [("o", "start", 1)]
    monkeypatch.setattr(app.broker, "publish_keyed", real)
    with app.worker():                        # no clock moved: the sweeper wakes it at once
        assert app.stem.wait_for_task("o", timeout=20).result == "thing"


def test_a_soft_shutdown_during_an_activation_hands_the_run_back_at_once(wf_clock):
    from stem.errors import WorkerShutdown
    app = App(lease=30.0)
    ledger, note = _ledger()

    @app.wf.step(name="slow")
    def slow(ctx):
        note("slow")
        if ledger.count("slow") == 1:
            raise WorkerShutdown("the worker is shutting down")    # as the worker raises it in the task
        return "done"

    @app.wf.workflow("interrupted")
    def interrupted(ctx):
        return slow(ctx)

    app.wf.start(app.stem, "interrupted", run_id="i")
    with pytest.raises(WorkerShutdown):
        app.activate("i")
    run = app.run("i")
    assert (run.status, run.owner, run.lease_until, run.epoch) == ("PENDING", None, None, 1)
    assert app.activate("i") == "succeeded"   # the redelivered activation claims it: no 30 s lease to wait out
    assert app.run("i").epoch == 2 and ledger == ["slow", "slow"]


def test_an_activation_whose_release_fails_too_leaves_the_run_to_its_lease(wf_clock, monkeypatch):
    from stem.errors import BackendConnectionError, BrokerConnectionError
    app = App(lease=1.0)

    @app.wf.workflow("outage2")
    def outage2(ctx):
        return ctx.call("remote.thing")

    app.wf.start(app.stem, "outage2", run_id="o2")

    def down(*args, **kwargs):
        raise BrokerConnectionError("the broker is down")

    def store_down(*args, **kwargs):
        raise BackendConnectionError("the store is down")

    monkeypatch.setattr(app.broker, "publish_keyed", down)
    monkeypatch.setattr(app.store, "release", store_down)
    with pytest.raises(BrokerConnectionError):
        app.activate("o2")
    assert app.run("o2").status == "RUNNING"
    assert app.store.due(now=wf_clock.now()) == []
    assert [due[:2] for due in app.store.due(now=wf_clock.now() + 1.0)] == [("o2", "lease")]


# -- what the sweeper finds -------------------------------------------------------------------------
def test_the_sweeper_wakes_a_run_whose_start_was_never_published(app):
    @app.wf.workflow("quiet")
    def quiet(ctx):
        return "ran"

    app.store.create("lost-start", "quiet", "1", b"\x80", now=0.0)    # created; its wake never published
    with app.worker():
        assert app.stem.wait_for_task("lost-start", timeout=20).result == "ran"


def test_the_sweeper_wakes_a_run_whose_activation_died_once_its_lease_expires(wf_clock):
    app = App(lease=1.0)

    @app.wf.workflow("dies")
    def dies(ctx):
        return "survived"

    app.wf.start(app.stem, "dies", run_id="d")
    claimed = app.store.claim("d", "dead-worker", now=wf_clock.now(), lease=1.0)
    assert claimed is not None
    sweeper = app.wf.sweeper(app.stem)
    app.broker.purge("default")
    assert sweeper.sweep() == 0                   # the lease is live
    wf_clock.advance(1.5)
    assert sweeper.sweep() == 1 and app.queued() == 1
    with app.worker():
        assert app.stem.wait_for_task("d", timeout=20).result == "survived"


def test_the_sweeper_rings_the_doorbell_of_a_run_whose_called_task_ended_unannounced(app):
    @app.registry.task("quiet.task")
    def quiet_task(ctx):
        return "done"

    @app.wf.workflow("waits.on.task")
    def waits(ctx):
        return ctx.call("quiet.task")

    with app.worker() as w:
        w._settler.workflows = None              # the settling worker dies before the doorbell
        app.wf.start(app.stem, "waits.on.task", run_id="q")
        run = app.wait_status("q", "PARKED")
        wait_for(lambda: app.stem.get_status(run.waits_for).state is TaskState.SUCCEEDED, 20, "the task")
        assert app.run("q").status == "PARKED" and app.run("q").inbox_count == 0
        # the worker's sweeper reads the task's status in its parked-on pass
        assert app.stem.wait_for_task("q", timeout=20).result == "done"
    assert [e.topic for e in app.store.events("q")] == ["__call__"]


def test_a_sweep_reads_no_run_its_wakes_name_the_epochs_that_due_gives(wf_clock, monkeypatch):
    app = App(lease=1.0)
    app.store.create("fresh", "quiet", "1", b"\x80", now=wf_clock.now())
    app.store.create("held", "quiet", "1", b"\x80", now=wf_clock.now())
    held = app.store.claim("held", "dead-worker", now=wf_clock.now(), lease=1.0)
    wf_clock.advance(1.5)

    def no_get(run_id):
        raise AssertionError(f"the sweep read run {run_id}")

    woken = []
    real_publish = sweeper_module.publish_wake

    def publish_wake(producer, run_id, epoch, why, queue, **kw):
        woken.append((run_id, epoch, why))
        return real_publish(producer, run_id, epoch, why, queue, **kw)

    monkeypatch.setattr(app.store, "get", no_get)
    monkeypatch.setattr(sweeper_module, "publish_wake", publish_wake)
    assert app.wf.sweeper(app.stem).sweep(parked_on=False) == 2
    assert sorted(woken) == [("fresh", 0, "start"), ("held", held.epoch, "lease")]


def test_the_parked_on_pass_reads_the_tasks_runs_wait_on_and_leaves_runs_on_a_child_to_the_store(wf_clock,
                                                                                                 monkeypatch):
    app = App(lease=30.0)
    for run_id, kind in (("on-task", "task"), ("on-child", "child")):
        app.store.create(run_id, "quiet", "1", b"\x80", now=wf_clock.now())
        run = app.store.claim(run_id, "w", now=wf_clock.now(), lease=30.0)
        assert app.store.park(run_id, run.epoch, wake_at=None, waiting=None, waits_for=f"{run_id}:x",
                              waits_kind=kind, inbox_seen=0, now=wf_clock.now()) == "parked"
    read = []
    real = app.stem.backend.get_many

    def get_many(ids):
        read.extend(ids)
        return real(ids)

    monkeypatch.setattr(app.stem.backend, "get_many", get_many)
    app.broker.purge("default")
    assert app.wf.sweeper(app.stem).sweep() == 0       # neither has ended
    assert read == ["on-task:x"]


def test_a_run_whose_workflow_this_worker_does_not_hold_is_left_for_one_that_does(app):
    app.store.create("stranger", "not.here", "1", b"\x80", now=0.0)
    assert app.activate("stranger") == "unknown"
    assert app.run("stranger").status == "PENDING" and app.run("stranger").epoch == 0


def test_a_wake_for_an_absent_run_does_nothing(app):
    assert app.activate("nobody") == "absent"


# -- operators ----------------------------------------------------------------------------------
def test_cancel_fences_out_the_holder_mirrors_revoked_and_wakes_a_parent_waiting_on_it(app):
    @app.wf.workflow("forever")
    def forever(ctx):
        return ctx.wait("never")

    @app.wf.workflow("boss")
    def boss(ctx):
        child = ctx.start_child("forever")
        try:
            return child.result()
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc.error}"

    with app.worker():
        app.wf.start(app.stem, "boss", run_id="boss")
        wait_for(lambda: app.store.runs(name="forever"), 20, "the child run")
        child = app.store.runs(name="forever")[0]
        app.wait_status(child.id, "PARKED")
        run = cancel(app.stem, app.store, child.id)
        assert run.status == "CANCELLED"
        assert app.stem.get_status(child.id).state is TaskState.REVOKED
        assert app.stem.wait_for_task("boss", timeout=20).result == "ChildFailedError: cancelled"
    assert cancel(app.stem, app.store, child.id).status == "CANCELLED"     # again: left as it is


def test_retry_runs_a_failed_run_again_from_its_failing_step(app):
    fixed = {"yes": False}
    ledger, note = _ledger()

    @app.wf.step(name="first")
    def first(ctx):
        note("first")
        return 1

    @app.wf.step(name="fragile", retry=StepRetry(1))
    def fragile(ctx):
        note("fragile")
        if not fixed["yes"]:
            raise RuntimeError("broken")
        return 2

    @app.wf.workflow("retryable")
    def retryable(ctx):
        return first(ctx) + fragile(ctx)

    with app.worker():
        app.wf.start(app.stem, "retryable", run_id="rt")
        assert app.stem.wait_for_task("rt", timeout=20).state is TaskState.FAILED
        fixed["yes"] = True
        run, position = retry(app.stem, app.store, "rt")
        assert position == 1 and run.status == "PENDING"
        assert app.stem.get_status("rt").state is TaskState.PENDING        # the FAILED mirror is replaced
        assert app.stem.wait_for_task("rt", timeout=20).result == 3
    assert ledger == ["first", "fragile", "fragile"]


def test_retry_of_a_failed_call_publishes_the_task_again_under_a_new_id(app):
    tries = []

    @app.registry.task("remote.op")
    def remote(ctx):
        tries.append(ctx.id)
        if len(tries) == 1:
            raise RuntimeError("remote down")
        return "ok"

    @app.wf.workflow("calls")
    def calls(ctx):
        return ctx.call("remote.op")

    with app.worker():
        app.wf.start(app.stem, "calls", run_id="cr")
        assert app.stem.wait_for_task("cr", timeout=20).state is TaskState.FAILED
        assert retry(app.stem, app.store, "cr")[1] == 0
        assert app.stem.wait_for_task("cr", timeout=20).result == "ok"
    assert len(tries) == 2 and tries[0] != tries[1]


def test_operators_refuse_bad_input(app):
    from stem.errors import ConfigurationError, RunNotFoundError

    @app.wf.workflow("w")
    def w(ctx):
        return 1

    with pytest.raises(RunNotFoundError):
        cancel(app.stem, app.store, "missing")
    with pytest.raises(RunNotFoundError):
        reset(app.stem, app.store, "missing", 0)
    app.wf.start(app.stem, "w", run_id="w")
    with pytest.raises(ConfigurationError, match="0 journal entries"):
        reset(app.stem, app.store, "w", 3)
    with pytest.raises(ConfigurationError, match="retry takes a FAILED run"):
        retry(app.stem, app.store, "w")
    with pytest.raises(ConfigurationError):
        reset(app.stem, app.store, "w", -1)


def test_a_terminal_run_whose_mirror_was_lost_gets_it_back_from_any_activation(app):
    @app.wf.workflow("done")
    def done(ctx):
        return "x"

    app.wf.start(app.stem, "done", run_id="m")
    assert app.activate("m") == "succeeded"
    app.backend.forget("m")
    assert app.stem.get_status("m").state is TaskState.PENDING
    assert app.activate("m") == "terminal"
    assert app.stem.get_status("m").result == "x"
