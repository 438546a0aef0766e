"""Result backends.  A URL picks the adapter, as for brokers."""

from __future__ import annotations

from typing import Any

from .. import _adapters
from .base import ResultBackend, ScheduleRecord
from .memory import InMemoryResultBackend

__all__ = ["ResultBackend", "ScheduleRecord", "InMemoryResultBackend", "RedisResultBackend", "PostgresResultBackend",
           "SqliteResultBackend", "from_url"]

_memory_instances: dict[str, InMemoryResultBackend] = {}

_LAZY = {"RedisResultBackend": "redis", "PostgresResultBackend": "postgres", "SqliteResultBackend": "sqlite"}


def __getattr__(name: str) -> Any:
    return _adapters.lazy_class("stem.backends", _LAZY, name)


def from_url(url: str, **kwargs: Any) -> ResultBackend:
    return _adapters.from_url("result backend", "stem.backends", "ResultBackend", url, _memory_instances,
                              lambda u: InMemoryResultBackend(url=u, **kwargs), lambda b: True, kwargs)
