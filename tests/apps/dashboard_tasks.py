"""The tasks the dashboard's browser suite (``tests/test_dashboard_browser.py``) runs."""

from __future__ import annotations

import os

from stem import TaskOptions, TaskRegistry

registry = TaskRegistry()


@registry.task("dash.echo")
def echo(ctx, value):
    return value


@registry.task("dash.flaky", options=TaskOptions(max_retries=0))
def flaky(ctx, flag):
    """Fails (straight to the dead-letter queue) until the file ``flag`` exists."""
    if not os.path.exists(flag):
        raise RuntimeError(f"{flag} is not there yet")
    return "fixed"


@registry.task("dash.pay", options=TaskOptions(redact=["card"]))
def pay(ctx, card, password, cents):
    """Arguments to hide: ``password`` by the name rule, ``card`` by the task's own ``redact``."""
    return {"charged": cents}
