"""Task handlers, their options, the context they run with, and the registry."""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Any, Callable, Concatenate, Coroutine, Iterator, ParamSpec, Protocol, TypeVar, overload

import msgspec

from . import _checks as checks
from .errors import ConfigurationError, DuplicateHandlerError, InvalidTaskOptionsError, Retry, UnknownTaskError
from .handles import AsyncTaskHandle, SyncTaskHandle, TaskHandle, published_function

__all__ = ["TaskOptions", "TaskContext", "TaskHandler", "FunctionTaskHandler", "TaskRegistry",
           "parse_rate_limit", "load_registry"]

P = ParamSpec("P")
R = TypeVar("R")

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
        "h": 3600.0, "hour": 3600.0}
MAX_PRIORITY = 9


def parse_rate_limit(text: str) -> float:
    """'10/s', '100/m', '1000/h' -> tasks per second."""
    m = _RATE.match(text) if isinstance(text, str) else None
    if not m or float(m.group(1)) <= 0:
        raise InvalidTaskOptionsError(
            f"bad rate_limit {text!r}: use '<count>/<s|m|h>', e.g. '10/s' or '100/m'")
    return float(m.group(1)) / _PER[m.group(2)]


class TaskOptions(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Per-task settings.  ``None`` means "not set here": options given to
    ``enqueue`` override the handler's, which override the defaults
    (``merged()``).  Durations are float seconds.

    Retries: a task that raises is retried up to ``max_retries`` times.  With
    ``autoretry_for`` (an exception class or a tuple of them) only those
    exceptions are retried; any other fails at once.  ``retry_backoff`` (base
    seconds) and ``retry_backoff_max`` give the task its own exponential
    backoff with jitter instead of the worker's retry strategy.

    Results: a SUCCEEDED status lives ``result_ttl`` seconds in the result
    backend, a FAILED, DEAD or REVOKED one ``failure_ttl`` (default: the
    result's lifetime); unset, the backend's ``result_expires``.  With
    ``ignore_result=True`` the worker stores no status for a success (nor any
    RUNNING, progress or RETRYING status), so ``wait_for_task`` on the task times
    out; its failures are still stored.

    Limits (``stem.limits``, enforced by the broker before a lease, for the whole cluster):
    ``rate_limit`` ("10/s", "100/m", "1000/h") with ``burst`` (leases at once after an idle
    spell; default: one plus a tenth of a second's worth, ``stem.limits.default_burst``) per
    ``rate_key``; ``concurrency_limit`` tasks running at once per
    ``concurrency_key``.  A key is a str (shared by every task naming it), a list of argument
    names (one key per value: the task name and those values) or a callable ``(args,
    headers) -> str``; unset, the task name.  ``rate_scope="worker"`` instead keeps a token
    bucket in each worker process (no key, no burst).

    Display: the worker keeps a task's arguments in its statuses for the dashboard and
    ``stem result`` (``TaskStatus.args``), with the values of secret-looking names
    (password, token, api_key, ...) hidden and large values cut (``stem.redact``).
    ``redact`` (an option of the handler) hides more: a list of argument names (hidden at
    any depth, besides the secret-looking ones), or a callable ``args -> dict | None``
    whose result is what is kept instead (None: no arguments at all; it replaces the
    name rule, and must not change ``args``)."""

    queue: str | None = None
    max_retries: int | None = None
    soft_time_limit: float | None = None
    hard_time_limit: float | None = None
    visibility_timeout: float | None = None
    priority: int | None = None
    rate_limit: str | None = None
    rate_key: Any = None              # str, list of argument names, or callable (args, headers) -> str
    burst: int | None = None          # leases at once after an idle spell (default: stem.limits.default_burst)
    rate_scope: str | None = None     # "global" (default) or "worker"
    concurrency_limit: int | None = None
    concurrency_key: Any = None       # as rate_key
    unique: bool | None = None
    unique_for: float | None = None
    unique_key: Any = None            # tuple of argument names, or a callable of the args dict
    unique_until: str | None = None   # "finished" (default) or "started"
    acks_late: bool | None = None
    isolation: str | None = None
    expires: float | None = None
    # the handler's own retry policy (options of a handler, not of one enqueue)
    autoretry_for: tuple[type[BaseException], ...] | None = None
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    # how long its statuses live in the result backend, and whether a success stores one
    result_ttl: float | None = None
    failure_ttl: float | None = None
    ignore_result: bool | None = None
    # what statuses and the dashboard show of the args (an option of the handler)
    redact: Any = None                # tuple of argument names, or a callable args -> dict | None

    def __post_init__(self) -> None:
        if self.queue is not None:
            checks.queue_name(self.queue, error=InvalidTaskOptionsError)
        if self.max_retries is not None:
            checks.integer("max_retries", self.max_retries, minimum=0, error=InvalidTaskOptionsError)
        for name in ("soft_time_limit", "hard_time_limit", "visibility_timeout", "unique_for", "expires",
                     "result_ttl", "failure_ttl"):
            checks.optional_seconds(name, getattr(self, name), error=InvalidTaskOptionsError)
        if (self.soft_time_limit is not None and self.hard_time_limit is not None
                and self.soft_time_limit >= self.hard_time_limit):
            raise InvalidTaskOptionsError(
                f"soft_time_limit ({self.soft_time_limit}) must be below hard_time_limit ({self.hard_time_limit})")
        if self.priority is not None:
            checks.integer("priority", self.priority, minimum=0, maximum=MAX_PRIORITY, error=InvalidTaskOptionsError)
        if self.rate_limit is not None or self.concurrency_limit is not None or self.rate_key is not None \
                or self.burst is not None or self.rate_scope is not None or self.concurrency_key is not None:
            from .limit_options import check_limit_options
            check_limit_options(self)
        if self.isolation is not None and self.isolation not in ("process", "inline"):
            raise InvalidTaskOptionsError(f"isolation must be 'process' or 'inline', got {self.isolation!r}")
        for name in ("unique", "acks_late", "ignore_result"):
            if getattr(self, name) is not None:
                checks.flag(name, getattr(self, name), error=InvalidTaskOptionsError)
        for name in ("unique_for", "unique_key", "unique_until"):
            if getattr(self, name) is not None and not self.unique:
                raise InvalidTaskOptionsError(f"{name} needs unique=True")
        if self.unique_until is not None and self.unique_until not in UNIQUE_UNTIL:
            raise InvalidTaskOptionsError(f"unique_until must be one of {UNIQUE_UNTIL}, got {self.unique_until!r}")
        if self.unique_key is not None and not callable(self.unique_key):
            names = self.unique_key
            if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names or not all(
                    isinstance(n, str) and n for n in names):
                raise InvalidTaskOptionsError(
                    "unique_key must be a non-empty list of argument names or a callable of the args, "
                    f"got {names!r}")
            msgspec.structs.force_setattr(self, "unique_key", tuple(names))   # hashable, like the rest
        if self.redact is not None and not callable(self.redact):
            names = self.redact
            if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)) or not all(
                    isinstance(n, str) and n for n in names):
                raise InvalidTaskOptionsError(
                    "redact must be a list of argument names or a callable args -> dict | None, "
                    f"got {names!r}")
            msgspec.structs.force_setattr(self, "redact", tuple(sorted(names) if isinstance(names, (set, frozenset))
                                                                else names))
        if self.autoretry_for is not None:
            kinds = self.autoretry_for
            if isinstance(kinds, type):
                kinds = (kinds,)
                msgspec.structs.force_setattr(self, "autoretry_for", kinds)
            if not isinstance(kinds, tuple) or not all(
                    isinstance(k, type) and issubclass(k, BaseException) for k in kinds):
                raise InvalidTaskOptionsError(
                    f"autoretry_for must be an exception class or a tuple of them, got {self.autoretry_for!r}")
        checks.optional_seconds("retry_backoff", self.retry_backoff, inclusive=True, error=InvalidTaskOptionsError)
        checks.optional_seconds("retry_backoff_max", self.retry_backoff_max, error=InvalidTaskOptionsError)
        if self.retry_backoff_max is not None and self.retry_backoff is None:
            raise InvalidTaskOptionsError("retry_backoff_max needs retry_backoff")
        if (self.retry_backoff_max is not None and self.retry_backoff is not None
                and self.retry_backoff_max < self.retry_backoff):
            raise InvalidTaskOptionsError(
                f"retry_backoff_max ({self.retry_backoff_max}) must be >= retry_backoff ({self.retry_backoff})")

    def merged(self, fallback: "TaskOptions | None") -> "TaskOptions":
        """These options, with unset fields taken from ``fallback``."""
        if fallback is None:
            return self
        changes = {f: getattr(fallback, f) for f in self.__struct_fields__
                   if getattr(self, f) is None and getattr(fallback, f) is not None}
        if self.unique is False:     # opted out of the fallback's unique: its key settings go with it
            for f in ("unique_for", "unique_key", "unique_until"):
                changes.pop(f, None)
        return msgspec.structs.replace(self, **changes) if changes else self

    @property
    def rate_per_second(self) -> float | None:
        return None if self.rate_limit is None else parse_rate_limit(self.rate_limit)


#: What ``TaskOptions.unique_until`` takes: the key is held until the task ends, or until it starts.
UNIQUE_UNTIL = ("finished", "started")

#: The option fields a producer without the registry leaves for the worker to fill from
#: its handler when the caller did not set them (``Envelope.unset_options``): those the
#: producer would otherwise fill with a default, so the worker could not tell "not set".
HANDLER_FILLED = ("max_retries", "soft_time_limit", "hard_time_limit", "visibility_timeout", "expires")

#: The result options (``result_ttl``, ``failure_ttl``, ``ignore_result``) have no default,
#: so they need no ``unset_options`` entry: their Envelope fields hold None when neither
#: the enqueue nor (with the registry) the handler set them, and the worker fills every
#: None from its handler (``stem.worker.execution.apply_result_options``).
RESULT_OPTIONS = ("result_ttl", "failure_ttl", "ignore_result")

DEFAULT_OPTIONS = TaskOptions(queue="default", max_retries=0, priority=0, acks_late=True)


class TaskRuntime(Protocol):
    """What a running task can ask of the worker that runs it (thread or child process)."""

    def heartbeat(self, task_id: str) -> None: ...

    def progress(self, task_id: str, fraction: float, data: Any) -> None: ...

    def enqueue(self, name: str, args: dict[str, Any] | None, options: TaskOptions | None,
                parent: "TaskContext") -> str: ...

    def group_results(self, group_id: str) -> Any: ...

    def producer(self) -> Any: ...


class TaskContext:
    """Handed to every handler as its first argument."""

    __slots__ = ("id", "name", "attempt", "meta", "headers", "queue", "max_retries", "root_id",
                 "_runtime", "_canvas")

    def __init__(self, id: str, name: str, attempt: int = 0, meta: dict | None = None,
                 headers: dict | None = None, queue: str = "default", max_retries: int = 0,
                 root_id: str | None = None, runtime: TaskRuntime | None = None, canvas: dict | None = None):
        self.id = id
        self.name = name
        self.attempt = attempt
        self.meta = meta if meta is not None else {}
        self.headers = headers if headers is not None else {}
        self.queue = queue
        self.max_retries = max_retries
        self.root_id = root_id or id
        self._runtime = runtime
        self._canvas = canvas

    @property
    def previous(self) -> Any:
        """The predecessor's result in a canvas (``stem.canvas``): a chain step's is the
        step before's result; a chord callback's (or the step after a group's) the
        members' results as a sequence in input order, read from the result backend
        page by page as it is iterated (``stem.canvas.GroupResults``).  None outside
        a canvas, or for the first step."""
        canvas = self._canvas
        if not canvas:
            return None
        if "pg" in canvas:
            if self._runtime is None:
                raise ConfigurationError("this TaskContext is not attached to a worker; cannot read group results")
            return self._runtime.group_results(canvas["pg"])
        return canvas.get("pv")

    def heartbeat(self) -> None:
        """Tell the worker this task is alive: extends the delivery's lease now."""
        if self._runtime is not None:
            self._runtime.heartbeat(self.id)

    def progress(self, fraction: float, data: Any = None) -> None:
        """Record progress (0.0 .. 1.0) in the result backend; also a heartbeat."""
        if not 0.0 <= float(fraction) <= 1.0:
            raise InvalidTaskOptionsError(f"progress fraction must be within 0..1, got {fraction!r}")
        if self._runtime is not None:
            self._runtime.progress(self.id, float(fraction), data)

    def retry(self, countdown: float | None = None, reason: str | None = None) -> "Retry":
        """Stop this attempt and run the task again after ``countdown`` seconds
        (default: the worker's retry strategy), counting against ``max_retries``."""
        raise Retry(countdown, reason)

    def enqueue(self, name: str, args: dict[str, Any] | None = None, *,
                options: TaskOptions | None = None) -> str:
        """Enqueue a child task (its parent_id is this task, its root_id this task's root)."""
        if self._runtime is None:
            raise ConfigurationError("this TaskContext is not attached to a worker; cannot enqueue")
        return self._runtime.enqueue(name, args, options, self)

    def producer(self) -> Any:
        """A producer (``stem.Stem``, without a registry) on the broker, result backend and
        signer of the worker running this task, for what ``enqueue`` does not cover
        (explicit ids, countdowns, reading statuses).  In a worker's child it opens its own
        connections on first use, which needs a broker and a backend other processes can
        reach (not ``memory://``)."""
        producer = getattr(self._runtime, "producer", None)
        if producer is None:
            raise ConfigurationError("this TaskContext is not attached to a worker; it has no producer")
        return producer()

    def __repr__(self) -> str:
        return f"TaskContext(id={self.id!r}, name={self.name!r}, attempt={self.attempt})"


class TaskHandler:
    """Class form of a task: set ``name`` (and ``options``) and implement ``run``."""

    name: str = ""
    options: TaskOptions = TaskOptions()

    def run(self, ctx: TaskContext, **args: Any) -> Any:
        raise NotImplementedError

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.run)

    def __call__(self, ctx: TaskContext, **args: Any) -> Any:
        return self.run(ctx, **args)


class FunctionTaskHandler(TaskHandler):
    """Wraps ``fn(ctx, **args)`` (plain or ``async def``)."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None, options: TaskOptions | None = None):
        if not callable(fn):
            raise InvalidTaskOptionsError(f"task handler {fn!r} is not callable")
        self.fn = fn
        self.name = name or f"{fn.__module__}.{fn.__qualname__}"
        self.options = options if options is not None else TaskOptions()
        self._is_async = inspect.iscoroutinefunction(fn)

    @property
    def is_async(self) -> bool:
        return self._is_async

    def run(self, ctx: TaskContext, **args: Any) -> Any:
        return self.fn(ctx, **args)

    def __getstate__(self) -> dict[str, Any]:
        # after @registry.task the function's module holds its handle under its name, where
        # pickle looks the function up; the handle pickles by reference and gives it back
        return {**self.__dict__, "fn": published_function(self.fn)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        fn = state["fn"]
        self.__dict__.update(state, fn=fn.fn if isinstance(fn, TaskHandle) else fn)

    def __repr__(self) -> str:
        return f"FunctionTaskHandler({self.name!r})"


class TaskDecorator(Protocol):
    """What ``registry.task("name", options=...)`` returns: the decorator proper."""

    @overload
    def __call__(self, fn: Callable[Concatenate[TaskContext, P], Coroutine[Any, Any, R]],  # type: ignore[overload-overlap]
                 /) -> AsyncTaskHandle[P, R]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[TaskContext, P], R], /) -> SyncTaskHandle[P, R]: ...


class TaskRegistry:
    """Name -> handler.  Producers use it to validate names; workers to run them."""

    def __init__(self) -> None:
        self._handlers: dict[str, TaskHandler] = {}
        self._schedules: dict[str, Any] = {}

    def register(self, handler: TaskHandler) -> TaskHandler:
        if isinstance(handler, type):
            raise InvalidTaskOptionsError(
                f"register an instance, not the class: registry.register({handler.__name__}())")
        if not isinstance(handler, TaskHandler):
            raise InvalidTaskOptionsError(f"{handler!r} is not a TaskHandler")
        name = handler.name
        checks.task_name(name, error=InvalidTaskOptionsError)
        if not isinstance(handler.options, TaskOptions):
            raise InvalidTaskOptionsError(f"task {name!r}: options must be a TaskOptions")
        if name in self._handlers:
            raise DuplicateHandlerError(f"task {name!r} is already registered ({self._handlers[name]!r})")
        self._handlers[name] = handler
        return handler

    @overload
    def task(self, name: Callable[Concatenate[TaskContext, P], Coroutine[Any, Any, R]], *,  # type: ignore[overload-overlap]
             options: TaskOptions | None = None) -> AsyncTaskHandle[P, R]: ...

    @overload
    def task(self, name: Callable[Concatenate[TaskContext, P], R], *,
             options: TaskOptions | None = None) -> SyncTaskHandle[P, R]: ...

    @overload
    def task(self, name: str | None = None, *, options: TaskOptions | None = None) -> "TaskDecorator": ...

    def task(self, name: Any = None, *, options: TaskOptions | None = None) -> Any:
        """Decorator: ``@registry.task("email.send", options=TaskOptions(max_retries=2))``.

        Returns a ``TaskHandle`` (``stem.handles``): still callable exactly as the
        function (unit tests keep calling ``fn(ctx, ...)``), typed from its signature
        for ``stem.call(handle, ...)``.  The handler is ``handle.handler`` (and, as
        before, ``fn.stem_handler`` on the function itself)."""
        if callable(name):
            return self.task(options=options)(name)

        def decorate(fn: Callable[..., Any]) -> TaskHandle[Any, Any]:
            handler = FunctionTaskHandler(fn, name, options)
            self.register(handler)
            try:
                fn.stem_handler = handler  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return AsyncTaskHandle(handler) if handler.is_async else SyncTaskHandle(handler)

        return decorate

    def schedule(self, schedule: Any) -> Any:
        """Declare a periodic task (a ``stem.schedules.Schedule``) run by ``stem beat`` and
        ``stem worker --beat`` with this registry; returns it.  Its task must be registered
        here first (a schedule of a task no worker of this registry could run is a typo),
        and its id must be new."""
        from .schedules import Schedule
        if not isinstance(schedule, Schedule):
            raise InvalidTaskOptionsError(f"registry.schedule takes a Schedule (stem.schedules), got {schedule!r}")
        if schedule.task not in self._handlers:
            raise UnknownTaskError(f"schedule {schedule.id!r}: {self._unknown_message(schedule.task)} "
                                   "(register the task before its schedule)")
        if schedule.id in self._schedules:
            raise ConfigurationError(f"a schedule with id {schedule.id!r} is already declared "
                                     f"(task {self._schedules[schedule.id].task!r}): schedule ids must be unique")
        self._schedules[schedule.id] = schedule
        return schedule

    @property
    def schedules(self) -> list[Any]:
        """The schedules declared with ``schedule()``, in declaration order."""
        return list(self._schedules.values())

    def signature(self, name: str, args: dict[str, Any] | None = None, options: TaskOptions | None = None, *,
                  previous_as: str | None = None) -> Any:
        """A ``stem.canvas.Signature`` of task ``name`` (which must be registered here)."""
        from .canvas import Signature
        self.get(name)
        return Signature(name, args, options, previous_as=previous_as)

    def get(self, name: str) -> TaskHandler:
        try:
            return self._handlers[name]
        except (KeyError, TypeError):
            raise UnknownTaskError(self._unknown_message(name)) from None

    def _unknown_message(self, name: str) -> str:
        known = sorted(self._handlers)
        msg = f"unknown task {name!r}"
        close = difflib.get_close_matches(str(name), known, n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        return msg + (f" registered: {shown}" if known else " (no tasks are registered)")

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __iter__(self) -> Iterator[TaskHandler]:
        return iter(self._handlers.values())

    def __len__(self) -> int:
        return len(self._handlers)

    def names(self) -> list[str]:
        return sorted(self._handlers)


def load_registry(path: str) -> TaskRegistry:
    """Import ``"package.module:attribute"`` (attribute defaults to ``registry``)."""
    import importlib
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in (attr or "registry").split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot load the task registry {path!r}: {exc}") from exc
    if not isinstance(obj, TaskRegistry):
        raise ConfigurationError(f"{path!r} is a {type(obj).__name__}, not a TaskRegistry")
    return obj
