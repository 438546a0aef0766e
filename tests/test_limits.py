"""Limits of a task (``stem.limits``): options checked at definition, resolved into the Limit the
producer publishes with, on every publish path; the worker routes a delivery its producer sent
without one.  The broker side is the contract suite (tests/contract/test_limits_contract.py)."""

from __future__ import annotations

import time

import pytest

from stem import Stem, TaskOptions, TaskRegistry, Worker
from stem.backends.memory import InMemoryResultBackend
from stem.brokers.base import MAX_KEY_LENGTH, Limit
from stem.brokers.memory import InMemoryBroker
from stem.errors import InvalidTaskOptionsError, StemError
from stem.limits import has_global_limit, resolve_limit, worker_rate
from stem.schedules import Schedule, every

from .support import wait_for


@pytest.mark.parametrize("kwargs, fragment", [
    ({"burst": 2}, "burst needs rate_limit"),
    ({"rate_key": "k"}, "rate_key needs rate_limit"),
    ({"rate_scope": "global"}, "rate_scope needs rate_limit"),
    ({"rate_limit": "1/s", "rate_scope": "cluster"}, "rate_scope must be one of"),
    ({"rate_limit": "1/s", "burst": 0}, "burst must be an integer >= 1"),
    ({"rate_limit": "1/s", "burst": 2.0}, "burst must be an integer"),
    ({"rate_limit": "1/s", "burst": True}, "burst must be an integer"),
    ({"rate_limit": "1/s", "rate_key": ""}, "rate_key must be a non-empty string"),
    ({"rate_limit": "1/s", "rate_key": "x" * (MAX_KEY_LENGTH + 1)}, "rate_key must be a non-empty string"),
    ({"rate_limit": "1/s", "rate_key": []}, "rate_key must be a string, a non-empty list"),
    ({"rate_limit": "1/s", "rate_key": ["a", ""]}, "rate_key must be a string, a non-empty list"),
    ({"rate_limit": "1/s", "rate_key": ["a", "a"]}, "names an argument twice"),
    ({"rate_limit": "1/s", "rate_key": 7}, "rate_key must be a string"),
    ({"rate_limit": "1/s", "rate_scope": "worker", "rate_key": "k"}, "options of a global rate limit"),
    ({"rate_limit": "1/s", "rate_scope": "worker", "burst": 3}, "options of a global rate limit"),
    ({"rate_limit": "fast"}, "bad rate_limit"),
    ({"concurrency_key": "k"}, "concurrency_key needs concurrency_limit"),
    ({"concurrency_limit": 0}, "concurrency_limit must be an integer >= 1"),
    ({"concurrency_limit": "2"}, "concurrency_limit must be an integer"),
    ({"concurrency_limit": 2, "concurrency_key": {"a": 1}}, "concurrency_key must be a string"),
])
def test_bad_limit_options_are_refused_when_the_options_are_made(kwargs, fragment):
    with pytest.raises(InvalidTaskOptionsError, match=fragment):
        TaskOptions(**kwargs)
    assert issubclass(InvalidTaskOptionsError, StemError)


def test_the_option_layer_and_the_brokers_agree_on_the_longest_key():
    from stem import limit_options
    assert limit_options.MAX_KEY_LENGTH == MAX_KEY_LENGTH


def test_a_list_key_is_stored_as_a_tuple_and_the_options_stay_hashable():
    opts = TaskOptions(rate_limit="1/s", rate_key=["tenant", "region"], concurrency_limit=2,
                       concurrency_key=["tenant"])
    assert opts.rate_key == ("tenant", "region") and opts.concurrency_key == ("tenant",)
    hash(opts)


def test_keys_static_by_argument_by_callable_and_by_default():
    args, headers = {"tenant": "acme", "n": 3}, {"account": "a-1"}
    assert resolve_limit("t", TaskOptions(rate_limit="10/s"), args) == Limit("t", 10.0, 2)   # default burst
    assert resolve_limit("t", TaskOptions(rate_limit="10/s", rate_key="stripe", burst=5), args) == \
        Limit("stripe", 10.0, 5)
    assert resolve_limit("t", TaskOptions(rate_limit="120/m", rate_key=["tenant"]), args) == \
        Limit("t[tenant='acme']", 2.0, 2)
    by_header = TaskOptions(concurrency_limit=3, concurrency_key=lambda a, h: "acct:" + h["account"])
    assert resolve_limit("t", by_header, args, headers) == Limit(None, 0.0, 1, "acct:a-1", 3)
    both = TaskOptions(rate_limit="1/s", concurrency_limit=2, concurrency_key=["n"])
    assert resolve_limit("t", both, args) == Limit("t", 1.0, 2, "t[n=3]", 2)


def test_the_default_burst_is_one_plus_a_tenth_of_a_seconds_worth():
    from stem.limits import default_burst
    assert [default_burst(r) for r in (1 / 3600, 1.0, 10.0, 10.5, 50.0, 100.0)] == [2, 2, 2, 3, 6, 11]
    assert resolve_limit("t", TaskOptions(rate_limit="50/s"), {}).burst == 6
    assert resolve_limit("t", TaskOptions(rate_limit="50/s", burst=1), {}).burst == 1


def test_argument_keys_hash_values_without_a_short_readable_form():
    opts = TaskOptions(rate_limit="1/s", rate_key=["doc"])
    key = resolve_limit("t", opts, {"doc": {"id": 1, "body": "x" * 1000}}).rate_key
    assert key.startswith("t[#") and len(key) <= MAX_KEY_LENGTH
    assert key == resolve_limit("t", opts, {"doc": {"body": "x" * 1000, "id": 1}}).rate_key   # canonical
    assert key != resolve_limit("t", opts, {"doc": {"id": 2, "body": "x" * 1000}}).rate_key


def test_no_global_limit_resolves_to_none():
    assert resolve_limit("t", TaskOptions(), {}) is None
    worker_only = TaskOptions(rate_limit="5/s", rate_scope="worker")
    assert resolve_limit("t", worker_only, {}) is None and not has_global_limit(worker_only)
    assert worker_rate(worker_only) == 5.0 and worker_rate(TaskOptions(rate_limit="5/s")) is None


@pytest.mark.parametrize("opts, args, fragment", [
    (TaskOptions(rate_limit="1/s", rate_key=["tenant"]), {}, "names \\['tenant'\\]"),
    (TaskOptions(rate_limit="1/s", rate_key=lambda a, h: 1 / 0), {}, "raised ZeroDivisionError"),
    (TaskOptions(rate_limit="1/s", rate_key=lambda a, h: ""), {}, "must return a non-empty string"),
    (TaskOptions(concurrency_limit=1, concurrency_key=lambda a, h: None), {}, "must return a non-empty string"),
    (TaskOptions(rate_limit="1/s", rate_key=["x"]), {"x": object()}, "msgpack values"),
])
def test_a_key_that_cannot_be_made_raises_a_clear_error(opts, args, fragment):
    with pytest.raises(InvalidTaskOptionsError, match=fragment):
        resolve_limit("t", opts, args)


# -- the producer -------------------------------------------------------------------------------
@pytest.fixture
def stack():
    registry = TaskRegistry()
    registry.task("plain")(lambda ctx: None)
    registry.task("tenant.sync", options=TaskOptions(rate_limit="1/s", rate_key=["tenant"], burst=1))(
        lambda ctx, tenant: None)
    registry.task("one.at.a.time", options=TaskOptions(concurrency_limit=1, unique=True))(lambda ctx, n: n)
    broker = InMemoryBroker()
    yield registry, broker, Stem(broker, None, registry)
    broker.close()


def limits_of(broker, n=100, queue="default"):
    return [d.limit for d in broker.consume([queue], n, 0)]


def test_the_producer_publishes_each_task_with_its_resolved_limit(stack):
    registry, broker, stem = stack
    stem.enqueue("tenant.sync", {"tenant": "a"})
    stem.enqueue("tenant.sync", {"tenant": "b"})
    stem.enqueue("plain")
    got = limits_of(broker)
    assert sorted(got, key=str) == sorted([Limit("tenant.sync[tenant='a']", 1.0, 1),
                                           Limit("tenant.sync[tenant='b']", 1.0, 1), None], key=str)


def test_enqueue_many_and_unique_tasks_carry_their_limits(stack):
    registry, broker, stem = stack
    ids = stem.enqueue_many([("tenant.sync", {"tenant": "a"})] * 3)
    assert len(ids) == 3 and broker.stats("default").throttled == 3
    assert limits_of(broker) == [Limit("tenant.sync[tenant='a']", 1.0, 1)]   # one token, one lease
    broker.purge("default")
    stem.enqueue_many([{"name": "tenant.sync", "args": {"tenant": "b"}, "headers": {"h": "v"}}])
    stem.enqueue("one.at.a.time", {"n": 1})
    assert stem.enqueue("one.at.a.time", {"n": 1}) is not None                 # a duplicate: one published
    got = broker.consume(["default"], 10, 0)
    assert {d.limit for d in got} == {Limit("tenant.sync[tenant='b']", 1.0, 1),
                                      Limit(None, 0.0, 1, "one.at.a.time", 1)}
    assert next(d for d in got if d.limit.concurrency_key).key is not None     # published keyed


def test_an_enqueue_time_rate_limit_travels_and_is_honoured(stack):
    registry, broker, stem = stack
    stem.enqueue("plain", options=TaskOptions(rate_limit="1/m", rate_key="shared", burst=1))
    stem.enqueue("plain", options=TaskOptions(rate_limit="1/m", rate_key="shared", burst=1))
    assert limits_of(broker) == [Limit("shared", 1 / 60, 1)]
    assert broker.stats("default").throttled == 1
    # without the registry too: the options given are all the producer knows
    bare = Stem(broker, None)
    bare.enqueue("anything", options=TaskOptions(concurrency_limit=2))
    assert limits_of(broker) == [Limit(None, 0.0, 1, "anything", 2)]


def test_an_enqueue_time_per_worker_rate_is_refused_and_publishes_nothing(stack):
    registry, broker, stem = stack
    with pytest.raises(InvalidTaskOptionsError, match="rate_scope='worker' is an option of the handler"):
        stem.enqueue("plain", options=TaskOptions(rate_limit="1/s", rate_scope="worker"))
    with pytest.raises(InvalidTaskOptionsError, match="names"):
        stem.enqueue_many([("plain", {}), ("tenant.sync", {"region": "x"})])
    registry.task("local", options=TaskOptions(rate_limit="1/s", rate_scope="worker"))(lambda ctx: None)
    with pytest.raises(InvalidTaskOptionsError, match="an enqueue's rate_limit would be ignored"):
        stem.enqueue("local", options=TaskOptions(rate_limit="5/s"))
    assert broker.stats("default")[1:] == (0, 0, 0, 0, 0)


def test_a_typed_handle_carries_its_handlers_limits_without_the_registry(stack):
    registry, broker, stem = stack
    other = TaskRegistry()

    @other.task("typed.limited", options=TaskOptions(concurrency_limit=4, concurrency_key=["account"],
                                                     max_retries=3))
    def limited(ctx, account: str) -> None:
        return None

    bare = Stem(broker, None)
    bare.call(limited, account="x")
    bare.call(limited.with_options(options=TaskOptions(priority=5)), account="y")
    assert sorted(limits_of(broker), key=str) == [Limit(None, 0.0, 1, "typed.limited[account='x']", 4),
                                                  Limit(None, 0.0, 1, "typed.limited[account='y']", 4)]


def test_schedules_take_a_global_rate_limit_and_refuse_a_per_worker_one():
    Schedule("s", "t", every(60), options=TaskOptions(rate_limit="1/s", rate_key="k"))
    with pytest.raises(InvalidTaskOptionsError, match="rate_scope"):
        Schedule("s", "t", every(60), options=TaskOptions(rate_limit="1/s", rate_scope="worker"))


# -- the worker ---------------------------------------------------------------------------------
def test_the_worker_routes_a_delivery_without_a_limit_once_and_runs_it_under_the_limit():
    registry = TaskRegistry()
    registry.task("limited", options=TaskOptions(rate_limit="2/s", max_retries=0))(lambda ctx: time.time())
    registry.task("bad.key", options=TaskOptions(rate_limit="2/s", rate_key=["missing"]))(lambda ctx: None)
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    worker = Worker(broker, backend, registry, concurrency=2, isolation="inline").run_in_background()
    try:
        bare = Stem(broker, backend)                 # knows no options: publishes without a limit
        ids = bare.enqueue_many([("limited", {})] * 4)
        statuses = [bare.wait_for_task(i, timeout=20) for i in ids]
        starts = sorted(s.result for s in statuses)
        assert all(s.attempt == 0 for s in statuses)
        assert starts[-1] - starts[0] >= 1.0 * 0.9       # 2 (the default burst) then 2/s: the 4th 1 s later
        assert worker.stats()["routed_limited"] == 4
        # a key the producer could not make either: dead-lettered once, with why
        bad = bare.enqueue("bad.key")
        status = bare.wait_for_task(bad, timeout=20)
        assert (status.state.value, status.reason) == ("DEAD", "bad-arguments")
        assert "names ['missing']" in status.error
    finally:
        worker.shutdown("hard")
        broker.close()


def test_a_per_worker_rate_still_spaces_tasks_in_the_worker():
    registry = TaskRegistry()
    registry.task("local", options=TaskOptions(rate_limit="4/s", rate_scope="worker"))(lambda ctx: time.time())
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    worker = Worker(broker, backend, registry, concurrency=2, isolation="inline").run_in_background()
    try:
        stem = Stem(broker, backend, registry)
        ids = stem.enqueue_many([("local", {})] * 12)
        wait_for(lambda: broker.stats("default").throttled == 0 and broker.stats("default").ready == 0, 5,
                 "the worker leased them all (the broker does not limit a per-worker rate)")
        starts = sorted(stem.wait_for_task(i, timeout=20).result for i in ids)
        assert starts[-1] - starts[0] >= (12 - 4) / 4 * 0.8
        assert worker.stats()["routed_limited"] == 0
    finally:
        worker.shutdown("hard")
        broker.close()


# -- visible: stem queues, metrics, worker inspect ------------------------------------------------
def _throttled_backlog(name: str):
    """A memory broker (shared by its URL in this process) with 1 leased and 5 throttled tasks
    of one tenant, and 2 throttled of another."""
    from stem.brokers import from_url
    broker = from_url(f"memory://{name}")
    stem = Stem(broker, None)
    opts = TaskOptions(rate_limit="1/m", rate_key=["tenant"], burst=1, concurrency_limit=5)
    stem.enqueue_many([("sync", {"tenant": "a"}, opts)] * 6 + [("sync", {"tenant": "b"}, opts)] * 2)
    leased = broker.consume(["default"], 10, 0)
    assert len(leased) == 2                       # one token per tenant
    return broker


def test_stem_queues_shows_throttled_counts_and_lanes():
    import json as _json

    from click.testing import CliRunner

    from stem.cli import main
    broker = _throttled_backlog("lim-cli")
    try:
        result = CliRunner().invoke(main, ["queues", "--broker", "memory://lim-cli", "--json"])
        assert result.exit_code == 0, result.output
        (row,) = _json.loads(result.output)
        assert (row["queue"], row["ready"], row["in_flight"], row["throttled"]) == ("default", 0, 2, 6)
        assert [(lane["rate_key"], lane["waiting"], lane["running"]) for lane in row["lanes"]] == [
            ("sync[tenant='a']", 5, 2), ("sync[tenant='b']", 1, 2)]
        broker = _throttled_backlog("lim-cli-table")   # the command closed the first one
        table = CliRunner().invoke(main, ["queues", "--broker", "memory://lim-cli-table"], terminal_width=200)
        assert table.exit_code == 0, table.output
        assert "throttled" in table.output and "limit lanes" in table.output and "sync[tenant='a']" in table.output
    finally:
        broker.close()


def test_metrics_expose_throttled_counts_per_queue_and_lane():
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    from stem import metrics as stem_metrics
    broker = _throttled_backlog("lim-metrics")

    class FakeWorker:                             # what the collector reads of a worker
        id, queues = "w-lim", ["default"]

        def __init__(self, broker):
            self.broker = broker

        def stats(self):
            return {"id": self.id, "routed_limited": 3}

    m = stem_metrics.StemMetrics()
    m.collector.track(FakeWorker(broker))
    try:
        text = generate_latest(m.registry).decode()
        assert 'stem_queue_throttled{queue="default"} 6.0' in text
        assert ('stem_lane_waiting{concurrency_key="sync",queue="default",rate_key="sync[tenant=\'a\']"} 5.0'
                in text)
        assert 'stem_lane_running{concurrency_key="sync",queue="default",rate_key="sync[tenant=\'b\']"} 2.0' in text
        assert 'stem_tasks_routed_limited_total{worker="w-lim"} 3.0' in text
    finally:
        broker.close()


def test_throttled_tasks_are_never_reserved_by_a_worker():
    registry = TaskRegistry()
    registry.task("slow.api", options=TaskOptions(rate_limit="1/m", burst=1))(lambda ctx: None)
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    worker = Worker(broker, backend, registry, concurrency=2, isolation="inline").run_in_background()
    try:
        stem = Stem(broker, backend, registry)
        first, *rest = stem.enqueue_many([("slow.api", {})] * 20)
        assert stem.wait_for_task(first, timeout=20).succeeded
        wait_for(lambda: broker.stats("default").in_flight == 0, 10, "the first one settled")
        report = worker.inspect()
        assert report["reserved"] == [] and report["running"] == []
        assert worker.stats()["in_flight"] == 0
        assert broker.stats("default").throttled == 19
    finally:
        worker.shutdown("hard")
        broker.close()


def test_a_burst_worker_waits_for_throttled_tasks_before_it_calls_the_queues_empty():
    registry = TaskRegistry()
    registry.task("paced", options=TaskOptions(rate_limit="4/s"))(lambda ctx: None)
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    stem = Stem(broker, backend, registry)
    ids = stem.enqueue_many([("paced", {})] * 6)
    worker = Worker(broker, backend, registry, concurrency=2, isolation="inline")
    worker.run_in_background(burst=True)
    try:
        assert worker.join(30)
        assert all(backend.get(i).succeeded for i in ids)
        assert broker.stats("default").throttled == 0
    finally:
        broker.close()
