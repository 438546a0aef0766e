"""A durable workflow: an order charged once, shipped by a normal task, left to sleep, then
waiting for a review that an outside system sends, with a child run scoring it.

    python examples/workflow_order.py [sqlite:///orders.db | redis://localhost:6379/0]

The broker and result backend are one SQLite file in a temporary directory unless a URL is
given; the worker runs each activation in one of its child processes, which reach the store
through it.  Kill the worker at any point and start it again: the run goes on from its
journal, and the charge is never made twice for one order (the step's idempotency key).
From the command line: ``stem wf list``, ``stem wf show order-42``,
``stem wf send order-42 review '{"stars": 5}'``.
"""

import sys
import tempfile
from datetime import timedelta

from stem import Stem, TaskRegistry, Worker, WorkerLifecycleConfig
from stem.workflows import StepRetry, Workflows

registry = TaskRegistry()
wf = Workflows(registry, sweep_interval=0.5)
CHARGES: dict[str, str] = {}      # what a payment provider would dedup by idempotency key


@registry.task("warehouse.ship")
def ship(ctx, order_id):
    return f"parcel-{order_id}"


@wf.step(retry=StepRetry(max_attempts=5))
def charge(ctx, order_id: str, cents: int) -> str:
    return CHARGES.setdefault(ctx.idempotency_key, f"ch_{order_id}_{cents}")


@wf.workflow("review.score")
def score(ctx, review: dict) -> int:
    return 2 * review["stars"]


@wf.workflow("order.fulfil", version="1")
def fulfil(ctx, order_id: str, cents: int) -> dict:
    charge_id = charge(ctx, order_id, cents)
    parcel = ctx.call("warehouse.ship", {"order_id": order_id})
    ctx.sleep(timedelta(seconds=1))                      # days, in real life
    review = ctx.wait("review", timeout=timedelta(days=7))
    points = ctx.start_child("review.score", {"review": review}).result() if review else 0
    return {"charge": charge_id, "parcel": parcel, "review": review, "points": points}


def main(url: str) -> None:
    worker = Worker(url, url, registry, concurrency=2,
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False)).run_in_background()
    try:
        with Stem(url, url, registry) as stem:
            run_id = wf.start(stem, "order.fulfil", {"order_id": "42", "cents": 999}, run_id="order-42")
            wf.send(stem, run_id, "review", {"stars": 5}, event_id="review-of-42")   # kept until the wait
            status = stem.wait_for_task(run_id, timeout=60)
            print(f"{run_id}: {status.state.value} {status.result}")
            print(f"journal: {[(e.position, e.kind, e.name) for e in wf.store_for(stem.backend).journal(run_id)]}")
    finally:
        worker.shutdown(timeout=30)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(f"sqlite:///{tmp}/orders.db")
