"""``Scheduler``: publishes each run of each schedule, once however many schedulers run.

No leader, no lock.  Every scheduler computes the same fire times
(``stem.schedules``), publishes each run under its run id
(``Schedule.run_id``: schedule id + fire time) with ``Stem.enqueue(...,
task_id=run_id)``, and an explicit task id is an idempotency key (keyed
publish): the broker takes the first publish of a run id and refuses the
others while the key lives (``idempotent_for``: at least the backend's result
TTL, two periods and two ticks, past the run's end).  The backend's schedule
record (``ResultBackend.mark_fired``) then says how far the schedule got, so a
scheduler that starts, or wakes from a pause, does not look at runs already
settled; it is a shortcut, never the guarantee: a scheduler with a stale record
fires runs that are already published and the broker drops them.

One pass (``run_once``): read every schedule record (one backend call), take
the schedules declared in code and those stored in records (``stem schedule
add``), skip the paused ones (their due runs are settled as skipped, so a
resume does not catch them up), and for each schedule ask ``Schedule.due``
which runs to fire and which to skip.  For each run to fire: the overlap
check, the keyed publish, a PENDING status for the run (so the next run's
overlap check sees it queued), then ``mark_fired``.  A run skipped (a misfire
under the catch-up policy, an overlap, a pause) is settled too: the newest one
is marked fired with the *previous* published run's id, so ``last_run_id``
always names the newest run that was published, which is what the overlap
check needs.

Overlap, by the status of the previous published run (``last_run_id``):
"skip" skips a run while that status is not terminal (queued, running or
retrying); "queue_one" skips it only while the previous run has not started
(PENDING or QUEUED).  A status that is gone (expired) blocks nothing.  Two
schedulers that read the previous run's status on either side of its end may
disagree once; overlap is a policy over statuses, not part of the once-only
guarantee.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterable, NamedTuple

import msgspec

from . import _checks as checks
from .errors import ConfigurationError, DuplicateTaskError, StemError
from .producer import Stem
from .results import TaskState, TaskStatus
from .schedules import Schedule
from .signals import signals

__all__ = ["Scheduler", "Fired", "encode_definition", "decode_definition", "HEARTBEAT_KIND"]

log = logging.getLogger("stem.scheduler")

#: The ``kind`` a scheduler's heartbeat carries (a worker's has none, or "worker").
HEARTBEAT_KIND = "scheduler"
# A heartbeat outlives a few missed beats even when the interval is short.
_HEARTBEAT_MIN_TTL = 5.0
# The shortest sleep between passes: a wake a hair before the fire time passes again at once.
_MIN_SLEEP = 0.005
_NOT_STARTED = frozenset({TaskState.PENDING, TaskState.QUEUED})
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class Fired(NamedTuple):
    """A run a pass fired: ``published`` False when another scheduler had published it
    (the keyed publish refused this one); ``late`` when it was a misfire caught up."""

    schedule_id: str
    fire_time: float
    run_id: str
    published: bool
    late: bool


def encode_definition(schedule: Schedule) -> bytes:
    """A schedule as a backend stores it (``put_schedule``): msgpack of ``to_dict()``."""
    return _encode(schedule.to_dict())


def decode_definition(data: bytes) -> Schedule:
    """The schedule ``encode_definition`` stored; bad data raises ``InvalidTaskOptionsError``."""
    from .errors import InvalidTaskOptionsError
    try:
        d = _decode(data)
    except (msgspec.DecodeError, TypeError, ValueError) as exc:
        raise InvalidTaskOptionsError(f"a stored schedule definition is not msgpack: {exc}") from None
    return Schedule.from_dict(d)


class Scheduler:
    """Fires ``schedules`` (default: those of ``stem.registry``) and the schedules stored in
    ``backend`` (default: ``stem.backend``, required).

    ``tick`` is the longest sleep between passes (a pass also runs at each fire time);
    ``grace`` (default two ticks) is how late a run may be and still count as on time.
    ``clock`` returns epoch seconds (tests pass a fake one).  Any number of schedulers
    may run against one broker and backend: see the module docstring."""

    def __init__(self, stem: Stem, schedules: Iterable[Schedule] | None = None, *, backend: Any = None,
                 tick: float = 1.0, grace: float | None = None, clock: Callable[[], float] = time.time,
                 scheduler_id: str | None = None, heartbeat_interval: float = 5.0):
        if not isinstance(stem, Stem):
            raise ConfigurationError(f"Scheduler needs a Stem (the producer it publishes with), got {stem!r}")
        self.stem = stem
        self.backend = backend if backend is not None else stem.backend
        if self.backend is None:
            raise ConfigurationError("a Scheduler needs a result backend: it keeps each schedule's record "
                                     "(last fired, paused, stored definitions) there; give the Stem one")
        if schedules is None:
            schedules = stem.registry.schedules if stem.registry is not None else ()
        self.schedules: dict[str, Schedule] = {}
        for s in schedules:
            if not isinstance(s, Schedule):
                raise ConfigurationError(f"schedules must be Schedule objects, got {s!r}")
            if s.id in self.schedules:
                raise ConfigurationError(f"two schedules have the id {s.id!r}: schedule ids must be unique")
            self.schedules[s.id] = s
        self.tick = checks.seconds("tick", tick)
        self.grace = 2 * self.tick if grace is None else checks.seconds("grace", grace)
        if not callable(clock):
            raise ConfigurationError(f"clock must be a callable returning epoch seconds, got {clock!r}")
        self.clock = clock
        self.heartbeat_interval = checks.seconds("heartbeat_interval", heartbeat_interval)
        self.hostname = socket.gethostname()
        if scheduler_id is not None and (not isinstance(scheduler_id, str) or not scheduler_id.strip()):
            raise ConfigurationError(f"scheduler_id must be a non-empty string, got {scheduler_id!r}")
        self.id = scheduler_id or f"{self.hostname}:{os.getpid()}:beat:{uuid.uuid4().hex[:6]}"
        self.counters = {"passes": 0, "fired": 0, "duplicates": 0, "skipped": 0, "caught_up": 0, "errors": 0}
        self._stored: dict[str, tuple[bytes, Schedule | None]] = {}   # id -> (definition, decoded or None)
        self._reported: dict[str, str] = {}                            # id -> the last error logged for it
        self._active = 0
        self._last_pass_at: float | None = None
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._thread: threading.Thread | None = None
        self._started_at = time.time()

    # -- one pass -------------------------------------------------------------------------
    def run_once(self, now: float | None = None) -> list[Fired]:
        """One pass at ``now`` (default: the clock); returns the runs it fired."""
        now = self.clock() if now is None else now
        records = self.backend.schedule_records()
        fired: list[Fired] = []
        active = 0
        for schedule in self._schedules(records):
            record = records.get(schedule.id)
            active += 1
            try:
                self._pass_one(schedule, record, now, fired)
            except StemError as exc:
                self.counters["errors"] += 1
                self._report(schedule.id, f"schedule {schedule.id!r}: {exc}")
        self._active = active
        self._last_pass_at = now
        self.counters["passes"] += 1
        return fired

    def _schedules(self, records: dict[str, Any]) -> list[Schedule]:
        """The code schedules, then the stored definitions (a code schedule wins an id)."""
        out = list(self.schedules.values())
        for sid, record in sorted(records.items()):
            definition = record.definition
            if definition is None:
                continue
            if sid in self.schedules:
                self._report(sid, f"schedule {sid!r} is declared in code and stored in the backend; "
                                  "the code's definition is used (stem schedule remove it from the backend)")
                continue
            cached = self._stored.get(sid)
            if cached is None or cached[0] != definition:
                try:
                    schedule: Schedule | None = decode_definition(definition)
                except StemError as exc:
                    schedule = None
                    self._report(sid, f"stored schedule {sid!r} cannot be read, ignored: {exc}")
                cached = self._stored[sid] = (definition, schedule)
            if cached[1] is not None:
                out.append(cached[1])
        for gone in set(self._stored) - set(records):
            del self._stored[gone]
        return out

    def _pass_one(self, schedule: Schedule, record: Any, now: float, fired: list[Fired]) -> None:
        last_fired = None if record is None else record.last_fired
        prev = None if record is None else record.last_run_id
        runs, misfires = schedule.due(last_fired, now, self.grace)
        if record is not None and record.paused:
            if runs or misfires:
                times = misfires + runs
                self._skipped(schedule, times, "paused")
                self._mark(schedule, times[-1], prev)
            return
        pending_mark = None          # (fire time, run id): the newest settled run not yet marked
        if misfires:
            self._skipped(schedule, misfires, "misfire")
            pending_mark = (misfires[-1], prev)
        overlapped: list[float] = []
        try:
            for t in runs:
                run_id = schedule.run_id(t)
                if prev is not None and schedule.overlap != "allow" and self._blocked(schedule, prev):
                    overlapped.append(t)
                    pending_mark = (t, prev)
                    continue
                late = now - t > self.grace
                published = self._publish(schedule, t, run_id)
                self.backend.mark_fired(schedule.id, t, run_id)
                pending_mark, prev = None, run_id
                fired.append(Fired(schedule.id, t, run_id, published, late))
                self._fired(schedule, t, run_id, published, late)
        finally:
            if overlapped:
                self._skipped(schedule, overlapped, "overlap")
            if pending_mark is not None:
                self._mark(schedule, *pending_mark)
        self._reported.pop(schedule.id, None)

    def _blocked(self, schedule: Schedule, prev_run_id: str) -> bool:
        """Whether the previous run still holds this one back (see the module docstring)."""
        status = self.backend.get(prev_run_id)
        if status is None or status.is_terminal:
            return False
        return schedule.overlap == "skip" or status.state in _NOT_STARTED

    def _publish(self, schedule: Schedule, t: float, run_id: str) -> bool:
        """Publish the run at ``t``; False when another scheduler already had."""
        idempotent_for = max(self.backend.result_expires, 2 * schedule.spec.period, 2 * self.tick)
        eta = t + schedule.jitter_for(t) if schedule.jitter else None
        try:
            self.stem.enqueue(schedule.task, schedule.args, options=schedule.task_options, task_id=run_id, eta=eta,
                              meta={"schedule": schedule.id, "fire_time": t}, on_duplicate="raise",
                              idempotent_for=idempotent_for)
        except DuplicateTaskError:
            return False
        # what the next run's overlap check reads; never over a status a fast worker already wrote
        self.backend.store_if_not_terminal([TaskStatus(id=run_id, state=TaskState.PENDING, name=schedule.task,
                                                       queue=schedule.queue or "",
                                                       meta={"schedule": schedule.id, "fire_time": t})])
        return True

    def _mark(self, schedule: Schedule, t: float, run_id: str | None) -> None:
        # a skipped run keeps the previous published run's id (the overlap check's subject);
        # before any run was published, the skipped run's own id stands in (it has no status)
        self.backend.mark_fired(schedule.id, t, run_id or schedule.run_id(t))

    def _fired(self, schedule: Schedule, t: float, run_id: str, published: bool, late: bool) -> None:
        if not published:
            self.counters["duplicates"] += 1
            log.debug("schedule %s: run %s was already published by another scheduler", schedule.id, run_id)
            return
        self.counters["fired"] += 1
        if late:
            self.counters["caught_up"] += 1
            log.info("schedule %s: caught up run %s (due %.3f s ago)", schedule.id, run_id, self.clock() - t)
        else:
            log.debug("schedule %s: fired run %s", schedule.id, run_id)
        if signals.schedule_fired.receivers:
            signals.schedule_fired.send(self, schedule=schedule, fire_time=t, run_id=run_id, late=late)

    def _skipped(self, schedule: Schedule, times: list[float], reason: str) -> None:
        self.counters["skipped"] += len(times)
        log.info("schedule %s: skipped %d run(s) (%s), the newest due at %.3f", schedule.id, len(times), reason,
                 times[-1])
        if signals.schedule_skipped.receivers:
            signals.schedule_skipped.send(self, schedule=schedule, fire_times=list(times), reason=reason)

    def _report(self, schedule_id: str, message: str) -> None:
        """Log ``message`` once (again only when it changes), not at every pass."""
        if self._reported.get(schedule_id) != message:
            self._reported[schedule_id] = message
            log.warning("%s", message)

    def next_wake(self, now: float) -> float:
        """Seconds from ``now`` to the next pass: the next fire time of any schedule, at most ``tick``."""
        horizon = now + self.tick
        soonest = horizon
        for schedule in list(self.schedules.values()) + [s for _, s in self._stored.values() if s is not None]:
            t = next(iter(schedule.fire_times(now, horizon)), None)
            if t is not None and t < soonest:
                soonest = t
        return max(soonest - now, _MIN_SLEEP)

    # -- running --------------------------------------------------------------------------
    def run(self, *, handle_signals: bool = True) -> None:
        """Pass after pass until ``stop()`` (or SIGTERM/SIGINT, when run on the main thread
        with ``handle_signals``: the pass under way finishes first)."""
        restore = None
        if handle_signals and threading.current_thread() is threading.main_thread():
            restore = _install_signal_handlers(self.stop_nowait)
        self._stopped.clear()
        try:
            self._loop()
        finally:
            self._stopped.set()
            if restore is not None:
                restore()

    def _loop(self) -> None:
        log.info("scheduler %s started: %d schedule(s) in code, tick %.3g s, backend %s", self.id,
                 len(self.schedules), self.tick, self.backend.url or type(self.backend).__name__)
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                wait = self.tick
                try:
                    self.run_once()
                    wait = self.next_wake(self.clock())
                except StemError as exc:
                    self.counters["errors"] += 1
                    log.warning("scheduler %s: pass failed (%s); again in %.3g s", self.id, exc, self.tick)
                except Exception:  # noqa: BLE001 - a scheduler outlives a bad pass; the next one retries
                    self.counters["errors"] += 1
                    log.exception("scheduler %s: pass failed; again in %.3g s", self.id, self.tick)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_interval
                    self._heartbeat()
                self._stop.wait(min(wait, max(next_beat - time.monotonic(), _MIN_SLEEP)))
        finally:
            try:
                self.backend.remove_heartbeat(self.id)
            except StemError:
                pass
            log.info("scheduler %s stopped", self.id)

    def run_in_background(self) -> "Scheduler":
        """Run on a daemon thread (a worker's ``--beat``, tests); ``stop()`` ends it."""
        if self._thread is not None and self._thread.is_alive():
            raise ConfigurationError("this scheduler is already running")
        self._stop.clear()
        self._stopped.clear()
        self._thread = threading.Thread(target=self.run, kwargs={"handle_signals": False},
                                        name=f"stem-scheduler-{self.id}", daemon=True)
        self._thread.start()
        return self

    def stop_nowait(self) -> None:
        """Ask the loop to stop after the pass under way (safe from a signal handler)."""
        self._stop.set()

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stop and wait up to ``timeout`` seconds; True once stopped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return self._stopped.wait(timeout)

    # -- what status shows ----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What the heartbeat carries (``stem worker status`` lists it with kind "scheduler")."""
        return {"kind": HEARTBEAT_KIND, "id": self.id, "host": self.hostname, "pid": os.getpid(),
                "schedules": self._active, "tick": self.tick, "last_pass_at": self._last_pass_at,
                "heartbeat_interval": self.heartbeat_interval, "uptime": time.time() - self._started_at,
                **self.counters}

    def _heartbeat(self) -> None:
        try:
            self.backend.put_heartbeat(self.id, self.stats(),
                                       ttl=max(3 * self.heartbeat_interval, _HEARTBEAT_MIN_TTL))
        except StemError as exc:
            log.warning("scheduler %s: could not publish its heartbeat (%s)", self.id, exc)

    def __repr__(self) -> str:
        return f"<Scheduler {self.id} schedules={len(self.schedules)} tick={self.tick}>"


def _install_signal_handlers(stop: Callable[[], None]) -> Callable[[], None]:
    """SIGTERM and SIGINT stop the loop after the pass under way; returns a restorer."""
    def handler(signum, frame):
        log.warning("received %s: stopping after this pass", signal.Signals(signum).name)
        stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass

    return restore
