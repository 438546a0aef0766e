"""Typed task handles: what ``@registry.task`` returns, and the ``TaskRef`` a call gives back.

A ``TaskHandle[P, R]`` is the decorated function, still callable exactly as it was
(``handle(ctx, 1, y=2)`` runs the function here, for unit tests), typed from its
signature ``(ctx, *P) -> R``, so that ``stem.call(handle, ...)`` is checked by mypy
or pyright against the function's own parameters.  Handlers are called by name
(``fn(ctx, **args)``), so a handle knows its parameter names, read once at
registration: ``arguments()`` turns a call's positional and keyword arguments into
the args dict ``enqueue`` publishes, and rejects what the function could not take
before anything is published.

The string-name API (``stem.enqueue("name", {...})``) and the registry (name ->
``FunctionTaskHandler``, what the worker runs) are unchanged: a handle is only a
typed front for its handler.

Pickling: a handle pickles by reference, as a function does (its module and
qualified name), and the function it wraps has the handle's name in its module, so
a ``FunctionTaskHandler`` (inside a pickled registry) pickles its function through
the handle when the module holds the handle under the function's name.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import pickle
import sys
from types import MappingProxyType
from typing import (TYPE_CHECKING, Any, Callable, Coroutine, Generic, Mapping, NamedTuple, ParamSpec, Protocol, Self,
                    TypeVar)

from .errors import InvalidTaskOptionsError, TaskFailedError
from .results import TaskState, TaskStatus

if TYPE_CHECKING:
    from .canvas import Signature
    from .task import FunctionTaskHandler, TaskContext, TaskOptions

__all__ = ["TaskHandle", "SyncTaskHandle", "AsyncTaskHandle", "TaskRef", "AsyncTaskRef", "published_function"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class _Params(NamedTuple):
    """A function's parameters after its context, as ``fn(ctx, **args)`` can be given them."""
    positional: tuple[str, ...]        # what positional arguments map to, in order
    keyword: frozenset[str]            # every name the function takes by keyword
    required: frozenset[str]           # names without a default
    var_keyword: bool                  # a **kwargs: any other name is taken too
    positional_only: tuple[str, ...]   # names fn(ctx, **args) can never fill


_UNREADABLE = _Params((), frozenset(), frozenset(), True, ())   # no signature (a builtin): names unchecked


def _params_of(fn: Callable[..., Any]) -> _Params:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return _UNREADABLE
    if params and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        params = params[1:]            # the TaskContext
    positional, keyword, required, positional_only = [], [], [], []
    var_keyword = False
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue                   # fn(ctx, **args) never fills it; extra positionals are refused
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY:
            positional_only.append(p.name)
        else:
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                positional.append(p.name)
            keyword.append(p.name)
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
    return _Params(tuple(positional), frozenset(keyword), frozenset(required), var_keyword, tuple(positional_only))


_NO_OPTIONS: Mapping[str, Any] = MappingProxyType({})


class TaskHandle(Generic[P, R]):
    """A registered function task: what ``stem.call`` takes, typed by the function's
    parameters after the context (``P``) and its result (``R``; an ``async def``'s is
    what it returns once awaited).  ``@registry.task`` makes a ``SyncTaskHandle`` or an
    ``AsyncTaskHandle``, callable exactly as the function they wrap.

    Enqueue options are bound with ``with_options`` rather than passed to ``call``, so
    they can never clash with the task's own argument names.  ``handler`` is the
    ``FunctionTaskHandler`` the registry holds under ``name``."""

    fn: Callable[..., Any]
    __qualname__: str

    def __init__(self, handler: "FunctionTaskHandler"):
        # first: it copies the function's __dict__, which must not override what follows
        functools.update_wrapper(self, handler.fn)  # type: ignore[arg-type]  # __name__, __doc__, __wrapped__
        self.handler = handler
        self.fn = handler.fn
        self.name: str = handler.name
        #: the keyword arguments ``Stem.call`` gives ``enqueue`` (bound by ``with_options``)
        self.enqueue_options: Mapping[str, Any] = _NO_OPTIONS
        self._params = _params_of(handler.fn)
        self._registered = self                      # what with_options copies: pickled by reference

    @property
    def stem_handler(self) -> "FunctionTaskHandler":
        """The handler, under the name ``@registry.task`` used to put on the function."""
        return self.handler

    def with_options(self, options: "TaskOptions | None" = None, *, meta: dict[str, Any] | None = None,
                     headers: dict[str, str] | None = None, countdown: float | None = None,
                     eta: float | None = None, task_id: str | None = None, on_duplicate: str | None = None,
                     idempotent_for: float | None = None) -> Self:
        """A handle of the same task whose calls are enqueued with these ``enqueue`` keyword
        arguments (``stem.call(send.with_options(countdown=5), to="a@b")``); what is given
        here replaces what this handle bound, the rest is kept.  Checked when called, by
        ``enqueue``, before anything is published."""
        given = {"options": options, "meta": meta, "headers": headers, "countdown": countdown, "eta": eta,
                 "task_id": task_id, "on_duplicate": on_duplicate, "idempotent_for": idempotent_for}
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)     # the parameters were read once, at registration
        bound.enqueue_options = MappingProxyType(
            {**self.enqueue_options, **{k: v for k, v in given.items() if v is not None}})
        return bound

    def s(self, *args: Any, previous_as: str | None = None, **kwargs: Any) -> "Signature":
        """A signature of this task for a canvas (``stem.canvas``): ``chain(fetch.s(url),
        parse.s())``.  The arguments are checked by name as ``call`` checks them, except
        that a required one may be left to ``previous_as`` (the predecessor's result,
        given under that name) or to the canvas; the options bound by ``with_options``
        come along."""
        from .canvas import Signature
        out = self.arguments(args, kwargs, complete=False)
        if previous_as is not None and previous_as not in self._params.keyword and not self._params.var_keyword:
            raise InvalidTaskOptionsError(f"task {self.name!r} has no argument {previous_as!r} to take the "
                                          "previous result")
        return Signature(self.name, dict(out), self.enqueue_options.get("options"), previous_as=previous_as)

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any], complete: bool = True) -> dict[str, Any]:
        """The args dict of a call (positional arguments under their parameter names);
        ``InvalidTaskOptionsError`` for what the function could not be called with
        (``complete=False``: required arguments may be missing)."""
        params = self._params
        if params.positional_only:
            raise InvalidTaskOptionsError(
                f"task {self.name!r} cannot be called by name: its parameters {list(params.positional_only)} "
                "are positional-only, and handlers are called fn(ctx, **args)")
        if not params.var_keyword:
            for key in kwargs:
                if key not in params.keyword:
                    close = difflib.get_close_matches(key, sorted(params.keyword), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise InvalidTaskOptionsError(
                        f"task {self.name!r} has no argument {key!r}{hint} "
                        f"(it takes: {', '.join(sorted(params.keyword)) or 'none'})")
        if args:
            if len(args) > len(params.positional):
                raise InvalidTaskOptionsError(
                    f"task {self.name!r} takes {len(params.positional)} positional argument(s) after the context "
                    f"({', '.join(params.positional) or 'none'}), {len(args)} given")
            out = dict(zip(params.positional, args))
            for key in kwargs:
                if key in out:
                    raise InvalidTaskOptionsError(f"task {self.name!r} got two values for argument {key!r}")
            out.update(kwargs)
        else:
            out = kwargs
        if complete and not params.required <= out.keys():
            missing = sorted(params.required - out.keys())
            raise InvalidTaskOptionsError(f"task {self.name!r} is missing argument(s) {missing}")
        return out

    def __reduce__(self) -> Any:
        if self._registered is self:
            # by reference, as a function: module.qualname must be this handle (pickle checks)
            name = getattr(self, "__qualname__", None)
            if name is None:
                raise pickle.PicklingError(f"{self!r} wraps a callable without a __qualname__: it cannot be pickled")
            return name
        return _rebind, (self._registered, dict(self.enqueue_options))

    def __repr__(self) -> str:
        bound = f", {dict(self.enqueue_options)}" if self.enqueue_options else ""
        return f"<TaskHandle {self.name!r}{bound}>"


class SyncTaskHandle(TaskHandle[P, R]):
    """The handle of a plain function: ``handle(ctx, ...)`` runs it and returns ``R``."""

    def __call__(self, ctx: "TaskContext", /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(ctx, *args, **kwargs)


class AsyncTaskHandle(TaskHandle[P, R]):
    """The handle of an ``async def``: ``handle(ctx, ...)`` returns its coroutine (of ``R``)."""

    def __call__(self, ctx: "TaskContext", /, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        return self.fn(ctx, *args, **kwargs)


def _rebind(handle: TaskHandle[P, R], enqueue_options: dict[str, Any]) -> TaskHandle[P, R]:
    return handle.with_options(**enqueue_options)


def published_function(fn: Callable[..., Any]) -> Any:
    """What to pickle for the function ``fn`` of a handler: ``fn`` itself, or the handle the
    module holds under its name (pickle finds a function by module and qualified name,
    and after ``@registry.task`` that name holds the handle)."""
    obj: Any = sys.modules.get(getattr(fn, "__module__", None) or "")
    for part in getattr(fn, "__qualname__", "").split("."):
        obj = getattr(obj, part, None)
    if isinstance(obj, TaskHandle) and obj.fn is fn:
        return obj
    return fn


def _failure(status: TaskStatus) -> TaskFailedError:
    if status.state is TaskState.FAILED:
        what = f"failed: {status.error_type}: {status.error}"
    elif status.state is TaskState.REVOKED:
        what = f"was revoked ({status.reason or 'revoke'})"
    else:
        what = f"was dead-lettered ({status.reason}): {status.error or ''}".rstrip(": ")
    return TaskFailedError(f"task {status.name or '?'} [{status.id}] {what}", status)


def _result_of(status: TaskStatus) -> Any:
    if status.state is TaskState.SUCCEEDED:
        return status.result
    raise _failure(status)


class _Producer(Protocol):
    def get_status(self, task_id: str) -> TaskStatus: ...

    def wait_for_task(self, task_id: str, timeout: float = 30.0) -> TaskStatus: ...


class _AsyncProducer(Protocol):
    async def get_status(self, task_id: str) -> TaskStatus: ...

    async def wait_for_task(self, task_id: str, timeout: float = 30.0) -> TaskStatus: ...


class TaskRef(Generic[T]):
    """A published task, from ``Stem.call``: its ``id``, and its result typed as the
    function's return (as the result backend decodes it: msgpack types)."""

    __slots__ = ("id", "name", "_stem")

    def __init__(self, stem: _Producer, task_id: str, name: str):
        self._stem = stem
        self.id = task_id
        self.name = name

    def status(self) -> TaskStatus:
        """The latest status (PENDING while the backend knows nothing of it)."""
        return self._stem.get_status(self.id)

    def result(self, timeout: float = 30.0) -> T:
        """Wait for the task to end and return its result; ``TaskFailedError`` (with the
        status) when it failed, was revoked or dead-lettered, ``TaskTimeoutError`` when it
        did not end within ``timeout`` seconds."""
        return _result_of(self._stem.wait_for_task(self.id, timeout))

    def __repr__(self) -> str:
        return f"TaskRef({self.name!r}, id={self.id!r})"


class AsyncTaskRef(Generic[T]):
    """``TaskRef`` for ``AsyncStem.call``: ``await ref.status()``, ``await ref.result(timeout)``."""

    __slots__ = ("id", "name", "_stem")

    def __init__(self, stem: _AsyncProducer, task_id: str, name: str):
        self._stem = stem
        self.id = task_id
        self.name = name

    async def status(self) -> TaskStatus:
        return await self._stem.get_status(self.id)

    async def result(self, timeout: float = 30.0) -> T:
        """As ``TaskRef.result``, awaited."""
        return _result_of(await self._stem.wait_for_task(self.id, timeout))

    def __repr__(self) -> str:
        return f"AsyncTaskRef({self.name!r}, id={self.id!r})"
