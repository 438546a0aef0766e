"""Offers: a busy child is sent its next task early and the pool can take it back.

Each scenario blocks children on files the test creates, so what is running,
what is offered and what is free is known at every step (no timing guesses).
The pool's offers need the compiled ring; under the pure twin they are off,
which the last test checks.
"""

from __future__ import annotations

import collections
import os
import time

import pytest

from stem import ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, signals
from stem.brokers import InMemoryBroker
from stem.worker import child as child_module
from stem.worker import protocol
from stem.worker.channel import Channel

from .support import wait_for
from .test_process_engine import lifecycle, setup  # noqa: F401 - the fixture

# offers need the compiled ring's compare-and-swap: skipped on the pure twin, failed when the
# compiled build was expected (STEM_EXPECT_COMPILED=1) and did not load
needs_offers = pytest.mark.usefixtures("compiled_ring_in_use")


def _wait_file(path: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.002)


def _register(registry, tmp_path):
    @registry.task("block")
    def block(ctx, name):
        open(tmp_path / f"{name}.started", "w").close()
        _wait_file(str(tmp_path / f"{name}.go"))
        return os.getpid()

    @registry.task("mark")
    def mark(ctx, name):
        open(tmp_path / f"{name}.ran", "a").write(f"{os.getpid()}\n")
        return os.getpid()

    @registry.task("die")
    def die(ctx):
        open(tmp_path / "die.started", "w").close()
        _wait_file(str(tmp_path / "die.go"))
        os._exit(3)


def _engine(w) -> dict:
    """The engine's part of the worker's stats (offers made and withdrawn, children)."""
    return w.stats()


def _one_busy_child_with_an_offer(setup, tmp_path, first=("block", {"name": "a"}), started="a.started",
                                  offer=("mark", {"name": "m"})):
    """One child running ``first`` (blocked until the test creates its file) and holding
    ``offer``: (stem, worker, first's id, the offer's id)."""
    registry, stem, worker, _ = setup
    w = worker(concurrency=1)
    w.run_in_background()
    running = stem.enqueue(*first)
    wait_for(lambda: (tmp_path / started).exists(), what=f"{first[0]} to start")
    offered = stem.enqueue(*offer)
    wait_for(lambda: _engine(w)["offers_made"] >= 1, what="the offer")
    return stem, w, running, offered


@needs_offers
def test_every_task_runs_once_and_most_start_from_an_offer(setup):
    registry, stem, worker, _ = setup
    registry.task("pid")(lambda ctx, i: (os.getpid(), i))
    w = worker(concurrency=1)
    w.run_in_background()
    ids = stem.enqueue_many([("pid", {"i": i}) for i in range(300)])
    statuses = [stem.wait_for_task(i, timeout=30) for i in ids]
    assert [s.state for s in statuses] == [TaskState.SUCCEEDED] * 300
    assert sorted(s.result[1] for s in statuses) == list(range(300))
    assert all(s.attempt == 0 for s in statuses)
    info = _engine(w)
    assert info["offers"] is True
    assert info["offers_made"] > 0


@needs_offers
def test_an_idle_child_takes_back_what_a_busy_child_was_offered(setup, tmp_path):
    registry, stem, worker, _ = setup
    _register(registry, tmp_path)
    prerun = collections.Counter()
    receiver = signals.task_prerun.connect(lambda sender, envelope, **kw: prerun.update([envelope.id]))
    w = worker(concurrency=2)
    w.run_in_background()
    stem.enqueue("block", {"name": "a"})
    stem.enqueue("block", {"name": "b"})
    wait_for(lambda: (tmp_path / "a.started").exists() and (tmp_path / "b.started").exists(), what="both blocked")
    first = stem.enqueue("mark", {"name": "m1"})
    second = stem.enqueue("mark", {"name": "m2"})
    wait_for(lambda: _engine(w)["offers_made"] >= 2, what="an offer to each busy child")
    (tmp_path / "b.go").touch()   # b's child claims its own offer, runs it, then takes a's back
    assert stem.wait_for_task(first, timeout=30).state is TaskState.SUCCEEDED
    assert stem.wait_for_task(second, timeout=30).state is TaskState.SUCCEEDED
    assert not (tmp_path / "a.go").exists()   # both ran while a's child was still blocked
    assert _engine(w)["offers_withdrawn"] >= 1
    (tmp_path / "a.go").touch()
    signals.task_prerun.disconnect(receiver)
    assert prerun[first] == prerun[second] == 1   # the offer taken back was announced only where it ran


@needs_offers
def test_an_idle_child_takes_back_only_what_it_can_start_the_oldest_offer(setup, tmp_path):
    from stem.worker.dispatch import OFFER_DEPTH
    registry, stem, worker, _ = setup

    @registry.task("hold")
    def hold(ctx, name):
        (tmp_path / f"{name}.started").write_text(str(os.getpid()))
        _wait_file(str(tmp_path / f"{name}.go"))

    w = worker(concurrency=2, prefetch_multiplier=16)   # room for every task without a refill wait
    w.run_in_background()
    for name in ("a", "b"):
        stem.enqueue("hold", {"name": name})
    wait_for(lambda: (tmp_path / "a.started").exists() and (tmp_path / "b.started").exists(), what="both held")
    queued = stem.enqueue_many([("hold", {"name": f"q{i}"}) for i in range(OFFER_DEPTH)])
    wait_for(lambda: _engine(w)["offers_made"] >= OFFER_DEPTH, what="the offers")
    children = {c["pid"]: c["offered"] for c in _engine(w)["children"]}
    holder = next(pid for pid, n in children.items() if n == OFFER_DEPTH)   # one child got them all
    idle = next(n for n in ("a", "b") if int((tmp_path / f"{n}.started").read_text()) != holder)
    (tmp_path / f"{idle}.go").touch()
    wait_for(lambda: (tmp_path / "q0.started").exists(), what="the oldest offer to start on the idle child")
    info = _engine(w)
    assert int((tmp_path / "q0.started").read_text()) != holder
    assert info["offers_withdrawn"] == 1 and info["offers_made"] == OFFER_DEPTH   # the rest stayed where they were
    assert {c["pid"]: c["offered"] for c in info["children"]}[holder] == OFFER_DEPTH - 1
    for name in ["a", "b"] + [f"q{i}" for i in range(OFFER_DEPTH)]:
        (tmp_path / f"{name}.go").touch()
    assert all(stem.wait_for_task(i, timeout=30).state is TaskState.SUCCEEDED for i in queued)


@needs_offers
def test_an_offer_unclaimed_when_its_child_dies_runs_elsewhere_without_counting_a_crash(setup, tmp_path):
    _register(setup[0], tmp_path)
    stem, w, doomed, offered = _one_busy_child_with_an_offer(setup, tmp_path, ("die",), "die.started")
    dying_pid = _engine(w)["children"][0]["pid"]
    (tmp_path / "die.go").touch()
    assert stem.wait_for_task(doomed, timeout=30).reason == "poison"   # it kills every child it runs in
    status = stem.wait_for_task(offered, timeout=30)
    assert status.state is TaskState.SUCCEEDED and status.attempt == 0
    assert status.result != dying_pid
    assert _engine(w)["offers_withdrawn"] >= 1


@needs_offers
def test_revoking_an_offered_task_takes_it_back_before_it_runs(setup, tmp_path):
    _register(setup[0], tmp_path)
    stem, w, _, offered = _one_busy_child_with_an_offer(setup, tmp_path)
    reply = w.revoke([offered])
    assert reply["reserved_dropped"] == [offered]
    (tmp_path / "a.go").touch()
    assert stem.wait_for_task(offered, timeout=30).state is TaskState.REVOKED
    after = stem.enqueue("mark", {"name": "after"})
    assert stem.wait_for_task(after, timeout=30).state is TaskState.SUCCEEDED
    assert not (tmp_path / "m.ran").exists()


@needs_offers
def test_an_offered_task_s_hard_time_limit_starts_when_it_is_claimed(setup, tmp_path):
    registry = setup[0]
    _register(registry, tmp_path)
    registry.task("quick", options=TaskOptions(hard_time_limit=1))(lambda ctx: os.getpid())
    stem, w, _, quick = _one_busy_child_with_an_offer(setup, tmp_path, offer=("quick",))
    t0 = time.monotonic()
    # waiting behind the blocker for longer than its limit must not count against it
    wait_for(lambda: time.monotonic() - t0 > 1.5, what="the offer to outlive its limit", interval=0.05)
    assert quick not in {t["id"] for t in w.inspect()["running"]}   # offered, not running
    (tmp_path / "a.go").touch()
    status = stem.wait_for_task(quick, timeout=30)
    assert status.state is TaskState.SUCCEEDED, status


@needs_offers
def test_no_child_runs_more_than_max_tasks_per_child_with_offers(setup):
    registry, stem, worker, _ = setup
    registry.task("pid")(lambda ctx: os.getpid())
    worker(concurrency=2, lifecycle=lifecycle(max_tasks_per_child=3)).run_in_background()
    ids = stem.enqueue_many([("pid", {})] * 60)
    statuses = [stem.wait_for_task(i, timeout=60) for i in ids]
    assert all(s.state is TaskState.SUCCEEDED for s in statuses)
    per_child = collections.Counter(s.result for s in statuses)
    assert max(per_child.values()) <= 3, per_child


@needs_offers
def test_a_warm_shutdown_requeues_an_unclaimed_offer_and_finishes_the_running_task(setup, tmp_path):
    _register(setup[0], tmp_path)
    stem, w, running, offered = _one_busy_child_with_an_offer(setup, tmp_path)
    w.shutdown_nowait("warm")
    wait_for(lambda: _engine(w)["offers_withdrawn"] >= 1, what="the offer to be taken back")
    (tmp_path / "a.go").touch()
    assert stem.wait_for_task(running, timeout=30).state is TaskState.SUCCEEDED
    assert w.join(20), "the worker did not stop"
    assert not (tmp_path / "m.ran").exists()
    assert stem.get_status(offered).state in (TaskState.PENDING, TaskState.QUEUED)
    setup[2](concurrency=1).run_in_background()
    assert stem.wait_for_task(offered, timeout=30).state is TaskState.SUCCEEDED


@needs_offers
def test_results_the_child_wrote_before_it_died_still_count(setup, tmp_path, monkeypatch):
    """A child reports a task after it claimed the next offer; if that one kills it, its
    reports may still sit in the ring when the pool handles the exit.  The pool here reads
    nothing until then, so the exit always finds them there."""
    from stem.worker.process_engine import ProcessEngine
    registry, stem, worker, _ = setup
    _register(registry, tmp_path)
    registry.task("die_now", options=TaskOptions(max_retries=0))(lambda ctx: os._exit(1))
    unread = {"hold": False, "draining": False}
    read, drain = ProcessEngine._read, ProcessEngine._drain_late_results

    def held_read(self, child):
        if not unread["hold"] or unread["draining"]:
            read(self, child)

    def drain_then_read_again(self, child):
        unread["draining"] = True
        try:
            drain(self, child)
        finally:
            unread["hold"] = unread["draining"] = False

    monkeypatch.setattr(ProcessEngine, "_read", held_read)
    monkeypatch.setattr(ProcessEngine, "_drain_late_results", drain_then_read_again)
    _, w, blocker, first = _one_busy_child_with_an_offer(setup, tmp_path)
    doomed = stem.enqueue("die_now")
    wait_for(lambda: _engine(w)["offers_made"] >= 2, what="both offered to the busy child")
    unread["hold"] = True
    (tmp_path / "a.go").touch()   # block ends, m runs, die_now kills the child: all before a read
    assert stem.wait_for_task(doomed, timeout=30).reason == "poison"   # it kills every child it runs in
    for task_id in (blocker, first):
        status = stem.wait_for_task(task_id, timeout=30)
        assert status.state is TaskState.SUCCEEDED and status.attempt == 0, status
    assert (tmp_path / "m.ran").read_text().count("\n") == 1


@needs_offers
@pytest.mark.timeout(120)
def test_offers_lose_and_repeat_nothing_under_crashes_recycling_and_revokes(setup, tmp_path):
    registry, stem, worker, _ = setup
    marks = tmp_path / "marks"
    marks.mkdir()

    @registry.task("work", options=TaskOptions(max_retries=2))
    def work(ctx, i):
        if i % 23 == 0 and not os.path.exists(marks / f"crashed-{ctx.id}"):
            open(marks / f"crashed-{ctx.id}", "w").close()
            os._exit(1)                 # kills its child, maybe holding offers: redelivered
        if i % 7 == 0:
            time.sleep(0.003)           # a longer one: offers wait behind it, idle children take them
        os.close(os.open(marks / ctx.id, os.O_CREAT | os.O_EXCL | os.O_WRONLY))   # a second run raises
        return i

    w = worker(concurrency=2, lifecycle=lifecycle(max_tasks_per_child=25))
    w.run_in_background()
    ids = stem.enqueue_many([("work", {"i": i}) for i in range(600)])
    revoked = set(ids[400:430])
    w.revoke(sorted(revoked))
    statuses = {i: stem.wait_for_task(i, timeout=60) for i in ids}
    for n, task_id in enumerate(ids):
        status = statuses[task_id]
        if task_id in revoked and status.state is TaskState.REVOKED:
            assert not (marks / task_id).exists()
        else:
            assert status.state is TaskState.SUCCEEDED and status.result == n, (n, status)
    succeeded = {i for i, s in statuses.items() if s.state is TaskState.SUCCEEDED}
    assert {p.name for p in marks.iterdir() if not p.name.startswith("crashed-")} == succeeded
    info = _engine(w)
    assert info["offers_made"] > 100 and info["offers_withdrawn"] > 0 and info["child_replacements"] >= 20


def test_the_pure_build_makes_no_offers(setup):
    registry, stem, worker, _ = setup
    registry.task("pid")(lambda ctx: os.getpid())
    w = worker(concurrency=1)
    w.run_in_background()
    ids = stem.enqueue_many([("pid", {})] * 50)
    assert all(stem.wait_for_task(i, timeout=30).state is TaskState.SUCCEEDED for i in ids)
    info = _engine(w)
    assert info["offers"] is Channel.can_offer
    if not Channel.can_offer:
        assert info["offers_made"] == 0
    w.shutdown(ShutdownMode.WARM, timeout=15)


class _ScriptedChannel:
    """A child's channel that replays the supervisor's side and records what the child does."""

    def __init__(self, batches, claims):
        self.batches = list(batches)
        self.claims = claims
        self.log: list[tuple] = []

    def _next(self):
        return self.batches.pop(0) if self.batches else []

    def recv_wait(self, timeout, max_n=64):
        self.log.append(("recv_wait",))
        return self._next()

    def recv_many(self, max_n):
        self.log.append(("recv_many",))
        return self._next()

    def claim(self, seq, slot):
        self.log.append(("claim", seq, slot))
        return self.claims[seq]

    def send(self, payload):
        msg = protocol.decode_from_child(payload)
        self.log.append(("result", msg.seq))
        return True

    def send_quiet(self, payload):
        self.log.append(("quiet", protocol.decode_from_child(payload).seq))
        return True

    def pending_bytes(self):
        return 1 if self.batches and self.batches[0] else 0


def test_a_child_claims_the_offer_in_its_ring_before_it_reports_the_task_before_it():
    registry = TaskRegistry()
    registry.task("noop")(lambda ctx: None)
    broker = InMemoryBroker()
    Stem(broker, None, registry).enqueue("noop")
    frame = broker.consume(["default"], 1, 1.0, consumer="t")[0].frame
    enc = protocol.encode_message
    channel = _ScriptedChannel(
        [[enc(protocol.Task(1, frame))],          # runs 1
         [enc(protocol.Offer(2, frame, 0))],      # claimed, then 1's result goes out, then 2 runs
         [enc(protocol.Offer(3, frame, 1))],      # taken back by the supervisor: skipped
         [],                                          # nothing more: 2's result goes out now
         [enc(protocol.Stop())]],
        claims={2: True, 3: False})
    child = child_module.ChildProcess(channel, registry, {"supervisor_pid": os.getpid()})
    assert child.serve() == protocol.ChildExit.OK
    assert channel.log == [("recv_wait",), ("recv_many",), ("claim", 2, 0), ("result", 1),
                           ("recv_many",), ("claim", 3, 1), ("recv_many",), ("result", 2), ("recv_wait",)]


def test_a_child_sends_a_short_task_s_result_quietly_while_two_tasks_wait_behind_the_next():
    registry = TaskRegistry()
    registry.task("noop")(lambda ctx: None)
    registry.task("slow")(lambda ctx: time.sleep(2 * child_module.QUIET_RUN_LIMIT))
    broker = InMemoryBroker()
    producer = Stem(broker, None, registry)
    producer.enqueue("noop")
    producer.enqueue("slow")
    noop, slow = (d.frame for d in broker.consume(["default"], 2, 1.0, consumer="t"))
    enc = protocol.encode_message

    def offer(seq, frame=noop):
        return enc(protocol.Offer(seq, frame, seq % 4))

    assert child_module.QUIET_AHEAD == 2
    channel = _ScriptedChannel(
        [[enc(protocol.Task(1, noop))],
         [offer(2), offer(3, slow), offer(4), offer(5), offer(6)],
         [offer(7)],
         [],
         [enc(protocol.Stop())]],
        claims={seq: True for seq in range(2, 8)})
    child = child_module.ChildProcess(channel, registry, {"supervisor_pid": os.getpid()})
    assert child.serve() == protocol.ChildExit.OK
    assert channel.log == [
        ("recv_wait",), ("recv_many",),
        ("claim", 2, 2), ("quiet", 1),     # 3, 4, 5 and 6 wait behind 2
        ("claim", 3, 3), ("quiet", 2),
        ("claim", 4, 0), ("result", 3),    # 3 ran long: it always rings
        ("claim", 5, 1), ("quiet", 4),     # one waits behind 5 in this batch, more in the ring
        ("claim", 6, 2), ("result", 5),    # nothing behind 6 in this batch: ring, the queue runs low
        ("recv_many",), ("claim", 7, 3), ("result", 6),
        ("recv_many",), ("result", 7), ("recv_wait",)]


@needs_offers
def test_a_quiet_result_is_reported_while_the_task_after_it_still_runs(setup, tmp_path):
    """m1's Result goes out without the doorbell (b, m3 and m4 wait behind b), then b
    blocks: the supervisor still reads it on its own, not only at the next doorbell."""
    registry, stem, worker, _ = setup
    _register(registry, tmp_path)
    w = worker(concurrency=1, prefetch_multiplier=8)   # room for one running task and four offers
    w.run_in_background()
    first = stem.enqueue("block", {"name": "a"})
    wait_for(lambda: (tmp_path / "a.started").exists(), what="a to start")
    m1 = stem.enqueue("mark", {"name": "m1"})
    b = stem.enqueue("block", {"name": "b"})
    rest = [stem.enqueue("mark", {"name": f"m{i}"}) for i in (3, 4)]
    wait_for(lambda: _engine(w)["offers_made"] >= 4, what="four offers to the busy child")
    (tmp_path / "a.go").touch()
    wait_for(lambda: (tmp_path / "b.started").exists(), what="b to start")
    assert stem.wait_for_task(first, timeout=30).state is TaskState.SUCCEEDED
    assert stem.wait_for_task(m1, timeout=10).state is TaskState.SUCCEEDED
    assert not stem.get_status(b).is_terminal
    (tmp_path / "b.go").touch()
    assert all(stem.wait_for_task(i, timeout=30).state is TaskState.SUCCEEDED for i in [b, *rest])
    w.shutdown(ShutdownMode.WARM, timeout=15)
