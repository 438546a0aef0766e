"""What ``AsyncStem`` reads from ``PostgresResultBackend``, on asyncio: statuses, waits, revokes,
group records (for ``stem.canvas_aio``).

Statements are the sync backend's (``sql``, ``revoke_params``, ``group_row``); the connection
is an ``AsyncPgSession`` (``stem.stores.postgres_async``).  Waits: one LISTEN
connection per ``AsyncStem`` on the backend's results channel, held by one
task started by the first wait: once it listens, the hub reads every waited
id (a status stored before is found, one stored after is notified); each
notification names ids, which the hub reads (one query per batch).  While the
LISTEN connection is down, waits re-read once a second, and fail after the
backend's ``reconnect_timeout``; when it is back, every waited id is read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from ..errors import BackendConnectionError
from ..results import TaskStatus, decode_status
from ..stores.base import BACKEND_ERRORS, Backoff
from ..stores.postgres_async import AsyncPgSession
from .groups import GroupRecord, check_group_id
from .postgres import PostgresResultBackend, group_row
from .waiting_async import AsyncWaitHub

__all__ = ["AsyncPostgresResults"]

log = logging.getLogger("stem.backends.postgres")
_FALLBACK_POLL_S = 1.0


class AsyncPostgresResults:
    def __init__(self, backend: PostgresResultBackend):
        self.backend = backend
        self.session = AsyncPgSession(backend.pg_store, BACKEND_ERRORS)
        self._listening = False
        self._task: asyncio.Task | None = None
        self.hub = AsyncWaitHub(read=self.read_found, label=self.session.label, on_change=self._ensure_listening,
                                poll=lambda: None if self._listening else _FALLBACK_POLL_S,
                                fail_after=backend.pg_store.reconnect_timeout)

    def workflow_store_recipe(self) -> tuple[str, Any] | None:
        """The workflow store is synchronous: it lives beside the backend this reads, on that
        backend's own connections (``ResultBackend.workflow_store_recipe``)."""
        return self.backend.workflow_store_recipe()

    async def get(self, task_id: str) -> TaskStatus | None:
        async def send(conn: Any) -> Any:
            return await (await conn.execute(self.backend.sql("get"), (task_id,), binary=True)).fetchone()
        row = await self.session.run(send)
        return None if row is None else decode_status(row[0])

    async def read_found(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        async def send(conn: Any) -> list:
            return await (await conn.execute(self.backend.sql("get_many"), (list(task_ids),), binary=True)).fetchall()
        return [decode_status(d) for _, d in await self.session.run(send)]

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        found = {s.id: s for s in await self.read_found(task_ids)} if task_ids else {}
        return [found.get(t) for t in task_ids]

    async def group_get(self, group_id: str) -> GroupRecord | None:
        check_group_id(group_id)

        async def send(conn: Any) -> Any:
            return await (await conn.execute(self.backend.sql("group_get"), (group_id,))).fetchone()
        return group_row(await self.session.run(send))

    async def group_outcomes(self, group_id: str, start: int, stop: int) -> list[bytes | None]:
        """As the sync backend's: nothing of an expired record (its rows go with it later)."""
        out: list[bytes | None] = [None] * max(0, stop - start)
        if not out or await self.group_get(group_id) is None:
            return out

        async def send(conn: Any) -> list:
            return await (await conn.execute(self.backend.sql("group_outcomes"), (group_id, start, stop),
                                             binary=True)).fetchall()
        for idx, outcome in await self.session.run(send):
            out[idx - start] = bytes(outcome)
        return out

    async def revoke(self, task_ids: Sequence[str], expires: float | None,
                     proofs: Sequence[bytes | None] | None) -> None:
        params = self.backend.revoke_params(task_ids, expires, proofs)
        if params is not None:
            async def send(conn: Any) -> None:
                await conn.execute(self.backend.sql("revoke"), params)
            await self.session.run(send)

    # -- the LISTEN task ----------------------------------------------------------------
    def _ensure_listening(self) -> None:
        """The hub's ``on_change``: start the LISTEN task; ids are read once it listens."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="stem-aio-pg-listener")
        changes = self.hub.take_changes()
        if self._listening:
            self.hub.confirmed([i for i, wanted in changes if wanted])

    async def _listen(self) -> None:
        backoff = Backoff()
        failing = False
        while True:
            try:
                async for payload in self.session.listen(self.backend.channel):
                    if not self._listening:
                        self._listening = True
                        self.hub.up("listener")
                        if failing:
                            log.warning("stem: Postgres wait listener reconnected (%s)", self.session.label)
                        failing = False
                        backoff = Backoff()
                        self.hub.take_changes()
                        self.hub.reset()          # every waited id: read now that nothing is missed
                    elif payload and self.hub.has_waiters():
                        self.hub.mark(payload.split(","))
            except Exception as exc:  # noqa: BLE001 - psycopg errors: reconnect
                (log.debug if failing else log.warning)(
                    "stem: Postgres wait listener lost its connection (%s): %s; reconnecting", self.session.label, exc)
                failing = True
                self.hub.down("listener", BackendConnectionError(
                    f"PostgreSQL unreachable while waiting for results ({self.session.label}): {exc}"))
            self._listening = False
            self.hub.kick()
            await asyncio.sleep(backoff.next())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.hub.stop()
        await self.session.close()
