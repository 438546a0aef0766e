"""How the ``stem`` command prints: strict JSON, tables that fit the width, readable times.

Tables must stay usable at 80 columns and in a pipe: a column marked ``key``
(an id) is never cut, other columns wrap, and when the table still does not
fit, the least useful columns are dropped (the caption says which, and
``--json`` has everything).
"""

from __future__ import annotations

import datetime
import json
import math
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import click

__all__ = ["Col", "dumps", "emit", "console", "print_table", "fit_table", "local_time", "ago", "duration", "text"]


class Col(NamedTuple):
    name: str
    justify: str = "left"
    key: bool = False   # an id: never cut, never dropped
    drop: int = 0       # 0: always shown; otherwise dropped to fit, highest first


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: such a float (a task may return one) becomes a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(data: Any) -> str:
    return json.dumps(_finite(data), default=str, allow_nan=False)


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(dumps(data))
    else:
        render(data)


def console():
    from rich.console import Console
    return Console(highlight=False)


def print_table(columns: Sequence[Col], rows: Iterable[Sequence[Any]], *, title: str | None = None,
                caption: str | None = None, empty: str | None = None) -> None:
    """Print ``rows`` under ``columns`` within the console's width (see the module docstring),
    or the line ``empty`` when there are none."""
    rows = list(rows)
    if not rows and empty:
        click.echo(empty)
        return
    out = console()
    out.print(fit_table(columns, rows, out, title=title, caption=caption))


def fit_table(columns: Sequence[Col], rows: Iterable[Sequence[Any]], out: Any, *, title: str | None = None,
              caption: str | None = None):
    """A rich Table of ``rows`` that fits ``out``'s width: key columns whole, the others
    wrapped, droppable ones dropped (highest ``drop`` first) until it fits."""
    from rich import box
    from rich.table import Table

    rows = [[text(v) for v in r] for r in rows]
    shown = list(range(len(columns)))
    droppable = sorted((i for i, c in enumerate(columns) if c.drop and not c.key), key=lambda i: -columns[i].drop)
    dropped: list[str] = []
    while True:
        table = Table(title=title, box=box.SIMPLE, show_edge=False, pad_edge=False, collapse_padding=True)
        for i in shown:
            c = columns[i]
            widest = max([len(r[i]) for r in rows] + [len(c.name)])
            table.add_column(c.name, justify=c.justify, overflow="fold", no_wrap=c.key,
                             min_width=widest if c.key else None)
        for r in rows:
            table.add_row(*(r[i] for i in shown))
        if not droppable or out.measure(table, options=out.options.update_width(10**6)).maximum <= out.width:
            break
        i = droppable.pop(0)
        shown.remove(i)
        dropped.append(columns[i].name)
    notes = [caption] if caption else []
    if dropped:
        notes.append(f"hidden at {out.width} columns: {', '.join(dropped)} (--json shows all)")
    table.caption = "\n".join(notes) or None
    return table


def local_time(epoch: float | None) -> str:
    """ISO 8601 local time, to the second."""
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(float(epoch)).isoformat(sep=" ", timespec="seconds")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {(seconds % 3600) // 60:02.0f} min"
    return f"{seconds // 86400:.0f} d {(seconds % 86400) // 3600:02.0f} h"


def ago(epoch: float | None, now: float | None = None) -> str:
    if epoch is None:
        return "-"
    return duration((time.time() if now is None else now) - float(epoch)) + " ago"


def text(value: Any) -> str:
    """A value as a person reads it: no Python reprs (``b'k1'``, ``{'a': 1}``, ``None``)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, float):
        return str(value) if math.isfinite(value) else dumps(value).strip('"')
    if isinstance(value, dict):
        return ", ".join(f"{k}: {text(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return ", ".join(text(v) for v in items) or "-"
    return str(value)
