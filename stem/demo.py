"""The demo behind ``make demo`` / ``stem demo``: enqueue N tasks, run them, print a summary."""

from __future__ import annotations

import time
from typing import Callable

from . import IMPLEMENTATION, Stem, TaskOptions, TaskRegistry, TaskState, Worker, WorkerLifecycleConfig
from .backends import from_url as backend_from_url
from .brokers import from_url as broker_from_url
from .redact import mask_url

registry = TaskRegistry()


@registry.task("demo.add")
def add(ctx, a: int, b: int) -> int:
    return a + b


@registry.task("demo.flaky", options=TaskOptions(max_retries=2))
def flaky(ctx, n: int) -> str:
    if ctx.attempt == 0 and n % 100 == 0:
        raise RuntimeError("transient failure, retried")
    return f"ok {n}"


def run_demo(tasks: int = 10_000, concurrency: int = 2, broker_url: str = "memory://demo",
             backend_url: str | None = None, isolation: str = "inline",
             progress: Callable[[int, int], None] | None = None) -> dict:
    broker = broker_from_url(broker_url)
    backend = backend_from_url(backend_url or broker_url)
    stem = Stem(broker, backend, registry)
    t0 = time.perf_counter()
    items = [("demo.flaky" if i % 10 == 0 else "demo.add", {"n": i} if i % 10 == 0 else {"a": i, "b": i})
             for i in range(tasks)]
    ids = []
    for start in range(0, tasks, 1000):
        ids += stem.enqueue_many(items[start:start + 1000])
    enqueued = time.perf_counter()
    from .retry import FixedRetryStrategy
    worker = Worker(broker, backend, registry, concurrency=concurrency, isolation=isolation,
                    retry_strategy=FixedRetryStrategy(0.05),
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
    worker.run_in_background()
    states: dict[str, int] = {}
    try:
        for n, task_id in enumerate(ids, 1):
            status = stem.wait_for_task(task_id, timeout=120)
            states[status.state.value] = states.get(status.state.value, 0) + 1
            if progress is not None and (n % 500 == 0 or n == tasks):
                progress(n, tasks)
        done = time.perf_counter()
        stats = worker.stats()
    finally:
        worker.shutdown(timeout=30)
    return {
        "tasks": tasks, "implementation": IMPLEMENTATION, "broker": mask_url(broker.url), "isolation": isolation,
        "concurrency": concurrency, "states": states, "retried": stats["retried"],
        "enqueue_seconds": enqueued - t0, "process_seconds": done - enqueued,
        "enqueue_per_second": tasks / max(enqueued - t0, 1e-9),
        "process_per_second": tasks / max(done - enqueued, 1e-9),
        "all_succeeded": states.get(TaskState.SUCCEEDED.value, 0) == tasks,
    }
