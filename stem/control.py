"""The control plane: commands to running workers, over the broker in use.

Every worker listens on its own control queue (``stem.control.<worker id>``)
with a small thread of its own, so a command is served even while the
worker's prefetch is full or a queue is paused.  A broadcast goes to *every*
live worker: the controller reads the live workers from the heartbeat store
and publishes one command per worker (a broadcast consumed by only one
worker is a bug other systems have).  Replies come back on a one-off queue
(``stem.reply.<expiry ms>.<request id>``) until every targeted worker answered
or the timeout passed.  Queue names under ``stem.`` are the control plane's
own and hidden from ``stem queues``.

Authentication, when a signer is configured:

* Commands are frames signed like tasks; a worker ignores one that fails
  verification, and one whose signed ``target`` is another worker (a command
  copied onto the wrong control queue).
* A persistent revoke stores a signed proof per task id (``stem.revocation``);
  workers honour only revocations whose proof verifies.
* Replies are answers, not commands.  A worker signs its replies when it can;
  one that holds Ed25519 public keys only (verify-only) sends them unsigned.
  The controller verifies every signed reply and, with Ed25519 only, also
  accepts an unsigned one that carries the request id of the command it
  answers (with HMAC every worker holds the secret, so an unsigned reply is
  refused).  The request id is random but travels in the readable command
  frame: whoever can read the broker could forge an unsigned *reply* (e.g.
  make a dead worker look alive), never make a worker act.

Nothing is left behind: the controller deletes its reply queue once done
(``Broker.delete_queue``), a worker deletes its control queue when it stops,
and every worker's control thread sweeps, at most once a minute, the reply
queues whose expiry (in their name) passed a grace period ago -- a
controller killed mid-wait, or a reply that came after the controller left.

This works unchanged on every broker (memory, SQLite, Redis, Postgres): it
needs only the ``Broker`` protocol and the heartbeat store of the result
backend.  The commands a worker serves are the table ``WORKER_COMMANDS``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from typing import Any, Callable, Protocol, Sequence

from .backends.base import ResultBackend
from . import _checks as checks
from .brokers.base import Broker, Message
from .envelope import Envelope, decode_frame, encode_frame, read_header
from .errors import ConfigurationError, ControlError, DecodeError, SignatureError, StemError
from .revocation import store_revocations
from .signals import signals
from .task import DEFAULT_OPTIONS, TaskRegistry

__all__ = ["Control", "ControlServer", "Controllable", "COMMANDS", "COMMAND_TTL", "WORKER_COMMANDS", "control_queue",
           "is_internal_queue", "registered_tasks", "reply_queue", "serve_command"]

log = logging.getLogger("stem.control")

_PREFIX = "stem."
_COMMAND_PREFIX = _PREFIX + "control."
_REPLY_NAME = _PREFIX + "control.reply"
_REPLY_PREFIX = _PREFIX + "reply."
_REPLY_QUEUE = re.compile(r"^stem\.reply\.(\d{1,16})\.[0-9a-f]{32}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-]")
COMMAND_TTL = 60.0
SWEEP_EVERY_S = 60.0             # a control thread sweeps stale reply queues at most this often
SWEEP_GRACE_S = 2 * COMMAND_TTL  # ... once their expiry passed this long ago (clock skew between hosts)


def control_queue(worker_id: str) -> str:
    return (_COMMAND_PREFIX + _UNSAFE.sub("_", worker_id))[:128]


def is_internal_queue(name: str) -> bool:
    return name.startswith(_PREFIX)


def reply_queue(expires_at: float) -> str:
    """A fresh reply queue that nobody reads or writes after ``expires_at`` (epoch seconds)."""
    return f"{_REPLY_PREFIX}{int(expires_at * 1000)}.{uuid.uuid4().hex}"


def _reply_queue_expiry(name: str) -> float | None:
    m = _REPLY_QUEUE.match(name)
    return None if m is None else int(m.group(1)) / 1000.0


def _can_sign(signer: Any) -> bool:
    return signer is not None and bool(getattr(signer, "can_sign", True))


# -- the controller ------------------------------------------------------------------------
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
        # with Ed25519 a worker may hold public keys only, and then answers unsigned
        self._unsigned_replies = getattr(signer, "algorithm", None) == "ed25519"

    def workers(self) -> list[dict[str, Any]]:
        """Live workers, from their heartbeats (schedulers' heartbeats left out: they take no commands)."""
        return sorted((h for h in self.backend.heartbeats() if h.get("kind", "worker") == "worker"),
                      key=lambda h: h["worker_id"])

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

    def _require_signing_key(self) -> None:
        if self.signer is not None and not _can_sign(self.signer):
            raise ControlError("control commands with signing on need a signing key, and this signer holds "
                               "public keys only: run the controller with STEM_SIGNING_KEYS")

    def broadcast(self, command: str, arguments: dict[str, Any] | None = None, *,
                  workers: Sequence[str] | None = None, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Send ``command`` to the chosen (default: all live) workers and collect
        their replies for up to ``timeout`` seconds.  Each reply is a dict with
        ``worker`` and ``reply`` (or ``error``)."""
        if command not in COMMANDS:
            raise ControlError(f"unknown control command {command!r}; known: {', '.join(COMMANDS)}")
        checks.seconds("timeout", timeout, error=ControlError)
        self._require_signing_key()
        targets = self._targets(workers)
        if not targets:
            return []
        request_id = uuid.uuid4().hex
        now = time.time()
        replies_to = reply_queue(now + max(float(timeout), COMMAND_TTL))
        messages = []
        for worker_id in targets:
            env = Envelope(id=uuid.uuid4().hex, name=_COMMAND_PREFIX + command, args=arguments or {},
                           meta={"reply_to": replies_to, "request_id": request_id, "target": worker_id},
                           queue=control_queue(worker_id), enqueued_at=now, expires_at=now + COMMAND_TTL)
            messages.append(Message(env.id, env.queue, encode_frame(env, self.signer), 9, None, COMMAND_TTL))
        replies: dict[str, dict[str, Any]] = {}
        signed: set[str] = set()
        try:
            self.broker.publish_many(messages)
            deadline = time.monotonic() + timeout
            while len(replies) < len(targets):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for d in self.broker.consume([replies_to], len(targets), min(remaining, 0.5)):
                    got = self._read_reply(d.frame, request_id)
                    if got is None:
                        continue
                    reply, was_signed = got
                    worker = reply.get("worker")
                    # a signed answer replaces an unsigned one that claimed to come from the same worker
                    if worker in targets and (worker not in replies or (was_signed and worker not in signed)):
                        replies[worker] = reply
                        if was_signed:
                            signed.add(worker)
        finally:
            try:
                self.broker.delete_queue(replies_to)
            except StemError as exc:   # the workers' sweep removes it later
                log.debug("could not delete reply queue %s (%s)", replies_to, exc)
        return [replies[w] for w in targets if w in replies]

    def _read_reply(self, frame: bytes, request_id: str) -> tuple[dict[str, Any], bool] | None:
        """A reply's args and whether it was signed, or None when it must be ignored."""
        try:
            is_signed = bool(read_header(frame).key_id)
            if self.signer is None:
                env = decode_frame(frame)
            elif is_signed:
                env = decode_frame(frame, self.signer)
            elif self._unsigned_replies:
                env = decode_frame(frame)
            else:
                log.warning("ignored an unsigned control reply: with hmac-sha256 every worker signs its replies")
                return None
        except (SignatureError, DecodeError) as exc:
            log.warning("ignored a control reply that failed verification: %s", exc)
            return None
        args = env.args
        if (env.name != _REPLY_NAME or env.meta.get("request_id") != request_id or not isinstance(args, dict)
                or not isinstance(args.get("worker"), str)
                or ("reply" not in args and not isinstance(args.get("error"), str))):
            return None
        return dict(args), is_signed

    # -- the commands -----------------------------------------------------------------
    def ping(self, workers=None, timeout: float = 2.0):
        return self.broadcast("ping", workers=workers, timeout=timeout)

    def inspect(self, workers=None, timeout: float = 2.0):
        return self.broadcast("inspect", workers=workers, timeout=timeout)

    def stats(self, workers=None, timeout: float = 2.0):
        return self.broadcast("stats", workers=workers, timeout=timeout)

    def registered(self, workers=None, timeout: float = 2.0):
        """Each worker's tasks with their options (name, queue, max_retries, time limits, rate limit ...)."""
        return self.broadcast("registered", workers=workers, timeout=timeout)

    def revoke(self, task_ids: Sequence[str], *, terminate: bool = False, workers=None, timeout: float = 2.0,
               expires: float | None = None):
        """Persistently revoke (a worker started later honours it too; with a signer, with a
        signed proof per id) and tell live workers; ``terminate`` also kills a task that is
        running now."""
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        if not ids or not all(isinstance(i, str) and i for i in ids):
            raise ControlError("revoke needs one or more task ids")
        self._require_signing_key()
        try:
            store_revocations(self.backend, ids, expires, self.signer)
        except ConfigurationError as exc:
            raise ControlError(str(exc)) from exc
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
    return checks.integer("n", n, error=ControlError)


class Controllable(Protocol):
    """What the control plane needs of a worker (``stem.worker.Worker`` is one).  The
    worker starts a ``ControlServer`` with itself as the target; this module never
    imports the worker."""

    id: str
    hostname: str
    queues: list[str]
    registry: TaskRegistry

    def stats(self) -> dict[str, Any]: ...

    def inspect(self) -> dict[str, Any]: ...

    def revoke(self, task_ids: Sequence[str], *, terminate: bool = False) -> dict[str, Any]: ...

    def pause(self, queue_name: str) -> None: ...

    def resume(self, queue_name: str) -> None: ...

    @property
    def paused_queues(self) -> list[str]: ...

    def resize(self, delta: int) -> int: ...

    def shutdown_nowait(self, mode: Any = ...) -> None: ...


# -- what a worker does for each command -----------------------------------------------------
def registered_tasks(registry: TaskRegistry) -> list[dict[str, Any]]:
    """Every task of ``registry`` by name, with its options as the worker applies them
    (the handler's, over the defaults; None: not set)."""
    out = []
    for name in registry.names():
        options = registry.get(name).options.merged(DEFAULT_OPTIONS)
        out.append({"name": name, **{f: getattr(options, f) for f in options.__struct_fields__}})
    return out


def _ping(w: "Controllable", args: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "host": w.hostname, "pid": os.getpid(), "queues": list(w.queues)}


def _shutdown(w: "Controllable", args: dict[str, Any]) -> dict[str, Any]:
    mode = args.get("mode", "warm")
    if mode not in ("warm", "soft", "hard"):
        raise ControlError(f"bad shutdown mode {mode!r}")
    return {"shutdown": mode}      # the control server stops the worker once this reply is out


def _revoke(w: "Controllable", args: dict[str, Any]) -> dict[str, Any]:
    ids = args.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise ControlError(f"revoke needs a list of task ids, got {ids!r}")
    return w.revoke(ids, terminate=bool(args.get("terminate")))


def _pause_or_resume(pause: bool) -> Callable[["Controllable", dict[str, Any]], dict[str, Any]]:
    def handle(w: "Controllable", args: dict[str, Any]) -> dict[str, Any]:
        queue = args.get("queue")
        if queue not in w.queues:
            raise ControlError(f"this worker does not consume {queue!r} (queues: {', '.join(w.queues)})")
        (w.pause if pause else w.resume)(queue)
        return {"paused": w.paused_queues}
    return handle


def _resize(sign: int) -> Callable[["Controllable", dict[str, Any]], dict[str, Any]]:
    def handle(w: "Controllable", args: dict[str, Any]) -> dict[str, Any]:
        return {"concurrency": w.resize(sign * _count(args.get("n", 1)))}
    return handle


WORKER_COMMANDS: dict[str, Callable[["Controllable", dict[str, Any]], Any]] = {
    "ping": _ping,
    "stats": lambda w, args: w.stats(),
    "inspect": lambda w, args: w.inspect(),
    "registered": lambda w, args: registered_tasks(w.registry),
    "revoke": _revoke,
    "shutdown": _shutdown,
    "pause": _pause_or_resume(True),
    "resume": _pause_or_resume(False),
    "pool_grow": _resize(1),
    "pool_shrink": _resize(-1),
}
COMMANDS = tuple(WORKER_COMMANDS)


def serve_command(worker: "Controllable", command: str, args: dict[str, Any]) -> Any:
    """Run one control command on ``worker`` (the table ``WORKER_COMMANDS``)."""
    handler = WORKER_COMMANDS.get(command)
    if handler is None:
        raise ControlError(f"unknown control command {command!r}")
    return handler(worker, args if isinstance(args, dict) else {})


# -- the worker side ---------------------------------------------------------------------------
class ControlServer:
    """The worker side: a thread serving the worker's control queue (and sweeping stale reply queues)."""

    def __init__(self, *, broker: Broker, backend: ResultBackend | None, signer: Any, target: "Controllable"):
        self.broker = broker
        self.backend = backend
        self.signer = signer
        self.target = target
        self.worker_id = target.id
        self.queue = control_queue(target.id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stem-control", daemon=True)
        self._replied: dict[str, float] = {}     # reply queues this worker wrote to -> their expiry
        self._next_sweep = 0.0                   # monotonic; the first sweep runs at start
        self._orphans: set[str] = set()          # control queues without a heartbeat at the last sweep

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and delete the control queue (a command sent after this is lost with it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self.broker.delete_queue(self.queue)
        except StemError as exc:
            log.debug("could not delete control queue %s (%s)", self.queue, exc)

    def _loop(self) -> None:
        broker = self.broker
        backoff = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= self._next_sweep:
                self.sweep()
            try:
                deliveries = broker.consume([self.queue], 16, 0.5, consumer=self.worker_id)
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
            if not deliveries:
                continue
            try:
                # at most once: a command is acked before it runs (a redelivery could only reach a
                # dead worker's queue, and no command should run twice), and so before its reply
                broker.ack(deliveries)
            except StemError as exc:
                log.debug("could not ack control commands (%s)", exc)
            for d in deliveries:
                try:
                    self._serve(d)
                except Exception:  # noqa: BLE001 - a bad command never kills the control thread
                    log.exception("control command failed")

    def sweep(self) -> int:
        """Delete the control plane's queues nobody uses any more: reply queues in the broker's
        registry whose expiry passed ``SWEEP_GRACE_S`` ago, those this worker wrote to (which
        also frees what its broker client remembers of them), and control queues of workers
        without a heartbeat at this sweep and the one before (a worker that crashed; one whose
        heartbeat only lapsed loses nothing it would have served, and its next command
        recreates the queue).  Returns how many it deleted."""
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        broker, backend = self.broker, self.backend
        cutoff = time.time() - SWEEP_GRACE_S
        try:
            names = broker.queues()
        except StemError as exc:
            log.debug("could not list queues to sweep (%s)", exc)
            names = []
        stale = {q for q in names if (_reply_queue_expiry(q) or cutoff) < cutoff}
        stale.update(q for q, expiry in self._replied.items() if expiry < cutoff)
        control_queues = [q for q in names if q.startswith(_COMMAND_PREFIX) and q != self.queue]
        orphans: set[str] = set()
        if control_queues and backend is not None:
            try:
                live = {control_queue(h["worker_id"]) for h in backend.heartbeats()}
            except StemError as exc:
                log.debug("could not read heartbeats to sweep control queues (%s)", exc)
                orphans = self._orphans
            else:
                orphans = {q for q in control_queues if q not in live}
                # only one that had no heartbeat at the previous sweep too: a worker that is starting
                # has its queue before its first heartbeat
                stale.update(orphans & self._orphans)
        self._orphans = orphans
        deleted = 0
        for q in sorted(stale):
            try:
                broker.delete_queue(q)
            except StemError as exc:
                log.debug("could not delete reply queue %s (%s)", q, exc)
                continue
            self._replied.pop(q, None)
            deleted += 1
        return deleted

    def _serve(self, delivery) -> None:
        w = self.target
        try:
            env = decode_frame(delivery.frame, self.signer)
        except (SignatureError, DecodeError) as exc:
            log.warning("ignored a control command that failed verification: %s", exc)
            return
        if env.expires_at is not None and env.expires_at < time.time():
            return
        target = env.meta.get("target")
        if target != w.id:
            log.warning("ignored a control command addressed to %r (this worker is %s)", target, w.id)
            return
        if not env.name.startswith(_COMMAND_PREFIX):
            log.warning("ignored a frame on the control queue that is not a command: %r", env.name)
            return
        command = env.name[len(_COMMAND_PREFIX):]
        if signals.control_command_received.receivers:
            signals.control_command_received.send(w, command=command, arguments=env.args)
        try:
            reply = {"worker": w.id, "reply": serve_command(w, command, env.args)}
        except StemError as exc:
            reply = {"worker": w.id, "error": str(exc)}
        if signals.control_command_completed.receivers:
            signals.control_command_completed.send(w, command=command, reply=reply)
        reply_to = env.meta.get("reply_to")
        if isinstance(reply_to, str) and reply_to.startswith(_REPLY_PREFIX):
            self._reply(reply_to, env.meta.get("request_id"), reply)
        if command == "shutdown":
            w.shutdown_nowait(env.args.get("mode", "warm"))

    def _reply(self, reply_to: str, request_id: Any, reply: dict[str, Any]) -> None:
        """Publish ``reply``: signed when this worker can sign, unsigned when it holds public keys only."""
        w = self.target
        now = time.time()
        out = Envelope(id=uuid.uuid4().hex, name=_REPLY_NAME, args=reply, meta={"request_id": request_id},
                       queue=reply_to, enqueued_at=now, expires_at=now + COMMAND_TTL)
        signer = self.signer if _can_sign(self.signer) else None
        try:
            frame = encode_frame(out, signer)
        except StemError as exc:     # e.g. a reply msgpack cannot carry: answer with the error instead
            out.args = {"worker": w.id, "error": f"the reply could not be encoded: {exc}"}
            frame = encode_frame(out, signer)
        self.broker.publish(Message(out.id, reply_to, frame, 9, None, COMMAND_TTL))
        self._replied[reply_to] = _reply_queue_expiry(reply_to) or now + COMMAND_TTL
