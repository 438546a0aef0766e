"""Live worker status from the heartbeat store (what ``stem worker status`` shows).

Schedulers (``stem.scheduler``) put heartbeats too, with ``kind: "scheduler"``:
they are listed beside the workers, with their own counters.

Every worker publishes its ``stats()`` to the result backend every
``heartbeat_interval`` seconds; ``backend.heartbeats()`` lists those that have
not expired.  :func:`worker_rows` turns them into one JSON-able row per
worker; :func:`render_table` into a rich ``Table``.  A worker is ``lost``
when its last heartbeat is older than ``LOST_AFTER_BEATS`` intervals while
the backend still lists it; :class:`StatusBoard` (the live view) also keeps a
worker it saw before and whose heartbeat has since expired, as lost, for
``forget_after`` seconds.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

__all__ = ["worker_rows", "snapshot", "render_table", "concurrency_text", "StatusBoard", "watch", "LOST_AFTER_BEATS",
           "DEFAULT_HEARTBEAT_INTERVAL"]

LOST_AFTER_BEATS = 3
# For heartbeats of workers that do not say their interval (older versions).
DEFAULT_HEARTBEAT_INTERVAL = 10.0


def _row(hb: dict[str, Any], now: float, default_interval: float) -> dict[str, Any]:
    interval = float(hb.get("heartbeat_interval") or default_interval)
    seen_at = hb.get("seen_at")
    age = max(0.0, now - float(seen_at)) if seen_at is not None else None
    children = [{"pid": c.get("pid"), "state": c.get("state"), "rss": int(c.get("rss") or 0),
                 "tasks_done": c.get("tasks_done", 0), "running": c.get("running", 0)}
                for c in hb.get("children") or ()]
    lost = age is None or age > LOST_AFTER_BEATS * interval
    return {
        "id": hb.get("worker_id") or hb.get("id"),
        "kind": hb.get("kind") or "worker",
        "host": hb.get("host"),
        "pid": hb.get("pid"),
        "queues": list(hb.get("queues") or ()),
        "paused": list(hb.get("paused") or ()),
        "isolation": hb.get("isolation"),
        "concurrency": hb.get("concurrency"),
        "autoscale": _autoscale(hb.get("autoscale")),
        "in_flight": hb.get("in_flight", 0),
        "running": hb.get("running", 0),
        "processed": hb.get("processed", 0),
        "succeeded": hb.get("succeeded", 0),
        "failed": hb.get("failed", 0),
        "retried": hb.get("retried", 0),
        "children": children,
        "rss": sum(c["rss"] for c in children),
        "uptime": hb.get("uptime"),
        "heartbeat_interval": interval,
        "last_heartbeat_age": age,
        "state": "lost" if lost else "alive",
        "lost": lost,
        **({key: hb.get(key, 0) for key in _SCHEDULER_KEYS} if hb.get("kind") == "scheduler" else {}),
    }


# what a scheduler's heartbeat adds (stem.scheduler.Scheduler.stats)
_SCHEDULER_KEYS = ("schedules", "tick", "last_pass_at", "fired", "duplicates", "skipped", "caught_up", "errors")


def _autoscale(data: Any) -> dict[str, Any] | None:
    """The heartbeat's ``autoscale`` (bounds and the last resize), or None when it is off."""
    if not isinstance(data, dict):
        return None
    return {key: data.get(key) for key in ("min", "max", "last", "at", "from", "to", "reason", "grows", "shrinks",
                                           "held_back")}


def worker_rows(backend: Any, *, now: float | None = None,
                default_interval: float = DEFAULT_HEARTBEAT_INTERVAL) -> list[dict[str, Any]]:
    """One JSON-able dict per worker listed in ``backend.heartbeats()``, sorted by host and id.

    Keys: id, kind ("worker", or "scheduler" for a ``stem beat`` or a worker's ``--beat``
    scheduler, whose row also has schedules, tick, last_pass_at, fired, duplicates, skipped,
    caught_up and errors), host, pid, queues, paused, isolation, concurrency, autoscale (None, or min,
    max, last ("grow", "shrink" or None), at (epoch seconds), from, to, reason, grows,
    shrinks and held_back: "memory" while the headroom stops a grow), in_flight,
    running, processed, succeeded, failed, retried, children (pid, state, rss,
    tasks_done, running), rss (sum of the children's), uptime,
    heartbeat_interval, last_heartbeat_age (seconds), state ("alive" or
    "lost") and lost.
    """
    now = time.time() if now is None else now
    rows = [_row(hb, now, default_interval) for hb in backend.heartbeats()]
    rows.sort(key=lambda r: (str(r["host"]), str(r["id"])))
    return rows


def snapshot(backend: Any, *, now: float | None = None) -> dict[str, Any]:
    """``{"generated_at": epoch seconds, "workers": worker_rows(...)}`` (what ``--json`` prints)."""
    now = time.time() if now is None else now
    return {"generated_at": now, "workers": worker_rows(backend, now=now)}


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{(seconds % 3600) // 60:02.0f}m"


def concurrency_text(row: dict[str, Any], now: float | None = None) -> str:
    """A row's (or a ``stats()`` reply's) concurrency: ``3``, or with autoscale
    ``3 (2-8, grew 4.0s ago)`` (``held back: memory`` while the headroom stops a grow)."""
    now = time.time() if now is None else now
    text = str(row["concurrency"] or "")
    scale = row.get("autoscale")
    if not scale:
        return text
    detail = f"{scale['min']}-{scale['max']}"
    if scale.get("held_back"):
        detail += f", held back: {scale['held_back']}"
    elif scale.get("last") and scale.get("at") is not None:
        verb = "grew" if scale["last"] == "grow" else "shrank"
        detail += f", {verb} {_age(max(0.0, now - float(scale['at'])))} ago"
    return f"{text} ({detail})"


def render_table(rows: Iterable[dict[str, Any]], *, title: str = "stem workers", now: float | None = None):
    """A rich ``Table`` of :func:`worker_rows` rows; lost workers in red."""
    from rich.table import Table
    from rich.text import Text

    now = time.time() if now is None else now
    table = Table(title=title, expand=False)
    for name, justify in (("worker", "left"), ("host", "left"), ("pid", "right"), ("queues", "left"),
                          ("conc.", "right"), ("in-flight", "right"), ("processed", "right"), ("failed", "right"),
                          ("children (RSS)", "left"), ("last beat", "right"), ("state", "left")):
        table.add_column(name, justify=justify, no_wrap=name in ("worker", "pid"))
    n = 0
    for r in rows:
        n += 1
        if r.get("kind") == "scheduler":
            state = Text("lost", style="bold red") if r["lost"] else Text("alive", style="green")
            table.add_row(str(r["id"]), str(r["host"] or ""), str(r["pid"] or ""),
                          f"scheduler: {r['schedules']} schedule(s)", "-", "-", f"{r['fired']:,}",
                          f"{r['errors']:,}", "-", _age(r["last_heartbeat_age"]), state,
                          style="red" if r["lost"] else None)
            continue
        children = ", ".join(f"{c['pid']} ({_bytes(c['rss'])})" if c["rss"] else str(c["pid"])
                             for c in r["children"]) or "-"
        queues = ",".join(r["queues"])
        if r["paused"]:
            queues += f" (paused: {','.join(r['paused'])})"
        state = Text("lost", style="bold red") if r["lost"] else Text("alive", style="green")
        table.add_row(str(r["id"]), str(r["host"] or ""), str(r["pid"] or ""), queues, concurrency_text(r, now),
                      str(r["in_flight"]), f"{r['processed']:,}", f"{r['failed']:,}", children,
                      _age(r["last_heartbeat_age"]), state, style="red" if r["lost"] else None)
    if not n:
        table.caption = "no live workers (none has published a heartbeat to this backend)"
    return table


class StatusBoard:
    """The live view's memory: rows from the backend, plus workers seen earlier
    whose heartbeat has expired since (shown as lost for ``forget_after`` seconds).
    A worker that shuts down cleanly removes its heartbeat and is lost too until forgotten."""

    def __init__(self, backend: Any, *, forget_after: float = 300.0):
        self.backend = backend
        self.forget_after = forget_after
        self._seen: dict[str, tuple[dict[str, Any], float]] = {}   # id -> (last row, when listed)

    def rows(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        rows = worker_rows(self.backend, now=now)
        listed = set()
        for r in rows:
            listed.add(r["id"])
            self._seen[r["id"]] = (r, now)
        for wid, (last, listed_at) in list(self._seen.items()):
            if wid in listed:
                continue
            if now - listed_at > self.forget_after:
                del self._seen[wid]
                continue
            base = last["last_heartbeat_age"] or 0.0
            rows.append({**last, "last_heartbeat_age": base + (now - listed_at), "state": "lost", "lost": True})
        rows.sort(key=lambda r: (str(r["host"]), str(r["id"])))
        return rows

    def table(self, now: float | None = None):
        return render_table(self.rows(now), now=now)


def watch(backend: Any, *, refresh: float = 1.0, console: Any = None, iterations: int | None = None) -> None:
    """Redraw the table every ``refresh`` seconds until interrupted (or ``iterations`` redraws)."""
    from rich.live import Live

    board = StatusBoard(backend)
    done = 0
    with Live(board.table(), console=console, auto_refresh=False) as live:
        while iterations is None or done < iterations:
            live.update(board.table(), refresh=True)
            done += 1
            if iterations is not None and done >= iterations:
                break
            time.sleep(refresh)
