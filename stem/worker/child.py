"""A child process: decode, run the handler, encode the outcome.  Nothing else.

What travels between the supervisor and a child is ``stem.worker.protocol``.

Soft time limits are the child's own business (a SIGALRM timer raises
``SoftTimeLimitExceeded`` inside the task), so a late signal can never hit the
next task.  SIGUSR2 asks the running task to stop (``WorkerShutdown``: a soft
shutdown).  SIGINT/SIGTERM/SIGQUIT are ignored: the supervisor decides.

A child that runs one task at a time holds back each Result until it has
looked at its ring once more and claimed the next OFFER found there: when
the supervisor reads the Result, that offer is settled (claimed or not), so
it can offer another at once.  The Result of a short task goes out without
waking the supervisor while more offers wait (``QUIET_AHEAD`` below).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from typing import Any

import msgspec

from ..envelope import decode_frame
from ..errors import ConfigurationError, DecodeError, EncodeError, SoftTimeLimitExceeded, UnknownTaskError, WorkerShutdown
from ..logs import enter_task_context, run_in_task_context
from ..results import Reason
from ..task import TaskContext, TaskOptions, TaskRegistry, load_registry
from .execution import Outcome, apply_handler_options, is_expired, run_handler, run_handler_async
from .channel import Channel, ChannelHandle
from .protocol import (ChildExit, Enqueue, Fatal, Heartbeat, Offer, Progress, Ready, Result, Stop,
                       decode_to_child, encode_message)
from .sched import normal_policy

__all__ = ["child_main", "spawn_entry", "ChildProcess", "QUIET_AHEAD", "QUIET_RUN_LIMIT"]

#: A child running a stream of short offered tasks sends a Result without waking the
#: supervisor while at least QUIET_AHEAD more tasks wait in its ring behind the one it
#: starts: the supervisor has nothing to do for it yet, and reads the quiet Results
#: with the next one that rings (this child's, when its queue runs low, or another
#: child's) or at its next timeout (at most ``outbox.IDLE_WAIT``, 50 ms).  A wake-up
#: costs the supervisor about as much CPU as the rest of its work for a short task
#: (benchmarks/README.md); a task that ran QUIET_RUN_LIMIT seconds or more always rings.
#: With QUIET_AHEAD = 1 the children ran dry waiting for their next offers.
QUIET_AHEAD = 2
QUIET_RUN_LIMIT = 0.001


_encode = encode_message
_ITIMER_REAL = signal.ITIMER_REAL


class _ChildRuntime:
    """``ctx.heartbeat/progress/enqueue`` from inside a child: messages to the supervisor."""

    def __init__(self, channel: Channel, registry: TaskRegistry, can_sign: bool = True,
                 backend_recipe: Any = None, broker_recipe: Any = None, signer: Any = None):
        self.channel = channel
        self.registry = registry
        self.can_sign = can_sign
        self.backend_recipe = backend_recipe
        self.broker_recipe = broker_recipe
        self.signer = signer
        self._backend = None
        self._producer = None

    def _open_backend(self, why: str):
        if self._backend is None:
            if not self.backend_recipe:
                raise ConfigurationError(
                    f"{why} the result backend, which a child process cannot reach (an in-memory backend): "
                    "run the worker with isolation='inline', or use a backend processes share (sqlite file, "
                    "redis, postgres)")
            from ..backends import from_url
            url, options = self.backend_recipe
            self._backend = from_url(url, **options)
        return self._backend

    def group_results(self, group_id: str):
        """A chord callback's ``ctx.previous``: read from the result backend by this child
        (its own connection, opened on first use), page by page."""
        from ..canvas import GroupResults
        return GroupResults(self._open_backend("a chord callback reads its members' results from"), group_id)

    def producer(self):
        """``ctx.producer()`` in a child: its own connections to the worker's broker and backend
        (opened on first use, kept for the child's life), signing with the worker's signer."""
        if self._producer is None:
            if not self.broker_recipe:
                raise ConfigurationError(
                    "a task's producer publishes to the broker, which a child process cannot reach (an "
                    "in-memory broker): run the worker with isolation='inline', or use a broker processes "
                    "share (sqlite file, redis, postgres)")
            if self.signer is not None and not self.can_sign:
                raise ConfigurationError("this worker verifies signatures but has no signing key: a task's "
                                         "producer could not sign what it publishes")
            backend = self._open_backend("a task's producer reads and writes")
            from ..brokers import from_url
            from ..producer import Stem
            url, options = self.broker_recipe
            self._producer = Stem(from_url(url, **options), backend, None, self.signer)
        return self._producer

    def _send(self, msg) -> None:
        self.channel.send_wait([_encode(msg)], 30.0)

    def heartbeat(self, task_id: str) -> None:
        self._send(Heartbeat(task_id))

    def progress(self, task_id: str, fraction: float, data: Any) -> None:
        self._send(Progress(task_id, fraction, data))

    def enqueue(self, name: str, args, options: TaskOptions | None, parent: TaskContext) -> str:
        self.registry.get(name)  # an unknown name fails in the task, like a producer's enqueue
        if not self.can_sign:
            raise ConfigurationError(
                f"cannot enqueue {name!r} from a task: this worker verifies signatures but has no signing key "
                "(STEM_SIGNING_PUBLIC_KEYS only); give it a private key (STEM_SIGNING_KEYS) to let tasks enqueue")
        new_id = uuid.uuid4().hex
        opts = None if options is None else msgspec.structs.asdict(options)
        try:
            msg = _encode(Enqueue(new_id, name, args or {}, opts, parent.id, parent.root_id))
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            raise EncodeError(f"args of child task {name!r} cannot be encoded: {exc}") from None
        self.channel.send_wait([msg], 30.0)
        return new_id


class ChildProcess:
    def __init__(self, channel: Channel, registry: TaskRegistry, params: dict[str, Any]):
        self.channel = channel
        self.registry = registry
        self.runtime = _ChildRuntime(channel, registry, bool(params.get("can_sign", True)),
                                     params.get("backend_recipe"), params.get("broker_recipe"), params.get("signer"))
        self.measure_rss = bool(params.get("measure_rss"))
        self.concurrency = int(params.get("child_concurrency", 1))
        self.supervisor_pid = int(params["supervisor_pid"])
        self.worker_id = params.get("worker_id")
        self.running = 0
        self.stopping = False
        self._proc = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # name -> handler: the registry a child was forked with never changes
        self._handlers: dict[str, Any] = {}

    def rss(self) -> int:
        if not self.measure_rss:
            return 0
        if self._proc is None:
            import psutil
            self._proc = psutil.Process()
        return self._proc.memory_info().rss

    def supervisor_alive(self) -> bool:
        try:
            os.kill(self.supervisor_pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    # -- one task ---------------------------------------------------------------------
    def prepare(self, seq: int, frame: bytes):
        """Decode, look up and check the deadline; returns (env, handler) or an error Outcome
        (an expired task's says so: the supervisor settles it REVOKED, ``expired``)."""
        try:
            env = decode_frame(frame)
        except DecodeError as exc:
            return None, Outcome.failed("", Reason.DECODE_ERROR, str(exc), "DecodeError", retryable=False)
        handler = self._handlers.get(env.name)
        if handler is None:
            try:
                handler = self._handlers[env.name] = self.registry.get(env.name)
            except UnknownTaskError as exc:
                return None, Outcome.failed(env.id, Reason.UNKNOWN_TASK, str(exc), "UnknownTaskError",
                                            retryable=False)
        if env.unset_options:
            apply_handler_options(env, handler)   # as the supervisor did: its soft limit is ours to keep
        if is_expired(env, time.time()):   # it may have waited in the ring (an offer) past its deadline
            return None, Outcome.expired(env.id, env.expires_at)
        return (env, handler), None

    def context(self, env) -> TaskContext:
        return TaskContext(env.id, env.name, env.attempt, env.meta, env.headers, env.queue, env.max_retries,
                           env.root_id, self.runtime, env.canvas)

    def report(self, seq: int, out: Outcome) -> None:
        self.send_result(self.result(seq, out))

    def result(self, seq: int, out: Outcome) -> bytes:
        """The encoded Result (an unencodable return value becomes an error outcome)."""
        rss = self.rss() if self.measure_rss else 0
        try:
            payload = _encode(Result(seq, out, rss))
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            out = Outcome.failed(out.task_id, Reason.RESULT_NOT_ENCODABLE,
                                 f"task returned a value msgpack cannot encode ({type(out.result).__name__}): {exc}",
                                 "EncodeError", started_at=out.started_at, finished_at=out.finished_at,
                                 retryable=False)
            payload = _encode(Result(seq, out, rss))
        return payload

    def send_result(self, payload: bytes, quiet: bool = False) -> None:
        """Send a Result; ``quiet`` does not wake a sleeping supervisor for it (``serve``)."""
        if (self.channel.send_quiet if quiet else self.channel.send)(payload):
            return
        while not self.channel.send_wait([payload], 1.0):
            if not self.supervisor_alive():
                os._exit(ChildExit.SUPERVISOR_GONE)

    def run_sync(self, seq: int, frame: bytes) -> tuple[bytes, float]:
        """Run one task; returns its encoded Result, for ``serve`` to send, and how long it ran."""
        prepared, error = self.prepare(seq, frame)
        if error is not None:
            return self.result(seq, error), 0.0
        env, handler = prepared
        ctx = self.context(env)
        limit = env.soft_time_limit
        self.running = 1
        if limit:  # no timer syscalls for the (common) task without a soft limit
            signal.setitimer(_ITIMER_REAL, limit)
        try:
            if handler.is_async:
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                out = run_in_task_context(env, self.worker_id, self._loop.run_until_complete,
                                          run_handler_async(handler, ctx, env.args, check_result=False))
            else:
                out = run_in_task_context(env, self.worker_id, run_handler, handler, ctx, env.args, False)
        finally:
            if limit:
                signal.setitimer(_ITIMER_REAL, 0)
            self.running = 0
        return self.result(seq, out), out.finished_at - out.started_at

    # -- loops ------------------------------------------------------------------------
    def serve(self) -> int:
        if self.concurrency > 1:
            return asyncio.run(self.serve_async())
        channel = self.channel
        held = None   # the last task's Result, sent once the ring was looked at again
        short = False   # that task ran for less than QUIET_RUN_LIMIT
        while True:
            if held is None:
                msgs = channel.recv_wait(1.0, 64)
                if not msgs:
                    if not self.supervisor_alive():
                        return ChildExit.SUPERVISOR_GONE
                    continue
            else:
                msgs = channel.recv_many(64)
                if not msgs:
                    self.send_result(held)
                    held = None
                    continue
            last = len(msgs) - 1
            for i, raw in enumerate(msgs):
                msg = decode_to_child(raw)
                kind = type(msg)
                if kind is Offer and not channel.claim(msg.seq, msg.slot):
                    continue   # taken back: another child runs it
                if held is not None:
                    ahead = last - i
                    self.send_result(held, short and (ahead >= QUIET_AHEAD or
                                                      (ahead == QUIET_AHEAD - 1 and channel.pending_bytes() > 0)))
                    held = None
                if kind is Stop:
                    return ChildExit.OK
                held, ran = self.run_sync(msg.seq, msg.frame)
                short = ran < QUIET_RUN_LIMIT

    async def serve_async(self) -> int:
        """Up to ``child_concurrency`` tasks at once on one event loop (async handlers;
        sync handlers run in the loop's default executor)."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(self.channel.fileno(), readable.set)
        tasks: set[asyncio.Task] = set()
        slots = asyncio.Semaphore(self.concurrency)
        stop = False

        async def run_one(seq: int, frame: bytes) -> None:
            try:
                prepared, error = self.prepare(seq, frame)
                if error is not None:
                    self.report(seq, error)
                    return
                env, handler = prepared
                enter_task_context(env, self.worker_id)  # this asyncio task's own context
                coro = run_handler_async(handler, self.context(env), env.args, check_result=False)
                if env.soft_time_limit:
                    started = time.time()
                    try:
                        out = await asyncio.wait_for(coro, env.soft_time_limit)
                    except asyncio.TimeoutError:
                        exc = SoftTimeLimitExceeded(f"soft time limit of {env.soft_time_limit}s exceeded")
                        out = Outcome.failed(env.id, Reason.SOFT_TIME_LIMIT, str(exc), "SoftTimeLimitExceeded",
                                             started_at=started)
                else:
                    out = await coro
                self.report(seq, out)
            finally:
                slots.release()

        while not (stop and not tasks):
            msgs = self.channel.recv_many(64)
            if not msgs:
                if stop:
                    await asyncio.wait(tasks)
                    continue
                if self.channel.arm_doorbell():
                    readable.clear()
                    try:
                        await asyncio.wait_for(readable.wait(), 1.0)
                    except asyncio.TimeoutError:
                        if not self.supervisor_alive():
                            return ChildExit.SUPERVISOR_GONE
                    finally:
                        self.channel.disarm_doorbell()
                continue
            for raw in msgs:
                msg = decode_to_child(raw)
                if type(msg) is Stop:
                    stop = True
                    continue
                if type(msg) is Offer and not self.channel.claim(msg.seq, msg.slot):
                    continue
                await slots.acquire()
                t = asyncio.ensure_future(run_one(msg.seq, msg.frame))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        loop.remove_reader(self.channel.fileno())
        return ChildExit.OK


def _install_child_signals(child: ChildProcess) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)

    def soft_limit(signum, frame):
        if child.running:
            raise SoftTimeLimitExceeded("soft time limit exceeded")

    def soft_shutdown(signum, frame):
        if child.running:
            raise WorkerShutdown("the worker is shutting down")

    signal.signal(signal.SIGALRM, soft_limit)
    signal.signal(signal.SIGUSR2, soft_shutdown)


def child_main(handle: ChannelHandle, params: dict[str, Any], registry: TaskRegistry | None = None) -> int:
    """Entry point in the child (forked from the zygote, or spawned)."""
    try:
        channel = Channel.attach(handle)
    except Exception as exc:  # noqa: BLE001
        import sys
        print(f"stem child {os.getpid()}: cannot attach its channel: {exc}", file=sys.stderr)
        return ChildExit.STARTUP_FAILED
    try:
        if params.get("normal_policy"):
            normal_policy()
        if registry is None:
            registry = params["registry"]
        child = ChildProcess(channel, registry, params)
        _install_child_signals(child)
        channel.send_wait([_encode(Ready(os.getpid()))], 10.0)
        return child.serve()
    except Exception as exc:  # noqa: BLE001 - the supervisor gets the reason, then we exit
        import traceback
        text = "".join(traceback.format_exception(exc))
        try:
            channel.send_wait([_encode(Fatal(text))], 5.0)
        except Exception:  # noqa: BLE001
            pass
        return ChildExit.STARTUP_FAILED
    finally:
        channel.close()


def spawn_entry(handle: ChannelHandle, params: dict[str, Any], registry_ref: Any) -> None:
    """``multiprocessing`` target for ``start_method="spawn"``: load the registry, then serve."""
    try:
        registry = _load_registry(registry_ref)
    except Exception as exc:  # noqa: BLE001
        import sys
        import traceback
        print(f"stem child {os.getpid()}: cannot load the task registry: {exc}", file=sys.stderr)
        traceback.print_exc()
        # tell the supervisor why, over the channel, then exit with the named code
        try:
            channel = Channel.attach(handle)
            channel.send_wait([_encode(Fatal(f"cannot load the task registry: {exc!r}"))], 5.0)
            channel.close()
        finally:
            os._exit(ChildExit.STARTUP_FAILED)
    os._exit(child_main(handle, params, registry))


def _load_registry(ref: Any) -> TaskRegistry:
    return ref if isinstance(ref, TaskRegistry) else load_registry(str(ref))
