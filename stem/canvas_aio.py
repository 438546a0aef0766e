"""``AsyncCanvasHandle``: a started canvas for ``AsyncStem`` (``await stem.apply(...)``).

The same handle as ``stem.canvas.CanvasHandle``, awaited: ``await h.wait()``
is ``AsyncStem.wait_for_task`` on the canvas's id (registered with the
producer's shared wait hub: no thread, no connection of its own), and
``status``, ``results`` and ``progress`` read through the producer's async
results adapter: native ``redis.asyncio`` / psycopg round trips on Redis and
Postgres, the producer's small executor on memory and SQLite (as every call
of ``AsyncStem`` there).  A group's results are read ``stem.canvas.PAGE``
outcomes a round trip.
"""

from __future__ import annotations

from typing import Any

from .canvas import PAGE, Progress, outcome_value
from .envelope import decode_frame
from .errors import InvalidTaskOptionsError, StemError, TaskFailedError
from .results import TaskState, TaskStatus

__all__ = ["AsyncCanvasHandle"]


class AsyncCanvasHandle:
    """A canvas started by ``AsyncStem.apply`` (or found by ``AsyncStem.canvas_handle``):
    ``id`` is the id of the task whose status is its outcome, as on ``CanvasHandle``."""

    def __init__(self, stem: Any, canvas_id: str, kind: str, steps: int | None = None):
        self.stem = stem            # the AsyncStem
        self.id = canvas_id
        self.kind = kind            # "task", "chain", "group", "chord"
        self.steps = steps          # a chain's step count (None when unknown: a handle made by id)

    @classmethod
    async def from_id(cls, stem: Any, canvas_id: str) -> "AsyncCanvasHandle":
        if not isinstance(canvas_id, str) or not canvas_id:
            raise InvalidTaskOptionsError(f"a canvas id is a non-empty string, got {canvas_id!r}")
        record = await stem._group_reads().group_get(canvas_id)
        if record is not None:
            data = decode_frame(record.data, stem.sync.signer).args
            return cls(stem, canvas_id, "chord" if data.get("b") is not None else "group")
        return cls(stem, canvas_id, "task")

    async def status(self) -> TaskStatus:
        return await self.stem.get_status(self.id)

    async def wait(self, timeout: float = 30.0) -> TaskStatus:
        """The canvas's terminal status (``TaskTimeoutError`` after ``timeout`` seconds)."""
        return await self.stem.wait_for_task(self.id, timeout)

    async def get(self, timeout: float = 30.0) -> Any:
        """The outcome's result; ``TaskFailedError`` when the canvas failed."""
        status = await self.wait(timeout)
        if status.state is not TaskState.SUCCEEDED:
            raise TaskFailedError(f"canvas {self.id} ended {status.state.value} ({status.reason}): {status.error}",
                                  status)
        return status.result

    async def results(self, timeout: float | None = None) -> list[Any]:
        """As ``CanvasHandle.results``: a group's or chord's member results in input order (a
        ``MemberFailure`` for a member that did not succeed), a chain's steps'.  With
        ``timeout``, waits for the canvas to end first."""
        if timeout is not None:
            await self.wait(timeout)
        reads = self.stem._group_reads()
        if self.kind in ("group", "chord"):
            record = await reads.group_get(self.id)
            if record is None:
                raise StemError(f"group {self.id} is unknown or expired: its results are gone")
            out: list[Any] = []
            for start in range(0, record.expected, PAGE):
                out += [outcome_value(r) for r in await reads.group_outcomes(self.id, start,
                                                                      min(start + PAGE, record.expected))]
            return out
        if self.kind == "chain" and self.steps:
            statuses = await reads.get_many(self._chain_ids())
            return [None if s is None else s.result for s in statuses]
        status = (await reads.get_many([self.id]))[0]
        return [None if status is None else status.result]

    async def progress(self) -> Progress:
        """How many members (a group, a chord's header) or steps have ended."""
        reads = self.stem._group_reads()
        if self.kind in ("group", "chord"):
            record = await reads.group_get(self.id)
            return Progress(0, 0) if record is None else Progress(record.finished, record.expected)
        if self.kind == "chain" and self.steps:
            statuses = await reads.get_many(self._chain_ids())
            return Progress(sum(1 for s in statuses if s is not None and s.is_terminal), self.steps)
        status = (await reads.get_many([self.id]))[0]
        return Progress(int(status is not None and status.is_terminal), 1)

    def _chain_ids(self) -> list[str]:
        assert self.steps
        return [f"{self.id}.s{k}" for k in range(self.steps - 1)] + [self.id]

    def __repr__(self) -> str:
        return f"<AsyncCanvasHandle {self.kind} {self.id}>"
