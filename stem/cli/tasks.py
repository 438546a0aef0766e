"""``stem enqueue``, ``stem result``, ``stem queues`` and ``stem purge``."""

from __future__ import annotations

import sys

import click

from ._common import EXIT_FAILURE, Env, connection_options, fail, load_app
from ._output import Col, dumps, emit, local_time, print_table, text
from ._params import AppPath, JsonObject, NonEmpty, QueueName, Seconds, When

__all__ = ["enqueue", "result", "queues", "purge"]

_JSON_FORMS = "a JSON object, @FILE to read it from a file, or - to read it from stdin"


@click.command()
@click.argument("name")
@click.option("--args", "args", type=JsonObject(), default="{}", show_default=True, metavar="JSON",
              help=f"the task's arguments (handlers are called fn(ctx, **args)): {_JSON_FORMS}")
@click.option("--meta", type=JsonObject(), default=None, metavar="JSON",
              help=f"metadata the task reads as ctx.meta and its status keeps: {_JSON_FORMS}")
@click.option("--queue", "-q", type=QueueName(), default=None,
              help="queue (default: the task's own with -A, else $STEM_DEFAULT_QUEUE, else default)")
@click.option("--countdown", type=Seconds(0), default=None, help="run no sooner than this many seconds from now")
@click.option("--eta", type=When(), default=None, metavar="WHEN",
              help="run no sooner than WHEN: ISO 8601 (local time unless it names a zone) or epoch seconds")
@click.option("--priority", type=click.IntRange(0, 9), default=None,
              help="0-9, higher first among the due tasks of a queue (default: the task's own, else 0)")
@click.option("--max-retries", type=click.IntRange(0), default=None,
              help="retries after a failure (default: the task's own, else 0)")
@click.option("--task-id", type=NonEmpty(), default=None, metavar="ID",
              help="the task's id, instead of a random one (at most 200 characters); a task with "
                   "this id still queued, running or stored is not published twice")
@click.option("--unique", is_flag=True,
              help="publish nothing if a task of NAME with the same args is queued or running "
                   "(see README, Unique tasks); the id printed is then that task's")
@click.option("--unique-for", type=Seconds(0), default=None, metavar="SECONDS",
              help="with --unique: the key's safety lifetime after the task is due (default 3600)")
@click.option("-A", "--app", "registry_path", type=AppPath(), default=None, metavar="MODULE:REGISTRY",
              help="check NAME against this registry and use the task's own options (queue, retries, ...)")
@click.option("--path", "paths", multiple=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="also import -A from DIR (repeatable)")
@click.option("--wait", is_flag=True,
              help="after printing the id, wait for the outcome and print it; exit 1 unless the task SUCCEEDED")
@click.option("--timeout", type=Seconds(0), default=30.0, show_default=True,
              help="seconds --wait waits before giving up (exit 1; the task keeps its course)")
@click.option("--json", "as_json", is_flag=True, help="print JSON (with --wait the id goes to stderr first)")
@click.option("--chunks", "chunks_file", type=click.Path(allow_dash=True), default=None, metavar="FILE",
              help="a chunked job: the items of this JSON-lines file (one JSON value a line, - for stdin), "
                   "NAME called with items=[...] of --size items each, as one group (stem.canvas.chunks); "
                   "prints the group's id, and with --wait shows a progress bar")
@click.option("--size", type=click.IntRange(1), default=100, show_default=True, help="items per task, with --chunks")
@connection_options
def enqueue(name, args, meta, queue, countdown, eta, priority, max_retries, task_id, unique, unique_for,
            registry_path, paths, wait, timeout, as_json, chunks_file, size, broker_url, backend_url):
    """Enqueue task NAME and print its id (and, with --wait, its outcome)."""
    from ..errors import DuplicateTaskError, TaskTimeoutError
    from ..task import TaskOptions
    if countdown is not None and eta is not None:
        raise click.UsageError("give --countdown or --eta, not both")
    if unique_for is not None and not unique:
        raise click.UsageError("--unique-for needs --unique")
    if chunks_file is not None:
        clash = [flag for flag, given in (("--args", args), ("--meta", meta), ("--countdown", countdown),
                                          ("--eta", eta), ("--task-id", task_id), ("--unique", unique)) if given]
        if clash:
            raise click.UsageError(f"--chunks does not go with {', '.join(clash)}: each chunk task is called "
                                   "with items=[...] alone")
    with Env(broker_url, backend_url) as env:
        registry = load_app(registry_path, paths) if registry_path else None
        stem = env.producer(registry)
        if wait or chunks_file is not None:
            env.require_backend("--chunks" if chunks_file is not None else "--wait")
        options = TaskOptions(queue=queue, priority=priority, max_retries=max_retries,
                              unique=True if unique else None, unique_for=unique_for)
        if chunks_file is not None:
            from .canvas import enqueue_chunks
            enqueue_chunks(env, stem, name, chunks_file, size, options, wait, timeout, as_json)
            return
        duplicate = False
        try:
            task_id = stem.enqueue(name, args, options=options, meta=meta, countdown=countdown, eta=eta,
                                   task_id=task_id, on_duplicate="raise")
        except DuplicateTaskError as exc:
            task_id, duplicate = exc.existing_id, True
            click.echo(f"duplicate: nothing published; task {task_id} holds the key", err=True)
        if not wait:
            emit({"id": task_id, "duplicate": duplicate}, as_json, lambda d: click.echo(task_id))
            return
        # the id before the wait: a Ctrl-C while waiting must not lose it
        click.echo(f"enqueued {task_id}" if as_json else task_id, err=as_json)
        try:
            status = stem.wait_for_task(task_id, timeout=timeout)
        except TaskTimeoutError:
            status = stem.get_status(task_id)
            emit(_status_data(status), as_json, lambda d: None)
            fail(f"task {task_id} did not finish within {timeout:g} s (state: {status.state.value}); "
                 f"`stem result {task_id}` shows it later")
    emit(_status_data(status), as_json, lambda d: click.echo(f"{status.state.value} {_outcome(status)}"))
    if not status.succeeded:
        sys.exit(EXIT_FAILURE)


def _status_data(status) -> dict:
    import msgspec
    return msgspec.to_builtins(status)


def _outcome(status) -> str:
    if status.succeeded:
        return dumps(status.result)
    return status.error or status.reason or ""


def _print_status(d: dict) -> None:
    children = d.get("children") or []
    rows = [("id", d["id"]), ("state", d["state"]), ("name", d.get("name")), ("queue", d.get("queue")),
            ("attempt", None if d["state"] == "PENDING" else d.get("attempt", 0)), ("worker", d.get("worker")),
            ("enqueued", local_time(d["enqueued_at"]) if d.get("enqueued_at") else None),
            ("started", local_time(d["started_at"]) if d.get("started_at") else None),
            ("finished", local_time(d["finished_at"]) if d.get("finished_at") else None),
            ("progress", d.get("progress")),
            ("parent", d.get("parent_id")), ("root", d.get("root_id") if d.get("root_id") != d["id"] else None),
            ("group", d.get("group_id")), ("children", " ".join(children) if children else None),
            # what the worker kept: secret-looking and TaskOptions(redact=...) values already hidden
            ("args", dumps(d["args"]) if d.get("args") is not None else None),
            ("meta", dumps(d["meta"]) if d.get("meta") else None)]
    if d["state"] == "SUCCEEDED":
        rows.append(("result", dumps(d.get("result"))))
    rows += [("error", d.get("error")), ("reason", d.get("reason"))]
    for key, value in rows:
        if value not in (None, ""):
            click.echo(f"{key:<9} {text(value)}")
    if d.get("traceback"):
        click.echo("traceback\n" + d["traceback"].rstrip())
    if d["state"] == "PENDING":
        click.echo("(the result backend knows nothing of this id yet: still queued, never enqueued, or expired)")


@click.command()
@click.argument("task_id")
@click.option("--wait", is_flag=True, help="wait until the task finishes; exit 1 unless it SUCCEEDED")
@click.option("--timeout", type=Seconds(0), default=30.0, show_default=True, help="seconds --wait waits")
@click.option("--json", "as_json", is_flag=True)
@connection_options
def result(task_id, wait, timeout, as_json, broker_url, backend_url):
    """State, result or error (with traceback) of task TASK_ID.

    PENDING means the backend knows nothing of the id (yet): still queued, never
    enqueued, or its result expired. Exit 0 when the status was read; with --wait,
    exit 1 unless the task SUCCEEDED.
    """
    from ..errors import TaskTimeoutError
    with Env(broker_url, backend_url) as env:
        env.require_backend("stem result")
        stem = env.producer()
        timed_out = False
        if wait:
            try:
                status = stem.wait_for_task(task_id, timeout=timeout)
            except TaskTimeoutError:
                status, timed_out = stem.get_status(task_id), True
        else:
            status = stem.get_status(task_id)
    emit(_status_data(status), as_json, _print_status)
    if timed_out:
        fail(f"task {task_id} did not finish within {timeout:g} s (state: {status.state.value})")
    if wait and not status.succeeded:
        sys.exit(EXIT_FAILURE)


@click.command()
@connection_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="include the control plane's own queues")
def queues(broker_url, backend_url, as_json, show_all):
    """Depth, in-flight, delayed, throttled and dead counts per queue, then the lanes of
    limited tasks (``stem.limits``): per rate / concurrency key, how many wait and run.

    Throttled tasks wait in the broker for a token or a slot: they are not in flight, and
    no worker holds (reserves) them."""
    from ..control import is_internal_queue
    with Env(broker_url, backend_url) as env:
        rows = []
        for q in env.broker.queues():
            if show_all or not is_internal_queue(q):
                row = env.broker.stats(q)._asdict()
                row["lanes"] = [lane._asdict() for lane in env.broker.lane_stats(q)]
                rows.append(row)
    cols = [Col("queue", key=True)] + [Col(c, "right") for c in ("ready", "in_flight", "delayed", "throttled", "dead")]

    def render(d):
        print_table(cols, [[r["queue"], r["ready"], r["in_flight"], r["delayed"], r["throttled"], r["dead"]]
                           for r in d], title="queues",
                    empty="no queues yet (a queue appears once a task is published to it or a worker consumes it)")
        lanes = [(r["queue"], lane) for r in d for lane in r["lanes"]]
        if lanes:
            from rich.markup import escape        # keys hold brackets: "report[tenant='a']"
            print_table([Col("queue", key=True), Col("rate_key", key=True), Col("concurrency_key", key=True),
                         Col("waiting", "right"), Col("running", "right")],
                        [[q, escape(lane["rate_key"] or "-"), escape(lane["concurrency_key"] or "-"), lane["waiting"],
                          lane["running"]]
                         for q, lane in lanes], title="limit lanes")
    emit(rows, as_json, render)


@click.command()
@click.argument("queue", type=QueueName())
@click.option("--yes", is_flag=True, help="do not ask")
@click.option("--json", "as_json", is_flag=True)
@connection_options
def purge(queue, yes, as_json, broker_url, backend_url):
    """Delete every ready, delayed and throttled task of QUEUE for good.

    Each ends REVOKED (reason "purged"): its waiters wake, and a group or chord it
    belongs to counts it as failed.  Tasks running now are not touched; dead letters
    stay (stem dlq purge).  A purge that was interrupted is finished by running it again.
    """
    with Env(broker_url, backend_url) as env:
        env.require_backend("stem purge (it records each purged task's REVOKED status)")
        stats = env.broker.stats(queue)
        if not yes and not click.confirm(f"delete {stats.ready} ready, {stats.delayed} delayed and {stats.throttled} "
                                         f"throttled task(s) of queue {queue!r} for good?", default=False):
            fail("nothing purged")
        report = env.producer().purge(queue)
    data = {"queue": queue, "purged": report.purged, "revoked": report.revoked, "kept": report.kept,
            "unreadable": report.unreadable}
    emit(data, as_json, lambda d: click.echo(f"purged {report.purged} task(s) from {queue}: {report.revoked} "
                                             f"ended REVOKED, {report.unreadable} unreadable"))
