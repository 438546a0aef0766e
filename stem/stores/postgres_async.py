"""Postgres for the asyncio producer: psycopg's ``AsyncConnection``, retried as the sync sessions are.

``AsyncPgSession`` is one autocommit ``AsyncConnection`` with the durable
settings of ``stem.stores.postgres`` (publishes and revokes must survive a
server crash once they return), used by one statement at a time (an
``asyncio.Lock``; callers batch: ``stem.aio`` coalesces enqueues into one
statement).  A lost connection or unusable session is retried, reconnecting,
with capped backoff for up to the store's ``reconnect_timeout``, then raised
as the connection error; every other psycopg error becomes the user's error
at once -- as ``PgSessions.run`` does.  The schema is created or upgraded
once, before the first statement (``PostgresStore.migrate``, run off the loop:
it is the sync store's own, advisory-locked).

``listen(channel)`` opens one more connection that LISTENs and yields each
notification's payload (``stem.backends.postgres_async`` keeps one for all
waits).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from .base import Backoff, StoreErrors
from .postgres import DURABLE, PostgresStore, translate

__all__ = ["AsyncPgSession"]

T = TypeVar("T")


class AsyncPgSession:
    """One durable asyncio connection of ``store`` (a ``PostgresStore``)."""

    def __init__(self, store: PostgresStore, errors: StoreErrors):
        self._store = store
        self._pg = store.psycopg
        self.errors = errors
        self.label = store.label
        self._conn: Any = None
        self._lock: asyncio.Lock | None = None
        self._migrated = False
        self._closed = False
        #: Statements sent (what the coalescing tests count).
        self.round_trips = 0

    async def connect(self, *, prepare: bool = True) -> Any:
        """A new autocommit ``AsyncConnection`` with the durable settings."""
        store = self._store
        options = " ".join(f"-c {k}={v}" for k, v in DURABLE.items())
        return await self._pg.AsyncConnection.connect(
            store.conninfo, autocommit=True, prepare_threshold=0 if prepare else None,
            connect_timeout=max(1, int(store.connect_timeout)), application_name="stem-aio",
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3, options=options)

    async def _connection(self) -> Any:
        if self._closed:
            raise self.errors.error(f"the PostgreSQL client ({self.label}) is closed")
        if not self._migrated:
            await asyncio.to_thread(self._store.migrate)
            self._migrated = True
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await self.connect()
        return self._conn

    async def run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """``await fn(conn)`` on this session's connection, retried as ``PgSessions.run``."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        pg = self._pg
        deadline = backoff = None
        while True:
            try:
                async with self._lock:
                    conn = await self._connection()
                    self.round_trips += 1
                    return await fn(conn)
            except (pg.OperationalError, pg.InterfaceError) as e:
                await self._drop()
                now = time.monotonic()
                if deadline is None:
                    deadline, backoff = now + self._store.reconnect_timeout, Backoff()
                assert backoff is not None
                delay = backoff.next()
                if now + delay > deadline:
                    raise translate(e, self.label, self.errors, gave_up_after=self._store.reconnect_timeout) from e
                await asyncio.sleep(delay)
            except (pg.Error, pg.Warning) as e:
                raise translate(e, self.label, self.errors) from e

    async def listen(self, channel: str) -> AsyncIterator[str]:
        """LISTEN on ``channel`` on a connection of its own and yield each payload; raises the
        psycopg error that ends the connection (the caller reconnects)."""
        conn = await self.connect(prepare=False)
        try:
            await conn.execute(f'LISTEN "{channel}"')
            yield ""                          # listening: the caller may read now
            async for notify in conn.notifies():
                yield notify.payload
        finally:
            await asyncio.shield(conn.close())

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close
                pass

    async def close(self) -> None:
        self._closed = True
        await self._drop()
