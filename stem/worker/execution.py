"""Running one handler and turning what happened into an ``Outcome``.

Shared by the inline engine (threads) and the child processes, so both report
successes, errors, retries and time limits the same way.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import time
import traceback
from typing import Any

import msgspec

from ..errors import Retry, SoftTimeLimitExceeded, WorkerShutdown
from ..results import Reason, apply_result_options, check_result_options  # noqa: F401 - re-exported
from ..task import FunctionTaskHandler, TaskContext, TaskHandler

__all__ = ["Outcome", "OutcomeKind", "OK", "ERROR", "RETRY", "run_handler", "run_handler_async", "outcome_of_exception",
           "apply_handler_options", "apply_result_options", "check_result_options", "is_expired"]


class OutcomeKind(enum.IntEnum):
    """What an attempt came to (an int on the wire between child and supervisor)."""
    OK = 0
    ERROR = 1
    RETRY = 2


OK, ERROR, RETRY = OutcomeKind.OK, OutcomeKind.ERROR, OutcomeKind.RETRY


class Outcome(msgspec.Struct, array_like=True):
    """What happened to one attempt; built by the named constructors below.

    ``reason`` is a ``stem.results.Reason`` for anything but a success.
    ``retryable`` is False for a failure another attempt cannot fix (arguments
    that do not fit, an exception the handler's ``autoretry_for`` does not name):
    it fails at once, whatever ``max_retries`` says."""

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

    @classmethod
    def ok(cls, task_id: str, result: Any, started_at: float, finished_at: float) -> "Outcome":
        return cls(task_id, OK, result, None, None, None, None, None, started_at, finished_at)

    @classmethod
    def failed(cls, task_id: str, reason: str, error: str, error_type: str, *, traceback: str | None = None,
               started_at: float | None = None, finished_at: float | None = None,
               retryable: bool = True) -> "Outcome":
        now = time.time()
        return cls(task_id, ERROR, None, error, error_type, traceback, reason, None,
                   now if started_at is None else started_at, now if finished_at is None else finished_at,
                   retryable)

    @classmethod
    def raised(cls, task_id: str, exc: BaseException, reason: str, started_at: float, *,
               retryable: bool = True) -> "Outcome":
        """The outcome of an attempt that raised ``exc``, with its traceback."""
        return cls.failed(task_id, reason, str(exc) or type(exc).__name__, type(exc).__name__,
                          traceback="".join(traceback.format_exception(exc)), started_at=started_at,
                          retryable=retryable)

    @classmethod
    def expired(cls, task_id: str, expires_at: float) -> "Outcome":
        """The task's deadline passed before its handler ran (it ends REVOKED, ``expired``).
        No start time: it never ran (the prefetch window skips it)."""
        return cls(task_id, ERROR, None, f"expired at {expires_at:.3f} before it ran", "Expired", None,
                   Reason.EXPIRED, None, 0.0, time.time(), False)

    @classmethod
    def retry(cls, task_id: str, countdown: float | None, why: str | None, started_at: float) -> "Outcome":
        """``ctx.retry()``: run again after ``countdown`` seconds (None: the retry policy's delay)."""
        return cls(task_id, RETRY, None, why or "retry requested", "Retry", None, Reason.RETRY, countdown,
                   started_at, time.time())


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


def is_expired(env: Any, now: float) -> bool:
    """Whether ``env``'s deadline (``expires``) passed at ``now`` (epoch seconds).  Checked
    wherever a task may wait: intake, dispatch, the child before the handler, a retry."""
    expires_at = env.expires_at
    return expires_at is not None and expires_at < now


_check_encoder = msgspec.msgpack.Encoder()


def _finish(task_id: str, result: Any, started: float, check_result: bool) -> Outcome:
    if check_result:
        try:
            _check_encoder.encode(result)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            return Outcome.failed(task_id, Reason.RESULT_NOT_ENCODABLE,
                                  f"task returned a value msgpack cannot encode ({type(result).__name__}): {exc}",
                                  "EncodeError", started_at=started, retryable=False)
    return Outcome.ok(task_id, result, started, time.time())


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


def outcome_of_exception(exc: BaseException, started: float, handler: TaskHandler, ctx: TaskContext,
                         args: dict[str, Any]) -> Outcome:
    """What an attempt that raised ``exc`` came to (a retry, a limit, bad arguments, an error)."""
    task_id = ctx.id
    if isinstance(exc, Retry):
        return Outcome.retry(task_id, exc.countdown, exc.reason, started)
    if isinstance(exc, SoftTimeLimitExceeded):
        return Outcome.raised(task_id, exc, Reason.SOFT_TIME_LIMIT, started)
    if isinstance(exc, WorkerShutdown):
        return Outcome.raised(task_id, exc, Reason.SHUTDOWN, started)
    if _bad_arguments(exc, handler, ctx, args):
        return Outcome.raised(task_id, exc, Reason.BAD_ARGUMENTS, started, retryable=False)
    autoretry = handler.options.autoretry_for
    return Outcome.raised(task_id, exc, Reason.ERROR, started,
                          retryable=autoretry is None or isinstance(exc, autoretry))


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
        return outcome_of_exception(exc, started, handler, ctx, args)
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
        return outcome_of_exception(exc, started, handler, ctx, args)
    return _finish(ctx.id, result, started, check_result)

