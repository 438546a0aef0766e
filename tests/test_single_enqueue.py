"""A single ``enqueue`` on Redis in one compiled call (``Stem._make_single``,
``stem.envelope.xadd_template``, ``RedisBroker.single_publisher``): after a task name's first
publish, the next plain ``enqueue`` of it builds its whole XADD at once and sends it on the
dedicated connection.  It must store what the general path stores, refuse what it refuses
before anything is sent, and step aside whenever one of its assumptions stops holding."""

from __future__ import annotations

import msgspec.structs
import pytest
import redis

from stem import PayloadSigner, Stem, TaskOptions, TaskRegistry, signals
from stem.brokers.redis import RedisBroker
from stem.envelope import decode_frame
from stem.errors import BrokerError, EncodeError, InvalidTaskOptionsError, UnknownTaskError
from stem.stores.redis_dedicated import dedicated

pytestmark = pytest.mark.redis

SIGNER = PayloadSigner({"k": b"k" * 32}, "k")


def _registry(**options) -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("one.echo", options=TaskOptions(**options) if options else None)
    def echo(ctx, i: int = 0) -> int:
        return i
    return registry


@pytest.fixture
def stem(redis_url, namespace):
    s = Stem(RedisBroker(redis_url, namespace=namespace), None, _registry(), SIGNER)
    yield s
    s.close()


def _stored(stem: Stem, queue: str = "default", lane: int = 0, signer=SIGNER) -> list:
    key = stem.broker.queue_keys(queue)[lane]
    with redis.Redis.from_url(stem.broker.url) as r:
        return [(fields[b"t"].decode(), decode_frame(fields[b"f"], signer), fields[b"p"], fields[b"v"])
                for _, fields in r.xrange(key)]


class _NoPublish:
    """Fails the test if the broker's general ``publish`` runs."""

    def __init__(self, stem, monkeypatch):
        self.calls = 0

        def publish(message):
            self.calls += 1
            return real(message)
        real = stem.broker.publish
        monkeypatch.setattr(stem.broker, "publish", publish)


def test_after_the_first_publish_a_plain_enqueue_takes_one_call_and_stores_the_same(stem, monkeypatch):
    first = stem.enqueue("one.echo", {"i": 0})           # general path: makes the name's one-call path
    assert stem._singles["one.echo"] is not None
    general = _NoPublish(stem, monkeypatch)
    ids = [stem.enqueue("one.echo", {"i": i, "s": "é" * i}) for i in range(1, 40)]
    assert general.calls == 0
    stored = _stored(stem)
    assert [s[0] for s in stored] == [first, *ids]
    envs = [s[1] for s in stored]
    for env, (tid, _, p, v) in zip(envs, stored):
        assert env.id == tid and (p, v) == (b"0", b"0")
    # field for field what the general path wrote, but the id, the args and the time
    for i, env in enumerate(envs[1:], 1):
        assert env.args == {"i": i, "s": "é" * i}
        assert msgspec.structs.replace(env, id="", args={}, enqueued_at=0.0) == \
            msgspec.structs.replace(envs[0], id="", args={}, enqueued_at=0.0)
        assert env.enqueued_at >= envs[i - 1].enqueued_at


def test_a_handlers_queue_priority_and_expiry_travel_as_on_the_general_path(redis_url, namespace):
    stem = Stem(RedisBroker(redis_url, namespace=namespace), None,
                _registry(queue="mail", priority=7, expires=60.0, visibility_timeout=12.5, max_retries=4), SIGNER)
    try:
        stem.enqueue("one.echo", {"i": 0})
        stem.enqueue("one.echo", {"i": 1})
        assert stem._singles["one.echo"] is not None
        (t0, e0, p0, v0), (t1, e1, p1, v1) = _stored(stem, "mail", 7)
        assert (p0, v0) == (p1, v1) == (b"7", b"12500")
        for env in (e0, e1):
            assert (env.queue, env.priority, env.max_retries, env.visibility_timeout) == ("mail", 7, 4, 12.5)
            assert env.expires_at == env.enqueued_at + 60.0
    finally:
        stem.close()


@pytest.mark.parametrize("call, error", [
    (lambda s: s.enqueue("one.echo", [1]), EncodeError),
    (lambda s: s.enqueue("one.echo", {1: "x"}), EncodeError),
    (lambda s: s.enqueue("one.echo", {"x": object()}), EncodeError),
    (lambda s: s.enqueue("one.echo", {"x": 2 ** 70}), EncodeError),
    (lambda s: s.enqueue("one.echo", {"x": "y" * (17 * 2 ** 20)}), EncodeError),
    (lambda s: s.enqueue("one.echo", {}, on_duplicate="never"), InvalidTaskOptionsError),
    (lambda s: s.enqueue("one.nope", {}), UnknownTaskError),
    (lambda s: s.enqueue(["one.echo"], {}), InvalidTaskOptionsError),     # unhashable: no dict lookup
    (lambda s: s.enqueue(None, {}), InvalidTaskOptionsError),
])
def test_bad_input_raises_the_general_paths_error_and_sends_nothing(stem, call, error):
    stem.enqueue("one.echo", {"i": 0})
    with pytest.raises(error):
        call(stem)
    assert len(_stored(stem)) == 1


def test_publish_signal_receivers_are_called_as_on_the_general_path(stem):
    stem.enqueue("one.echo", {"i": 0})
    seen = []

    def before(sender, envelope):
        seen.append(("before", envelope.id))

    def after(sender, envelope):
        seen.append(("after", envelope.id))
    signals.before_task_publish.connect(before)
    signals.after_task_publish.connect(after)
    try:
        tid = stem.enqueue("one.echo", {"i": 1})
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)
    assert seen == [("before", tid), ("after", tid)]


def test_a_deleted_queue_is_declared_again(stem, monkeypatch):
    stem.enqueue("one.echo", {"i": 0})
    stem.enqueue("one.echo", {"i": 1})
    stem.broker.delete_queue("default")
    assert "default" not in stem.broker.queues()
    tid = stem.enqueue("one.echo", {"i": 2})        # the one-call path steps aside: the SADD goes out
    assert "default" in stem.broker.queues()
    assert [s[0] for s in _stored(stem)] == [tid]
    general = _NoPublish(stem, monkeypatch)
    stem.enqueue("one.echo", {"i": 3})                  # the one-call path again, made anew
    assert len(_stored(stem)) == 2 and general.calls == 0


def test_a_broker_without_a_one_call_path_is_asked_once_per_handler_signer_and_broker(monkeypatch):
    from stem.brokers import InMemoryBroker
    stem = Stem(InMemoryBroker(), None, _registry(), SIGNER)
    asked = []
    real = stem.broker.single_publisher
    monkeypatch.setattr(stem.broker, "single_publisher", lambda *a: (asked.append(a), real(*a))[1])
    ids = [stem.enqueue("one.echo", {"i": i}) for i in range(5)]
    assert len(asked) == 1 and len(set(ids)) == 5
    stem.signer = PayloadSigner({"k2": b"z" * 32}, "k2")
    stem.enqueue("one.echo", {"i": 5})
    stem.enqueue("one.echo", {"i": 6})
    assert len(asked) == 2


def test_a_new_signer_a_new_handler_or_a_new_broker_are_followed(stem, redis_url, namespace):
    stem.enqueue("one.echo", {"i": 0})
    other = PayloadSigner({"k2": b"z" * 32}, "k2")
    stem.signer = other
    stem.enqueue("one.echo", {"i": 1})
    stem.enqueue("one.echo", {"i": 2})
    both = PayloadSigner({"k": b"k" * 32, "k2": b"z" * 32}, "k")
    assert [e.args for _, e, _, _ in _stored(stem, signer=both)] == [{"i": 0}, {"i": 1}, {"i": 2}]
    with pytest.raises(Exception, match="unknown key id"):   # the new ones are signed with the new key
        _stored(stem)
    stem.signer = SIGNER
    registry = _registry(priority=3)
    stem.registry = registry
    stem.enqueue("one.echo", {"i": 3})
    stem.enqueue("one.echo", {"i": 4})
    assert [e.args for _, e, _, _ in _stored(stem, lane=3)] == [{"i": 3}, {"i": 4}]
    old = stem.broker
    stem.broker = RedisBroker(redis_url, namespace=namespace + "b")
    try:
        stem.enqueue("one.echo", {"i": 5})
        stem.enqueue("one.echo", {"i": 6})
        assert [e.args for _, e, _, _ in _stored(stem, lane=3)] == [{"i": 5}, {"i": 6}]
    finally:
        stem.broker.delete_queue("default")
        stem.broker.close()
        stem.broker = old


def test_unique_limited_and_keyed_enqueues_keep_the_general_path(redis_url, namespace):
    registry = TaskRegistry()

    @registry.task("one.unique", options=TaskOptions(unique=True))
    def unique(ctx, i: int = 0) -> int:
        return i

    @registry.task("one.limited", options=TaskOptions(rate_limit="100/s"))
    def limited(ctx, i: int = 0) -> int:
        return i
    stem = Stem(RedisBroker(redis_url, namespace=namespace), None, registry, SIGNER)
    try:
        a = stem.enqueue("one.unique", {"i": 1})
        assert stem.enqueue("one.unique", {"i": 1}) == a            # its key still holds
        stem.enqueue("one.limited", {"i": 1})
        stem.enqueue("one.limited", {"i": 2})
        assert "one.unique" not in stem._singles and "one.limited" not in stem._singles
        assert stem.broker.stats("default").ready + stem.broker.stats("default").throttled >= 2
    finally:
        stem.close()


def test_an_error_reply_is_stems_error_and_the_next_enqueue_goes_through(stem):
    stem.enqueue("one.echo", {"i": 0})
    key = stem.broker.queue_keys("default")[0]
    with redis.Redis.from_url(stem.broker.url) as r:
        r.delete(key)
        r.set(key, "not a stream")
        with pytest.raises(BrokerError, match="WRONGTYPE"):
            stem.enqueue("one.echo", {"i": 1})
        r.delete(key)
    tid = stem.enqueue("one.echo", {"i": 2})
    assert [s[0] for s in _stored(stem)] == [tid]


def test_the_round_trip_is_one_compiled_exchange_on_a_plain_socket(stem, monkeypatch):
    """On a TCP URL the dedicated socket is blocking with kernel timeouts: the reply comes
    back through ``resp.exchange`` (its twin under STEM_PURE), not the Python reader."""
    import stem.stores.redis_pipe as pipe
    stem.enqueue("one.echo", {"i": 0})
    d = dedicated(stem.broker._client.connection_pool)
    assert d.feed is not None
    calls = []
    real = pipe._exchange
    monkeypatch.setattr(pipe, "_exchange", lambda *a: (calls.append(a[1]), real(*a))[1])
    monkeypatch.setattr(pipe, "_send_read_one", None)   # never taken
    tid = stem.enqueue("one.echo", {"i": 1})
    assert len(calls) == 1 and tid.encode() in calls[0]


def test_threads_making_the_path_at_once_and_a_stale_one_are_harmless(stem):
    """Threads whose first enqueues race each make a path; one made from lane parts another
    thread replaced is stale once (send returns False), dropped by each thread that meets it
    (no KeyError for the second), and made anew."""
    import threading
    errors: list[BaseException] = []
    ids: list[str] = []
    go = threading.Barrier(6)

    def run():
        try:
            go.wait()
            for i in range(50):
                ids.append(stem.enqueue("one.echo", {"i": i}))
                if i == 10:
                    stem.broker._xadd_heads.pop("default", None)   # the parts the paths were made from go
        except BaseException as exc:   # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(s[0] for s in _stored(stem)) == sorted(ids) and len(set(ids)) == 300
