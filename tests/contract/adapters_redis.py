"""Contract-suite factories for the Redis adapters: each instance gets its own namespace,
and its keys are deleted (SCAN on the namespace prefix) when the suite closes it.  Backends
get a ``contract_recipe`` (another process or connection reaches the same namespace)."""

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
    return _closing(RedisBroker.from_url(url, namespace=namespace, **kwargs), url, namespace)


def _backend(request, **kwargs):
    from stem.backends.redis import RedisResultBackend
    url = request.getfixturevalue("redis_url")
    namespace = "stemtest_" + uuid.uuid4().hex[:12]
    backend = _closing(RedisResultBackend.from_url(url, namespace=namespace, **kwargs), url, namespace)
    backend.contract_recipe = (RedisResultBackend.from_url, (url,), {"namespace": namespace, **kwargs})
    return backend


BROKERS = {"redis": _broker}
BACKENDS = {"redis": _backend}
