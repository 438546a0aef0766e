"""Contract-suite factories for the Redis adapters on a Redis Cluster: the same factories as
``adapters_redis``, on the ``redis+cluster://`` URL of the session's own 3-primary cluster
(``warm_redis_cluster`` in tests/conftest.py: stem's client of it stays open between tests).
Cleanup and the fault hooks reach the keys with the session's plain redis-py ``RedisCluster``
(``raw_clients``)."""

from .adapters_redis import backend_factory, broker_factory, workflow_store_factory


def _on_cluster(request):
    url = request.getfixturevalue("warm_redis_cluster").url()
    return url, url


BROKERS = {"cluster": broker_factory(_on_cluster)}
BACKENDS = {"cluster": backend_factory(_on_cluster)}
WORKFLOW_STORES = {"cluster": workflow_store_factory(_on_cluster)}
#: The ``waits`` cases run on the cluster under ``-m slow`` only (tests/contract/conftest.py).
WAITS_ARE_SLOW = ("cluster",)
