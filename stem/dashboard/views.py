"""What each page shows, read from what stem already stores: no Starlette here.

Every function takes the broker and the result backend (and what else it needs)
and returns plain dicts for the templates and the JSON API.  Nothing is kept
between calls: heartbeats, queue counts, task statuses, dead letters and
schedule records all live in the broker and the backend, so a dashboard that
restarts shows exactly what it showed before.  Rates (tasks/s, the throughput
chart) are differences between two reads, worked out by the page in the
browser (``static/dashboard.js``) from the counters each read carries.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable, Iterable

from ..control import is_internal_queue
from ..envelope import decode_frame, read_header
from ..errors import ConfigurationError, DecodeError, StemError
from ..redact import MASK, redact_names, shown_args
from ..status import worker_rows

__all__ = ["Redactor", "RuleOf", "default_redact", "overview", "queue_rows", "task_view", "dead_letter_view",
           "schedule_rows", "check_task_id", "dumps", "DEAD_LETTER_PAGE"]

#: The most dead letters one page lists (the count above it says how many there are).
DEAD_LETTER_PAGE = 500
#: The most dead letters of its queue the task page reads to find a task's frame (oldest first).
_DLQ_SCAN = 10_000
#: A task id the task page accepts: what stem's ids and explicit ids are made of, bounded.
_TASK_ID = re.compile(r"[\x21-\x7e]{1,200}")
REDACTED = MASK

#: ``redact(task_name, args) -> args``: what the task page shows of a task's arguments and meta,
#: applied over what the worker kept (``TaskStatus.args``, already redacted as the task's
#: ``TaskOptions(redact=...)`` says).
Redactor = Callable[[str, Any], Any]
#: ``rule_of(task_name)``: the task's ``TaskOptions.redact`` (from the app's registry), for
#: arguments the page reads from a dead letter's frame instead of a status.
RuleOf = Callable[[str], Any]
#: Members of a group the task page links to (the count says how many there are).
GROUP_MEMBERS_SHOWN = 50


def default_redact(task_name: str, args: Any) -> Any:
    """Hide the value of every key (at any depth) whose name looks like a secret
    (password, token, secret, api_key, authorization, ...: ``stem.redact.is_secret_name``).
    Pass your own ``redact`` to ``stem.dashboard.app`` for anything else, or give the task
    ``TaskOptions(redact=...)``, which the worker applies before it stores anything."""
    return redact_names(args)


def dumps(value: Any) -> str:
    """Task data as indented JSON text for a ``<pre>`` (escaped by the template, never trusted)."""
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=repr, sort_keys=False)
    except (TypeError, ValueError):
        return repr(value)


def check_task_id(task_id: Any) -> str:
    if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
        raise ConfigurationError(f"bad task id {task_id!r}: 1-200 printable characters without spaces")
    return task_id


# -- overview -----------------------------------------------------------------------------------
def queue_rows(broker: Any) -> list[dict[str, Any]]:
    """One row per user queue (the control plane's ``stem.*`` queues left out), by name.
    ``throttled`` is there when the broker's ``QueueStats`` has it (rate limits), else None."""
    rows = []
    for name in sorted(q for q in broker.queues() if not is_internal_queue(q)):
        s = broker.stats(name)
        rows.append({"queue": name, "ready": s.ready, "in_flight": s.in_flight, "delayed": s.delayed,
                     "dead": s.dead, "throttled": getattr(s, "throttled", None)})
    return rows


def overview(broker: Any, backend: Any, *, now: float | None = None) -> dict[str, Any]:
    """Workers (and schedulers) from their heartbeats, queues from the broker's counts, and
    the totals the throughput chart differentiates.  ``seen_at`` is when each heartbeat was
    written: the page computes a worker's tasks/s between two heartbeats, not two reads."""
    now = time.time() if now is None else now
    rows = worker_rows(backend, now=now) if backend is not None else []
    for r in rows:
        age = r["last_heartbeat_age"]
        r["seen_at"] = None if age is None else now - age
    workers = [r for r in rows if r["kind"] != "scheduler"]
    queues = queue_rows(broker)
    return {
        "generated_at": now,
        "workers": workers,
        "schedulers": [r for r in rows if r["kind"] == "scheduler"],
        "queues": queues,
        "has_throttled": any(q["throttled"] is not None for q in queues),
        "totals": {
            "workers": len(workers), "lost": sum(1 for w in workers if w["lost"]),
            "succeeded": sum(int(w["succeeded"] or 0) for w in workers),
            "failed": sum(int(w["failed"] or 0) for w in workers),
            **{k: sum(q[k] for q in queues) for k in ("ready", "in_flight", "delayed", "dead")},
        },
    }


# -- one task -----------------------------------------------------------------------------------
def _peek(frame: bytes) -> dict[str, Any] | None:
    """What a stored frame holds, decoded without verifying it (a dead letter may be there
    because its signature failed; nothing here runs it)."""
    try:
        read_header(frame)
        env = decode_frame(frame)
    except DecodeError:
        return None
    return {"name": env.name, "args": env.args, "meta": env.meta, "attempt": env.attempt,
            "max_retries": env.max_retries, "enqueued_at": env.enqueued_at or None, "parent_id": env.parent_id,
            "root_id": env.root_id, "queue": env.queue, "size": len(frame)}


def _find_dead_letter(broker: Any, queue: str, task_id: str) -> Any:
    try:
        dead = broker.stats(queue).dead
        if not dead:
            return None
        return next((dl for dl in broker.dead_letters(queue, min(dead, _DLQ_SCAN)) if dl.task_id == task_id), None)
    except StemError:
        return None


def _group(backend: Any, task_id: str) -> dict[str, Any] | None:
    """The group (or chord) record under ``task_id``: a chord's callback and a group's own
    status share their id with it.  Its members are ``<id>.<index>`` (``stem.canvas``)."""
    try:
        record = backend.group_get(task_id)
    except StemError:      # a backend without group records, or an id no group may have
        return None
    if record is None:
        return None
    try:
        chord = decode_frame(record.data).args.get("b") is not None
    except (DecodeError, AttributeError):
        chord = None
    shown = min(record.expected, GROUP_MEMBERS_SHOWN)
    return {"kind": "chord" if chord else "group" if chord is not None else "group or chord",
            "expected": record.expected, "finished": record.finished, "succeeded": record.succeeded,
            "failed": record.failed, "sealed": record.sealed, "interrupted": record.interrupted,
            "members": [f"{task_id}.{i}" for i in range(shown)], "more": record.expected - shown}


def _args_note(status: Any, frame: dict[str, Any] | None) -> str:
    """Why the page shows no arguments."""
    if status is not None and status.enqueued_at is not None:
        return "not kept: the task's redact hook hides them"
    if status is not None:
        return ("not kept in this status (stored for a group or chain, or by a stem that did not keep "
                "arguments); shown while the task's frame is in the dead-letter queue")
    return "no status yet"


def task_view(broker: Any, backend: Any, task_id: str, redact: Redactor,
              rule_of: RuleOf | None = None) -> dict[str, Any] | None:
    """The task page: its status in the backend (arguments as the worker kept them, enqueue
    time, parent, root, children, group) and, when its frame is still in the broker's
    dead-letter queue, what the frame says (arguments, redacted by ``rule_of(name)``, for a
    status that has none).  None when the backend has no status and no dead letter holds it."""
    check_task_id(task_id)
    status = backend.get(task_id) if backend is not None else None
    frame = None
    dead = None
    # only a task that ended FAILED or DEAD has a copy in the dead-letter queue: the others
    # do not cost a read of it (up to _DLQ_SCAN entries)
    queues = [status.queue] if status is not None and status.queue and status.state.name in ("FAILED", "DEAD") \
        else []
    for q in queues:
        dead = _find_dead_letter(broker, q, task_id)
        if dead is not None:
            frame = _peek(dead.frame)
            break
    group = _group(backend, task_id) if backend is not None else None
    if status is None and frame is None and group is None:
        return None
    f = frame or {}
    s: Any = status
    name = s.name if s is not None and s.name else f.get("name") or ""
    meta = dict(s.meta) if s is not None else dict(f.get("meta") or {})
    enqueued_at = (s.enqueued_at if s is not None else None) or f.get("enqueued_at")
    started_at = s.started_at if s is not None else None
    finished_at = s.finished_at if s is not None else None
    if s is not None and s.args is not None:
        args: Any = s.args
    elif frame is not None:
        args = shown_args(f["args"], None if rule_of is None else rule_of(name), size_hint=f["size"])
    else:
        args = None
    view: dict[str, Any] = {
        "id": task_id,
        "state": s.state.name if s is not None else "DEAD" if frame is not None else "PENDING",
        "name": name,
        "queue": (s.queue if s is not None else "") or f.get("queue") or "",
        "attempt": s.attempt if s is not None else f.get("attempt", 0),
        "max_retries": f.get("max_retries"),
        "enqueued_at": enqueued_at,
        "started_at": started_at,
        "finished_at": finished_at,
        "updated_at": s.updated_at if s is not None else None,
        "wait_s": started_at - enqueued_at if started_at and enqueued_at else None,
        "run_s": finished_at - started_at if finished_at and started_at else None,
        "worker": s.worker if s is not None else None,
        "progress": s.progress if s is not None else None,
        "reason": (s.reason if s is not None else None) or (dead.reason if dead is not None else None),
        "error": s.error if s is not None else None,
        "error_type": s.error_type if s is not None else None,
        "traceback": s.traceback if s is not None else None,
        "has_result": s is not None and s.state.name == "SUCCEEDED",
        "result": dumps(s.result) if s is not None else None,
        "meta": dumps(redact(name, meta)) if meta else None,
        "args": None if args is None else dumps(redact(name, args)),
        "args_note": None if args is not None else _args_note(s, frame),
        "parent_id": (s.parent_id if s is not None else None) or f.get("parent_id"),
        "root_id": (s.root_id if s is not None else None) or f.get("root_id"),
        "children": list((s.children if s is not None else None) or ()),
        "group_id": s.group_id if s is not None else None,
        "group": group,
        "dead_letter": None if dead is None else {"id": dead.id, "queue": dead.queue, "reason": dead.reason,
                                                  "failed_at": dead.failed_at},
    }
    if view["root_id"] == task_id:
        view["root_id"] = None
    return view


# -- dead letters -------------------------------------------------------------------------------
def dead_letter_view(broker: Any, queue: str, *, reason: str = "", search: str = "",
                     limit: int = DEAD_LETTER_PAGE) -> dict[str, Any]:
    """A queue's dead letters, oldest first, with the task name each frame holds, filtered
    by ``reason`` (exact) and ``search`` (a substring of the task id or name)."""
    total = broker.stats(queue).dead
    entries = broker.dead_letters(queue, limit) if total else []
    rows, reasons = [], set()
    for dl in entries:
        reasons.add(dl.reason)
        peek = _peek(dl.frame)
        name = peek["name"] if peek is not None else None
        if reason and dl.reason != reason:
            continue
        if search and search not in dl.task_id and search not in (name or ""):
            continue
        rows.append({"id": str(dl.id), "task_id": dl.task_id, "name": name, "reason": dl.reason,
                     "failed_at": dl.failed_at, "attempt": None if peek is None else peek["attempt"]})
    return {"queue": queue, "total": total, "listed": len(entries), "rows": rows, "reasons": sorted(reasons),
            "reason": reason, "search": search}


# -- schedules ----------------------------------------------------------------------------------
_FAR = 253_402_300_799.0   # 9999-12-31: "no end" for fire_times


def schedule_rows(backend: Any, code_schedules: Iterable[Any] = (), *, now: float | None = None,
                  upcoming: int = 3) -> list[dict[str, Any]]:
    """Every schedule, from the code (``registry.schedules``) and the backend's records: its
    task, spec, next ``upcoming`` fire times, last run and whether it is paused."""
    from ..scheduler import decode_definition
    now = time.time() if now is None else now
    records = backend.schedule_records()
    code = {s.id: s for s in code_schedules}
    rows = []
    for sid in sorted(set(code) | set(records)):
        record = records.get(sid)
        s, error = code.get(sid), None
        if s is None and record is not None and record.definition is not None:
            try:
                s = decode_definition(record.definition)
            except StemError as exc:
                error = str(exc)
        nexts: list[float] = []
        if s is not None:
            for t in s.fire_times(now, _FAR):
                nexts.append(t)
                if len(nexts) >= upcoming:
                    break
        rows.append({"id": sid, "source": "code" if sid in code else "stored" if s is not None else
                     "unreadable" if error else "state only",
                     "task": None if s is None else s.task, "queue": None if s is None else s.queue,
                     "spec": None if s is None else _spec_text(s.spec.to_dict()),
                     "next": nexts, "last_fired": None if record is None else record.last_fired,
                     "last_run_id": None if record is None else record.last_run_id,
                     "paused": bool(record is not None and record.paused), "error": error})
    return rows


def _spec_text(d: dict[str, Any]) -> str:
    if d.get("kind") == "every":
        return f"every {d['seconds']:g} s"
    if d.get("kind") == "cron":
        return f"cron {d['expr']} ({d['tz']})"
    return "once"
