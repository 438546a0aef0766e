"""The workflows of the end-to-end suite (``tests/e2e/test_workflows.py``), importable by every
process.  Steps record each execution in the ledger directory their input names
(``tests.apps.e2e.record``: one file per worker process and child pid, so a SIGKILL loses no
line), and a step told to ``hold`` waits until that file exists: the test kills its child then."""

from __future__ import annotations

import os
import time
from datetime import timedelta

from stem import TaskRegistry
from stem.workflows import StepRetry, Workflows

from .e2e import record

registry = TaskRegistry()
wf = Workflows(registry, lease=2.0, sweep_interval=0.2)


@registry.task("wf.add")
def add(ctx, a, b):
    return a + b


@wf.step(name="wf.charge", retry=StepRetry(3, backoff=0.05))
def charge(ctx, ledger, order_id, hold=None):
    record(ledger, f"charge {ctx.idempotency_key}")
    if hold:
        deadline = time.monotonic() + 60.0
        while not os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.01)
    return f"ch-{order_id}"


@wf.step(name="wf.ship")
def ship(ctx, ledger, order_id):
    record(ledger, f"ship {ctx.idempotency_key}")
    return f"shipped-{order_id}"


@wf.workflow("wf.double")
def double(ctx, ledger, n):
    return n * 2


@wf.workflow("wf.order")
def order(ctx, ledger, order_id, hold=None, sleep_days=2):
    charged = charge(ctx, ledger, order_id, hold)
    total = ctx.call("wf.add", {"a": 40, "b": 2})
    ctx.sleep(timedelta(days=sleep_days))
    shipped = ship(ctx, ledger, order_id)
    review = ctx.wait("review", timeout=timedelta(days=7))
    doubled = ctx.start_child("wf.double", {"ledger": ledger, "n": total}).result()
    return {"charge": charged, "total": total, "shipped": shipped, "review": review, "doubled": doubled}


@wf.step(name="wf.pid")
def pid_step(ctx, ledger, hold):
    record(ledger, f"pid {os.getpid()}")
    deadline = time.monotonic() + 60.0
    while not os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


@wf.workflow("wf.zombie")
def zombie(ctx, ledger, hold):
    """A step whose output names the process that ran it: a stored entry that changed would show."""
    return pid_step(ctx, ledger, hold)


@wf.step(name="wf.note")
def note(ctx, ledger, what):
    record(ledger, f"{what} {ctx.idempotency_key}")
    time.sleep(0.05)          # long enough for a random kill to land mid-step now and then
    return what


@wf.workflow("wf.small")
def small(ctx, ledger, n):
    """What the stress run starts by the hundred: steps, a short real sleep, a called task."""
    a = note(ctx, ledger, "a")
    ctx.sleep(0.2)
    total = ctx.call("wf.add", {"a": n, "b": 1})
    b = note(ctx, ledger, "b")
    return [a, total, b]
