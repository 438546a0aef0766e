"""A worker against Redis; runs until SIGTERM/SIGINT.

    STEM_BROKER_URL=redis://127.0.0.1:6379/0 python examples/worker_redis.py
"""

import os

from stem import Worker, WorkerLifecycleConfig

from tasks import registry

url = os.environ.get("STEM_BROKER_URL", "redis://127.0.0.1:6379/0")
worker = Worker(broker=url, backend=url, registry=registry, queues=["default", "reports"], concurrency=2,
                lifecycle=WorkerLifecycleConfig(max_tasks_per_child=1000, max_memory_per_child=256 * 2**20))
worker.start()
