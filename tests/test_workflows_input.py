"""Durable workflows refuse bad input at the public entry points with a StemError subclass that
says what is wrong, before anything is stored or published; limits are enforced with an error
that names the fix."""

from __future__ import annotations

import pytest

from stem import Stem, TaskOptions, TaskRegistry
from stem.brokers import InMemoryBroker
from stem.errors import (ConfigurationError, DuplicateHandlerError, EncodeError, RunFinishedError, RunNotFoundError,
                         StemError, StepFailedError, UnknownWorkflowError, WorkflowError)
from stem.results import TaskState
from stem.workflows import StepRetry, Workflows
from stem.workflows.context import call_id, child_id
from stem.workflows.store import RUN_ID_MAX

from .wf_support import App, app  # noqa: F401 - fixtures


@pytest.mark.parametrize("kwargs, message", [
    ({"queue": "bad queue"}, "bad queue name"),
    ({"lease": 0}, "lease"),
    ({"sweep_interval": -1}, "sweep_interval"),
    ({"max_output_bytes": 10}, "max_output_bytes"),
    ({"max_journal": 1}, "max_journal"),
])
def test_workflows_refuses_bad_settings(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        Workflows(TaskRegistry(), **kwargs)


def test_workflows_needs_a_registry_and_one_per_registry():
    with pytest.raises(ConfigurationError, match="TaskRegistry"):
        Workflows("registry")  # type: ignore[arg-type]
    registry = TaskRegistry()
    Workflows(registry)
    with pytest.raises(DuplicateHandlerError):
        Workflows(registry)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_attempts": 0}, "max_attempts"),
    ({"max_attempts": 1.5}, "max_attempts"),
    ({"backoff": -1}, "backoff"),
    ({"backoff": 5, "max_backoff": 1}, "max_backoff"),
    ({"retry_on": ()}, "retry_on"),
    ({"retry_on": (KeyboardInterrupt,)}, "retry_on"),
    ({"retry_on": "ValueError"}, "retry_on"),
])
def test_step_retry_refuses_bad_values(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        StepRetry(**kwargs)


def test_step_retry_backs_off_exponentially_up_to_its_cap():
    retry = StepRetry(10, backoff=1.0, max_backoff=4.0)
    assert 0.5 <= retry.delay(1) <= 1.0 and 1.0 <= retry.delay(2) <= 2.0
    assert all(2.0 <= retry.delay(n) <= 4.0 for n in range(3, 40))


def test_declaring_refuses_duplicates_async_functions_and_bad_names(app):
    @app.wf.step(name="s")
    def s(ctx):
        return 1

    with pytest.raises(ConfigurationError, match="already declared"):
        app.wf.step(name="s")(lambda ctx: 2)
    with pytest.raises(ConfigurationError, match="step name"):
        app.wf.step(name="")(lambda ctx: 2)
    with pytest.raises(ConfigurationError, match="retry must be a StepRetry"):
        app.wf.step(retry=3)  # type: ignore[arg-type]

    async def coro(ctx):
        return 1

    with pytest.raises(ConfigurationError, match="async"):
        app.wf.step(coro)
    with pytest.raises(ConfigurationError, match="async"):
        app.wf.workflow("a")(coro)
    with pytest.raises(ConfigurationError, match="bad task name"):
        app.wf.workflow("bad name")
    with pytest.raises(ConfigurationError, match="version"):
        app.wf.workflow("ok", version="")

    @app.wf.workflow("w", version="1")
    def w(ctx):
        return 1

    with pytest.raises(ConfigurationError, match="already declared"):
        app.wf.workflow("w", version="1")(lambda ctx: 2)


def test_start_refuses_bad_input_before_storing_anything(app):
    @app.wf.workflow("w")
    def w(ctx, x=0):
        return x

    with pytest.raises(UnknownWorkflowError, match="unknown workflow 'nope'; declared: w"):
        app.wf.start(app.stem, "nope")
    assert isinstance(UnknownWorkflowError("x"), LookupError)
    with pytest.raises(ConfigurationError, match="run id"):
        app.wf.start(app.stem, "w", run_id="")
    with pytest.raises(ConfigurationError, match="run id"):
        app.wf.start(app.stem, "w", run_id="x" * (RUN_ID_MAX + 1))
    with pytest.raises(EncodeError, match="dict with str keys"):
        app.wf.start(app.stem, "w", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="msgpack"):
        app.wf.start(app.stem, "w", {"x": object()})
    small = App(max_output_bytes=100)
    small.wf.workflow("w")(lambda ctx, x: x)
    with pytest.raises(EncodeError, match="over the limit of 100 bytes"):
        small.wf.start(small.stem, "w", {"x": "y" * 200})
    with pytest.raises(ConfigurationError, match="result backend"):
        app.wf.start(Stem(InMemoryBroker(), None, app.registry), "w")
    assert app.store.runs() == [] and app.queued() == 0
    app.wf.start(app.stem, "w", run_id="taken")

    @app.wf.workflow("other")
    def other(ctx):
        return 2

    with pytest.raises(ConfigurationError, match="taken by a run of workflow 'w'"):
        app.wf.start(app.stem, "other", run_id="taken")


def test_send_refuses_bad_input_unknown_and_finished_runs(app):
    @app.wf.workflow("w")
    def w(ctx):
        return ctx.wait("go")

    app.wf.start(app.stem, "w", run_id="r")
    for topic in ("", "__call__", 5, "t" * 201):
        with pytest.raises(ConfigurationError, match="topic"):
            app.wf.send(app.stem, "r", topic, None)
    with pytest.raises(ConfigurationError, match="event id"):
        app.wf.send(app.stem, "r", "go", None, event_id="")
    with pytest.raises(EncodeError):
        app.wf.send(app.stem, "r", "go", object())
    with pytest.raises(RunNotFoundError, match="no workflow run 'ghost'"):
        app.wf.send(app.stem, "ghost", "go", None)
    assert app.store.events("r") == []
    app.wf.send(app.stem, "r", "go", "now")
    assert app.activate("r") == "succeeded"
    with pytest.raises(RunFinishedError, match="ended SUCCEEDED"):
        app.wf.send(app.stem, "r", "go", "too late")
    assert issubclass(RunFinishedError, WorkflowError) and issubclass(WorkflowError, StemError)


@pytest.mark.parametrize("body, error_type, message", [
    (lambda ctx: ctx.sleep(-1), "ConfigurationError", "a sleep's duration"),
    (lambda ctx: ctx.sleep("soon"), "ConfigurationError", "a sleep's duration"),
    (lambda ctx: ctx.wait("go", timeout=-5), "ConfigurationError", "a wait's timeout"),
    (lambda ctx: ctx.wait("__child__"), "ConfigurationError", "engine's own"),
    (lambda ctx: ctx.call(42), "ConfigurationError", "task name or a task handle"),
    (lambda ctx: ctx.call("bad name"), "ConfigurationError", "bad task name"),
    (lambda ctx: ctx.call("t", [1]), "EncodeError", "dict with str keys"),
    (lambda ctx: ctx.call("t", {"x": object()}), "EncodeError", "msgpack"),
    (lambda ctx: ctx.call("t", options={"queue": "q"}), "ConfigurationError", "TaskOptions"),
    (lambda ctx: ctx.call("t", options=TaskOptions(unique=True)), "ConfigurationError", "unique options"),
    (lambda ctx: ctx.start_child("nope"), "UnknownWorkflowError", "unknown workflow"),
    (lambda ctx: ctx.start_child(3.5), "ConfigurationError", "workflow name"),
    (lambda ctx: ctx.start_child("w", ["x"]), "EncodeError", "dict with str keys"),
    (lambda ctx: ctx.patched(""), "ConfigurationError", "patch name"),
    (lambda ctx: ctx.continue_as_new("x"), "EncodeError", "dict with str keys"),
    (lambda ctx: ctx.attempt, "WorkflowError", "only set inside a step"),
])
def test_bad_input_to_a_durable_call_fails_the_run_with_the_error(app, body, error_type, message):
    @app.wf.workflow("w")
    def w(ctx):
        return 1

    @app.wf.workflow("bad")
    def bad(ctx):
        return body(ctx)

    app.wf.start(app.stem, "bad", run_id="b")
    assert app.activate("b") == "failed"
    status = app.stem.get_status("b")
    assert status.state is TaskState.FAILED and status.error_type == error_type and message in status.error
    assert app.journal("b") == []                 # refused before the call took a position


def test_a_step_output_over_the_limit_fails_the_step_with_a_clear_error_at_once():
    app = App(max_output_bytes=1024)
    attempts = []

    @app.wf.step(retry=StepRetry(5, backoff=0.0))
    def big(ctx):
        attempts.append(1)
        return "x" * 2000

    @app.wf.workflow("w")
    def w(ctx):
        try:
            big(ctx)
        except StepFailedError as exc:
            return [exc.error_type, exc.error]

    app.wf.start(app.stem, "w", run_id="big")
    assert app.activate("big") == "succeeded"
    kind, message = app.stem.get_status("big").result
    assert kind == "EncodeError" and "over the limit of 1024 bytes" in message and "max_output_bytes" in message
    assert attempts == [1]                        # not retried: the same output would be refused again


def test_a_result_over_the_limit_or_not_encodable_fails_the_run():
    app = App(max_output_bytes=1024)

    @app.wf.workflow("huge")
    def huge(ctx):
        return "x" * 2000

    @app.wf.workflow("odd")
    def odd(ctx):
        return object()

    for name in ("huge", "odd"):
        app.wf.start(app.stem, name, run_id=name)
        assert app.activate(name) == "failed"
        assert app.stem.get_status(name).error_type == "EncodeError"


def test_the_journal_limit_fails_the_run_and_names_continue_as_new():
    app = App(max_journal=5)

    @app.wf.workflow("long")
    def long(ctx):
        for _ in range(10):
            ctx.now()
        return "never"

    @app.wf.workflow("careful")
    def careful(ctx):
        try:
            for _ in range(10):
                ctx.now()
        except Exception:  # noqa: BLE001 - the limit cannot be caught away
            return "caught"

    for name in ("long", "careful"):
        app.wf.start(app.stem, name, run_id=name)
        assert app.activate(name) == "failed"
        status = app.stem.get_status(name)
        assert status.error_type == "JournalLimitExceeded" and "continue_as_new" in status.error
        assert len(app.journal(name)) == 5


def test_a_workflow_whose_input_does_not_fit_its_parameters_fails(app):
    @app.wf.workflow("strict")
    def strict(ctx, a):
        return a

    app.wf.start(app.stem, "strict", {"b": 1}, run_id="s")
    assert app.activate("s") == "failed"
    assert app.stem.get_status("s").error_type == "TypeError"


def test_derived_ids_stay_within_the_run_id_limit_however_deep_they_nest():
    run_id = "r" * RUN_ID_MAX
    for _ in range(5):
        derived = child_id(run_id, 123456, 99999)
        assert len(derived) <= RUN_ID_MAX and derived.endswith(":w123456:e99999")
        run_id = derived
    assert len(call_id("r" * RUN_ID_MAX, 7, 3)) <= RUN_ID_MAX
    assert child_id("short", 1, 2) == "short:w1:e2" and call_id("short", 1, 2) == "short:c1:e2"
    assert child_id("a" * 150, 1, 2) != child_id("a" * 149 + "b", 1, 2)


def test_a_task_context_outside_a_worker_has_no_producer():
    from stem import TaskContext
    with pytest.raises(ConfigurationError, match="not attached to a worker"):
        TaskContext("id", "name").producer()


def test_the_signer_pickles_with_its_keys_for_a_worker_s_children():
    import pickle

    from stem.signing import PayloadSigner
    signer = PayloadSigner({"k1": b"s" * 32})
    copy = pickle.loads(pickle.dumps(signer))
    key_id, signature = copy.sign(b"body")
    signer.verify(key_id, signature, b"body")
    assert copy.key_ids == ("k1",) and copy.active_key == "k1"


def test_a_registry_with_workflows_pickles_for_a_spawned_child_by_reference():
    import pickle

    from tests.apps import wf as wfapp
    copy = pickle.loads(pickle.dumps(wfapp.registry))
    workflows = copy.get("stem.wf.activate").workflows
    assert workflows.definition("wf.order", "1") is wfapp.order
    assert workflows.queue == wfapp.wf.queue and workflows.limits == wfapp.wf.limits
    assert pickle.loads(pickle.dumps(wfapp.charge)) is wfapp.charge
