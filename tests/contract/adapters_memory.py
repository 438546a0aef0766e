"""Contract-suite factories for the in-memory adapters.

Every ``adapters_*.py`` module beside this one exposes ``BROKERS`` and
``BACKENDS``: name -> factory(request, **kwargs) returning a fresh, isolated
instance (the suite closes it).  A factory that needs a server calls the
matching fixture through ``request.getfixturevalue`` so it skips/fails like
any service test.
"""

from stem.backends.memory import InMemoryResultBackend
from stem.brokers.memory import InMemoryBroker


def _broker(request, **kwargs):
    return InMemoryBroker(**kwargs)


def _backend(request, **kwargs):
    return InMemoryResultBackend(**kwargs)


BROKERS = {"memory": _broker}
BACKENDS = {"memory": _backend}
