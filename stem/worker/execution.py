"""Running one handler and turning what happened into an ``Outcome``.

Shared by the inline engine (threads) and the child processes, so both report
successes, errors, retries and time limits the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback
from typing import Any

import msgspec

from ..errors import Retry, SoftTimeLimitExceeded, WorkerShutdown
from ..task import FunctionTaskHandler, TaskContext, TaskHandler

__all__ = ["Outcome", "OK", "ERROR", "RETRY", "run_handler", "run_handler_async", "apply_handler_options"]

OK, ERROR, RETRY = 0, 1, 2


class Outcome(msgspec.Struct, array_like=True):
    """What happened to one attempt.  ``reason`` is a short word for failures
    (``error``, ``bad-arguments``, ``soft-time-limit``, ``result-not-encodable``,
    ``shutdown`` ...).  ``retryable`` is False for an exception the handler's
    ``autoretry_for`` does not name: it fails at once, whatever ``max_retries`` says."""

    task_id: str
    kind: int
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None
    reason: str | None = None
    countdown: float | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    retryable: bool = True


def apply_handler_options(env: Any, handler: TaskHandler) -> bool:
    """Give ``env`` the handler's value of every option its producer left unset.

    The producer decides what it was told (enqueue options, then the handler's
    options when it has the registry); what it could not know, the worker that
    runs the handler decides, in the supervisor and in the child alike.  True
    when the visibility timeout changed (the lease must be renewed to it)."""
    options = handler.options
    vt_changed = False
    for field in env.unset_options:
        value = getattr(options, field, None)
        if value is None:
            continue
        if field == "expires":
            env.expires_at = env.enqueued_at + value
        else:
            if field == "visibility_timeout":
                vt_changed = value != env.visibility_timeout
            setattr(env, field, value)
    return vt_changed


_check_encoder = msgspec.msgpack.Encoder()


def _error(task_id: str, exc: BaseException, reason: str, started: float) -> Outcome:
    return Outcome(task_id, ERROR, None, str(exc) or type(exc).__name__, type(exc).__name__,
                   "".join(traceback.format_exception(exc)), reason, None, started, time.time())


def _finish(task_id: str, result: Any, started: float, check_result: bool) -> Outcome:
    if check_result:
        try:
            _check_encoder.encode(result)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            return Outcome(task_id, ERROR, None,
                           f"task returned a value msgpack cannot encode ({type(result).__name__}): {exc}",
                           "EncodeError", None, "result-not-encodable", None, started, time.time())
    return Outcome(task_id, OK, result, None, None, None, None, None, started, time.time())


def _bad_arguments(exc: BaseException, handler: TaskHandler, ctx: TaskContext, args: dict[str, Any]) -> bool:
    """True when ``exc`` is the TypeError of arguments that do not fit the handler: if
    they do not bind to its signature, the call cannot have started.  Checked only
    after a TypeError, so a task that runs pays nothing for it."""
    if not isinstance(exc, TypeError):
        return False
    fn = handler.fn if isinstance(handler, FunctionTaskHandler) else handler.run
    try:
        inspect.signature(fn).bind(ctx, **args)
    except TypeError:
        return True
    except ValueError:   # no signature to read (a builtin): cannot tell
        return False
    return False


def _exception(exc: BaseException, started: float, handler: TaskHandler, ctx: TaskContext,
               args: dict[str, Any]) -> Outcome:
    task_id = ctx.id
    if isinstance(exc, Retry):
        return Outcome(task_id, RETRY, None, exc.reason or "retry requested", "Retry", None, "retry",
                       exc.countdown, started, time.time())
    if isinstance(exc, SoftTimeLimitExceeded):
        return _error(task_id, exc, "soft-time-limit", started)
    if isinstance(exc, WorkerShutdown):
        return _error(task_id, exc, "shutdown", started)
    if _bad_arguments(exc, handler, ctx, args):
        out = _error(task_id, exc, "bad-arguments", started)
        out.retryable = False
        return out
    out = _error(task_id, exc, "error", started)
    autoretry = handler.options.autoretry_for
    if autoretry is not None and not isinstance(exc, autoretry):
        out.retryable = False
    return out


def run_handler(handler: TaskHandler, ctx: TaskContext, args: dict[str, Any],
                check_result: bool = True) -> Outcome:
    """Call a sync handler (or drive an async one to completion on a fresh loop)."""
    started = time.time()
    try:
        if handler.is_async:
            result = asyncio.run(handler.run(ctx, **args))
        else:
            result = handler.run(ctx, **args)
    except (Exception, Retry, SoftTimeLimitExceeded, WorkerShutdown) as exc:
        return _exception(exc, started, handler, ctx, args)
    return _finish(ctx.id, result, started, check_result)


async def run_handler_async(handler: TaskHandler, ctx: TaskContext, args: dict[str, Any],
                            check_result: bool = True) -> Outcome:
    """Await an async handler (sync handlers run in the loop's executor)."""
    started = time.time()
    try:
        if handler.is_async:
            result = await handler.run(ctx, **args)
        else:
            result = await asyncio.get_running_loop().run_in_executor(None, lambda: handler.run(ctx, **args))
    except (Exception, Retry, SoftTimeLimitExceeded, WorkerShutdown) as exc:
        return _exception(exc, started, handler, ctx, args)
    return _finish(ctx.id, result, started, check_result)

