"""The control plane: commands to running workers, over the broker in use.

Every worker listens on its own control queue (``stem.control.<worker id>``)
with a small thread of its own, so a command is served even while the
worker's prefetch is full or a queue is paused.  A broadcast goes to *every*
live worker: the controller reads the live workers from the heartbeat store
and publishes one command per worker (a broadcast consumed by only one
worker is a bug other systems have).  Replies come back on a one-off queue
(``stem.reply.<request id>``) until every targeted worker answered or the
timeout passed.  Commands and replies are ordinary frames, so they are
signed and verified exactly like tasks when a signer is configured; a worker
ignores a control frame that fails verification.  Queue names under
``stem.`` are the control plane's own and hidden from ``stem queues``.

This works unchanged on every broker (memory, SQLite, Redis, Postgres): it
needs only the ``Broker`` protocol and the heartbeat store of the result
backend.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Sequence

from .brokers.base import Broker, Message
from .backends.base import ResultBackend
from .envelope import Envelope, decode_frame, encode_frame
from .errors import ConfigurationError, ControlError, SignatureError, StemError, DecodeError
from .signals import signals

if TYPE_CHECKING:
    from .worker.worker import Worker

__all__ = ["Control", "ControlServer", "COMMANDS", "control_queue", "is_internal_queue"]

log = logging.getLogger("stem.control")

COMMANDS = ("ping", "inspect", "stats", "revoke", "shutdown", "pause", "resume", "pool_grow", "pool_shrink")
_PREFIX = "stem."
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-]")
COMMAND_TTL = 60.0


def control_queue(worker_id: str) -> str:
    return (_PREFIX + "control." + _UNSAFE.sub("_", worker_id))[:128]


def is_internal_queue(name: str) -> bool:
    return name.startswith(_PREFIX)


class Control:
    """The controller side: ``Control(broker, backend, signer).ping()``."""

    def __init__(self, broker: Broker, backend: ResultBackend, signer: Any = None):
        if not isinstance(broker, Broker):
            raise ConfigurationError(f"Control needs a Broker, got {broker!r}")
        if not isinstance(backend, ResultBackend):
            raise ConfigurationError("the control plane finds workers through their heartbeats: it needs a "
                                     "result backend")
        self.broker = broker
        self.backend = backend
        self.signer = signer

    def workers(self) -> list[dict[str, Any]]:
        """Live workers, from their heartbeats."""
        return sorted(self.backend.heartbeats(), key=lambda h: h["worker_id"])

    def _targets(self, workers: Sequence[str] | None) -> list[str]:
        live = [h["worker_id"] for h in self.workers()]
        if not workers:
            return live
        chosen = []
        for wanted in workers:
            matches = [w for w in live if w == wanted or w.startswith(wanted)]
            if not matches:
                raise ControlError(f"no live worker matches {wanted!r}; live: {', '.join(live) or 'none'}")
            chosen += [m for m in matches if m not in chosen]
        return chosen

    def broadcast(self, command: str, arguments: dict[str, Any] | None = None, *,
                  workers: Sequence[str] | None = None, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Send ``command`` to the chosen (default: all live) workers and collect
        their replies for up to ``timeout`` seconds.  Each reply is a dict with
        ``worker`` and ``reply`` (or ``error``)."""
        if command not in COMMANDS:
            raise ControlError(f"unknown control command {command!r}; known: {', '.join(COMMANDS)}")
        if not timeout > 0:
            raise ControlError(f"timeout must be > 0 seconds, got {timeout!r}")
        targets = self._targets(workers)
        if not targets:
            return []
        request_id = uuid.uuid4().hex
        reply_queue = _PREFIX + "reply." + request_id
        now = time.time()
        messages = []
        for worker_id in targets:
            env = Envelope(id=uuid.uuid4().hex, name=_PREFIX + "control." + command, args=arguments or {},
                           meta={"reply_to": reply_queue, "request_id": request_id, "target": worker_id},
                           queue=control_queue(worker_id), enqueued_at=now, expires_at=now + COMMAND_TTL)
            messages.append(Message(env.id, env.queue, encode_frame(env, self.signer), 9, None, COMMAND_TTL))
        self.broker.publish_many(messages)
        replies: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(replies) < len(targets):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                got = self.broker.consume([reply_queue], len(targets), min(remaining, 0.5))
                for d in got:
                    try:
                        env = decode_frame(d.frame, self.signer)
                    except (SignatureError, DecodeError) as exc:
                        log.warning("ignored a control reply that failed verification: %s", exc)
                        continue
                    finally:
                        self.broker.ack([d])
                    if env.meta.get("request_id") == request_id:
                        replies[env.args["worker"]] = dict(env.args)
        finally:
            try:
                self.broker.purge(reply_queue)
            except StemError:
                pass
        return [replies[w] for w in targets if w in replies]

    # -- the commands -----------------------------------------------------------------
    def ping(self, workers=None, timeout: float = 2.0):
        return self.broadcast("ping", workers=workers, timeout=timeout)

    def inspect(self, workers=None, timeout: float = 2.0):
        return self.broadcast("inspect", workers=workers, timeout=timeout)

    def stats(self, workers=None, timeout: float = 2.0):
        return self.broadcast("stats", workers=workers, timeout=timeout)

    def revoke(self, task_ids: Sequence[str], *, terminate: bool = False, workers=None, timeout: float = 2.0,
               expires: float | None = None):
        """Persistently revoke (a worker started later honours it too) and tell live workers;
        ``terminate`` also kills a task that is running now."""
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        if not ids or not all(isinstance(i, str) and i for i in ids):
            raise ControlError("revoke needs one or more task ids")
        self.backend.revoke(ids, expires)
        return self.broadcast("revoke", {"ids": ids, "terminate": bool(terminate)}, workers=workers,
                              timeout=timeout)

    def shutdown(self, mode: str = "warm", workers=None, timeout: float = 2.0):
        if mode not in ("warm", "soft", "hard"):
            raise ControlError(f"shutdown mode must be warm, soft or hard, got {mode!r}")
        return self.broadcast("shutdown", {"mode": mode}, workers=workers, timeout=timeout)

    def pause(self, queue: str, workers=None, timeout: float = 2.0):
        return self.broadcast("pause", {"queue": queue}, workers=workers, timeout=timeout)

    def resume(self, queue: str, workers=None, timeout: float = 2.0):
        return self.broadcast("resume", {"queue": queue}, workers=workers, timeout=timeout)

    def pool_grow(self, n: int = 1, workers=None, timeout: float = 2.0):
        return self.broadcast("pool_grow", {"n": _count(n)}, workers=workers, timeout=timeout)

    def pool_shrink(self, n: int = 1, workers=None, timeout: float = 2.0):
        return self.broadcast("pool_shrink", {"n": _count(n)}, workers=workers, timeout=timeout)


def _count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ControlError(f"n must be an integer >= 1, got {n!r}")
    return n


class ControlServer:
    """The worker side: a thread serving the worker's control queue."""

    def __init__(self, worker: "Worker"):
        self.worker = worker
        self.queue = control_queue(worker.id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stem-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self.worker.broker.purge(self.queue)
        except StemError:
            pass

    def _loop(self) -> None:
        broker = self.worker.broker
        backoff = 0.0
        while not self._stop.is_set():
            try:
                deliveries = broker.consume([self.queue], 16, 0.5, consumer=self.worker.id)
                backoff = 0.0
            except StemError as exc:
                backoff = min(max(backoff * 2, 0.1), 5.0)
                log.debug("control queue unreachable (%s)", exc)
                self._stop.wait(backoff)
                continue
            except Exception:  # noqa: BLE001 - as in the fetcher: never let a bug stop the control plane
                backoff = min(max(backoff * 2, 0.1), 5.0)
                log.exception("control queue consume failed unexpectedly")
                self._stop.wait(backoff)
                continue
            for d in deliveries:
                try:
                    self._serve(d)
                except Exception:  # noqa: BLE001 - a bad command never kills the control thread
                    log.exception("control command failed")
                finally:
                    try:
                        broker.ack([d])
                    except StemError:
                        pass

    def _serve(self, delivery) -> None:
        try:
            env = decode_frame(delivery.frame, self.worker.signer)
        except (SignatureError, DecodeError) as exc:
            log.warning("ignored a control command that failed verification: %s", exc)
            return
        if env.expires_at is not None and env.expires_at < time.time():
            return
        command = env.name[len(_PREFIX + "control."):]
        if signals.control_command_received.receivers:
            signals.control_command_received.send(self.worker, command=command, arguments=env.args)
        try:
            reply = {"worker": self.worker.id, "reply": self.worker.control(command, env.args)}
        except StemError as exc:
            reply = {"worker": self.worker.id, "error": str(exc)}
        if signals.control_command_completed.receivers:
            signals.control_command_completed.send(self.worker, command=command, reply=reply)
        reply_to = env.meta.get("reply_to")
        if reply_to:
            out = Envelope(id=uuid.uuid4().hex, name=_PREFIX + "control.reply", args=reply,
                           meta={"request_id": env.meta.get("request_id")}, queue=reply_to, enqueued_at=time.time(),
                           expires_at=time.time() + COMMAND_TTL)
            self.worker.broker.publish(Message(out.id, reply_to, encode_frame(out, self.worker.signer), 9, None,
                                               COMMAND_TTL))
        if command == "shutdown":
            self.worker.shutdown_nowait(env.args.get("mode", "warm"))
