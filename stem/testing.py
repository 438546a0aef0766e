"""Helpers for users' unit tests.

``EagerStem`` runs each task at once, in the calling thread, through the same
handler path a worker uses (same context, same retry rules, statuses stored in
an in-memory backend), so a unit test needs no worker and no broker::

    stem = EagerStem(registry)
    status = stem.wait_for_task(stem.enqueue("email.send", {"to": "a@b.c"}))
    assert status.result == "sent to a@b.c (attempt 0)"

``raise_errors=True`` re-raises a task's exception in the test instead of
storing FAILED (dramatiq's ``join(..., fail_fast=True)``).
"""

from __future__ import annotations

import time
from typing import Any

from .backends.memory import InMemoryResultBackend
from .brokers.memory import InMemoryBroker
from .envelope import Envelope, decode_frame
from .errors import TaskFailedError
from .producer import Stem
from .redact import shown_args
from .results import Reason, TaskState, TaskStatus
from .task import TaskContext, TaskRegistry
from .worker.execution import OK, Outcome, run_handler
from .worker.protocol import Result, decode_from_child, encode_message
from .worker.settle import NOT_RETRYABLE

__all__ = ["EagerStem"]


def _as_a_worker_sees_it(out: Outcome) -> Outcome:
    """The outcome after the trip a worker's takes (child -> supervisor, msgpack): a
    result comes back as a real worker returns it (a datetime or a Decimal as str, a
    tuple as a list), so a unit test sees what production sees."""
    return decode_from_child(encode_message(Result(0, out))).outcome


class _EagerRuntime:
    def __init__(self, stem: "EagerStem"):
        self.stem = stem

    def heartbeat(self, task_id: str) -> None:
        pass

    def progress(self, task_id: str, fraction: float, data: Any) -> None:
        pass

    def enqueue(self, name, args, options, parent) -> str:
        return self.stem.enqueue(name, args, options=options, parent=parent)


class EagerStem(Stem):
    """A producer that runs tasks immediately (retries included, without waiting)."""

    def __init__(self, registry: TaskRegistry, *, raise_errors: bool = False, signer: Any = None):
        super().__init__(InMemoryBroker(), InMemoryResultBackend(), registry, signer)
        self.raise_errors = raise_errors
        self._runtime = _EagerRuntime(self)

    def enqueue(self, name: str, args: dict[str, Any] | None = None, **kwargs: Any) -> str:
        # no broker, so no key: each task ends before the next enqueue, and a unique one
        # would have released its key by then anyway
        env, message, _ = self._build(name, args, kwargs.get("options"), kwargs.get("meta"), kwargs.get("headers"),
                                      kwargs.get("countdown"), kwargs.get("eta"), kwargs.get("task_id"),
                                      kwargs.get("parent"), time.time())
        self._run(decode_frame(message.frame, self.signer))
        return env.id

    def enqueue_many(self, items) -> list[str]:
        out = []
        for item in items:
            if isinstance(item, dict):
                kw = dict(item)
                out.append(self.enqueue(kw.pop("name"), kw.pop("args", None), **kw))
            else:
                out.append(self.enqueue(item[0], item[1], options=item[2] if len(item) == 3 else None))
        return out

    def _run(self, env: Envelope) -> None:
        handler = self.registry.get(env.name)
        for attempt in range(env.max_retries + 1):
            env.attempt = attempt
            ctx = TaskContext(env.id, env.name, attempt, env.meta, env.headers, env.queue, env.max_retries,
                              env.root_id, self._runtime)
            out = _as_a_worker_sees_it(run_handler(handler, ctx, env.args))
            if out.kind == OK:
                if env.ignore_result:
                    return
                self.backend.store(TaskStatus.of(env, TaskState.SUCCEEDED, result=out.result,
                                                 started_at=out.started_at, finished_at=out.finished_at,
                                                 args=shown_args(env.args, handler.options.redact)))
                return
            if out.reason in NOT_RETRYABLE or not out.retryable:
                break
        status = TaskStatus.of(env, TaskState.FAILED, error=out.error, error_type=out.error_type,
                               reason=str(out.reason or Reason.ERROR), traceback=out.traceback,
                               started_at=out.started_at, finished_at=out.finished_at,
                               args=shown_args(env.args, handler.options.redact))
        self.backend.store(status)
        if self.raise_errors:
            raise TaskFailedError(f"task {env.name} [{env.id}] failed: {out.error_type}: {out.error}\n"
                                  f"{out.traceback or ''}", status)
