"""``stem beat`` (run a scheduler) and ``stem schedule list|add|remove|pause|resume|run-now|dry-run``.

Schedules come from two places: the code (``registry.schedule(...)``, seen here
with ``-A``) and the backend (``stem schedule add`` stores a definition there,
which every running scheduler picks up at its next pass).  Each schedule's state
(paused, last fired) is a backend record either way.  A bad schedule, an unknown
id or a conflict is a usage error (exit 2) and stores nothing.
"""

from __future__ import annotations

import datetime
import math
import time
from typing import Any

import click

from ._common import EXIT_USAGE, Env, connection_options, fail, load_app
from ._output import Col, emit, print_table
from ._params import AppPath, JsonObject, NonEmpty, QueueName, Seconds, When

__all__ = ["beat", "schedule"]


def _app_options(fn):
    fn = click.option("--path", "paths", multiple=True, type=click.Path(exists=True, file_okay=False),
                      metavar="DIR", help="also import -A from DIR (repeatable)")(fn)
    fn = click.option("-A", "--app", "registry_path", type=AppPath(), default=None, metavar="MODULE:REGISTRY",
                      help="the TaskRegistry whose schedules (declared in code) to include")(fn)
    return fn


def _schedule_id(value: str) -> str:
    from ..schedules import SCHEDULE_ID
    if not SCHEDULE_ID.fullmatch(value):
        raise click.BadParameter(f"bad schedule id {value!r}: use 1-128 characters from A-Z a-z 0-9 _ . : -")
    return value


_ID = click.argument("schedule_id", metavar="ID", callback=lambda ctx, param, value: _schedule_id(value))


# -- stem beat ----------------------------------------------------------------------------------
@click.command()
@click.option("-A", "--app", "registry_path", type=AppPath(), required=True, metavar="MODULE:REGISTRY",
              help="the TaskRegistry whose schedules to fire (stored schedules are fired too)")
@click.option("--path", "paths", multiple=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="also import -A from DIR (repeatable)")
@connection_options
@click.option("--tick", type=Seconds(0.01), default=1.0, show_default=True,
              help="the longest sleep between passes (a pass also runs at each fire time)")
@click.option("--grace", type=Seconds(0, open_min=True), default=None,
              help="seconds late a run may be and still count as on time (default: two ticks); older "
                   "runs are misfires, fired or skipped by the schedule's catch_up")
@click.option("--heartbeat-interval", type=Seconds(0.1), default=5.0, show_default=True,
              help="seconds between heartbeats (`stem worker status` lists schedulers)")
@click.option("-n", "--name", type=NonEmpty(), default=None, metavar="ID",
              help="this scheduler's id in `stem worker status` (default: HOST:PID:beat:RANDOM)")
@click.option("--loglevel", "-l", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
def beat(registry_path, paths, broker_url, backend_url, tick, grace, heartbeat_interval, name, loglevel,
         log_format):
    """Run a scheduler: stem beat -A myapp.tasks:registry.

    Run as many as you like (for availability): each run of each schedule is published
    once however many schedulers fire it.  SIGTERM or Ctrl-C stops it after the pass
    under way."""
    from .. import logs
    from ..scheduler import Scheduler
    with Env(broker_url, backend_url) as env:
        registry = load_app(registry_path, paths)
        backend = env.require_backend("stem beat (it keeps each schedule's record in the backend)")
        logs.configure(loglevel.upper(), log_format)
        env.broker.ping()
        backend.ping()
        Scheduler(env.producer(registry), registry.schedules, tick=tick, grace=grace,
                  heartbeat_interval=heartbeat_interval, scheduler_id=name).run()


# -- stem schedule ... ----------------------------------------------------------------------------
@click.group()
def schedule() -> None:
    """Periodic tasks: list them, add or remove stored ones, pause, resume, run one now,
    preview fire times.  Code schedules (registry.schedule) are seen with -A."""


class _Known:
    """The schedules of one command: code (``-A``) and stored, with their records."""

    def __init__(self, env: Env, registry_path: str | None, paths: tuple[str, ...]):
        from ..scheduler import decode_definition
        self.registry = load_app(registry_path, paths) if registry_path else None
        self.backend = env.require_backend("stem schedule (schedules live in the backend)")
        self.records = self.backend.schedule_records()
        self.code = {s.id: s for s in self.registry.schedules} if self.registry is not None else {}
        self.stored: dict[str, Any] = {}
        self.unreadable: dict[str, str] = {}
        from ..errors import StemError
        for sid, record in self.records.items():
            if record.definition is not None:
                try:
                    self.stored[sid] = decode_definition(record.definition)
                except StemError as exc:
                    self.unreadable[sid] = str(exc)

    def get(self, sid: str):
        """The schedule ``sid`` (code first), or exit 2 naming what is known."""
        found = self.code.get(sid) or self.stored.get(sid)
        if found is None:
            self.unknown(sid)
        return found

    def unknown(self, sid: str):
        known = sorted(set(self.code) | set(self.stored))
        hint = "" if self.registry is not None else " (a schedule declared in code needs -A MODULE:REGISTRY)"
        fail(f"no schedule {sid!r}{hint}; known: {', '.join(known) or 'none'}", EXIT_USAGE)


def _zone_of(s) -> str:
    return getattr(s.spec, "tz", "UTC")


def _in_zone(epoch: float | None, tz: str) -> str | None:
    if epoch is None:
        return None
    from zoneinfo import ZoneInfo
    zone = datetime.timezone.utc if tz == "UTC" else ZoneInfo(tz)
    return datetime.datetime.fromtimestamp(epoch, zone).isoformat(timespec="seconds")


def _cell(epoch: float | None, tz: str) -> str | None:
    """A time in a table: the zone's wall clock, its offset apart (the cell wraps there)."""
    iso = _in_zone(epoch, tz)
    return None if iso is None else f"{iso[:10]} {iso[11:19]} {iso[19:]}"


def _spec_text(s) -> str:
    d = s.spec.to_dict()
    if d["kind"] == "every":
        return f"every {d['seconds']:g}s"
    if d["kind"] == "cron":
        return f"cron {d['expr']} ({d['tz']})"
    return f"at {_in_zone(d['when'], 'UTC')}"


def _next_fire(s, now: float) -> float | None:
    return next(iter(s.fire_times(now, 253_402_300_799.0)), None)


@schedule.command("list")
@_app_options
@connection_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def list_(registry_path, paths, broker_url, backend_url, as_json):
    """Every schedule: where it is declared, its next fire time, when it last fired, paused or not."""
    now = time.time()
    with Env(broker_url, backend_url) as env:
        known = _Known(env, registry_path, paths)
        rows = []
        for sid in sorted(set(known.code) | set(known.records)):
            s = known.code.get(sid) or known.stored.get(sid)
            record = known.records.get(sid)
            source = "code" if sid in known.code else "stored" if s is not None else (
                "unreadable" if sid in known.unreadable else "state only")
            rows.append({"id": sid, "source": source, "task": None if s is None else s.task,
                         "spec": None if s is None else s.spec.to_dict(), "queue": None if s is None else s.queue,
                         "catch_up": None if s is None else s.catch_up, "overlap": None if s is None else s.overlap,
                         "next_fire_at": None if s is None else _next_fire(s, now),
                         "last_fired": None if record is None else record.last_fired,
                         "last_run_id": None if record is None else record.last_run_id,
                         "paused": bool(record is not None and record.paused),
                         **({"error": known.unreadable[sid]} if sid in known.unreadable else {})})

    def render(data):
        cols = [Col("schedule", key=True), Col("task"), Col("when"), Col("next run"), Col("last run", drop=2),
                Col("paused"), Col("source", drop=1)]
        cells = []
        for r in data:
            s = known.code.get(r["id"]) or known.stored.get(r["id"])
            tz = "UTC" if s is None else _zone_of(s)
            cells.append([r["id"], r["task"], "-" if s is None else _spec_text(s), _cell(r["next_fire_at"], tz),
                          _cell(r["last_fired"], tz), r["paused"], r["source"]])
        hint = "" if registry_path else " (schedules declared in code are listed with -A MODULE:REGISTRY)"
        print_table(cols, cells, empty=f"no schedules{hint}")
    emit(rows, as_json, render)


@schedule.command()
@_ID
@click.option("--task", "task", required=True, type=NonEmpty(), metavar="NAME", help="the task each run enqueues")
@click.option("--cron", "cron_expr", default=None, metavar="EXPR", help="a five-field cron expression, e.g. '30 2 * * *'")
@click.option("--tz", default=None, metavar="ZONE", help="with --cron: its IANA zone, e.g. Europe/Berlin (default UTC)")
@click.option("--every", "every_s", type=Seconds(1), default=None, metavar="SECONDS",
              help="every SECONDS (>= 1), on a grid from --anchor (default: the epoch)")
@click.option("--anchor", type=When(), default=None, metavar="WHEN", help="with --every: the first run")
@click.option("--at", "at_when", default=None, metavar="WHEN",
              help="once, at WHEN: ISO 8601 with an offset (2026-03-29T02:30:00+01:00) or epoch seconds")
@click.option("--args", "args", type=JsonObject(), default="{}", show_default=True, metavar="JSON",
              help="the task's arguments: a JSON object, @FILE or -")
@click.option("--queue", "-q", type=QueueName(), default=None, help="queue (default: the task's own)")
@click.option("--jitter", type=Seconds(0), default=0.0, show_default=True,
              help="delay each run by up to this many seconds (the same delay in every scheduler)")
@click.option("--catch-up", type=click.Choice(["none", "latest", "all"]), default="latest", show_default=True,
              help="runs missed while no scheduler ran: skip them, fire the newest, or fire them all")
@click.option("--max-catch-up", type=click.IntRange(1), default=100, show_default=True,
              help="with --catch-up all: the most missed runs fired (the newest)")
@click.option("--overlap", type=click.Choice(["allow", "skip", "queue_one"]), default="allow", show_default=True,
              help="while the previous run is queued or running: fire anyway, skip, or skip only while it "
                   "has not started")
@click.option("--start-at", type=When(), default=None, metavar="WHEN", help="no run before WHEN")
@click.option("--end-at", type=When(), default=None, metavar="WHEN", help="no run after WHEN")
@click.option("--replace", is_flag=True, help="replace a stored schedule of this id (its state is kept)")
@_app_options
@connection_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def add(schedule_id, task, cron_expr, tz, every_s, anchor, at_when, args, queue, jitter, catch_up, max_catch_up,
        overlap, start_at, end_at, replace, registry_path, paths, broker_url, backend_url, as_json):
    """Store schedule ID: every running scheduler fires it from its next pass on.

    stem schedule add nightly --task report.build --cron '30 2 * * *' --tz Europe/Berlin"""
    from ..scheduler import encode_definition
    from ..schedules import Schedule, at, cron, every
    given = [flag for flag, value in (("--cron", cron_expr), ("--every", every_s), ("--at", at_when))
             if value is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --cron, --every, --at" +
                               (f" (got {', '.join(given)})" if given else ""))
    if tz is not None and cron_expr is None:
        raise click.UsageError("--tz goes with --cron (--every and --at are instants, not wall-clock times)")
    if anchor is not None and every_s is None:
        raise click.UsageError("--anchor goes with --every")
    if cron_expr is not None:
        spec = cron(cron_expr, tz or "UTC")
    elif every_s is not None:
        spec = every(every_s, anchor=anchor)
    else:
        spec = at(_epoch_or_iso(at_when))
    s = Schedule(schedule_id, task=task, spec=spec, args=args, queue=queue, jitter=jitter, start_at=start_at,
                 end_at=end_at, catch_up=catch_up, max_catch_up=max_catch_up, overlap=overlap)
    definition = encode_definition(s)
    with Env(broker_url, backend_url) as env:
        known = _Known(env, registry_path, paths)
        if known.registry is not None:
            known.registry.get(task)   # UnknownTaskError (exit 2), with the names it knows
            if schedule_id in known.code:
                fail(f"schedule {schedule_id!r} is declared in code ({registry_path}); a stored one of that id "
                     "would be ignored: pick another id", EXIT_USAGE)
        record = known.records.get(schedule_id)
        if record is not None and record.definition is not None and not replace:
            fail(f"schedule {schedule_id!r} is already stored: stem schedule remove {schedule_id} first, or add "
                 "--replace", EXIT_USAGE)
        known.backend.put_schedule(schedule_id, definition)
    nxt = _next_fire(s, time.time())
    emit({"id": schedule_id, "stored": True, "replaced": record is not None and record.definition is not None,
          "next_fire_at": nxt}, as_json,
         lambda d: click.echo(f"stored schedule {schedule_id}: next run " +
                              (_in_zone(nxt, _zone_of(s)) if nxt is not None else "never (no fire time ahead)")))


def _epoch_or_iso(value: str) -> float | str:
    try:
        number = float(value)
    except ValueError:
        return value
    if not math.isfinite(number):
        raise click.BadParameter(f"{value!r} is not a finite epoch time", param_hint="--at")
    return number


@schedule.command()
@_ID
@connection_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def remove(schedule_id, broker_url, backend_url, as_json):
    """Delete the stored schedule ID and its state (a schedule in code keeps firing, its state reset)."""
    with Env(broker_url, backend_url) as env:
        backend = env.require_backend("stem schedule remove")
        if not backend.remove_schedule(schedule_id):
            fail(f"no schedule {schedule_id!r} is stored (stem schedule list shows them)", EXIT_USAGE)
    emit({"id": schedule_id, "removed": True}, as_json, lambda d: click.echo(f"removed schedule {schedule_id}"))


def _set_paused(schedule_id, paused, registry_path, paths, broker_url, backend_url, as_json):
    with Env(broker_url, backend_url) as env:
        known = _Known(env, registry_path, paths)
        if schedule_id not in known.code and schedule_id not in known.records:
            known.unknown(schedule_id)
        changed = known.backend.pause_schedule(schedule_id, paused)
    word = "paused" if paused else "resumed"
    emit({"id": schedule_id, "paused": paused, "changed": changed}, as_json,
         lambda d: click.echo(f"{word} schedule {schedule_id}" if changed else
                              f"schedule {schedule_id} was already {'paused' if paused else 'running'}"))


@schedule.command()
@_ID
@_app_options
@connection_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def pause(schedule_id, registry_path, paths, broker_url, backend_url, as_json):
    """Stop firing ID: its runs are skipped (not caught up on resume) until it is resumed."""
    _set_paused(schedule_id, True, registry_path, paths, broker_url, backend_url, as_json)


@schedule.command()
@_ID
@_app_options
@connection_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def resume(schedule_id, registry_path, paths, broker_url, backend_url, as_json):
    """Fire ID again, from its next fire time on."""
    _set_paused(schedule_id, False, registry_path, paths, broker_url, backend_url, as_json)


@schedule.command("run-now")
@_ID
@_app_options
@connection_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def run_now(schedule_id, registry_path, paths, broker_url, backend_url, as_json):
    """Enqueue one extra run of ID now, under its own run id (the schedule's runs are unchanged)."""
    from ..ids import new_task_id
    with Env(broker_url, backend_url) as env:
        known = _Known(env, registry_path, paths)
        s = known.get(schedule_id)
        now = time.time()
        run_id = f"sched:{schedule_id}:now:{new_task_id()}"
        task_id = env.producer(known.registry).enqueue(
            s.task, s.args, options=s.task_options, task_id=run_id,
            meta={"schedule": schedule_id, "fire_time": now, "run_now": True})
    emit({"id": task_id, "schedule": schedule_id}, as_json, lambda d: click.echo(task_id))


@schedule.command("dry-run")
@_ID
@click.option("--until", "until", type=When(), required=True, metavar="WHEN",
              help="list fire times up to WHEN: ISO 8601 (local time unless it names a zone) or epoch seconds")
@click.option("--from", "start", type=When(), default=None, metavar="WHEN", help="list from WHEN (default: now)")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="list at most this many")
@_app_options
@connection_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def dry_run(schedule_id, until, start, limit, registry_path, paths, broker_url, backend_url, as_json):
    """Print the fire times of ID up to --until, in the schedule's zone (DST changes show in the offsets)."""
    after = time.time() if start is None else start
    if until <= after:
        raise click.BadParameter(f"must be after {'--from' if start is not None else 'now'}", param_hint="--until")
    with Env(broker_url, backend_url) as env:
        s = _Known(env, registry_path, paths).get(schedule_id)
    tz = _zone_of(s)
    times = []
    more = False
    for t in s.fire_times(after, until):
        if len(times) == limit:
            more = True
            break
        times.append(t)
    data = {"id": schedule_id, "tz": tz, "fire_times": [{"at": t, "local": _in_zone(t, tz)} for t in times],
            "truncated": more}

    def render(d):
        for row in d["fire_times"]:
            click.echo(row["local"])
        if not d["fire_times"]:
            click.echo(f"no fire time of {schedule_id} up to {_in_zone(until, tz)}")
        if more:
            click.echo(f"... more after these {limit} (--limit)")
    emit(data, as_json, render)
