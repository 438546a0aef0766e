"""An importable registry for tests that start workers in other processes (spawn, CLI)."""

import os
import time

from stem import TaskOptions, TaskRegistry

registry = TaskRegistry()


@registry.task("apps.pid")
def pid(ctx):
    return os.getpid()


@registry.task("apps.add")
def add(ctx, a, b):
    return a + b


@registry.task("apps.sleep")
def sleep(ctx, seconds, marker=None):
    time.sleep(seconds)
    if marker:
        with open(marker, "a") as f:
            f.write(f"{ctx.id}\n")
    return seconds


@registry.task("apps.fail", options=TaskOptions(max_retries=0))
def fail(ctx):
    raise RuntimeError("planned failure")


@registry.task("apps.fail_pay", options=TaskOptions(max_retries=0, redact=["card"]))
def fail_pay(ctx, card, password, cents):
    """Fails with arguments to hide: ``password`` by the name rule, ``card`` by its own redact."""
    raise RuntimeError("card declined")


@registry.task("apps.sched_policy")
def sched_policy(ctx):
    """The child's scheduling policy (the supervisor's thread yields; its children must not)."""
    return os.sched_getscheduler(0)
