"""Typed task handles at run time: ``stem.call(handle, ...)``, ``TaskRef``, and the handle
that stays the function.  The type checker's side is tests/test_typing.py."""

from __future__ import annotations

import asyncio
import inspect
import pickle

import msgspec
import pytest

from stem import (AsyncStem, AsyncTaskRef, ShutdownMode, Stem, TaskContext, TaskHandle, TaskOptions, TaskRef,
                  TaskRegistry, TaskState, Worker, WorkerLifecycleConfig)
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.envelope import decode_frame
from stem.errors import InvalidTaskOptionsError, TaskFailedError, TaskTimeoutError, UnknownTaskError
from stem.handles import AsyncTaskHandle, SyncTaskHandle
from stem.task import FunctionTaskHandler, load_registry
from tests.apps import typed
from tests.apps.typed import add, anything, clash, double, fail, greet

NO_SIGNALS = WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5, force_shutdown_after=5)


@pytest.fixture
def stem():
    return Stem(InMemoryBroker(), InMemoryResultBackend(), typed.registry)


@pytest.fixture
def workers():
    started: list[Worker] = []
    yield started
    for w in started:
        w.shutdown(ShutdownMode.HARD, timeout=15)


def start_worker(stem: Stem, workers: list[Worker], registry=typed.registry, **kw) -> Worker:
    kw.setdefault("concurrency", 2)
    kw.setdefault("isolation", "inline")
    w = Worker(stem.broker, stem.backend, registry, lifecycle=NO_SIGNALS, **kw)
    workers.append(w)
    return w.run_in_background()


def published(stem: Stem, queue: str = "default"):
    deliveries = stem.broker.consume([queue], 10, 1.0)
    return [decode_frame(d.frame) for d in deliveries]


def same_task(a, b) -> bool:
    """Two envelopes equal but for what each publish makes anew (its id and time)."""
    fields = lambda e: {**msgspec.structs.asdict(e), "id": None, "root_id": None, "enqueued_at": None}  # noqa: E731
    return fields(a) == fields(b)


# -- stem.call publishes what enqueue publishes ---------------------------------------------------
def test_a_call_publishes_the_same_task_as_enqueue_with_the_arguments_under_their_names(stem):
    ref = stem.call(add, 2, b=3)
    tid = stem.enqueue("typed.add", {"a": 2, "b": 3})
    by_call, by_name = published(stem)
    assert isinstance(ref, TaskRef) and ref.id == by_call.id != tid == by_name.id
    assert by_call.args == {"a": 2, "b": 3} and same_task(by_call, by_name)


@pytest.mark.parametrize("call, args", [
    (lambda s: s.call(add, 1, 2), {"a": 1, "b": 2}),
    (lambda s: s.call(add, 1), {"a": 1}),                             # a default stays the function's
    (lambda s: s.call(add, b=2, a=1), {"a": 1, "b": 2}),
    (lambda s: s.call(greet, "ada", loud=True), {"name": "ada", "loud": True}),
    (lambda s: s.call(anything, 1, x=2, y=3), {"first": 1, "x": 2, "y": 3}),   # **rest takes any name
    (lambda s: s.call(clash, 5, "o", handle="h"), {"countdown": 5, "options": "o", "handle": "h"}),
])
def test_positional_arguments_go_under_the_parameter_names_in_order(stem, call, args):
    call(stem)
    [env] = published(stem)
    assert env.args == args


@pytest.mark.parametrize("call, fragment", [
    (lambda s: s.call(add, 1, c=2), "no argument 'c'"),
    (lambda s: s.call(greet, nmae="x"), "no argument 'nmae'; did you mean 'name'"),
    (lambda s: s.call(add, 1, 2, 3), "takes 2 positional argument.*3 given"),
    (lambda s: s.call(greet, "ada", True), "takes 1 positional"),     # loud is keyword-only
    (lambda s: s.call(add, b=1), r"missing argument\(s\) \['a'\]"),
    (lambda s: s.call(add, 1, a=1), "two values for argument 'a'"),
    (lambda s: s.call("typed.add", 1), "takes a task handle.*enqueue\\(name, args\\)"),
    (lambda s: s.call(add.handler, 1), "takes a task handle"),
    (lambda s: s.call(add.with_options(countdown=-1), 1), "countdown"),   # enqueue's own checks still run
    (lambda s: s.call(add.with_options(on_duplicate="ignore"), 1), "on_duplicate"),
])
def test_arguments_the_function_cannot_take_are_refused_before_anything_is_published(stem, call, fragment):
    with pytest.raises(InvalidTaskOptionsError, match=fragment):
        call(stem)
    assert stem.broker.stats("default").ready == 0


def test_a_function_with_positional_only_parameters_cannot_be_called_by_name(stem):
    registry = TaskRegistry()
    handle = registry.task("posonly")(lambda ctx, x, /: x)
    with pytest.raises(InvalidTaskOptionsError, match=r"positional-only.*fn\(ctx, \*\*args\)"):
        Stem(stem.broker, None, registry).call(handle, 1)
    assert stem.broker.stats("default").ready == 0


def test_a_handle_of_a_task_the_producers_registry_lacks_is_refused(stem):
    other = TaskRegistry()
    handle = other.task("only.elsewhere")(lambda ctx: None)
    with pytest.raises(UnknownTaskError, match="only.elsewhere"):
        stem.call(handle)
    stem_without_registry = Stem(stem.broker, None)
    assert stem_without_registry.call(handle).id == published(stem)[0].id


# -- enqueue options: bound to the handle, never mixed with the task's arguments --------------------
def test_with_options_binds_enqueue_options_and_leaves_the_handle_as_it_was(stem):
    slow = clash.with_options(TaskOptions(queue="slow", priority=3), meta={"trace": "t"}, countdown=0)
    later = slow.with_options(headers={"h": "v"}, meta={"trace": "u"})       # stacked: later wins per keyword
    assert isinstance(later, SyncTaskHandle) and later.name == clash.name and later.handler is clash.handler
    stem.call(later, countdown=7, options="mine")
    stem.call(clash, 1, "x")
    [env] = published(stem, "slow")
    assert (env.args, env.priority, env.meta, env.headers) == (
        {"countdown": 7, "options": "mine"}, 3, {"trace": "u"}, {"h": "v"})
    [plain] = published(stem)
    assert (plain.queue, plain.meta, plain.args) == ("default", {}, {"countdown": 1, "options": "x"})
    assert later(TaskContext("id", "n"), 1, "o") == [1, "o", ""]              # still the function


def test_with_options_task_id_makes_a_call_idempotent(stem):
    once = add.with_options(task_id="order-42", on_duplicate="return")
    first, second = stem.call(once, 1), stem.call(once, 2)
    assert first.id == second.id == "order-42"
    assert [e.args for e in published(stem)] == [{"a": 1}]


# -- TaskRef: status and typed result, end to end with a real worker -------------------------------
def test_task_ref_result_returns_the_functions_result_from_a_worker(stem, workers):
    ref = stem.call(add, 2, 3)
    assert ref.status().state is TaskState.PENDING
    start_worker(stem, workers)
    assert ref.result(timeout=20) == 5
    assert ref.status().state is TaskState.SUCCEEDED
    assert stem.call(greet, "ada", loud=True).result(timeout=20) == "HELLO ADA"
    assert stem.call(double, 21).result(timeout=20) == 42                    # an async def's result
    assert repr(ref) == f"TaskRef('typed.add', id={ref.id!r})"


def test_task_ref_result_raises_task_failed_error_with_the_status(stem, workers):
    start_worker(stem, workers)
    ref = stem.call(fail, "planned")
    with pytest.raises(TaskFailedError, match=r"typed.fail .*failed: RuntimeError: planned") as info:
        ref.result(timeout=20)
    assert info.value.status.state is TaskState.FAILED and info.value.status.id == ref.id


def test_task_ref_result_raises_task_failed_error_for_a_revoked_task(stem, workers):
    ref = stem.call(add, 1)
    stem.revoke(ref.id)
    start_worker(stem, workers)
    with pytest.raises(TaskFailedError, match="was revoked") as info:
        ref.result(timeout=20)
    assert info.value.status.state is TaskState.REVOKED


def test_task_ref_result_raises_task_failed_error_for_a_dead_lettered_task(stem, workers):
    elsewhere = TaskRegistry().task("only.elsewhere")(lambda ctx: None)
    ref = Stem(stem.broker, stem.backend).call(elsewhere)      # no registry here: the worker's lacks it
    start_worker(stem, workers)
    with pytest.raises(TaskFailedError, match=r"only.elsewhere .*dead-lettered \(unknown-task\)") as info:
        ref.result(timeout=20)
    assert info.value.status.state is TaskState.DEAD


def test_task_ref_result_raises_task_timeout_error_when_the_task_does_not_end(stem):
    ref = stem.call(add, 1)                        # no worker: it stays queued
    with pytest.raises(TaskTimeoutError, match=ref.id):
        ref.result(timeout=0.05)


def test_async_stem_call_returns_an_async_task_ref(stem, workers):
    start_worker(stem, workers)

    async def main():
        astem = AsyncStem(stem)
        ref = await astem.call(add, 4, b=5)
        assert isinstance(ref, AsyncTaskRef)
        assert await ref.result(timeout=20) == 9
        assert (await ref.status()).state is TaskState.SUCCEEDED
        assert await (await astem.call(double, n=4)).result(timeout=20) == 8
        with pytest.raises(InvalidTaskOptionsError, match="no argument 'c'"):
            await astem.call(add, 1, c=2)
        with pytest.raises(TaskFailedError, match="planned"):
            await (await astem.call(fail, "planned")).result(timeout=20)

    asyncio.run(main())


# -- the handle is still the function, and the registry is unchanged ------------------------------
def test_the_handle_is_still_callable_as_the_function():
    ctx = TaskContext("t1", "typed.add")
    assert add(ctx, 1) == 11 and add(ctx, 1, b=2) == 3
    assert greet(ctx, "ada", loud=True) == "HELLO ADA"
    coroutine = double(ctx, 2)
    assert inspect.iscoroutine(coroutine) and asyncio.run(coroutine) == 4
    assert isinstance(add, SyncTaskHandle) and isinstance(double, AsyncTaskHandle)
    assert isinstance(add, TaskHandle)
    assert (add.__name__, add.__doc__, add.__module__) == ("add", "Add two numbers.", "tests.apps.typed")
    assert str(inspect.signature(add)) == "(ctx: 'TaskContext', a: 'int', b: 'int' = 10) -> 'int'"


def test_the_registry_still_holds_the_function_handler_the_worker_calls_by_name():
    handler = typed.registry.get("typed.add")
    assert type(handler) is FunctionTaskHandler and handler is add.handler is add.stem_handler
    assert handler.fn is add.__wrapped__ and handler.fn.stem_handler is handler
    assert handler(TaskContext("t", "typed.add"), a=1, b=2) == 3
    assert typed.undecorated_name.name == "tests.apps.typed.undecorated_name" in typed.registry
    assert typed.registry.get("typed.double").is_async


def test_the_string_name_api_is_unchanged(stem, workers):
    start_worker(stem, workers)
    status = stem.wait_for_task(stem.enqueue("typed.add", {"a": 1, "b": 1}), timeout=20)
    assert status.state is TaskState.SUCCEEDED and status.result == 2


# -- pickling and loading: the worker's registry paths --------------------------------------------
def test_a_handle_pickles_by_reference_and_a_bound_one_keeps_its_options():
    assert pickle.loads(pickle.dumps(add)) is add
    bound = pickle.loads(pickle.dumps(add.with_options(countdown=3, meta={"m": 1})))
    assert bound.handler is add.handler and dict(bound.enqueue_options) == {"countdown": 3, "meta": {"m": 1}}


def test_a_registry_of_handles_pickles_with_its_functions():
    loaded = pickle.loads(pickle.dumps(typed.registry))
    assert loaded.names() == typed.registry.names()
    handler = loaded.get("typed.add")
    assert handler.fn is add.__wrapped__ and not isinstance(handler.fn, TaskHandle)
    # a handler whose function its module holds as itself pickles as before
    plain = FunctionTaskHandler(published, "plain")
    assert pickle.loads(pickle.dumps(plain)).fn is published


def test_load_registry_by_module_attribute_gives_the_modules_handlers():
    assert load_registry("tests.apps.typed:registry").get("typed.greet") is greet.handler


def test_a_spawned_child_runs_a_call_with_the_pickled_registry(stem, workers):
    # start_method="spawn" pickles the registry object into each child (no module:attribute path)
    start_worker(stem, workers, registry=typed.registry, isolation="process", start_method="spawn", concurrency=1)
    assert stem.call(add, 20, b=22).result(timeout=30) == 42
    assert stem.call(double, 5).result(timeout=30) == 10
