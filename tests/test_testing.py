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
