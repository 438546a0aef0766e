"""``stem worker ping|stats|inspect|revoke|shutdown|pause|resume|pool|status|healthcheck``.

A command sent to workers succeeds (exit 0) only when every targeted worker
answered without an error; no answer, or an error from any worker, is exit 1
with the reason on stderr.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

from ..status import concurrency_text
from ._common import EXIT_FAILURE, USAGE_ERRORS, Env, connection_options, fail
from ._output import Col, ago, console, duration, emit, fit_table, print_table, text
from ._params import QueueName, Seconds
from .worker import worker

__all__: list[str] = []


def _control_command(fn):
    fn = click.option("--json", "as_json", is_flag=True, help="machine-readable output")(fn)
    fn = click.option("--timeout", type=Seconds(0.1), default=2.0, show_default=True,
                      help="seconds to collect replies")(fn)
    fn = click.option("--worker", "-w", "workers", multiple=True, metavar="ID",
                      help="target this worker (id or prefix); repeatable; default: all")(fn)
    return connection_options(fn)


def _run_control(broker_url, backend_url, method: str, *args: Any, workers, timeout, as_json,
                 render: Callable[[list], None] | None = None) -> list[dict]:
    with Env(broker_url, backend_url) as env:
        replies = getattr(env.control(), method)(*args, workers=workers, timeout=timeout)
    if render is None:
        def render(data):
            for r in data:
                click.echo(f"{r['worker']}: " + (f"error: {r['error']}" if "error" in r else text(r["reply"])))
    if replies or as_json:
        emit(replies, as_json, render)
    if not replies:
        fail(f"no worker replied within {timeout:g} s (see `stem worker status`)")
    errors = [r for r in replies if "error" in r]
    if errors:
        fail(f"{len(errors)} of {len(replies)} worker(s) refused: {errors[0]['error']}")
    return replies


def _errors_first(replies: list[dict], cells: Callable[[dict], list], width: int) -> list[list]:
    return [[r["worker"], "error: " + r["error"], *[""] * (width - 2)] if "error" in r
            else [r["worker"], *cells(r["reply"])] for r in replies]


@worker.command()
@_control_command
def ping(broker_url, backend_url, workers, timeout, as_json):
    """Ping workers; lists each one that answers."""
    cols = [Col("worker", key=True), Col("host", drop=2), Col("pid", "right", drop=1), Col("queues")]
    _run_control(broker_url, backend_url, "ping", workers=workers, timeout=timeout, as_json=as_json,
                 render=lambda d: print_table(cols, _errors_first(
                     d, lambda r: [r["host"], r["pid"], r["queues"]], len(cols))))


@worker.command()
@_control_command
def stats(broker_url, backend_url, workers, timeout, as_json):
    """Counters, concurrency, children and their memory."""
    cols = [Col("worker", key=True), Col("processed", "right"), Col("succeeded", "right", drop=3),
            Col("failed", "right"), Col("retried", "right", drop=4), Col("in-flight", "right"),
            Col("conc.", "right", drop=5), Col("children (pid: MiB)", drop=6), Col("uptime", "right", drop=2)]

    def cells(r):
        return [f"{r['processed']:,}", f"{r['succeeded']:,}", f"{r['failed']:,}", f"{r['retried']:,}",
                r["in_flight"], concurrency_text(r),
                ", ".join(f"{c['pid']}: {c['rss'] / 2**20:.0f}" for c in r.get("children", [])) or "-",
                duration(r.get("uptime"))]
    _run_control(broker_url, backend_url, "stats", workers=workers, timeout=timeout, as_json=as_json,
                 render=lambda d: print_table(cols, _errors_first(d, cells, len(cols))))


def _inspect_registered(broker_url, backend_url, workers, timeout, as_json):
    """``stem worker inspect registered``: each worker's tasks with the options it runs them with."""
    def render(data):
        out = console()
        cols = [Col("task", key=True), Col("queue"), Col("max retries", "right", drop=3),
                Col("soft limit s", "right", drop=1), Col("hard limit s", "right", drop=2), Col("rate limit", drop=4)]
        for r in data:
            if "error" in r:
                out.print(f"{r['worker']}: error: {r['error']}")
                continue
            out.print(f"{r['worker']}: {len(r['reply'])} task(s)")
            rows = [[t["name"], t["queue"], t["max_retries"],
                     *("-" if t[k] is None else t[k] for k in ("soft_time_limit", "hard_time_limit", "rate_limit"))]
                    for t in r["reply"]]
            if rows:
                out.print(fit_table(cols, rows, out))
    _run_control(broker_url, backend_url, "registered", workers=workers, timeout=timeout, as_json=as_json,
                 render=render)


@worker.command()
@click.argument("what", type=click.Choice(["tasks", "registered"]), default="tasks")
@_control_command
def inspect(what, broker_url, backend_url, workers, timeout, as_json):
    """Running and reserved tasks (ids, names, start times, child pids), revocations and
    paused queues;
    `inspect registered`: each worker's tasks and the options it runs them with."""
    if what == "registered":
        return _inspect_registered(broker_url, backend_url, workers, timeout, as_json)

    def render(data):
        out = console()
        cols = [Col("state"), Col("task id", key=True), Col("name"), Col("started", drop=2), Col("pid", "right", drop=1)]
        for r in data:
            if "error" in r:
                out.print(f"{r['worker']}: error: {r['error']}")
                continue
            rep = r["reply"]
            rows = [[state, t["id"], t["name"], ago(t["started_at"]) if t["started_at"] else "-", t["pid"]]
                    for state in ("running", "reserved") for t in rep[state]]
            paused = rep.get("paused") or []
            out.print(f"{r['worker']}: {len(rep['running'])} running, {len(rep['reserved'])} reserved, "
                      f"{len(rep.get('revoked', []))} revoked"
                      + (f", paused: {', '.join(paused)}" if paused else ""))
            if rows:
                out.print(fit_table(cols, rows, out))
    _run_control(broker_url, backend_url, "inspect", workers=workers, timeout=timeout, as_json=as_json,
                 render=render)


@worker.command()
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--terminate", is_flag=True, help="also kill the task if it is running now")
@click.option("--force", is_flag=True,
              help="exit 0 also for ids the backend has no status for (a task still queued has none yet) "
                   "and for tasks already finished")
@_control_command
def revoke(task_ids, terminate, force, broker_url, backend_url, workers, timeout, as_json):
    """Revoke tasks (persistent: a worker started later skips them too).

    The revocation is always recorded. The exit code is 1, with a warning, when an id
    has no status in the result backend (a typo, an expired result, or a task still
    queued: queued tasks have no status until a worker takes them) or the task
    already finished, unless --force says that is expected.
    """
    with Env(broker_url, backend_url) as env:
        control = env.control()
        statuses = env.backend.get_many(list(task_ids))
        replies = control.revoke(list(task_ids), terminate=terminate, workers=workers, timeout=timeout)
    unknown = [t for t, s in zip(task_ids, statuses) if s is None]
    finished = {t: s.state.value for t, s in zip(task_ids, statuses) if s is not None and s.is_terminal}
    emit({"revoked": list(task_ids), "unknown": unknown, "finished": finished, "replies": replies}, as_json,
         lambda d: click.echo(f"revoked {len(task_ids)} task(s); {len(replies)} live worker(s) acknowledged"))
    problems = []
    if unknown:
        problems.append(f"no status for {', '.join(unknown)} (an unknown id, an expired result, or a task still "
                        "queued: it is skipped when a worker takes it)")
    if finished:
        problems.append("already finished: " + ", ".join(f"{t} ({s})" for t, s in finished.items()))
    if problems and not force:
        fail("; ".join(problems) + "; pass --force when that is expected")


@worker.command()
@click.option("--mode", type=click.Choice(["warm", "soft", "hard"]), default="warm", show_default=True)
@_control_command
def shutdown(mode, broker_url, backend_url, workers, timeout, as_json):
    """Shut workers down (warm: finish running tasks; soft: ask them to stop; hard: kill and requeue)."""
    _run_control(broker_url, backend_url, "shutdown", mode, workers=workers, timeout=timeout, as_json=as_json,
                 render=lambda d: click.echo("\n".join(
                     f"{r['worker']}: " + (f"error: {r['error']}" if "error" in r else f"shutting down ({mode})")
                     for r in d)))


@worker.command()
@click.argument("queue", type=QueueName())
@_control_command
def pause(queue, broker_url, backend_url, workers, timeout, as_json):
    """Stop consuming QUEUE (the worker keeps running)."""
    _run_control(broker_url, backend_url, "pause", queue, workers=workers, timeout=timeout, as_json=as_json)


@worker.command()
@click.argument("queue", type=QueueName())
@_control_command
def resume(queue, broker_url, backend_url, workers, timeout, as_json):
    """Consume QUEUE again."""
    _run_control(broker_url, backend_url, "resume", queue, workers=workers, timeout=timeout, as_json=as_json)


@worker.command()
@click.argument("direction", type=click.Choice(["grow", "shrink"]))
@click.argument("n", type=click.IntRange(1), default=1)
@_control_command
def pool(direction, n, broker_url, backend_url, workers, timeout, as_json):
    """Add or retire child processes: stem worker pool grow 2."""
    _run_control(broker_url, backend_url, "pool_" + direction, n, workers=workers, timeout=timeout,
                 as_json=as_json)


_STATUS_COLS = [Col("worker", key=True), Col("state"), Col("last beat", "right", drop=3), Col("queues"),
                Col("host", drop=6), Col("pid", "right", drop=7), Col("conc.", "right", drop=5),
                Col("in-flight", "right", drop=4), Col("processed", "right"), Col("failed", "right"),
                Col("children (RSS)", drop=8)]


def _status_table(rows: list[dict], out):
    def mib(n):
        return f"{n / 2**20:.0f} MiB"
    cells = []
    for r in rows:
        age = r["last_heartbeat_age"]
        beat = "-" if age is None else duration(age) + " ago"
        if r.get("kind") == "scheduler":   # processed: runs it published; failed: passes or schedules in error
            cells.append([r["id"], r["state"], beat, f"scheduler: {r['schedules']} schedule(s)", r["host"], r["pid"],
                          "-", "-", f"{r['fired']:,}", f"{r['errors']:,}", "-"])
            continue
        queues = ",".join(r["queues"]) + (f" (paused: {','.join(r['paused'])})" if r["paused"] else "")
        children = ", ".join(f"{c['pid']} ({mib(c['rss'])})" if c["rss"] else str(c["pid"])
                             for c in r["children"]) or "-"
        cells.append([r["id"], r["state"], beat, queues, r["host"], r["pid"],
                      concurrency_text(r), r["in_flight"], f"{r['processed']:,}", f"{r['failed']:,}", children])
    caption = None if rows else "no live workers (none has published a heartbeat to this backend)"
    return fit_table(_STATUS_COLS, cells, out, title="stem workers", caption=caption)


@worker.command()
@connection_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="refresh live until Ctrl-C")
def status(broker_url, backend_url, as_json, watch):
    """Live workers and schedulers from their heartbeats (lost ones flagged); a scheduler's
    processed column counts the runs it published."""
    from .. import status as st
    with Env(broker_url, backend_url) as env:
        backend = env.require_backend("stem worker status (it reads heartbeats)")
        if watch and not as_json:
            _watch(st.StatusBoard(backend))
            return
        emit(st.snapshot(backend), as_json, lambda d: console().print(_status_table(d["workers"], console())))


def _watch(board, refresh: float = 1.0) -> None:
    import time
    from rich.live import Live
    out = console()
    try:
        with Live(_status_table(board.rows(), out), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(refresh)
                live.update(_status_table(board.rows(), out), refresh=True)
    except KeyboardInterrupt:   # the way to leave a live view, not a failure
        return


@worker.command()
@_control_command
def healthcheck(broker_url, backend_url, workers, timeout, as_json):
    """Exit 0 when every targeted worker (default: at least one) answers a ping, else 1."""
    from ..errors import StemError
    from ..redact import mask_urls
    try:
        with Env(broker_url, backend_url) as env:
            control = env.control()
            live = [h["worker_id"] for h in control.workers()]
            replies = control.ping(workers=workers or None, timeout=timeout) if live else []
    except USAGE_ERRORS:
        raise
    except StemError as exc:
        message = mask_urls(str(exc))
        emit({"healthy": False, "error": message}, as_json, lambda d: click.echo(f"unhealthy: {message}", err=True))
        sys.exit(EXIT_FAILURE)
    expected = len(workers) if workers else max(1, len(live))
    healthy = len(replies) >= expected
    emit({"healthy": healthy, "live": live, "answered": [r["worker"] for r in replies]}, as_json,
         lambda d: click.echo(("healthy" if healthy else "unhealthy") +
                              f": {len(replies)} of {len(live)} live worker(s) answered"))
    sys.exit(0 if healthy else EXIT_FAILURE)
