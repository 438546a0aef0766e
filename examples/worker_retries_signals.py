"""Retries with exponential jitter, and lifecycle signals wired to logging."""

import logging

from stem import ExponentialJitterRetryStrategy, Stem, Worker, WorkerLifecycleConfig, signals
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker

from tasks import registry

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
log = logging.getLogger("example")


@signals.task_retry.connect
def on_retry(sender, envelope, error, delay):
    log.info("retrying %s in %.2fs after: %s", envelope.name, delay, error)


@signals.task_succeeded.connect
def on_success(sender, envelope, result, runtime):
    log.info("%s succeeded: %s", envelope.name, result)


@signals.worker_child_shutdown.connect
def on_child_exit(sender, worker, pid, reason, exitcode):
    log.info("child %d left (%s)", pid, reason)


broker, backend = InMemoryBroker(), InMemoryResultBackend()
stem = Stem(broker, backend, registry)
worker = Worker(broker, backend, registry, concurrency=2,
                retry_strategy=ExponentialJitterRetryStrategy(base=0.2, max=1.0),
                lifecycle=WorkerLifecycleConfig(install_signal_handlers=False, max_tasks_per_child=3))
worker.run_in_background()
task_id = stem.enqueue("flaky.sync", args={"fail_times": 2})
status = stem.wait_for_task(task_id, timeout=30)
print(status.state.value, status.result, "attempt", status.attempt)
worker.shutdown()
