"""What ``AsyncStem`` reads from ``RedisResultBackend``, on asyncio: statuses, waits, revokes,
group records (for ``stem.canvas_aio``).

Keys, channels and commands are the sync backend's (``status_key``,
``done_channel``, ``revoke_commands``, ``group_get_command``,
``group_outcomes_command``); the round trips go through an
``AsyncRedisStore`` -- the producer's own command connection when broker and
backend are the same Redis (``shares_store_with``).

Waits: one pub/sub connection per ``AsyncStem``, held by one listener task
(started by the first wait), kept in step with the ids its ``AsyncWaitHub``
waits on, as ``stem.backends.redis_listen`` does for threads: SUBSCRIBE /
UNSUBSCRIBE of up to ``_BATCH`` channels a command; each subscribe
confirmation has the hub read the id (a terminal store after the read is
published on a channel already listened on); each message is offered as it
is.  On a lost connection the listener reports the hub down (waiters then
re-read once a second, and fail after ``reconnect_timeout``), reconnects with
capped backoff, subscribes every waited id again and so has them all re-read.
With the command connection, that is two connections to Redis for any number
of enqueues and waits.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Sequence

import redis

from ..errors import BackendConnectionError, StemError
from ..results import TaskStatus, decode_status
from ..stores.base import BACKEND_ERRORS, Backoff
from ..stores.redis import REDIS_ERRORS, pack_commands, raise_first_error
from ..stores.redis_async import HIREDIS_MORE as _MORE, HIREDIS_READER as _Reader, AsyncRedisStore
from .groups import GroupRecord
from .redis import RedisResultBackend, group_record_of
from .waiting_async import AsyncWaitHub

__all__ = ["AsyncRedisResults"]

log = logging.getLogger("stem.backends.redis")

_BATCH = 5000
_PING_EVERY_S = 30.0
_YIELD_EVERY = 100         # replies handled before the listener lets the loop run
_FALLBACK_POLL_S = 1.0


class AsyncRedisResults:
    """``backend``'s reads and revokes over ``store`` (an ``AsyncRedisStore`` on its server)."""

    def __init__(self, backend: RedisResultBackend, store: AsyncRedisStore | None = None):
        self.backend = backend
        self.store = store or AsyncRedisStore(backend.url, retry_attempts=backend.retry_attempts,
                                              errors=BACKEND_ERRORS)
        self._own_store = store is None
        self.hub = AsyncWaitHub(read=self.read_found, label=self.store.label,
                                poll=lambda: None if self._listener.listening else _FALLBACK_POLL_S,
                                on_change=lambda: self._listener.kick(), fail_after=backend.reconnect_timeout)
        ns = backend.namespace
        self._listener = _Listener(store=self.store, hub=self.hub, channel=backend.done_channel,
                                   prefix=f"{ns}:{{t:", suffix="}:done", label=self.store.label)

    async def _run(self, commands: list[tuple], what: str) -> list:
        async def send() -> list:
            replies = await self.store.execute(commands)
            raise_first_error(replies)
            return replies
        return await self.store.call(send, what, errors=BACKEND_ERRORS)

    def workflow_store_recipe(self) -> tuple[str, Any] | None:
        """The workflow store is synchronous: it lives beside the backend this reads, on that
        backend's own connections (``ResultBackend.workflow_store_recipe``)."""
        return self.backend.workflow_store_recipe()

    async def get(self, task_id: str) -> TaskStatus | None:
        data = (await self._run([("GET", self.backend.status_key(task_id))], "get"))[0]
        return None if data is None else decode_status(data)

    async def read_found(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        """The stored statuses among ``task_ids``: one pipeline of GETs (the hub's reads)."""
        replies = await self._run([("GET", self.backend.status_key(t)) for t in task_ids], "wait")
        return [decode_status(d) for d in replies if d is not None]

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        if not task_ids:
            return []
        replies = await self._run([("GET", self.backend.status_key(t)) for t in task_ids], "get_many")
        return [None if d is None else decode_status(d) for d in replies]

    async def group_get(self, group_id: str) -> GroupRecord | None:
        reply = (await self._run([self.backend.group_get_command(group_id)], "group_get"))[0]
        return group_record_of(group_id, reply)

    async def group_outcomes(self, group_id: str, start: int, stop: int) -> list[bytes | None]:
        if stop <= start:
            return []
        return (await self._run([self.backend.group_outcomes_command(group_id, start, stop)], "group_outcomes"))[0]

    async def revoke(self, task_ids: Sequence[str], expires: float | None,
                     proofs: Sequence[bytes | None] | None) -> None:
        commands = self.backend.revoke_commands(task_ids, expires, proofs)
        if commands:
            await self._run(commands, "revoke")

    async def close(self) -> None:
        await self._listener.stop()
        await self.hub.stop()
        if self._own_store:
            await self.store.close()


class _Listener:
    """The pub/sub task of one ``AsyncRedisResults`` (see the module docstring)."""

    def __init__(self, *, store: AsyncRedisStore, hub: AsyncWaitHub, channel: Any, prefix: str, suffix: str,
                 label: str):
        self._store = store
        self._hub = hub
        self._channel = channel
        self._prefix = prefix.encode()
        self._suffix = suffix.encode()
        self._label = label
        self._task: asyncio.Task | None = None
        self._conn: Any = None                # while connected and subscribed
        self._subscribed: set[bytes] = set()
        self._sending = False
        self._broken = False
        self._stopped = False
        self.listening = False

    def kick(self) -> None:
        """The hub has changes: start the task, or send them on the live connection."""
        if self._stopped:
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="stem-aio-redis-listener")
        elif self._conn is not None and not self._sending:
            self._sending = True
            asyncio.get_running_loop().call_soon(self._send_changes)

    def _send_changes(self) -> None:
        """Every change of this loop iteration in one write (a subscribe is one more command on
        the listener's connection; the replies come back through its read loop)."""
        self._sending = False
        conn = self._conn
        if conn is None:
            return                     # the next connection subscribes every waited id anyway
        commands, ready = self._sync_commands(self._hub.take_changes())
        if commands:
            try:
                conn._writer.write(pack_commands(commands))      # redis-py keeps it private, as the sync pipe does
            except (AttributeError, OSError, RuntimeError) as exc:
                log.debug("stem: Redis wait listener could not send its subscriptions: %s", exc)
                self._broken = True
        if ready:
            self._hub.confirmed(ready)

    async def _run(self) -> None:
        backoff = Backoff()
        failing = False
        while not self._stopped:
            conn = self._store.new_connection()
            try:
                await conn.connect()
                self._subscribed = set()
                self._broken = False
                self.listening = True
                self._hub.up("listener")
                if failing:
                    log.warning("stem: Redis wait listener reconnected (%s)", self._label)
                failing = False
                backoff = Backoff()
                self._hub.take_changes()      # a new connection subscribes every waited id anyway
                commands, ready = self._sync_commands([(i, True) for i in self._hub.waited_ids()])
                if commands:
                    await conn.send_packed_command([pack_commands(commands)], check_health=False)
                if ready:
                    self._hub.confirmed(ready)
                self._conn = conn
                self._send_changes()          # what changed while it connected
                while not self._broken:
                    await self._read_some(conn)
                raise OSError("the pub/sub connection broke while sending")
            except (*REDIS_ERRORS, OSError, ValueError) as exc:
                if self._stopped:
                    break
                (log.debug if failing else log.warning)(
                    "stem: Redis wait listener lost its connection (%s): %s; reconnecting", self._label, exc)
                failing = True
                self._hub.down("listener", BackendConnectionError(
                    f"Redis unreachable while waiting for results ({self._label}): {exc}"))
            finally:
                self._conn = None
                self.listening = False
                self._hub.kick()              # the reader polls while nothing is announced
                await asyncio.shield(_disconnect(conn))
            await asyncio.sleep(backoff.next())

    async def _read_some(self, conn: Any) -> None:
        """Handle every reply the connection has (at most ``_YIELD_EVERY`` before letting the
        loop run), waiting for more when there is none; PING after ``_PING_EVERY_S`` idle.
        The replies come straight from redis-py's hiredis reader when it has one: a
        ``read_response`` per message costs a timeout context and several frames, which
        10,000 results landing at once would pay 10,000 times."""
        parser = getattr(conn, "_parser", None)
        reader = getattr(parser, "_reader", None)
        if _Reader is None or type(reader) is not _Reader:
            self._handle(await conn.read_response(timeout=math.inf, disconnect_on_error=False, push_request=True))
            return
        handled = 0
        while handled < _YIELD_EVERY:
            reply = reader.gets()
            if reply is _MORE or reply is False:
                if handled:
                    return
                try:
                    async with asyncio.timeout(_PING_EVERY_S):
                        await parser.read_from_socket()
                except TimeoutError:          # idle: prove the peer is alive
                    await conn.send_packed_command([pack_commands([("PING",)])], check_health=False)
                continue
            if isinstance(reply, redis.ConnectionError):
                raise reply
            self._handle(reply)
            handled += 1
        await asyncio.sleep(0)

    def _handle(self, reply: Any) -> None:
        if not isinstance(reply, (list, tuple)) or len(reply) < 3:
            return                            # PONG
        kind = reply[0]
        if kind == b"message":
            try:
                self._hub.offer([decode_status(reply[2])])
            except (StemError, ValueError, TypeError) as exc:
                log.warning("stem: ignored a message on %r that is no task status: %s", reply[1], exc)
        elif kind == b"subscribe":
            self._hub.confirmed([self._task_id(reply[1])])

    def _sync_commands(self, changes: list[tuple[str, bool]]) -> tuple[list[tuple], list[str]]:
        """The (UN)SUBSCRIBE commands ``changes`` call for, and the ids already subscribed
        (to read now)."""
        subscribed = self._subscribed
        to_sub: list[bytes] = []
        to_unsub: list[bytes] = []
        ready: list[str] = []
        for task_id, wanted in changes:
            ch = self._channel(task_id).encode()
            if wanted:
                if ch in subscribed:
                    ready.append(task_id)
                else:
                    subscribed.add(ch)
                    to_sub.append(ch)
            elif ch in subscribed:
                subscribed.discard(ch)
                to_unsub.append(ch)
        commands = [(command, *channels[i:i + _BATCH]) for command, channels in
                    (("SUBSCRIBE", to_sub), ("UNSUBSCRIBE", to_unsub)) for i in range(0, len(channels), _BATCH)]
        return commands, ready

    def _task_id(self, channel: bytes) -> str:
        return channel[len(self._prefix):len(channel) - len(self._suffix)].decode()

    async def stop(self) -> None:
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _disconnect(conn: Any) -> None:
    try:
        await conn.disconnect()
    except Exception:  # noqa: BLE001 - a broken socket may fail to close; it is gone either way
        pass
