"""``stem dlq list|show|replay|purge``: the dead-letter queues."""

from __future__ import annotations

from typing import Any

import click

from ._common import Env, connection_options, fail, load_app
from ._output import Col, ago, dumps, emit, local_time, print_table, text
from ._params import AppPath, QueueName

__all__ = ["dlq"]


@click.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters.

    A task lands here when it failed for good (FAILED: it ran out of retries) or
    could not run at all (DEAD: bad signature, undecodable frame, poison that kept
    crashing its child, too many deliveries).
    """


def _queue_names(env: Env, queue: str | None) -> list[str]:
    from ..control import is_internal_queue
    return [queue] if queue else [q for q in env.broker.queues() if not is_internal_queue(q)]


def _peek(frame: bytes, signer: Any, registry: Any = None) -> dict[str, Any]:
    """What a dead frame holds, decoded without verifying it (it may be why it died), and
    what its signature says when this command has keys to check it.  Its arguments as
    ``stem.redact.shown_args`` shows them (secret-looking names hidden, and with the
    ``registry`` the task's own ``TaskOptions(redact=...)``), never cut."""
    import sys

    from ..redact import shown_args
    from ..envelope import decode_frame, read_header
    from ..errors import DecodeError, SignatureError
    try:
        header = read_header(frame)
        env = decode_frame(frame)
    except DecodeError as exc:
        return {"decoded": False, "decode_error": str(exc)}
    key_id = bytes(header.key_id).decode("utf-8", "backslashreplace")
    if not key_id:
        signature = "unsigned"
    elif signer is None:
        signature = f"signed with key {key_id}; not checked (no signing keys configured here)"
    else:
        try:
            decode_frame(frame, signer)
            signature = f"signed with key {key_id}; valid"
        except (SignatureError, DecodeError) as exc:
            signature = f"signed with key {key_id}; INVALID: {exc}"
    rule = registry.get(env.name).options.redact if registry is not None and env.name in registry else None
    return {"decoded": True, "name": env.name, "args": shown_args(env.args, rule, limit=sys.maxsize),
            "meta": env.meta, "headers": env.headers,
            "attempt": env.attempt, "max_retries": env.max_retries, "enqueued_at": env.enqueued_at,
            "signature": signature}


@dlq.command("list")
@click.option("--queue", "-q", type=QueueName(), default=None, help="one queue (default: all)")
@click.option("--limit", "-n", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@connection_options
def dlq_list(queue, limit, as_json, broker_url, backend_url):
    """Dead letters, oldest first: entry id, task id, name, queue, reason, time (details: stem dlq show ID)."""
    from ..envelope import decode_frame
    from ..errors import DecodeError
    rows = []
    with Env(broker_url, backend_url) as env:
        for q in _queue_names(env, queue):
            for dl in env.broker.dead_letters(q, limit):
                try:
                    name = decode_frame(dl.frame).name
                except DecodeError:
                    name = None
                rows.append({"id": dl.id, "task_id": dl.task_id, "name": name, "queue": dl.queue,
                             "reason": dl.reason, "failed_at": dl.failed_at, "size": len(dl.frame)})
    rows.sort(key=lambda r: r["failed_at"])
    rows = rows[:limit]
    cols = [Col("id", key=True), Col("task id", key=True), Col("name"), Col("queue", drop=2), Col("reason"),
            Col("failed at", drop=1)]
    emit(rows, as_json, lambda d: print_table(
        cols, [[r["id"], r["task_id"], r["name"] or "(undecodable)", r["queue"], r["reason"],
                local_time(r["failed_at"])] for r in d], title="dead letters", empty="no dead letters"))


@dlq.command("show")
@click.argument("entry_id")
@click.option("--queue", "-q", type=QueueName(), default=None, help="look only in this queue (default: all)")
@click.option("--json", "as_json", is_flag=True)
@click.option("-A", "--app", "registry_path", type=AppPath(), default=None, metavar="MODULE:REGISTRY",
              help="the TaskRegistry whose tasks' TaskOptions(redact=...) hide arguments (secret-looking "
                   "names are hidden without it too)")
@click.option("--path", "paths", multiple=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="also import -A from DIR (repeatable)")
@connection_options
def dlq_show(entry_id, queue, as_json, registry_path, paths, broker_url, backend_url):
    """One dead letter: the task (name, args, meta, attempt), why it died, and the error and
    traceback its status holds in the result backend.  Argument values whose names look
    like secrets (password, token, api_key, ...) show as ***, and so do those the task's
    TaskOptions(redact=...) hides when -A names its registry."""
    import msgspec
    registry = load_app(registry_path, paths) if registry_path else None
    with Env(broker_url, backend_url) as env:
        found = None
        for q in _queue_names(env, queue):
            dead = env.broker.stats(q).dead
            found = next((dl for dl in env.broker.dead_letters(q, max(dead, 1)) if str(dl.id) == entry_id), None)
            if found is not None:
                break
        if found is None:
            fail(f"no dead letter with id {entry_id!r}" + (f" in queue {queue!r}" if queue else "") +
                 " (stem dlq list shows the ids)")
        status = env.backend.get(found.task_id) if env.backend is not None else None
        data = {"id": found.id, "task_id": found.task_id, "queue": found.queue, "reason": found.reason,
                "failed_at": found.failed_at, "size": len(found.frame), **_peek(found.frame, env.signer, registry),
                "status": None if status is None else msgspec.to_builtins(status)}
    emit(data, as_json, _print_entry)


def _print_entry(d: dict[str, Any]) -> None:
    lines = [("dead letter", f"{d['id']} (queue {d['queue']})"), ("reason", d["reason"]),
             ("failed at", f"{local_time(d['failed_at'])} ({ago(d['failed_at'])})"), ("task id", d["task_id"])]
    if d["decoded"]:
        lines += [("name", d["name"]), ("args", dumps(d["args"])), ("meta", dumps(d["meta"])),
                  ("attempt", f"{d['attempt']} (max retries {d['max_retries']})"),
                  ("enqueued at", local_time(d["enqueued_at"]) if d["enqueued_at"] else None),
                  ("signature", d["signature"])]
    else:
        lines.append(("frame", f"undecodable ({d['decode_error']})"))
    status = d["status"]
    if status is None:
        lines.append(("status", "none in the result backend"))
    else:
        lines += [("status", status["state"]), ("error", status.get("error")), ("worker", status.get("worker"))]
    for key, value in lines:
        if value not in (None, ""):
            click.echo(f"{key:<12} {text(value)}")
    if status and status.get("traceback"):
        click.echo("traceback\n" + status["traceback"].rstrip())


@dlq.command("replay")
@click.option("--queue", "-q", type=QueueName(), default=None, help="one queue (default: all)")
@click.option("--id", "ids", multiple=True, help="dead-letter entry id (repeatable; default: all)")
@click.option("--yes", is_flag=True, help="do not ask")
@click.option("--json", "as_json", is_flag=True)
@connection_options
def dlq_replay(queue, ids, yes, as_json, broker_url, backend_url):
    """Move dead letters back to their queue (exit 1 when an --id matched nothing)."""
    if not yes and not click.confirm("replay dead letters back into their queues?", default=False):
        fail("nothing replayed")
    with Env(broker_url, backend_url) as env:
        moved = {q: env.broker.replay(q, list(ids) or None) for q in _queue_names(env, queue)}
    emit(moved, as_json, lambda d: click.echo(f"replayed {sum(d.values())} dead letter(s)"))
    wanted = len(set(ids))
    if wanted and sum(moved.values()) < wanted:
        fail(f"replayed {sum(moved.values())} of the {wanted} dead letter(s) asked for: no entry with "
             f"{'that id' if wanted == 1 else 'some of those ids'}" + (f" in queue {queue!r}" if queue else "")
             + " (stem dlq list shows the ids)")


@dlq.command("purge")
@click.option("--queue", "-q", type=QueueName(), default=None, help="one queue (default: all)")
@click.option("--yes", is_flag=True, help="do not ask")
@click.option("--json", "as_json", is_flag=True)
@connection_options
def dlq_purge(queue, yes, as_json, broker_url, backend_url):
    """Delete dead letters for good."""
    if not yes and not click.confirm("delete dead letters for good?", default=False):
        fail("nothing purged")
    with Env(broker_url, backend_url) as env:
        dropped = {q: env.broker.purge_dead_letters(q) for q in _queue_names(env, queue)}
    emit(dropped, as_json, lambda d: click.echo(f"purged {sum(d.values())} dead letter(s)"))
