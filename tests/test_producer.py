"""The producer validates everything before publishing anything."""

from __future__ import annotations

import asyncio
import time

import pytest

from stem import AsyncStem, Stem, TaskOptions, TaskRegistry, TaskState, signals
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.envelope import decode_frame, read_header
from stem.errors import (ConfigurationError, EncodeError, InvalidTaskOptionsError, TaskTimeoutError,
                         UnknownTaskError)
from stem.results import TaskStatus


@pytest.fixture
def registry():
    r = TaskRegistry()
    r.task("email.send", options=TaskOptions(max_retries=2, queue="mail"))(lambda ctx, to, subject="": to)
    r.task("noop")(lambda ctx: None)
    return r


@pytest.fixture
def stem(registry):
    return Stem(broker=InMemoryBroker(), backend=InMemoryResultBackend(), registry=registry)


def test_enqueue_publishes_a_frame_with_resolved_options(stem):
    tid = stem.enqueue("email.send", args={"to": "a@b.c"}, meta={"trace": "x"})
    [d] = stem.broker.consume(["mail"], 1, 1.0)
    env = decode_frame(d.frame)
    assert (env.id, env.name, env.args, env.meta) == (tid, "email.send", {"to": "a@b.c"}, {"trace": "x"})
    assert env.max_retries == 2 and env.queue == "mail" and env.attempt == 0


def test_enqueue_options_override_the_handlers(stem):
    stem.enqueue("email.send", args={"to": "x"}, options=TaskOptions(queue="urgent", priority=5))
    [d] = stem.broker.consume(["urgent"], 1, 1.0)
    env = decode_frame(d.frame)
    assert env.queue == "urgent" and env.priority == 5 and env.max_retries == 2


@pytest.mark.parametrize("call, error, fragment", [
    (lambda s: s.enqueue("emial.send", {"to": "x"}), UnknownTaskError, "did you mean 'email.send'"),
    (lambda s: s.enqueue("email.send", {"to": object()}), EncodeError, "encode|object"),
    (lambda s: s.enqueue("email.send", ["not", "a", "dict"]), EncodeError, "dict"),
    (lambda s: s.enqueue("email.send", {1: "x"}), EncodeError, "str keys"),
    (lambda s: s.enqueue("email.send", {"to": "x"}, options={"queue": "q"}), InvalidTaskOptionsError, "TaskOptions"),
    (lambda s: s.enqueue("email.send", {"to": "x"}, countdown=-1), InvalidTaskOptionsError, "countdown"),
    (lambda s: s.enqueue("email.send", {"to": "x"}, countdown=1, eta=5.0), InvalidTaskOptionsError, "not both"),
    (lambda s: s.enqueue("email.send", {"to": "x"}, meta=[1]), EncodeError, "meta"),
    (lambda s: s.enqueue("email.send", {"to": "x"}, headers={"a": 1}), EncodeError, "headers"),
    (lambda s: s.enqueue("email.send", {"to": "x"}, task_id=""), InvalidTaskOptionsError, "task_id"),
    (lambda s: s.enqueue("email.send", {"to": "x"}, options=TaskOptions(unique=True, unique_key=["cc"])),
     InvalidTaskOptionsError, "unique_key"),
    (lambda s: s.enqueue("email.send", {"to": "x"}, on_duplicate="ignore"), InvalidTaskOptionsError,
     "on_duplicate"),
    (lambda s: s.enqueue("email.send", {"to": "x"}, options=TaskOptions(rate_limit="1/s", rate_scope="worker")),
     InvalidTaskOptionsError, "rate_scope='worker' is an option of the handler"),
    (lambda s: s.enqueue("email.send", {"to": "x"}, options=TaskOptions(rate_limit="1/s", rate_key=["nope"])),
     InvalidTaskOptionsError, "rate_key of task 'email.send' names"),
    (lambda s: s.enqueue("", {}), InvalidTaskOptionsError, "name"),
])
def test_bad_input_raises_and_publishes_nothing(stem, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call(stem)
    for q in ("mail", "default"):
        assert stem.broker.stats(q).ready == 0


def test_enqueue_many_validates_every_item_before_publishing_any(stem):
    with pytest.raises(UnknownTaskError):
        stem.enqueue_many([("email.send", {"to": "1"}), ("nope", {})])
    assert stem.broker.stats("mail").ready == 0


def test_enqueue_many_publishes_in_one_broker_call(stem, monkeypatch):
    calls = []
    real = stem.broker.publish_many
    monkeypatch.setattr(stem.broker, "publish_many", lambda ms: (calls.append(len(ms)), real(ms)))
    monkeypatch.setattr(stem.broker, "publish", lambda m: pytest.fail("publish called per item"))
    ids = stem.enqueue_many([("email.send", {"to": str(i)}) for i in range(100)] +
                            [{"name": "noop", "countdown": 60}, ("noop", {}, TaskOptions(queue="q2"))])
    assert calls == [102] and len(set(ids)) == 102
    assert stem.broker.stats("mail").ready == 100
    assert stem.broker.stats("default").delayed == 1
    assert stem.broker.stats("q2").ready == 1


def test_countdown_and_eta_become_not_before(stem):
    t0 = time.time()
    stem.enqueue("noop", countdown=30)
    stem.enqueue("noop", eta=t0 + 60)
    assert stem.broker.stats("default").delayed == 2


def test_expires_sets_expires_at(stem):
    stem.enqueue("noop", options=TaskOptions(expires=5))
    [d] = stem.broker.consume(["default"], 1, 1.0)
    env = decode_frame(d.frame)
    assert env.expires_at == pytest.approx(time.time() + 5, abs=2)


def test_a_producer_without_registry_accepts_any_name():
    s = Stem(InMemoryBroker(), None)
    s.enqueue("anything.goes", {"x": 1})
    assert s.broker.stats("default").ready == 1


def test_a_fire_and_forget_producer_cannot_wait():
    s = Stem(InMemoryBroker(), None)
    with pytest.raises(ConfigurationError, match="fire-and-forget"):
        s.wait_for_task("x")


def test_get_status_of_an_unknown_id_is_pending(stem):
    assert stem.get_status("nope").state is TaskState.PENDING


def test_wait_for_task_times_out_with_task_timeout_error(stem):
    tid = stem.enqueue("noop")
    with pytest.raises(TaskTimeoutError, match=tid):
        stem.wait_for_task(tid, timeout=0.1)
    with pytest.raises(InvalidTaskOptionsError):
        stem.wait_for_task(tid, timeout=-1)


def test_wait_for_task_returns_the_stored_terminal_status(stem):
    stem.backend.store(TaskStatus(id="t1", state=TaskState.SUCCEEDED, result=5))
    assert stem.wait_for_task("t1", timeout=1).result == 5


def test_publish_signals_fire_around_publishing(stem):
    seen = []
    before = signals.before_task_publish.connect(lambda s, envelope: seen.append(("before", envelope.name)))
    after = signals.after_task_publish.connect(lambda s, envelope: seen.append(("after", envelope.name)))
    try:
        stem.enqueue("noop")
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)
    assert seen == [("before", "noop"), ("after", "noop")]


def test_constructor_rejects_wrong_types():
    with pytest.raises(ConfigurationError):
        Stem(broker=object())
    with pytest.raises(ConfigurationError):
        Stem(InMemoryBroker(), backend=object())
    with pytest.raises(ConfigurationError):
        Stem(InMemoryBroker(), registry={"a": 1})


def test_revoke_is_recorded_in_the_backend(stem):
    stem.revoke("abc")
    assert stem.backend.revoked(["abc"]) == {"abc"}


def test_async_stem_enqueues_and_waits(registry):
    broker, backend = InMemoryBroker(), InMemoryResultBackend()

    async def main():
        s = AsyncStem(broker=broker, backend=backend, registry=registry)
        tid = await s.enqueue("noop")
        backend.store(TaskStatus(id=tid, state=TaskState.SUCCEEDED))
        status = await s.wait_for_task(tid, timeout=1)
        ids = await s.enqueue_many([("noop", {})] * 3)
        return status, ids

    status, ids = asyncio.run(main())
    assert status.state is TaskState.SUCCEEDED
    assert len(ids) == 3 and broker.stats("default").ready == 4


def test_header_of_a_fresh_frame_has_attempt_zero(stem):
    stem.enqueue("noop", countdown=5)
    [d] = stem.broker.consume(["default"], 1, 0) or [None]
    assert d is None  # delayed, not deliverable
    stem.enqueue("noop")
    [d] = stem.broker.consume(["default"], 1, 1.0)
    assert read_header(d.frame).attempt == 0


# ---- enqueue_many's batch path builds what enqueue builds ------------------------------

FULL_OPTIONS = TaskOptions(queue="q1", priority=7, max_retries=4, expires=60.0, visibility_timeout=12.0,
                           soft_time_limit=3.0, hard_time_limit=9.0)


def test_envelope_fields_are_in_the_order_the_producer_builds_them_by_position():
    from stem.envelope import Envelope
    assert Envelope.__struct_fields__ == (
        "id", "name", "args", "headers", "meta", "queue", "priority", "attempt", "max_retries",
        "enqueued_at", "not_before", "expires_at", "visibility_timeout", "soft_time_limit",
        "hard_time_limit", "parent_id", "root_id", "unset_options", "unique_until", "result_ttl", "failure_ttl",
        "ignore_result", "canvas")


@pytest.mark.parametrize("item", [
    ("email.send", {"to": "a"}),
    ("email.send", {"to": "a"}, FULL_OPTIONS),
    ("email.send", {"to": "a"}, None),
    ["email.send", {"to": "a"}, FULL_OPTIONS],
    {"name": "email.send", "args": {"to": "a"}, "options": FULL_OPTIONS},
])
def test_enqueue_many_frames_every_item_shape_as_enqueue_does(stem, item):
    options = item[2] if isinstance(item, (tuple, list)) and len(item) == 3 else (
        item.get("options") if isinstance(item, dict) else None)
    one = stem.enqueue("email.send", {"to": "a"}, options=options)
    [many] = stem.enqueue_many([item])
    queue = "mail" if options is None else "q1"
    d1, d2 = stem.broker.consume([queue], 2, 1.0)
    e1, e2 = decode_frame(d1.frame), decode_frame(d2.frame)
    assert (e1.id, e2.id) == (one, many)
    assert e2.enqueued_at == pytest.approx(e1.enqueued_at, abs=5)
    assert e2.expires_at == (None if e1.expires_at is None else pytest.approx(e1.expires_at, abs=5))
    same = dict(id=one, enqueued_at=e1.enqueued_at, expires_at=e1.expires_at)
    assert msgspec_replace(e2, **same) == e1
    if options is not None:
        assert (e2.queue, e2.priority, e2.max_retries, e2.visibility_timeout, e2.soft_time_limit,
                e2.hard_time_limit) == ("q1", 7, 4, 12.0, 3.0, 9.0)
        assert e2.expires_at == pytest.approx(e2.enqueued_at + 60.0)
        assert d2.visibility_timeout == 12.0


def msgspec_replace(env, **changes):
    import msgspec
    return msgspec.structs.replace(env, **changes)


def test_enqueue_many_ids_are_unique_uuid4_hex(stem):
    import uuid
    ids = stem.enqueue_many([("noop", {})] * 300 + [{"name": "noop"}, ["noop", None]])
    assert len(set(ids)) == len(ids) == 302
    for task_id in ids:
        u = uuid.UUID(hex=task_id)
        assert u.hex == task_id and u.version == 4 and u.variant == uuid.RFC_4122


def test_enqueue_many_keeps_an_explicit_task_id(stem):
    ids = stem.enqueue_many([("noop", {}), {"name": "noop", "task_id": "mine"}, ("noop", {})])
    assert ids[1] == "mine" and len(set(ids)) == 3


def test_enqueue_many_accepts_a_generator(stem):
    ids = stem.enqueue_many(("noop", {"i": i}) for i in range(5))
    assert len(ids) == 5 and stem.broker.stats("default").ready == 5


def test_enqueue_many_resolves_each_name_and_options_pair_separately(stem):
    stem.enqueue_many([("email.send", {"to": "a"}), ("email.send", {"to": "b"}, TaskOptions(queue="q2")),
                       ("email.send", {"to": "c"}, TaskOptions(queue="q3", priority=2)), ("noop", {}),
                       ("email.send", {"to": "d"}, TaskOptions(queue="q2")), ("email.send", {"to": "e"})])
    assert [stem.broker.stats(q).ready for q in ("mail", "q2", "q3", "default")] == [2, 2, 1, 1]
    [d] = stem.broker.consume(["q3"], 1, 1.0)
    env = decode_frame(d.frame)
    assert (env.priority, env.max_retries, d.visibility_timeout is not None) == (2, 2, True)


def test_enqueue_many_sees_a_task_registered_after_an_earlier_batch(stem, registry):
    with pytest.raises(UnknownTaskError):
        stem.enqueue_many([("late", {})])
    registry.task("late")(lambda ctx: None)
    assert len(stem.enqueue_many([("late", {})])) == 1


@pytest.mark.parametrize("bad, error, fragment", [
    (("emial.send", {"to": "x"}), UnknownTaskError, "did you mean 'email.send'"),
    (("email.send", {"to": object()}), EncodeError, "encode|object"),
    (("email.send", ["not", "a", "dict"]), EncodeError, "dict"),
    (("email.send", {1: "x"}), EncodeError, "str keys"),
    (("email.send", {"to": "x", 2: "y"}), EncodeError, "str keys"),
    (("email.send", {"to": "x"}, {"queue": "q"}), InvalidTaskOptionsError, "TaskOptions"),
    (("email.send", {"to": "x"}, TaskOptions(unique=True, unique_key=["cc"])), InvalidTaskOptionsError,
     "unique_key"),
    (("", {}), InvalidTaskOptionsError, "name"),
    ((["email.send"], {}), InvalidTaskOptionsError, "name"),
    ((["email.send"], {}, TaskOptions()), InvalidTaskOptionsError, "name"),
    ((None, {}), InvalidTaskOptionsError, "name"),
    (("email.send",), InvalidTaskOptionsError, "enqueue_many items"),
    (("email.send", {}, None, None), InvalidTaskOptionsError, "enqueue_many items"),
    ({"name": "email.send", "args": {"to": "x"}, "countdown": -1}, InvalidTaskOptionsError, "countdown"),
    ({"name": "email.send", "args": {"to": "x"}, "task_id": ""}, InvalidTaskOptionsError, "task_id"),
    ({"name": "email.send", "args": {"to": "x"}, "headers": {"a": 1}}, EncodeError, "headers"),
    ({"args": {}}, InvalidTaskOptionsError, "no 'name'"),
])
def test_enqueue_many_rejects_a_bad_item_after_good_ones_and_publishes_nothing(stem, bad, error, fragment):
    good = [("email.send", {"to": "a"}), ("email.send", {"to": "b"}, TaskOptions(queue="q2")), ("noop", {})]
    with pytest.raises(error, match=fragment):
        stem.enqueue_many(good + [bad] + good)
    for q in ("mail", "default", "q2"):
        assert stem.broker.stats(q).ready == 0


def test_enqueue_many_gives_every_envelope_its_own_headers_and_meta(stem):
    seen = []
    receiver = signals.before_task_publish.connect(lambda s, envelope: seen.append(envelope))
    try:
        stem.enqueue_many([("noop", {})] * 3)
    finally:
        signals.before_task_publish.disconnect(receiver)
    assert len({id(e.headers) for e in seen}) == 3 and len({id(e.meta) for e in seen}) == 3


def test_before_publish_receivers_can_change_the_framed_envelope_in_a_batch(stem):
    def add_header(sender, envelope):
        envelope.headers = {**envelope.headers, "trace": envelope.id}
    receiver = signals.before_task_publish.connect(add_header)
    try:
        ids = stem.enqueue_many([("noop", {}), ("noop", {})])
    finally:
        signals.before_task_publish.disconnect(receiver)
    got = {decode_frame(d.frame).headers["trace"] for d in stem.broker.consume(["default"], 2, 1.0)}
    assert got == set(ids)


# ---- the uniform batch: one name and options, spliced frames, one publish_frames call ------

def _record_publishing(stem, monkeypatch):
    calls = []
    real_frames, real_many = stem.broker.publish_frames, stem.broker.publish_many
    monkeypatch.setattr(stem.broker, "publish_frames",
                        lambda q, ids, frames, **kw: (calls.append(("frames", q, len(ids), kw)),
                                                      real_frames(q, ids, frames, **kw)))
    monkeypatch.setattr(stem.broker, "publish_many",
                        lambda ms: (calls.append(("many", len(ms))), real_many(ms)))
    return calls


@pytest.mark.parametrize("options", [None, FULL_OPTIONS])
def test_a_uniform_batch_is_one_publish_frames_call_with_the_frames_enqueue_makes(stem, monkeypatch, options):
    calls = _record_publishing(stem, monkeypatch)
    name = "".join(["email", ".send"])   # equal to the registered name, not the same object
    items = [(name, {"to": str(i)}) if options is None else (name, {"to": str(i)}, options) for i in range(50)]
    items.append((name, None) if options is None else (name, None, options))
    ids = stem.enqueue_many(items)
    queue = "mail" if options is None else "q1"
    # (the in-memory broker keeps Broker.publish_frames, which hands the batch to its publish_many)
    assert calls == [("frames", queue, 51, {"priority": 0 if options is None else 7,
                                            "visibility_timeout": None if options is None else 12.0}),
                     ("many", 51)]
    one = stem.enqueue("email.send", {"to": "0"}, options=options)
    got = {d.task_id: decode_frame(d.frame) for d in stem.broker.consume([queue], 60, 1.0)}
    assert list(got)[:51] == ids and len(set(ids)) == 51
    reference = got[one]
    for i, task_id in enumerate(ids):
        env = got[task_id]
        assert env.args == ({"to": str(i)} if i < 50 else {})
        same = dict(id=reference.id, args=reference.args, enqueued_at=reference.enqueued_at,
                    expires_at=reference.expires_at)
        assert msgspec_replace(env, **same) == reference


def test_batches_that_are_not_uniform_take_the_general_path(stem, monkeypatch):
    calls = _record_publishing(stem, monkeypatch)
    stem.enqueue_many([("noop", {}), ("noop", {}, None)])                                   # two shapes
    stem.enqueue_many([("noop", {}), ("email.send", {"to": "x"})])                          # two names
    stem.enqueue_many([("noop", {}, TaskOptions(queue="q2")), ("noop", {}, TaskOptions(queue="q2"))])  # two objects
    stem.enqueue_many([("noop", {}), ["noop", {}]])                                        # a list item
    assert [c[0] for c in calls] == ["many"] * 4
    assert stem.broker.stats("q2").ready == 2


@pytest.mark.parametrize("bad, error, fragment", [
    (("email.send", {"to": object()}), EncodeError, "encode|object"),
    (("email.send", ["not", "a", "dict"]), EncodeError, "dict"),
    (("email.send", {1: "x"}), EncodeError, "str keys"),
    (("email.send", {"to": "x", 2: "y"}), EncodeError, "str keys"),
    (("email.send", {"to": "x" * 20_000_000}), EncodeError, "max_size"),
])
def test_a_bad_item_in_a_uniform_batch_raises_the_usual_error_and_publishes_nothing(stem, monkeypatch, bad,
                                                                                     error, fragment):
    calls = _record_publishing(stem, monkeypatch)
    good = [("email.send", {"to": str(i)}) for i in range(5)]
    with pytest.raises(error, match=fragment):
        stem.enqueue_many(good + [bad] + good)
    assert calls == [] and stem.broker.stats("mail").ready == 0


def test_a_uniform_batch_checks_name_and_options_once_with_the_usual_errors(stem, monkeypatch):
    for items, error in (([("nope", {})] * 3, UnknownTaskError),
                         ([("noop", {}, TaskOptions(unique=True, unique_key=lambda a: a["x"]))] * 2,
                          InvalidTaskOptionsError),
                         ([("", {})] * 2, InvalidTaskOptionsError)):
        with pytest.raises(error):
            stem.enqueue_many(items)
    assert stem.broker.stats("default").ready == 0
    looked_up = []
    real = stem.registry.get
    monkeypatch.setattr(stem.registry, "get", lambda name: (looked_up.append(name), real(name))[1])
    stem.enqueue_many([("noop", {"i": i}) for i in range(100)])
    assert looked_up == ["noop"]


# -- waiting on many ---------------------------------------------------------------------------
def _done(stem, *ids, state=TaskState.SUCCEEDED):
    stem.backend.store_many([TaskStatus(id=i, state=state, result=i) for i in ids])


def test_wait_many_returns_done_by_id_and_pending_in_input_order(stem):
    _done(stem, "b", "d")
    result = stem.wait_many(["c", "b", "a", "d", "c"], timeout=0.2)
    assert set(result.done) == {"b", "d"} and result.done["b"].result == "b"
    assert result.pending == ["c", "a"]                   # input order, the duplicate once
    assert result == (result.done, result.pending)        # a NamedTuple


def test_wait_many_never_raises_on_its_timeout(stem):
    t0 = time.monotonic()
    assert stem.wait_many(["never"], timeout=0.3) == ({}, ["never"])
    assert time.monotonic() - t0 >= 0.25


def test_wait_many_passes_return_when_to_the_backend(stem):
    _done(stem, "x", state=TaskState.DEAD)
    assert stem.wait_many(["x", "y"], timeout=20, return_when="FIRST_EXCEPTION").pending == ["y"]
    assert stem.wait_many(["x", "y"], timeout=20, return_when="FIRST_COMPLETED").pending == ["y"]


def test_as_completed_yields_each_status_then_raises_naming_the_pending_ids(stem):
    _done(stem, "a", "c")
    got = []
    with pytest.raises(TaskTimeoutError, match="1 of 3 tasks did not finish within 0.3s: b") as info:
        for status in stem.as_completed(["a", "b", "c"], timeout=0.3):
            got.append(status.id)
    assert got == ["a", "c"] and info.value.pending == ["b"]


def test_as_completed_ends_quietly_when_every_task_finished(stem):
    _done(stem, "a")
    it = stem.as_completed(["a", "b"], timeout=20)
    assert next(it).id == "a"
    _done(stem, "b")
    assert [s.id for s in it] == ["b"]


@pytest.mark.parametrize("call", [
    lambda s: s.wait_many("abc"),                          # one id as a string
    lambda s: s.wait_many([1]),
    lambda s: s.wait_many(["a", None]),
    lambda s: s.wait_many(["a"], timeout=-1),
    lambda s: s.wait_many(["a"], timeout=float("inf")),
    lambda s: s.wait_many(["a"], return_when="first_completed"),
    lambda s: s.as_completed("abc"),
    lambda s: s.as_completed([b"a"]),
    lambda s: s.as_completed(["a"], timeout=-0.5),
])
def test_waits_check_every_argument_before_waiting(stem, call, monkeypatch):
    touched = []
    monkeypatch.setattr(stem.backend, "wait_many", lambda *a, **k: touched.append(a))
    monkeypatch.setattr(stem.backend, "watch", lambda *a, **k: touched.append(a))
    with pytest.raises(InvalidTaskOptionsError):
        call(stem)
    assert touched == []


def test_a_fire_and_forget_producer_cannot_wait_on_many():
    s = Stem(broker=InMemoryBroker(), backend=None)
    with pytest.raises(ConfigurationError):
        s.wait_many(["a"])
    with pytest.raises(ConfigurationError):
        s.as_completed(["a"])                               # at the call, not at the first next()


def test_async_stem_waits_on_many(stem):
    _done(stem, "a")

    async def main():
        astem = AsyncStem(stem)
        result = await astem.wait_many(["a", "b"], timeout=0.2)
        _done(stem, "b")
        seen = [s.id async for s in astem.as_completed(["a", "b"], timeout=20)]
        with pytest.raises(TaskTimeoutError):
            [s async for s in astem.as_completed(["a", "never"], timeout=0.2)]
        with pytest.raises(InvalidTaskOptionsError):
            await astem.wait_many(["a"], return_when="SOME")
        return result, seen

    result, seen = asyncio.run(main())
    assert result.pending == ["b"] and seen == ["a", "b"]
