"""Logging: component loggers, the running task on every record, text or JSON output.

stem logs through the standard ``logging`` module, one logger per component
(``stem.worker``, ``stem.signals``, ``stem.control``, ``stem.postgres``, and
``stem.task`` for the per-task DEBUG lines).  Nothing is configured on
import: an application configures logging, or calls :func:`configure`
(what ``stem worker --log-format json`` does).

The task context.  While a handler runs (a thread of the inline engine, or a
child process of the process engine) the execution path calls
:func:`run_in_task_context`, which makes the task current in a
``contextvars.ContextVar``.  :class:`TaskContextFilter` copies it onto every
record as ``task_id``, ``task_name``, ``task_attempt`` and ``worker_id``
(``None`` outside a task), so a handler's own ``logging.getLogger("app")``
lines say which task wrote them.  :func:`configure` puts the filter on its
handler; add it to your own handlers (or use it in ``dictConfig``) otherwise.

Per-task lines go to ``stem.task``, at the levels operators expect: a
retry is a WARNING with its reason, a failure an ERROR with the traceback, a
dead letter an ERROR with its reason, a success one INFO line with its run
time (the worker writes these as it settles; silence them with
``logging.getLogger("stem.task").setLevel(logging.WARNING)`` or
``stem worker -l WARNING`` when tens of thousands of tasks a second make the
INFO lines cost more than the tasks).  ``configure(level="DEBUG")`` (or
:func:`log_task_events`) adds each task's received / started / revoked lines.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
import traceback
from typing import IO, Any, Callable, NamedTuple

__all__ = ["configure", "TaskContextFilter", "JsonFormatter", "TextFormatter", "TaskLogContext", "current_task",
           "run_in_task_context", "enter_task_context", "task_extra", "add_task_hook", "remove_task_hook", "task_hooks", "log_task_events", "unconfigure"]

task_log = logging.getLogger("stem.task")

# (envelope, worker_id) of the task this thread / coroutine / process runs, or None.
_current: contextvars.ContextVar[tuple[Any, str | None] | None] = contextvars.ContextVar("stem_task", default=None)
# Called as hook(envelope) inside the task's own context before the handler runs
# (stem.tracing attaches the producer's trace context this way).
_hooks: tuple[Callable[[Any], None], ...] = ()


class TaskLogContext(NamedTuple):
    task_id: str
    task_name: str
    task_attempt: int
    worker_id: str | None


def current_task() -> TaskLogContext | None:
    """The task the calling code runs for, or None outside a task."""
    cur = _current.get()
    if cur is None:
        return None
    env, worker_id = cur
    return TaskLogContext(env.id, env.name, env.attempt, worker_id)


def run_in_task_context(envelope: Any, worker_id: str | None, fn: Callable[..., Any], /, *args: Any) -> Any:
    """``fn(*args)`` with ``envelope``'s task current for logging (and for task hooks).

    Called by the engines around each task; costs one ContextVar set/reset.
    With hooks registered, the task runs in a copy of the current context so
    whatever a hook attaches is gone when the task returns.
    """
    if _hooks:
        return contextvars.copy_context().run(_run_hooked, envelope, worker_id, fn, args)
    token = _current.set((envelope, worker_id))
    try:
        return fn(*args)
    finally:
        _current.reset(token)


def enter_task_context(envelope: Any, worker_id: str | None) -> None:
    """Make ``envelope``'s task current for the rest of this context (an asyncio
    task that runs only this task); hooks run too.  No reset: the context dies with it."""
    _current.set((envelope, worker_id))
    for hook in _hooks:
        _call_hook(hook, envelope)


def _run_hooked(envelope: Any, worker_id: str | None, fn: Callable[..., Any], args: tuple) -> Any:
    enter_task_context(envelope, worker_id)
    return fn(*args)


def _call_hook(hook: Callable[[Any], None], envelope: Any) -> None:
    try:
        hook(envelope)
    except Exception:  # noqa: BLE001 - observability never breaks a task
        logging.getLogger("stem.signals").exception("task hook %r raised; ignored", hook)


def add_task_hook(hook: Callable[[Any], None]) -> None:
    """Call ``hook(envelope)`` inside each task's context before it runs (in the
    process that runs it: children inherit hooks added before the worker starts)."""
    global _hooks
    if hook not in _hooks:
        _hooks = _hooks + (hook,)


def remove_task_hook(hook: Callable[[Any], None]) -> None:
    global _hooks
    _hooks = tuple(h for h in _hooks if h != hook)   # == : bound methods are new objects each time


def task_hooks() -> tuple[Callable[[Any], None], ...]:
    """The hooks ``add_task_hook`` registered, in order."""
    return _hooks


# -- records ----------------------------------------------------------------------------
class TaskContextFilter(logging.Filter):
    """Adds ``task_id``, ``task_name``, ``task_attempt``, ``worker_id`` to every record.

    Attributes already on the record (passed with ``extra=``) are kept.  Put it
    on a *handler* so it sees the records of every logger, not only one.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task_id", None) is None:
            cur = _current.get()
            if cur is None:
                record.task_id = record.task_name = record.task_attempt = None
                if not hasattr(record, "worker_id"):
                    record.worker_id = None
            else:
                env, worker_id = cur
                record.task_id = env.id
                record.task_name = env.name
                record.task_attempt = env.attempt
                record.worker_id = worker_id
        return True


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_CONTEXT = ("task_id", "task_name", "task_attempt", "worker_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, ``pid``, ``thread``, the task context when set, ``exc_info``
    (the formatted traceback) and any ``extra=`` fields (``str()`` of values JSON cannot carry)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "thread": record.threadName,
        }
        for key in _CONTEXT:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _CONTEXT and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger [pid] message``, then ``task=name[id]#attempt`` when a task runs."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None):
        super().__init__(fmt or "%(asctime)s %(levelname)-7s %(name)s [%(process)d] %(message)s", datefmt)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        task_id = getattr(record, "task_id", None)
        if task_id is None:
            return text
        line, sep, rest = text.partition("\n")
        return f"{line} task={record.task_name}[{task_id}]#{record.task_attempt}{sep}{rest}"


_handler: tuple[logging.Logger, logging.Handler] | None = None   # what configure() installed


def configure(level: int | str = "INFO", fmt: str = "text", *, stream: IO[str] | None = None,
              logger: str = "") -> logging.Handler:
    """Log ``level`` and up to ``stream`` (stderr) as ``fmt`` ("text" or "json").

    Configures ``logger`` (the root logger by default, so a handler's own
    loggers get the same format and the task context).  Calling it again
    replaces the handler it installed before.  At DEBUG it also turns on the
    per-task lines (:func:`log_task_events`).  Returns the handler.
    """
    global _handler
    if fmt not in ("text", "json"):
        from .errors import ConfigurationError
        raise ConfigurationError(f"log format must be 'text' or 'json', got {fmt!r}")
    if isinstance(level, str):
        name = level.upper()
        if not isinstance(logging.getLevelName(name), int):
            from .errors import ConfigurationError
            raise ConfigurationError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        level = logging.getLevelName(name)
    target = logging.getLogger(logger)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TaskContextFilter())
    if _handler is not None:
        _handler[0].removeHandler(_handler[1])
    target.addHandler(handler)
    target.setLevel(level)
    _handler = (target, handler)
    log_task_events(level <= logging.DEBUG)
    return handler


def unconfigure() -> None:
    """Undo ``configure``: remove the handler it installed and the per-task DEBUG lines."""
    global _handler
    if _handler is not None:
        _handler[0].removeHandler(_handler[1])
        _handler = None
    log_task_events(False)


# -- per-task DEBUG lines, from the signals ---------------------------------------------
def task_extra(env: Any) -> dict[str, Any]:
    return {"task_id": env.id, "task_name": env.name, "task_attempt": env.attempt, "queue": env.queue}


def _on_received(sender, envelope, **kw) -> None:
    task_log.debug("received %s[%s] from %s", envelope.name, envelope.id, envelope.queue, extra=task_extra(envelope))


def _on_prerun(sender, envelope, **kw) -> None:
    task_log.debug("started %s[%s] attempt %d", envelope.name, envelope.id, envelope.attempt,
                   extra=task_extra(envelope))


def _on_revoked(sender, envelope, reason=None, **kw) -> None:
    task_log.debug("revoked %s[%s] (%s)", envelope.name, envelope.id, reason, extra=task_extra(envelope))


def _receivers():
    from .signals import signals
    return ((signals.task_received, _on_received), (signals.task_prerun, _on_prerun),
            (signals.task_revoked, _on_revoked))


def log_task_events(enabled: bool = True) -> None:
    """Connect (or disconnect) the receivers that log a DEBUG line when a task is received,
    started or revoked, on ``stem.task`` (outcomes are logged by the worker as it settles)."""
    for signal, receiver in _receivers():
        if enabled:
            signal.connect(receiver)
        else:
            signal.disconnect(receiver)
