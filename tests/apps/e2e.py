"""The tasks of the end-to-end suite (``tests/e2e/``), importable by every process.

Each run of ``e2e.effect`` appends its task id to a file of the ``ledger`` directory named
after the worker process that ran it (``STEM_E2E_WORKER``, which the harness sets and the
worker's children inherit) and the child's pid: "ran exactly once" is then checked against
what ran (``tests.support.Ledger``), not against the worker's word, and a file outlives a
SIGKILL of the worker, a broker restart and a lost result.
"""

from __future__ import annotations

import os
import time

from stem import TaskOptions, TaskRegistry

registry = TaskRegistry()


def record(ledger: str, task_id: str) -> None:
    """One line per run; O_APPEND keeps lines whole across processes."""
    worker = os.environ.get("STEM_E2E_WORKER", "inproc")
    fd = os.open(os.path.join(ledger, f"ran-{worker}-{os.getpid()}"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{task_id}\n".encode())
    finally:
        os.close(fd)


@registry.task("e2e.effect")
def effect(ctx, n, ledger, sleep=0.0, hold=None):
    """Record the run, then take ``sleep`` seconds, or (``hold``: a path) wait until that file
    exists (at most 60 s): a test holds tasks running for as long as a step needs."""
    record(ledger, ctx.id)
    if sleep:
        time.sleep(sleep)
    if hold:
        deadline = time.monotonic() + 60.0
        while not os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.01)
    return n


@registry.task("e2e.add")
def add(ctx, a, b):
    return a + b


# -- limits (tests/e2e/test_limits.py) ------------------------------------------------------------
#: what the limits tests measure against
RATED_RATE, RATED_BURST, SLOTS = 2.0, 2, 2


@registry.task("e2e.rated", options=TaskOptions(rate_limit="2/s", burst=RATED_BURST))
def rated(ctx, ledger):
    """Globally limited to 2/s (burst 2): returns when it started."""
    record(ledger, ctx.id)
    return time.time()


@registry.task("e2e.rated50", options=TaskOptions(rate_limit="50/s"))
def rated50(ctx):
    """Globally limited to 50/s (the default burst, 6): returns when it started (the acceptance run)."""
    return time.time()


@registry.task("e2e.throttled_fragile", options=TaskOptions(rate_limit="5/s", max_retries=0,
                                                            visibility_timeout=1.0))
def throttled_fragile(ctx):
    """No retry, a short lease, a queue far fuller than its rate: throttling must never fail it."""
    return ctx.attempt


@registry.task("e2e.slotted", options=TaskOptions(concurrency_limit=SLOTS, concurrency_key="e2e-slots"))
def slotted(ctx, ledger, hold=None):
    """At most two run at once across the cluster: writes its start and end times."""
    worker = os.environ.get("STEM_E2E_WORKER", "inproc")
    path = os.path.join(ledger, f"slots-{worker}-{os.getpid()}")

    def line(what: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{ctx.id} {what} {time.time()!r}\n".encode())
        finally:
            os.close(fd)

    line("start")
    record(ledger, ctx.id)
    if hold:
        deadline = time.monotonic() + 60.0
        while not os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.01)
    line("end")
    return ctx.id

@registry.task("e2e.collect")
def collect(ctx, ledger=None):
    """A chord callback: records its run, returns the members' results (``ctx.previous``) as a list."""
    if ledger:
        record(ledger, ctx.id)
    return list(ctx.previous)


@registry.task("e2e.die")
def die(ctx):
    """Kills the process that runs it (a poison task: it ends DEAD after the crash redeliveries)."""
    os.kill(os.getpid(), 9)
