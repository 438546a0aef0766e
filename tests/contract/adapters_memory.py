"""Contract-suite factories for the in-memory adapters.

Every ``adapters_*.py`` module beside this one exposes ``BROKERS``,
``BACKENDS`` and ``WORKFLOW_STORES``: name -> factory(request, **kwargs)
returning a fresh, isolated (empty) instance (the suite closes it).  A
workflow store shared across processes carries ``contract_recipe``:
``(factory, args, kwargs)`` opening the same store in another process.  A factory that needs a server calls the
matching fixture through ``request.getfixturevalue`` so it skips/fails like
any service test.
"""

from stem.backends.memory import InMemoryResultBackend
from stem.brokers.memory import InMemoryBroker
from stem.errors import StemError
from stem.workflows.store_memory import MemoryWorkflowStore


def _broker(request, **kwargs):
    broker = InMemoryBroker(**kwargs)
    broker.contract_break_publish = _break_publish(broker)
    return broker


def _backend(request, **kwargs):
    return InMemoryResultBackend(**kwargs)


BROKERS = {"memory": _broker}
BACKENDS = {"memory": _backend}
WORKFLOW_STORES = {"memory": lambda request, **kwargs: MemoryWorkflowStore.for_backend(_backend(request, **kwargs))}


def _break_publish(broker):
    """Publishing to the named queue fails after the key would be claimed."""
    push = broker._push

    def brk(queue):
        def failing_push(rec, not_before, now):
            if rec.queue == queue:
                raise StemError(f"injected: publishing to {queue} fails")
            push(rec, not_before, now)
        broker._push = failing_push
    return brk
