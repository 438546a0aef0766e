"""Minimal producer + worker in one process on the in-memory adapters."""

from stem import Stem, Worker, WorkerLifecycleConfig
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker

from tasks import registry

broker, backend = InMemoryBroker(), InMemoryResultBackend()
stem = Stem(broker=broker, backend=backend, registry=registry)
worker = Worker(broker=broker, backend=backend, registry=registry, queues=["default", "reports"], concurrency=2,
                lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
worker.run_in_background()

task_id = stem.enqueue("email.send", args={"to": "a@b.c"}, meta={"trace": "x"})
print(stem.wait_for_task(task_id, timeout=10).result)
report_id = stem.enqueue("report.generate", args={"report_id": 7})
print(stem.wait_for_task(report_id, timeout=10).result)
worker.shutdown()
