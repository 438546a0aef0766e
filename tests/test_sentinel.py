"""Redis through Sentinel: the ``redis+sentinel://`` URL, and the adapters through a failover of
a master, a replica and a sentinel of the test's own (tests/support.py ``SentinelSetup``).
The contract suite runs through Sentinel too (tests/contract/adapters_sentinel.py)."""

from __future__ import annotations

import pytest
import redis

from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Message
from stem.config import check_url
from stem.errors import BrokerError, ConfigurationError
from stem.redact import mask_url
from stem.stores.redis import RedisStore
from stem.stores.redis_sentinel import parse_sentinel_url
from tests.support import wait_for


# -- the URL ---------------------------------------------------------------------------
def test_a_sentinel_url_names_its_sentinels_service_db_and_passwords():
    u = parse_sentinel_url("redis+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380,sentinel-3/orders/2"
                           "?sentinel_password=spw&min_other_sentinels=1")
    assert u.sentinels == [("10.0.0.1", 26379), ("::1", 26380), ("sentinel-3", 26379)]
    assert (u.service_name, u.db, u.username, u.password) == ("orders", 2, "app", "s@cret")
    assert (u.sentinel_password, u.min_other_sentinels, u.ssl) == ("spw", 1, False)
    assert parse_sentinel_url("rediss+sentinel://h:1/svc").ssl is True
    assert parse_sentinel_url("redis+sentinel://h:1/svc").db == 0


@pytest.mark.parametrize("url, says", [
    ("redis+sentinel:///svc/0", "no sentinel address"),
    ("redis+sentinel://h:26379", "the path must be"),
    ("redis+sentinel://h:26379/svc/0/extra", "the path must be"),
    ("redis+sentinel://h:26379/svc/zero", "db must be a number"),
    ("redis+sentinel://h:port/svc", "bad address"),
    ("redis+sentinel://h:70000/svc", "bad address"),
    ("redis+sentinel://[::1/svc", "IPv6"),
    ("redis+sentinel://h:1,[::1:2/svc", "IPv6"),
    ("redis+sentinel://h:1/svc?sentinel_pasword=x", "unknown option 'sentinel_pasword'"),
    ("redis+sentinel://h:1/svc?min_other_sentinels=many", "min_other_sentinels must be a number"),
])
def test_a_bad_sentinel_url_is_refused_before_anything_connects(url, says):
    with pytest.raises(ConfigurationError, match=says):
        parse_sentinel_url(url)
    with pytest.raises(ConfigurationError, match=says):
        broker_from_url(url)


def test_sentinel_urls_pass_the_config_check_and_their_passwords_are_masked():
    url = "redis+sentinel://:hunter2@h1:26379,h2:26379/svc/0"
    assert check_url(url) == url
    assert "hunter2" not in mask_url(url)
    with pytest.raises(ConfigurationError) as err:
        broker_from_url("redis+sentinel://:hunter2@h1:26379/svc/x")
    assert "hunter2" not in str(err.value)


# -- a former master's READONLY ------------------------------------------------------------
def _flaky(exc: Exception, times: int):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise exc
        return "ok"
    return fn, calls


@pytest.mark.redis
def test_behind_sentinel_a_readonly_reply_drops_the_pool_and_is_retried(sentinel_setup):
    store = RedisStore(sentinel_setup.url(), retry_attempts=4)
    try:
        dropped = []
        pool = store.client.connection_pool
        real = pool.disconnect
        pool.disconnect = lambda *a, **k: (dropped.append(1), real(*a, **k))
        fn, calls = _flaky(redis.exceptions.ReadOnlyError("You can't write against a read only replica."), 2)
        assert store.call(fn, "test") == "ok"
        assert (len(calls), len(dropped)) == (3, 2)
        fn, calls = _flaky(redis.exceptions.ReadOnlyError("READONLY"), 99)
        with pytest.raises(BrokerError, match="master not reachable"):
            store.call(fn, "test")
        assert len(calls) == 4
    finally:
        store.close()


@pytest.mark.redis
def test_without_sentinel_a_readonly_reply_is_an_error_at_once(redis_url):
    store = RedisStore(redis_url)
    try:
        fn, calls = _flaky(redis.exceptions.ReadOnlyError("READONLY"), 1)
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
