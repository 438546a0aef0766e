"""``AsyncStem``: the producer for asyncio services, on native async clients.

What it shares with ``Stem`` (it wraps one, ``AsyncStem.sync``): every check,
the envelope, the frame and its signature, the keys of unique tasks and
explicit ids -- ``Stem._prepare_one`` / ``_plan_many`` build, ``AsyncStem``
only publishes what they built, and ``Stem._published_one`` /
``_finish_many`` turn the broker's answer into ids or ``DuplicateTaskError``.
So a call the sync producer refuses is refused here with the same error,
before anything is sent.

How it reaches each adapter (``_adapters``):

* Redis (broker and backend), plain or behind Sentinel (``redis+sentinel://``:
  ``redis.asyncio.sentinel`` connections, which ask the sentinels for the
  master as they connect): ``redis.asyncio``, one dedicated command
  connection (``stem.stores.redis_async``), shared by broker and backend on
  the same server, plus one pub/sub connection for every wait
  (``stem.backends.redis_async``): two connections in all.
* Postgres: psycopg's ``AsyncConnection`` (``stem.brokers.postgres_async``,
  ``stem.backends.postgres_async``): one command connection, one LISTEN
  connection for waits.
* Memory and SQLite (and any other adapter, and Redis Cluster, which has no
  asyncio client here yet): the sync adapter's calls run on
  a small executor of this producer (``_LOCAL_THREADS`` threads), never the
  loop's default one; their calls are short (in-process or one local file),
  and waits do not hold a thread: they re-read every waited id once per
  ``_LOCAL_POLL_S`` in one batched read, the way the SQLite backend's own
  waits poll.

Group commit: ``enqueue`` calls from many coroutines are coalesced.  A call
queues its built message and awaits; the first one schedules a flush for the
end of the current loop iteration, so every coroutine that got there in the
same iteration joins it; while a round trip is in flight, new calls gather
for the next.  Each round trip carries up to ``_MAX_BATCH`` messages (the
plain ones and the keyed ones in one pipeline on Redis), and each caller
gets its id only once its task is stored (or the error of its round trip).
A caller cancelled while its round trip is in flight does not unpublish it.

One event loop: an ``AsyncStem`` opens its connections on the loop of its
first call and must be used (and closed) on that loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any, AsyncIterator, Callable, Iterable, ParamSpec, Sequence, TypeVar

from .backends.waiting import WATCH, check_wait
from .backends.waiting_async import AsyncWaitHub
from .canvas_aio import AsyncCanvasHandle
from .brokers.base import FrameBatch, Keyed, Message, frame_messages
from .errors import BrokerError, ConfigurationError, InvalidTaskOptionsError, TaskTimeoutError
from .handles import AsyncTaskRef, TaskHandle
from .producer import BatchIds, Stem, WaitResult, as_completed_timeout, handle_arguments, with_handler_limits
from .results import TaskState, TaskStatus
from .revocation import revocation_args
from .signals import signals

__all__ = ["AsyncStem"]

P = ParamSpec("P")
R = TypeVar("R")

_MAX_BATCH = 2000          # messages per coalesced round trip
_LOCAL_THREADS = 2         # the executor of memory / SQLite adapters
_LOCAL_POLL_S = 0.05       # how often waits on memory / SQLite re-read (SQLite's own waits: the same)


class AsyncStem:
    """Awaitable twin of ``Stem`` for asyncio services.

    ``AsyncStem(broker, backend, registry, signer, default_queue=...)`` takes what
    ``Stem`` takes (or a ``Stem``).  Use it as ``async with AsyncStem(...) as stem:``
    or call ``await stem.close()``; inside a web app, open it in the lifespan
    (``examples/starlette_app.py``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.sync = args[0] if args and isinstance(args[0], Stem) else Stem(*args, **kwargs)
        self._publisher: Any = None
        self._results: Any = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._coalescer: _Coalescer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- adapters ---------------------------------------------------------------------
    def _ready(self) -> None:
        """Open the adapters on the running loop (first call); refuse another loop."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._closed:
            raise BrokerError("this AsyncStem is closed")
        if self._loop is not None:
            raise ConfigurationError("an AsyncStem is bound to the event loop of its first call; "
                                     "make one per event loop")
        self._loop = loop
        self._publisher, self._results = _adapters(self.sync, self._local)
        self._coalescer = _Coalescer(self.sync, self._publisher.publish, loop)

    def _local(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(_LOCAL_THREADS, thread_name_prefix="stem-aio")
        return self._executor

    def _require_results(self) -> Any:
        self.sync._require_backend()
        return self._results

    @property
    def round_trips(self) -> int:
        """Round trips this producer's publishes made (Redis and Postgres; for tests and benchmarks)."""
        return 0 if self._coalescer is None else self._coalescer.round_trips

    # -- publishing ---------------------------------------------------------------------
    async def enqueue(self, name: str, args: dict[str, Any] | None = None, *, options: Any = None,
                      meta: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                      countdown: float | None = None, eta: float | None = None, task_id: str | None = None,
                      parent: Any = None, on_duplicate: str = "return", idempotent_for: float | None = None) -> str:
        """``Stem.enqueue``, awaited: checked and framed (same errors; nothing of a refused
        call is sent), then stored in a round trip shared with the concurrent calls of other
        coroutines; returns once this task is stored.  A call with only a name and args (a
        str and a dict or None) is framed with the others of its round trip, in one
        ``encode_frames`` per task name (module docstring); any other is framed here.  So
        ``args`` is read when the round trip is framed, after this call yielded: do not
        change a dict passed here until the call returns."""
        coalescer = self._coalescer
        if (coalescer is not None and options is None and meta is None and headers is None and countdown is None
                and eta is None and task_id is None and parent is None and idempotent_for is None
                and on_duplicate == "return" and type(name) is str and (args is None or type(args) is dict)
                and coalescer.loop is asyncio.get_running_loop()):
            return await coalescer.submit_named(name, args)
        env, message, keyed = self.sync._prepare_one(name, args, options, meta, headers, countdown, eta, task_id,
                                                     parent, on_duplicate, idempotent_for)
        self._ready()
        assert self._coalescer is not None
        holder = await self._coalescer.submit(message, keyed)
        return self.sync._published_one(env, keyed, holder, task_id is not None, on_duplicate == "raise")

    async def call(self, handle: TaskHandle[P, R], /, *args: P.args, **kwargs: P.kwargs) -> AsyncTaskRef[R]:
        """``Stem.call``, awaited: the arguments are checked here, before the enqueue is awaited."""
        args_dict = handle_arguments(handle, args, kwargs)
        enqueue_options = handle.enqueue_options
        if self.sync.registry is None or handle.name not in self.sync.registry:
            enqueue_options = with_handler_limits(handle, enqueue_options)   # its limits travel (Stem.call)
        task_id = await self.enqueue(handle.name, args_dict, **enqueue_options)
        return AsyncTaskRef(self, task_id, handle.name)

    async def enqueue_many(self, items: Iterable[Any]) -> BatchIds:
        """``Stem.enqueue_many``, awaited: every item checked first, then one round trip
        (plain and keyed items in one pipeline on Redis)."""
        plan = self.sync._plan_many(items)
        self._ready()
        holders: list[str | None] = []
        if plan.frames is not None:
            queue, ids, frames, priority, vt = plan.frames
            await self._publisher.publish_frames(queue, ids, frames, priority=priority, visibility_timeout=vt)
        elif plan.messages or plan.keyed:
            holders = await self._publisher.publish(plan.messages, plan.keyed)
        if self._coalescer is not None:
            self._coalescer.round_trips += 1
        return self.sync._finish_many(plan, holders)

    # -- results ------------------------------------------------------------------------
    async def get_status(self, task_id: str) -> TaskStatus:
        """The latest status; PENDING when the backend knows nothing (yet) about the id."""
        if not isinstance(task_id, str) or not task_id:
            raise InvalidTaskOptionsError(f"task_id must be a non-empty string, got {task_id!r}")
        self._ready()
        status = await self._require_results().get(task_id)
        return status if status is not None else TaskStatus(id=task_id, state=TaskState.PENDING)

    async def wait_for_task(self, task_id: str, timeout: float = 30.0) -> TaskStatus:
        """``Stem.wait_for_task``, awaited, without a thread: the wait is registered with this
        producer's hub, which any number of waits share.  Cancelling it unregisters it."""
        ids, timeout, _ = check_wait([task_id], timeout, error=InvalidTaskOptionsError)
        self._ready()
        hub: AsyncWaitHub = self._require_results().hub
        deadline = time.monotonic() + timeout
        waiter = hub.open(ids, "ALL", keep_latest=True)
        try:
            await hub.wait(waiter, deadline)
        finally:
            hub.close(waiter)
        status = waiter.done.get(task_id) or waiter.latest or None
        if status is None or not status.is_terminal:
            state = "unknown" if status is None else status.state.value
            raise TaskTimeoutError(f"task {task_id} did not finish within {timeout}s (state: {state})")
        return status

    async def wait_many(self, task_ids: Iterable[str], timeout: float = 30.0,
                        return_when: str = "ALL") -> WaitResult:
        """``Stem.wait_many``, awaited (same arguments, same ``WaitResult``)."""
        ids, timeout, return_when = check_wait(task_ids, timeout, return_when, error=InvalidTaskOptionsError)
        self._ready()
        hub: AsyncWaitHub = self._require_results().hub
        if not ids:
            return WaitResult({}, [])
        waiter = hub.open(ids, return_when)
        try:
            await hub.wait(waiter, time.monotonic() + timeout)
        finally:
            hub.close(waiter)
        done = dict(waiter.done)
        return WaitResult(done, [i for i in ids if i not in done])

    def as_completed(self, task_ids: Iterable[str], timeout: float = 30.0) -> AsyncIterator[TaskStatus]:
        """``Stem.as_completed`` as an async iterator: each terminal status as it arrives,
        then ``TaskTimeoutError`` naming the ids still pending at ``timeout``.  Arguments are
        checked here, not at the first step."""
        ids, timeout, _ = check_wait(task_ids, timeout, error=InvalidTaskOptionsError)
        self.sync._require_backend()
        return self._as_completed(ids, timeout)

    async def _as_completed(self, ids: list[str], timeout: float) -> AsyncIterator[TaskStatus]:
        self._ready()
        hub: AsyncWaitHub = self._results.hub
        deadline = time.monotonic() + timeout
        pending = dict.fromkeys(ids)
        if ids:
            waiter = hub.open(ids, WATCH)
            try:
                while pending:
                    got = await hub.take(waiter, deadline)
                    if not got and (time.monotonic() >= deadline or not waiter.pending):
                        break
                    for status in got:
                        pending.pop(status.id, None)
                        yield status
            finally:
                hub.close(waiter)
        if pending:
            raise as_completed_timeout(pending, ids, timeout)

    async def apply(self, canvas: Any, *, creation_timeout: float = 600.0,
                    canvas_id: str | None = None) -> AsyncCanvasHandle:
        """``Stem.apply``, awaited; returns an ``AsyncCanvasHandle`` (``await h.wait()``,
        ``await h.results()``, ``await h.status()``, ``await h.progress()``), whose waits and
        reads go through this producer's async clients.  Starting the canvas itself runs the
        sync producer on this producer's executor: a group is created, its members published
        and it is sealed through the sync backend's group operations, once per canvas (the
        members of one task in one batch), which the coalesced path does not carry."""
        handle = await self.offload(lambda: self.sync.apply(canvas, creation_timeout=creation_timeout,
                                                            canvas_id=canvas_id))
        return AsyncCanvasHandle(self, handle.id, handle.kind, handle.steps)

    async def offload(self, fn: Callable[..., R], *args: Any) -> R:
        """``fn(*args)`` -- sync code on this producer's sync adapters (``self.sync``) -- run on
        this producer's small executor, never the loop's default pool: what the parts without
        an asyncio client run through (``apply``, ``Workflows.astart`` and ``asend``)."""
        self._ready()
        return await asyncio.get_running_loop().run_in_executor(self._local(), fn, *args)

    async def canvas_handle(self, canvas_id: str) -> AsyncCanvasHandle:
        """The handle of a canvas started anywhere, by its id (``Stem.canvas_handle``)."""
        return await AsyncCanvasHandle.from_id(self, canvas_id)

    def _group_reads(self) -> Any:
        """What ``AsyncCanvasHandle`` reads statuses and group records through (the results
        adapter: native on Redis and Postgres)."""
        self._ready()
        return self._require_results()

    async def revoke(self, task_ids: str | Sequence[str], expires: float | None = None) -> None:
        """``Stem.revoke``, awaited (signed proofs when the producer has a signer)."""
        backend = self.sync._require_backend()
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        args = revocation_args(backend.result_expires, ids, expires, self.sync.signer)
        if args is None:
            return
        self._ready()
        await self._results.revoke(*args)

    # -- lifetime -----------------------------------------------------------------------
    async def close(self) -> None:
        """Close the async connections, then the sync producer's adapters.  Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._coalescer is not None:
            await self._coalescer.drain()
        for part in (self._results, self._publisher):
            if part is not None:
                await part.close()
        self.sync.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> "AsyncStem":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _Coalescer:
    """Group commit of single enqueues (see the module docstring).

    Two kinds of call wait here: ``submit`` takes a message (or keyed message) its caller
    built, and answers the broker's holder for it; ``submit_named`` takes a name and
    args, builds nothing, and answers the task id: the flush frames every such call of a
    round trip at once, one ``Stem._named_frames`` (a template lookup, one ``encode_frames``
    in C, one batch of ids) per task name, and falls back to ``Stem._build`` call by call
    for a name whose tasks need their own message (unique, limited, publish signals) or
    whose batch does not encode (each caller then gets its own error).  Each caller has
    one future and nothing else: no task, no closure.  A call whose caller was cancelled
    before its round trip started is dropped; one cancelled while its round trip is in
    flight is stored all the same."""

    def __init__(self, stem: Stem, publish: Callable[..., Any], loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._stem = stem
        self._publish = publish
        # the submit_named calls, in three parallel lists: no tuple per call (each pending call's
        # objects live across round trips, and what survives collections is what makes the
        # collector's full passes run)
        self._names: list[str] = []
        self._args: list[dict[str, Any] | None] = []
        self._futures: list[asyncio.Future] = []
        self._built: list[tuple[Message | Keyed, asyncio.Future, Any]] = []
        self._flusher: asyncio.Task | None = None
        self.round_trips = 0

    def submit(self, message: Message, keyed: Keyed | None) -> asyncio.Future:
        future = self.loop.create_future()
        self._built.append((message if keyed is None else keyed, future, None))
        if self._flusher is None:
            self._flusher = self.loop.create_task(self._flush())
        return future

    def submit_named(self, name: str, args: dict[str, Any] | None) -> asyncio.Future:
        future = self.loop.create_future()
        self._names.append(name)
        self._args.append(args)
        self._futures.append(future)
        if self._flusher is None:
            self._flusher = self.loop.create_task(self._flush())
        return future

    def _frame_named(self, named: Iterable[tuple[str, dict[str, Any] | None, asyncio.Future]], frames: list,
                     framed: list, built: list) -> None:
        """Frame the ``submit_named`` calls of one round trip: into ``frames`` (publish_frames
        batches) and ``framed`` (their ids and futures, in order), or, one by one, ``built``
        (with their Envelope: the flush turns the holder into the id)."""
        stem = self._stem
        now = time.time()
        groups: dict[str, tuple[list, list]] = {}
        for name, args, future in named:
            if future.done():               # cancelled before its round trip: nothing to send
                continue
            group = groups.get(name)
            if group is None:
                group = groups[name] = ([], [])
            group[0].append({} if args is None else args)
            group[1].append(future)
        signalled = signals.before_task_publish.receivers or signals.after_task_publish.receivers
        for name, (args_list, futures) in groups.items():
            try:
                batch = None if signalled else stem._named_frames(name, None, args_list, now)
            except Exception as exc:        # noqa: BLE001 - the name's own error (unknown task, bad name)
                _fail(futures, exc)
                continue
            if batch is not None:
                frames.append(batch)
                framed.append((batch[1], futures))
                continue
            for args, future in zip(args_list, futures):
                try:
                    env, message, keyed = stem._build(name, args, None, None, None, None, None, None, None, now)
                except Exception as exc:    # noqa: BLE001 - this caller's error, as enqueue would raise it
                    future.set_exception(exc)
                    continue
                built.append((message if keyed is None else keyed, future, env))

    async def _flush(self) -> None:
        batch: list[asyncio.Future] = []      # the futures of the round trip being made
        try:
            await asyncio.sleep(0)            # let the coroutines of this loop iteration join
            while self._futures or self._built:
                count = min(len(self._futures), _MAX_BATCH)
                names, args, futures = self._names[:count], self._args[:count], self._futures[:count]
                del self._names[:count], self._args[:count], self._futures[:count]
                room = _MAX_BATCH - count
                built = [entry for entry in self._built[:room] if not entry[1].done()]
                del self._built[:room]
                batch = futures + [future for _, future, _ in built]
                frames: list = []
                framed: list = []
                if count:
                    self._frame_named(zip(names, args, futures), frames, framed, built)
                messages = [m for m, _, _ in built if type(m) is Message]
                keyed = [k for k, _, _ in built if type(k) is Keyed]
                if not (frames or messages or keyed):
                    continue
                try:
                    self.round_trips += 1
                    holders = iter(await self._publish(messages, keyed, frames))
                except Exception as exc:  # noqa: BLE001 - each caller gets its round trip's error
                    _fail(batch, exc)
                    continue
                for ids, futures in framed:
                    for task_id, future in zip(ids, futures):
                        if not future.done():
                            future.set_result(task_id)
                for item, future, env in built:
                    holder = next(holders) if type(item) is Keyed else None
                    if future.done():
                        continue
                    if env is None:
                        future.set_result(holder)
                        continue
                    try:
                        future.set_result(self._stem._published_one(env, item if type(item) is Keyed else None,
                                                                     holder, False, False))
                    except Exception as exc:  # noqa: BLE001 - a publish signal's receiver failed
                        future.set_exception(exc)
        except BaseException as exc:
            # the flush itself was cancelled or broke: no caller is left waiting for it (those
            # queued after are cancelled with it; a later call starts a new flush)
            _fail(batch, exc)
            _fail(self._futures, exc)
            _fail([future for _, future, _ in self._built], exc)
            del self._names[:], self._args[:], self._futures[:], self._built[:]
            raise
        finally:
            self._flusher = None

    async def drain(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)


def _fail(futures: Iterable[asyncio.Future], exc: BaseException) -> None:
    """Each future not done yet gets ``exc`` (cancelled, for a cancellation)."""
    cancelled = isinstance(exc, asyncio.CancelledError)
    for future in futures:
        if not future.done():
            if cancelled:
                future.cancel()
            else:
                future.set_exception(exc)


# -- the adapters ------------------------------------------------------------------------

def _adapters(stem: Stem, local: Callable[[], concurrent.futures.Executor]) -> tuple[Any, Any]:
    """(publisher, results) for ``stem``'s broker and backend: native where there is a native
    async client, on the ``local`` executor otherwise.  Broker and backend on one Redis share
    one command connection."""
    from .backends.postgres import PostgresResultBackend
    from .backends.redis import RedisResultBackend
    from .brokers.postgres import PostgresBroker
    from .brokers.redis import RedisBroker
    from .stores.redis_cluster import is_cluster_url
    broker, backend = stem.broker, stem.backend
    publisher: Any
    results: Any = None
    if isinstance(broker, RedisBroker) and not is_cluster_url(broker.url):
        from .brokers.redis_async import AsyncRedisPublisher
        publisher = AsyncRedisPublisher(broker)
        if isinstance(backend, RedisResultBackend):
            from .backends.redis_async import AsyncRedisResults
            results = AsyncRedisResults(backend, publisher.store if backend.shares_store_with(broker) else None)
    elif isinstance(broker, PostgresBroker):
        from .brokers.postgres_async import AsyncPostgresPublisher
        publisher = AsyncPostgresPublisher(broker)
    else:
        publisher = _LocalPublisher(broker, local)
    if results is None and backend is not None:
        if isinstance(backend, RedisResultBackend) and not is_cluster_url(backend.url):
            from .backends.redis_async import AsyncRedisResults
            results = AsyncRedisResults(backend)
        elif isinstance(backend, PostgresResultBackend):
            from .backends.postgres_async import AsyncPostgresResults
            results = AsyncPostgresResults(backend)
        else:
            results = _LocalResults(backend, local)
    return publisher, results


class _LocalPublisher:
    """A sync broker (memory, SQLite) on the producer's small executor."""

    def __init__(self, broker: Any, local: Callable[[], concurrent.futures.Executor]):
        self.broker = broker
        self._local = local

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._local(), fn, *args)

    async def publish(self, messages: Sequence[Message], keyed: Sequence[Keyed],
                      frames: Sequence[FrameBatch] = ()) -> list[str | None]:
        if frames:
            messages = [*messages, *frame_messages(frames)]
        return await self._run(self._publish, messages, keyed)

    def _publish(self, messages: Sequence[Message], keyed: Sequence[Keyed]) -> list[str | None]:
        if messages:
            self.broker.publish_many(messages)
        return self.broker.publish_keyed(keyed) if keyed else []

    async def publish_frames(self, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], *,
                             priority: int = 0, visibility_timeout: float | None = None) -> None:
        await self._run(lambda: self.broker.publish_frames(queue, task_ids, frames, priority=priority,
                                                           visibility_timeout=visibility_timeout))

    async def close(self) -> None:
        pass


class _LocalResults:
    """A sync backend (memory, SQLite) on the producer's small executor; waits poll (module docstring)."""

    def __init__(self, backend: Any, local: Callable[[], concurrent.futures.Executor]):
        self.backend = backend
        self._local = local
        self.hub = AsyncWaitHub(read=self.read_found, poll=lambda: _LOCAL_POLL_S, label=str(backend.url))

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._local(), fn, *args)

    def workflow_store_recipe(self) -> tuple[str, Any] | None:
        return self.backend.workflow_store_recipe()

    async def get(self, task_id: str) -> TaskStatus | None:
        return await self._run(self.backend.get, task_id)

    async def read_found(self, task_ids: list[str]) -> list[TaskStatus]:
        return [s for s in await self._run(self.backend.get_many, task_ids) if s is not None]

    async def get_many(self, task_ids: list[str]) -> list[TaskStatus | None]:
        return await self._run(self.backend.get_many, task_ids)

    async def group_get(self, group_id: str) -> Any:
        return await self._run(self.backend.group_get, group_id)

    async def group_outcomes(self, group_id: str, start: int, stop: int) -> list[bytes | None]:
        return await self._run(self.backend.group_outcomes, group_id, start, stop)

    async def revoke(self, task_ids: list[str], expires: float | None, proofs: Any) -> None:
        await self._run(lambda: self.backend.revoke(task_ids, expires, proofs=proofs))

    async def close(self) -> None:
        await self.hub.stop()

