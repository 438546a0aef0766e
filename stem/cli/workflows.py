"""``stem wf list|show|send|cancel|reset|retry``: durable workflow runs (stem.workflows)."""

from __future__ import annotations

from typing import Any

import click

from ._common import Env, connection_options, fail
from ._output import Col, ago, dumps, emit, local_time, print_table, text
from ._params import NonEmpty, QueueName, loads_json

__all__ = ["wf"]

_STATUSES = ("PENDING", "RUNNING", "PARKED", "NEEDS_ATTENTION", "SUCCEEDED", "FAILED", "CANCELLED")


def _queue_option(fn):
    return click.option("--queue", "-q", type=QueueName(), default=None,
                        help="the queue of the workflows' activations (Workflows(queue=...); default: "
                             "$STEM_DEFAULT_QUEUE, else default); a wrong one only delays the run to the "
                             "next sweep")(fn)


def _store(env: Env):
    from ..workflows.store import open_store
    return open_store(env.require_backend("stem wf"))


def _queue(env: Env, queue: str | None) -> str:
    return queue or env.config.default_queue


def _run_action(*options):
    """The parameters of a command that changes a run and wakes it: RUN, ``options``, --queue,
    --json and the connection options."""
    def decorate(fn):
        for option in reversed((click.argument("run_id"), *options, _queue_option,
                                click.option("--json", "as_json", is_flag=True), connection_options)):
            fn = option(fn)
        return fn
    return decorate


def _act(broker_url: str | None, backend_url: str | None, queue: str | None, op, *args: Any, **kwargs: Any) -> Any:
    """``op(producer, store, *args, queue=..., **kwargs)`` (``stem.workflows.admin``'s shape) on
    the producer and workflow store of the connection options."""
    with Env(broker_url, backend_url) as env:
        return op(env.producer(), _store(env), *args, queue=_queue(env, queue), **kwargs)


@click.group()
def wf() -> None:
    """Durable workflow runs: list, show, send events, cancel, reset, retry.

    A run's status is also a task status under its run id: `stem result RUN` reads it.
    """


@wf.command("list")
@click.option("--status", type=click.Choice(_STATUSES, case_sensitive=False), default=None, help="only runs in it")
@click.option("--name", "workflow", default=None, help="only runs of this workflow")
@click.option("--limit", "-n", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--after", default=None, metavar="RUN", help="runs with an id after RUN (the next page)")
@click.option("--json", "as_json", is_flag=True)
@connection_options
def wf_list(status, workflow, limit, after, as_json, broker_url, backend_url):
    """Runs ordered by id: status, workflow, version, journal position, when it was touched."""
    with Env(broker_url, backend_url) as env:
        runs = _store(env).runs(status=status.upper() if status else None, name=workflow, limit=limit, after=after)
    rows = [{"id": r.id, "workflow": r.name, "version": r.version, "status": r.status, "generation": r.generation,
             "wake_at": r.wake_at, "waits_for": r.waits_for, "parent": r.parent, "updated_at": r.updated_at,
             "attention": r.attention} for r in runs]
    cols = [Col("run", key=True), Col("workflow"), Col("status"), Col("version", drop=3), Col("waiting", drop=2),
            Col("updated", drop=1)]

    def waiting(r: dict[str, Any]) -> str:
        if r["status"] == "NEEDS_ATTENTION":
            return (r["attention"] or "")[:60]
        if r["waits_for"]:
            return r["waits_for"]
        return f"until {local_time(r['wake_at'])}" if r["wake_at"] else "-"

    emit(rows, as_json, lambda d: print_table(
        cols, [[r["id"], r["workflow"], r["status"], r["version"], waiting(r), ago(r["updated_at"])] for r in d],
        title="workflow runs", empty="no workflow runs",
        caption=f"next page: --after {d[-1]['id']}" if len(d) == limit else None))


def _preview(value: Any, limit: int = 120) -> str:
    shown = dumps(value) if not isinstance(value, str) else value
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def _print_run(d: dict[str, Any]) -> None:
    lines = [("run", d["id"]), ("workflow", f"{d['workflow']} (version {d['version']})"), ("status", d["status"]),
             ("attention", d["attention"]), ("epoch", d["epoch"]), ("generation", d["generation"]),
             ("parent", d["parent"]), ("owner", d["owner"]),
             ("lease until", local_time(d["lease_until"]) if d["lease_until"] else None),
             ("wake at", local_time(d["wake_at"]) if d["wake_at"] else None),
             ("waiting", _preview(d["waiting"]) if d["waiting"] else None), ("waits for", d["waits_for"]),
             ("inbox", f"{d['inbox']} event(s), {d['inbox_seen']} seen when it parked"),
             ("input", _preview(d["input"])),
             ("result", _preview(d["result"]) if d["status"] == "SUCCEEDED" else None),
             ("error", f"{d['error']['type']}: {d['error']['message']}" if d["error"] else None),
             ("created", f"{local_time(d['created_at'])} ({ago(d['created_at'])})"),
             ("updated", f"{local_time(d['updated_at'])} ({ago(d['updated_at'])})")]
    for key, value in lines:
        if value not in (None, ""):
            click.echo(f"{key:<12} {text(value)}")
    journal = d["journal"]
    if journal:
        click.echo("")
        print_table([Col("pos", "right", key=True), Col("kind"), Col("name"), Col("outcome"),
                     Col("attempt", "right", drop=2), Col("epoch", "right", drop=1)],
                    [[e["position"], e["kind"], e["name"],
                      f"error {e['error']['type']}: {e['error']['message']}" if e["error"] else _preview(e["output"]),
                      e["attempt"], e["epoch"]] for e in journal], title="journal")
    if d["events"]:
        click.echo("")
        print_table([Col("seq", "right", key=True), Col("topic"), Col("event id", drop=1), Col("payload")],
                    [[e["seq"], e["topic"], e["event_id"], _preview(e["payload"])] for e in d["events"]],
                    title="inbox (newest)")


@wf.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
@connection_options
def wf_show(run_id, as_json, broker_url, backend_url):
    """One run: its record, its journal (position, call, outcome) and its newest events."""
    from ..workflows.admin import describe
    with Env(broker_url, backend_url) as env:
        data = describe(_store(env), run_id)
    emit(data, as_json, _print_run)


@wf.command("send")
@_run_action(click.argument("topic"), click.argument("payload", required=False, default="null"),
             click.option("--event-id", type=NonEmpty(), default=None, metavar="ID",
                          help="the event's id: a second send with it stores nothing (default: a random one)"))
def wf_send(run_id, topic, payload, event_id, queue, as_json, broker_url, backend_url):
    """Send the event TOPIC (PAYLOAD: any JSON value, default null) to RUN; returns once stored."""
    from ..workflows.api import send_event
    try:
        value = loads_json(payload)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="PAYLOAD") from None
    stored = _act(broker_url, backend_url, queue, send_event, run_id, topic, value, event_id=event_id)
    emit({"run": run_id, "topic": topic, "stored": stored}, as_json,
         lambda d: click.echo(f"sent {topic} to {run_id}" if stored else
                              f"{run_id} already has event {event_id}: nothing stored"))


def _print_changed(verb: str):
    def render(d: dict[str, Any]) -> None:
        where = f" from position {d['position']}" if d.get("position") is not None else ""
        click.echo(f"{d['run']}: {verb}{where}; now {d['status']}")
    return render


@wf.command("cancel")
@_run_action()
def wf_cancel(run_id, queue, as_json, broker_url, backend_url):
    """End RUN CANCELLED (its status: REVOKED, reason cancelled); a finished run is left as it is."""
    from ..workflows.admin import cancel
    run = _act(broker_url, backend_url, queue, cancel, run_id)
    emit({"run": run.id, "status": run.status}, as_json, _print_changed("cancelled"))


@wf.command("reset")
@_run_action(click.option("--to", "position", type=click.IntRange(0), required=True, metavar="POSITION",
                          help="the first journal position to drop (stem wf show RUN lists them); its call runs "
                               "again"),
             click.option("--yes", is_flag=True, help="do not ask"))
def wf_reset(run_id, position, queue, yes, as_json, broker_url, backend_url):
    """Drop RUN's journal from POSITION on and run it again from there (NEEDS_ATTENTION after a
    code change, FAILED or CANCELLED to try again)."""
    from ..workflows.admin import reset
    if not yes and not click.confirm(f"drop the journal of {run_id} from position {position} on and run it again?",
                                     default=False):
        fail("nothing reset")
    run = _act(broker_url, backend_url, queue, reset, run_id, position)
    emit({"run": run.id, "status": run.status, "position": position}, as_json, _print_changed("reset"))


@wf.command("retry")
@_run_action()
def wf_retry(run_id, queue, as_json, broker_url, backend_url):
    """Run a FAILED run again from the position that failed."""
    from ..workflows.admin import retry
    run, position = _act(broker_url, backend_url, queue, retry, run_id)
    emit({"run": run.id, "status": run.status, "position": position}, as_json, _print_changed("retried"))
