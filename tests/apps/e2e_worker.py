"""A worker process for the end-to-end suite: ``python -m tests.apps.e2e_worker CONFIG``.

``CONFIG`` is JSON (``tests.support.Processes.worker`` writes it): ``url`` and ``options``
(the store, as ``stem.brokers.from_url``/``stem.backends.from_url`` take them; a Redis
namespace is an option, not part of the URL), ``visibility_timeout``, ``concurrency``,
``signing_key`` (hex, or null), ``queues``, ``registry`` (default ``tests.apps.e2e:registry``),
``heartbeat_interval``, ``completion_grace``, and ``crash_at_completion`` (true: the process
kills its whole group with SIGKILL the moment its canvas runner is about to run a group's
completion, ``stem.canvas.Runner.completed``: a fault at that exact point).  It prints
``E2E-READY <worker id>`` once the
worker is ready (``signals.worker_ready``), logs at INFO to stdout, stops on SIGTERM (warm),
SIGINT (soft) and SIGQUIT (hard), and exits 1 when the worker stopped with an error.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys


def main(config: dict) -> int:
    from stem import ExponentialJitterRetryStrategy, PayloadSigner, Worker, WorkerLifecycleConfig, signals
    from stem.backends import from_url as backend_from_url
    from stem.brokers import from_url as broker_from_url

    if config.get("crash_at_completion"):
        import os
        from stem.canvas import Runner

        def crash(self, record, data=None):
            print(f"E2E-CRASH before the completion of {record.id}", flush=True)
            os.killpg(os.getpgid(0), signal.SIGKILL)      # kill -9 of the worker and its children

        Runner.completed = crash
    options = config.get("options") or {}
    broker_options = dict(options)
    if config.get("visibility_timeout"):
        broker_options["default_visibility_timeout"] = float(config["visibility_timeout"])
    key = config.get("signing_key")
    worker = Worker(broker_from_url(config["url"], **broker_options), backend_from_url(config["url"], **options),
                    config.get("registry") or "tests.apps.e2e:registry", queues=config.get("queues") or None,
                    concurrency=int(config.get("concurrency", 2)),
                    signer=PayloadSigner({"k1": bytes.fromhex(key)}) if key else None,
                    heartbeat_interval=float(config.get("heartbeat_interval", 1.0)),
                    completion_grace=float(config.get("completion_grace", 60.0)),
                    retry_strategy=ExponentialJitterRetryStrategy(base=0.1, max=0.5),
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=True, soft_grace_period=5,
                                                    force_shutdown_after=5))
    signals.worker_ready.connect(lambda sender, **_: print(f"E2E-READY {worker.id}", flush=True))
    worker.start()
    return 0


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)          # `kill -USR1` dumps every thread's stack
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    sys.exit(main(json.loads(sys.argv[1])))
