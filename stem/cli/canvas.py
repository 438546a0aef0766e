"""``stem group status ID`` and the chunked form of ``stem enqueue`` (``--chunks FILE``)."""

from __future__ import annotations

import json
import sys
import time

import click

from ..errors import TaskTimeoutError

from ._common import EXIT_FAILURE, Env, connection_options, fail
from ._output import dumps, emit

__all__ = ["group", "enqueue_chunks", "read_jsonl"]


def read_jsonl(path: str) -> list:
    """The items of a JSON-lines file (one JSON value a line; blank lines skipped); ``-`` is stdin."""
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    items = []
    try:
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except ValueError as exc:
                raise click.BadParameter(f"line {n} of {path} is not JSON: {exc}", param_hint="--chunks") from None
    finally:
        if stream is not sys.stdin:
            stream.close()
    return items


def _group_data(stem, group_id: str) -> dict:
    from ..canvas import CanvasHandle
    backend = stem._require_backend()
    record = backend.group_get(group_id)
    if record is None:
        fail(f"no group {group_id} (unknown, or its record expired after it ended)")
    handle = CanvasHandle.from_id(stem, group_id)
    status = backend.get(group_id)
    return {"id": group_id, "kind": handle.kind, "expected": record.expected, "finished": record.finished,
            "succeeded": record.succeeded, "failed": record.failed, "sealed": record.sealed,
            "interrupted": record.interrupted,
            "state": "RUNNING" if status is None else status.state.value,
            "reason": None if status is None else status.reason,
            "failed_members": backend.group_failed_members(group_id, 10) if record.failed else []}


def _print_group(d: dict) -> None:
    reason = f" ({d['reason']})" if d["reason"] else ""
    click.echo(f"{d['kind']} {d['id']}: {d['state']}{reason}")
    click.echo(f"  {d['finished']} of {d['expected']} done ({d['succeeded']} succeeded, {d['failed']} failed)"
               f"{'' if d['sealed'] else ', not sealed yet'}{', creation interrupted' if d['interrupted'] else ''}")
    if d["failed_members"]:
        more = d["failed"] - len(d["failed_members"])
        click.echo(f"  failed: {', '.join(d['failed_members'])}{f' and {more} more' if more > 0 else ''}")


@click.group()
def group() -> None:
    """Groups and chords (stem.canvas) in the result backend."""


@group.command("status")
@click.argument("group_id")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@connection_options
def status(group_id, as_json, broker_url, backend_url):
    """Show a group's (or chord's) progress: n of N done, failures, its state."""
    with Env(broker_url, backend_url) as env:
        env.require_backend("stem group status")
        emit(_group_data(env.producer(), group_id), as_json, _print_group)


def enqueue_chunks(env: Env, stem, name: str, path: str, size: int, options, wait: bool, timeout: float,
                   as_json: bool) -> None:
    """``stem enqueue NAME --chunks FILE --size N``: the items of FILE in tasks of N items
    (``stem.canvas.chunks``); with ``--wait``, a progress bar until every chunk ended."""
    from ..canvas import chunks
    items = read_jsonl(path)
    if not items:
        fail(f"{path} holds no items")
    handle = stem.apply(chunks(name, items, size, options))
    total = (len(items) + size - 1) // size
    if not wait:
        emit({"id": handle.id, "items": len(items), "tasks": total}, as_json, lambda d: click.echo(handle.id))
        return
    click.echo(f"enqueued {handle.id} ({len(items)} items in {total} tasks)", err=True)
    deadline = time.monotonic() + timeout
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from ._output import console
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console(), transient=as_json) as bar:
        task = bar.add_task(name, total=total)
        while True:
            done = handle.progress().done
            bar.update(task, completed=done)
            if done >= total or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    # every chunk counted: the group's own status is stored just after the last count
    try:
        final = stem.wait_for_task(handle.id, timeout=max(deadline - time.monotonic(), 1.0))
    except TaskTimeoutError:
        final = stem.get_status(handle.id)
    data = _group_data(stem, handle.id)
    emit(data, as_json, _print_group)
    if final.state.value != "SUCCEEDED":
        if not final.is_terminal:
            fail(f"{handle.id} did not finish within {timeout:g} s; `stem group status {handle.id}` shows it later")
        sys.exit(EXIT_FAILURE)
