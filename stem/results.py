"""Task states and the status record a result backend stores."""

from __future__ import annotations

import enum
import math
import time
from typing import Any

import msgspec

__all__ = ["TaskState", "TaskStatus", "TaskResult", "TERMINAL_STATES", "Reason", "encode_status", "decode_status",
           "ttl_of", "MAX_CHILDREN", "apply_result_options", "check_result_options"]


class TaskState(str, enum.Enum):
    PENDING = "PENDING"      # unknown to the backend: not run yet, or its result expired
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"        # ran and raised, retries exhausted (a copy sits in the DLQ)
    RETRYING = "RETRYING"    # failed an attempt, scheduled again
    REVOKED = "REVOKED"
    DEAD = "DEAD"            # dead-lettered without a successful run (bad signature, poison, crashes)

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.REVOKED, TaskState.DEAD})


class Reason(enum.StrEnum):
    """Why a task did not simply succeed: ``TaskStatus.reason`` and dead-letter reasons.

    A ``StrEnum``: each member equals (and hashes as) its string, which is what is
    stored and what brokers write (``status.reason == Reason.POISON`` and
    ``status.reason == "poison"`` are the same test)."""

    ERROR = "error"                          # the task raised (retried up to max_retries)
    RETRY = "retry"                          # ctx.retry() asked for another attempt
    BAD_ARGUMENTS = "bad-arguments"          # its arguments do not fit the function: not retried
    RESULT_NOT_ENCODABLE = "result-not-encodable"
    SOFT_TIME_LIMIT = "soft-time-limit"
    HARD_TIME_LIMIT = "hard-time-limit"
    ENQUEUE_FAILED = "enqueue-failed"        # a task it enqueued could not be published
    SHUTDOWN = "shutdown"                    # stopped by a soft shutdown: given back, not an attempt
    CHILD_CRASHED = "child-crashed"          # its process was killed from outside: redelivered
    REVOKED = "revoked"
    EXPIRED = "expired"
    PURGED = "purged"                        # its queue was purged before it ran (stem.purging)
    POISON = "poison"                        # it kept killing the processes that ran it
    MAX_DELIVERIES = "max-deliveries"        # delivered more than the broker's max_deliveries times
    DECODE_ERROR = "decode-error"            # a frame nobody can read
    SIGNATURE_INVALID = "signature-invalid"
    UNKNOWN_TASK = "unknown-task"            # no handler of that name on the worker
    REJECTED = "rejected"                    # nack(requeue=False)


class TaskStatus(msgspec.Struct, omit_defaults=True):
    """What a backend knows about one task; ``reason`` is a short machine word
    (``hard-time-limit``, ``child-crashed``, ``signature-invalid`` ...).

    ``ttl``: how many seconds the backend keeps this status from when it is stored
    (None: the backend's ``result_expires``); the rule is in ``stem.backends.base``.

    Where the task came from, copied from its envelope by the worker (None in statuses
    stored before stem kept them, and in the statuses of groups and chains):
    ``enqueued_at``, ``parent_id`` / ``root_id`` (the task that enqueued it, and the
    first task of that line; for a canvas task, the step before it and the canvas),
    ``group_id`` (the group or chord it is a member of), ``children`` (what it started:
    tasks it enqueued with ``ctx.enqueue``, the next step of its chain; at most
    ``MAX_CHILDREN``) and ``args``, its arguments as they may be shown: secret-looking
    and ``TaskOptions(redact=...)`` values hidden, large values cut
    (``stem.redact.shown_args``).  Never the arguments the task ran with.

    The fields travel by name (a msgpack map, defaults left out), so a status stored by
    an older stem reads with these as None, and an older stem reading a newer status
    ignores the names it does not know.  New fields go at the end: the Redis backend
    reads ``state`` from the head of the record."""

    id: str
    state: TaskState
    name: str = ""
    queue: str = ""
    attempt: int = 0
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    reason: str | None = None
    traceback: str | None = None
    meta: dict[str, Any] = msgspec.field(default_factory=dict)
    progress: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = msgspec.field(default_factory=time.time)
    worker: str | None = None
    ttl: float | None = None
    # (TaskStatus.of and succeeded_with build a status by position: keep them in step with this order)
    enqueued_at: float | None = None
    parent_id: str | None = None
    root_id: str | None = None
    group_id: str | None = None
    children: list[str] | None = None
    args: dict[str, Any] | None = None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state is TaskState.SUCCEEDED

    @classmethod
    def of(cls, envelope: Any, state: TaskState, **fields: Any) -> "TaskStatus":
        """The status of ``envelope``'s task in ``state``: id, name, queue, attempt, meta, ttl
        (``ttl_of``), enqueue time, parent, root and group from the envelope, the rest (the
        shown ``args`` and ``children`` among them) from ``fields``."""
        # built by position, then the given fields set: a msgspec Struct matches each keyword
        # against its field names, which made a status of two dozen fields cost ~1 us
        updated_at = fields.pop("updated_at") if "updated_at" in fields else time.time()
        canvas = envelope.canvas
        status = cls(envelope.id, state, envelope.name, envelope.queue, envelope.attempt, None, None, None, None, None,
                     envelope.meta, None, None, None, updated_at, None, ttl_of(envelope, state),
                     envelope.enqueued_at or None, envelope.parent_id, envelope.root_id,
                     None if canvas is None else _group_of(canvas))
        for name, value in fields.items():
            setattr(status, name, value)
        return status

    @classmethod
    def succeeded_with(cls, envelope: Any, result: Any, started_at: float, finished_at: float, updated_at: float,
                       worker: str, args: dict[str, Any] | None, children: list[str] | None) -> "TaskStatus":
        """``of(envelope, SUCCEEDED, result=..., ...)`` by position alone: the settle's hot path
        (one per task that succeeds)."""
        # ttl_of inlined for the common case (no failure_ttl)
        ttl = envelope.result_ttl if envelope.failure_ttl is None else ttl_of(envelope, TaskState.SUCCEEDED)
        canvas = envelope.canvas
        return cls(envelope.id, TaskState.SUCCEEDED, envelope.name, envelope.queue, envelope.attempt, result, None,
                   None, None, None, envelope.meta, None, started_at, finished_at, updated_at, worker, ttl,
                   envelope.enqueued_at or None, envelope.parent_id, envelope.root_id,
                   None if canvas is None else _group_of(canvas), children, args)


#: The most ids ``TaskStatus.children`` keeps (a task that enqueues more lists the first ones).
MAX_CHILDREN = 100


def _group_of(canvas: dict[str, Any]) -> str | None:
    """The group a canvas task is a member of (``stem.canvas``: its ``up`` names it)."""
    up = canvas.get("up")
    return up.get("g") if isinstance(up, dict) else None


def ttl_of(envelope: Any, state: TaskState) -> float | None:
    """The lifetime a status of ``envelope``'s task in ``state`` asks for: ``result_ttl``
    for SUCCEEDED, ``failure_ttl`` (else ``result_ttl``) for FAILED, DEAD and REVOKED, the
    longer of the two for a status the task passes through (the backend keeps those at
    least ``result_expires`` anyway).  None: the task set neither."""
    result_ttl, failure_ttl = envelope.result_ttl, envelope.failure_ttl
    if failure_ttl is None or state is TaskState.SUCCEEDED:
        return result_ttl
    if state in TERMINAL_STATES or result_ttl is None:
        return failure_ttl
    return max(result_ttl, failure_ttl)


TaskResult = TaskStatus

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TaskStatus)


def encode_status(status: TaskStatus) -> bytes:
    return _encoder.encode(status)


def decode_status(data: bytes) -> TaskStatus:
    return _decoder.decode(data)


def apply_result_options(env: Any, options: Any) -> None:
    """Give ``env`` the handler's ``result_ttl``, ``failure_ttl`` and ``ignore_result``
    where its producer set none (None: these options have no default, see
    ``stem.task.RESULT_OPTIONS``), so settling reads them from the envelope alone."""
    if options.result_ttl is not None and env.result_ttl is None:
        env.result_ttl = options.result_ttl
    if options.failure_ttl is not None and env.failure_ttl is None:
        env.failure_ttl = options.failure_ttl
    if options.ignore_result is not None and env.ignore_result is None:
        env.ignore_result = options.ignore_result


def check_result_options(env: Any) -> str | None:
    """None when ``env``'s result lifetimes are None or finite seconds > 0 (what a stem
    producer sends).  Otherwise clears them (so the DEAD status of the task can still be
    stored: a backend refuses such a ttl) and says what was wrong."""
    bad = [f"{name}={getattr(env, name)!r}" for name in ("result_ttl", "failure_ttl")
           if getattr(env, name) is not None and not 0.0 < getattr(env, name) < math.inf]
    if not bad:
        return None
    env.result_ttl = env.failure_ttl = None
    return f"bad envelope: {', '.join(bad)} (result lifetimes are finite seconds > 0)"
