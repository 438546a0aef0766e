"""``WorkflowContext``: the durable calls a workflow makes, matched against its journal.

One context serves one pass of a run's function (``stem.workflows.engine`` runs the
passes).  Every durable call takes the next journal position ``p``:

* if the journal holds an entry at ``p``, it must be the same kind of call with the same
  name, else the run needs attention (``Attention``: the position and both calls); the
  entry's recorded value is returned (or its recorded failure raised) without redoing
  anything;
* if not, the call is done for the first time and its outcome appended at ``p`` under
  the activation's epoch; a refused append means another activation holds the run
  (``Fenced``): this one stops without touching anything else.

Calls that wait (``call``, ``wait``, a child's ``result``) take two positions: the first
records what was started (a task id, a child run id, an event deadline) before it is
started, so a replay after a crash finds the same task or child instead of starting a
second one; the second records the outcome once there is one.  Until then the pass
ends with ``Suspend`` (what the run waits for), and the engine parks the run.

The engine's signals (``Suspend``, ``Fenced``, ``Attention``, ``Fail``,
``ContinueAsNew``) derive from ``BaseException``: a workflow's ``except Exception``
cannot swallow them.  One swallowed by ``except BaseException`` is still acted on: the
context remembers it and raises it again at the next durable call, and the engine
takes it over whatever the function returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import uuid
from datetime import timedelta
from typing import Any, Callable, Iterator, NamedTuple

from .. import _checks as checks
from ..errors import (BackendError, BrokerError, CallFailedError, ChildFailedError, ConfigurationError, EncodeError,
                      StepFailedError, WorkflowError)
from ..results import TaskState
from ..task import TaskOptions
from . import clock
from .codec import decode, decode_error, encode, encode_error, error_of, roundtrip
from .store import PENDING, RUN_ID_MAX, SUCCEEDED, JournalEntry, RunRecord, WorkflowStore
from .wake import CALL_TOPIC, QUEUE_HEADER, RUN_HEADER, SYSTEM_TOPICS, plain_producer, publish_wake

__all__ = ["WorkflowContext", "ChildRun", "Limits", "Services", "PassState", "EngineSignal", "Suspend", "Fenced",
           "Attention", "Fail", "ContinueAsNew", "Outage", "seconds_of", "call_id", "child_id", "check_topic",
           "check_size", "input_bytes", "run_step"]


class Limits(NamedTuple):
    #: bytes of one recorded value (a step's output, the result, an input, an event payload)
    max_output_bytes: int
    #: journal entries of one run (one generation): past it the run fails; use continue_as_new
    max_journal: int


# -- the engine's signals ---------------------------------------------------------------------
class EngineSignal(BaseException):
    """Control flow between a pass and the engine (never an error of the workflow's)."""


class Suspend(EngineSignal):
    """The run waits: park it with these."""

    def __init__(self, *, wake_at: float | None, waiting: dict[str, Any], waits_for: str | None = None,
                 waits_kind: str | None = None):
        super().__init__(waiting.get("kind"))
        self.wake_at = wake_at
        self.waiting = waiting
        self.waits_for = waits_for
        #: what ``waits_for`` names: "task" or "child" (``WorkflowStore.park``)
        self.waits_kind = waits_kind


class Fenced(EngineSignal):
    """An append was refused: another activation claimed the run.  Change nothing more."""


class Attention(EngineSignal):
    """The code no longer matches the journal: park the run NEEDS_ATTENTION with ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Fail(EngineSignal):
    """The engine ends the run FAILED (a limit), whatever the workflow would catch."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error = {"type": error_type, "message": message, "traceback": None}


class Outage(EngineSignal):
    """The store, the broker or the backend failed under a durable call: the activation stops
    (and its task is retried) without the workflow ever seeing an infrastructure error, which
    it could mistake for its own failure."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class ContinueAsNew(EngineSignal):
    def __init__(self, input: bytes):
        super().__init__("continue_as_new")
        self.input = input


# -- helpers ---------------------------------------------------------------------------------
def seconds_of(what: str, value: Any, *, optional: bool = False) -> float | None:
    """float seconds from a number or a timedelta (>= 0); ConfigurationError otherwise."""
    if value is None and optional:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigurationError(f"{what} is a number of seconds >= 0 or a timedelta, got {value!r}")
    return float(value)


def check_topic(topic: Any) -> str:
    if not isinstance(topic, str) or not 0 < len(topic) <= 200:
        raise ConfigurationError(f"an event topic is a non-empty string of at most 200 chars, got {topic!r}")
    if topic.startswith("__"):
        raise ConfigurationError(f"event topics starting with '__' are the engine's own, got {topic!r}")
    return topic


def _base(run_id: str, room: int) -> str:
    """``run_id``, or a shorter stand-in (a prefix and a digest) that leaves ``room`` chars
    for a suffix within RUN_ID_MAX: ids derived from ids stay ids however deep they nest."""
    if len(run_id) + room <= RUN_ID_MAX:
        return run_id
    digest = hashlib.blake2b(run_id.encode(), digest_size=10).hexdigest()
    return f"{run_id[:RUN_ID_MAX - room - 21]}~{digest}"


def call_id(run_id: str, position: int, epoch: int) -> str:
    """The task id of the ``ctx.call`` at ``position``, made by the activation at ``epoch``:
    the same on every replay (it is recorded), new after a reset (a new epoch)."""
    suffix = f":c{position}:e{epoch}"
    return _base(run_id, len(suffix)) + suffix


def child_id(run_id: str, position: int, epoch: int) -> str:
    suffix = f":w{position}:e{epoch}"
    return _base(run_id, len(suffix)) + suffix


def _describe(kind: str, name: str) -> str:
    return f"{kind} {name!r}"


class Services(NamedTuple):
    """What a pass uses besides the journal (made by the engine)."""
    store: WorkflowStore
    producer: Any                     # stem.producer.Stem: the worker's broker, backend, signer
    queue: str                        # where this run's activations (and its children's) go
    limits: Limits
    lease_lost: Callable[[], bool]
    version_of: Callable[[str], str]  # workflow name -> the version a new child run starts under


class PassState:
    """One pass's state, shared by its ``WorkflowContext`` (which the workflow sees) and the
    engine (which reads where the pass ended and which signal ended it)."""

    __slots__ = ("run", "epoch", "journal", "start_len", "services", "position", "pending", "step_position",
                 "step_attempt", "patches", "consumed")

    def __init__(self, *, run: RunRecord, epoch: int, journal: list[JournalEntry], services: Services):
        self.run = run
        self.epoch = epoch
        self.journal = journal          # appended to by the pass: the next pass of the activation reuses it
        self.start_len = len(journal)
        self.services = services
        self.position = 0
        self.pending: EngineSignal | None = None
        self.step_position: int | None = None
        self.step_attempt = 0
        self.patches: dict[str, bool] = {}
        self.consumed: dict[str, int] = {}    # topic -> the newest seq consumed in this generation
        for e in journal:
            if e.kind == "wait.result":
                seq = decode(e.output).get("seq")
                if seq is not None:
                    self.consumed[e.name] = max(self.consumed.get(e.name, 0), seq)

    def consumed_seqs(self) -> list[int]:
        """Seqs of the events this generation consumed and the engine's own events: what
        continue_as_new drops from the inbox."""
        seqs = [s for s in (decode(e.output).get("seq") for e in self.journal if e.kind == "wait.result")
                if s is not None]
        store = self.services.store
        for topic in SYSTEM_TOPICS:
            after = 0
            while True:
                page = store.events(self.run.id, topic, after_seq=after, limit=500)
                seqs += [e.seq for e in page]
                if len(page) < 500:
                    break
                after = page[-1].seq
        return seqs


def check_size(limits: Limits, what: str, data: bytes) -> None:
    if len(data) > limits.max_output_bytes:
        raise EncodeError(f"{what} is {len(data)} bytes encoded, over the limit of {limits.max_output_bytes} bytes "
                          "(Workflows(max_output_bytes=...)): store large data elsewhere and record its key")


class WorkflowContext:
    """Handed to a workflow (and to its steps) as the first argument."""

    __slots__ = ("_s",)

    def __init__(self, state: PassState):
        self._s = state

    # -- what the workflow may read -----------------------------------------------------
    @property
    def run_id(self) -> str:
        return self._s.run.id

    @property
    def workflow(self) -> str:
        return self._s.run.name

    @property
    def version(self) -> str:
        return self._s.run.version

    @property
    def generation(self) -> int:
        """How many times this run continued as new."""
        return self._s.run.generation

    @property
    def parent_id(self) -> str | None:
        return self._s.run.parent

    @property
    def is_replaying(self) -> bool:
        """True while the function is replaying calls the journal already holds (log once with it)."""
        return self._s.position < len(self._s.journal)

    @property
    def idempotency_key(self) -> str:
        """Inside a step: a key for its external side effects, the same on every attempt and
        every re-execution of this step call (run id, generation, position), and different
        for every other step call.  Give it to a payment API, an upsert, a mail dedup."""
        if self._s.step_position is None:
            raise WorkflowError("ctx.idempotency_key is only set inside a step (@wf.step)")
        return f"{self._s.run.id}:g{self._s.run.generation}:p{self._s.step_position}"

    @property
    def attempt(self) -> int:
        """Inside a step: its attempt, from 1."""
        if self._s.step_position is None:
            raise WorkflowError("ctx.attempt is only set inside a step (@wf.step)")
        return self._s.step_attempt

    # -- the journal ----------------------------------------------------------------------
    def _raise(self, signal: EngineSignal) -> Any:
        self._s.pending = signal
        raise signal

    @contextlib.contextmanager
    def _shielded(self) -> Iterator[None]:
        """The engine's own store, broker and backend calls: an outage there is ``Outage``."""
        try:
            yield
        except (BrokerError, BackendError) as exc:
            self._raise(Outage(exc))

    def _next(self, kind: str, name: str) -> tuple[int, JournalEntry | None]:
        """The next position and its entry (None: first time), after the checks every
        durable call makes."""
        if self._s.pending is not None:
            raise self._s.pending     # swallowed by the workflow: it still ends the pass
        if self._s.step_position is not None:
            raise WorkflowError(f"{kind} {name!r} was called inside a step (position {self._s.step_position}): "
                                "steps are not replayed, so they cannot make durable calls; call it from "
                                "the workflow instead")
        p = self._s.position
        self._s.position += 1
        if p < len(self._s.journal):
            e = self._s.journal[p]
            if e.kind != kind or e.name != name:
                self._raise(Attention(
                    f"position {p}: the code calls {_describe(kind, name)} where the journal holds "
                    f"{_describe(e.kind, e.name)}: the workflow's code changed under a running run. Restore the "
                    f"old order, branch on ctx.patched(...), or reset the run: stem wf reset {self._s.run.id} "
                    f"--to {p}"))
            return p, e
        if p >= self._s.services.limits.max_journal:
            self._raise(Fail("JournalLimitExceeded",
                             f"the run's journal reached {self._s.services.limits.max_journal} entries (the limit); "
                             "a long-running workflow should call ctx.continue_as_new(...) to start afresh"))
        return p, None

    def _append(self, p: int, kind: str, name: str, *, output: bytes | None = None, error: bytes | None = None,
                attempt: int = 1) -> None:
        now = clock.now()
        with self._shielded():
            ok = self._s.services.store.append(self._s.run.id, self._s.epoch, p, kind, name, output=output,
                                               error=error, attempt=attempt, now=now)
        if not ok:
            self._raise(Fenced())
        self._s.journal.append(JournalEntry(p, kind, name, output, error, attempt, self._s.epoch, now))

    def _check_size(self, what: str, data: bytes) -> None:
        check_size(self._s.services.limits, what, data)

    # -- steps ----------------------------------------------------------------------------
    def _run_step(self, step: Any, args: tuple, kwargs: dict) -> Any:
        if self._s.step_position is not None:
            return step.fn(self, *args, **kwargs)     # a step called from a step is part of it
        p, entry = self._next("step", step.name)
        if entry is not None:
            if entry.error is not None:
                raise _step_failed(step.name, p, decode_error(entry.error), entry.attempt)
            return decode(entry.output)
        retry = step.retry
        attempt = 0
        while True:
            attempt += 1
            if self._s.services.lease_lost():
                self._raise(Fenced())
            self._s.step_position, self._s.step_attempt = p, attempt
            try:
                value = step.fn(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the step's failure, recorded below
                failure: Exception | None = exc
            else:
                failure = None
            finally:
                self._s.step_position = None
            if failure is None:
                try:
                    data, value = roundtrip(value, f"the output of step {step.name!r}")
                    self._check_size(f"the output of step {step.name!r}", data)
                except EncodeError as exc:
                    failure = exc      # retrying cannot change what the step returns: recorded at once
                else:
                    self._append(p, "step", step.name, output=data, attempt=attempt)
                    return value
            elif attempt < retry.max_attempts and retry.retries(failure):
                delay = retry.delay(attempt)
                if delay > 0:
                    time.sleep(delay)
                continue
            error = error_of(failure)
            self._append(p, "step", step.name, error=encode_error(error), attempt=attempt)
            raise _step_failed(step.name, p, error, attempt) from failure

    # -- durable calls ---------------------------------------------------------------------
    def now(self) -> float:
        """Epoch seconds, recorded: every replay sees the time of the first run."""
        p, entry = self._next("now", "now")
        if entry is not None:
            return decode(entry.output)
        value = clock.now()
        self._append(p, "now", "now", output=encode(value))
        return value

    def uuid4(self) -> uuid.UUID:
        """A random UUID, recorded: every replay sees the same one."""
        p, entry = self._next("uuid", "uuid4")
        if entry is not None:
            return uuid.UUID(decode(entry.output))
        value = uuid.uuid4()
        self._append(p, "uuid", "uuid4", output=encode(str(value)))
        return value

    def sleep(self, duration: float | timedelta) -> None:
        """Sleep durably: the run parks (the worker slot is freed) until ``duration`` has
        passed by the workflows' clock, across restarts of anything; never wakes early."""
        seconds = seconds_of("a sleep's duration", duration)
        p, entry = self._next("sleep", "sleep")
        if entry is None:
            until = clock.now() + seconds
            self._append(p, "sleep", "sleep", output=encode({"until": until}))
        else:
            until = decode(entry.output)["until"]
        if clock.now() >= until:
            return
        self._raise(Suspend(wake_at=until, waiting={"kind": "sleep", "position": p, "until": until}))

    def wait(self, topic: str, timeout: float | timedelta | None = None) -> Any:
        """The payload of the next event of ``topic`` sent to this run (oldest first; events
        sent before the wait are kept for it), or None once ``timeout`` (from the first time
        this wait was reached) passes first.  ``timeout=None`` waits for ever."""
        check_topic(topic)
        timeout = seconds_of("a wait's timeout", timeout, optional=True)
        p, arm = self._next("wait", topic)
        if arm is None:
            deadline = None if timeout is None else clock.now() + timeout
            self._append(p, "wait", topic, output=encode({"deadline": deadline}))
        else:
            deadline = decode(arm.output)["deadline"]
        q, done = self._next("wait.result", topic)
        if done is not None:
            got = decode(done.output)
            return None if got.get("seq") is None else decode(got["payload"])
        with self._shielded():
            events = self._s.services.store.events(self._s.run.id, topic, after_seq=self._s.consumed.get(topic, 0),
                                                   limit=1)
        if events:
            event = events[0]
            self._append(q, "wait.result", topic, output=encode({"seq": event.seq, "payload": event.payload}))
            self._s.consumed[topic] = event.seq
            return decode(event.payload)
        if deadline is not None and clock.now() >= deadline:
            self._append(q, "wait.result", topic, output=encode({"seq": None}))
            return None
        self._raise(Suspend(wake_at=deadline, waiting={"kind": "wait", "position": q, "topic": topic,
                                                       "deadline": deadline}))

    def call(self, task: Any, args: dict[str, Any] | None = None, *, options: TaskOptions | None = None) -> Any:
        """Run a normal stem task (a name, or a handle from ``@registry.task``) and return its
        result; the run parks meanwhile.  Its id is deterministic (recorded before it is
        published), so a replay never publishes it twice.  A task that ends FAILED, DEAD or
        REVOKED raises ``CallFailedError``."""
        name = task if isinstance(task, str) else getattr(task, "name", None)
        if not isinstance(name, str):
            raise ConfigurationError(f"ctx.call takes a task name or a task handle, got {task!r}")
        checks.task_name(name, error=ConfigurationError)
        if args is not None and (not isinstance(args, dict) or not all(isinstance(k, str) for k in args)):
            raise EncodeError(f"args of {name!r} must be a dict with str keys, got {type(args).__name__}")
        encode(args, f"the args of {name!r}")
        if options is not None and not isinstance(options, TaskOptions):
            raise ConfigurationError(f"options must be a TaskOptions, got {options!r}")
        if options is not None and options.unique:
            raise ConfigurationError(f"ctx.call({name!r}) publishes its task under an id of its own (its idempotency "
                                     "key): unique options would make it wait on another task's id")
        p, arm = self._next("call", name)
        if arm is None:
            task_id = call_id(self._s.run.id, p, self._s.epoch)
            self._append(p, "call", name, output=encode({"id": task_id}))
        else:
            task_id = decode(arm.output)["id"]
        q, done = self._next("call.result", name)
        if done is None:
            with self._shielded():
                status = self._s.services.producer.backend.get(task_id)
            if status is not None and status.is_terminal:
                done = self._record_call(q, name, status)
            else:
                if status is None:      # not published yet (or lost): publish; refused if it is queued
                    with self._shielded():
                        self._publish_call(name, args, options, task_id)
                self._raise(Suspend(wake_at=None, waits_for=task_id, waits_kind="task",
                                    waiting={"kind": "call", "position": q, "task": name, "id": task_id}))
        if done.error is not None:
            err = decode_error(done.error)
            raise CallFailedError(f"task {name!r} ({task_id}) called at position {p} ended {err.get('state')}: "
                                  f"{err.get('type')}: {err.get('message')}", name, p, err.get("type"),
                                  err.get("message"))
        return decode(done.output)

    def _publish_call(self, name: str, args: Any, options: TaskOptions | None, task_id: str) -> None:
        # its result must be stored (the run reads it): never ignore_result
        opts = TaskOptions(ignore_result=False) if options is None else options.merged(None)
        if opts.ignore_result:
            import msgspec
            opts = msgspec.structs.replace(opts, ignore_result=False)
        plain_producer(self._s.services.producer).enqueue(
            name, args, options=opts, task_id=task_id,
            headers={RUN_HEADER: self._s.run.id, QUEUE_HEADER: self._s.services.queue})

    def _record_call(self, q: int, name: str, status: Any) -> JournalEntry:
        if status.state is TaskState.SUCCEEDED:
            data, _ = roundtrip(status.result, f"the result of task {name!r}")
            try:
                self._check_size(f"the result of task {name!r}", data)
            except EncodeError as exc:
                self._append(q, "call.result", name, error=encode(
                    {"type": "EncodeError", "message": str(exc), "state": "SUCCEEDED"}))
            else:
                self._append(q, "call.result", name, output=data)
        else:
            self._append(q, "call.result", name, error=encode(
                {"type": status.error_type or status.reason or status.state.value,
                 "message": status.error or status.reason or "", "state": status.state.value}))
        return self._s.journal[q]

    def start_child(self, workflow: Any, input: dict[str, Any] | None = None) -> "ChildRun":
        """Start a child run of ``workflow`` (a name or a ``@wf.workflow`` function) with
        ``input``; returns its ``ChildRun`` (``.id``; ``.result()`` waits for it).  The child's
        id is deterministic and recorded before the child is created, so a replay never
        starts a second one.  The child runs on its own; when it ends, this run is woken."""
        name = workflow if isinstance(workflow, str) else getattr(workflow, "workflow_name", None)
        if not isinstance(name, str):
            raise ConfigurationError(f"start_child takes a workflow name or a @wf.workflow function, got {workflow!r}")
        version = self._s.services.version_of(name)
        data = input_bytes(input, f"the input of child {name!r}")
        self._check_size(f"the input of child {name!r}", data)
        p, arm = self._next("child", name)
        if arm is None:
            run_id = child_id(self._s.run.id, p, self._s.epoch)
            self._append(p, "child", name, output=encode({"id": run_id}))
            with self._shielded():
                self._ensure_child(run_id, name, version, data)
        else:
            run_id = decode(arm.output)["id"]
            if p == self._s.start_len - 1:     # the last entry: the crash may have been before the child was made
                with self._shielded():
                    self._ensure_child(run_id, name, version, data)
        return ChildRun(self, run_id, name, p)

    def _ensure_child(self, run_id: str, name: str, version: str, data: bytes) -> None:
        from .mirror import mirror
        store = self._s.services.store
        created, child = store.create(run_id, name, version, data, now=clock.now(), parent=self._s.run.id)
        if child.status == PENDING:
            if created:
                mirror(self._s.services.producer.backend, child, self._s.services.queue)
            publish_wake(self._s.services.producer, run_id, child.epoch, "start", self._s.services.queue)

    def _child_result(self, child: "ChildRun") -> Any:
        q, done = self._next("child.result", child.workflow)
        if done is None:
            with self._shielded():
                run = self._s.services.store.get(child.id)
            if run is None:
                self._raise(Fail("ChildMissing", f"child run {child.id} started at position {child.position} "
                                                 "is not in the store"))
            if not run.terminal:
                self._raise(Suspend(wake_at=None, waits_for=child.id, waits_kind="child",
                                    waiting={"kind": "child", "position": q, "workflow": child.workflow,
                                             "id": child.id}))
            if run.status == SUCCEEDED:
                self._append(q, "child.result", child.workflow, output=run.result or encode(None))
            else:
                err = decode_error(run.error) if run.error else {"type": "Cancelled", "message": "cancelled"}
                self._append(q, "child.result", child.workflow, error=encode(
                    {"type": err.get("type"), "message": err.get("message"), "state": run.status}))
            done = self._s.journal[q]
        if done.error is not None:
            err = decode_error(done.error)
            raise ChildFailedError(f"child run {child.id} ({child.workflow!r}, started at position "
                                   f"{child.position}) ended {err.get('state')}: {err.get('type')}: "
                                   f"{err.get('message')}", child.workflow, q, err.get("type"), err.get("message"))
        return decode(done.output)

    def patched(self, name: str) -> bool:
        """Branch between old and new code while runs are in flight: True for runs that reach
        this point under the new code (a marker is recorded), False for runs whose journal
        already went past this point without it (the old code's calls follow; nothing is
        consumed).  The same answer for ``name`` for the rest of the run."""
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise ConfigurationError(f"a patch name is a non-empty string of at most 200 chars, got {name!r}")
        if name in self._s.patches:
            return self._s.patches[name]
        if self._s.pending is not None:
            raise self._s.pending
        p = self._s.position
        if p < len(self._s.journal):
            e = self._s.journal[p]
            got = e.kind == "patch" and e.name == name
            if got:
                self._s.position += 1
        else:
            self._next("patch", name)
            self._append(p, "patch", name)
            got = True
        self._s.patches[name] = got
        return got

    def continue_as_new(self, input: dict[str, Any] | None = None) -> None:
        """End this generation and start the run afresh with ``input`` (same run id, an empty
        journal, unconsumed events kept): how a run that loops for ever stays under the
        journal limit.  Does not return."""
        data = input_bytes(input, "the input of continue_as_new")
        self._check_size("the input of continue_as_new", data)
        if self._s.pending is not None:
            raise self._s.pending
        self._raise(ContinueAsNew(data))

    def __repr__(self) -> str:
        return f"WorkflowContext(run_id={self._s.run.id!r}, workflow={self._s.run.name!r}, position={self._s.position})"


class ChildRun:
    """A child run started by ``ctx.start_child``."""

    __slots__ = ("_ctx", "id", "workflow", "position", "_outcome")

    def __init__(self, ctx: WorkflowContext, run_id: str, workflow: str, position: int):
        self._ctx = ctx
        self.id = run_id
        self.workflow = workflow
        self.position = position
        self._outcome: tuple[bool, Any] | None = None

    def result(self) -> Any:
        """The child's return value (the run parks until it ends); ``ChildFailedError`` if it
        ended FAILED or CANCELLED.  A durable call: recorded once, the same on every replay."""
        if self._outcome is None:
            try:
                self._outcome = (True, self._ctx._child_result(self))
            except ChildFailedError as exc:
                self._outcome = (False, exc)
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    def __repr__(self) -> str:
        return f"ChildRun({self.id!r}, workflow={self.workflow!r})"


def input_bytes(input: Any, what: str) -> bytes:
    if input is None:
        input = {}
    if not isinstance(input, dict) or not all(isinstance(k, str) for k in input):
        raise EncodeError(f"{what} must be a dict with str keys (the workflow is called fn(ctx, **input)), "
                          f"got {type(input).__name__}")
    return encode(input, what)


def _step_failed(name: str, position: int, error: dict[str, Any], attempt: int) -> StepFailedError:
    return StepFailedError(f"step {name!r} at position {position} failed after {attempt} attempt(s): "
                           f"{error.get('type')}: {error.get('message')}", name, position, error.get("type"),
                           error.get("message"))


def run_step(ctx: WorkflowContext, step: Any, args: tuple, kwargs: dict) -> Any:
    """A ``Step`` called with a workflow's context (``stem.workflows.api.Step.__call__``)."""
    return ctx._run_step(step, args, kwargs)
