"""Task states and the status record a result backend stores."""

from __future__ import annotations

import enum
import time
from typing import Any

import msgspec

__all__ = ["TaskState", "TaskStatus", "TaskResult", "TERMINAL_STATES", "encode_status", "decode_status"]


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


class TaskStatus(msgspec.Struct, omit_defaults=True):
    """What a backend knows about one task; ``reason`` is a short machine word
    (``hard-time-limit``, ``child-crashed``, ``signature-invalid`` ...)."""

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

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state is TaskState.SUCCEEDED


TaskResult = TaskStatus

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TaskStatus)


def encode_status(status: TaskStatus) -> bytes:
    return _encoder.encode(status)


def decode_status(data: bytes) -> TaskStatus:
    return _decoder.decode(data)
