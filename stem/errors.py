"""Every error stem raises, in one tree.

    StemError
    ├── ConfigurationError           bad STEM_* value, bad URL, bad constructor argument
    ├── TaskError
    │   ├── UnknownTaskError          enqueue of a name nobody registered
    │   ├── DuplicateHandlerError     two handlers under one name
    │   ├── DuplicateTaskError        enqueue(on_duplicate="raise") of a task whose key is held
    │   ├── InvalidTaskOptionsError   a TaskOptions value out of range
    │   ├── EncodeError               args/result msgpack cannot encode
    │   └── TaskFailedError           raised by helpers that wait for a result that failed
    ├── DecodeError (also ValueError) a frame that is truncated, oversized or garbage
    ├── SignatureError                missing, unknown-key or bad signature
    ├── BrokerError
    │   └── BrokerConnectionError     the broker could not be reached after bounded retries
    ├── BackendError
    │   └── BackendConnectionError
    ├── TaskTimeoutError              wait_for_task gave up (also TimeoutError)
    ├── WorkerError                   the worker cannot start or run (bad registry, dead children)
    └── ControlError                  a control command failed or was malformed

    BaseException (so user code's ``except Exception`` cannot swallow them)
    ├── SoftTimeLimitExceeded         raised inside a task that passed its soft time limit
    ├── Retry                         raised by ctx.retry() to reschedule the running task
    └── WorkerShutdown                raised inside a task when the worker is going down

Third-party errors (redis, psycopg, sqlite3) are translated at the adapter
boundary, so callers only ever catch ``StemError``.
"""

from __future__ import annotations

__all__ = [
    "StemError", "ConfigurationError", "TaskError", "UnknownTaskError", "DuplicateHandlerError", "DuplicateTaskError",
    "InvalidTaskOptionsError", "EncodeError", "TaskFailedError", "DecodeError", "SignatureError",
    "BrokerError", "BrokerConnectionError", "BackendError", "BackendConnectionError",
    "TaskTimeoutError", "WorkerError", "ControlError", "SoftTimeLimitExceeded", "Retry",
    "WorkerShutdown",
]


class StemError(Exception):
    """Root of every error stem raises on purpose."""


class ConfigurationError(StemError):
    pass


class TaskError(StemError):
    pass


class UnknownTaskError(TaskError, LookupError):
    pass


class DuplicateHandlerError(TaskError):
    """A second handler registered under a name the registry already holds."""


class DuplicateTaskError(TaskError):
    """The task was not published: ``existing_id`` (a task queued, running or, for an
    explicit id, still stored) holds its unique key or its id."""

    def __init__(self, message: str, existing_id: str):
        super().__init__(message)
        self.existing_id = existing_id

    def __reduce__(self):
        return (type(self), (self.args[0], self.existing_id))


class InvalidTaskOptionsError(TaskError, ValueError):
    pass


class EncodeError(TaskError, TypeError):
    pass


class TaskFailedError(TaskError):
    def __init__(self, message: str, status=None):
        super().__init__(message)
        self.status = status


class DecodeError(StemError, ValueError):
    pass


class SignatureError(StemError):
    pass


class BrokerError(StemError):
    pass


class BrokerConnectionError(BrokerError, ConnectionError):
    pass


class BackendError(StemError):
    pass


class BackendConnectionError(BackendError, ConnectionError):
    pass


class TaskTimeoutError(StemError, TimeoutError):
    """A wait ended at its timeout; ``pending`` holds the ids still unfinished (``as_completed``)."""

    def __init__(self, message: str, pending: list[str] | None = None):
        super().__init__(message)
        self.pending = list(pending or [])

    def __reduce__(self):
        return (type(self), (self.args[0], self.pending))


class WorkerError(StemError):
    pass


class ControlError(StemError):
    pass


class SoftTimeLimitExceeded(BaseException):
    """Raised inside a task that ran past its soft time limit; catch it to clean up."""


class Retry(BaseException):
    """Raised by ``ctx.retry()``: the worker reschedules the task and counts an attempt."""

    def __init__(self, countdown: float | None = None, reason: str | None = None):
        super().__init__(countdown, reason)
        self.countdown = countdown
        self.reason = reason


class WorkerShutdown(BaseException):
    """Raised inside a running task when a soft shutdown asks it to stop."""
