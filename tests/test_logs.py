"""stem.logs: the task context on records (both engines), JSON/text formatters, configure(), DEBUG task lines."""

from __future__ import annotations

import io
import json
import logging
import os
import time

import pytest

from stem import Stem, TaskOptions, TaskRegistry, Worker, WorkerLifecycleConfig
from stem import logs as stem_logs
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.envelope import Envelope
from stem.retry import FixedRetryStrategy
from .support import wait_until

NO_SIGNALS = WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5, force_shutdown_after=5)




class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(stem_logs.TaskContextFilter())

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def app_logger():
    """A logger only this test uses, at INFO, not propagating to the root."""
    logger = logging.getLogger(f"app.test.{os.getpid()}.{time.monotonic_ns()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


@pytest.fixture
def stack():
    registry = TaskRegistry()
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    workers = []

    class S:
        pass

    s = S()
    s.registry, s.broker, s.backend = registry, broker, backend
    s.stem = Stem(broker, backend, registry)

    def worker(isolation, **kw):
        w = Worker(broker, backend, registry, concurrency=kw.pop("concurrency", 2), isolation=isolation,
                   lifecycle=NO_SIGNALS, retry_strategy=FixedRetryStrategy(0.0), worker_id=kw.pop("worker_id", None),
                   **kw)
        workers.append(w)
        return w.run_in_background()

    s.worker = worker
    yield s
    for w in workers:
        w.shutdown(timeout=30)


# -- in-process (inline engine) ---------------------------------------------------------------
def test_records_inside_an_inline_task_carry_task_id_name_attempt_and_worker(stack, app_logger):
    handler = ListHandler()
    app_logger.addHandler(handler)

    @stack.registry.task("greet", options=TaskOptions(max_retries=1))
    def greet(ctx, who):
        app_logger.info("hello %s", who)
        if ctx.attempt == 0:
            raise ValueError("first attempt fails")
        return who

    stack.worker("inline", worker_id="w-inline")
    tid = stack.stem.enqueue("greet", {"who": "ann"})
    assert stack.stem.wait_for_task(tid, timeout=20).result == "ann"
    assert [(r.task_id, r.task_name, r.task_attempt, r.worker_id) for r in handler.records] == [
        (tid, "greet", 0, "w-inline"), (tid, "greet", 1, "w-inline")]


def test_records_outside_a_task_have_empty_task_fields(app_logger):
    handler = ListHandler()
    app_logger.addHandler(handler)
    app_logger.info("not in a task")
    r = handler.records[0]
    assert (r.task_id, r.task_name, r.task_attempt, r.worker_id) == (None, None, None, None)
    assert stem_logs.current_task() is None


def test_run_in_task_context_sets_and_resets_the_current_task():
    env = Envelope(id="t1", name="n", attempt=3)
    seen = stem_logs.run_in_task_context(env, "w1", stem_logs.current_task)
    assert seen == stem_logs.TaskLogContext("t1", "n", 3, "w1")
    assert stem_logs.current_task() is None


def test_extra_task_fields_on_a_record_are_kept(app_logger):
    handler = ListHandler()
    app_logger.addHandler(handler)
    stem_logs.run_in_task_context(Envelope(id="inner", name="n"), "w", lambda: app_logger.info(
        "x", extra={"task_id": "explicit", "task_name": "e", "task_attempt": 9}))
    assert (handler.records[0].task_id, handler.records[0].task_name) == ("explicit", "e")


def test_a_raising_task_hook_is_logged_and_the_task_still_runs(caplog):
    def broken(envelope):
        raise RuntimeError("hook bug")

    stem_logs.add_task_hook(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="stem.signals"):
            out = stem_logs.run_in_task_context(Envelope(id="t", name="n"), None, lambda: 42)
    finally:
        stem_logs.remove_task_hook(broken)
    assert out == 42
    assert "hook bug" in caplog.text
    assert stem_logs.task_hooks() == ()


# -- child processes (process engine) ----------------------------------------------------------
@pytest.fixture
def child_log(tmp_path, app_logger):
    """A JSON file handler configured before the worker starts: the children
    (forked from the zygote) inherit it and append one line per record."""
    path = tmp_path / "child.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(stem_logs.JsonFormatter())
    handler.addFilter(stem_logs.TaskContextFilter())
    app_logger.addHandler(handler)

    def lines():
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    return app_logger, lines


def test_records_inside_a_child_process_carry_the_task_context(stack, child_log):
    logger, lines = child_log

    @stack.registry.task("child.work", options=TaskOptions(max_retries=1))
    def work(ctx, n):
        logger.info("working on %d", n)
        if ctx.attempt == 0 and n == 0:
            raise ValueError("retry me")
        return os.getpid()

    stack.worker("process", worker_id="w-proc")
    ids = [stack.stem.enqueue("child.work", {"n": n}) for n in range(3)]
    pids = {stack.stem.wait_for_task(t, timeout=30).result for t in ids}
    assert os.getpid() not in pids
    assert wait_until(lambda: len(lines()) == 4)
    got = sorted((r["task_id"], r["task_name"], r["task_attempt"], r["worker_id"], r["message"]) for r in lines())
    expected = sorted([(ids[0], "child.work", 0, "w-proc", "working on 0"),
                       (ids[0], "child.work", 1, "w-proc", "working on 0"),
                       (ids[1], "child.work", 0, "w-proc", "working on 1"),
                       (ids[2], "child.work", 0, "w-proc", "working on 2")])
    assert got == expected
    assert {r["pid"] for r in lines()} <= pids


def test_async_tasks_in_a_concurrent_child_each_log_their_own_context(stack, child_log):
    logger, lines = child_log
    import asyncio

    @stack.registry.task("child.async")
    async def work(ctx, n):
        logger.info("start %d", n)
        await asyncio.sleep(0.05)      # the other coroutines run meanwhile
        logger.info("end %d", n)
        return n

    stack.worker("process", concurrency=1, child_concurrency=4)
    ids = [stack.stem.enqueue("child.async", {"n": n}) for n in range(4)]
    assert [stack.stem.wait_for_task(t, timeout=30).result for t in ids] == [0, 1, 2, 3]
    assert wait_until(lambda: len(lines()) == 8)
    for r in lines():
        n = int(r["message"].split()[1])
        assert r["task_id"] == ids[n], r


# -- formatters and configure ------------------------------------------------------------------
def _record(msg="m %s", args=("x",), exc_info=None, **extra):
    r = logging.LogRecord("stem.worker", logging.WARNING, __file__, 1, msg, args, exc_info)
    for k, v in extra.items():
        setattr(r, k, v)
    stem_logs.TaskContextFilter().filter(r)
    return r


def test_json_formatter_output_parses_with_context_extras_and_traceback():
    try:
        raise KeyError("k")
    except KeyError:
        import sys
        exc_info = sys.exc_info()
    env = Envelope(id="t9", name="mail.send", attempt=2)
    record = stem_logs.run_in_task_context(env, "w9", lambda: _record(exc_info=exc_info, order=7, obj=object()))
    out = json.loads(stem_logs.JsonFormatter().format(record))
    assert out["message"] == "m x" and out["level"] == "WARNING" and out["logger"] == "stem.worker"
    assert (out["task_id"], out["task_name"], out["task_attempt"], out["worker_id"]) == ("t9", "mail.send", 2, "w9")
    assert out["order"] == 7 and out["obj"].startswith("<object")
    assert "KeyError" in out["exc_info"]
    assert out["ts"].endswith("+00:00")


def test_json_formatter_leaves_out_task_fields_outside_a_task():
    out = json.loads(stem_logs.JsonFormatter().format(_record()))
    assert not {"task_id", "task_name", "task_attempt", "worker_id"} & set(out)


def test_text_formatter_appends_the_task_when_one_runs():
    fmt = stem_logs.TextFormatter("%(levelname)s %(message)s")
    assert fmt.format(_record()) == "WARNING m x"
    rec = stem_logs.run_in_task_context(Envelope(id="abc", name="n", attempt=1), None, _record)
    assert fmt.format(rec) == "WARNING m x task=n[abc]#1"


@pytest.fixture
def restore_logger():
    """configure() on a private logger; the handler it installs is removed afterwards."""
    name = f"stemtest.cfg.{time.monotonic_ns()}"
    yield name
    stem_logs.unconfigure()
    assert logging.getLogger(name).handlers == []


def test_configure_json_writes_json_and_replaces_its_own_handler(restore_logger):
    first, second = io.StringIO(), io.StringIO()
    stem_logs.configure("INFO", "json", stream=first, logger=restore_logger)
    stem_logs.configure("info", "json", stream=second, logger=restore_logger)
    logger = logging.getLogger(restore_logger)
    assert len(logger.handlers) == 1
    logger.info("hello %d", 5)
    logger.debug("not shown")
    assert first.getvalue() == ""
    lines = second.getvalue().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["message"] == "hello 5"


def test_configure_rejects_unknown_formats_and_levels(restore_logger):
    from stem.errors import ConfigurationError
    with pytest.raises(ConfigurationError, match="'text' or 'json'"):
        stem_logs.configure("INFO", "yaml", logger=restore_logger)
    with pytest.raises(ConfigurationError, match="unknown log level"):
        stem_logs.configure("LOUD", logger=restore_logger)


def test_task_outcomes_are_logged_at_the_levels_operators_expect(stack, restore_logger):
    stack.registry.task("noop")(lambda ctx: None)

    def boom(ctx):
        raise ValueError("no luck")

    stack.registry.task("boom", options=TaskOptions(max_retries=1))(boom)
    stream = io.StringIO()
    stem_logs.configure("INFO", "json", stream=stream, logger="stem.task")
    task_logger = logging.getLogger("stem.task")
    try:
        stack.worker("inline")
        ok = stack.stem.enqueue("noop")
        stack.stem.wait_for_task(ok, timeout=20)
        bad = stack.stem.enqueue("boom")
        assert stack.stem.wait_for_task(bad, timeout=20).state.value == "FAILED"
        assert wait_until(lambda: "failed (error)" in stream.getvalue())
        events = [json.loads(line) for line in stream.getvalue().splitlines()]
        by_task = {tid: [(e["level"], e["message"]) for e in events if e["task_id"] == tid] for tid in (ok, bad)}
        assert by_task[ok] == [("INFO", f"task noop[{ok}] succeeded in " + by_task[ok][0][1].rsplit(" ", 1)[1])]
        (retry_level, retry), (fail_level, failed) = by_task[bad]
        assert retry_level == "WARNING" and "failed (ValueError: no luck); retry 1 of 1" in retry
        assert fail_level == "ERROR" and f"task boom[{bad}] failed (error): ValueError: no luck" in failed
        assert "Traceback (most recent call last)" in failed and 'raise ValueError("no luck")' in failed

        stream.truncate(0)
        stream.seek(0)
        stem_logs.configure("DEBUG", "json", stream=stream, logger="stem.task")
        tid = stack.stem.enqueue("noop")
        stack.stem.wait_for_task(tid, timeout=20)
        assert wait_until(lambda: "succeeded" in stream.getvalue())
        events = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [e["message"].split()[0] for e in events] == ["received", "started", "task"]
        assert all(e["task_id"] == tid and e["task_name"] == "noop" for e in events)
    finally:
        for h in list(task_logger.handlers):
            task_logger.removeHandler(h)
        task_logger.setLevel(logging.NOTSET)


def test_the_startup_line_names_version_broker_without_password_queues_and_tasks(caplog):
    import stem as stem_pkg
    registry = TaskRegistry()
    registry.task("email.send")(lambda ctx: None)
    registry.task("report.build")(lambda ctx: None)
    broker = InMemoryBroker(url="memory://user:hunter2@startup-line")
    w = Worker(broker, InMemoryResultBackend(), registry, queues=["default", "reports"], concurrency=1,
               isolation="inline", lifecycle=NO_SIGNALS)
    with caplog.at_level(logging.INFO, logger="stem.worker"):
        w.run_in_background()
        w.shutdown(timeout=20)
    [line] = [r.getMessage() for r in caplog.records if " ready: " in r.getMessage()]
    assert f"stem {stem_pkg.__version__} worker {w.id} ready" in line
    assert "hunter2" not in line and "memory://user:***@startup-line" in line
    assert "queues=default,reports" in line and "tasks (2): email.send, report.build" in line
