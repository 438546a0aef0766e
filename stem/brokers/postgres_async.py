"""The publishing side of ``PostgresBroker`` on asyncio (``AsyncStem``): one statement a batch.

The statements and their parameters are the sync broker's (``sql``,
``publish_params``, ``keyed_params``, ``keyed_holders``); only the connection
differs (``stem.stores.postgres_async``).  A coalesced batch of plain and keyed
messages is one ``publish`` statement and one ``publish_keyed`` statement,
each its own transaction, as ``publish_many`` and ``publish_keyed`` are.
Queue names are registered in the first statement's round trip that meets
them.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..stores.base import BROKER_ERRORS
from ..stores.postgres_async import AsyncPgSession
from .base import FrameBatch, Keyed, Message, check_keyed, check_limit, frame_messages, validate_queue_name
from .postgres import PostgresBroker

__all__ = ["AsyncPostgresPublisher"]


class AsyncPostgresPublisher:
    def __init__(self, broker: PostgresBroker):
        self.broker = broker
        self.session = AsyncPgSession(broker.store, BROKER_ERRORS)
        self._known: set[str] = set()

    async def _register(self, conn: Any, queues: list[str]) -> None:
        new = [q for q in queues if q not in self._known]
        if new:
            await conn.execute(self.broker.sql("register"), (new,))

    async def publish(self, messages: Sequence[Message], keyed: Sequence[Keyed],
                      frames: Sequence[FrameBatch] = ()) -> list[str | None]:
        """Store ``messages`` and the frames of ``frames`` in one statement, then publish
        ``keyed`` (``publish_keyed``'s semantics); its answer for ``keyed``."""
        keyed = check_keyed(keyed) if keyed else []
        if frames:
            messages = [*messages, *frame_messages(frames)]
        holders: list[str | None] = []
        if messages:
            queues = list(dict.fromkeys(m.queue for m in messages))
            for q in queues:
                validate_queue_name(q)
            limited = [m for m in messages if m.limit is not None]
            for m in limited:
                check_limit(m.limit)
            plain = [m for m in messages if m.limit is None] if limited else messages
            params = self.broker.publish_params(plain, queues)
            lane_params = self.broker.lane_publish_params(limited) if limited else None

            async def send(conn: Any) -> None:
                await self._register(conn, queues)
                if lane_params is None:
                    await conn.execute(self.broker.sql("publish"), params)
                    return
                async with conn.transaction():   # as publish_many: both or neither
                    if plain:
                        await conn.execute(self.broker.sql("publish"), params)
                    await conn.execute(self.broker.sql("publish_lanes"), lane_params)

            await self.session.run(send)
            self._known.update(queues)
        if keyed:
            kparams, first, kqueues, statement = self.broker.keyed_params(keyed)

            async def send_keyed(conn: Any) -> list:
                await self._register(conn, kqueues)
                return await (await conn.execute(self.broker.sql(statement), kparams)).fetchall()

            rows = await self.session.run(send_keyed)
            self._known.update(kqueues)
            holders = self.broker.keyed_holders(keyed, first, rows)
        return holders

    async def publish_frames(self, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], *,
                             priority: int = 0, visibility_timeout: float | None = None) -> None:
        await self.publish([Message(t, queue, f, priority, None, visibility_timeout)
                            for t, f in zip(task_ids, frames)], ())

    async def close(self) -> None:
        await self.session.close()
