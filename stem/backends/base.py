"""The ``ResultBackend`` protocol: task statuses, heartbeats, revocations.

Every adapter (memory, sqlite, redis, postgres) implements all three parts so
``wait_for_task``, ``stem worker status`` and persistent revokes work the same
way everywhere (``tests/contract`` proves it).

* ``store`` is an upsert of the whole status.  A terminal status wakes every
  ``wait`` on that id, in any process that can reach the backend, without the
  waiter busy-polling (condition variables, pub/sub, LISTEN/NOTIFY ...).
* Each status carries its own lifetime, ``TaskStatus.ttl`` (seconds from the
  store; the worker sets it from the task's ``result_ttl``/``failure_ttl``,
  ``stem.results.ttl_of``), and the backend applies it to that status alone,
  in the same write (``status_ttl``): a terminal status lives ``ttl`` seconds,
  a status a task passes through (RUNNING, RETRYING ...) ``max(ttl,
  result_expires)``, so a short result lifetime never drops it before the
  result replaces it; without a ``ttl``, ``result_expires`` (default one
  day).  Every path that stores (``store``, ``store_many``, the fused
  store+ack ones, ``store_if_not_terminal``) follows this rule; a ``ttl``
  that is not finite seconds > 0 is refused (ConfigurationError) before
  anything of the call is stored.  An expired or unknown id reads as
  ``None`` (``Stem.get_status`` turns that into PENDING).
* ``wait``, ``wait_many`` and ``watch`` block on those wake-ups through one
  ``WaitHub`` per backend instance (``stem.backends.waiting``): any number of
  concurrent waits in a process use a constant number of connections.
* Heartbeats are per worker id and vanish ``ttl`` seconds after the last put,
  so a dead worker disappears by itself.
* ``store_if_not_terminal`` is the conditional form of ``store`` for the
  statuses a worker writes while a task runs (RUNNING, progress): atomically
  per id, it never replaces a terminal status, so a late RUNNING cannot hide
  a result that landed first.
* Revocations are persistent (until ``expires``) so a worker that starts after
  the revoke still honours it.  Each may carry a *proof* (``stem.revocation``:
  a frame signed by whoever revoked, naming the id); a worker with a signer
  honours only revocations whose proof verifies.
* Schedule records (``ScheduleRecord``, one per schedule id) are what
  schedulers share: a schedule's stored definition (for schedules added at run
  time), its paused flag and the newest fire time any scheduler published.
  They never expire.  ``mark_fired`` only moves ``last_fired`` forward,
  atomically, so schedulers racing on one schedule (or a slow one, late with
  an old fire time) cannot rewind it.
"""

from __future__ import annotations

import abc
import time
from typing import Any, Iterator, NamedTuple, Sequence

from .. import _checks as checks
from .._checks import DEFAULT_RESULT_EXPIRES
from ..errors import ConfigurationError
from ..results import TERMINAL_STATES, TaskStatus
from .groups import GroupRecord, check_due, check_group_id
from .waiting import WATCH, Waiter, WaitHub, Watch, check_wait

__all__ = ["ResultBackend", "ScheduleRecord", "DEFAULT_RESULT_EXPIRES", "TERMINAL_STATE_NAMES",
           "status_ttl", "check_non_terminal", "check_proofs", "check_schedule_ids", "check_definition", "check_fired",
           "RUN_ID_MAX"]

TERMINAL_STATE_NAMES = ("SUCCEEDED", "FAILED", "REVOKED", "DEAD")


def status_ttl(status: TaskStatus, result_expires: float) -> float:
    """Seconds ``status`` lives once stored, by the rule above (ConfigurationError for a
    ``ttl`` that is not finite seconds > 0)."""
    ttl = status.ttl
    if ttl is None:
        return result_expires
    if not checks.is_number(ttl) or ttl <= 0:
        raise ConfigurationError(f"TaskStatus.ttl of task {status.id} must be a finite number of seconds > 0 "
                                 f"or None (the backend's result_expires), got {ttl!r}")
    return float(ttl) if status.state in TERMINAL_STATES else max(float(ttl), result_expires)


def check_non_terminal(statuses: Sequence[TaskStatus]) -> Sequence[TaskStatus]:
    """``store_if_not_terminal``'s argument: non-terminal statuses only."""
    for s in statuses:
        if not isinstance(s, TaskStatus):
            raise ConfigurationError(f"store_if_not_terminal takes TaskStatus objects, got {s!r}")
        if s.is_terminal:
            raise ConfigurationError(f"store_if_not_terminal is for running statuses; task {s.id} is "
                                     f"{s.state.value}: store a terminal status with store()")
    return statuses


def check_proofs(task_ids: Sequence[str], proofs: Sequence[bytes] | None) -> list[bytes | None]:
    """``revoke``'s proofs, one per id (all None when not given)."""
    if proofs is None:
        return [None] * len(task_ids)
    proofs = list(proofs)
    if len(proofs) != len(task_ids):
        raise ConfigurationError(f"revoke got {len(proofs)} proofs for {len(task_ids)} task ids: give one per id")
    for p in proofs:
        if p is not None and not isinstance(p, (bytes, bytearray, memoryview)):
            raise ConfigurationError(f"a revocation proof is bytes (a signed frame), got {type(p).__name__}")
    return [None if p is None else bytes(p) for p in proofs]


#: The longest run id ``mark_fired`` takes: a task id's limit (``Stem.enqueue``'s ``task_id``).
RUN_ID_MAX = 200


class ScheduleRecord(NamedTuple):
    """What a backend keeps for one schedule (``ResultBackend.schedule_records``)."""

    id: str
    #: ``Schedule.to_dict()`` as msgpack, for a schedule added at run time; None for a record
    #: that only holds the state of a schedule declared in code.
    definition: bytes | None
    paused: bool
    #: The newest fire time any scheduler published (epoch seconds); None before the first run.
    last_fired: float | None
    #: The run id published for ``last_fired`` (None with it).
    last_run_id: str | None
    #: When the record last changed (epoch seconds; the server's clock on Postgres).
    updated_at: float


def check_schedule_ids(ids: Sequence[str] | None) -> list[str] | None:
    """``schedule_records``'s argument: None (all) or a sequence of schedule ids (not one str)."""
    if ids is None:
        return None
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ConfigurationError(f"schedule_records takes a sequence of schedule ids or None, got {ids!r}")
    return [checks.schedule_id(i) for i in ids]


def check_definition(definition: Any) -> bytes | None:
    """``put_schedule``'s definition: bytes (msgpack of ``Schedule.to_dict()``) or None."""
    if definition is None:
        return None
    if not isinstance(definition, (bytes, bytearray, memoryview)):
        raise ConfigurationError(f"a schedule definition is bytes (msgpack of Schedule.to_dict()) or None, "
                                 f"got {type(definition).__name__}")
    return bytes(definition)


def check_fired(schedule_id: Any, fire_time: Any, run_id: Any) -> tuple[str, float, str]:
    """``mark_fired``'s arguments: a schedule id, a finite fire time, a run id (a task id)."""
    checks.schedule_id(schedule_id)
    if not checks.is_number(fire_time):
        raise ConfigurationError(f"fire_time must be finite epoch seconds, got {fire_time!r}")
    if not isinstance(run_id, str) or not 0 < len(run_id) <= RUN_ID_MAX:
        raise ConfigurationError(f"run_id must be a non-empty string of at most {RUN_ID_MAX} chars, got {run_id!r}")
    return schedule_id, float(fire_time), run_id


class ResultBackend(abc.ABC):
    url: str = ""
    result_expires: float = DEFAULT_RESULT_EXPIRES
    _store: Any = None      # the adapter's stem.stores.base.Store, if it has one

    def shares_store_with(self, broker: Any) -> bool:
        """True when ``broker`` keeps its queues in this backend's store (``broker.store``:
        one Redis pool, one SQLite file, one Postgres database), so that results and acks
        can go together (``store_many_and_ack``)."""
        mine, theirs = self._store, getattr(broker, "store", None)
        return mine is not None and theirs is not None and mine.same_store(theirs)

    def reopen_recipe(self) -> tuple[str, dict[str, Any]] | None:
        """``(url, options)`` that open another instance on this same store from another
        process (``stem.backends.from_url(url, **options)``), or None when no other process
        can reach it (in-memory).  A worker's children read chord results through it."""
        return None

    def workflow_store_recipe(self) -> tuple[str, Any] | None:
        """``("module:Class", backend)``: the workflow store that keeps runs beside this backend
        (same database, file or server), opened by ``Class.for_backend(backend)``
        (``stem.workflows.store.open_store``); None when this backend keeps no workflow runs.
        The backend names its store, as it names how to reopen it, so that a subclass or an
        adapter of any module finds its store (a string: backends do not import workflows)."""
        return None

    # -- statuses ---------------------------------------------------------------
    @abc.abstractmethod
    def store(self, status: TaskStatus) -> None:
        """Upsert ``status``, to live ``status_ttl(status, result_expires)`` seconds from now;
        durable (as the adapter is) when this returns."""

    def store_many(self, statuses: Sequence[TaskStatus]) -> None:
        """Upsert a batch in one round trip where the adapter allows it."""
        for s in statuses:
            self.store(s)

    def store_many_and_ack(self, statuses: Sequence[TaskStatus], broker: Any, deliveries: Sequence[Any]) -> bool:
        """Store ``statuses`` and ack ``deliveries`` together (one transaction or one
        round trip) when ``broker`` lives in the same store (``shares_store_with``); True
        if done.  The default does nothing and returns False: the worker then stores, then
        acks."""
        return False

    def store_many_ack_and_consume(self, statuses: Sequence[TaskStatus], broker: Any, deliveries: Sequence[Any],
                                   queues: Sequence[str], max_count: int, consumer: str) -> list | None:
        """``store_many_and_ack``, then lease up to ``max_count`` deliveries from ``queues``
        for ``consumer`` (as ``broker.consume`` with no wait would), all in one round trip,
        when ``broker`` lives in the same store; returns the new deliveries.  Tried once,
        never retried (a retry might lease twice); on an error nothing of the consume is
        left to the caller and it settles the usual way.  The default does nothing and
        returns None: the worker then never asks again."""
        return None

    @abc.abstractmethod
    def store_if_not_terminal(self, statuses: Sequence[TaskStatus]) -> None:
        """Upsert each of ``statuses`` only where the stored status of its id is absent (or
        expired) or not terminal, atomically per id: whatever order a worker's RUNNING or
        progress write and the task's result reach the backend in, the result stays.
        Non-terminal statuses only (ConfigurationError otherwise: use ``store``, which also
        wakes waiters); never wakes a ``wait``.  One round trip where the adapter allows it."""

    @abc.abstractmethod
    def get(self, task_id: str) -> TaskStatus | None:
        """The latest status, or None when unknown or expired."""

    def get_many(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        return [self.get(t) for t in task_ids]

    # -- waiting (stem.backends.waiting: one hub per instance, shared by every waiter) --------
    #: The adapter's ``WaitHub``; it decides how ids are read and how stores are announced.
    _waits: WaitHub

    def _open_wait(self, ids: list[str], mode: str, keep_latest: bool, deadline: float) -> Waiter:
        """Register a waiter on ``ids`` (then they are read): the adapter's hook."""
        return self._waits.open(ids, mode, keep_latest)

    def wait(self, task_id: str, timeout: float) -> TaskStatus | None:
        """Block until the task reaches a terminal state (return it) or ``timeout`` seconds
        pass (return the latest status the wait saw, possibly None).  ``wait_many`` of one id."""
        ids, timeout, _ = check_wait([task_id], timeout)
        deadline = time.monotonic() + timeout
        waiter = self._open_wait(ids, "ALL", True, deadline)
        try:
            self._waits.wait(waiter, deadline)
        finally:
            self._waits.close(waiter)
        return waiter.done.get(task_id) or waiter.latest or None

    def wait_many(self, task_ids: Sequence[str], timeout: float, return_when: str = "ALL") -> dict[str, TaskStatus]:
        """Block until ``return_when`` holds for ``task_ids`` or ``timeout`` seconds pass, and
        return the terminal statuses found by then (by id, in the order they were found;
        ids without one are left out).  ``"ALL"``: every id is terminal;
        ``"FIRST_COMPLETED"``: at least one is; ``"FIRST_EXCEPTION"``: one is FAILED, DEAD
        or REVOKED, or all are terminal.  Statuses stored before the call are found (the
        ids are registered, then read); any number of concurrent waits in the process
        share one notification connection and one reader (``stem.backends.waiting``).
        Bad arguments raise ``ConfigurationError`` before anything is waited on; an
        unreachable backend, ``BackendConnectionError``."""
        ids, timeout, mode = check_wait(task_ids, timeout, return_when)
        if not ids:
            return {}
        deadline = time.monotonic() + timeout
        waiter = self._open_wait(ids, mode, False, deadline)
        try:
            self._waits.wait(waiter, deadline)
        finally:
            self._waits.close(waiter)
        return dict(waiter.done)

    def watch(self, task_ids: Sequence[str], timeout: float) -> Iterator[TaskStatus]:
        """Yield the terminal status of each of ``task_ids`` as it is found (each id once,
        those already terminal first, in input order), and stop when every id came or
        ``timeout`` seconds after the call: at the timeout the iterator simply ends, so the
        caller tells what is still pending by the ids it did not get (``Stem.as_completed``
        raises ``TaskTimeoutError`` naming them).  The arguments are checked, and the ids
        registered, by the call itself, not by the first ``next``; dropping the iterator
        unregisters them."""
        ids, timeout, _ = check_wait(task_ids, timeout)
        deadline = time.monotonic() + timeout
        if not ids:
            return iter(())
        waiter = self._open_wait(ids, WATCH, False, deadline)
        return Watch(self._waits, waiter, deadline)

    @abc.abstractmethod
    def forget(self, task_id: str) -> None:
        """Drop the stored status."""

    # -- heartbeats -------------------------------------------------------------
    @abc.abstractmethod
    def put_heartbeat(self, worker_id: str, data: dict[str, Any], ttl: float) -> None:
        """Store the worker's heartbeat; it disappears ``ttl`` seconds later unless renewed."""

    @abc.abstractmethod
    def heartbeats(self) -> list[dict[str, Any]]:
        """Every live heartbeat (each dict as put, plus ``worker_id`` and ``seen_at``)."""

    @abc.abstractmethod
    def remove_heartbeat(self, worker_id: str) -> None:
        """Called by a worker on clean shutdown."""

    # -- revocations ------------------------------------------------------------
    @abc.abstractmethod
    def revoke(self, task_ids: Sequence[str], expires: float | None = None,
               proofs: Sequence[bytes | None] | None = None) -> None:
        """Remember that these ids must not run (for ``expires`` seconds, default ``result_expires``).

        ``proofs`` (one per id, in order; see ``stem.revocation``) are stored with them and
        expire with them; revoking an id again replaces its expiry and its proof (without
        proofs: drops the one stored before)."""

    @abc.abstractmethod
    def revoked(self, task_ids: Sequence[str] | None = None) -> set[str]:
        """The revoked ids among ``task_ids`` (all live revocations when None), proven or not."""

    @abc.abstractmethod
    def revocation_proofs(self, task_ids: Sequence[str]) -> dict[str, bytes]:
        """The proofs stored with the live revocations among ``task_ids`` (an id revoked
        without a proof, or not revoked, is absent).  Workers ask only for ids they have
        not checked yet, so the once-a-second ``revoked()`` stays the only steady read."""

    # -- schedule records ---------------------------------------------------------
    # Every argument is checked (``check_*`` above: ConfigurationError) before the store is
    # touched, so a bad call stores nothing.

    @abc.abstractmethod
    def schedule_records(self, ids: Sequence[str] | None = None) -> dict[str, ScheduleRecord]:
        """The records of ``ids`` (absent ones are left out), or every record when None; by id.
        Listing every record reads an index of ids, never a scan of the whole store."""

    @abc.abstractmethod
    def put_schedule(self, schedule_id: str, definition: bytes | None) -> None:
        """Create the record or replace its definition, keeping its state (``paused``,
        ``last_fired``, ``last_run_id``): re-adding a schedule neither resumes it nor makes it
        fire again.  ``definition`` None leaves a state-only record (a schedule in code)."""

    @abc.abstractmethod
    def remove_schedule(self, schedule_id: str) -> bool:
        """Delete the record, state included; True if there was one."""

    @abc.abstractmethod
    def pause_schedule(self, schedule_id: str, paused: bool) -> bool:
        """Set the paused flag, atomically; True if that changed it (a missing record counts
        as not paused).  A missing record is created without a definition, so a schedule
        declared in code can be paused (or resumed) before any scheduler fired it."""

    @abc.abstractmethod
    def mark_fired(self, schedule_id: str, fire_time: float, run_id: str) -> None:
        """Record that ``run_id``, the run for ``fire_time``, was published.  Atomically:
        ``last_fired`` becomes ``max(stored, fire_time)`` and never goes back, however many
        schedulers race or however late one is; ``last_run_id`` changes only together with
        ``last_fired`` (a fire time not newer than the stored one changes nothing).  A missing
        record is created (not paused, no definition).  Durable as the adapter is."""

    # -- group records (stem.backends.groups; what stem.canvas counts on) ------------------
    # Not abstract: an adapter without them refuses canvases (ConfigurationError) and
    # nothing else.  The four adapters of stem implement all of them (tests/contract).

    def _no_groups(self) -> ConfigurationError:
        return ConfigurationError(f"{type(self).__name__} keeps no group records: canvases (group, chord, "
                                  "chunks) need a backend that does (memory, sqlite, redis, postgres)")

    def group_create(self, group_id: str, expected: int, data: bytes, *, seal_by: float, ttl: float,
                     held: bool = False) -> bool:
        """Create the record of ``group_id``, unsealed, expecting ``expected`` members; True
        if created, False if a record of that id exists (then nothing changes: a redelivered
        chain step that launches a group launches it once).  ``ttl``: its lifetime once ended
        if no member ever sets one; ``held``: a reader comes after its end, its lifetime
        starts at ``group_release`` (``stem.backends.groups``)."""
        raise self._no_groups()

    def group_publish(self, group_id: str, expected: int, data: bytes, *, seal_by: float, ttl: float, held: bool,
                      broker: Any, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], priority: int = 0,
                      visibility_timeout: float | None = None) -> bool | None:
        """Create the record already sealed and publish its members (``broker.publish_frames``'
        batch, ``expected`` of them) in one transaction, where ``broker`` lives in this
        backend's store and the store allows it (one SQLite file, one Postgres database, one
        Redis server: not a Redis Cluster, where the record and the queue are in different
        slots).  True: created and published, together; False: a record of that id existed,
        nothing was published; None: not here, nothing was done (the caller creates,
        publishes and seals, and the sweep covers a crash in between).  A producer killed
        during the call leaves both or neither."""
        return None

    def group_seal(self, group_id: str) -> "GroupRecord | None":
        """Seal the record (atomically with the counters, so a member finishing at the same
        moment and the seal cannot both miss completion) and return it; None if unknown.  A
        record complete by the seal (and not held) starts its lifetime here."""
        raise self._no_groups()

    def group_record(self, group_id: str, member_id: str, index: int, ok: bool,
                     outcome: bytes, ttl: float | None = None) -> "GroupRecord | None":
        """Count ``member_id`` finished (``ok``: succeeded, else failed) and keep ``outcome``
        at ``index``, unless it was counted before (then nothing changes); atomically, O(1)
        work, and return the record as it is after the call (None for an unknown or expired
        group: nothing is created).  ``ttl``: the member's result lifetime (None:
        ``result_expires``), which the record's lifetime is extended to (the first member
        recorded replaces the creation's).  The call that completes the record (not held)
        starts its lifetime; on a record already ended, what it adds expires with it."""
        raise self._no_groups()

    def group_record_many(self, items: Sequence[tuple[str, str, int, bool, bytes, float | None]]
                          ) -> list["GroupRecord | None"]:
        """``group_record`` of each ``(group_id, member_id, index, ok, outcome, ttl)``, in
        order, in one round trip where the adapter allows it (a worker settles a batch of
        members at once); each item as atomic as ``group_record`` alone."""
        return [self.group_record(*item) for item in items]

    def store_and_record(self, statuses: Sequence[TaskStatus],
                         members: Sequence[tuple[str, str, int, bool, bytes, float | None]],
                         brief: bool = False) -> list["GroupRecord | bool | None"]:
        """``store_many(statuses)`` then ``group_record_many(members)``, in one round trip (one
        transaction on SQL) where the adapter allows it: a canvas member's status and its
        count in its group land in the same step, before the worker acks it.  ``brief``: a
        member that succeeded and left its group incomplete may be answered True instead
        of the record (the common case, with nothing for the caller to do: less to send),
        and when every member is a success, those of one group may be counted together, the
        record (if any) answered to the last of them and True to the others."""
        if statuses:
            self.store_many(statuses)
        return self.group_record_many(members) if members else []

    def store_record_and_ack(self, statuses: Sequence[TaskStatus],
                             members: Sequence[tuple[str, str, int, bool, bytes, float | None]], broker: Any,
                             deliveries: Sequence[Any], queues: Sequence[str] = (), max_count: int = 0,
                             consumer: str = "") -> "tuple[list[GroupRecord | bool | None], list | None] | None":
        """``store_and_record(statuses, members, brief=True)``, then ``broker``'s acks of
        ``deliveries`` and, with ``queues`` and ``max_count``, a consume of up to that many
        (the settle's refill), in one round trip, where the adapter can make completion
        recoverable: each group the call completes is noted as completing (listed by
        ``group_completions_due`` until ``group_completed``), so the member that completes
        it can be acked before its completion ran (a worker that dies in between leaves the
        note to another's sweep).  Returns (the ``store_and_record`` answer, the leased
        deliveries or None when no consume was asked), or None when not here (then nothing
        was done: the caller records, completes, then acks).  The consume is tried once
        (``RedisBroker.run_keep_and_consume``): an error may leave the rest done, which is
        safe to do again.  Only a single Redis does it; the other adapters keep the
        completion before the ack."""
        return None

    def group_completions_due(self, before: float, limit: int = 100) -> list["GroupRecord"]:
        """Up to ``limit`` records (complete) that ``store_record_and_ack`` noted as
        completing before ``before`` (epoch seconds) and nobody marked ``group_completed``
        since: their completion may never have run.  Notes whose record is gone (expired)
        or not complete are dropped.  The sweep runs these completions (idempotent), then
        marks them."""
        check_due(before, limit)
        return []

    def group_completed(self, group_ids: Sequence[str]) -> None:
        """The completions of ``group_ids`` ran: their notes (``group_completions_due``) go.
        Unknown ids are no error."""
        for group_id in group_ids:
            check_group_id(group_id)

    def group_release(self, group_id: str, ttl: float | None = None) -> "GroupRecord | None":
        """The reader of a held record is done (or will never come: the chord failed): the
        record is no longer held, its lifetime becomes at least ``ttl`` (the reader's result
        lifetime; None: ``result_expires``) and, if the record ended, starts now (again, if it
        had started).  Idempotent; returns the record, None if unknown or expired."""
        raise self._no_groups()

    def group_get(self, group_id: str) -> "GroupRecord | None":
        """The record, or None when unknown or expired."""
        raise self._no_groups()

    def group_outcomes(self, group_id: str, start: int, stop: int) -> list[bytes | None]:
        """The outcomes at indexes ``start``..``stop - 1`` (None where a member has not
        finished): one page of results, one round trip."""
        raise self._no_groups()

    def group_failed_members(self, group_id: str, limit: int = 100) -> list[str]:
        """Up to ``limit`` ids of the members counted as failed (sorted)."""
        raise self._no_groups()

    def group_interrupt_unsealed(self, now: float | None = None) -> list["GroupRecord"]:
        """Mark every record still unsealed past its ``seal_by`` interrupted (its lifetime
        starts, held or not: no reader will come) and return those this call marked: a producer that died between creating a
        group and sealing it leaves no group waiting forever."""
        raise self._no_groups()

    # -- misc -------------------------------------------------------------------
    def close(self) -> None:
        """Release connections.  Safe to call twice."""

    def ping(self) -> None:
        """Raise ``BackendConnectionError`` when the backend cannot be reached."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
