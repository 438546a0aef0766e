"""Running one handler and turning what happened into an ``Outcome``.

Shared by the inline engine (threads) and the child processes, so both report
successes, errors, retries and time limits the same way.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import Any

import msgspec

from ..errors import Retry, SoftTimeLimitExceeded, WorkerShutdown
from ..task import TaskContext, TaskHandler

__all__ = ["Outcome", "OK", "ERROR", "RETRY", "run_handler", "run_handler_async"]

OK, ERROR, RETRY = 0, 1, 2


class Outcome(msgspec.Struct, array_like=True):
    """What happened to one attempt.  ``reason`` is a short word for failures
    (``error``, ``soft-time-limit``, ``result-not-encodable``, ``shutdown`` ...)."""

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


def _exception(task_id: str, exc: BaseException, started: float) -> Outcome:
    if isinstance(exc, Retry):
        return Outcome(task_id, RETRY, None, exc.reason or "retry requested", "Retry", None, "retry",
                       exc.countdown, started, time.time())
    if isinstance(exc, SoftTimeLimitExceeded):
        return _error(task_id, exc, "soft-time-limit", started)
    if isinstance(exc, WorkerShutdown):
        return _error(task_id, exc, "shutdown", started)
    return _error(task_id, exc, "error", started)


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
        return _exception(ctx.id, exc, started)
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
        return _exception(ctx.id, exc, started)
    return _finish(ctx.id, result, started, check_result)
