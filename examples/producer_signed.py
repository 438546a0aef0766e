"""A producer that signs every frame; only workers holding the key will run its tasks.

    STEM_SIGNING_KEYS=k1:$(python -c 'import base64,os;print(base64.b64encode(os.urandom(32)).decode())') \
        STEM_BROKER_URL=redis://127.0.0.1:6379/0 python examples/producer_signed.py
"""

import base64
import os

from stem import PayloadSigner, Stem, StemConfig, Worker, WorkerLifecycleConfig

from tasks import registry

os.environ.setdefault("STEM_SIGNING_KEYS", "k1:" + base64.b64encode(b"example-secret-key-32-bytes-long").decode())
config = StemConfig.from_environment()
signer = PayloadSigner.from_config(config)
url = config.broker_url or "memory://signed-example"
stem = Stem(broker=url, backend=url, registry=registry, signer=signer)
worker = Worker(broker=url, backend=url, registry=registry, signer=signer,
                lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
worker.run_in_background()
task_id = stem.enqueue("email.send", args={"to": "signed@example.com"})
print(stem.wait_for_task(task_id, timeout=10).result)
worker.shutdown()
