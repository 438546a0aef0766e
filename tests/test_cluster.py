"""Redis Cluster: pipelines split by slot (order, phases,
redirections), and the adapters through a failover of a cluster of the test's own
(tests/support.py ``ClusterSetup``).  The contract suite runs on a cluster too
(tests/contract/adapters_cluster.py); the ``redis+cluster://`` URL is tests/test_redis_urls.py's."""

from __future__ import annotations

import pytest
import redis
from redis.crc import key_slot

from stem.backends import from_url as backend_from_url
from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Message
from stem.errors import BrokerConnectionError, BrokerError
from stem.stores.redis import BARRIER, RedisStore, execute, execute_last, execute_unread, pack_commands
from stem.stores.redis_cluster import split_packed
from tests.support import flaky, raw_client, wait_for


# -- connecting --------------------------------------------------------------------------
def test_a_cluster_nobody_answers_for_is_a_connection_error(tmp_path):
    from tests.support import free_port
    with pytest.raises(BrokerConnectionError, match="unreachable"):
        broker_from_url(f"redis+cluster://127.0.0.1:{free_port()}/", socket_connect_timeout=0.5)


def test_a_packed_pipeline_splits_into_its_commands_and_routing_keys():
    commands = [("SET", "a", "1"), ("EVALSHA", "f" * 40, 2, "k1", "k2", "x"), ("EVALSHA", "f" * 40, 0, "y"),
                BARRIER, ("PING",), ("XADD", b"s\r\n", "*", "f", b"\r\n$3\r\n")]
    packed = pack_commands(commands)
    spans = split_packed(packed)
    assert [key for _, _, key in spans] == [b"a", b"k1", None, BARRIER, None, b"s\r\n"]
    assert b"".join(packed[s:e] for s, e, _ in spans) == packed
    assert [pack_commands([c]) for c in commands] == [packed[s:e] for s, e, _ in spans]


# -- pipelines on a cluster ------------------------------------------------------------
@pytest.fixture
def cluster_store(redis_cluster):
    store = RedisStore(redis_cluster.url())
    raw = redis_cluster.client()
    made: list[str] = []
    yield store, raw, made
    for key in made:
        raw.delete(key)
    raw.close()
    store.close()


def _keys_on_every_primary(raw, prefix: str, n: int) -> list[str]:
    """``n`` keys whose slots cover every primary."""
    keys = [f"{prefix}:{i}" for i in range(n)]
    owners = {raw.get_node_from_key(k).name for k in keys}
    assert len(owners) == len(raw.get_primaries()), "the keys do not cover every primary"
    return keys


@pytest.mark.redis
def test_a_pipeline_across_slots_lands_on_each_owner_and_answers_in_order(cluster_store):
    store, raw, made = cluster_store
    keys = _keys_on_every_primary(raw, "stemtest-route", 30)
    made.extend(keys)
    assert store.run([("SET", k, i) for i, k in enumerate(keys)]) == [b"OK"] * 30
    assert store.run([("GET", k) for k in keys]) == [b"%d" % i for i in range(30)]
    for i, k in enumerate(keys):   # each key on the primary that owns its slot, nowhere else
        node = raw.get_node_from_key(k)
        assert raw.get_redis_connection(node).get(k) == b"%d" % i
    error, last = execute_last(store.client, pack_commands([("GET", k) for k in keys]), 30)
    assert (error, last) == (None, b"29")
    execute_unread(store.client, pack_commands([("SET", k, "x") for k in keys]), 30)
    assert raw.get(keys[7]) == b"x"


@pytest.mark.redis
def test_after_a_barrier_nothing_is_sent_when_a_command_before_it_failed(cluster_store):
    store, raw, made = cluster_store
    keys = _keys_on_every_primary(raw, "stemtest-barrier", 30)
    made.extend(keys)
    raw.set(keys[0], "not a number")
    replies = execute(store.client, [("INCR", keys[0]), ("SET", keys[1], "a"), BARRIER, ("SET", keys[2], "b"),
                                     ("SET", keys[3], "c")])
    assert isinstance(replies[0], redis.ResponseError) and replies[1:3] == [b"OK", b"OK"]
    assert all("STEMSKIPPED" in str(r) for r in replies[3:])
    assert raw.get(keys[1]) == b"a" and raw.get(keys[2]) is None and raw.get(keys[3]) is None


@pytest.mark.redis
def test_the_commands_after_a_barrier_are_sent_only_once_those_before_it_answered(cluster_store, monkeypatch):
    store, raw, made = cluster_store
    keys = _keys_on_every_primary(raw, "stemtest-phase", 30)
    made.extend(keys)
    client = store.client
    rounds: list[list[int]] = []
    real = type(client)._send_groups

    def spy(self, packed, spans, groups, asks):
        rounds.append(sorted(i for _, members in groups.values() for i in members))
        return real(self, packed, spans, groups, asks)

    monkeypatch.setattr(type(client), "_send_groups", spy)
    commands = [("SET", k, 1) for k in keys[:20]] + [BARRIER] + [("SET", k, 2) for k in keys[20:]]
    assert store.run(commands) == [b"OK"] * 31
    assert rounds == [list(range(20)), list(range(21, 31))]
    rounds.clear()
    store.run([("SET", k, 3) for k in keys])     # no barrier: one round, every node at once
    assert rounds == [list(range(30))]


@pytest.mark.redis
def test_a_moved_reply_updates_the_slot_map_and_only_that_command_is_sent_again(cluster_store):
    store, raw, made = cluster_store
    keys = _keys_on_every_primary(raw, "stemtest-moved", 30)
    made.extend(keys)
    client = store.client
    slot = key_slot(keys[0].encode())
    owner = client.nodes_manager.get_node_from_slot(slot)
    wrong = next(n for n in client.get_primaries() if n.name != owner.name)
    client.nodes_manager.slots_cache[slot] = [wrong]      # a stale slot map, as after a resharding
    assert store.run([("INCR", k) for k in keys]) == [1] * 30   # each INCR ran once
    assert client.nodes_manager.get_node_from_slot(slot).name == owner.name


@pytest.mark.redis
def test_an_ask_reply_sends_the_command_behind_asking_to_the_importing_node(redis_cluster):
    raw = redis_cluster.client()
    store = RedisStore(redis_cluster.url())
    key = "stemtest-ask:{ask-slot}"
    slot = key_slot(key.encode())
    source = raw.get_node_from_key(key)
    target = next(n for n in raw.get_primaries() if n.name != source.name)
    src, dst = raw.get_redis_connection(source), raw.get_redis_connection(target)
    dst_id = dst.execute_command("CLUSTER", "MYID")
    try:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src.execute_command("CLUSTER", "MYID"))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        # the key is not on the source: it answers ASK, and the target takes the SET after ASKING
        assert store.run([("SET", key, "moved-in"), ("SET", "stemtest-ask:other", "x")]) == [b"OK", b"OK"]
        pipe = dst.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.get(key)
        assert pipe.execute()[1] == b"moved-in"
    finally:   # the slot is the target's now, with the key written there
        for node in raw.get_primaries():
            raw.get_redis_connection(node).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        wait_for(lambda: _slot_owner_everywhere(raw, slot) == {target.port}, 20, "the slot to settle on the target")
        raw.nodes_manager.initialize()
        raw.delete(key)
        raw.delete("stemtest-ask:other")
        store.close()
        raw.close()


def _slot_owner_everywhere(raw, slot: int) -> set[int]:
    owners = set()
    for node in raw.get_primaries():
        for start, end, primary, *_ in raw.get_redis_connection(node).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                owners.add(int(primary[1]))
    return owners


@pytest.mark.redis
def test_a_consume_over_queues_of_several_slots_blocks_and_wakes_for_any_of_them(redis_cluster):
    import threading
    import time
    broker = broker_from_url(redis_cluster.url(), namespace="stemtest-block")
    try:
        queues = [f"q{i}" for i in range(6)]
        assert len({redis_cluster.client().get_node_from_key(broker.queue_keys(q)[0]).name for q in queues}) > 1
        start = time.monotonic()   # every queue is blocked on at once, not one after another
        assert broker.consume(queues, 10, 0.3) == [] and time.monotonic() - start < 1.0
        timer = threading.Timer(0.3, lambda: broker.publish(Message("late", "q4", b"f")))
        timer.start()
        start = time.monotonic()
        got = broker.consume(queues, 10, 5.0)
        assert [d.task_id for d in got] == ["late"] and time.monotonic() - start < 2.5
        broker.ack(got)
        broker.publish(Message("next", "q1", b"f"))   # the connections dropped mid-wait are not reused
        assert [d.task_id for d in broker.consume(queues, 10, 1.0)] == ["next"]
    finally:
        broker.delete_queue("q4")
        for q in [f"q{i}" for i in range(6)]:
            broker.delete_queue(q)
        broker.close()


@pytest.mark.redis
def test_scripts_missing_from_the_primaries_are_loaded_again_on_every_one(redis_cluster):
    broker = broker_from_url(redis_cluster.url(), namespace="stemtest-noscript")
    raw = redis_cluster.client()
    try:
        queues = [f"q{i}" for i in range(6)]
        broker.publish_many([_msg(i, queues[i % 6]) for i in range(60)])
        for node in raw.get_primaries():      # as after a restart without persistence
            raw.get_redis_connection(node).script_flush()
        got = broker.consume(queues, 100, 0.5)
        while len(got) < 60:
            got += broker.consume(queues, 100, 0.5)
        broker.ack(got)
        assert [broker.stats(q)[1:4] for q in queues] == [(0, 0, 0)] * 6
    finally:
        for q in [f"q{i}" for i in range(6)]:
            broker.delete_queue(q)
        broker.close()
        raw.close()


@pytest.mark.redis
@pytest.mark.parametrize("exc", [redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
                                 redis.exceptions.TryAgainError("TRYAGAIN"),
                                 redis.exceptions.SlotNotCoveredError("Slot 7 not covered")])
def test_on_a_cluster_the_errors_of_slots_changing_hands_are_retried_after_a_fresh_slot_map(redis_cluster, exc):
    store = RedisStore(redis_cluster.url(), retry_attempts=3)
    try:
        fn, calls = flaky(exc, 2)
        assert store.call(fn, "test") == "ok" and len(calls) == 3
        assert store.client._stem_stale      # the next raw pipeline loads the slot map first
        assert store.run([("PING",)]) == [b"PONG"] and not store.client._stem_stale
        fn, calls = flaky(exc, 99)
        with pytest.raises(BrokerConnectionError, match="slots unavailable"):
            store.call(fn, "test")
        assert len(calls) == 3
        fn, calls = flaky(redis.ResponseError("WRONGTYPE"), 1)
        with pytest.raises(BrokerError, match="WRONGTYPE"):   # any other error at once
            store.call(fn, "test")
        assert len(calls) == 1
    finally:
        store.close()


# -- failover ------------------------------------------------------------------------------
def _msg(i: int, queue: str) -> Message:
    return Message(f"t{i}", queue, b"frame-%d" % i)


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_broker_carries_on_through_a_primary_kill_and_loses_no_replicated_message(own_cluster):
    broker = broker_from_url(own_cluster.url(), namespace="failover", default_visibility_timeout=5.0)
    try:
        queues = ["qa", "qb", "qc", "qd"]
        broker.publish_many([_msg(i, queues[i % 4]) for i in range(400)])
        first = broker.consume(queues, 50, 1.0)
        broker.ack(first)
        own_cluster.wait_replicated()
        own_cluster.failover_by_kill(broker.queue_keys("qa")[0])
        broker.publish_many([_msg(i, queues[i % 4]) for i in range(400, 500)])   # retried onto the new primary
        seen = {d.task_id for d in first}
        while True:
            got = broker.consume(queues, 100, 0.5)
            if not got:
                break
            broker.ack(got)
            seen.update(d.task_id for d in got)
        assert seen == {f"t{i}" for i in range(500)}
        assert all(broker.stats(q)[1:4] == (0, 0, 0) for q in queues)
    finally:
        broker.close()


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_wait_survives_a_kill_of_the_primary_its_listener_subscribed_on(own_cluster):
    import threading
    from stem.results import TaskState, TaskStatus
    waiter = backend_from_url(own_cluster.url(), namespace="failover", reconnect_timeout=60.0)
    writer = backend_from_url(own_cluster.url(), namespace="failover")
    try:
        got: list = []
        thread = threading.Thread(target=lambda: got.append(waiter.wait("task-1", 60.0)))
        thread.start()
        channel = "failover:{t:task-1}:done"

        def listening_node():
            for node in own_cluster.live():
                with redis.Redis(port=node.port, socket_timeout=2) as c:
                    if dict(c.pubsub_numsub(channel)).get(channel.encode()):
                        return node
            return None
        wait_for(listening_node, 20, "the listener to subscribe")
        node = listening_node()
        with own_cluster.client() as raw:   # a key of that node's slots, to name it
            key = next(k for k in (f"probe{i}" for i in range(10000))
                       if raw.get_node_from_key(k).port == node.port)
        own_cluster.failover_by_kill(key)
        writer.store(TaskStatus(id="task-1", state=TaskState.SUCCEEDED, result=42))
        thread.join(60)
        assert not thread.is_alive() and got[0] is not None and got[0].result == 42
    finally:
        waiter.close()
        writer.close()


@pytest.mark.redis
def test_the_cli_takes_a_cluster_url_for_broker_and_backend(redis_cluster):
    import json
    from stem.results import TaskState, TaskStatus
    from tests.support import drop_namespace
    from tests.test_cli import invoke
    url = redis_cluster.url()
    broker = broker_from_url(url)            # stem's default namespace: the CLI's
    backend = backend_from_url(url)
    try:
        broker.publish_many([_msg(i, q) for i, q in enumerate(["alpha", "beta", "gamma"] * 2)])
        backend.store(TaskStatus(id="cli-task", state=TaskState.SUCCEEDED, result="done"))
        out = invoke("queues", "--json", env={"STEM_BROKER_URL": url})
        assert out.exit_code == 0, out.output
        assert {r["queue"]: r["ready"] for r in json.loads(out.output)} == {"alpha": 2, "beta": 2, "gamma": 2}
        out = invoke("result", "cli-task", "--json", env={"STEM_BROKER_URL": url, "STEM_RESULT_BACKEND_URL": url})
        assert out.exit_code == 0 and json.loads(out.output)["result"] == "done", out.output
    finally:
        broker.close()
        backend.close()
        with redis_cluster.client() as raw:
            drop_namespace(raw, "stem")
