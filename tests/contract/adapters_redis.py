"""Contract-suite factories for the Redis adapters: each instance gets its own namespace,
and its keys are deleted (SCAN on the namespace prefix) when the suite closes it.

A broker also gets the keys suite's two hooks: ``contract_recipe`` (the same URL and
namespace, for the producers of the process race) and ``contract_break_publish``, which
turns the queue's lane 0 and delayed set into strings, so its XADD and ZADD fail with
WRONGTYPE inside the publish script.  Backends get a ``contract_recipe`` too (another
process or connection reaches the same namespace)."""

import uuid

import redis

from ..support import drop_namespace


def _cleanup(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        drop_namespace(client, namespace)
    finally:
        client.close()


def _closing(obj, url, namespace):
    close = obj.close

    def close_and_clean():
        close()
        _cleanup(url, namespace)

    obj.close = close_and_clean
    return obj


def _broker(request, **kwargs):
    from stem.brokers.redis import RedisBroker
    url = request.getfixturevalue("redis_url")
    namespace = "stemtest_" + uuid.uuid4().hex[:12]
    broker = _closing(RedisBroker.from_url(url, namespace=namespace, **kwargs), url, namespace)
    broker.contract_recipe = (RedisBroker.from_url, (url,), {"namespace": namespace, **kwargs})
    broker.contract_break_publish = _break_publish(broker, url)
    return broker


def _break_publish(broker, url):
    from stem.brokers.redis import N_LANES

    def brk(queue):
        keys = broker.queue_keys(queue)
        client = redis.Redis.from_url(url)
        try:
            client.set(keys[0], "not a stream")
            client.set(keys[N_LANES + 1], "not a sorted set")
        finally:
            client.close()
    return brk


def _backend(request, **kwargs):
    from stem.backends.redis import RedisResultBackend
    url = request.getfixturevalue("redis_url")
    namespace = "stemtest_" + uuid.uuid4().hex[:12]
    backend = _closing(RedisResultBackend.from_url(url, namespace=namespace, **kwargs), url, namespace)
    backend.contract_recipe = (RedisResultBackend.from_url, (url,), {"namespace": namespace, **kwargs})
    return backend


BROKERS = {"redis": _broker}
BACKENDS = {"redis": _backend}
