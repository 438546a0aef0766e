"""A worker in the foreground: Ctrl-C (SIGINT) stops it softly, SIGTERM warmly.

    python examples/worker_minimal.py
"""

from stem import Stem, Worker
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker

from tasks import registry

broker, backend = InMemoryBroker(), InMemoryResultBackend()
Stem(broker, backend, registry).enqueue_many([("email.send", {"to": f"u{i}@x.y"}) for i in range(100)])
worker = Worker(broker=broker, backend=backend, registry=registry, concurrency=2)
worker.start(burst=True)  # drain the queue, then return
print(worker.stats()["succeeded"], "tasks succeeded")
