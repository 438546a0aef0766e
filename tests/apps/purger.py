"""A purging process for the end-to-end suite: ``python -m tests.apps.purger CONFIG``.

``CONFIG`` is JSON: ``url`` and ``options`` (the store, as ``tests.apps.e2e_worker`` takes
them: a Redis namespace is an option, so ``stem purge`` itself cannot be pointed at one),
``queue``, ``batch``, and ``stall``: None, or where the purge stops after its first page to
wait for the test's SIGKILL: ``"after_store"`` (the page's statuses stored and its canvases
carried on, the page not yet dropped from the holding area) or ``"after_drop"`` (dropped).
It runs ``Stem.purge``, what ``stem purge`` runs; prints ``PURGE-STALLED`` when it stalls,
else ``PURGE-DONE <report as JSON>``.
"""

from __future__ import annotations

import json
import sys
import threading


def main(config: dict) -> int:
    from stem import Stem
    from stem.backends import from_url as backend_from_url
    from stem.brokers import from_url as broker_from_url
    from tests.apps.e2e import registry

    options = config.get("options") or {}
    broker = broker_from_url(config["url"], **options)
    stem = Stem(broker, backend_from_url(config["url"], **options), registry)
    stall = config.get("stall")
    if stall is not None:
        real_drop = broker.purge_drop

        def drop(queue, ids):
            if stall == "after_drop":
                real_drop(queue, ids)
            print("PURGE-STALLED", flush=True)
            threading.Event().wait()          # until the test's SIGKILL

        broker.purge_drop = drop
    report = stem.purge(config["queue"], batch=int(config.get("batch", 1000)))
    print("PURGE-DONE " + json.dumps(report._asdict()), flush=True)
    stem.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
