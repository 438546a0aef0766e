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
    ├── ControlError                  a control command failed or was malformed
    └── WorkflowError                 durable workflows (stem.workflows)
        ├── UnknownWorkflowError      start of a workflow name nobody registered (also LookupError)
        ├── RunNotFoundError          a run id the workflow store does not hold (also LookupError)
        ├── RunFinishedError          an event sent to a run that already ended
        ├── StepFailedError           raised into a workflow: a step failed after its retries
        ├── CallFailedError           raised into a workflow: a ctx.call task ended without success
        └── ChildFailedError          raised into a workflow: a child run ended without success

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
    "WorkerShutdown", "WorkflowError", "UnknownWorkflowError", "RunNotFoundError", "RunFinishedError",
    "StepFailedError", "CallFailedError", "ChildFailedError",
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


class WorkflowError(StemError):
    """Root of the durable workflows' errors (``stem.workflows``)."""


class UnknownWorkflowError(WorkflowError, LookupError):
    pass


class RunNotFoundError(WorkflowError, LookupError):
    pass


class RunFinishedError(WorkflowError):
    """The run ended (SUCCEEDED, FAILED or CANCELLED): it takes no more events."""


class _RaisedIntoWorkflow(WorkflowError):
    """What a durable call raises into the workflow when the work it stands for failed: the
    same type and text on the first run and on every replay (the original exception is only
    its ``__cause__`` the first time), so a workflow's ``except`` behaves the same way each
    time.  ``error_type`` and ``error`` describe the original failure."""

    def __init__(self, message: str, name: str = "", position: int = -1, error_type: str | None = None,
                 error: str | None = None):
        super().__init__(message)
        self.name = name
        self.position = position
        self.error_type = error_type
        self.error = error

    def __reduce__(self):
        return (type(self), (self.args[0], self.name, self.position, self.error_type, self.error))


class StepFailedError(_RaisedIntoWorkflow):
    """A step raised on its last attempt (or returned what cannot be recorded)."""


class CallFailedError(_RaisedIntoWorkflow):
    """A task run by ``ctx.call`` ended FAILED, DEAD or REVOKED."""


class ChildFailedError(_RaisedIntoWorkflow):
    """A child run ended FAILED or CANCELLED."""


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
