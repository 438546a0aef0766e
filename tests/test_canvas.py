"""Canvas (stem.canvas) end to end on the in-memory adapters with an inline worker: what the
user sees of group, chord, chain, chunks and their failure policies.  The backends' group
records have their contract suite (tests/contract/test_group_records_contract.py); the
process engine, the shared stores and the faults run in tests/e2e/test_canvas_faults.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from stem import AsyncStem, PayloadSigner, ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, Worker
from stem import WorkerLifecycleConfig
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker, Message
from stem.canvas import GroupResults, MemberFailure, Signature, chain, chord, chunks, group
from stem.envelope import Envelope, encode_frame
from stem.errors import InvalidTaskOptionsError, TaskFailedError, UnknownTaskError
from stem.retry import FixedRetryStrategy

from .support import wait_for

NO_SIGNALS = WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5, force_shutdown_after=5)


def build_registry() -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("add")
    def add(ctx, a: int = 0, b: int = 0) -> int:
        return (ctx.previous or 0) + a + b

    @registry.task("total")
    def total(ctx) -> int:
        return sum(ctx.previous)

    @registry.task("listed")
    def listed(ctx):
        return list(ctx.previous)

    @registry.task("count")
    def count(ctx, items) -> int:
        return len(items)

    @registry.task("boom")
    def boom(ctx, n: int = 0):
        raise ValueError(f"boom {n}")

    @registry.task("named")
    def named(ctx, value=None, extra: int = 0):
        return {"value": value, "extra": extra}

    @registry.task("once", options=TaskOptions(unique=True, unique_for=60))
    def once(ctx, n: int = 0) -> int:
        return n

    @registry.task("slow")
    def slow(ctx, n: int = 0, seconds: float = 0.3):
        time.sleep(seconds)
        return n

    return registry


class Env:
    def __init__(self, signer=None):
        self.registry = build_registry()
        self.broker, self.backend = InMemoryBroker(), InMemoryResultBackend()
        self.signer = signer
        self.stem = Stem(self.broker, self.backend, self.registry, signer)
        self.workers: list[Worker] = []

    def worker(self, **kw) -> Worker:
        kw.setdefault("concurrency", 2)
        kw.setdefault("lifecycle", NO_SIGNALS)
        kw.setdefault("isolation", "inline")
        kw.setdefault("retry_strategy", FixedRetryStrategy(0.01))
        kw.setdefault("signer", self.signer)
        w = Worker(self.broker, self.backend, self.registry, **kw)
        self.workers.append(w)
        w.run_in_background()
        return w


@pytest.fixture
def env():
    e = Env()
    yield e
    for w in e.workers:
        w.shutdown(ShutdownMode.HARD, timeout=15)


def sig(name, args=None, **kw):
    return Signature(name, args, **kw)


def test_a_chord_callback_gets_the_member_results_in_input_order(env):
    env.worker(concurrency=4)
    h = env.stem.apply(chord(group(sig("add", {"a": i}) for i in range(50)), sig("listed")))
    status = h.wait(20)
    assert status.state is TaskState.SUCCEEDED and status.result == list(range(50))
    assert h.results() == list(range(50))
    assert str(h.progress()) == "50 of 50 done"
    assert h.kind == "chord"


def test_a_chain_passes_each_result_on_as_ctx_previous(env):
    env.worker()
    h = env.stem.apply(chain(sig("add", {"a": 1}), sig("add", {"a": 2}), sig("add", {"a": 3})))
    assert h.get(20) == 6
    assert h.results() == [1, 3, 6]
    assert h.progress() == (3, 3)


def test_a_step_can_take_the_previous_result_as_a_named_argument(env):
    env.worker()
    h = env.stem.apply(chain(sig("add", {"a": 4}), sig("named", {"extra": 1}, previous_as="value")))
    assert h.get(20) == {"value": 4, "extra": 1}


def test_typed_handles_make_signatures():
    registry = TaskRegistry()

    @registry.task("mul")
    def mul(ctx, a: int, b: int) -> int:
        return a * b

    s = mul.s(2, previous_as="b")
    assert (s.name, s.args, s.previous_as) == ("mul", {"a": 2}, "b")
    with pytest.raises(InvalidTaskOptionsError, match="no argument 'c'"):
        mul.s(c=1)
    with pytest.raises(InvalidTaskOptionsError, match="no argument 'zz'"):
        mul.s(previous_as="zz")
    assert registry.signature("mul", {"a": 1}).args == {"a": 1}
    with pytest.raises(UnknownTaskError):
        registry.signature("nope")


def test_chunks_split_items_producer_side_into_tasks_of_size_items(env):
    env.worker()
    h = env.stem.apply(chunks("count", range(250), 100))
    assert h.wait(20).state is TaskState.SUCCEEDED
    assert h.results() == [100, 100, 50]


def test_a_group_ends_succeeded_with_every_member_result(env):
    env.worker()
    h = env.stem.apply(group(sig("add", {"a": i, "b": 1}) for i in range(5)))
    assert h.wait(20).state is TaskState.SUCCEEDED
    assert h.results() == [1, 2, 3, 4, 5]


def test_a_chord_in_a_chain_in_a_group_runs_each_part_in_order(env):
    env.worker(concurrency=4)
    inner = chain(sig("add", {"a": 1}), chord(group(sig("add", {"a": 5}), sig("add", {"a": 6})), sig("total")),
                  sig("add", {"a": 100}))
    h = env.stem.apply(group(inner for _ in range(3)))
    assert h.wait(20).state is TaskState.SUCCEEDED
    assert h.results() == [113, 113, 113]          # (1+5) + (1+6) = 13, then + 100


def test_a_chord_callback_can_be_a_chain_with_a_group_inside(env):
    env.worker(concurrency=4)
    callback = chain(sig("total"), group([sig("add", {"a": 1}), sig("add", {"a": 2})]), sig("total"))
    h = env.stem.apply(chord(group(sig("add", {"a": i}) for i in range(4)), callback))
    assert h.get(20) == (6 + 1) + (6 + 2)
    assert h.results() == [0, 1, 2, 3]


def test_a_group_step_hands_the_next_step_its_results(env):
    env.worker()
    h = env.stem.apply(chain(group(sig("add", {"a": i}) for i in range(4)), sig("total")))
    assert h.get(20) == 6


def test_a_failed_member_fails_the_chord_with_dependency_failed_and_the_callback_never_runs(env):
    env.worker()
    h = env.stem.apply(chord(group([sig("add", {"a": 1}), sig("boom", {"n": 1}), sig("add", {"a": 2})]),
                             sig("total")))
    status = h.wait(20)
    assert status.state is TaskState.FAILED and status.reason == "dependency-failed"
    assert status.result == {"failed": [f"{h.id}.1"]} and f"{h.id}.1" in status.error
    wait_for(lambda: h.progress() == (3, 3), 10, "every member to end")
    assert env.backend.get(h.id).reason == "dependency-failed"      # no callback replaced it
    results = h.results()
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], MemberFailure) and results[1].state == "FAILED"
    with pytest.raises(TaskFailedError):
        h.get(1)


def test_on_failure_continue_runs_the_callback_with_the_failures_in_place(env):
    env.worker()
    h = env.stem.apply(chord(group([sig("add", {"a": 1}), sig("boom", {"n": 7})]), sig("listed"),
                             on_failure="continue"))
    status = h.wait(20)
    assert status.state is TaskState.SUCCEEDED
    first, second = status.result
    assert first == 1
    assert second[0] == f"{h.id}.1" and second[1] == "FAILED" and "boom 7" in second[3]


def test_on_failure_fail_fast_revokes_the_members_not_run_yet(env):
    env.worker(concurrency=1)
    members = [sig("boom")] + [sig("slow", {"n": i, "seconds": 0.05}) for i in range(30)]
    h = env.stem.apply(chord(group(members), sig("total"), on_failure="fail_fast"))
    assert h.wait(20).reason == "dependency-failed"
    wait_for(lambda: h.progress() == (31, 31), 20, "every member to end, run or revoked")
    states = [s.state for s in env.backend.get_many([f"{h.id}.{i}" for i in range(31)])]
    assert states.count(TaskState.REVOKED) > 10, states


def test_a_failed_chain_step_stops_the_chain_and_says_which_step(env):
    env.worker()
    h = env.stem.apply(chain(sig("add", {"a": 1}), sig("boom", {"n": 2}), sig("add", {"a": 3})))
    status = h.wait(20)
    assert status.state is TaskState.FAILED and status.reason == "chain-step-failed"
    assert "step 1" in status.error and "boom 2" in status.error
    assert status.result == {"step": 1, "task_id": f"{h.id}.s1"}


def test_revoked_and_expired_members_count_so_the_chord_ends(env):
    h = env.stem.apply(chord(group([sig("add", {"a": 1}), sig("add", {"a": 2}, options=TaskOptions(expires=0.01)),
                                    sig("add", {"a": 3})]), sig("total")))
    env.stem.revoke([f"{h.id}.0"])
    time.sleep(0.05)                     # member 1's deadline passes while nothing runs
    env.worker()
    status = h.wait(20)
    assert status.state is TaskState.FAILED and status.reason == "dependency-failed"
    # "fail" ends the chord at the first failure counted: the revoked member, and the expired one
    # too when the worker settles both in one batch
    assert status.result["failed"] in ([f"{h.id}.0"], [f"{h.id}.0", f"{h.id}.1"])
    wait_for(lambda: env.backend.group_get(h.id).finished == 3, 20, what="every member to be counted")
    record = env.backend.group_get(h.id)
    assert (record.succeeded, record.failed) == (1, 2)
    assert sorted(env.backend.group_failed_members(h.id)) == [f"{h.id}.0", f"{h.id}.1"]


def test_a_member_with_a_bad_signature_counts_dead(env):
    signer = PayloadSigner({"k1": b"k" * 32})
    env.stem = Stem(env.broker, env.backend, env.registry, signer)
    h = env.stem.apply(chord(group([sig("add", {"a": 1})]), sig("total")))
    # a second member slipped in unsigned (as if forged): its group must still end
    env.backend.group_create("g-forged", 1, encode_frame(Envelope("g-forged", "stem.canvas.group",
                                                                  {"up": None, "b": None, "f": "fail", "n": 1}),
                                                         signer), seal_by=time.time() + 60, ttl=60)
    env.backend.group_seal("g-forged")
    env.broker.publish(Message("g-forged.0", "default",
                               encode_frame(Envelope("g-forged.0", "add", {}, canvas={"up": {"g": "g-forged"}})),
                               0, None, None))
    env.signer = signer
    env.worker()
    assert h.get(20) == 1
    forged = env.stem.wait_for_task("g-forged", 20)
    assert forged.state is TaskState.FAILED and forged.result == {"failed": ["g-forged.0"]}


def test_an_ignore_result_member_still_delivers_its_result_to_the_group(env):
    env.worker()
    h = env.stem.apply(chord(group(sig("add", {"a": i}, options=TaskOptions(ignore_result=True))
                                   for i in range(3)), sig("total")))
    assert h.get(20) == 3
    assert env.backend.get(f"{h.id}.0") is None


def test_a_group_never_sealed_ends_failed_creation_interrupted(env):
    runner_stem = env.stem
    from stem.canvas import Runner
    runner = Runner(runner_stem, creation_timeout=0.01)
    data = encode_frame(Envelope("g-half", "stem.canvas.group", {"up": None, "b": None, "f": "fail", "n": 5}))
    env.backend.group_create("g-half", 5, data, seal_by=time.time() - 1, ttl=60)
    assert runner.sweep() == 1
    status = env.stem.wait_for_task("g-half", 5)
    assert status.state is TaskState.FAILED and status.reason == "creation-interrupted"
    assert runner.sweep() == 0


def test_a_worker_sweeps_unsealed_groups_with_its_heartbeat(env):
    data = encode_frame(Envelope("g-late", "stem.canvas.group", {"up": None, "b": None, "f": "fail", "n": 1}))
    env.backend.group_create("g-late", 1, data, seal_by=time.time() - 1, ttl=60)
    env.worker(heartbeat_interval=0.1)
    assert env.stem.wait_for_task("g-late", 10).reason == "creation-interrupted"


def test_a_handle_by_id_works_from_another_producer(env):
    env.worker()
    h = env.stem.apply(chord(group(sig("add", {"a": i}) for i in range(4)), sig("total")))
    other = Stem(env.broker, env.backend)
    again = other.canvas_handle(h.id)
    assert again.kind == "chord"
    assert again.get(20) == 6 and again.results() == [0, 1, 2, 3]


def test_large_results_are_read_page_by_page(env, monkeypatch):
    import stem.canvas as canvas
    monkeypatch.setattr(canvas, "PAGE", 7)
    env.worker(concurrency=4)
    h = env.stem.apply(chord(group(sig("add", {"a": i}) for i in range(30)), sig("total")))
    assert h.get(20) == sum(range(30))
    reads = []
    real = env.backend.group_outcomes
    monkeypatch.setattr(env.backend, "group_outcomes", lambda g, a, b: reads.append((a, b)) or real(g, a, b))
    results = GroupResults(env.backend, h.id)
    assert results[8] == 8 and results[-1] == 29 and list(results) == list(range(30))
    assert reads[:2] == [(7, 14), (28, 30)] and all(b - a <= 7 for a, b in reads)


def test_async_apply(env):
    env.worker()

    async def main():
        h = await AsyncStem(env.stem).apply(chain(sig("add", {"a": 1}), sig("add", {"a": 1})))
        return await h.get(20)

    assert asyncio.run(main()) == 2


@pytest.mark.parametrize("build, match", [
    (lambda: chain(), "at least one step"),
    (lambda: chain("add"), "takes signatures"),
    (lambda: chord(group(), sig("add"), on_failure="later"), "on_failure"),
    (lambda: chunks("count", [1], 0), "size"),
    (lambda: chord(group([sig("add")]), group([sig("add")])), "cannot end in a group"),
    (lambda: chord(group([sig("add")]), chain(sig("add"), chord(group([sig("add")]), sig("total")))),
     "cannot end in a group"),
    (lambda: sig("", {}), "non-empty"),
    (lambda: sig("add", {1: 2}), "str keys"),
    (lambda: sig("add", options={"queue": "x"}), "TaskOptions"),
    (lambda: sig("add", options=TaskOptions(unique=True, unique_key=lambda a: 1)), "cannot be unique"),
    (lambda: sig("add", options=TaskOptions(unique=True)), "cannot be unique"),
    (lambda: chunks("count", [1, 2], 1, options=TaskOptions(unique=True, unique_for=60)), "cannot be unique"),
])
def test_bad_canvases_are_refused_when_built(build, match):
    with pytest.raises(InvalidTaskOptionsError, match=match):
        build()


def test_bad_canvases_are_refused_before_anything_is_published(env):
    with pytest.raises(UnknownTaskError):
        env.stem.apply(chord(group([sig("add"), sig("nope")]), sig("total")))
    with pytest.raises(InvalidTaskOptionsError, match="msgpack"):
        env.stem.apply(group([sig("add", {"a": object()})]))
    with pytest.raises(InvalidTaskOptionsError, match="apply takes"):
        env.stem.apply("add")
    with pytest.raises(InvalidTaskOptionsError, match="creation_timeout"):
        env.stem.apply(group([sig("add")]), creation_timeout=0)
    assert env.broker.stats("default").ready == 0


def test_tasks_outside_a_canvas_carry_nothing_of_it(env):
    env.worker()
    task_id = env.stem.enqueue("add", {"a": 1})
    assert env.stem.wait_for_task(task_id, 20).result == 1
    ids = env.stem.enqueue_many([("add", {"a": i}) for i in range(3)])
    assert [env.stem.wait_for_task(i, 20).result for i in ids] == [0, 1, 2]


# -- group record lifetime: as long as the results, never before the reader ran ------------------
def _gone(env, group_id) -> bool:
    return env.backend.group_get(group_id) is None


def test_a_group_and_its_own_status_live_as_long_as_its_members_results(env):
    env.worker()
    short = TaskOptions(result_ttl=0.4)
    h = env.stem.apply(group(sig("add", {"a": i}, options=short) for i in range(3)))
    assert h.wait(20).state is TaskState.SUCCEEDED
    assert env.backend.group_get(h.id).ttl == 0.4      # the members', not result_expires (a day)
    assert h.results() == [0, 1, 2]
    wait_for(lambda: _gone(env, h.id) and env.backend.get(h.id) is None, 10,
             "the record and the group's status to expire with the results")


def test_a_chord_record_outlives_short_member_results_until_its_callback_ran(env):
    env.worker()                                      # runs the members; the callback's queue waits
    members = group(sig("add", {"a": i}, options=TaskOptions(result_ttl=0.2)) for i in range(4))
    callback = sig("listed", options=TaskOptions(queue="later", result_ttl=0.6))
    h = env.stem.apply(chord(members, callback))
    wait_for(lambda: h.progress().done == 4, 20, "the members to end")
    time.sleep(0.5)                                   # past the members' lifetime: the callback waits
    assert env.backend.group_get(h.id).held
    env.worker(queues=["later"])
    assert h.get(20) == [0, 1, 2, 3]                  # read from the record, still there
    record = env.backend.group_get(h.id)
    assert (record.held, record.ttl) == (False, 0.6)  # released, as long as the callback's result
    assert h.results() == [0, 1, 2, 3]
    wait_for(lambda: _gone(env, h.id), 10, "the released record to expire")


def test_a_failed_chord_releases_its_record_the_callback_never_reads(env):
    env.worker()
    short = TaskOptions(result_ttl=0.3)
    h = env.stem.apply(chord(group([sig("add", {"a": 1}, options=short), sig("boom", options=short)]),
                             sig("total")))
    assert h.wait(20).reason == "dependency-failed"
    wait_for(lambda: _gone(env, h.id), 10, "the failed chord's record to expire")


def test_a_group_read_by_the_next_group_is_kept_until_that_group_ends(env):
    env.worker()
    first = group(sig("add", {"a": i}, options=TaskOptions(result_ttl=0.2)) for i in range(3))
    second = group(sig("total", options=TaskOptions(queue="later", result_ttl=0.3)) for _ in range(2))
    h = env.stem.apply(chain(first, second))
    wait_for(lambda: env.backend.group_get(f"{h.id}.s0") is not None
             and env.backend.group_get(f"{h.id}.s0").finished == 3, 20, "the first group to end")
    time.sleep(0.4)
    env.worker(queues=["later"], concurrency=1)       # one second member at a time: each reads it
    assert h.wait(20).state is TaskState.SUCCEEDED
    assert list(GroupResults(env.backend, h.id)) == [3, 3]   # each read the first group whole
    wait_for(lambda: _gone(env, f"{h.id}.s0"), 10, "the first group's record to expire once read")


def test_applying_a_canvas_id_again_starts_nothing_twice(env):
    builds = {"again-chain": lambda: chain(sig("add", {"a": 1}), sig("add", {"a": 2})),
              "again-chord": lambda: chord(group(sig("add", {"a": i}) for i in range(3)), sig("total")),
              "again-task": lambda: sig("add", {"a": 5})}
    for canvas_id, build in builds.items():
        first = env.stem.apply(build(), canvas_id=canvas_id)
        again = env.stem.apply(build(), canvas_id=canvas_id)
        assert first.id == again.id == canvas_id
    assert env.broker.stats("default").ready == 1 + 3 + 1        # each canvas's first tasks, once
    env.worker()
    assert [env.stem.canvas_handle(c).get(20) for c in builds] == [3, 3, 5]


# -- unique tasks: refused in a canvas, at apply ------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: group([sig("add", {"a": 1}), sig("once", {"n": 1})]),
    lambda: chord(group([sig("add", {"a": 1})]), sig("once")),
    lambda: chain(sig("add", {"a": 1}), sig("once", {"n": 2})),
    lambda: chunks("once", [1, 2, 3], 2),
])
def test_a_unique_handler_in_a_canvas_is_refused_at_apply_before_anything_is_published(env, build):
    from stem.errors import StemError
    with pytest.raises(InvalidTaskOptionsError, match="cannot be unique.*unique=False") as refused:
        env.stem.apply(build())
    assert isinstance(refused.value, StemError)
    assert "'once'" in str(refused.value) and "canvas_id" in str(refused.value)
    assert env.broker.stats("default").ready == 0
    assert env.stem.enqueue("once", {"n": 1}) == env.stem.enqueue("once", {"n": 1})   # still unique outside


def test_a_unique_handler_opted_out_runs_in_a_canvas_without_its_key(env):
    env.worker()
    opted_out = TaskOptions(unique=False)
    # two canvases with the same args: neither is a duplicate of the other
    a = env.stem.apply(group(sig("once", {"n": i}, options=opted_out) for i in range(3)))
    b = env.stem.apply(group(sig("once", {"n": i}, options=opted_out) for i in range(3)))
    assert a.wait(20).state is b.wait(20).state is TaskState.SUCCEEDED
    assert a.results() == b.results() == [0, 1, 2]
