"""Canvas: group, chord, chain, chunks — composing tasks into batch jobs.

::

    sig = registry.signature
    h = stem.apply(chord(group(sig("img.resize", {"path": p}) for p in paths), sig("img.zip")))
    h.id; h.wait(timeout=60); h.results()          # member results in input order
    stem.apply(chain(sig("a"), sig("b"), sig("c")))  # b gets a's result as ctx.previous
    stem.apply(chunks("row.import", rows, size=100))

How it runs (docs/design.md, "Canvas"):

* Every task of a canvas carries its place in its envelope (``Envelope.canvas``,
  signed with the rest): ``up``, where it reports when it reaches a terminal state
  (a group to count it in, or the chain it is a step of, with the chain's remaining
  steps), and its predecessor's result (``pv`` inline, or ``pg``: a group whose
  results it reads from the backend).  Tasks outside any canvas carry None and cost
  the worker one attribute test.
* A group is a record in the result backend (``stem.backends.groups``): created
  unsealed, members published (one task name: ``enqueue_many``'s fast path), then
  sealed.  The worker records each member's terminal status in it, by member id,
  before the member's ack (on a single Redis, with it: the count that completes the
  group notes it as completing, and the heartbeat's sweep runs a noted completion its
  worker never did); whoever sees it complete (the last member's worker, or the
  sealing producer) runs the completion: the chord's callback is published under its
  id key (the chord's id), so two completions publish it once.
* Ids are deterministic: a group's members are ``<group id>.<index>``, a chain's steps
  ``<chain id>.s<k>`` and its last step the chain id itself, a chord's callback the
  chord id.  So a canvas's id is the id of the task whose status is its outcome, and
  ``wait`` is ``wait_for_task`` on it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import msgspec

from .envelope import Envelope, decode_frame, encode_frame
from .errors import ConfigurationError, InvalidTaskOptionsError, StemError, TaskFailedError
from .results import TaskState, TaskStatus
from .task import TaskOptions

__all__ = ["Signature", "chain", "group", "chord", "chunks", "CanvasHandle", "GroupResults", "MemberFailure",
           "Progress", "ON_FAILURE", "apply", "Lineage", "next_step_id", "COMPLETION_GRACE"]

#: What ``chord(on_failure=...)`` takes.
ON_FAILURE = ("fail", "continue", "fail_fast")
#: How many member outcomes one backend read returns (``GroupResults``).
PAGE = 1000
#: The longest canvas id a caller may give (members and steps append ``.<n>`` to it).
MAX_ID = 120
#: Seconds a completion noted by ``store_record_and_ack`` waits for the worker that noted it
#: before any worker's sweep runs it (``Runner.sweep_completions``; ``Worker(completion_grace=)``).
COMPLETION_GRACE = 60.0

_GROUP_TASK = "stem.canvas.group"      # the name in a group record's signed description
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.decode


def _new_id() -> str:
    return uuid.uuid4().hex


def _options_dict(name: str, options: TaskOptions | None) -> dict[str, Any] | None:
    """``options`` as what an envelope can carry (the signature may travel in a chain)."""
    if options is None:
        return None
    if not isinstance(options, TaskOptions):
        raise InvalidTaskOptionsError(f"signature {name!r}: options must be a TaskOptions, got {options!r}")
    out = {f: getattr(options, f) for f in options.__struct_fields__ if getattr(options, f) is not None}
    if options.unique:
        raise InvalidTaskOptionsError(_not_unique(name))
    if callable(out.get("unique_key")) or "autoretry_for" in out or "retry_backoff" in out or "redact" in out:
        raise InvalidTaskOptionsError(
            f"signature {name!r}: options of a canvas step travel in messages; a callable unique_key, "
            "autoretry_for, retry_backoff and redact cannot (set them on the handler)")
    if isinstance(out.get("unique_key"), tuple):
        out["unique_key"] = list(out["unique_key"])
    return out


def _not_unique(name: str, where: str = "its options") -> str:
    return (f"signature {name!r}: a task of a canvas cannot be unique ({where} set unique=True): its id "
            "(member G.i, step C.sk, callback C) already makes every run of it one task, and a key shared "
            "with tasks outside the canvas would make it a duplicate whose result the canvas never gets, "
            "leaving its chord to wait.  For a canvas started once, give apply(..., canvas_id=...); to run "
            "a unique handler in a canvas, give the signature TaskOptions(unique=False)")


def _options_of(data: dict[str, Any] | None) -> TaskOptions | None:
    return None if data is None else TaskOptions(**data)


# -- the composition (what callers build) ------------------------------------------------------
class Signature:
    """One task of a canvas: a name, its args, its options; ``previous_as`` names the
    argument under which it receives its predecessor's result (besides ``ctx.previous``)."""

    __slots__ = ("name", "args", "options", "previous_as")

    def __init__(self, name: str, args: dict[str, Any] | None = None, options: TaskOptions | None = None, *,
                 previous_as: str | None = None):
        if not isinstance(name, str) or not name:
            raise InvalidTaskOptionsError(f"a signature's task name is a non-empty string, got {name!r}")
        if args is not None and (not isinstance(args, dict) or not all(isinstance(k, str) for k in args)):
            raise InvalidTaskOptionsError(f"signature {name!r}: args must be a dict with str keys, got {args!r}")
        if previous_as is not None and (not isinstance(previous_as, str) or not previous_as):
            raise InvalidTaskOptionsError(f"signature {name!r}: previous_as must be an argument name, "
                                          f"got {previous_as!r}")
        _options_dict(name, options)
        self.name, self.args, self.options, self.previous_as = name, dict(args or {}), options, previous_as

    def node(self) -> dict[str, Any]:
        return {"t": "s", "n": self.name, "a": self.args, "o": _options_dict(self.name, self.options),
                "p": self.previous_as}

    def __repr__(self) -> str:
        return f"Signature({self.name!r}, {self.args!r})"


def _node(part: Any, where: str) -> dict[str, Any]:
    if isinstance(part, (Signature, chain, group, chord, chunks)):
        return part.node()
    raise InvalidTaskOptionsError(f"{where} takes signatures (registry.signature(...), handle.s(...)), chains, "
                                  f"groups, chords or chunks; got {part!r}")


class chain:
    """Steps run one after the other, each started by the worker that finished the one
    before (the remaining steps travel in the step's signed envelope); each receives the
    result before it as ``ctx.previous``.  A failed step stops the chain: the chain ends
    FAILED, ``chain-step-failed``, its error naming the step."""

    def __init__(self, *steps: Any):
        if len(steps) == 1 and not isinstance(steps[0], (Signature, chain, group, chord, chunks)):
            steps = tuple(steps[0])
        if not steps:
            raise InvalidTaskOptionsError("a chain needs at least one step")
        self.steps = [_node(s, "chain") for s in steps]

    def node(self) -> dict[str, Any]:
        return {"t": "c", "s": self.steps}


class group:
    """Members run in parallel; the group ends when every member ended (whatever the
    state), SUCCEEDED if all succeeded, else FAILED ``dependency-failed``."""

    def __init__(self, *members: Any):
        if len(members) == 1 and not isinstance(members[0], (Signature, chain, group, chord, chunks)):
            members = tuple(members[0])
        self.members = [_node(m, "group") for m in members]

    def node(self) -> dict[str, Any]:
        return {"t": "g", "m": self.members, "f": "fail"}


class chord:
    """A group and a callback run once every member ended, with the members' results (in
    input order) as ``ctx.previous``.  ``on_failure``: ``"fail"`` (a failed member ends the
    chord FAILED ``dependency-failed`` at once, naming the failed members; the callback
    never runs), ``"continue"`` (the callback runs with a ``MemberFailure`` in place of
    each failed member's result) or ``"fail_fast"`` (as fail, and the members not run yet
    are revoked)."""

    def __init__(self, header: Any, body: Any, on_failure: str = "fail"):
        if on_failure not in ON_FAILURE:
            raise InvalidTaskOptionsError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        if not isinstance(header, (group, chunks)):
            header = group(header)
        self.header = header
        self.body = _node(body, "a chord's callback")
        if _ends_in_group(self.body):
            # the callback runs under the chord's id, which the chord's own group record holds
            raise InvalidTaskOptionsError(
                "a chord's callback cannot end in a group or chord (it runs under the chord's id, the "
                "id of the chord's own group): give it a signature, or a chain whose last step is one")
        self.on_failure = on_failure

    def node(self) -> dict[str, Any]:
        return {**self.header.node(), "b": self.body, "f": self.on_failure}


def _ends_in_group(node: dict) -> bool:
    if node["t"] == "g":
        return True
    return node["t"] == "c" and _ends_in_group(node["s"][-1])


class chunks:
    """``items`` split producer-side into tasks of ``size`` items each: task ``name`` is
    called with ``items=[...]`` (a list of up to ``size`` items), all published on the
    ``enqueue_many`` fast path; a group of those tasks."""

    def __init__(self, name: str, items: Iterable[Any], size: int, options: TaskOptions | None = None):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidTaskOptionsError(f"chunks size must be an integer >= 1, got {size!r}")
        items = list(items)
        self.sig = Signature(name, None, options)
        self.size = size
        self.parts = [items[i:i + size] for i in range(0, len(items), size)]

    def node(self) -> dict[str, Any]:
        base = self.sig.node()
        return {"t": "g", "m": [{**base, "a": {"items": part}} for part in self.parts], "f": "fail"}


# -- what a group's members deliver -----------------------------------------------------------
class MemberFailure(NamedTuple):
    """In a chord callback's results (``on_failure="continue"``), in place of a member that
    did not succeed."""

    id: str
    state: str
    reason: str | None
    error: str | None


def _outcome(status: TaskStatus, value: Any) -> bytes:
    if status.state is TaskState.SUCCEEDED:
        return b"\x92\x01" + _encode(value)     # [1, value]: a msgpack array of two, spliced
    return _encode([0, status.id, status.state.value, status.reason, status.error])


def outcome_value(raw: bytes | None) -> Any:
    """A member's result as a reader gets it from its stored outcome: its value, or a
    ``MemberFailure``; None for a member not ended."""
    if raw is None:
        return None
    item = _decode(raw)
    if item[0] == 1:
        return item[1]
    return MemberFailure(*item[1:5])


class GroupResults(Sequence):
    """A group's member results in input order, read from the result backend ``PAGE`` at a
    time as they are used (a chord of 100,000 members never travels in one message)."""

    def __init__(self, backend: Any, group_id: str, size: int | None = None):
        self.backend = backend
        self.group_id = group_id
        if size is None:
            record = backend.group_get(group_id)
            if record is None:
                raise StemError(f"group {group_id} is unknown or expired: its results are gone")
            size = record.expected
        self.size = size
        self._page: tuple[int, list[Any]] = (-1, [])

    def __len__(self) -> int:
        return self.size

    def _load(self, page: int) -> list[Any]:
        if self._page[0] != page:
            start = page * PAGE
            raws = self.backend.group_outcomes(self.group_id, start, min(start + PAGE, self.size))
            self._page = (page, [outcome_value(r) for r in raws])
        return self._page[1]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self._load(index // PAGE)[index % PAGE]

    def __iter__(self) -> Iterator[Any]:
        for page in range((self.size + PAGE - 1) // PAGE):
            yield from self._load(page)

    def __repr__(self) -> str:
        return f"<GroupResults {self.group_id} ({self.size})>"


# -- running (the producer's apply and the worker's continuations share it) ----------------------
class Lineage(NamedTuple):
    """The parent and root a launched task's envelope names (``Envelope.parent_id`` /
    ``root_id``; read as ``Stem._build``'s ``parent``): a chain step's parent is the step
    or group before it, every task's root the canvas's id."""

    id: str | None = None
    root_id: str | None = None


def next_step_id(canvas: dict[str, Any] | None) -> str | None:
    """The id of the chain step a task's success starts (steps are ``<chain>.s<k>``, the last
    the chain's own id), or None when the task is no chain step."""
    up = None if canvas is None else canvas.get("up")
    if not up or "c" not in up:
        return None
    return up["c"] if len(up["r"]) == 1 else f"{up['c']}.s{up['k']}"


class Runner:
    """Launches canvas nodes and carries them on when their tasks end.  ``stem`` is a
    producer (``Stem``) with a backend: the caller's in ``apply``, the worker's own when
    it continues a canvas."""

    def __init__(self, stem: Any, *, creation_timeout: float = 600.0, revoke_here: Any = None,
                 completion_grace: float = COMPLETION_GRACE):
        self.stem = stem
        self.backend = stem._require_backend()
        self.creation_timeout = creation_timeout
        # how old a noted completion is before the sweep runs it (``sweep_completions``)
        self.completion_grace = completion_grace
        self.acks_with_counts = True      # record_and_ack, until the backend says it cannot
        # a worker's own revoke: also skips what this worker already holds (fail_fast)
        self.revoke_here = revoke_here

    # -- launching ------------------------------------------------------------------------
    def launch(self, node: dict[str, Any], node_id: str, up: dict | None, prev: dict[str, Any], keyed: bool,
               line: Lineage = Lineage()) -> None:
        """Start ``node`` under ``node_id``; it reports to ``up``; ``prev`` is its place's
        predecessor fields (``pv`` / ``pg``), possibly empty; ``rl`` with ``pg``: this node is
        the reader of that group, which it releases (``group_release``) when it ends; ``line``
        the parent and root its tasks' envelopes name (for the dashboard's links)."""
        kind = node["t"]
        if kind == "s":
            self._signature(node, node_id, up, prev, keyed, line)
        elif kind == "c":
            steps = node["s"]
            if len(steps) == 1:
                self.launch(steps[0], node_id, up, prev, keyed, line)
            else:
                self.launch(steps[0], f"{node_id}.s0", {"c": node_id, "k": 1, "r": steps[1:], "u": up}, prev, keyed,
                            line)
        elif kind == "g":
            self._group(node, node_id, up, prev, line)
        else:
            raise ConfigurationError(f"unknown canvas node {kind!r}")

    def _signature(self, node: dict, node_id: str, up: dict | None, prev: dict, keyed: bool, line: Lineage) -> None:
        args = node["a"]
        if node.get("p"):
            value = prev.get("pv")
            if "pg" in prev:
                value = list(GroupResults(self.backend, prev["pg"]))
            args = {**args, node["p"]: value}
        canvas = {"up": up, **prev} if (up is not None or prev) else None
        self.stem._publish_node(node["n"], args, _options_of(node["o"]), node_id, canvas, keyed, line)

    def _group(self, node: dict, group_id: str, up: dict | None, prev: dict, line: Lineage) -> None:
        members = node["m"]
        # "rt": the canvas's root, for the tasks its completion starts (absent in older records)
        data = {"up": up, "b": node.get("b"), "f": node.get("f", "fail"), "n": len(members), "rt": line.root_id}
        if prev.get("rl"):
            # this group reads its predecessor group (each member gets its results): that one is
            # released when this one ends, not when its first member does
            data["rl"] = prev["pg"]
            prev = {"pg": prev["pg"]}
        signed = encode_frame(Envelope(group_id, _GROUP_TASK, data), self.stem.signer)
        # held: a reader comes after it ends (the callback, the next chain step), and its lifetime
        # starts when that reader ends (stem.backends.groups)
        held = data["b"] is not None or (up is not None and "c" in up)
        seal_by, ttl = time.time() + self.creation_timeout, self.backend.result_expires
        canvas = {"up": {"g": group_id}, **prev}
        ids = [f"{group_id}.{i}" for i in range(len(members))]
        batch = self._batch(members, ids, canvas, line)
        if batch is not None:
            # one task name and options: record and members in one transaction where the
            # store allows it (stem.backends.base, group_publish), never left unsealed
            queue, frames, priority, visibility_timeout = batch
            created = self.backend.group_publish(group_id, len(members), signed, seal_by=seal_by, ttl=ttl, held=held,
                                                 broker=self.stem.broker, queue=queue, task_ids=ids, frames=frames,
                                                 priority=priority, visibility_timeout=visibility_timeout)
            if created is not None:
                return  # False: launched before (a redelivered step), which published it all
        # else created unsealed, members published, then sealed: a producer that dies in
        # between leaves a record the workers' sweep ends FAILED creation-interrupted
        if not self.backend.group_create(group_id, len(members), signed, seal_by=seal_by, ttl=ttl, held=held):
            return      # launched before (a redelivered step): that launch publishes and seals
        if batch is not None:
            queue, frames, priority, visibility_timeout = batch
            self.stem.broker.publish_frames(queue, ids, frames, priority=priority,
                                            visibility_timeout=visibility_timeout)
        else:
            self._members(members, group_id, ids, canvas, prev, line)
        record = self.backend.group_seal(group_id)
        if record is not None and record.complete:
            self.completed(record)

    def _batch(self, members: list[dict], ids: list[str], canvas: dict, line: Lineage) -> tuple | None:
        """The members as one ``publish_frames`` batch (``Stem._member_frames``) when they are
        signatures of one task name and options, else None."""
        first = _uniform(members)
        if first is None:
            return None
        return self.stem._member_frames(first["n"], _options_of(first["o"]), ids, [m["a"] for m in members], canvas,
                                        line)

    def _members(self, members: list[dict], group_id: str, ids: list[str], canvas: dict, prev: dict,
                 line: Lineage) -> None:
        """The members that are not one ``publish_frames`` batch."""
        first = _uniform(members)
        if first is not None:      # each its own Message (publish signals, unique keys, limits)
            self.stem._publish_messages(first["n"], _options_of(first["o"]), ids, [m["a"] for m in members], canvas,
                                        line)
            return
        for i, m in enumerate(members):
            self.launch(m, ids[i], {"g": group_id}, prev, keyed=False, line=line)

    # -- carrying on ---------------------------------------------------------------------
    def finished(self, env: Any, status: TaskStatus) -> None:
        """Task ``env`` (of a canvas) reached terminal ``status``: report it where it belongs.
        Idempotent: a redelivered task reports again and changes nothing."""
        canvas = env.canvas or {}
        up = canvas.get("up")
        if up is not None:
            self.report(up, env.id, status, None, env.root_id)
        if canvas.get("rl"):
            self.backend.group_release(canvas["pg"], status.ttl)

    def finished_many(self, ended: list[tuple[Any, TaskStatus]], store: list[TaskStatus]) -> None:
        """``finished`` for a batch, which also stores ``store`` (their statuses to keep): the
        statuses and the group members' counts in one backend step (``store_and_record``),
        then the chain steps carried on."""
        members, chained, readers = [], [], []
        for env, status in ended:
            canvas = env.canvas or {}
            if canvas.get("rl"):
                readers.append((canvas["pg"], status.ttl))
            up = canvas.get("up")
            if up is None:
                continue
            if "g" in up:
                ok = status.state is TaskState.SUCCEEDED
                members.append((up["g"], env.id, int(env.id.rsplit(".", 1)[1]), ok, _outcome(status, status.result),
                                status.ttl))
            else:
                chained.append((up, env.id, status, env.root_id))
        records = self.backend.store_and_record(store, members, brief=True)
        for record, item in zip(records, members):
            if record is not None and record is not True:     # True: counted, nothing to do
                self.recorded(record, item[3])
        for up, task_id, status, root_id in chained:
            self.report(up, task_id, status, None, root_id)
        for group_id, ttl in readers:
            self.backend.group_release(group_id, ttl)

    def record_and_ack(self, ended: list[tuple[Any, TaskStatus]], store: list[TaskStatus], broker: Any,
                       deliveries: list[Any], queues: Sequence[str] = (), count: int = 0, consumer: str = ""
                       ) -> tuple[list[Any], list | None] | None:
        """``finished_many`` and the acks of ``deliveries`` (and a refill: ``queues``,
        ``count``) in one backend step (``store_record_and_ack``), when every task of the
        batch is a group member (a chain step or a reader keeps its work before its ack) and
        the backend can note the completions it acks before they ran.  Returns (the records
        this completed, to pass to ``complete``; the leased deliveries or None), or None:
        nothing done, the caller goes the ``finished_many`` way."""
        if not self.acks_with_counts:
            return None
        members = []
        for env, status in ended:
            canvas = env.canvas or {}
            up = canvas.get("up")
            if up is None or "g" not in up or canvas.get("rl"):
                return None
            members.append((up["g"], env.id, int(env.id.rsplit(".", 1)[1]), status.state is TaskState.SUCCEEDED,
                            _outcome(status, status.result), status.ttl))
        done = self.backend.store_record_and_ack(store, members, broker, deliveries, queues, count, consumer)
        if done is None:
            self.acks_with_counts = False    # not this backend (or broker): never asked again
            return None
        records, leased = done
        return [r for r in records if r is not None and r is not True and r.complete], leased

    def complete(self, records: list[Any]) -> None:
        """Run the completions ``record_and_ack`` noted (its member already acked), then
        drop their notes.  Idempotent: the sweep may run one again."""
        for record in records:
            self.recorded(record, True)
        if records:
            self.backend.group_completed([r.id for r in records])

    def sweep_completions(self, now: float | None = None) -> int:
        """Run the completions noted more than ``completion_grace`` ago and never marked
        done (their worker died after acking the last member, or is that slow); how many.
        Each is idempotent: the callback is a keyed publish (published once while its id
        key lingers), a group's status a store, its report to its own group a count by
        member id, a next chain step a keyed publish."""
        now = time.time() if now is None else now
        records = self.backend.group_completions_due(now - self.completion_grace)
        for record in records:
            self.completed(record)
            self.backend.group_completed([record.id])
        return len(records)

    def report(self, up: dict, member_id: str, status: TaskStatus, group_ref: str | None,
               root_id: str | None = None) -> None:
        """``member_id`` (a task, or a group: ``group_ref``) ended in ``status``: count it in
        its group, or carry its chain on (the next step's parent is ``member_id``, its root
        ``root_id``)."""
        ok = status.state is TaskState.SUCCEEDED
        if "g" in up:
            group_id = up["g"]
            index = int(member_id.rsplit(".", 1)[1])
            value = {"group": group_ref} if group_ref is not None else status.result
            record = self.backend.group_record(group_id, member_id, index, ok, _outcome(status, value), status.ttl)
            if record is not None:
                self.recorded(record, ok)
            return
        chain_id, k, rest = up["c"], up["k"], up["r"]
        if not ok:
            failed = TaskStatus(id=chain_id, state=TaskState.FAILED, reason="chain-step-failed",
                                error=f"step {k - 1} ({status.name or 'task'} {member_id}) ended {status.state.value}"
                                      f" ({status.reason}): {status.error}",
                                result={"step": k - 1, "task_id": member_id}, finished_at=time.time())
            self.backend.store(failed)
            if up["u"] is not None:
                self.report(up["u"], chain_id, failed, None, root_id)
            return
        prev = {"pg": group_ref, "rl": 1} if group_ref is not None else {"pv": status.result}
        step_id = next_step_id({"up": up})
        line = Lineage(member_id, root_id)
        if len(rest) == 1:
            self.launch(rest[0], step_id, up["u"], prev, keyed=True, line=line)
        else:
            self.launch(rest[0], step_id, {"c": chain_id, "k": k + 1, "r": rest[1:], "u": up["u"]}, prev,
                        keyed=True, line=line)

    def data(self, record: Any) -> dict[str, Any]:
        """A group's description, verified as any frame is (a worker with a signer accepts
        only what a holder of the key wrote)."""
        return decode_frame(record.data, self.stem.signer).args

    def recorded(self, record: Any, ok: bool) -> None:
        if ok and not record.complete:
            return
        data = self.data(record)
        policy = data["f"]
        if not ok and policy != "continue":
            self.fail(record, data)
            if policy == "fail_fast" and record.failed == 1:
                ids = [f"{record.id}.{i}" for i in range(record.expected)]
                self.stem.revoke(ids)
                if self.revoke_here is not None:
                    self.revoke_here(ids)
            return
        if record.complete:
            self.completed(record, data)

    def completed(self, record: Any, data: dict[str, Any] | None = None) -> None:
        data = self.data(record) if data is None else data
        if record.failed and data["f"] != "continue":
            self.fail(record, data)
            return
        if data.get("rl"):
            self.backend.group_release(data["rl"], record.ttl)
        if data.get("b") is not None:
            # the callback runs under the group's own id: its predecessor is ``pg``, not a parent
            self.launch(data["b"], record.id, data["up"], {"pg": record.id, "rl": 1}, keyed=True,
                        line=Lineage(None, data.get("rt")))
        else:
            # the group's own status lives as long as its record (its members' results)
            done = TaskStatus(id=record.id, state=TaskState.SUCCEEDED, result={"group": record.id,
                                                                               "size": record.expected},
                              finished_at=time.time(), ttl=record.ttl)
            self.backend.store(done)
            if data["up"] is not None:
                self.report(data["up"], record.id, done, record.id, data.get("rt"))

    def fail(self, record: Any, data: dict[str, Any], reason: str = "dependency-failed") -> None:
        """End the group (or chord) FAILED: its waiters wake, the callback never runs."""
        failed = self.backend.group_failed_members(record.id) if reason == "dependency-failed" else []
        more = record.failed - len(failed)
        error = (f"{record.failed} of {record.expected} members failed: {', '.join(failed)}"
                 f"{f' and {more} more' if more > 0 else ''}" if reason == "dependency-failed" else
                 f"the group was not sealed by its deadline (its producer stopped while publishing the members)")
        status = TaskStatus(id=record.id, state=TaskState.FAILED, reason=reason, error=error,
                            result={"failed": failed}, finished_at=time.time(), ttl=record.ttl)
        if record.held:
            self.backend.group_release(record.id, record.ttl)    # its reader will never come
        if data.get("rl") and (record.complete or record.interrupted):
            self.backend.group_release(data["rl"], record.ttl)   # every member that read it ended
        self.backend.store(status)
        if data["up"] is not None:
            self.report(data["up"], record.id, status, None, data.get("rt"))

    def sweep(self) -> int:
        """End the groups their producers left unsealed past the deadline; how many."""
        records = self.backend.group_interrupt_unsealed()
        for record in records:
            self.fail(record, self.data(record), "creation-interrupted")
        return len(records)


def _uniform(members: list[dict]) -> dict | None:
    """The first member when every member is a signature of one task name and options (none
    taking its predecessor as an argument), else None."""
    first = members[0] if members else None
    if first is not None and first["t"] == "s" and not first.get("p") and all(
            m["t"] == "s" and m["n"] == first["n"] and m["o"] == first["o"] and not m.get("p") for m in members):
        return first
    return None


# -- handles ---------------------------------------------------------------------------------
class Progress(NamedTuple):
    done: int
    total: int

    def __str__(self) -> str:
        return f"{self.done} of {self.total} done"


class CanvasHandle:
    """A started canvas.  ``id`` is the id of the task whose status is the canvas's outcome
    (a chord's callback, a chain's last step; a group's own status, stored when it ends),
    so any process can ``wait`` on it (``Stem.canvas_handle(id)``)."""

    def __init__(self, stem: Any, canvas_id: str, kind: str, steps: int | None = None):
        self.stem = stem
        self.id = canvas_id
        self.kind = kind            # "task", "chain", "group", "chord"
        self.steps = steps          # a chain's step count (None when unknown: a handle made by id)

    @classmethod
    def from_id(cls, stem: Any, canvas_id: str) -> "CanvasHandle":
        if not isinstance(canvas_id, str) or not canvas_id:
            raise InvalidTaskOptionsError(f"a canvas id is a non-empty string, got {canvas_id!r}")
        record = stem._require_backend().group_get(canvas_id)
        if record is not None:
            data = decode_frame(record.data, stem.signer).args
            return cls(stem, canvas_id, "chord" if data.get("b") is not None else "group")
        return cls(stem, canvas_id, "task")

    def status(self) -> TaskStatus:
        return self.stem.get_status(self.id)

    def wait(self, timeout: float = 30.0) -> TaskStatus:
        """The canvas's terminal status (``TaskTimeoutError`` after ``timeout`` seconds)."""
        return self.stem.wait_for_task(self.id, timeout)

    def get(self, timeout: float = 30.0) -> Any:
        """The outcome's result; ``TaskFailedError`` when the canvas failed."""
        status = self.wait(timeout)
        if status.state is not TaskState.SUCCEEDED:
            raise TaskFailedError(f"canvas {self.id} ended {status.state.value} ({status.reason}): {status.error}",
                                  status)
        return status.result

    def results(self, timeout: float | None = None) -> list[Any]:
        """The results in input order: a group's or chord's members' (a ``MemberFailure`` for
        a member that did not succeed), a chain's steps'.  With ``timeout``, waits for the
        canvas to end first."""
        if timeout is not None:
            self.wait(timeout)
        backend = self.stem._require_backend()
        if self.kind in ("group", "chord"):
            return list(GroupResults(backend, self.id))
        if self.kind == "chain" and self.steps:
            ids = [f"{self.id}.s{k}" for k in range(self.steps - 1)] + [self.id]
            return [None if s is None else s.result for s in backend.get_many(ids)]
        status = backend.get(self.id)
        return [None if status is None else status.result]

    def progress(self) -> Progress:
        """How many members (a group, a chord's header) or steps have ended."""
        backend = self.stem._require_backend()
        if self.kind in ("group", "chord"):
            record = backend.group_get(self.id)
            if record is None:
                return Progress(0, 0)
            return Progress(record.finished, record.expected)
        if self.kind == "chain" and self.steps:
            ids = [f"{self.id}.s{k}" for k in range(self.steps - 1)] + [self.id]
            return Progress(sum(1 for s in backend.get_many(ids) if s is not None and s.is_terminal), self.steps)
        status = backend.get(self.id)
        return Progress(int(status is not None and status.is_terminal), 1)

    def __repr__(self) -> str:
        return f"<CanvasHandle {self.kind} {self.id}>"


def apply(stem: Any, canvas: Any, *, creation_timeout: float = 600.0, canvas_id: str | None = None) -> CanvasHandle:
    """``Stem.apply``: check the whole canvas, then start it."""
    from . import _checks as checks
    creation_timeout = checks.seconds("creation_timeout", creation_timeout, error=InvalidTaskOptionsError)
    node = _node(canvas, "apply")
    explicit = canvas_id is not None
    if canvas_id is None:
        canvas_id = _new_id()
    elif not isinstance(canvas_id, str) or not 0 < len(canvas_id) <= MAX_ID:
        raise InvalidTaskOptionsError(f"canvas_id must be a non-empty string of at most {MAX_ID} chars")
    _check_names(stem, node)
    try:
        _encode(node)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise InvalidTaskOptionsError(f"a canvas's args must be msgpack values: {exc}") from None
    runner = Runner(stem, creation_timeout=creation_timeout)
    # a given id is an idempotency key: a first task published keyed, a group created once
    runner.launch(node, canvas_id, None, {}, keyed=explicit, line=Lineage(None, canvas_id))
    kind = {"s": "task", "c": "chain", "g": "chord" if node.get("b") is not None else "group"}[node["t"]]
    return CanvasHandle(stem, canvas_id, kind, len(node["s"]) if kind == "chain" else None)


def _check_names(stem: Any, node: dict, seen: set | None = None) -> None:
    """Every task name (known to the producer's registry, when it has one) and every
    option, before anything is published; each distinct (name, options) once."""
    seen = set() if seen is None else seen
    kind = node["t"]
    if kind == "s":
        options = node["o"]
        key = (node["n"], None if options is None else _encode(options))
        if key in seen:
            return
        seen.add(key)
        if stem.registry is not None:
            stem.registry.get(node["n"])
        if stem._template(node["n"], _options_of(options), time.time()).unique is not None:
            raise InvalidTaskOptionsError(_not_unique(node["n"], "its handler's options"))
    elif kind == "c":
        for step in node["s"]:
            _check_names(stem, step, seen)
    else:
        for m in node["m"]:
            _check_names(stem, m, seen)
        if node.get("b") is not None:
            _check_names(stem, node["b"], seen)
