"""The publishing side of ``RedisBroker`` on asyncio: what ``AsyncStem`` sends, on one dedicated connection.

The commands are the sync broker's own (``RedisBroker.publish_commands``,
``keyed_commands``: the XADDs and ZADDs, and the ``redis_keys.lua`` script
for keyed publishes), so keys, lanes, scripts and replies cannot drift
apart; only the round trip differs (``stem.stores.redis_async``).  One call
of ``publish`` may carry the messages of many coroutines: the plain ones and
the keyed ones go in one pipeline, one round trip.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..stores.base import BROKER_ERRORS
from ..stores.redis_async import AsyncRedisStore
from .base import FrameBatch, Keyed, Message, check_keyed
from .redis import RedisBroker

__all__ = ["AsyncRedisPublisher"]


class AsyncRedisPublisher:
    """Publishes for ``broker`` (a ``RedisBroker``) over ``store`` (its asyncio connection)."""

    def __init__(self, broker: RedisBroker, store: AsyncRedisStore | None = None):
        self.broker = broker
        self.store = store or AsyncRedisStore(broker.url, retry_attempts=broker.retry_attempts,
                                              errors=BROKER_ERRORS)
        for source in broker.script_sources():
            self.store.script(source)

    async def publish(self, messages: Sequence[Message], keyed: Sequence[Keyed],
                      frames: Sequence[FrameBatch] = ()) -> list[str | None]:
        """Store ``messages`` and the ``frames`` batches (``publish_frames``' arguments, packed
        in C as it packs them) and publish ``keyed`` (``Broker.publish_keyed``'s semantics),
        all in one round trip; returns ``publish_keyed``'s answer for ``keyed``.  Retried as a
        whole after a lost connection, as the sync broker retries each of its calls."""
        keyed = check_keyed(keyed) if keyed else []
        commands: list[Any] = []
        new_queues: list[str] = []
        if messages:
            commands, new_queues, _ = self.broker.publish_commands(messages)
        spans: list[list[int]] = []
        first_keyed = len(commands)
        if keyed:
            more, spans, queues = self.broker.keyed_commands(keyed)
            commands.extend(more)
            new_queues.extend(q for q in queues if q not in new_queues)
        head, n_head = b"", 0
        if frames:
            parts = []
            for queue, task_ids, batch, priority, vt in frames:
                packed, n = self.broker.pack_frames(queue, task_ids, batch, priority=priority, visibility_timeout=vt)
                parts.append(packed)
                n_head += n
                if queue not in new_queues:
                    new_queues.append(queue)
            head = b"".join(parts)
        if not commands and not n_head:
            return []
        replies = await self.store.call(lambda: self.store.run(commands, (head, n_head)), "publish")
        self.broker.declared(new_queues)
        return self.broker.keyed_holders(len(keyed), spans, replies[first_keyed:]) if keyed else []

    async def publish_frames(self, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], *,
                             priority: int = 0, visibility_timeout: float | None = None) -> None:
        """A uniform ``enqueue_many`` batch (``Broker.publish_frames``): one round trip."""
        await self.publish((), (), ((queue, task_ids, frames, priority, visibility_timeout),))

    async def close(self) -> None:
        await self.store.close()
