"""Redis through Sentinel: the adapters through a failover of a master, a replica and a sentinel
of the test's own (tests/support.py ``SentinelSetup``).  The contract suite runs through
Sentinel too (tests/contract/adapters_sentinel.py); the ``redis+sentinel://`` URL is
tests/test_redis_urls.py's."""

from __future__ import annotations

import pytest
import redis

from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Message
from stem.errors import BrokerError
from stem.stores.redis import RedisStore
from tests.support import flaky, wait_for


# -- a former master's READONLY ------------------------------------------------------------
@pytest.mark.redis
def test_behind_sentinel_a_readonly_reply_drops_the_pool_and_is_retried(sentinel_setup):
    store = RedisStore(sentinel_setup.url(), retry_attempts=4)
    try:
        dropped = []
        pool = store.client.connection_pool
        real = pool.disconnect
        pool.disconnect = lambda *a, **k: (dropped.append(1), real(*a, **k))
        fn, calls = flaky(redis.exceptions.ReadOnlyError("You can't write against a read only replica."), 2)
        assert store.call(fn, "test") == "ok"
        assert (len(calls), len(dropped)) == (3, 2)
        fn, calls = flaky(redis.exceptions.ReadOnlyError("READONLY"), 99)
        with pytest.raises(BrokerError, match="master not reachable"):
            store.call(fn, "test")
        assert len(calls) == 4
    finally:
        store.close()


@pytest.mark.redis
def test_without_sentinel_a_readonly_reply_is_an_error_at_once(redis_url):
    store = RedisStore(redis_url)
    try:
        fn, calls = flaky(redis.exceptions.ReadOnlyError("READONLY"), 1)
        with pytest.raises(BrokerError, match="READONLY"):
            store.call(fn, "test")
        assert len(calls) == 1
    finally:
        store.close()


# -- failovers -------------------------------------------------------------------------------
def _msg(i: int, queue: str = "q") -> Message:
    return Message(f"t{i}", queue, b"frame-%d" % i)


@pytest.mark.redis
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["kill -9 of the master", "SENTINEL FAILOVER"])
def test_a_broker_carries_on_through_a_failover_and_loses_no_replicated_message(own_sentinel, how):
    broker = broker_from_url(own_sentinel.url(), namespace="failover", default_visibility_timeout=5.0)
    try:
        broker.publish_many([_msg(i) for i in range(200)])
        first = broker.consume(["q"], 50, 1.0)
        broker.ack(first)
        own_sentinel.wait_replicated()
        old = own_sentinel.master.port
        if how == "SENTINEL FAILOVER":     # the old master lives on, demoted to a replica
            with own_sentinel._sentinel_client() as client:
                client.execute_command("SENTINEL", "FAILOVER", own_sentinel.SERVICE)
            wait_for(lambda: own_sentinel.master_port() not in (None, old), 60, "the sentinel to fail over")
        else:
            own_sentinel.failover_by_kill()
        broker.publish_many([_msg(i) for i in range(200, 300)])   # retried onto the new master
        seen = {d.task_id for d in first}
        while True:
            got = broker.consume(["q"], 100, 0.5)
            if not got:
                break
            broker.ack(got)
            seen.update(d.task_id for d in got)
        assert seen == {f"t{i}" for i in range(300)}
        assert broker.stats("q")[1:4] == (0, 0, 0)
    finally:
        broker.close()
