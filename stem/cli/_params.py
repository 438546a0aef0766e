"""Option types of the ``stem`` command: each refuses a bad value as a usage error (exit 2)
before anything connects, with the fix in the message."""

from __future__ import annotations

import datetime
import json
import math
import re
import sys
from typing import Any

import click

from ..config import check_url
from ..errors import ConfigurationError

__all__ = ["parse_size", "SizeParam", "AutoscaleRange", "Seconds", "QueueName", "QueueList", "Url", "JsonObject", "When",
           "AppPath", "NonEmpty", "loads_json"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_QUEUE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_APP = re.compile(rf"({_DOTTED})(?::({_DOTTED}))?")


def parse_size(text: str) -> int:
    """'200MB', '1.5GiB', '4096' -> bytes."""
    m = _SIZE.match(text or "")
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ConfigurationError(f"bad size {text!r}: use a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigurationError(f"size {text!r} must be positive")
    return value


class SizeParam(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ConfigurationError as exc:
            self.fail(str(exc), param, ctx)


class AutoscaleRange(click.ParamType):
    """``MAX,MIN`` (Celery's order) or ``MAX`` (the minimum is then 1): a ``WorkerAutoscaleConfig``."""

    name = "max,min"

    def convert(self, value, param, ctx):
        from ..worker.autoscale import WorkerAutoscaleConfig
        if isinstance(value, WorkerAutoscaleConfig):
            return value
        parts = [p.strip() for p in str(value).split(",")]
        if len(parts) > 2 or not all(p.isdigit() for p in parts):
            self.fail(f"{value!r} is not MAX,MIN: give two whole numbers, the most and the fewest children, "
                      "e.g. --autoscale 8,2", param, ctx)
        high = int(parts[0])
        low = int(parts[1]) if len(parts) == 2 else 1
        try:
            return WorkerAutoscaleConfig(max_concurrency=high, min_concurrency=low)
        except ConfigurationError as exc:
            self.fail(str(exc), param, ctx)


class Seconds(click.ParamType):
    """A finite number of seconds, at least ``minimum`` (above it when ``open_min``):
    click's FloatRange lets 'nan' and 'inf' through."""

    name = "seconds"

    def __init__(self, minimum: float = 0.0, open_min: bool = False):
        self.minimum, self.open_min = minimum, open_min

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if number < self.minimum or (self.open_min and number == self.minimum):
            self.fail(f"{value!r} must be {'>' if self.open_min else '>='} {self.minimum:g} seconds", param, ctx)
        return number


class QueueName(click.ParamType):
    name = "queue"

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or not _QUEUE.fullmatch(value):
            self.fail(f"bad queue name {value!r}: use 1-128 characters from A-Z a-z 0-9 _ . : -", param, ctx)
        return value


class QueueList(click.ParamType):
    """Comma-separated queue names; '' and 'a,,b' are mistakes, not a default."""

    name = "queues"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        names = [q.strip() for q in str(value).split(",")]
        if not any(names):
            self.fail("names no queue: give a comma-separated list, e.g. -Q default,mail", param, ctx)
        return [QueueName().convert(q, param, ctx) for q in names]


class Url(click.ParamType):
    name = "url"

    def __init__(self, what: str):
        self.what = what

    def convert(self, value, param, ctx):
        try:
            return check_url(value, self.what)
        except ConfigurationError as exc:
            hint = " (leave the option out to use the configured one)" if not str(value).strip() else ""
            self.fail(f"{exc}{hint}", param, ctx)


class NonEmpty(click.ParamType):
    name = "text"

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or not value.strip():
            self.fail("must not be empty", param, ctx)
        return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a float (JSON numbers must be finite)")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (NaN and Infinity are not numbers JSON can carry)")


def loads_json(text: str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and numbers too large for a float
    (the standard module accepts all three and its output is then not JSON)."""
    return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)


class JsonObject(click.ParamType):
    """A JSON object given inline, as ``@path`` (read from a file) or ``-`` (stdin)."""

    name = "json"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        source = "inline"
        if value == "-":
            if ctx is not None and ctx.meta.get("stem.stdin_read"):
                self.fail("stdin is already read by another option: give this one inline or as @FILE", param, ctx)
            if ctx is not None:
                ctx.meta["stem.stdin_read"] = True
            value, source = sys.stdin.read(), "stdin"
        elif value.startswith("@"):
            path = value[1:]
            try:
                with open(path, encoding="utf-8") as f:
                    value, source = f.read(), path
            except OSError as exc:
                self.fail(f"cannot read {path!r}: {exc.strerror}", param, ctx)
        try:
            data = loads_json(value)
        except ValueError as exc:   # json.JSONDecodeError is a ValueError
            where = "" if source == "inline" else f" (from {source})"
            self.fail(f"not JSON{where}: {exc}", param, ctx)
        if not isinstance(data, dict):
            self.fail(f"must be a JSON object ({{...}}), got {type(data).__name__}", param, ctx)
        return data


class When(click.ParamType):
    """A moment: ISO 8601 (local time unless it names a zone) or epoch seconds."""

    name = "when"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            epoch = float(value)
        except ValueError:
            try:
                moment = datetime.datetime.fromisoformat(value.strip())
            except ValueError:
                self.fail(f"{value!r} is neither ISO 8601 (2026-03-01T14:30, 2026-03-01T14:30:00+01:00) "
                          "nor epoch seconds", param, ctx)
            return moment.timestamp()   # a naive moment is local time
        if not math.isfinite(epoch) or epoch < 0:
            self.fail(f"{value!r} is not a finite epoch time", param, ctx)
        return epoch


class AppPath(click.ParamType):
    """``package.module:attribute`` (the attribute defaults to ``registry``)."""

    name = "module:registry"

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or not _APP.fullmatch(value.strip()):
            self.fail(f"{value!r} is not an import path: give package.module:attribute, e.g. -A myapp.tasks:registry",
                      param, ctx)
        return value.strip()

