"""The workflow store: what a durable workflow's progress is kept in, on every result backend.

A run is a workflow invocation.  Its progress is a **journal** of durable calls
numbered by position (0, 1, 2 ... as the workflow function reaches them), and an
**inbox** of events sent to it.  The engine (``stem.workflows.engine``) rebuilds
a run by re-running the function from the top and matching each durable call
against the journal; the store only keeps records and enforces the rules that
make that safe when activations race, stall or die:

* **claiming fences.**  ``claim`` is a compare-and-set that bumps the run's
  ``epoch`` and hands it a lease.  Every later write of that activation
  (``append``, ``renew``, ``park``, ``finish``, ``attention``,
  ``continue_as_new``, ``release``) names its epoch and is refused once another
  activation has claimed the run: a stalled executor (SIGSTOP, GC pause) that
  comes back after its lease expired can change nothing.
* **the journal is append-only.**  ``append`` writes position ``len(journal)``
  only (no gaps, no overwrite): the first writer wins and no stored entry ever
  changes after its first commit.  Only ``reset`` (an operator's act, or
  ``continue_as_new``) removes entries, and it bumps the epoch too.
* **events are never lost.**  ``send`` stores an event and bumps the run's
  ``inbox_count`` in one step; ``park`` is refused (``"inbox"``) when the count
  moved since the activation read it, so an event that arrives between the
  activation's last look and its parking wakes it instead of waiting forever.
  Duplicates by ``(run, event_id)`` are stored once.
* **nothing is stranded.**  A run that needs an activation is always visible to
  ``due``: created (or handed back by ``release``) and not claimed (``PENDING``
  with ``wake_at``), parked on a timer that is due, parked with unread events,
  or ``RUNNING`` with an expired lease.  A due marker is only replaced by the claim that acts on it.

Times are the engine's clock (``now`` arguments, injectable for tests), never the
server's, so a store agrees with the engine about when a sleep is due.

Every mutating operation is one transaction, one Lua script, or one critical
section: a crash leaves either all of it or none.  Payloads (input, outputs,
errors, event payloads, ``waiting``) are bytes the engine encodes; the store
never looks inside them.
"""

from __future__ import annotations

import abc
import importlib
import math
from typing import Any, Literal, NamedTuple, Sequence

from ..errors import ConfigurationError

__all__ = [
    "PENDING", "RUNNING", "PARKED", "NEEDS_ATTENTION", "SUCCEEDED", "FAILED", "CANCELLED", "TERMINAL", "STATUSES",
    "RunRecord", "JournalEntry", "Event", "DueRun", "ParkedRun", "WorkflowStore", "ParkOutcome", "WAITS_KINDS",
    "RUN_ID_MAX", "INT_MAX", "check_run_id", "check_payload", "check_time", "check_epoch", "check_text",
    "check_limit", "check_position", "check_seqs", "open_store",
]

#: created (or reset, or continued as new), not yet claimed
PENDING = "PENDING"
#: claimed by one activation, whose lease has not expired (or has: then ``due`` lists it)
RUNNING = "RUNNING"
#: suspended: on a timer (``wake_at``), an event (``waiting``), a called task or a child run
PARKED = "PARKED"
#: its code no longer matches its journal: visible, never retried in a loop; ``reset`` recovers it
NEEDS_ATTENTION = "NEEDS_ATTENTION"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
STATUSES = frozenset({PENDING, RUNNING, PARKED, NEEDS_ATTENTION}) | TERMINAL

#: Run ids become task ids (the run's status is mirrored under it) with a suffix: keep room for it.
RUN_ID_MAX = 160

ParkOutcome = Literal["parked", "inbox", "fenced"]
#: what a parked run's ``waits_for`` names: a task run by ``ctx.call``, or a child run
WAITS_KINDS = frozenset({"task", "child"})


class RunRecord(NamedTuple):
    id: str
    name: str
    version: str
    input: bytes
    status: str
    #: bumped by every claim, reset, cancel and continue_as_new: the fence of every write
    epoch: int
    owner: str | None
    lease_until: float | None
    #: when a PENDING or PARKED run is due (None: no timer; it waits for an event, a task or a child)
    wake_at: float | None
    #: what a PARKED run waits for (the engine's bytes), None otherwise
    waiting: bytes | None
    #: the id of the task (``ctx.call``) or child run it waits on, for the sweeper's checks
    waits_for: str | None
    #: events stored for the run so far (the seq of the newest one)
    inbox_count: int
    #: ``inbox_count`` as the activation that parked the run had read it
    inbox_seen: int
    parent: str | None
    result: bytes | None
    error: bytes | None
    #: why a run is NEEDS_ATTENTION (position and both calls), None otherwise
    attention: str | None
    #: how many times the run continued as new
    generation: int
    created_at: float
    updated_at: float
    #: what ``waits_for`` names: "task" or "child" (None without ``waits_for``, or for a run that a
    #: store of schema version 8 or before parked)
    waits_kind: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class JournalEntry(NamedTuple):
    position: int
    #: "step", "call", "sleep", "wait", "child", "now", "uuid", "patch", ... (the engine's names)
    kind: str
    name: str
    output: bytes | None
    error: bytes | None
    attempt: int
    #: the epoch of the activation that wrote it
    epoch: int
    created_at: float


class DueRun(NamedTuple):
    """A run that needs an activation (``WorkflowStore.due``)."""
    run_id: str
    #: "start", "timer", "inbox" or "lease"
    reason: str
    #: the run's epoch when listed: the sweeper's wake id names it (no read of the run)
    epoch: int
    #: since when the run is due: ``wake_at`` of a PENDING run or of a PARKED one on a timer,
    #: ``lease_until`` of a RUNNING one, minus infinity while a PARKED run has unread events
    due_at: float


class ParkedRun(NamedTuple):
    """A PARKED run that waits on a task or a child run (``WorkflowStore.parked_on``)."""
    run_id: str
    waits_for: str
    #: "task" or "child"; None for a run parked by a store of schema version 8 or before
    kind: str | None


class Event(NamedTuple):
    #: 1, 2, 3 ... per run, in the order the store accepted them (FIFO per topic follows)
    seq: int
    topic: str
    event_id: str
    payload: bytes
    created_at: float


def check_run_id(run_id: object) -> str:
    if not isinstance(run_id, str) or not 0 < len(run_id) <= RUN_ID_MAX:
        raise ConfigurationError(f"a run id is a non-empty string of at most {RUN_ID_MAX} chars, got {run_id!r}")
    return run_id


def check_payload(name: str, value: object, *, optional: bool = True) -> bytes | None:
    if value is None and optional:
        return None
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, bytes):
        raise ConfigurationError(f"{name} is bytes{' or None' if optional else ''}, got {type(value).__name__}")
    return value


#: Epochs, positions, seqs and limits are 64-bit signed integers in every store (SQL BIGINT, Redis).
INT_MAX = 2**63 - 1


def _finite(value: object) -> bool:
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except OverflowError:            # an int past float's range
        return False


def check_time(name: str, value: object, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ConfigurationError(f"{name} is a finite number of seconds, got {value!r}")
    return float(value)


def check_epoch(epoch: object) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= INT_MAX:
        raise ConfigurationError(f"an epoch is an int >= 0, got {epoch!r}")
    return epoch


def check_text(name: str, value: object, *, limit: int = 200, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise ConfigurationError(f"{name} is a non-empty string of at most {limit} chars, got {value!r}")
    return value


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= INT_MAX:
        raise ConfigurationError(f"a limit is an int >= 1, got {limit!r}")
    return limit


def check_position(position: object) -> int:
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= INT_MAX:
        raise ConfigurationError(f"a journal position is an int >= 0, got {position!r}")
    return position


def check_seqs(name: str, values: object) -> frozenset[int]:
    if isinstance(values, (str, bytes, bytearray)) or not isinstance(values, (list, tuple, set, frozenset, range)):
        raise ConfigurationError(f"{name} is a list of event seqs, got {type(values).__name__}")
    for seq in values:
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= INT_MAX:
            raise ConfigurationError(f"{name}: an event seq is an int >= 0, got {seq!r}")
    return frozenset(values)


class WorkflowStore(abc.ABC):
    """Runs, their journals and their inboxes.

    The public methods below state the contract and check every argument (``check_*``
    above: ConfigurationError) before the store is touched, so a bad call stores nothing
    and every adapter refuses the same calls with the same errors.  An adapter implements
    the ``_op`` of each (``_create``, ``_claim``, ...), which receives the checked values
    (payloads as ``bytes``, times as ``float``, seqs sorted)."""

    # -- runs ------------------------------------------------------------------------------
    def create(self, run_id: str, name: str, version: str, input: bytes, *, now: float,
               parent: str | None = None) -> tuple[bool, RunRecord]:
        """Create a PENDING run (epoch 0, ``wake_at=now``: due until claimed) unless one with the
        id exists.  Returns (created, the record now stored): a second start is a no-op that
        returns the first run, whatever its input."""
        check_run_id(run_id)
        check_text("a workflow name", name)
        check_text("a workflow version", version, limit=64)
        data = check_payload("input", input, optional=False)
        now = _now(now)
        if parent is not None:
            check_run_id(parent)
        return self._create(run_id, name, version, data, now=now, parent=parent)  # type: ignore[arg-type]

    def get(self, run_id: str) -> RunRecord | None:
        return self._get(check_run_id(run_id))

    def runs(self, *, status: str | None = None, name: str | None = None, limit: int = 100,
             after: str | None = None) -> list[RunRecord]:
        """Runs ordered by id, at most ``limit``, with an id greater than ``after`` (paging)."""
        if status is not None and status not in STATUSES:
            raise ConfigurationError(f"a run status is one of {sorted(STATUSES)}, got {status!r}")
        check_text("a workflow name", name, optional=True)
        check_limit(limit)
        if after is not None:
            check_run_id(after)
        return self._runs(status=status, name=name, limit=limit, after=after)

    # -- one activation: claim, journal, renew, then exactly one of park/finish/attention/release --
    def claim(self, run_id: str, owner: str, *, now: float, lease: float) -> RunRecord | None:
        """Compare-and-set: a run PENDING, PARKED, or RUNNING with ``lease_until <= now`` becomes
        RUNNING under ``owner`` until ``now + lease`` with ``epoch + 1`` (returned).  None when
        the run is absent, terminal, NEEDS_ATTENTION or held by a live lease.  ``wake_at`` and
        ``waiting`` are cleared: the lease is the due marker from here on."""
        check_run_id(run_id)
        check_text("an owner", owner)
        return self._claim(run_id, owner, now=_now(now), lease=_lease(lease))

    def renew(self, run_id: str, epoch: int, *, now: float, lease: float) -> bool:
        """Extend the lease of the RUNNING run claimed at ``epoch`` to ``now + lease``.
        False when fenced (another claim, a reset, a cancel) or no longer RUNNING."""
        check_run_id(run_id)
        check_epoch(epoch)
        return self._renew(run_id, epoch, now=_now(now), lease=_lease(lease))

    def journal(self, run_id: str) -> list[JournalEntry]:
        """The run's entries by position (as integers: 2 before 10)."""
        return self._journal(check_run_id(run_id))

    def append(self, run_id: str, epoch: int, position: int, kind: str, name: str, *,
               output: bytes | None = None, error: bytes | None = None, attempt: int = 1,
               now: float) -> bool:
        """Append the entry at ``position`` if the run is RUNNING at ``epoch`` and ``position``
        is the journal's length.  False otherwise (fenced, or the position is taken: the
        first writer won); nothing is changed then."""
        check_run_id(run_id)
        check_epoch(epoch)
        check_position(position)
        check_text("an entry kind", kind, limit=32)
        check_text("an entry name", name)
        output = check_payload("output", output)
        error = check_payload("error", error)
        check_position(attempt)
        return self._append(run_id, epoch, position, kind, name, output=output, error=error, attempt=attempt,
                            now=_now(now))

    def park(self, run_id: str, epoch: int, *, wake_at: float | None, waiting: bytes | None,
             waits_for: str | None, inbox_seen: int, now: float, waits_kind: str | None = None) -> ParkOutcome:
        """Suspend the RUNNING run claimed at ``epoch``: PARKED, no owner or lease, ``wake_at``,
        ``waiting``, ``waits_for``, ``waits_kind`` and ``inbox_seen`` stored.  ``waits_kind`` says
        what ``waits_for`` names ("task" or "child"): given with ``waits_for``, and only with it.
        ``"inbox"`` (nothing changed, the run stays RUNNING under its lease) when ``inbox_count !=
        inbox_seen``: an event arrived that the activation has not read.  ``"fenced"`` when the
        epoch is stale or the run is no longer RUNNING."""
        check_run_id(run_id)
        check_epoch(epoch)
        wake_at = check_time("wake_at", wake_at, optional=True)
        waiting = check_payload("waiting", waiting)
        check_text("waits_for", waits_for, optional=True)
        if waits_for is None:
            bad_kind = waits_kind is not None
        else:
            bad_kind = not (isinstance(waits_kind, str) and waits_kind in WAITS_KINDS)
        if bad_kind:
            raise ConfigurationError(f"waits_kind is one of {sorted(WAITS_KINDS)} with a waits_for and None "
                                     f"without one, got {waits_kind!r} with waits_for={waits_for!r}")
        check_position(inbox_seen)
        return self._park(run_id, epoch, wake_at=wake_at, waiting=waiting, waits_for=waits_for,
                          waits_kind=waits_kind, inbox_seen=inbox_seen, now=_now(now))

    def finish(self, run_id: str, epoch: int, status: str, *, result: bytes | None = None,
               error: bytes | None = None, now: float) -> bool:
        """End the RUNNING run claimed at ``epoch``: SUCCEEDED (with ``result``) or FAILED (with
        ``error``).  When the run has a parent, the same step sends the parent an event (topic
        ``"__child__"``, event id this run's id, payload empty), so a parent parked on it becomes
        due even if the engine dies before waking it.  False when fenced."""
        check_run_id(run_id)
        check_epoch(epoch)
        if status not in (SUCCEEDED, FAILED):
            raise ConfigurationError(f"a run finishes SUCCEEDED or FAILED, got {status!r}")
        result = check_payload("result", result)
        error = check_payload("error", error)
        return self._finish(run_id, epoch, status, result=result, error=error, now=_now(now))

    def attention(self, run_id: str, epoch: int, reason: str, *, now: float) -> bool:
        """Park the RUNNING run claimed at ``epoch`` as NEEDS_ATTENTION with ``reason``.
        False when fenced."""
        check_run_id(run_id)
        check_epoch(epoch)
        check_text("a reason", reason, limit=4000)
        return self._attention(run_id, epoch, reason, now=_now(now))

    def continue_as_new(self, run_id: str, epoch: int, input: bytes, *, drop_events: Sequence[int],
                        now: float) -> bool:
        """Restart the RUNNING run claimed at ``epoch`` with ``input``: its journal and the events
        whose seqs are in ``drop_events`` (those it consumed) are deleted, ``generation + 1``,
        ``epoch + 1``, PENDING due now.  False when fenced."""
        check_run_id(run_id)
        check_epoch(epoch)
        data = check_payload("input", input, optional=False)
        drop = sorted(check_seqs("drop_events", drop_events))
        return self._continue_as_new(run_id, epoch, data, drop_events=drop, now=_now(now))  # type: ignore[arg-type]

    def release(self, run_id: str, epoch: int, *, now: float) -> bool:
        """Hand the RUNNING run claimed at ``epoch`` back at once instead of leaving it to its
        lease (the activation stops: a broker outage, a worker's soft shutdown): PENDING due now, no
        owner, lease, timer or waiting; journal, inbox and epoch kept (the next claim bumps it, and
        this activation, no longer RUNNING, is fenced out of every later write).  False when
        fenced (another claim, a cancel, a reset) or no longer RUNNING."""
        check_run_id(run_id)
        check_epoch(epoch)
        return self._release(run_id, epoch, now=_now(now))

    # -- operators --------------------------------------------------------------------------
    def cancel(self, run_id: str, *, now: float) -> RunRecord | None:
        """A run not yet terminal becomes CANCELLED (``epoch + 1``: the activation that holds it,
        if any, is fenced out; its parent is sent ``"__child__"`` as by ``finish``).  Returns the
        record after; None when absent; a terminal run is returned unchanged."""
        check_run_id(run_id)
        return self._cancel(run_id, now=_now(now))

    def reset(self, run_id: str, to_position: int, *, now: float) -> RunRecord | None:
        """Delete the entries at ``to_position`` and after, ``epoch + 1``, PENDING due now, no
        owner, attention/result/error cleared.  Any status may be reset (NEEDS_ATTENTION to
        resume, FAILED or CANCELLED to retry).  None when absent."""
        check_run_id(run_id)
        check_position(to_position)
        return self._reset(run_id, to_position, now=_now(now))

    # -- events -----------------------------------------------------------------------------
    def send(self, run_id: str, topic: str, event_id: str, payload: bytes, *,
             now: float) -> tuple[bool, RunRecord | None]:
        """Store an event for the run (seq = ``inbox_count + 1``) unless the run already has one
        with ``event_id``.  Returns (stored, the run after); (False, None) when the run is absent.
        A terminal run takes no events: (False, record)."""
        check_run_id(run_id)
        check_text("a topic", topic)
        check_text("an event id", event_id)
        data = check_payload("payload", payload, optional=False)
        return self._send(run_id, topic, event_id, data, now=_now(now))  # type: ignore[arg-type]

    def events(self, run_id: str, topic: str | None = None, after_seq: int = 0,
               limit: int = 100) -> list[Event]:
        """Events of ``topic`` (or every topic) with ``seq > after_seq``, oldest first."""
        check_run_id(run_id)
        check_text("a topic", topic, optional=True)
        check_position(after_seq)
        check_limit(limit)
        return self._events(run_id, topic, after_seq, limit)

    # -- the sweeper -------------------------------------------------------------------------
    def due(self, *, now: float, limit: int = 500) -> list[DueRun]:
        """Runs that need an activation, as ``DueRun`` (run id, reason, epoch, due_at): reason
        ``"start"`` (PENDING, ``wake_at <= now``), ``"timer"`` (PARKED, ``wake_at <= now``),
        ``"inbox"`` (PARKED, ``inbox_count > inbox_seen``), ``"lease"`` (RUNNING, ``lease_until <=
        now``).  At most ``limit``, the longest due first; a run is listed once, with the first
        reason that applies in that order.  Listing changes nothing."""
        now = _now(now)
        check_limit(limit)
        return self._due(now=now, limit=limit)

    def parked_on(self, *, limit: int = 500, after: str | None = None) -> list[ParkedRun]:
        """PARKED runs with ``waits_for`` set, as ``ParkedRun`` (run id, waits_for, kind: "task"
        or "child"), ordered by run id after ``after``: the sweeper checks the tasks they wait on
        in pages."""
        check_limit(limit)
        if after is not None:
            check_run_id(after)
        return self._parked_on(limit=limit, after=after)

    # -- misc -------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def for_backend(cls, backend: Any) -> "WorkflowStore":
        """The store beside ``backend`` (``open_store``: the backend names the class)."""

    def close(self) -> None:
        pass

    # -- what an adapter implements: the operations above on checked arguments -------------------
    @abc.abstractmethod
    def _create(self, run_id: str, name: str, version: str, input: bytes, *, now: float,
                parent: str | None) -> tuple[bool, RunRecord]: ...

    @abc.abstractmethod
    def _get(self, run_id: str) -> RunRecord | None: ...

    @abc.abstractmethod
    def _runs(self, *, status: str | None, name: str | None, limit: int, after: str | None) -> list[RunRecord]: ...

    @abc.abstractmethod
    def _claim(self, run_id: str, owner: str, *, now: float, lease: float) -> RunRecord | None: ...

    @abc.abstractmethod
    def _renew(self, run_id: str, epoch: int, *, now: float, lease: float) -> bool: ...

    @abc.abstractmethod
    def _journal(self, run_id: str) -> list[JournalEntry]: ...

    @abc.abstractmethod
    def _append(self, run_id: str, epoch: int, position: int, kind: str, name: str, *, output: bytes | None,
                error: bytes | None, attempt: int, now: float) -> bool: ...

    @abc.abstractmethod
    def _park(self, run_id: str, epoch: int, *, wake_at: float | None, waiting: bytes | None,
              waits_for: str | None, waits_kind: str | None, inbox_seen: int, now: float) -> ParkOutcome: ...

    @abc.abstractmethod
    def _finish(self, run_id: str, epoch: int, status: str, *, result: bytes | None, error: bytes | None,
                now: float) -> bool: ...

    @abc.abstractmethod
    def _attention(self, run_id: str, epoch: int, reason: str, *, now: float) -> bool: ...

    @abc.abstractmethod
    def _continue_as_new(self, run_id: str, epoch: int, input: bytes, *, drop_events: list[int],
                         now: float) -> bool: ...

    @abc.abstractmethod
    def _release(self, run_id: str, epoch: int, *, now: float) -> bool: ...

    @abc.abstractmethod
    def _cancel(self, run_id: str, *, now: float) -> RunRecord | None: ...

    @abc.abstractmethod
    def _reset(self, run_id: str, to_position: int, *, now: float) -> RunRecord | None: ...

    @abc.abstractmethod
    def _send(self, run_id: str, topic: str, event_id: str, payload: bytes, *,
              now: float) -> tuple[bool, RunRecord | None]: ...

    @abc.abstractmethod
    def _events(self, run_id: str, topic: str | None, after_seq: int, limit: int) -> list[Event]: ...

    @abc.abstractmethod
    def _due(self, *, now: float, limit: int) -> list[DueRun]: ...

    @abc.abstractmethod
    def _parked_on(self, *, limit: int, after: str | None) -> list[ParkedRun]: ...


def _now(now: object) -> float:
    return check_time("now", now)  # type: ignore[return-value]


def _lease(lease: object) -> float:
    return check_time("lease", lease)  # type: ignore[return-value]


def open_store(backend: Any) -> WorkflowStore:
    """The workflow store that lives beside ``backend`` (same database, file or server): the one
    the backend names (``ResultBackend.workflow_store_recipe``), whatever its type or module."""
    recipe = getattr(backend, "workflow_store_recipe", None)
    named = recipe() if callable(recipe) else None
    if named is None:
        raise ConfigurationError(
            f"workflows need a memory, SQLite, Postgres or Redis result backend (one that names the workflow "
            f"store beside it: ResultBackend.workflow_store_recipe); {type(backend).__name__} keeps no runs")
    path, beside = named
    module, _, name = path.partition(":")
    store_class = getattr(importlib.import_module(module), name, None)
    if not (isinstance(store_class, type) and issubclass(store_class, WorkflowStore)):
        raise ConfigurationError(f"{type(backend).__name__} names {path!r} as its workflow store, which is not a "
                                 f"WorkflowStore class")
    return store_class.for_backend(beside)
