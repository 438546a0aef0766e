import pytest

from stem import TaskOptions, TaskRegistry, TaskState
from stem.errors import TaskFailedError
from stem.testing import EagerStem


def test_eager_stem_runs_tasks_at_once_with_retries():
    registry = TaskRegistry()

    @registry.task("email.send", options=TaskOptions(max_retries=2))
    def send(ctx, to):
        if ctx.attempt == 0:
            raise RuntimeError("transient")
        return f"sent to {to} (attempt {ctx.attempt})"

    stem = EagerStem(registry)
    status = stem.wait_for_task(stem.enqueue("email.send", {"to": "a@b.c"}), timeout=1)
    assert status.state is TaskState.SUCCEEDED and status.result == "sent to a@b.c (attempt 1)"


def test_eager_stem_can_reraise_task_failures():
    registry = TaskRegistry()
    registry.task("boom")(lambda ctx: 1 / 0)
    stem = EagerStem(registry, raise_errors=True)
    with pytest.raises(TaskFailedError, match="ZeroDivisionError") as info:
        stem.enqueue("boom")
    assert info.value.status.state is TaskState.FAILED


def test_eager_stem_validates_like_the_real_producer():
    from stem.errors import UnknownTaskError
    stem = EagerStem(TaskRegistry())
    with pytest.raises(UnknownTaskError):
        stem.enqueue("missing")


def test_eager_results_come_back_as_a_real_worker_returns_them():
    import datetime
    import decimal
    registry = TaskRegistry()
    registry.task("typed")(lambda ctx: {"when": datetime.date(2026, 12, 7), "price": decimal.Decimal("1.50"),
                                        "pair": (1, 2)})
    stem = EagerStem(registry)
    assert stem.wait_for_task(stem.enqueue("typed")).result == {"when": "2026-12-07", "price": "1.50",
                                                                 "pair": [1, 2]}


def test_eager_arguments_that_do_not_fit_fail_once_as_bad_arguments():
    registry = TaskRegistry()
    registry.task("greet", options=TaskOptions(max_retries=3))(lambda ctx, name: name)
    stem = EagerStem(registry)
    status = stem.wait_for_task(stem.enqueue("greet", {"nmae": "x"}), timeout=1)
    assert status.state is TaskState.FAILED and status.reason == "bad-arguments" and status.attempt == 0
