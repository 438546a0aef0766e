"""Contract-suite factories for the Redis adapters: each instance gets its own namespace,
and its keys are deleted (SCAN on the namespace prefix, with the session's plain client of
the server) when the suite closes it.

A broker also gets the keys suite's two hooks: ``contract_recipe`` (the same URL and
namespace, for the producers of the process race) and ``contract_break_publish``, which
turns the queue's lane 0 and delayed set into strings, so its XADD and ZADD fail with
WRONGTYPE inside the publish script.  Backends get a ``contract_recipe`` too (another
process or connection reaches the same namespace).  A workflow store lives beside a backend of
its own (``RedisWorkflowStore.for_backend``); its ``contract_recipe`` opens the same store (URL
and namespace) in another process, and closing it closes the backend and drops the keys."""

import uuid


def _closing(obj, raw, namespace):
    """``obj`` whose ``close`` also drops its namespace, with ``raw`` (the session's plain
    client: ``raw_clients`` in tests/conftest.py)."""
    from ..support import drop_namespace
    close = obj.close

    def close_and_clean():
        close()
        drop_namespace(raw, namespace)

    obj.close = close_and_clean
    return obj


def broker_factory(urls):
    """A broker factory over ``urls(request) -> (stem's URL, a plain URL of the same data)``:
    the plain one is the cleanup's and the fault hooks' (a Sentinel URL is stem's only; a
    Cluster URL serves both, ``raw_client`` makes it a redis-py ``RedisCluster``)."""
    def make(request, **kwargs):
        from stem.brokers.redis import RedisBroker
        url, raw_url = urls(request)
        raw = request.getfixturevalue("raw_clients")(raw_url)
        namespace = "stemtest_" + uuid.uuid4().hex[:12]
        broker = _closing(RedisBroker.from_url(url, namespace=namespace, **kwargs), raw, namespace)
        broker.contract_recipe = (RedisBroker.from_url, (url,), {"namespace": namespace, **kwargs})
        broker.contract_break_publish = _break_publish(broker, raw)
        return broker
    return make


def _break_publish(broker, raw):
    from stem.brokers.redis import N_LANES

    def brk(queue):
        keys = broker.queue_keys(queue)
        raw.set(keys[0], "not a stream")
        raw.set(keys[N_LANES + 1], "not a sorted set")
    return brk


def backend_factory(urls):
    def make(request, **kwargs):
        from stem.backends.redis import RedisResultBackend
        url, raw_url = urls(request)
        raw = request.getfixturevalue("raw_clients")(raw_url)
        namespace = "stemtest_" + uuid.uuid4().hex[:12]
        backend = _closing(RedisResultBackend.from_url(url, namespace=namespace, **kwargs), raw, namespace)
        backend.contract_recipe = (RedisResultBackend.from_url, (url,), {"namespace": namespace, **kwargs})
        return backend
    return make


def workflow_store_factory(urls):
    def make(request, **kwargs):
        from stem.backends.redis import RedisResultBackend
        from stem.workflows.store_redis import RedisWorkflowStore
        url, raw_url = urls(request)
        raw = request.getfixturevalue("raw_clients")(raw_url)
        namespace = "stemtest_" + uuid.uuid4().hex[:12]
        backend = RedisResultBackend.from_url(url, namespace=namespace, **kwargs)
        store = RedisWorkflowStore.for_backend(backend)
        store.close = _closing(backend, raw, namespace).close
        store.contract_recipe = (RedisWorkflowStore.from_url, (url,), {"namespace": namespace})
        return store
    return make


def _plain(request):
    url = request.getfixturevalue("redis_url")
    return url, url


BROKERS = {"redis": broker_factory(_plain)}
BACKENDS = {"redis": backend_factory(_plain)}
WORKFLOW_STORES = {"redis": workflow_store_factory(_plain)}
