"""Keyed publish on Redis beyond the shared contract (``tests/contract/test_keys_contract.py``):
round trips, where keys live, the fused settle round trip, and what the scripts do with
entries written by hand."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis
from redis.crc import key_slot

from stem import ShutdownMode, Stem, TaskRegistry, TaskState, Worker, WorkerLifecycleConfig
from stem.backends.redis import RedisResultBackend
from stem.brokers.base import Keyed, Message
from stem.brokers.redis import N_LANES, RedisBroker

from stem.errors import BrokerError, ConfigurationError

from .support import drop_namespace, wait_for

pytestmark = pytest.mark.redis
Q = "keyed"
NO_SIGNALS = WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5, force_shutdown_after=5)


def keyed(key: str, *, task_id: str | None = None, queue: str = Q, ttl: float = 60.0, linger: float = 0.0,
          not_before=None, frame: bytes = b"frame") -> Keyed:
    return Keyed(Message(task_id or uuid.uuid4().hex, queue, frame, 0, not_before, None), key, ttl, linger)


@pytest.fixture
def broker(redis_url, namespace, raw):
    b = RedisBroker.from_url(redis_url, namespace=namespace)
    yield b
    b.close()


class _Sends:
    """Counts what this thread writes to Redis sockets: pipelines sent, and commands in them."""

    def __init__(self, monkeypatch):
        self.pipelines = 0
        self.commands = 0
        self.thread = threading.get_ident()
        original = redis.connection.AbstractConnection.send_packed_command

        def counting(conn, command, check_health=True):
            if threading.get_ident() == self.thread:
                self.pipelines += 1
                self.commands += sum(bytes(part).count(b"\r\n*") + bytes(part).startswith(b"*")
                                     for part in command)
            return original(conn, command, check_health)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)


def test_ten_thousand_items_half_of_them_duplicates_are_one_round_trip(broker, monkeypatch):
    items = [keyed(f"k{i % 5000}") for i in range(10_000)]
    broker.ping()                                      # connect first: the handshake is not counted
    sends = _Sends(monkeypatch)
    out = broker.publish_keyed(items)
    assert sends.pipelines == 1
    assert sends.commands == 5 + 1                     # 2,000 items per script call, and the SADD
    first = {it.key: it.message.task_id for it in items[:5000]}
    assert out[:5000] == [None] * 5000
    assert out[5000:] == [first[it.key] for it in items[5000:]]
    assert broker.stats(Q).ready == 5000
    assert broker.key_owner(Q, "k4999") == first["k4999"]


def test_the_count_above_is_real_a_pipeline_per_queue_batch(broker, monkeypatch):
    """The counter itself: two queues make two script calls, still in one pipeline, and a
    second batch is a second pipeline."""
    broker.publish_keyed([keyed("a")])
    sends = _Sends(monkeypatch)
    broker.publish_keyed([keyed("a"), keyed("b", queue="other")])
    broker.publish_keyed([keyed("c")])
    assert (sends.pipelines, sends.commands) == (2, 2 + 1 + 1)


def test_keys_live_in_the_queue_slot_under_the_namespace(broker, raw, namespace):
    broker.publish_keyed([keyed("x{y}:z"), keyed("later", not_before=time.time() + 60)])
    names = {k.decode() for k in raw.scan_iter(match=f"{namespace}:*")}
    assert {broker.key_name(Q, "x{y}:z"), broker.key_name(Q, "later"), f"{namespace}:{{q:{Q}}}:keys"} <= names
    queue_names = [n for n in names if n != f"{namespace}:queues"]
    assert len({key_slot(n.encode()) for n in queue_names}) == 1
    assert raw.pttl(broker.key_name(Q, "later")) > 55_000


def test_delete_queue_drops_the_keys_and_their_index_and_nothing_else(broker, raw, namespace):
    broker.publish_keyed([keyed(f"k{i}") for i in range(1200)] + [keyed("d", not_before=time.time() + 60)])
    broker.publish_keyed([keyed("kept", queue="other")])
    broker.delete_queue(Q)
    left = {k.decode() for k in raw.scan_iter(match=f"{namespace}:*")}
    assert left == {f"{namespace}:queues", broker.key_name("other", "kept"), f"{namespace}:{{q:other}}:keys",
                    broker.queue_keys("other")[0]}


def test_an_old_index_member_whose_key_ran_out_is_pruned_by_the_next_publish(broker, raw, namespace):
    broker.publish_keyed([keyed("short", ttl=0.05)])
    index = f"{namespace}:{{q:{Q}}}:keys"
    wait_for(lambda: broker.key_owner(Q, "short") is None, timeout=10.0, what="the key's ttl ran out")
    assert raw.zscore(index, "short") is not None
    broker.publish_keyed([keyed("other")])
    assert raw.zrange(index, 0, -1) == [b"other"]


def test_a_keyed_entry_carries_its_key_ttl_and_linger_through_retry_and_delay(broker, raw):
    item = keyed("r", ttl=30.0, linger=2.0)
    broker.publish_keyed([item])
    d = broker.consume([Q], 1, 5.0)[0]
    broker.retry(d, b"again", time.time() + 0.2)
    [(member, _)] = raw.zrange(broker.queue_keys(Q)[N_LANES + 1], 0, -1, withscores=True)
    assert member.startswith(b"K") and b"r" + item.message.task_id.encode() + b"again" in member
    got: list = []
    wait_for(lambda: got.extend(broker.consume([Q], 1, 0.5)) or got, timeout=10.0, what="the retry came due")
    d = got[0]
    assert (d.key, bytes(d.frame)) == ("r", b"again")
    [(_, fields)] = raw.xrange(broker.queue_keys(Q)[0])
    assert (fields[b"k"], fields[b"kt"], fields[b"kl"]) == (b"r", b"30000", b"2000")
    broker.ack([d])
    assert broker.key_owner(Q, "r") == item.message.task_id      # lingers 2 s
    assert 0 < raw.pttl(broker.key_name(Q, "r")) <= 2000


def test_an_ack_batch_of_keyed_and_plain_deliveries_removes_all_and_releases_the_keyed(broker):
    items = [keyed(f"k{i}") for i in range(5)]
    broker.publish_keyed(items)
    broker.publish_many([Message(uuid.uuid4().hex, Q, b"plain") for _ in range(5)])
    got = broker.consume([Q], 10, 5.0)
    assert sorted(d.key or "" for d in got) == [""] * 5 + [f"k{i}" for i in range(5)]
    broker.ack(got)
    assert broker.stats(Q)[1:5] == (0, 0, 0, 0)
    assert all(broker.key_owner(Q, f"k{i}") is None for i in range(5))


def test_a_second_ack_of_a_keyed_delivery_spares_the_key_a_replay_claimed_for_the_same_task(broker):
    item = keyed("k")
    broker.publish_keyed([item])
    d = broker.consume([Q], 1, 5.0)[0]
    broker.dead_letter(d, "poison")
    assert broker.replay(Q) == 1
    broker.ack([d])                                   # the old delivery: its entry is gone
    assert broker.key_owner(Q, "k") == item.message.task_id


def test_an_entry_without_a_task_id_is_dead_lettered_with_its_key_name_and_the_key_left_to_its_ttl(
        broker, raw):
    """The consume script's own dead-lettering: an entry written by hand names no owner, so
    the owner check cannot pass and whoever holds the key keeps it."""
    raw.set(broker.key_name(Q, "hand"), "someone", px=60_000)
    raw.xadd(broker.queue_keys(Q)[0], {"f": b"x", "k": "hand", "kt": 60_000, "kl": 0})
    good = keyed("good")
    broker.publish_keyed([good])
    [d] = broker.consume([Q], 5, 5.0)
    assert (d.task_id, d.key) == (good.message.task_id, "good")
    [dl] = broker.dead_letters(Q)
    assert (dl.task_id, dl.reason, dl.key) == ("", "decode-error", "hand")
    assert broker.key_owner(Q, "hand") == "someone"
    assert broker.replay(Q) == 1                      # goes back without its key (no task id)
    assert broker.key_owner(Q, "hand") == "someone"


def test_a_keyed_delayed_member_that_does_not_unpack_is_dead_lettered_whole(broker, raw):
    raw.zadd(broker.queue_keys(Q)[N_LANES + 1], {b"Kbad 0 0 1 0 99 99 short": 0})
    assert broker.consume([Q], 1, 0.3) == []
    [dl] = broker.dead_letters(Q)
    assert (dl.reason, bytes(dl.frame), dl.key) == ("decode-error", b"Kbad 0 0 1 0 99 99 short", None)


def test_purge_releases_the_keys_of_a_lane_nobody_read_and_of_one_partly_read(broker):
    broker.publish_keyed([keyed("read"), keyed("unread-1")])
    d = broker.consume([Q], 1, 5.0)[0]
    broker.publish_keyed([keyed("unread-2", queue="fresh")])
    assert broker.purge(Q) == 1 and broker.purge("fresh") == 1
    assert broker.key_owner(Q, "unread-1") is None and broker.key_owner("fresh", "unread-2") is None
    assert broker.key_owner(Q, d.key) == d.task_id    # in flight: kept
    broker.ack([d])
    assert broker.key_owner(Q, d.key) is None


def test_replay_of_everything_steps_over_entries_whose_key_is_held_by_another_task(broker):
    """More held entries than one replay batch (500) before a free one: the free one moves."""
    stuck = [keyed(f"s{i}") for i in range(600)]
    broker.publish_keyed(stuck)
    got = []
    while len(got) < 600:
        got += broker.consume([Q], 600 - len(got), 5.0)
    for d in got:
        broker.dead_letter(d, "poison")
    assert broker.publish_keyed([keyed(f"s{i}") for i in range(600)]) == [None] * 600   # others hold them
    free = keyed("free")
    broker.publish_keyed([free])
    broker.dead_letter(next(d for d in broker.consume([Q], 700, 5.0) if d.key == "free"), "poison")
    assert broker.replay(Q) == 1
    assert len(broker.dead_letters(Q, 1000)) == 600


@pytest.mark.parametrize("call", [
    pytest.param(lambda b: b.key_owner(Q, 7), id="key_owner-int-key"),
    pytest.param(lambda b: b.key_owner(Q, ""), id="key_owner-empty-key"),
    pytest.param(lambda b: b.key_owner("bad queue", "k"), id="key_owner-bad-queue"),
    pytest.param(lambda b: b.release_key(Q, "k" * 513, "t"), id="release_key-long-key"),
    pytest.param(lambda b: b.release_key(Q, "k", None), id="release_key-no-owner"),
])
def test_key_owner_and_release_key_refuse_bad_arguments(broker, call):
    with pytest.raises(ConfigurationError):
        call(broker)


def test_publish_keyed_translates_a_redis_error_and_leaves_no_key_for_the_failing_item(broker, raw):
    raw.set(broker.queue_keys(Q)[N_LANES + 1], "not a sorted set")
    with pytest.raises(BrokerError, match="WRONGTYPE"):
        broker.publish_keyed([keyed("ready"), keyed("delayed", not_before=time.time() + 60)])
    assert broker.key_owner(Q, "ready") is not None            # before the failing one: published
    assert broker.key_owner(Q, "delayed") is None
    assert raw.xlen(broker.queue_keys(Q)[0]) == 1


# -- the fused settle round trip (results + ack + refill) releases keys ----------------------

registry = TaskRegistry()
registry.task("add")(lambda ctx, a, b: a + b)
registry.task("bad")(lambda ctx: 1 / 0)


@pytest.mark.parametrize("isolation", ["inline", "process"])
def test_a_worker_with_a_redis_backend_on_the_broker_store_releases_keys_in_its_settle_round_trip(
        redis_url, namespace, raw, monkeypatch, isolation):
    broker = RedisBroker(redis_url, namespace=namespace)
    backend = RedisResultBackend(redis_url, namespace=namespace)
    assert backend.shares_store_with(broker)
    app = Stem(broker, backend, registry)
    fused: list[list] = []
    real = backend._store_and_ack_commands

    def spy(statuses, b, deliveries):
        fused.append([d.key for d in deliveries])
        return real(statuses, b, deliveries)

    monkeypatch.setattr(backend, "_store_and_ack_commands", spy)
    plain_acks: list = []
    real_ack = broker.ack
    monkeypatch.setattr(broker, "ack", lambda ds: (plain_acks.extend(ds), real_ack(ds)))
    worker = Worker(broker, backend, registry, concurrency=2, isolation=isolation, lifecycle=NO_SIGNALS)
    try:
        now = time.time()
        items = []
        for i in range(20):
            _, message, _ = app._build("add", {"a": i, "b": 1}, None, None, None, None, None, None, None, now)
            items.append(Keyed(message, f"sum:{i}", 60.0))
        assert broker.publish_keyed(items) == [None] * 20
        _, failing, _ = app._build("bad", {}, None, None, None, None, None, None, None, now)
        assert broker.publish_keyed([Keyed(failing, "bad", 60.0)]) == [None]
        worker.run_in_background(burst=True)
        assert worker.join(60)
        for i, item in enumerate(items):
            status = app.wait_for_task(item.message.task_id, timeout=30)
            assert status.state is TaskState.SUCCEEDED and status.result == i + 1
        assert app.wait_for_task(failing.task_id, timeout=30).state is TaskState.FAILED
        assert all(broker.key_owner("default", f"sum:{i}") is None for i in range(20))
        assert sorted(k for keys in fused for k in keys) == sorted(f"sum:{i}" for i in range(20))
        assert not plain_acks                         # every ack rode the fused round trip
        assert broker.key_owner("default", "bad") is None   # a failure is dead-lettered: released there
        assert [dl.key for dl in broker.dead_letters("default")] == ["bad"]
        assert broker.stats("default")[1:4] == (0, 0, 0)
    finally:
        worker.shutdown(ShutdownMode.HARD, timeout=15)
        app.close()
        broker.close()
        backend.close()


def test_a_keyed_task_whose_frame_does_not_decode_is_dead_lettered_and_frees_its_key(redis_url, namespace, raw):
    """What the consumer cannot read (a garbage frame) it dead-letters through the broker,
    whose dead-letter script releases the key."""
    broker = RedisBroker(redis_url, namespace=namespace)
    worker = Worker(broker, None, registry, concurrency=1, isolation="inline", lifecycle=NO_SIGNALS)
    try:
        item = Keyed(Message(uuid.uuid4().hex, "default", b"not a frame"), "garbage", 60.0)
        broker.publish_keyed([item])
        worker.run_in_background(burst=True)
        assert worker.join(30)
        [dl] = broker.dead_letters("default")
        assert (dl.task_id, dl.key, dl.reason) == (item.message.task_id, "garbage", "decode-error")
        assert broker.key_owner("default", "garbage") is None
    finally:
        worker.shutdown(ShutdownMode.HARD, timeout=15)
        broker.close()
