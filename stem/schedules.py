"""Periodic tasks: when each run of a schedule is due, worked out with no I/O.

A ``Schedule`` names a task, its arguments and a ``Spec`` (``every``, ``cron`` or
``at``).  Every scheduler that holds it computes the same fire times, and each
run's task id (``run_id``) comes from the schedule id and the fire time alone,
so any number of schedulers can publish a run and the keyed publish lets only
one through.  Nothing here reads a clock: the scheduler hands ``due`` the time.

Times are epoch seconds (UTC instants) as floats, but they are compared and
stored in whole milliseconds (``round(t * 1000)``): a fire time read back from
a backend or computed by another process is the same millisecond, never a float
that differs in its last bit.  Datetimes are accepted wherever a time is taken,
and ISO 8601 strings too; a naive datetime (or a string without an offset) is
refused rather than guessed to be UTC or local time: a schedule that runs an
hour off is worse than an error at start-up.

Choices the agreed API leaves open, made here:

* ``every(seconds, anchor=a)`` fires at ``a, a + seconds, a + 2*seconds, ...``:
  the anchor is the first run, never a run before it (as APScheduler's
  ``start_date``).  The default anchor, the epoch, puts every scheduler on the
  same grid.
* ``cron`` takes five fields (or ``@hourly``, ``@daily``/``@midnight``,
  ``@weekly``, ``@monthly``, ``@yearly``/``@annually``) evaluated by cronsim in
  the schedule's zone the way Debian cron handles DST.  A job at a fixed time
  (minute and hour both given) runs once on each day: on spring-forward a
  skipped time runs at the first moment after the jump (``30 2 * * *`` runs at
  03:00 in Europe/Berlin on 2026-03-29), on fall-back a repeated time runs at
  its first occurrence only.  A job with ``*`` in the minute or hour field
  follows elapsed time: an hourly job runs 23 times on spring-forward day and
  25 times on fall-back day.  Two fixed times that fall into the same gap run
  once, at the jump.  ``Spec.period`` of a cron spec is the longest gap among
  its first few fires after a fixed instant, so every scheduler agrees and a
  key meant to outlast a period errs long.
* ``start_at`` and ``end_at`` are both inclusive.
* ``due`` reports at most ``MAX_REPORTED_MISFIRES`` skipped runs (the newest;
  with ``catch_up="all"`` also the ``max_catch_up`` it fires): an outage of a
  million one-second runs is skipped in one call without a list of a million
  floats.  The newest misfire is always in the list, so a scheduler can mark it
  fired and never look at the older ones again.
* ``Schedule.queue`` and ``options.queue`` name the same thing; giving both with
  different values is refused.  ``Schedule.task_options`` is the two merged, what
  to hand ``enqueue``.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import math
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

from . import _checks as checks
from .errors import InvalidTaskOptionsError
from .task import TaskOptions

__all__ = ["Spec", "EverySpec", "CronSpec", "AtSpec", "every", "cron", "at", "Schedule",
           "CATCH_UP", "OVERLAP", "SCHEDULE_ID", "MAX_REPORTED_MISFIRES"]

CATCH_UP = ("none", "latest", "all")
OVERLAP = ("allow", "skip", "queue_one")
#: Schedule ids: 1-128 characters, safe in a task id, a Redis key and a SQL value.
SCHEDULE_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
#: The most misfires one ``due`` call lists as skipped (the newest ones).
MAX_REPORTED_MISFIRES = 10_000

_CRON_ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
                 "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                 "@hourly": "0 * * * *"}
#: Where a cron spec's period is measured from (2001-01-01 UTC): any fixed instant will do.
_PERIOD_FROM_MS = 978_307_200_000
_PERIOD_SAMPLES = 8
#: The epoch seconds a datetime can hold (0001-01-01 to 9999-12-31 UTC).
_EARLIEST, _LATEST = -62_135_596_800, 253_402_300_800
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def _bad(message: str) -> InvalidTaskOptionsError:
    return InvalidTaskOptionsError(message)


def _ms(name: str, value: Any) -> int:
    """An epoch time (number, aware datetime or ISO 8601 string) as whole milliseconds."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise _bad(f"{name} must be ISO 8601 (e.g. '2026-03-29T02:30:00+01:00'), got {value!r}") from None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise _bad(f"{name} {value.isoformat()!r} has no timezone: give an aware datetime "
                       "(e.g. datetime(..., tzinfo=ZoneInfo('Europe/Berlin'))) or an offset")
        return round(value.timestamp() * 1000)
    if not checks.is_number(value) or not _EARLIEST <= value < _LATEST:
        raise _bad(f"{name} must be epoch seconds (years 1-9999), an aware datetime or an ISO 8601 string, "
                   f"got {value!r}")
    return round(value * 1000)


def _optional_ms(name: str, value: Any) -> int | None:
    return None if value is None else _ms(name, value)


class Spec(abc.ABC):
    """When a schedule fires: a set of instants, the same in every process.

    Specs are immutable, hashable and compare equal when they fire at the same
    times by the same rule."""

    @abc.abstractmethod
    def next_after(self, t: float) -> float | None:
        """The first fire time strictly after epoch ``t`` (to the millisecond), or None."""

    @property
    @abc.abstractmethod
    def period(self) -> float:
        """Typical seconds between runs (0 for a one-shot)."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (``{"kind": ..., ...}``) that ``Spec.from_dict`` reads back."""

    def fire_times(self, after: float, until: float) -> Iterator[float]:
        """The fire times ``t`` with ``after < t <= until``, ascending (bad bounds raise here,
        not at the first ``next``)."""
        return self._times(_ms("after", after), _ms("until", until))

    def _times(self, after_ms: int, until_ms: int) -> Iterator[float]:
        t = self.next_after(after_ms / 1000)
        while t is not None and round(t * 1000) <= until_ms:
            yield t
            t = self.next_after(t)

    def newest_fire_times(self, after: float, until: float, limit: int) -> list[float]:
        """The newest ``limit`` fire times in ``(after, until]``, ascending (what ``due`` needs
        after an outage, without keeping every run of it)."""
        return list(deque(self.fire_times(after, until), maxlen=limit))

    @staticmethod
    def from_dict(d: Any) -> "Spec":
        """The spec ``to_dict`` wrote; bad data raises ``InvalidTaskOptionsError``."""
        if not isinstance(d, dict) or not isinstance(d.get("kind"), str) or d["kind"] not in _KINDS:
            raise _bad(f"a spec must be a dict with kind one of {tuple(_KINDS)}, got {d!r}")
        kind, fields = _KINDS[d["kind"]]
        extra = set(d) - fields - {"kind"}
        missing = fields - set(d)
        if extra or missing:
            raise _bad(f"a {d['kind']!r} spec has fields {sorted(fields)}; got {sorted(set(d) - {'kind'})}")
        return kind(**{k: d[k] for k in fields})


@dataclass(frozen=True)
class EverySpec(Spec):
    """Every ``seconds`` from ``anchor`` on: ``anchor + k * seconds`` for k = 0, 1, 2, ...
    Never "last run + interval", so a slow or restarted scheduler cannot make it drift."""

    seconds: float
    anchor: float = 0.0

    def __post_init__(self) -> None:
        checks.seconds("every", self.seconds, minimum=1.0, inclusive=True, error=InvalidTaskOptionsError)
        if round(self.seconds * 1000) != self.seconds * 1000:
            raise _bad(f"every must be whole milliseconds, got {self.seconds!r}")
        object.__setattr__(self, "seconds", float(self.seconds))
        object.__setattr__(self, "anchor", _ms("anchor", self.anchor) / 1000)

    @property
    def _step_ms(self) -> int:
        return round(self.seconds * 1000)

    def _first_index_after(self, t_ms: int) -> int:
        anchor_ms = round(self.anchor * 1000)
        return 0 if t_ms < anchor_ms else (t_ms - anchor_ms) // self._step_ms + 1

    def _at_index(self, k: int) -> float:
        return (round(self.anchor * 1000) + k * self._step_ms) / 1000

    def next_after(self, t: float) -> float | None:
        return self._at_index(self._first_index_after(_ms("t", t)))

    def _times(self, after_ms: int, until_ms: int) -> Iterator[float]:
        k = self._first_index_after(after_ms)
        anchor_ms, step = round(self.anchor * 1000), self._step_ms
        while anchor_ms + k * step <= until_ms:
            yield (anchor_ms + k * step) / 1000
            k += 1

    def newest_fire_times(self, after: float, until: float, limit: int) -> list[float]:
        first, until_ms = self._first_index_after(_ms("after", after)), _ms("until", until)
        anchor_ms, step = round(self.anchor * 1000), self._step_ms
        if until_ms < anchor_ms:
            return []
        last = (until_ms - anchor_ms) // step
        return [(anchor_ms + k * step) / 1000 for k in range(max(first, last - limit + 1), last + 1)]

    @property
    def period(self) -> float:
        return self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "every", "seconds": self.seconds, "anchor": self.anchor}


@dataclass(frozen=True)
class CronSpec(Spec):
    """A five-field cron expression evaluated in the zone ``tz`` by cronsim (Debian cron's
    DST rules; see the module docstring)."""

    expr: str
    tz: str = "UTC"

    def __post_init__(self) -> None:
        if not isinstance(self.expr, str):
            raise _bad(f"a cron expression must be a string, got {self.expr!r}")
        expr = " ".join(self.expr.split())
        object.__setattr__(self, "expr", expr)
        fields = _CRON_ALIASES.get(expr.lower(), expr)
        if len(fields.split()) != 5:
            raise _bad(f"bad cron expression {self.expr!r}: give five fields (minute hour day month weekday), "
                       f"e.g. '30 2 * * *', or one of {sorted(_CRON_ALIASES)}")
        zone = _zone(self.tz)
        try:
            CronSim(fields, datetime.fromtimestamp(0, zone))
        except CronSimError as exc:
            raise _bad(f"bad cron expression {self.expr!r}: {exc}") from None

    @cached_property
    def _fields(self) -> str:
        return _CRON_ALIASES.get(self.expr.lower(), self.expr)

    @cached_property
    def _tzinfo(self) -> Any:
        return _zone(self.tz)

    def _walk(self, after_ms: int) -> Iterator[int]:
        """The fire times after ``after_ms``, ascending, in whole milliseconds, without end."""
        it = CronSim(self._fields, datetime.fromtimestamp(after_ms / 1000, self._tzinfo))
        last_ms = after_ms
        while True:
            try:
                t_ms = round(next(it).timestamp() * 1000)
            except (StopIteration, OverflowError, ValueError):   # none within 50 years, or past year 9999
                return
            # cronsim walks wall-clock time for a fixed-time job: starting inside a repeated
            # hour, or two times in one gap (both moved to the jump), give an instant already seen.
            if t_ms > last_ms:
                last_ms = t_ms
                yield t_ms

    def _times(self, after_ms: int, until_ms: int) -> Iterator[float]:
        for t_ms in self._walk(after_ms):
            if t_ms > until_ms:
                return
            yield t_ms / 1000

    def next_after(self, t: float) -> float | None:
        t_ms = next(self._walk(_ms("t", t)), None)
        return None if t_ms is None else t_ms / 1000

    @cached_property
    def period(self) -> float:   # type: ignore[override]
        times = list(itertools.islice(self._walk(_PERIOD_FROM_MS), _PERIOD_SAMPLES))
        return max(((b - a) / 1000 for a, b in zip(times, times[1:])), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "cron", "expr": self.expr, "tz": self.tz}


@dataclass(frozen=True)
class AtSpec(Spec):
    """Once, at ``when`` (epoch seconds)."""

    when: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "when", _ms("at", self.when) / 1000)

    def next_after(self, t: float) -> float | None:
        return self.when if round(self.when * 1000) > _ms("t", t) else None

    @property
    def period(self) -> float:
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "at", "when": self.when}


_KINDS: dict[str, tuple[type[Spec], set[str]]] = {
    "every": (EverySpec, {"seconds", "anchor"}), "cron": (CronSpec, {"expr", "tz"}), "at": (AtSpec, {"when"})}


def _zone(tz: Any) -> Any:
    if not isinstance(tz, str) or not tz:
        raise _bad(f"tz must be an IANA zone name such as 'Europe/Berlin', got {tz!r}")
    if tz == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise _bad(f"unknown timezone {tz!r}: use an IANA zone name such as 'Europe/Berlin' or 'UTC'") from None


def every(seconds: float, *, anchor: float | datetime | str | None = None) -> Spec:
    """Every ``seconds`` (>= 1), on the grid ``anchor + k * seconds`` (anchor default: the epoch)."""
    return EverySpec(seconds, 0.0 if anchor is None else anchor)   # type: ignore[arg-type]


def cron(expr: str, tz: str = "UTC") -> Spec:
    """A five-field cron expression in the IANA zone ``tz``."""
    return CronSpec(expr, tz)


def at(when: float | datetime | str) -> Spec:
    """Once: epoch seconds, an aware datetime or an ISO 8601 string with an offset."""
    return AtSpec(when)   # type: ignore[arg-type]


@dataclass(frozen=True)
class Schedule:
    """A task run on a ``Spec``; see the module docstring for the rules.  Every bad value
    raises ``InvalidTaskOptionsError`` here, when the schedule is made."""

    id: str
    task: str
    spec: Spec
    args: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    options: TaskOptions | None = None
    jitter: float = 0.0
    start_at: float | None = None
    end_at: float | None = None
    catch_up: str = "latest"
    max_catch_up: int = 100
    overlap: str = "allow"

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not SCHEDULE_ID.fullmatch(self.id):
            raise _bad(f"bad schedule id {self.id!r}: use 1-128 characters from A-Z a-z 0-9 _ . : -")
        checks.task_name(self.task, error=InvalidTaskOptionsError)
        if not isinstance(self.spec, Spec):
            raise _bad(f"spec of schedule {self.id!r} must be every(...), cron(...) or at(...), got {self.spec!r}")
        object.__setattr__(self, "args", _plain_args(self.id, self.args))
        if self.queue is not None:
            checks.queue_name(self.queue, error=InvalidTaskOptionsError)
        if self.options is not None:
            if not isinstance(self.options, TaskOptions):
                raise _bad(f"options of schedule {self.id!r} must be a TaskOptions, got {self.options!r}")
            if self.options.unique:
                raise _bad(f"schedule {self.id!r}: options with unique=True are refused; each run is "
                           "already published once under its run id")
            # a global rate_limit travels with each run (stem.limits); a per-worker one cannot
            handler_only = [f for f in ("rate_scope", "autoretry_for", "retry_backoff", "retry_backoff_max")
                            if getattr(self.options, f) is not None and
                            (f != "rate_scope" or self.options.rate_scope == "worker")]
            if handler_only:
                raise _bad(f"schedule {self.id!r}: {', '.join(handler_only)} are options of the handler "
                           "(@registry.task(..., options=...)), which its runs get; one enqueue cannot set them")
            if self.queue is not None and self.options.queue is not None and self.queue != self.options.queue:
                raise _bad(f"schedule {self.id!r}: queue={self.queue!r} and options.queue="
                           f"{self.options.queue!r} disagree; give one")
        object.__setattr__(self, "jitter", checks.seconds(
            "jitter", self.jitter, inclusive=True, error=InvalidTaskOptionsError))
        start, end = _optional_ms("start_at", self.start_at), _optional_ms("end_at", self.end_at)
        if start is not None and end is not None and end <= start:
            raise _bad(f"schedule {self.id!r}: end_at ({end / 1000}) must be after start_at ({start / 1000})")
        object.__setattr__(self, "start_at", None if start is None else start / 1000)
        object.__setattr__(self, "end_at", None if end is None else end / 1000)
        if self.catch_up not in CATCH_UP:
            raise _bad(f"catch_up must be one of {CATCH_UP}, got {self.catch_up!r}")
        checks.integer("max_catch_up", self.max_catch_up, minimum=1, error=InvalidTaskOptionsError)
        if self.overlap not in OVERLAP:
            raise _bad(f"overlap must be one of {OVERLAP}, got {self.overlap!r}")

    def __hash__(self) -> int:   # args is a dict: hash what identifies the schedule
        return hash((self.id, self.task, self.spec))

    @property
    def task_options(self) -> TaskOptions | None:
        """``options`` with ``queue`` folded in: what each run is enqueued with."""
        if self.queue is None or (self.options is not None and self.options.queue == self.queue):
            return self.options
        return msgspec.structs.replace(self.options or TaskOptions(), queue=self.queue)

    def run_id(self, fire_time: float) -> str:
        """The task id of the run due at ``fire_time``: the same in every scheduler."""
        return f"sched:{self.id}:{_ms('fire_time', fire_time)}"

    def jitter_for(self, fire_time: float) -> float:
        """The run's delay past its fire time, in [0, jitter), whole milliseconds, hashed from
        (id, fire time) so every scheduler picks the same one."""
        jitter_ms = round(self.jitter * 1000)
        if jitter_ms <= 0:
            return 0.0
        digest = hashlib.blake2b(f"{self.id}\0{_ms('fire_time', fire_time)}".encode(), digest_size=8).digest()
        return (int.from_bytes(digest, "big") * jitter_ms >> 64) / 1000

    def fire_times(self, after: float, until: float) -> Iterator[float]:
        """The spec's fire times in ``(after, until]`` within ``[start_at, end_at]``."""
        lo, hi = self._bounds(_ms("after", after), _ms("until", until))
        return self.spec.fire_times(lo / 1000, hi / 1000) if hi > lo else iter(())

    def _bounds(self, lo_ms: int, hi_ms: int) -> tuple[int, int]:
        if self.start_at is not None:
            lo_ms = max(lo_ms, round(self.start_at * 1000) - 1)   # t >= start_at, in whole ms
        if self.end_at is not None:
            hi_ms = min(hi_ms, round(self.end_at * 1000))
        return lo_ms, hi_ms

    def due(self, last_fired: float | None, now: float, grace: float) -> tuple[list[float], list[float]]:
        """(runs to fire now, runs skipped as misfires), each ascending.

        Candidates are the fire times in ``(last_fired, now]`` within ``[start_at, end_at]``;
        with ``last_fired`` None (never fired), only those in ``(now - grace, now]``.  A
        ``last_fired`` after ``now`` (the clock went back) yields nothing until ``now``
        passes it.  A run is on time if ``now - t <= grace``; older ones are misfires:
        "none" skips them all, "latest" fires the newest misfire only when no run is on
        time, "all" fires the newest ``max_catch_up`` misfires.  Skipped ones are listed,
        at most ``MAX_REPORTED_MISFIRES`` (the newest).  The caller records the newest of
        both lists as fired (a skipped run is settled too; otherwise every pass reports it
        again).  ``grace`` must be > 0: with none, a schedule that never fired never would."""
        now_ms = _ms("now", now)
        grace_ms = checks.ms(checks.seconds("grace", grace, error=InvalidTaskOptionsError))
        lo_ms = now_ms - grace_ms if last_fired is None else _ms("last_fired", last_fired)
        lo_ms, hi_ms = self._bounds(lo_ms, now_ms)
        if hi_ms <= lo_ms:
            return [], []
        on_time_from = max(lo_ms, now_ms - grace_ms - 1)        # on time: t >= now - grace, in whole ms
        on_time = list(self.spec.fire_times(on_time_from / 1000, hi_ms / 1000))
        missed: list[float] = []
        if on_time_from > lo_ms:
            keep = MAX_REPORTED_MISFIRES + (self.max_catch_up if self.catch_up == "all" else 0)
            missed = self.spec.newest_fire_times(lo_ms / 1000, min(on_time_from, hi_ms) / 1000, keep)
        if self.catch_up == "none" or not missed:
            return on_time, missed
        if self.catch_up == "latest":
            return (on_time, missed) if on_time else ([missed[-1]], missed[:-1])
        split = max(len(missed) - self.max_catch_up, 0)
        return missed[split:] + on_time, missed[:split]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of msgpack values (a definition stored in a backend).  Options that
        cannot be stored (``autoretry_for``: exception classes) raise ``InvalidTaskOptionsError``."""
        return {"id": self.id, "task": self.task, "spec": self.spec.to_dict(), "args": self.args,
                "queue": self.queue, "options": _options_to_dict(self.id, self.options), "jitter": self.jitter,
                "start_at": self.start_at, "end_at": self.end_at, "catch_up": self.catch_up,
                "max_catch_up": self.max_catch_up, "overlap": self.overlap}

    @classmethod
    def from_dict(cls, d: Any) -> "Schedule":
        """The schedule ``to_dict`` wrote; unknown or missing fields raise ``InvalidTaskOptionsError``
        (a definition written by a newer stem is refused, not half understood)."""
        names = set(cls.__dataclass_fields__)
        if not isinstance(d, dict) or set(d) != names:
            got = sorted(d) if isinstance(d, dict) else d
            raise _bad(f"a stored schedule has the fields {sorted(names)}, got {got!r}")
        options = d["options"]
        if options is not None:
            if not isinstance(options, dict):
                raise _bad(f"options of stored schedule {d['id']!r} must be a dict, got {options!r}")
            try:
                options = TaskOptions(**options)
            except TypeError as exc:
                raise _bad(f"options of stored schedule {d['id']!r}: {exc}") from None
        return cls(**{**d, "spec": Spec.from_dict(d["spec"]), "options": options})


def _plain_args(schedule_id: str, args: Any) -> dict[str, Any]:
    """``args`` checked (a dict with str keys, msgpack values) and copied deep, so the frozen
    schedule cannot be changed through the caller's dict."""
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise _bad(f"args of schedule {schedule_id!r} must be a dict with str keys, got {args!r}")
    try:
        return _decode(_encode(args))
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise _bad(f"args of schedule {schedule_id!r} must be msgpack values (str, int, float, bool, None, "
                   f"bytes, lists and str-keyed dicts of them): {exc}") from None


def _options_to_dict(schedule_id: str, options: TaskOptions | None) -> dict[str, Any] | None:
    if options is None:
        return None
    out = {}
    for name in options.__struct_fields__:
        value = getattr(options, name)
        if value is None:
            continue
        if isinstance(value, bool) or (isinstance(value, (int, float, str)) and
                                       (not isinstance(value, float) or math.isfinite(value))):
            out[name] = value
        else:
            raise _bad(f"schedule {schedule_id!r} cannot be stored: its option {name}={value!r} is not a plain "
                       "value; declare the schedule in code, or set the option on the task's handler")
    return out
