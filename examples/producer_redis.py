"""Producer against Redis through a URL: run examples/worker_redis.py alongside.

    STEM_BROKER_URL=redis://127.0.0.1:6379/0 python examples/producer_redis.py
"""

import os

from stem import Stem

from tasks import registry

url = os.environ.get("STEM_BROKER_URL", "redis://127.0.0.1:6379/0")
stem = Stem(broker=url, backend=url, registry=registry)
ids = stem.enqueue_many([("email.send", {"to": f"user{i}@example.com"}) for i in range(10)])
for task_id in ids:
    status = stem.wait_for_task(task_id, timeout=30)
    print(task_id, status.state.value, status.result)
stem.close()
