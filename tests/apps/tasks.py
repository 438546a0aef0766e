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


@registry.task("apps.sched_policy")
def sched_policy(ctx):
    """The child's scheduling policy (the supervisor's thread yields; its children must not)."""
    return os.sched_getscheduler(0)
