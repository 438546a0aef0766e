"""Contract-suite factories for the Redis adapters reached through Sentinel: the same
factories as ``adapters_redis``, on a ``redis+sentinel://`` URL of the session's own master,
replica and sentinel (``sentinel_setup`` in tests/conftest.py)."""

from .adapters_redis import backend_factory, broker_factory, workflow_store_factory


def _through_sentinel(request):
    setup = request.getfixturevalue("sentinel_setup")
    return setup.url(), setup.master.url


BROKERS = {"sentinel": broker_factory(_through_sentinel)}
BACKENDS = {"sentinel": backend_factory(_through_sentinel)}
WORKFLOW_STORES = {"sentinel": workflow_store_factory(_through_sentinel)}
#: The ``waits`` cases run through Sentinel under ``-m slow`` only (tests/contract/conftest.py).
WAITS_ARE_SLOW = ("sentinel",)
