"""Unique tasks and explicit ids on the producer: what is a duplicate, what it returns, the keys
it publishes under.  (Every broker's keyed publish: tests/contract/test_keys_contract.py; the
worker's release of keys: tests/test_unique_worker.py.)"""

from __future__ import annotations


import pytest

from stem import Stem, TaskOptions, TaskRegistry
from stem.backends.memory import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.envelope import decode_frame
from stem.errors import DuplicateHandlerError, DuplicateTaskError, InvalidTaskOptionsError, StemError
from stem.keys import DEFAULT_UNIQUE_FOR, ID_KEY_TTL, id_key, unique_key
from stem.signals import signals

UNIQUE = TaskOptions(unique=True)


@pytest.fixture
def registry():
    r = TaskRegistry()
    r.task("report.build", options=TaskOptions(unique=True, unique_for=600))(lambda ctx, account, day: None)
    r.task("report.by_account", options=TaskOptions(unique=True, unique_key=["account"]))(
        lambda ctx, account, day: None)
    r.task("report.by_fn", options=TaskOptions(unique=True, unique_key=lambda a: a["account"] % 10))(
        lambda ctx, account: None)
    r.task("report.started", options=TaskOptions(unique=True, unique_until="started"))(lambda ctx: None)
    r.task("plain")(lambda ctx, i=0: None)
    return r


@pytest.fixture
def broker():
    return InMemoryBroker()


@pytest.fixture
def stem(broker, registry):
    return Stem(broker, InMemoryResultBackend(result_expires=120), registry)


def published(broker, queue="default"):
    s = broker.stats(queue)
    return s.ready + s.delayed + s.in_flight


def keyed_calls(broker, monkeypatch) -> list:
    calls = []
    real = broker.publish_keyed

    def spy(items):
        calls.append(list(items))
        return real(items)

    monkeypatch.setattr(broker, "publish_keyed", spy)
    return calls


def test_a_duplicate_publishes_nothing_and_returns_the_holders_id(stem, broker):
    a = stem.enqueue("report.build", {"account": 1, "day": "2026-12-07"})
    b = stem.enqueue("report.build", {"day": "2026-12-07", "account": 1})        # another order
    assert a == b
    assert published(broker) == 1
    assert broker.key_owner("default", unique_key("report.build", "default", {"account": 1, "day": "2026-12-07"})) == a


def test_unique_false_opts_one_enqueue_out_of_its_handlers_key(stem, broker):
    """The handler's unique_for (and unique_key, unique_until) go with its unique=True."""
    args = {"account": 1, "day": "2026-12-07"}
    a = stem.enqueue("report.build", args, options=TaskOptions(unique=False))
    b = stem.enqueue("report.build", args, options=TaskOptions(unique=False))
    assert a != b and published(broker) == 2
    assert broker.key_owner("default", unique_key("report.build", "default", args)) is None
    assert stem.enqueue("report.build", args) == stem.enqueue("report.build", args)   # the handler's, unchanged


def test_headers_and_meta_never_count_but_args_name_and_queue_do(stem, broker):
    a = stem.enqueue("report.build", {"account": 1, "day": "d"}, headers={"trace": "1"}, meta={"r": 1})
    assert stem.enqueue("report.build", {"account": 1, "day": "d"}, headers={"trace": "2"}, meta={"r": 2}) == a
    assert stem.enqueue("report.build", {"account": 2, "day": "d"}) != a
    other_queue = stem.enqueue("report.build", {"account": 1, "day": "d"}, options=TaskOptions(queue="q2"))
    assert other_queue != a
    assert published(broker) == 2 and published(broker, "q2") == 1


def test_unique_key_names_narrow_what_counts(stem, broker):
    a = stem.enqueue("report.by_account", {"account": 1, "day": "mon"})
    assert stem.enqueue("report.by_account", {"account": 1, "day": "tue"}) == a
    assert stem.enqueue("report.by_account", {"account": 2, "day": "mon"}) != a
    with pytest.raises(InvalidTaskOptionsError, match="account"):
        stem.enqueue("report.by_account", {"day": "mon"})
    assert published(broker) == 2


def test_a_unique_key_callable_decides_and_its_errors_are_stem_errors(stem, broker):
    a = stem.enqueue("report.by_fn", {"account": 3})
    assert stem.enqueue("report.by_fn", {"account": 13}) == a          # 3 % 10 == 13 % 10
    assert stem.enqueue("report.by_fn", {"account": 4}) != a
    with pytest.raises(InvalidTaskOptionsError, match="raised"):
        stem.enqueue("report.by_fn", {"acct": 4})
    assert published(broker) == 2


def test_on_duplicate_raise_carries_the_holders_id(stem):
    a = stem.enqueue("report.build", {"account": 1, "day": "d"})
    with pytest.raises(DuplicateTaskError) as err:
        stem.enqueue("report.build", {"account": 1, "day": "d"}, on_duplicate="raise")
    assert err.value.existing_id == a and a in str(err.value)
    assert isinstance(err.value, StemError)


def test_a_duplicate_sends_no_after_publish_signal(stem):
    seen = []

    def receiver(sender, envelope, **kw):
        seen.append(envelope.id)

    signals.after_task_publish.connect(receiver)
    try:
        a = stem.enqueue("report.build", {"account": 1, "day": "d"})
        stem.enqueue("report.build", {"account": 1, "day": "d"})
        ids = stem.enqueue_many([("report.build", {"account": 1, "day": "d"}),
                                 ("report.build", {"account": 2, "day": "d"})])
    finally:
        signals.after_task_publish.disconnect(receiver)
    assert seen == [a, ids[1]]


def test_an_explicit_task_id_is_an_idempotency_key_that_outlives_the_task_by_the_result_ttl(stem, broker,
                                                                                            monkeypatch):
    calls = keyed_calls(broker, monkeypatch)
    assert stem.enqueue("plain", {}, task_id="order-42") == "order-42"
    assert stem.enqueue("plain", {"i": 1}, task_id="order-42") == "order-42"
    with pytest.raises(DuplicateTaskError) as err:
        stem.enqueue("plain", {}, task_id="order-42", on_duplicate="raise")
    assert err.value.existing_id == "order-42"
    assert published(broker) == 1
    [[item], *_] = calls
    assert (item.key, item.linger) == (id_key("order-42"), 120)       # the backend's result_expires
    assert item.ttl == pytest.approx(ID_KEY_TTL)
    d = broker.consume(["default"], 1, 1.0)[0]
    broker.ack([d])                                  # the task ended: its id stays taken
    assert stem.enqueue("plain", {}, task_id="order-42") == "order-42"
    assert published(broker) == 0


def test_idempotent_for_sets_how_long_an_explicit_id_outlives_its_task(stem, broker, monkeypatch):
    calls = keyed_calls(broker, monkeypatch)
    stem.enqueue("plain", {}, task_id="sched:x:1000", idempotent_for=7200)
    assert calls[0][0].linger == 7200
    with pytest.raises(InvalidTaskOptionsError, match="explicit task_id"):
        stem.enqueue("plain", {}, idempotent_for=10)
    with pytest.raises(InvalidTaskOptionsError, match="idempotent_for"):
        stem.enqueue("plain", {}, task_id="y", idempotent_for=-1)
    assert published(broker) == 1


def test_generated_ids_publish_without_keys(stem, broker, monkeypatch):
    calls = keyed_calls(broker, monkeypatch)
    stem.enqueue("plain", {})
    stem.enqueue_many([("plain", {"i": i}) for i in range(5)])
    assert calls == [] and published(broker) == 6


def test_the_unique_ttl_counts_from_when_the_task_is_due(stem, broker, monkeypatch):
    calls = keyed_calls(broker, monkeypatch)
    stem.enqueue("report.build", {"account": 1, "day": "d"}, countdown=300)
    stem.enqueue("report.by_account", {"account": 1, "day": "d"})
    assert calls[0][0].ttl == pytest.approx(300 + 600, abs=1)
    assert calls[1][0].ttl == pytest.approx(DEFAULT_UNIQUE_FOR)
    assert calls[0][0].linger == 0


def test_unique_until_started_travels_in_the_envelope(stem, broker):
    stem.enqueue("report.started")
    stem.enqueue("report.build", {"account": 1, "day": "d"})
    envs = [decode_frame(d.frame) for d in broker.consume(["default"], 2, 1.0)]
    assert sorted(str(e.unique_until) for e in envs) == ["None", "started"]


def test_enqueue_many_resolves_duplicates_in_order_in_one_keyed_call(stem, broker, monkeypatch):
    calls = keyed_calls(broker, monkeypatch)
    held = stem.enqueue("report.build", {"account": 0, "day": "d"})
    calls.clear()
    items = [("report.build", {"account": i // 2, "day": "d"}) for i in range(10)]
    ids = stem.enqueue_many(items)
    assert len(calls) == 1 and len(calls[0]) == 5        # a key's repeats in the batch are not sent
    assert ids.duplicates == [0, 1, 3, 5, 7, 9]
    assert ids[0] == ids[1] == held
    assert [ids[i] for i in (3, 5, 7, 9)] == [ids[i] for i in (2, 4, 6, 8)]
    assert len(set(ids)) == 5
    assert published(broker) == 5


def test_enqueue_many_mixes_plain_keyed_and_explicit_id_items(stem, broker):
    ids = stem.enqueue_many([("plain", {"i": 1}),
                             ("plain", {"i": 2}, UNIQUE),
                             {"name": "plain", "args": {"i": 3}, "task_id": "x-1"},
                             ("plain", {"i": 2}, UNIQUE),
                             {"name": "plain", "args": {"i": 4}, "task_id": "x-1"},
                             {"name": "plain", "args": {"i": 5}}])
    assert ids.duplicates == [3, 4]
    assert ids[3] == ids[1] and ids[4] == ids[2] == "x-1"
    assert published(broker) == 4
    got = {decode_frame(d.frame).args.get("i") for d in broker.consume(["default"], 10, 1.0)}
    assert got == {1, 2, 3, 5}


def test_a_bad_unique_item_in_a_batch_publishes_nothing(stem, broker):
    with pytest.raises(InvalidTaskOptionsError):
        stem.enqueue_many([("report.build", {"account": 1, "day": "d"}), ("report.by_account", {"day": "x"})])
    assert published(broker) == 0
    assert stem.enqueue("report.build", {"account": 1, "day": "d"}) != ""


def test_a_producer_without_the_registry_takes_unique_from_the_enqueue(broker):
    stem = Stem(broker)
    a = stem.enqueue("anything", {"x": 1}, options=UNIQUE)
    assert stem.enqueue("anything", {"x": 1}, options=UNIQUE) == a
    assert stem.enqueue("anything", {"x": 1}) != a                # not unique without the option
    assert published(broker) == 2


def test_args_msgpack_cannot_carry_are_refused_before_publishing(stem, broker):
    with pytest.raises(StemError):
        stem.enqueue("plain", {"i": object()}, options=UNIQUE)
    assert published(broker) == 0


@pytest.mark.parametrize("kwargs, fragment", [
    ({"unique_for": 10}, "unique_for needs unique"),
    ({"unique_key": ["a"]}, "unique_key needs unique"),
    ({"unique_until": "started"}, "unique_until needs unique"),
    ({"unique": True, "unique_until": "queued"}, "unique_until must be one of"),
    ({"unique": True, "unique_key": []}, "unique_key must be"),
    ({"unique": True, "unique_key": "account"}, "unique_key must be"),
    ({"unique": True, "unique_key": ["a", ""]}, "unique_key must be"),
    ({"unique": True, "unique_for": 0}, "unique_for"),
    ({"unique": "yes"}, "unique"),
])
def test_bad_unique_options_are_refused(kwargs, fragment):
    with pytest.raises(InvalidTaskOptionsError, match=fragment):
        TaskOptions(**kwargs)


def test_unique_key_names_become_a_tuple_so_options_stay_hashable():
    opts = TaskOptions(unique=True, unique_key=["a", "b"])
    assert opts.unique_key == ("a", "b")
    hash(opts)


def test_registering_a_name_twice_is_a_duplicate_handler_error():
    r = TaskRegistry()
    r.task("x")(lambda ctx: None)
    with pytest.raises(DuplicateHandlerError):
        r.task("x")(lambda ctx: None)


def test_a_key_released_by_the_terminal_settle_lets_the_next_enqueue_publish(stem, broker):
    a = stem.enqueue("report.build", {"account": 1, "day": "d"})
    d = broker.consume(["default"], 1, 1.0)[0]
    assert stem.enqueue("report.build", {"account": 1, "day": "d"}) == a     # running: refused
    broker.ack([d])
    b = stem.enqueue("report.build", {"account": 1, "day": "d"})
    assert b != a and published(broker) == 1


def test_enqueue_child_publishes_the_childs_id_without_a_key_and_unique_tasks_under_theirs(stem, broker,
                                                                                          monkeypatch):
    calls = keyed_calls(broker, monkeypatch)
    assert stem.enqueue_child("plain", {}, options=None, task_id="c" * 32, parent=None) == "c" * 32
    assert calls == []
    a = stem.enqueue("report.build", {"account": 1, "day": "d"})
    assert stem.enqueue_child("report.build", {"account": 1, "day": "d"}, options=None, task_id="d" * 32,
                              parent=None) == a
    assert published(broker) == 2
